"""Memory-engine benchmark: a Wan or HunyuanVideo DiT with random weights, block swap × fp8 × training/inference.

    python benchmarks/bench_memory.py                        # GPU: Wan 1.3B and 14B at 832×480×81 (latent 21×60×104)
    python benchmarks/bench_memory.py --family hunyuan       # GPU: HunyuanVideo 13B at 960×544×129 (latent 33×68×120)
    python benchmarks/bench_memory.py --device cpu --model tiny   # quick CPU smoke run, same output format
    python benchmarks/bench_memory.py --family wan22 --model TI2V-5B --latent 31,44,80   # GPU: 1280×704×121

One JSON line per configuration: seconds per step, peak device memory, host (pinned) memory held by block swap,
bytes copied host->device per step, the measured host->device bandwidth, the transfer time those bytes imply, and the
swap overhead (time with swap ÷ time without, same model / fp8 mode / task / activation offload). Training = LoRA rank
32 (fp32 adapters) on every default target, bf16 autocast, gradient checkpointing (activation offload per --offload),
one forward+backward per step (no optimizer); inference = one no-grad forward. `--sim` adds the peak that
benchmarks/sim_memory.py predicts for the same row, so one GPU run also checks the simulation.
Engine only (no ComfyUI); the DiT is imported lazily.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.sim_memory import FAMILIES  # noqa: E402  (one list of models for measurement and simulation)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--family", default="wan", choices=list(FAMILIES))
    p.add_argument("--model", default=None, help="comma list (Wan: tiny, 1.3B, 14B; HunyuanVideo: tiny, 13B; "
                                                 "Wan 2.2: tiny, tiny-i2v, tiny-ti2v, A14B-T2V, A14B-I2V (one "
                                                 "expert), TI2V-5B); "
                                                 "default: the family's full-size models")
    p.add_argument("--task", default="train,infer")
    p.add_argument("--swap", default=None, help="comma list of block counts or 'max' (default: the family's grid; "
                                                "tiny: 0,2,4,max)")
    p.add_argument("--fp8", default="none,e4m3,scaled")
    p.add_argument("--latent", default=None, help="F,H,W of the latent (default: the family's; tiny: 2,8,8)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--offload", default="1", help="activation offload for training rows: 0, 1 or 0,1")
    p.add_argument("--checkpoint-dtype", default="compute",
                   help="what checkpointing saves of each block input: compute (bf16, the trainer's default) or float32")
    p.add_argument("--non-blocks", default="0", help="offload_non_blocks for rows with swap: 0, 1 or 0,1")
    p.add_argument("--sim", action="store_true",
                   help="also run benchmarks/sim_memory.py's simulation of each row and report its peak next to the "
                        "measured one (checks the simulation against the GPU)")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def h2d_bandwidth(device, nbytes=256 << 20) -> float | None:
    """Bytes/s of a pinned host->device copy (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    sync(device)
    return 5 * nbytes / (time.perf_counter() - t0)


def build_model(family: str, name: str, fp8: str):
    """Random-weight bf16 model on the CPU (fp8-quantized if asked)."""
    from engine.memory import quantize_model_fp8

    fam = FAMILIES[family]
    model = fam.build(fam.config(name), "meta").to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            else:
                p.fill_(1.0 if "norm" in n else 0.0)
    model.to(torch.bfloat16)
    model.requires_grad_(False)
    if fp8 != "none":
        quantize_model_fp8(model, fp8)
    return model


def make_inputs(family: str, model, latent, device):
    f, h, w = latent
    torch.manual_seed(0)
    x = torch.randn(1, FAMILIES[family].channels(model.config), f, h, w).to(device, torch.bfloat16)
    return x, torch.tensor([500.0], device=device), FAMILIES[family].inputs(model.config, 1, device)


def run_config(model, name, task, swap, fp8, latent, args, device, bandwidth, offload=False, non_blocks=False):
    from engine.families import blocks_of
    from engine.lora.adapters import AdapterConfig, AdapterNetwork
    from engine.memory import move_to, pinned_bytes_in_use, set_block_checkpointing, swap_blocks

    call = FAMILIES[args.family].call
    n_blocks = len(blocks_of(model))
    n_swap = n_blocks - 1 if swap == "max" else int(swap)
    offload = offload and task == "train"
    non_blocks = non_blocks and n_swap > 0
    row = {"family": args.family, "model": name, "task": task, "fp8": fp8, "blocks_to_swap": n_swap, "activation_offload": offload,
           "offload_non_blocks": non_blocks, "latent": list(latent), "device": str(device),
           "checkpoint_dtype": args.checkpoint_dtype if task == "train" else None}
    if n_swap > n_blocks - 1:
        return None
    net = None
    swapper = None
    try:
        if task == "train":   # adapters before the swapper (the training nodes' order)
            set_block_checkpointing(model, True, offload=offload, saved_dtype=(
                torch.bfloat16 if args.checkpoint_dtype == "compute" else None))   # the trainer's autocast dtype
            net = AdapterNetwork.create(model, AdapterConfig(rank=args.rank, alpha=args.rank))
            move_to(net, device)
        if n_swap:
            swapper = swap_blocks(model, n_swap, device, prefetch=args.prefetch, offload_non_blocks=non_blocks)
        else:
            move_to(model, device)
        x, t, inputs = make_inputs(args.family, model, latent, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for step in range(args.warmup + args.steps):
            if swapper is not None and step == args.warmup:
                swapper.transfer.log.bytes_h2d = 0
            sync(device)
            t0 = time.perf_counter()
            if task == "train":
                with torch.autocast(device.type, dtype=torch.bfloat16):   # the trainer's mixed precision
                    pred = call(model, inputs, x, t, True)
                pred.float().pow(2).mean().backward()
                del pred
                net.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    call(model, inputs, x, t, False)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
        moved = (swapper.transfer.log.bytes_h2d / args.steps) if swapper is not None else 0
        row.update({
            "s_per_step": sum(times) / len(times),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "pinned_host_bytes": pinned_bytes_in_use(),
            "bytes_h2d_per_step": moved,
            "h2d_bandwidth_Bps": bandwidth,
            "h2d_seconds_per_step": (moved / bandwidth) if bandwidth else None,
        })
    except torch.OutOfMemoryError as e:
        row.update({"oom": True, "error": str(e).splitlines()[0]})
    finally:
        if net is not None:
            net.detach()
            set_block_checkpointing(model, False)
        if swapper is not None:
            swapper.detach(device="cpu")
        move_to(model, "cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def simulated_peak(row: dict, args) -> int:
    """The peak benchmarks/sim_memory.py predicts for this row (live tensor bytes; the measured peak adds the
    allocator's rounding and the kernels' workspaces)."""
    from benchmarks import sim_memory as sim

    cfg = sim.SimConfig(model=row["model"], task=row["task"], fp8=row["fp8"], blocks_to_swap=row["blocks_to_swap"],
                        activation_offload=row["activation_offload"], offload_non_blocks=row["offload_non_blocks"],
                        latent=tuple(row["latent"]), rank=args.rank, prefetch=args.prefetch, cfg_batch=1,
                        steps=1 if row["task"] == "infer" else 2, optimizer="none",
                        checkpoint_dtype=args.checkpoint_dtype, family=row["family"])
    return int(sim.simulate(cfg)["peak_gb"] * sim.GB)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    bandwidth = h2d_bandwidth(device)
    fam = FAMILIES[args.family]
    for name in (args.model or fam.default_models).split(","):
        latent = tuple(int(v) for v in args.latent.split(",")) if args.latent else \
            ((2, 8, 8) if name == "tiny" else fam.latent)
        swaps = args.swap or ("0,2,4,max" if name == "tiny" else fam.swaps)
        for fp8 in args.fp8.split(","):
            model = build_model(args.family, name, fp8)
            baseline: dict[str, float] = {}
            for task in args.task.split(","):
                for swap in swaps.split(","):
                    for off, nb in itertools.product(args.offload.split(",") if task == "train" else ["0"],
                                                     args.non_blocks.split(",") if swap != "0" else ["0"]):
                        row = run_config(model, name, task, swap, fp8, latent, args, device, bandwidth,
                                         offload=off == "1", non_blocks=nb == "1")
                        if row is None:
                            continue
                        if "s_per_step" in row:
                            variant = (task, row["activation_offload"])
                            if row["blocks_to_swap"] == 0:
                                baseline[variant] = row["s_per_step"]
                            base = baseline.get(variant)
                            row["swap_overhead"] = (row["s_per_step"] / base) if base else None
                        if args.sim:
                            row["simulated_peak_bytes"] = simulated_peak(row, args)
                        print(json.dumps(row), flush=True)
            del model


if __name__ == "__main__":
    main()
