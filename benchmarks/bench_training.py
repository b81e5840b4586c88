"""Benchmark LoRA training steps on the Wan 2.1 T2V DiT (engine only, random weights, no files).

    python benchmarks/bench_training.py --model 1.3B --device cuda          # 832×480×81, LoRA rank 32, checkpointing
    python benchmarks/bench_training.py --model tiny --device cpu --steps 3 # seconds, anywhere

Reports seconds per optimizer step, peak GPU memory and achieved TFLOP/s; prints one JSON line (prefix `JSON `).
The held-out eval loss (one forward per held-out clip and fixed timestep, no backward) is timed too: its cost is
reported per forward next to the time of one training step (a step costs about 3 forwards with checkpointing).

FLOP count (multiply-add = 2 FLOPs). One DiT forward over L video tokens, Lt = 512 text tokens, D dim, Fd ffn dim:
    per block  12·L·D² (self q,k,v,o + cross q,o) + 4·Lt·D² (cross k,v) + 4·L·D·Fd (FFN)
               + 4·L²·D (self QKᵀ, PV) + 4·L·Lt·D (cross QKᵀ, PV)
    once       2·L·in_dim·P·D (patch) + 2·Lt·(text_dim·D + D²) (text) + 2·L·D·out_dim·P (head)
LoRA training step ≈ forward + backward w.r.t. activations (≈ 1 forward: the frozen base gets no weight gradient)
+ the recomputed forward of gradient checkpointing (1 forward): 3 × forward with checkpointing, 2 × without.
The adapter's own FLOPs (rank r ≪ D) are left out, as are norms, modulation, RoPE and softmax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import DTYPES, clip_size, sync as _sync  # noqa: E402

DEFAULT_SIZE = {"tiny": (64, 64, 5)}   # real models: the official 832×480×81 clip (latent 21×60×104)


def forward_flops(cfg, tokens: int) -> float:
    L, D, Fd, Lt = tokens, cfg.dim, cfg.ffn_dim, cfg.text_len
    P = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    per_block = 12 * L * D**2 + 4 * Lt * D**2 + 4 * L * D * Fd + 4 * L**2 * D + 4 * L * Lt * D
    once = 2 * L * cfg.in_dim * P * D + 2 * Lt * (cfg.text_dim * D + D**2) + 2 * L * D * cfg.out_dim * P
    return float(cfg.num_layers * per_block + once)


def build_random_model(name: str, device: torch.device, dtype: torch.dtype):
    """The DiT is imported here, lazily: `--help` and argument errors never touch it."""
    from engine.families.wan.dit import build_wan_model, keep_fp32
    from engine.families.wan.presets import OFFICIAL, PRESETS, random_state_dict

    cfg = {"1.3B": OFFICIAL["t2v-1.3B"], "14B": OFFICIAL["t2v-14B"], "tiny": PRESETS["tiny-t2v"]}[name]
    model = build_wan_model(cfg, "meta")
    state = random_state_dict(cfg, seed=0, device=device, dtype=dtype)
    model.load_state_dict({k: v.float() if keep_fp32(k) else v for k, v in state.items()}, assign=True)
    return model.requires_grad_(False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["1.3B", "14B", "tiny"], default="1.3B")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int), ap.add_argument("--height", type=int), ap.add_argument("--frames", type=int)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after one warm-up step)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="DiT weight dtype")
    ap.add_argument("--mixed-precision", choices=["bf16", "fp16", "no"], default="bf16")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--backend", default="sdpa")
    ap.add_argument("--output-dir", default=None, help="where the session may write (default: a temp folder)")
    ap.add_argument("--eval-sigmas", type=int, default=5, help="fixed timesteps of the timed eval loss (0: skip)")
    args = ap.parse_args(argv)

    width, height, frames = clip_size(ap, args, DEFAULT_SIZE.get(args.model, (832, 480, 81)))
    device = torch.device(args.device)

    import tempfile

    from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig,
                                 TrainingConfig, TrainingSession)

    model = build_random_model(args.model, device, DTYPES[args.dtype])
    cfg = model.config
    latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(latent, generator=g).to(torch.bfloat16),
                "context": [torch.randn(120, cfg.text_dim, generator=g).to(torch.bfloat16)]} for _ in range(2)]
    out = args.output_dir or tempfile.mkdtemp(prefix="bench_training_")
    checkpointing = not args.no_checkpointing
    session = TrainingSession(
        model, NetworkConfig(rank=args.rank, alpha=args.rank), OptimizerConfig(learning_rate=1e-4),
        InMemoryBatchLoader(batches), TrainingConfig(
            output_dir=out, max_train_steps=args.steps + 1, mixed_precision=args.mixed_precision,
            gradient_checkpointing=checkpointing, attention_backend=args.backend,
            timesteps=TimestepConfig("shift", discrete_flow_shift=3.0)))

    session.train_steps(1)  # warm-up: kernel selection, allocator, optimizer state
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = session.train_steps(args.steps)
    _sync(device)
    per_step = (time.perf_counter() - start) / args.steps

    eval_s = None
    if args.eval_sigmas:
        from engine.training import EvalConfig

        session.evaluation = EvalConfig(batches=batches, sigmas=tuple((i + 0.5) / args.eval_sigmas
                                                                    for i in range(args.eval_sigmas)))
        session.evaluate()   # warm-up
        _sync(device)
        start = time.perf_counter()
        session.evaluate()
        _sync(device)
        eval_s = time.perf_counter() - start

    fwd = forward_flops(cfg, tokens)
    factor = 3 if checkpointing else 2
    result = {
        "bench": "training", "model": args.model, "variant": cfg.variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "mixed_precision": args.mixed_precision, "gradient_checkpointing": checkpointing,
        "backend": args.backend, "rank": args.rank, "width": width, "height": height, "frames": frames,
        "latent": list(latent), "tokens": tokens, "steps": args.steps, "s_per_step": per_step,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "trainable_params": sum(p.numel() for p in session.network.trainable_parameters()),
        "tflop_per_step": factor * fwd / 1e12, "flop_factor_vs_forward": factor,
        "achieved_tflops": factor * fwd / per_step / 1e12, "final_loss": losses[-1],
        "eval_forwards": len(batches) * args.eval_sigmas if eval_s is not None else 0, "eval_s": eval_s,
        "eval_s_per_forward": eval_s / (len(batches) * args.eval_sigmas) if eval_s is not None else None,
    }
    print(f"{result['variant']} {width}x{height}x{frames} rank {args.rank}: {per_step:.3f} s/step, "
          f"{result['achieved_tflops']:.2f} TFLOP/s, peak {result['peak_mem_gib']} GiB")
    if eval_s is not None:
        print(f"eval loss: {result['eval_forwards']} forwards in {eval_s:.3f} s, "
              f"{result['eval_s_per_forward']:.3f} s per forward ({result['eval_s_per_forward'] / per_step:.2f} "
              f"of a training step)")
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
