"""Multi-GPU scaling of LoRA training on the Wan 2.1 T2V DiT: 1, 2, 4, 8 ranks (engine only, random weights).

    python benchmarks/bench_multi_gpu.py                               # 1.3B and 14B, 832×480×81, on every GPU
    python benchmarks/bench_multi_gpu.py --model 14B --ranks 1,8 --shard-base none,fsdp2
    python benchmarks/bench_multi_gpu.py --tiny                        # CPU, gloo, 1 and 2 ranks, tiny preset

Each configuration is one data-parallel run launched the way torchrun launches it (one process per rank, RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; NCCL on GPUs, gloo on CPU) through the same code the
headless trainer runs: `TrainingSession` with `DataParallel` (DDP over the adapters; `--shard-base fsdp2` also
splits the frozen base with FSDP2). Every rank trains batch 1 per micro-step, so W ranks process W clips per
optimizer step.

Reports per configuration: s/step, steps/s, clips/s, the peak memory of the busiest rank, and the scaling
efficiency = clips/s of W ranks ÷ (W × clips/s of 1 rank): 1.0 is perfect scaling (goal for 14B: ≥ 0.9 on 8
GPUs). One JSON line per configuration (prefix `JSON `).

A sharded base (fsdp2) is built on the meta device, sharded, then each rank fills its own shards with random
values on its device (no rank ever holds the whole model); an unsharded one is built whole on each rank's device.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import DTYPES, clip_size, device_name, sync  # noqa: E402

DEFAULT_SIZE = {"tiny": (64, 64, 5)}   # real models: the official 832×480×81 clip (latent 21×60×104)
TEXT_TOKENS = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- one rank ----------------------------------------------------------------------------------------------------

def _model(name: str, device: torch.device, dtype: torch.dtype, parallel):
    """Random weights; sharded on the meta device first when the parallel shards the base."""
    from engine.families.wan.dit import build_wan_model, keep_fp32
    from engine.families.wan.presets import OFFICIAL, PRESETS

    from benchmarks.bench_training import build_random_model

    if not parallel.shards_base:
        return build_random_model(name, device, dtype)
    cfg = {"1.3B": OFFICIAL["t2v-1.3B"], "14B": OFFICIAL["t2v-14B"], "tiny": PRESETS["tiny-t2v"]}[name]
    model = build_wan_model(cfg, "meta")
    for n, p in model.named_parameters():
        if not keep_fp32(n):
            p.data = p.data.to(dtype)
    model.requires_grad_(False)
    parallel.shard_model(model)         # meta shards: nothing allocated yet
    model.to_empty(device=device)       # this rank's shards only
    g = torch.Generator(device=device).manual_seed(1000 + parallel.rank)
    with torch.no_grad():
        for n, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "norm" in n and p.dim() == 1:
                local.fill_(1.0)
            elif p.dim() >= 2:
                local.normal_(0.0, 0.02, generator=g)
            else:
                local.zero_()
    return model


def worker(spec: dict) -> None:
    """One rank of one configuration; rank 0 prints the JSON result."""
    from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig,
                                 TrainingConfig, TrainingSession)
    from engine.training.distributed import (DataParallel, LaunchEnv, SingleProcess, destroy_process_group,
                                             init_process_group, launch_device)

    launch = LaunchEnv.read()
    device = launch_device(launch, spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel = SingleProcess()
    if launch.world_size > 1:
        init_process_group(launch, device, timeout_s=600)
        parallel = DataParallel(device=device, shard_base=spec["shard_base"])
    try:
        model = _model(spec["model"], device, DTYPES[spec["dtype"]], parallel)
        cfg = model.config
        width, height, frames = spec["size"]
        latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        g = torch.Generator().manual_seed(0)
        batches = [{"latents": torch.randn(latent, generator=g).to(torch.bfloat16),
                    "context": [torch.randn(TEXT_TOKENS, cfg.text_dim, generator=g).to(torch.bfloat16)]}
                   for _ in range(2 * launch.world_size)]
        steps, warmup = spec["steps"], spec["warmup"]
        session = TrainingSession(
            model, NetworkConfig(rank=spec["rank"], alpha=spec["rank"]), OptimizerConfig(learning_rate=1e-4),
            InMemoryBatchLoader(batches), TrainingConfig(
                output_dir=spec["output_dir"], max_train_steps=warmup + steps + 1,
                mixed_precision=spec["mixed_precision"], gradient_checkpointing=True,
                attention_backend=spec["backend"], save_state_every_minutes=None,
                timesteps=TimestepConfig("shift", discrete_flow_shift=3.0)),
            parallel=parallel)
        session.train_steps(warmup)   # kernel selection, allocator, optimizer state, DDP buckets
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if launch.world_size > 1:
            torch.distributed.barrier()
        start = time.perf_counter()
        losses = session.train_steps(steps)
        sync(device)
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _rss_gib()
        numbers = torch.tensor([elapsed, peak], dtype=torch.float64)
        if launch.world_size > 1:   # the slowest rank and the busiest memory
            numbers = numbers.to(parallel.comm_device)
            torch.distributed.all_reduce(numbers, op=torch.distributed.ReduceOp.MAX)
        elapsed, peak = numbers.tolist()
        report = getattr(parallel, "shard_report", None)
        if launch.rank == 0:
            print("RESULT " + json.dumps({
                "s_per_step": elapsed / steps, "peak_gib": peak, "final_loss": losses[-1],
                "tokens": latent[2] * (latent[3] // 2) * (latent[4] // 2), "variant": cfg.variant,
                "device": device_name(device),
                "base_gib_per_rank": None if report is None else report.local_bytes / 2**30,
                "base_gib": None if report is None else report.total_bytes / 2**30}), flush=True)
    finally:
        destroy_process_group()


def _rss_gib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    except ImportError:
        return 0.0


# --- the launcher ------------------------------------------------------------------------------------------------

def launch(spec: dict, world: int, timeout: float) -> dict:
    """`world` processes of this script in worker mode, torchrun's environment; rank 0's result."""
    port = _free_port()
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench_multi_gpu_") as folder:
        spec = dict(spec, output_dir=folder)
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
            if spec["device"] == "cpu":
                env.setdefault("OMP_NUM_THREADS", "1")
            out = open(Path(folder) / f"rank{rank}.log", "w")
            procs.append((subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=REPO,
                                           env=env, stdout=out, stderr=subprocess.STDOUT), out))
        end = time.monotonic() + timeout
        codes = []
        try:
            for p, _ in procs:
                codes.append(p.wait(max(1.0, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append("timeout")
        finally:
            for p, out in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
                out.close()
        logs = [(Path(folder) / f"rank{r}.log").read_text() for r in range(world)]
    result = next((json.loads(line[7:]) for line in logs[0].splitlines() if line.startswith("RESULT ")), None)
    if result is None or any(c != 0 for c in codes):
        tail = "\n".join(f"--- rank {r} (exit {codes[r] if r < len(codes) else '?'}):\n" +
                         "\n".join(log.splitlines()[-15:]) for r, log in enumerate(logs))
        raise RuntimeError(f"{world} rank(s), {spec['model']} shard_base={spec['shard_base']} failed:\n{tail}")
    return result


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1.3B,14B", help="comma-separated: 1.3B, 14B, tiny")
    ap.add_argument("--ranks", default=None, help="comma-separated world sizes (default: 1, 2, 4, 8 up to the GPUs)")
    ap.add_argument("--shard-base", default="none", help="comma-separated: none, fsdp2 (frozen base split, FSDP2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--width", type=int), ap.add_argument("--height", type=int), ap.add_argument("--frames", type=int)
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="DiT weight dtype")
    ap.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], default="bf16")
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds one configuration may take")
    ap.add_argument("--tiny", action="store_true", help="CPU, gloo, 1 and 2 ranks, tiny preset, fsdp2 too")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return []
    if args.tiny:
        args.model, args.device, args.ranks, args.shard_base = "tiny", "cpu", args.ranks or "1,2", "none,fsdp2"
        args.steps, args.dtype, args.mixed_precision = min(args.steps, 2), "fp32", "no"

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    modes = [m.strip() for m in args.shard_base.split(",") if m.strip()]
    for m in models:
        if m not in ("1.3B", "14B", "tiny"):
            ap.error(f"--model {m}: expected 1.3B, 14B or tiny")
    for m in modes:
        if m not in ("none", "fsdp2"):
            ap.error(f"--shard-base {m}: expected none or fsdp2")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device here (use --tiny, or --device cpu)")
        gpus = torch.cuda.device_count()
        worlds = [int(w) for w in args.ranks.split(",")] if args.ranks else [w for w in (1, 2, 4, 8) if w <= gpus]
        if max(worlds) > gpus:
            ap.error(f"--ranks {args.ranks}: this machine has {gpus} GPU(s)")
        device = "cuda"
    else:
        worlds = [int(w) for w in (args.ranks or "1,2").split(",")]
        device = "cpu"

    results = []
    for model in models:
        size = clip_size(ap, args, DEFAULT_SIZE.get(model, (832, 480, 81)))
        base = None   # clips/s of 1 rank
        for world in worlds:
            for mode in modes:
                if world == 1 and mode != "none":
                    continue   # one rank: nothing to shard
                spec = {"model": model, "device": device, "size": size, "rank": args.rank, "steps": args.steps,
                        "warmup": args.warmup, "dtype": args.dtype, "mixed_precision": args.mixed_precision,
                        "backend": args.backend, "shard_base": mode}
                r = launch(spec, world, args.timeout)
                clips = world / r["s_per_step"]
                if world == 1:
                    base = clips
                row = {"bench": "multi_gpu", "model": model, "variant": r["variant"], "device": r["device"],
                       "world_size": world, "shard_base": mode, "width": size[0], "height": size[1],
                       "frames": size[2], "tokens": r["tokens"], "lora_rank": args.rank, "dtype": args.dtype,
                       "steps": args.steps, "s_per_step": r["s_per_step"], "steps_per_s": 1 / r["s_per_step"],
                       "clips_per_s": clips, "scaling_efficiency": None if base is None else clips / (world * base),
                       "peak_gib_per_rank": r["peak_gib"], "base_gib_per_rank": r["base_gib_per_rank"],
                       "base_gib": r["base_gib"], "final_loss": r["final_loss"]}
                results.append(row)
                eff = "-" if row["scaling_efficiency"] is None else f"{row['scaling_efficiency']:.2f}"
                mem = "GiB" if device == "cuda" else "GiB RSS"
                print(f"{r['variant']} {size[0]}x{size[1]}x{size[2]} {world} rank(s) shard_base={mode}: "
                      f"{row['s_per_step']:.3f} s/step, {row['steps_per_s']:.3f} steps/s, {clips:.3f} clips/s, "
                      f"scaling efficiency {eff}, peak {row['peak_gib_per_rank']:.2f} {mem}", flush=True)
                print("JSON " + json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
