"""Caching throughput: clips/s through decode + bucket + encode on a synthetic dataset.

Runs twice: with a stub encoder (near-free; measures file reading, decoding and bucketing, i.e. shows the data path
is not the bottleneck) and with the tiny Wan VAE preset when `engine.families.wan.loader.load_wan_vae` exists.
Prints one JSON line per run.

    python benchmarks/bench_dataset.py [--videos 8] [--frames 33] [--size 256x192] [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine.data import build_cache, dataset_from_folder  # noqa: E402
from engine.families.wan.cache import WanCacheAdapter  # noqa: E402


class StubVAE:
    identity = "stub-vae"

    def encode(self, video):  # [B, 3, F, H, W] -> [B, 16, (F-1)/4+1, H/8, W/8]
        B, _, F, H, W = video.shape
        return torch.zeros(B, 16, (F - 1) // 4 + 1, H // 8, W // 8)


def _make_media(folder: Path, videos: int, frames: int, size: tuple[int, int]) -> Path:
    spec = importlib.util.spec_from_file_location("make_sample_media", REPO / "scripts" / "make_sample_media.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Path(mod.make_sample_dataset(folder, num_images=0, num_videos=videos, num_frame_folders=0, size=size,
                                        frames=frames)["videos"])


def _run(name: str, vae, videos_dir: Path, cache: Path, args, resolution) -> dict:
    cfg = dataset_from_folder(videos_dir, kind="video", resolution=resolution, target_frames=[args.frames],
                              cache_directory=str(cache))
    adapter = WanCacheAdapter(vae=vae, dtype=torch.float32)
    t0 = time.perf_counter()
    report = build_cache(cfg, adapter, num_workers=args.workers)
    dt = time.perf_counter() - t0
    return {"bench": "dataset_cache", "encoder": name, "clips": report.clips_written, "seconds": round(dt, 3),
            "clips_per_s": round(report.clips_written / dt, 3), "frames": args.frames,
            "resolution": list(resolution), "workers": args.workers, "device": str(_device(vae))}


def _device(vae):
    p = getattr(vae, "parameters", None)
    return next(p()).device if callable(p) else "cpu"


def _find_vae_loader():
    """`load_wan_vae` lives in engine.families.wan.vae or .loader (written by another module owner)."""
    import importlib

    for mod in ("engine.families.wan.vae", "engine.families.wan.loader"):
        try:
            fn = getattr(importlib.import_module(mod), "load_wan_vae", None)
        except ImportError:
            fn = None
        if fn is not None:
            return fn
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--size", default="256x192")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        videos = _make_media(tmp / "media", args.videos, args.frames, (w, h))
        print(json.dumps(_run("stub", StubVAE(), videos, tmp / "cache_stub", args, (w // 16 * 16, h // 16 * 16))))
        load_wan_vae = _find_vae_loader()
        if load_wan_vae is None:
            print(json.dumps({"bench": "dataset_cache", "encoder": "tiny-vae", "skipped": "no load_wan_vae yet"}))
            return 0
        vae = load_wan_vae("preset:tiny-vae")
        if not getattr(vae, "identity", None):
            vae.identity = "preset:tiny-vae"
        print(json.dumps(_run("tiny-vae", vae, videos, tmp / "cache_tiny", args, (w // 16 * 16, h // 16 * 16))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
