"""Train the demo models: a tiny Wan 2.1 VAE, umT5 and T2V DiT that really generate the procedural shape clips.

Plain PyTorch on the CPU, reproducible from the seed; the weights are written with the real key names to
`demo_models/` and load through the same loaders as real checkpoints (docs/demo.md).

    python scripts/train_demo_models.py [--stage vae|dit|all|eval] [--out demo_models] [--seed 0]

Stage `vae` trains the autoencoder on clips of every palette colour (the VAE must be able to show a colour the DiT
has never seen, for the demo LoRA to teach it), then maps its latents onto Wan 2.1's latent statistics so the
unchanged pipeline normalisation applies. Stage `dit` trains the DiT (flow matching, text-conditioned) together with
the text encoder on the base colours only, on latents of the frozen demo VAE. Stage `eval` scores the files in
`--out` with the demo detector: the VAE on held-out clips of every colour (encode, decode), the DiT + umT5 + VAE on
generated clips (the sampler the demo workflow uses).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO.parent))
pack = __import__(REPO.name)   # the pack as a package, so its relative imports work (as ComfyUI imports it)
from importlib import import_module  # noqa: E402

shapes = import_module(f"{REPO.name}.engine.demo.shapes")
score = import_module(f"{REPO.name}.engine.demo.score")
wan_vae = import_module(f"{REPO.name}.engine.families.wan.vae")
wan_dit = import_module(f"{REPO.name}.engine.families.wan.dit")
umt5 = import_module(f"{REPO.name}.engine.encoders.umt5")
pipeline = import_module(f"{REPO.name}.engine.families.wan.pipeline")
atomic = import_module(f"{REPO.name}.engine.atomic")

OUT = REPO / "demo_models"
VAE_FILE, TEXT_FILE, DIT_FILE = "wan2.1_demo_vae.safetensors", "umt5_demo.safetensors", "wan2.1_demo_t2v.safetensors"
VAE_CONFIG = wan_vae.WanVAEConfig(dim=8, num_res_blocks=1)
DIT_CONFIG = wan_dit.WanConfig(model_type="t2v", in_dim=16, dim=128, ffn_dim=512, num_heads=1, num_layers=4,
                               text_dim=umt5.TINY_UMT5.d_model, variant="demo-t2v")
CLIP = dict(frames=17, height=64, width=64)
TRAIN_SHIFT = 3.0            # timesteps drawn uniformly, then flow-shifted like sampling (more high-noise steps)
UNCOND_PROB = 0.1            # caption dropout, so CFG has an unconditional prediction to push away from
EMA_DECAY = 0.998            # the DiT and umT5 ship as the exponential moving average of their weights


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warmup_cosine(opt, steps: int, warmup: int = 50):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)))


def to_video(clips: np.ndarray) -> torch.Tensor:
    # uint8 [B, F, H, W, 3] -> [B, 3, F, H, W] in [-1, 1]
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

def vae_forward(vae, video: torch.Tensor, noise: float = 0.0):
    """Autograd version of the VAE's chunked encode/decode (frame 0 alone, then groups of 4, through the caches).
    -> reconstruction, raw latent mean. `noise`: std of the noise added to the latents (relative to their std),
    so the decoder also maps latents near the data's to clean clips (the DiT's samples are never exact)."""
    enc = wan_vae.FeatureCache()
    chunks = [video[:, :, :1]] + [video[:, :, s:s + 4] for s in range(1, video.shape[2], 4)]
    mu = torch.cat([vae.conv1(vae._encode_chunk(c, enc)) for c in chunks], dim=2).chunk(2, dim=1)[0]
    z = mu + noise * mu.detach().std() * torch.randn_like(mu) if noise else mu
    dec = wan_vae.FeatureCache()
    frames = [vae._decode_chunk(vae.conv2(z[:, :, i:i + 1]), dec) for i in range(z.shape[2])]
    return torch.cat(frames, dim=2), mu


def latent_pixel_colour(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> the average colour over each latent pixel's footprint [B, 3, 1 + (F-1)/4, H/8, W/8]
    (frame 0 alone, then groups of 4 frames; 8x8 pixels)."""
    chunks = [video[:, :, :1]] + [video[:, :, s:s + 4] for s in range(1, video.shape[2], 4)]
    return torch.cat([F.avg_pool3d(c, (c.shape[2], 8, 8)) for c in chunks], dim=2)


