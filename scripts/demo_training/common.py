"""What every family's demo training shares: the pack imported as a package, the clip format, the learning-rate
schedule, the VAE's auxiliary colour target and latent calibration, flow-matching batches, fp16 files, scoring."""

from __future__ import annotations

import math
import random
import sys
import time
from importlib import import_module
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO.parent))
__import__(REPO.name)   # the pack as a package, so its relative imports work (as ComfyUI imports it)


def pack(module: str):
    """A module of the pack, e.g. pack("engine.demo.shapes")."""
    return import_module(f"{REPO.name}.{module}")


shapes = pack("engine.demo.shapes")
score = pack("engine.demo.score")
atomic = pack("engine.atomic")

OUT = REPO / "demo_models"
CLIP = dict(frames=17, height=64, width=64)
TRAIN_SHIFT = 3.0            # timesteps drawn uniformly, then flow-shifted like sampling (more high-noise steps)
UNCOND_PROB = 0.1            # caption dropout, so CFG has an unconditional prediction to push away from
EMA_DECAY = 0.998            # the DiTs and text encoders ship as the exponential moving average of their weights


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warmup_cosine(opt, steps: int, warmup: int = 50):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)))


def to_video(clips: np.ndarray) -> torch.Tensor:
    # uint8 [B, F, H, W, 3] -> [B, 3, F, H, W] in [-1, 1]
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def to_clip(video: torch.Tensor) -> np.ndarray:
    # [3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def ema_of(*modules):
    """Exponential moving averages of `modules` (update each after every optimizer step; ship `.module`)."""
    make = torch.optim.swa_utils.get_ema_multi_avg_fn(EMA_DECAY)
    return [torch.optim.swa_utils.AveragedModel(m, multi_avg_fn=make) for m in modules]


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

def latent_pixel_colour(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] -> the average colour over each latent pixel's footprint [B, 3, 1 + (F-1)/4, H/8, W/8]
    (frame 0 alone, then groups of 4 frames; 8x8 pixels): both families' VAEs compress 4x in time, 8x in space."""
    chunks = [video[:, :, :1]] + [video[:, :, s:s + 4] for s in range(1, video.shape[2], 4)]
    return torch.cat([F.avg_pool3d(c, (c.shape[2], 8, 8)) for c in chunks], dim=2)


def vae_data(seed: int) -> tuple[random.Random, np.ndarray]:
    """Seeds torch, then the VAE's data: 3 clips of every palette combination (the VAE must show colours the DiT
    never sees) -> a Python RNG for the crops, clips [N, 17, 64, 64, 3]."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    specs = shapes.all_specs(colours=tuple(shapes.PALETTE))
    return rng, np.stack([c for c, _ in shapes.make_dataset(specs, 3, seed, **CLIP)])


def vae_crops(pool: np.ndarray, rng, step: int, batch: int) -> torch.Tensor:
    """32x32 crops of 5 frames (the first chunk and one more), every 4th step 9 frames at half the batch: the
    convolutions see all they see on whole clips, 8x cheaper."""
    frames, n = (9, batch // 2) if step % 4 == 3 else (5, batch)
    crops = []
    for _ in range(n):
        i, f0 = rng.randrange(len(pool)), rng.randrange(0, pool.shape[1] - frames + 1)
        y0, x0 = rng.randrange(0, 33, 8), rng.randrange(0, 33, 8)
        crops.append(pool[i, f0:f0 + frames, y0:y0 + 32, x0:x0 + 32])
    return to_video(np.stack(crops))


def reconstruction_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """L1 + L2 with the shapes' pixels weighted up (black everywhere is otherwise a fine minimum)."""
    weight = 1.0 + 4.0 * (x.amax(dim=1, keepdim=True) > -0.9).float()
    return ((y - x).abs() * weight).mean() + ((y - x).pow(2) * weight).mean()


