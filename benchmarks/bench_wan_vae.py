"""Wan 2.1 VAE encode/decode speed and peak memory; one JSON line per measured configuration.

    python benchmarks/bench_wan_vae.py                      # cuda: real config, 832x480x81, bf16; cpu: tiny config
    python benchmarks/bench_wan_vae.py --cache-cpu --tile-size 256 --tile-overlap 64
    python benchmarks/bench_wan_vae.py --device cpu --tiny --frames 9 --height 64 --width 64

Weights are random (built directly on the device, no files needed): speed and memory do not depend on the values.
GPU memory is torch's peak allocation per phase; on CPU it is the process' peak RSS (ru_maxrss) after the phase.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.families.wan.vae import WanVAE, WanVAEConfig, tiny_vae_config  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _timed(fn, device: torch.device, repeat: int):
    """Best of `repeat` runs (after one warm-up when repeat > 1): (result, seconds, peak GiB)."""
    if repeat > 1:
        fn()
    _reset_peak(device)
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best, _peak_gib(device)


def build(cfg: WanVAEConfig, device: torch.device, dtype: torch.dtype) -> WanVAE:
    with torch.device(device):
        vae = WanVAE(cfg)   # torch's default init, on the device itself
    return vae.to(dtype).eval().requires_grad_(False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--tiny", action="store_true", help="tiny preset config (default on cpu)")
    p.add_argument("--frames", type=int, default=None, help="4k+1 (default 81 on cuda, 9 on cpu)")
    p.add_argument("--height", type=int, default=None, help="default 480 on cuda, 64 on cpu")
    p.add_argument("--width", type=int, default=None, help="default 832 on cuda, 64 on cpu")
    p.add_argument("--cache-cpu", action="store_true", help="keep feature caches on the CPU (vae_cache_cpu)")
    p.add_argument("--tile-size", type=int, default=0, help="spatial tile in pixels (0 = off)")
    p.add_argument("--tile-overlap", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    tiny = args.tiny or not gpu
    frames = args.frames or (81 if gpu else 9)
    height = args.height or (480 if gpu else 64)
    width = args.width or (832 if gpu else 64)
    cfg = tiny_vae_config() if tiny else WanVAEConfig()

    torch.manual_seed(0)
    vae = build(cfg, device, dtype)
    video = (torch.rand(1, 3, frames, height, width, device=device) * 2 - 1).to(dtype)
    opts = dict(tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                cache_device="cpu" if args.cache_cpu else None)

    with torch.no_grad():
        latents, enc_s, enc_peak = _timed(lambda: vae.encode(video, **opts), device, args.repeat)
        out, dec_s, dec_peak = _timed(lambda: vae.decode(latents, **opts), device, args.repeat)

    print(json.dumps({
        "bench": "wan_vae",
        "device": torch.cuda.get_device_name(device) if gpu else "cpu",
        "config": "tiny" if tiny else "wan2.1",
        "dtype": str(dtype).replace("torch.", ""),
        "video": [frames, height, width],
        "latents": list(latents.shape[1:]),
        "cache_device": opts["cache_device"],
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap if args.tile_size else None,
        "encode_s": round(enc_s, 4),
        "decode_s": round(dec_s, 4),
        "memory": "cuda_peak_allocated_gib" if gpu else "process_peak_rss_gib",
        "encode_peak_gib": round(enc_peak, 3),
        "decode_peak_gib": round(dec_peak, 3),
        "output_finite": bool(torch.isfinite(out).all()),
    }))


if __name__ == "__main__":
    main()