def train_vae(seed: int, steps: int, batch: int = 16, on_progress=None) -> dict[str, torch.Tensor]:
    """-> the calibrated VAE state dict. `on_progress(state)` runs every 250 steps (uncalibrated partial files)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    specs = shapes.all_specs(colours=tuple(shapes.PALETTE))
    pool = np.stack([c for c, _ in shapes.make_dataset(specs, 3, seed, **CLIP)])     # [N, 17, 64, 64, 3]
    vae = wan_vae.WanVAE(VAE_CONFIG).float()
    for name, p in vae.named_parameters():   # zero biases: at init the decoder's features then depend on z alone
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
    fixed = to_video(pool[::len(pool) // 8][:8, :5, 16:48, 16:48])                 # a fixed batch to report on
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, {len(pool)} clips, {steps} steps")
    for step in range(steps):
        # 32x32 crops of 5 frames (the first chunk and one cached chunk), every 4th step 9 frames (a chunk whose
        # cache came from a cached chunk): the convolutions and caches see all they see on whole clips, 8x cheaper
        frames, n = (9, batch // 2) if step % 4 == 3 else (5, batch)
        crops = []
        for _ in range(n):
            i, f0 = rng.randrange(len(pool)), rng.randrange(0, CLIP["frames"] - frames + 1)
            y0, x0 = rng.randrange(0, 33, 8), rng.randrange(0, 33, 8)
            crops.append(pool[i, f0:f0 + frames, y0:y0 + 32, x0:x0 + 32])
        x = to_video(np.stack(crops))
        y, mu = vae_forward(vae, x, noise=0.1)
        # the shapes are a small part of each frame: weight their pixels up, or black everywhere is a fine minimum
        weight = 1.0 + 4.0 * (x.amax(dim=1, keepdim=True) > -0.9).float()
        rec = ((y - x).abs() * weight).mean() + ((y - x).pow(2) * weight).mean()
        # Trained from scratch on reconstruction alone, the decoder learns the mean clip within ~25 steps and stops
        # listening to z (the encoder's gradients vanish). Asking 3 latent channels to hold each latent pixel's
        # average colour makes z informative from the start; the decoder then upsamples it and adds the detail.
        loss = rec + F.mse_loss(mu[:, :3], latent_pixel_colour(x)) + 1e-3 * mu.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_progress is not None and step % 250 == 249:
            on_progress(vae.state_dict())
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                err = (vae_forward(vae, fixed)[0] - fixed).abs().mean(dim=1)             # [B, F, H, W]
            shape = fixed.amax(dim=1) > -0.9
            log(f"VAE step {step}: L1 on shapes {err[shape].mean():.3f}, on background {err[~shape].mean():.3f}")
    vae.eval()
    calibrate_latents(vae, pool)
    return vae.state_dict()


@torch.no_grad()
def calibrate_latents(vae, pool: np.ndarray) -> None:
    """Make the raw latents of the demo clips have Wan 2.1's per-channel mean and std (the constants the pipeline
    normalises with), by an exact affine change of `conv1`'s mean half and the inverse in `conv2`."""
    mus = torch.cat([vae.encode_mean(to_video(pool[i:i + 16])) for i in range(0, len(pool), 16)])   # raw
    m = mus.mean(dim=(0, 2, 3, 4))                         # [z]
    s = mus.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    target_m = torch.tensor(wan_vae.LATENT_MEAN)
    target_s = torch.tensor(wan_vae.LATENT_STD)
    a, b = target_s / s, target_m - m * target_s / s       # raw' = a * raw + b
    z = VAE_CONFIG.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias               # [2z, 2z, 1, 1, 1]: rows [0:z] are the mean
    w1[:z] *= a.view(z, 1, 1, 1, 1)
    b1[:z] = b1[:z] * a + b
    b1[z:] += 2 * torch.log(a)                              # the log-variance scales with a^2
    w2, b2 = vae.conv2.weight, vae.conv2.bias               # conv2(raw) == conv2'(a * raw + b)
    b2 -= (w2[:, :, 0, 0, 0] * (b / a)).sum(dim=1)
    w2 /= a.view(1, z, 1, 1, 1)
    log(f"VAE latents calibrated: per-channel std was {s.min():.3f}..{s.max():.3f}")