def vae_loss(x: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Reconstruction plus the auxiliary target: trained from scratch on reconstruction alone, a decoder learns the
    mean clip within ~25 steps and stops listening to z; asking 3 latent channels to hold each latent pixel's
    average colour makes z informative from the start, and the decoder then upsamples it and adds the detail."""
    return reconstruction_loss(x, y) + F.mse_loss(mu[:, :3], latent_pixel_colour(x)) + 1e-3 * mu.pow(2).mean()


@torch.no_grad()
def calibrate_latents(mus: torch.Tensor, target_mean, target_std, into, out_of) -> torch.Tensor:
    """Make the raw latents `mus` [N, z, ...] have the per-channel `target_mean`/`target_std` (what the family's
    pipeline normalises with) by an exact affine change of `into` (the 1x1x1 conv whose first z output channels
    are the posterior mean, the next z its log-variance) and the inverse in `out_of` (the 1x1x1 conv the decoder
    starts with). -> the latents' std per channel before."""
    z = mus.shape[1]
    m = mus.mean(dim=(0, 2, 3, 4))
    s = mus.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    target_m = torch.as_tensor(target_mean, dtype=torch.float32).expand(z)
    target_s = torch.as_tensor(target_std, dtype=torch.float32).expand(z)
    a, b = target_s / s, target_m - m * target_s / s       # raw' = a * raw + b
    w1, b1 = into.weight, into.bias                          # [2z, 2z, 1, 1, 1]
    w1[:z] *= a.view(z, 1, 1, 1, 1)
    b1[:z] = b1[:z] * a + b
    b1[z:] += 2 * torch.log(a)                               # the log-variance scales with a^2
    w2, b2 = out_of.weight, out_of.bias                      # out_of(raw) == out_of'(a * raw + b)
    b2 -= (w2[:, :, 0, 0, 0] * (b / a)).sum(dim=1)
    w2 /= a.view(1, z, 1, 1, 1)
    return s


def train_autoencoder(vae, forward, pool: np.ndarray, rng, steps: int, batch: int, on_progress=None) -> None:
    """The VAE's training loop. `forward(vae, video, noise) -> (reconstruction, raw latent mean)` with autograd;
    `on_progress(state)` runs every 250 steps. Biases start at zero: the decoder's features then depend on z alone."""
    for name, p in vae.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
    fixed = to_video(pool[::len(pool) // 8][:8, :5, 16:48, 16:48])                 # a fixed batch to report on
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, {len(pool)} clips, {steps} steps")
    for step in range(steps):
        x = vae_crops(pool, rng, step, batch)
        y, mu = forward(vae, x, noise=0.1)
        loss = vae_loss(x, y, mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if on_progress is not None and step % 250 == 249:
            on_progress(vae.state_dict())
        if step % 50 == 0 or step == steps - 1:
            with torch.no_grad():
                err = (forward(vae, fixed)[0] - fixed).abs().mean(dim=1)               # [B, F, H, W]
            shape = fixed.amax(dim=1) > -0.9
            log(f"VAE step {step}: L1 on shapes {err[shape].mean():.3f}, on background {err[~shape].mean():.3f}")
    vae.eval()


# ----------------------------------------------------------------------------------------------------------------
# DiT
# ----------------------------------------------------------------------------------------------------------------

def dit_clips(seed: int) -> list[tuple[np.ndarray, str]]:
    """The DiTs' clips: 8 of every base combination (colours and motions), with their captions."""
    return shapes.make_dataset(shapes.all_specs(), 8, seed + 1, **CLIP)


def dit_data(seed: int, make_vae) -> tuple[random.Random, torch.Tensor, list[str]]:
    """Seeds torch, then the DiT's data: `dit_clips`, encoded by the frozen VAE that
    `make_vae()` builds (in eval mode, giving the latents the pipeline samples) -> a Python RNG for the batches,
    latents [N, 16, 5, 8, 8], captions."""
    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    clips = dit_clips(seed)
    vae = make_vae()
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_video(np.stack([c for c, _ in clips[i:i + 16]])))
                             for i in range(0, len(clips), 16)])
    log(f"DiT data: {len(clips)} clips, latents std {latents.std():.3f}")
    return rng, latents, [cap for _, cap in clips]


class FlowTraining:
    """What the DiT loops share: AdamW (DiT 1e-3, text encoders 3e-4) with warm-up and cosine, gradient clipping
    over everything, the averaged weights that ship (they sample much cleaner shapes than the last step's: a tiny
    model at a high learning rate), and the loss log."""

    def __init__(self, model, text_modules, steps: int):
        groups = [{"params": model.parameters(), "lr": 1e-3}] + [{"params": m.parameters(), "lr": 3e-4}
                                                                 for m in text_modules]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.01)
        self.sched = warmup_cosine(self.opt, steps)
        self.modules = (model, *text_modules)
        self.params = [p for m in self.modules for p in m.parameters()]
        self.ema = ema_of(*self.modules)
        self.steps, self.smoothed = steps, None
        log(f"DiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {steps} steps")

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()
        for averaged, m in zip(self.ema, self.modules):
            averaged.update_parameters(m)
        self.smoothed = loss.item() if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss.item()
        if step % 100 == 0 or step == self.steps - 1:
            log(f"DiT step {step}: loss {loss.item():.4f} (smoothed {self.smoothed:.4f})")

    def averaged(self) -> list:
        """The averaged modules, in the order given (the DiT first)."""
        return [a.module for a in self.ema]


