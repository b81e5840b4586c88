"""Benchmark the HunyuanVideo DiT (engine only, random weights built on the target device, no file): one forward as
the sampler runs it, and one LoRA training forward + backward.

    python benchmarks/bench_hunyuan_dit.py --model 13B --device cuda --steps 3            # 960×544×129
    python benchmarks/bench_hunyuan_dit.py --model 13B --width 512 --height 512 --frames 33 --fp8 scaled
    python benchmarks/bench_hunyuan_dit.py --model tiny --device cpu                      # seconds, anywhere

Reports seconds per sampling forward (the guidance-distilled T2V model: one batch-1 forward per step, embedded
guidance 6.0) and per training forward + backward (LoRA rank 32 on the family's default targets, bf16 autocast,
gradient checkpointing unless `--no-checkpointing`, through the family's `training_forward`; no optimizer step),
peak GPU memory, achieved TFLOP/s from an analytic FLOP count, the device's measured peak matmul TFLOP/s and the
ratio. Prints a table and one JSON line (prefix `JSON `).

FLOPs of one forward (multiply-add = 2 FLOPs; L video tokens, Lt text tokens (256, all real), N = L + Lt, D hidden,
M = 4·D MLP width, P = pt·ph·pw, B = 1):
    double block   N·(8·D² + 4·D·M) (img + txt qkv, proj, MLP)  +  4·N²·D (joint attention)  +  24·D² (img/txt mod)
    single block   N·(8·D² + 4·D·M) (linear1 = qkv + MLP in, linear2)  +  4·N²·D  +  6·D² (modulation)
    token refiner  2·Lt·text_dim·D (input) + per block Lt·(8·D² + 4·D·M) + 4·Lt²·D + 4·D²;
                   2·(256·D + D²) (t) + 2·(text_dim·D + D²) (pooled text)
    once           2·L·C_in·P·D (patch) + 2·L·D·C_out·P + 4·D² (final layer)
                   + 2·(256·D + D²) per timestep embedder (time, guidance) + 2·(768·D + D²) (CLIP-L pooled)
Norms, RoPE, gating and softmax (O(N·D)) are left out. A training step with checkpointing ≈ 3 forwards (forward,
recompute, backward w.r.t. activations: the frozen base gets no weight gradient), 2 without; adapters (rank ≪ D)
are left out. That convention (bench_training.py's) undercounts long clips: a flash-attention backward costs 2.5×
its forward, so the memory simulator's FLOP meter counts 17.9 PFLOP for the 960×544×129 step, 4.19 forwards of
4.29 PFLOP (its count of the 1280×720×129 forward, 12.07 PFLOP, is this formula's to 6 digits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.common import (DTYPES, clip_size, device_name, latent_shape, peak_matmul_tflops,  # noqa: E402
                               print_rows, timed)
from engine.families.hunyuan.dit import FREQ_DIM, HunyuanConfig, build_hunyuan_model  # noqa: E402
from engine.families.hunyuan.presets import OFFICIAL, PRESETS, random_state_dict  # noqa: E402

MODELS = {"13B": OFFICIAL["t2v-13B"], "tiny": PRESETS["tiny"]}
# The 13B model defaults to the 544p training clip of issue 14; the tiny model to a clip small enough for a CPU.
DEFAULT_SIZE = {"13B": (960, 544, 129), "tiny": (64, 64, 5)}
TEXT_TOKENS = 256          # Musubi Tuner's LLM text length
EMBEDDED_GUIDANCE = 6.0


def forward_flops(cfg: HunyuanConfig, tokens: int, text_tokens: int = TEXT_TOKENS,
                  guidance: bool = True) -> dict[str, float]:
    L, Lt, D, M = tokens, text_tokens, cfg.hidden_size, cfg.mlp_hidden
    N, P = L + Lt, cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    t_embed = 2 * (FREQ_DIM * D + D**2)
    refiner = (2 * Lt * cfg.text_dim * D + cfg.refiner_blocks * (Lt * (8 * D**2 + 4 * D * M) + 4 * D**2)
               + t_embed + 2 * (cfg.text_dim * D + D**2))
    once = (2 * L * cfg.in_channels * P * D + 2 * L * D * cfg.out_channels * P + 4 * D**2
            + t_embed * (2 if guidance and cfg.guidance_embed else 1) + 2 * (cfg.text_pool_dim * D + D**2))
    linear = (cfg.double_blocks * (N * (8 * D**2 + 4 * D * M) + 24 * D**2)
              + cfg.single_blocks * (N * (8 * D**2 + 4 * D * M) + 6 * D**2) + refiner + once)
    attention = (cfg.double_blocks + cfg.single_blocks) * 4 * N**2 * D + cfg.refiner_blocks * 4 * Lt**2 * D
    return {"total": float(linear + attention), "attention": float(attention)}


def build_random_model(cfg: HunyuanConfig, device: torch.device, dtype: torch.dtype, backend: str, fp8: str):
    """Random weights generated directly on `device` (every tensor in `dtype`, as the loader leaves a bf16 file),
    fp8 block Linears quantized as the loader does."""
    model = build_hunyuan_model(cfg, "meta")
    model.load_state_dict(random_state_dict(cfg, seed=0, device=device, dtype=dtype), assign=True)
    model.attention_backend = backend
    if fp8 != "none":
        from engine.memory import quantize_model_fp8
        quantize_model_fp8(model, fp8)
    return model.eval().requires_grad_(False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="13B")
    ap.add_argument("--width", type=int, default=None, help="pixels (default 960; tiny: 64)")
    ap.add_argument("--height", type=int, default=None, help="pixels (default 544; tiny: 64)")
    ap.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default 129; tiny: 5)")
    ap.add_argument("--steps", type=int, default=3, help="timed calls of each kind (after one warm-up call)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--fp8", choices=["none", "e4m3", "scaled"], default="none", help="block Linears in fp8")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank of the training step")
    ap.add_argument("--no-checkpointing", action="store_true", help="training step without gradient checkpointing")
    ap.add_argument("--no-train", action="store_true", help="time the sampling forward only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default="sdpa", help="sdpa | sdpa_split | flash | sage | xformers")
    args = ap.parse_args(argv)

    width, height, frames = clip_size(ap, args, DEFAULT_SIZE[args.model])
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = dataclasses.replace(MODELS[args.model])
    model = build_random_model(cfg, device, dtype, args.backend, args.fp8)

    latent = latent_shape(width, height, frames, cfg.out_channels)
    tokens = latent[2] * (latent[3] // 2) * (latent[4] // 2)
    x = torch.randn(latent, device=device, dtype=dtype)
    batch = {"text_states": torch.randn(1, TEXT_TOKENS, cfg.text_dim, device=device, dtype=dtype),
             "text_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device),
             "pooled": torch.randn(1, cfg.text_pool_dim, device=device, dtype=dtype)}
    t = torch.tensor([900.0], device=device)
    guidance = torch.tensor([EMBEDDED_GUIDANCE * 1000.0], device=device) if cfg.guidance_embed else None

    def forward():
        with torch.inference_mode():
            model(x, t, batch["text_states"], batch["text_mask"], batch["pooled"], guidance=guidance)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s_forward = timed(forward, args.steps, device)
    peak_forward = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    s_train = peak_train = None
    checkpointing = not args.no_checkpointing
    if not args.no_train:
        from engine.families.hunyuan.family import FAMILY
        from engine.lora.adapters import AdapterConfig, AdapterNetwork
        from engine.memory import move_to, set_block_checkpointing

        network = AdapterNetwork.create(model, AdapterConfig(rank=args.rank, alpha=args.rank))
        move_to(network, device)
        set_block_checkpointing(model, checkpointing)
        model.train()
        target = torch.randn(latent, device=device, dtype=torch.float32)

        def train_step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                pred, tgt = FAMILY.training_forward(model, batch, x, t, target)
            torch.nn.functional.mse_loss(pred.float(), tgt).backward()
            network.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        s_train = timed(train_step, args.steps, device)
        peak_train = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    flops = forward_flops(cfg, tokens)
    train_flops = (3 if checkpointing else 2) * forward_flops(cfg, tokens)["total"]
    peak = peak_matmul_tflops(device, dtype)
    achieved = flops["total"] / s_forward / 1e12
    achieved_train = train_flops / s_train / 1e12 if s_train else None
    result = {
        "model": args.model, "variant": cfg.variant, "device": device_name(device), "dtype": args.dtype,
        "fp8": args.fp8, "backend": args.backend, "width": width, "height": height, "frames": frames,
        "latent": list(latent), "tokens": tokens, "text_tokens": TEXT_TOKENS, "steps": args.steps,
        "s_per_forward": s_forward, "peak_mem_gib_forward": peak_forward,
        "rank": None if args.no_train else args.rank, "gradient_checkpointing": checkpointing,
        "s_per_train_step": s_train, "peak_mem_gib_train": peak_train,
        "gflop_per_forward": flops["total"] / 1e9, "attention_flop_share": flops["attention"] / flops["total"],
        "tflop_per_train_step": train_flops / 1e12, "achieved_tflops": achieved,
        "achieved_tflops_train": achieved_train, "peak_matmul_tflops": peak, "fraction_of_peak": achieved / peak,
        "fraction_of_peak_train": achieved_train / peak if achieved_train else None,
    }
    mem = lambda v: "n/a (cpu)" if v is None else f"{v:.2f} GiB"   # noqa: E731
    rows = [
        ("model", f"HunyuanVideo {cfg.variant} ({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params)"),
        ("device / dtype / fp8 / attention", f"{result['device']} / {args.dtype} / {args.fp8} / {args.backend}"),
        ("clip", f"{width}x{height}x{frames} -> latent {latent[2]}x{latent[3]}x{latent[4]}, {tokens} tokens "
                 f"+ {TEXT_TOKENS} text"),
        ("s / forward (sampling step)", f"{s_forward:.4f}"),
        ("peak GPU memory, forward", mem(peak_forward)),
        ("GFLOP / forward", f"{flops['total'] / 1e9:.1f} (attention {100 * result['attention_flop_share']:.0f} %)"),
        ("achieved TFLOP/s, forward", f"{achieved:.3f}"),
    ]
    if s_train:
        rows += [(f"s / training step (rank {args.rank}, fwd+bwd)", f"{s_train:.4f}"),
                 ("peak GPU memory, training", mem(peak_train)),
                 ("achieved TFLOP/s, training", f"{achieved_train:.3f}")]
    rows += [(f"peak {args.dtype} matmul TFLOP/s", f"{peak:.3f}"),
             ("fraction of peak (forward)", f"{result['fraction_of_peak']:.2%}")]
    print_rows(rows)
    print("JSON " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