# ----------------------------------------------------------------------------------------------------------------
# Text encoder + DiT
# ----------------------------------------------------------------------------------------------------------------

def encode_text(text_encoder, prompts: list[str]) -> list[torch.Tensor]:
    """umT5 with autograd (`UMT5TextEncoder.encode` is inference-only): one [L_i, d] per prompt. Prompts of up to
    64 tokens run as one batch cut to the longest, longer ones (the negative prompt) alone; the padding is masked,
    so the tokens' outputs are the same as at 512."""
    ids, mask = text_encoder.tokenizer(prompts, text_encoder.text_len)
    lengths = mask.sum(dim=1).tolist()
    out = [None] * len(prompts)
    short = [i for i, n in enumerate(lengths) if n <= 64]
    for group in [short] + [[i] for i, n in enumerate(lengths) if n > 64]:
        if not group:
            continue
        n = max(lengths[i] for i in group)
        hidden = text_encoder.model(input_ids=ids[group, :n], attention_mask=mask[group, :n]).last_hidden_state
        for row, i in enumerate(group):
            out[i] = hidden[row, :lengths[i]]
    return out


def train_dit(seed: int, steps: int, vae_state: dict, batch: int = 16, on_progress=None) -> tuple[dict, dict]:
    """-> DiT and umT5 state dicts. `on_progress(dit_state, text_state)` runs every 500 steps (partial files)."""
    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    specs = shapes.all_specs()                                   # base colours only
    clips = shapes.make_dataset(specs, 8, seed + 1, **CLIP)
    vae = wan_vae.WanVAE(VAE_CONFIG).float()
    vae.load_state_dict(vae_state)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_video(np.stack([c for c, _ in clips[i:i + 16]])))
                             for i in range(0, len(clips), 16)])   # normalized [N, 16, 5, 8, 8]
    captions = [cap for _, cap in clips]
    log(f"DiT data: {len(clips)} clips, latents std {latents.std():.3f}")

    text_encoder = umt5.load_umt5(umt5.PRESET_TINY, dtype=torch.float32)
    text_encoder.model.train().requires_grad_(True)
    model = wan_dit.build_wan_model(DIT_CONFIG, "cpu").float()
    presets = import_module(f"{REPO.name}.engine.families.wan.presets")
    model.load_state_dict(presets.random_state_dict(DIT_CONFIG, seed))
    model.train()
    params = [{"params": model.parameters(), "lr": 1e-3},
              {"params": text_encoder.model.parameters(), "lr": 3e-4}]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    sched = warmup_cosine(opt, steps)
    log(f"DiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} steps")
    uncond = [pipeline.NEGATIVE_PROMPT, ""]
    # averaged weights sample much cleaner shapes than the last step's (a tiny model at a high learning rate)
    ema = [torch.optim.swa_utils.AveragedModel(m, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY))
           for m in (model, text_encoder.model)]
    ema_loss = None
    for step in range(steps):
        idx = [rng.randrange(len(clips)) for _ in range(batch)]
        x0 = latents[idx]
        prompts = [captions[i] if rng.random() >= UNCOND_PROB else rng.choice(uncond) for i in idx]
        u = torch.rand(batch)
        sigma = TRAIN_SHIFT * u / (1 + (TRAIN_SHIFT - 1) * u)      # [B]
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        unique = sorted(set(prompts))
        embedded = dict(zip(unique, encode_text(text_encoder, unique)))
        pred = model(xt, sigma * 1000, [embedded[p] for p in prompts])
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(text_encoder.model.parameters()), 1.0)
        opt.step()
        sched.step()
        for averaged, m in zip(ema, (model, text_encoder.model)):
            averaged.update_parameters(m)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"DiT step {step}: loss {loss.item():.4f} (smoothed {ema_loss:.4f})")
        if on_progress is not None and step % 500 == 499 and step < steps - 1:
            on_progress(ema[0].module.state_dict(), text_state_dict(ema[1].module))
    return ema[0].module.state_dict(), text_state_dict(ema[1].module)


def text_state_dict(umt5_model) -> dict:
    # the file layout: `shared` once (the encoder's embed_tokens is the same tensor)
    return {k: v for k, v in umt5_model.state_dict().items() if k != "encoder.embed_tokens.weight"}


# ----------------------------------------------------------------------------------------------------------------