def flow_batch(latents: torch.Tensor, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow matching at shift-3 timesteps: -> x_t, sigma [B] (the DiT's timestep is 1000·sigma), target noise - x0."""
    x0 = latents[idx]
    u = torch.rand(len(idx))
    sigma = TRAIN_SHIFT * u / (1 + (TRAIN_SHIFT - 1) * u)
    noise = torch.randn_like(x0)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise, sigma, noise - x0


# ----------------------------------------------------------------------------------------------------------------
# Files and scores
# ----------------------------------------------------------------------------------------------------------------

def save(state: dict, path: Path, what: str, seed: int, extra: dict | None = None) -> None:
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    sd.update(extra or {})
    atomic.save_safetensors_atomic(sd, path, metadata={"musubi_demo": what, "seed": str(seed)})
    log(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path} "
        f"({path.stat().st_size / 1e6:.2f} MB)")


def tally(results: list[dict]) -> str:
    return ", ".join(f"{k} {sum(r[k] for r in results)}/{len(results)}" for k in ("colour", "shape", "motion", "all"))


def score_vae_round_trip(encode_decode, seed: int) -> None:
    """The VAE on held-out clips of every palette colour: encode, decode, score against the caption."""
    specs = shapes.all_specs(colours=tuple(shapes.PALETTE))
    results = {}
    for clip, caption in shapes.make_dataset(specs, 1, seed + 7, **CLIP):
        back = to_clip(encode_decode(to_video(clip[None]))[0])
        results.setdefault(caption.split()[1], []).append(score.clip_matches(back, caption))
    for colour, r in results.items():
        log(f"VAE round trip, {colour}: {tally(r)}")
    log(f"VAE round trip, all colours: {tally(sum(results.values(), []))}")


def score_generation(generate_clip, seeds_per_prompt: int = 6, prompts: list[str] | None = None) -> None:
    """`generate_clip(prompt, seed) -> uint8 clip` on `prompts` (None: the fixed prompts of `shapes.eval_specs()`),
    seeds 42, 43, ..."""
    prompts = prompts or [s.caption for s in shapes.eval_specs()]
    results = []
    for prompt in prompts:
        for k in range(seeds_per_prompt):
            clip = generate_clip(prompt, 42 + k)
            log(f"  {prompt!r} seed {42 + k}: {score.score_clip(clip)}")
            results.append(score.clip_matches(clip, prompt))
    log(f"DiT generation, {len(prompts)} prompts x {seeds_per_prompt} seeds: {tally(results)}")
