"""Benchmark the Wan 2.1 T2V DiT forward pass (engine only, random weights built on the target device, no file).

    python benchmarks/bench_wan_dit.py --model 1.3B --device cuda --steps 3
    python benchmarks/bench_wan_dit.py --model tiny --device cpu          # seconds, anywhere

Reports seconds per denoising step (cond + uncond forward, as the CFG sampler runs them), seconds per forward,
peak GPU memory, achieved TFLOP/s from an analytic FLOP count, the device's measured peak matmul TFLOP/s (one large
matmul in the benchmark dtype) and the ratio of the two. Prints a table and one JSON line (prefix `JSON `).

FLOPs of one forward (multiply-add = 2 FLOPs; L video tokens, Lt = 512 text tokens, Li image tokens (0 for T2V),
D dim, Fd ffn dim, P = pt*ph*pw, per block unless noted):
    self-attention  8·L·D² (q, k, v, o)  +  4·L²·D (QKᵀ and PV)
    cross-attention 4·L·D² (q, o)  +  4·(Lt+Li)·D² (k, v)  +  4·L·(Lt+Li)·D
    FFN             4·L·D·Fd
    once            2·L·in_dim·P·D (patch) + 2·Lt·(text_dim·D + D²) (text) + 2·L·D·out_dim·P (head)
                    + 2·(freq_dim·D + 7·D²) (time embedding + projection)
Norms, modulation, RoPE and softmax (O(L·D)) are left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import (DTYPES, clip_size, peak_matmul_tflops, print_rows,  # noqa: E402
                               sync as _sync)
from engine.families.wan.dit import WanConfig, build_wan_model, keep_fp32  # noqa: E402
from engine.families.wan.presets import OFFICIAL, PRESETS, random_state_dict  # noqa: E402

MODELS = {"1.3B": OFFICIAL["t2v-1.3B"], "14B": OFFICIAL["t2v-14B"], "tiny": PRESETS["tiny-t2v"]}
# Real models default to the official 480p clip; the tiny model to a clip small enough for a CPU.
DEFAULT_SIZE = {"tiny": (128, 128, 9)}


def forward_flops(cfg: WanConfig, tokens: int, image_tokens: int = 0) -> dict[str, float]:
    L, D, Fd, Lt, Li = tokens, cfg.dim, cfg.ffn_dim, cfg.text_len, image_tokens
    P = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    per_block = {
        "linear": 8 * L * D**2 + 4 * L * D**2 + 4 * (Lt + Li) * D**2 + 4 * L * D * Fd,
        "attention": 4 * L**2 * D + 4 * L * (Lt + Li) * D,
    }
    once = (2 * L * cfg.in_dim * P * D + 2 * Lt * (cfg.text_dim * D + D**2) + 2 * L * D * cfg.out_dim * P
            + 2 * (cfg.freq_dim * D + 7 * D**2))
    linear = cfg.num_layers * per_block["linear"] + once
    attention = cfg.num_layers * per_block["attention"]
    return {"total": float(linear + attention), "attention": float(attention)}


def build_random_model(cfg: WanConfig, device: torch.device, dtype: torch.dtype, backend: str):
    """Random weights generated directly on `device` (the fp32-by-design parameters in float32, as the loader)."""
    model = build_wan_model(cfg, "meta")
    state = random_state_dict(cfg, seed=0, device=device, dtype=dtype)
    state = {k: v.float() if keep_fp32(k) else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    model.attention_backend = backend
    return model.eval().requires_grad_(False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="1.3B")
    ap.add_argument("--width", type=int, default=None, help="pixels (default 832; tiny: 128)")
    ap.add_argument("--height", type=int, default=None, help="pixels (default 480; tiny: 128)")
    ap.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default 81; tiny: 9)")
    ap.add_argument("--steps", type=int, default=3, help="timed denoising steps (after one warm-up step)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="sdpa", help="sdpa | sdpa_split | flash | sage | xformers")
    args = ap.parse_args(argv)

    width, height, frames = clip_size(ap, args, DEFAULT_SIZE.get(args.model, (832, 480, 81)))
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = dataclasses.replace(MODELS[args.model])

    model = build_random_model(cfg, device, dtype, args.backend)
    latent = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    x = torch.randn(latent, device=device, dtype=dtype)
    cond = torch.randn(1, 120, cfg.text_dim, device=device, dtype=dtype)
    uncond = torch.randn(1, 60, cfg.text_dim, device=device, dtype=dtype)
    t = torch.tensor([900.0], device=device)

    def step():
        with torch.inference_mode():
            model(x, t, cond)
            model(x, t, uncond)

    step()  # warm-up (kernel selection, allocator)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    per_step = (time.perf_counter() - start) / args.steps
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    flops = forward_flops(cfg, tokens)
    achieved = 2 * flops["total"] / per_step / 1e12
    peak = peak_matmul_tflops(device, dtype)
    result = {
        "model": args.model, "variant": cfg.variant, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", "dtype": args.dtype, "backend": args.backend,
        "width": width, "height": height, "frames": frames, "latent": list(latent), "tokens": tokens,
        "steps": args.steps, "s_per_step": per_step, "s_per_forward": per_step / 2,
        "peak_mem_gib": peak_mem, "gflop_per_forward": flops["total"] / 1e9,
        "attention_flop_share": flops["attention"] / flops["total"], "achieved_tflops": achieved,
        "peak_matmul_tflops": peak, "fraction_of_peak": achieved / peak,
    }
    rows = [
        ("model", f"Wan {cfg.variant} ({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params)"),
        ("device / dtype / attention", f"{result['device']} / {args.dtype} / {args.backend}"),
        ("clip", f"{width}x{height}x{frames} -> latent {latent[2]}x{latent[3]}x{latent[4]}, {tokens} tokens"),
        ("s / step (cond+uncond)", f"{per_step:.4f}"),
        ("s / forward", f"{per_step / 2:.4f}"),
        ("peak GPU memory", "n/a (cpu)" if peak_mem is None else f"{peak_mem:.2f} GiB"),
        ("GFLOP / forward", f"{flops['total'] / 1e9:.1f} (attention {100 * result['attention_flop_share']:.0f} %)"),
        ("achieved TFLOP/s", f"{achieved:.3f}"),
        (f"peak {args.dtype} matmul TFLOP/s", f"{peak:.3f}"),
        ("fraction of peak", f"{result['fraction_of_peak']:.2%}"),
    ]
    print_rows(rows)
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