def save(state: dict, path: Path, what: str, seed: int, extra: dict | None = None) -> None:
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    sd.update(extra or {})
    atomic.save_safetensors_atomic(sd, path, metadata={"musubi_demo": what, "seed": str(seed)})
    log(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
        f"({path.stat().st_size / 1e6:.2f} MB)")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

# The demo workflow's sampler settings
SAMPLE = dict(width=CLIP["width"], height=CLIP["height"], frames=CLIP["frames"], steps=20, guidance_scale=5.0,
              shift=TRAIN_SHIFT, solver="unipc")


def _tally(results: list[dict]) -> str:
    return ", ".join(f"{k} {sum(r[k] for r in results)}/{len(results)}" for k in ("colour", "shape", "motion", "all"))


def to_clip(video: torch.Tensor) -> np.ndarray:
    # [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


@torch.no_grad()
def evaluate(out: Path, seed: int, seeds_per_prompt: int = 6) -> None:
    vae = wan_vae.load_wan_vae(out / VAE_FILE, dtype=torch.float32)
    specs = shapes.all_specs(colours=tuple(shapes.PALETTE))
    held_out = shapes.make_dataset(specs, 1, seed + 7, **CLIP)
    results = {}
    for clip, caption in held_out:
        back = to_clip(vae.decode(vae.encode(to_video(clip[None])))[0])
        results.setdefault(caption.split()[1], []).append(score.clip_matches(back, caption))
    for colour, r in results.items():
        log(f"VAE round trip, {colour}: {_tally(r)}")
    log(f"VAE round trip, all colours: {_tally(sum(results.values(), []))}")

    dit_path = out / DIT_FILE
    if not dit_path.is_file():
        return
    family = import_module(f"{REPO.name}.engine.families.wan.family").WanFamily
    model = family.load_dit(dit_path, dtype=torch.float32).eval()
    text_encoder = umt5.load_umt5(out / TEXT_FILE, dtype=torch.float32)
    negative = text_encoder.encode([pipeline.NEGATIVE_PROMPT])[0]
    prompts = [s.caption for s in shapes.eval_specs()]
    results = []
    for prompt in prompts:
        context = text_encoder.encode([prompt])[0]
        for k in range(seeds_per_prompt):
            request = pipeline.WanGenerateRequest(task="t2v", context=context, negative_context=negative,
                                                  seed=42 + k, **SAMPLE)
            clip = to_clip(vae.decode(pipeline.generate(model, request))[0])
            m = score.clip_matches(clip, prompt)
            log(f"  {prompt!r} seed {42 + k}: {score.score_clip(clip)}")
            results.append(m)
    log(f"DiT generation, {len(prompts)} prompts x {seeds_per_prompt} seeds: {_tally(results)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=("vae", "dit", "all", "eval"), default="all")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-dim", type=int, default=VAE_CONFIG.dim, help="the VAE's base channel count")
    ap.add_argument("--dit-steps", type=int, default=6000)
    args = ap.parse_args(argv)
    VAE_CONFIG.dim = args.vae_dim
    warnings.simplefilter("ignore", umt5.PromptTruncatedWarning)   # the negative prompt is long in tiny tokens
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.stage in ("vae", "all"):
        partial = lambda state: save(state, args.out / ("partial_" + VAE_FILE), "wan2.1-vae (partial)", args.seed)  # noqa: E731
        save(train_vae(args.seed, args.vae_steps, on_progress=partial), args.out / VAE_FILE, "wan2.1-vae", args.seed)
    if args.stage in ("dit", "all"):
        vae_state = {k: v.float() for k, v in
                     wan_vae.load_wan_vae(args.out / VAE_FILE, dtype=torch.float32).state_dict().items()}
        spiece = torch.frombuffer(bytearray(umt5.TINY_SPIECE.read_bytes()), dtype=torch.uint8)

        def save_dit(dit_state, text_state):
            save(dit_state, args.out / DIT_FILE, "wan2.1-t2v", args.seed)
            save(text_state, args.out / TEXT_FILE, "umt5", args.seed, {umt5.EMBEDDED_SPIECE_KEY: spiece})
        save_dit(*train_dit(args.seed, args.dit_steps, vae_state, on_progress=save_dit))
    if args.stage == "eval":
        evaluate(args.out, args.seed)
    log(f"done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
