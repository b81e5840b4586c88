"""Helpers shared by the DiT benchmarks (`bench_wan_dit.py`, `bench_hunyuan_dit.py`, `bench_training.py`)."""

from __future__ import annotations

import argparse
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput: n×n @ n×n, 2·n³ FLOPs per product."""
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def clip_size(ap: argparse.ArgumentParser, args, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """(width, height, frames) from --width/--height/--frames over `default`, checked against the VAE's
    8× spatial / 4× temporal compression and the 2×2 patch."""
    width, height, frames = args.width or default[0], args.height or default[1], args.frames or default[2]
    if width % 16 or height % 16 or (frames - 1) % 4:
        ap.error("width and height must be multiples of 16 and frames of the form 4k+1")
    return width, height, frames


def latent_shape(width: int, height: int, frames: int, channels: int = 16) -> tuple[int, int, int, int, int]:
    """[1, C, F, H, W] latents of a clip (VAE 4×8×8) and, for a 1×2×2 patch, F·H·W/4 tokens."""
    return (1, channels, (frames - 1) // 4 + 1, height // 8, width // 8)


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn` over `steps` calls, after one warm-up call (kernel selection, allocator)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def print_rows(rows: list[tuple[str, str]]) -> None:
    width_col = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width_col}}  {value}")
