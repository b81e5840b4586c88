"""Benchmark FramePack generation and training (engine only, random weights built on the target device, no file).

    python benchmarks/bench_framepack.py --model 13B --device cuda                 # one 640×640 section, 25 steps
    python benchmarks/bench_framepack.py --model 13B --fp8 scaled --swap 38        # the low-memory settings
    python benchmarks/bench_framepack.py --model tiny --device cpu                 # seconds, anywhere

Reports, for one section of the section sampler (`engine.families.framepack.pipeline.generate`, the original
schedule's last section: the longest history), the seconds per section and per step, the same with MagCache at its
default thresholds (the HunyuanVideo table Musubi uses: retention 0.2, threshold 0.24, K 6) with the number of
block passes it skipped, its speed-up and the output's relative difference from the uncached section, and one LoRA
training step (rank 32, bf16 autocast, gradient checkpointing, through the family's `training_forward`); peak GPU
memory for each. Random weights: the MagCache difference measures the skipping, not image quality. Prints a table
and one JSON line (prefix `JSON `).
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

from benchmarks.common import DTYPES, device_name, print_rows, sync, timed  # noqa: E402
from engine.families.framepack.dit import build_framepack_model  # noqa: E402
from engine.families.framepack.pipeline import (FramePackGenerateRequest, FramePackImage,  # noqa: E402
                                                FramePackPrompt, generate)
from engine.families.framepack.presets import OFFICIAL, PRESETS, random_state_dict  # noqa: E402
from engine.sampling.magcache import MagCacheConfig  # noqa: E402

MODELS = {"13B": OFFICIAL["i2v-13B"], "tiny": PRESETS["tiny"]}
DEFAULT_SIZE = {"13B": (640, 640), "tiny": (64, 64)}
DEFAULT_STEPS = {"13B": 25, "tiny": 10}
TEXT_TOKENS, IMAGE_TOKENS = 512, 729


def build(cfg, device, dtype, fp8: str, swap: int):
    model = build_framepack_model(cfg, "meta")
    model.load_state_dict(random_state_dict(cfg, seed=0, device=device if not swap else "cpu", dtype=dtype),
                          assign=True)
    if fp8 != "none":
        from engine.memory import quantize_model_fp8
        quantize_model_fp8(model, fp8)
    if swap:
        from engine.memory import swap_blocks
        swap_blocks(model, swap, device)
    return model.eval().requires_grad_(False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="13B")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--window", type=int, default=9, help="latent window size (frames per section: 4·window−3)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps per section (default 25; tiny: 10)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--fp8", choices=["none", "e4m3", "scaled"], default="none")
    ap.add_argument("--swap", type=int, default=0, help="blocks to swap (0..59)")
    ap.add_argument("--no-train", action="store_true", help="time generation only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    cfg = dataclasses.replace(MODELS[args.model])
    width, height = args.width or DEFAULT_SIZE[args.model][0], args.height or DEFAULT_SIZE[args.model][1]
    steps = args.steps or DEFAULT_STEPS[args.model]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(cfg, device, dtype, args.fp8, args.swap)
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(0)
    prompt = FramePackPrompt(torch.randn(TEXT_TOKENS, cfg.text_dim, generator=g).to(dtype),
                             torch.randn(cfg.text_pool_dim, generator=g).to(dtype))
    image = FramePackImage(torch.randn(16, 1, h, w, generator=g), torch.randn(IMAGE_TOKENS, cfg.image_dim,
                                                                             generator=g).to(dtype))
    base = dict(prompt=prompt, image=image, sections=1, latent_window_size=args.window, steps=steps, seed=1,
                device=device)

    def section(magcache=None):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        out = generate(model, FramePackGenerateRequest(**base, magcache=magcache))
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return out.float(), time.perf_counter() - start, peak

    section()                                                   # warm-up (kernels, allocator)
    plain, s_plain, peak_plain = section()
    runs = []
    hook = (model.transformer_blocks[0].register_forward_pre_hook(lambda m, a: runs.append(1)))
    cached, s_cached, _ = section(MagCacheConfig())
    hook.remove()
    diff = ((cached - plain).norm() / plain.norm()).item()

    s_train = peak_train = None
    if not args.no_train:
        from engine.families.framepack.family import FAMILY
        from engine.lora.adapters import AdapterConfig, AdapterNetwork
        from engine.memory import set_block_checkpointing

        set_block_checkpointing(model, True, saved_dtype=torch.bfloat16)
        net = AdapterNetwork.create(model, AdapterConfig(rank=32, alpha=32)).to(device)
        x = torch.randn(1, 16, args.window, h, w, device=device)
        idx = lambda lo, n: torch.arange(lo, lo + n, device=device)[None]   # noqa: E731
        batch = {"text_states": prompt.context[None].to(device), "text_mask": None, "pooled": prompt.pooled[None],
                 "image_embeddings": image.embeddings[None].to(device), "latent_indices": idx(1, args.window),
                 "clean_latents": torch.randn(1, 16, 2, h, w, device=device),
                 "clean_latent_indices": torch.tensor([[0, args.window + 1]], device=device),
                 "clean_latents_2x": torch.randn(1, 16, 2, h, w, device=device),
                 "clean_latent_2x_indices": idx(args.window + 2, 2),
                 "clean_latents_4x": torch.randn(1, 16, 16, h, w, device=device),
                 "clean_latent_4x_indices": idx(args.window + 4, 16)}

        def train_step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pred, _ = FAMILY.training_forward(model, batch, x, torch.tensor([500.0], device=device), x)
            pred.float().pow(2).mean().backward()
            net.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        s_train = timed(train_step, 2, device)
        peak_train = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    result = {"model": args.model, "device": device_name(device), "dtype": args.dtype, "fp8": args.fp8,
              "blocks_to_swap": args.swap, "width": width, "height": height, "latent_window_size": args.window,
              "steps": steps, "s_per_section": s_plain, "s_per_step": s_plain / steps, "peak_gib_section": peak_plain,
              "magcache_s_per_section": s_cached, "magcache_block_passes": len(runs),
              "magcache_speedup": s_plain / s_cached, "magcache_relative_difference": diff,
              "s_per_train_step": s_train, "peak_gib_train": peak_train}
    print_rows([(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in result.items()])
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
