"""HunyuanVideo generation: T2V, T2I (1 frame), V2V and SkyReels V1 I2V on in-memory models (hv_generate_video).

Flow: `HunyuanGenerateRequest` -> `resolve()` fills the defaults -> `validate_request(model, request)` (every user
mistake raises MusubiInputError before any model call) -> noise (V2V: noised source latents) -> the generic loop
(`engine.sampling`) -> latents [B, 16, F_lat, H/8, W/8] in the DiT's latent space (VAE latents x 0.476986).

Guidance, as Musubi Tuner's script:
* embedded guidance (the cfg-distilled T2V model): the scale x 1000 goes through the DiT's guidance embedder, default
  6.0; the same value is given to the negative pass when real CFG runs. A model without a guidance embedder (SkyReels
  I2V) takes none.
* real CFG: `guidance_scale` != 1 runs a negative pass, pred = uncond + g·(cond − uncond); at g = 1 there is no
  negative pass at all (unlike Wan, whose pipeline always runs one).

Conditioning (built by the `prepare_*` helpers from frames in [−1, 1]; the VAE returns DiT latents):
* V2V:       the source video's latents x0; sampling starts at step N − ⌊N·strength⌋ with
             x = noise·σ + x0·(1 − σ), σ the schedule's sigma there, and runs the remaining ⌊N·strength⌋ steps.
             The source is encoded with the posterior mean (Musubi draws a sample).
* SkyReels I2V: y [16, F_lat, h, w] = the image's latent (a 1-frame encode) in latent frame 0, zeros elsewhere,
             concatenated to the noisy latents on channels (32 DiT input channels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ...errors import invalid
from ...lora.adapters import eval_mode
from ...memory.placement import execution_device
from ...sampling import GuidanceConfig, GuidedVelocity, make_noise, make_solver, run_sampler
from ...sampling.magcache import MagCache, MagCacheConfig
from ...sampling.inputs import SIZE_MULTIPLE, as_video, check_frames, encode, latent_frames
from ...sampling.noise import NOISE_DEVICES, check_seed
from ...sampling.solvers import ALIASES, SOLVERS

TASKS = ("t2v", "t2i", "v2v", "i2v")
LATENT_CHANNELS = 16
VAE_STRIDE = (4, 8, 8)             # time, height, width
I2V_CHANNELS = 32                  # SkyReels V1 I2V: noisy latents + image latents
DEFAULT_STEPS = 50
DEFAULT_SHIFT = 7.0                # hv_generate_video --flow_shift (the paper: 7 for 50 steps, 17 under 20)
DEFAULT_EMBEDDED_GUIDANCE = 6.0    # --embedded_cfg_scale
DEFAULT_STRENGTH = 0.8             # --strength (V2V)
GUIDANCE_EMBED_SCALE = 1000.0      # the embedder takes the scale x 1000 (official convention)

Progress = Callable[[int, int, "torch.Tensor | None"], None]


# ---------------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class HunyuanConditioning:
    """What the `prepare_*` helpers produce."""
    kind: str                  # "v2v" | "i2v"
    latents: torch.Tensor      # [16, F_lat, H/8, W/8]: V2V the source latents, I2V the y (image latent in frame 0)


def prepare_v2v(vae, video: torch.Tensor, frames: int) -> HunyuanConditioning:
    """video [3, F', H, W] in [-1, 1] with F' >= frames: its first `frames` frames are the source."""
    check_frames(frames, longest=129)
    v = as_video(video, "video", frames_axis=True)
    if v.shape[2] < frames:
        raise invalid("video frames", v.shape[2], f"at least {frames} (the requested frame count)")
    return HunyuanConditioning("v2v", encode(vae, v[:, :, :frames]))


def prepare_skyreels_i2v(vae, image: torch.Tensor, frames: int) -> HunyuanConditioning:
    """image [3, H, W] in [-1, 1] -> y: its 1-frame latent in latent frame 0, zeros in the other frames."""
    check_frames(frames, longest=129)
    lat = encode(vae, as_video(image, "image", frames_axis=False))             # [16, 1, h, w]
    y = lat.new_zeros(lat.shape[0], latent_frames(frames), *lat.shape[2:])
    y[:, :1] = lat
    return HunyuanConditioning("i2v", y)


# MagCache's calibration for HunyuanVideo at 50 steps (ratio of step t's residual norm to step t−1's; step 0: 1.0),
# as published with the method and used by Musubi Tuner as its default for FramePack.
MAGCACHE_RATIOS = (
    1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632,
    1.02974, 1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726,
    1.03727, 1.01502, 1.00992, 1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461,
    1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711,
    0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592,
)


# ---------------------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class HunyuanGenerateRequest:
    task: str                                      # one of TASKS
    context: torch.Tensor                          # [L, text_dim] LLaVA-LLaMA-3 prompt states
    pooled: torch.Tensor                           # [text_pool_dim] CLIP-L pooled prompt vector
    context_mask: torch.Tensor | None = None       # [L] True on real tokens; None: every token is real (trimmed)
    negative_context: torch.Tensor | None = None   # needed when guidance_scale != 1 (real CFG)
    negative_pooled: torch.Tensor | None = None
    negative_context_mask: torch.Tensor | None = None
    width: int = 1280
    height: int = 720
    frames: int | None = None                      # None: 129 (1 for t2i, where it must be 1)
    steps: int | None = None                       # None: 50
    shift: float | None = None                     # None: 7.0
    guidance_scale: float | None = None            # real CFG; None or 1.0: no negative pass
    embedded_guidance: float | None = None         # None: 6.0 on a model with a guidance embedder, else none
    strength: float | None = None                  # V2V only; None: 0.8
    solver: str = "euler"                          # Musubi: Euler only; unipc / dpm++ are offered too
    seed: int = 0
    batch_size: int = 1                            # sample b uses seed + b
    noise_device: str = "cpu"
    batch_cfg: bool = True                         # cond + uncond in one B=2 forward (Musubi without --split_uncond)
    conditioning: HunyuanConditioning | None = None  # from prepare_v2v / prepare_skyreels_i2v
    magcache: MagCacheConfig | None = None         # skip the blocks on predictable steps (no ratios: MAGCACHE_RATIOS)
    device: torch.device | str | None = None       # None: the device of the model's patch embedding

    def resolve(self) -> "HunyuanGenerateRequest":
        """A copy with the defaults filled in (hv_generate_video's values). The embedded guidance default depends on
        the model and is resolved by `embedded_guidance_of`."""
        r = dataclasses.replace(self)
        if r.frames is None:
            r.frames = 1 if r.task == "t2i" else 129
        if r.steps is None:
            r.steps = DEFAULT_STEPS
        if r.shift is None:
            r.shift = DEFAULT_SHIFT
        if r.guidance_scale is None:
            r.guidance_scale = 1.0
        if r.magcache is not None and r.magcache.mag_ratios is None and not r.magcache.calibrate:
            r.magcache = dataclasses.replace(r.magcache, mag_ratios=MAGCACHE_RATIOS)
        if r.strength is None and r.task == "v2v":
            r.strength = DEFAULT_STRENGTH
        return r

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale is not None and float(self.guidance_scale) != 1.0

    def run_steps(self) -> int:
        """Steps actually run: all of them, or ⌊steps·strength⌋ for V2V (Musubi's int())."""
        return int(self.steps * self.strength) if self.task == "v2v" else self.steps


def model_task_kind(config) -> str:
    """"i2v" for a SkyReels V1 I2V DiT (32 input channels), else "t2v" (T2V, T2I and V2V)."""
    return "i2v" if config.in_channels == I2V_CHANNELS else "t2v"


def embedded_guidance_of(config, r: HunyuanGenerateRequest) -> float | None:
    if r.embedded_guidance is not None:
        return float(r.embedded_guidance)
    return DEFAULT_EMBEDDED_GUIDANCE if config.guidance_embed else None


_TASK_MODELS = {"t2v": "t2v", "t2i": "t2v", "v2v": "t2v", "i2v": "i2v"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def validate_request(model, r: HunyuanGenerateRequest) -> None:
    """Raise MusubiInputError for anything that would fail (or silently misbehave) later. `r` is resolved."""
    cfg = model.config
    if r.task not in TASKS:
        raise invalid("task", r.task, f"one of {TASKS}")
    kind = model_task_kind(cfg)
    if _TASK_MODELS[r.task] != kind:
        if kind == "i2v":
            raise invalid("task", r.task, f"i2v: the loaded {cfg.variant} model is a SkyReels I2V model "
                          f"(in_channels={cfg.in_channels}) and needs a start image")
        raise invalid("task", r.task, f"one of t2v, t2i, v2v: the loaded {cfg.variant} model is a text-to-video "
                      f"model (in_channels={cfg.in_channels}) and takes no start image")
    for name, v in (("width", r.width), ("height", r.height)):
        if not _is_int(v) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            raise invalid(name, v, f"a positive multiple of {SIZE_MULTIPLE} pixels")
    check_frames(r.frames, longest=129)
    if r.task == "t2i" and r.frames != 1:
        raise invalid("frames", r.frames, "1 for task t2i")
    if not _is_int(r.steps) or r.steps < 1:
        raise invalid("steps", r.steps, "an integer >= 1")
    if not _is_int(r.batch_size) or r.batch_size < 1:
        raise invalid("batch_size", r.batch_size, "an integer >= 1")
    if not _is_number(r.shift) or not r.shift > 0:
        raise invalid("shift", r.shift, "a number > 0 (7.0 for 50 steps, 17.0 under 20)")
    key = ALIASES.get(str(r.solver).lower(), str(r.solver).lower())
    if key not in SOLVERS:
        raise invalid("solver", r.solver, f"one of {sorted(SOLVERS)} (or 'vanilla' for euler)")
    check_seed(r.seed)
    if r.noise_device not in NOISE_DEVICES:
        raise invalid("noise_device", r.noise_device, f"one of {NOISE_DEVICES}")
    if not _is_number(r.guidance_scale):
        raise invalid("guidance_scale", r.guidance_scale, "a number (1.0 = no real CFG)")
    if r.embedded_guidance is not None:
        if not cfg.guidance_embed:
            raise invalid("embedded_guidance", r.embedded_guidance,
                          f"none: the loaded {cfg.variant} model has no guidance embedder (use guidance_scale, real "
                          "CFG with a negative prompt)")
        if not _is_number(r.embedded_guidance):
            raise invalid("embedded_guidance", r.embedded_guidance, "a number (6.0 is the default)")
    if r.task == "v2v":
        if not _is_number(r.strength) or not 0.0 < r.strength <= 1.0:
            raise invalid("strength", r.strength, "a number in (0, 1] (1 = start from pure noise)")
        if r.run_steps() < 1:
            raise invalid("strength", r.strength, f"at least 1/{r.steps} so that ⌊steps·strength⌋ >= 1 step runs")
    elif r.strength is not None:
        raise invalid("strength", r.strength, f"none for task {r.task} (strength is for v2v)")
    validate_text(cfg, "prompt", r.context, r.context_mask, r.pooled)
    if r.uses_cfg:
        if r.negative_context is None or r.negative_pooled is None:
            raise invalid("negative prompt", None, f"negative prompt embeddings (LLM states and CLIP-L pooled) for "
                          f"guidance_scale {r.guidance_scale} (encode an empty prompt, or set guidance_scale 1)")
        validate_text(cfg, "negative prompt", r.negative_context, r.negative_context_mask, r.negative_pooled)
    if r.magcache is not None:
        r.magcache.validate()
        if r.uses_cfg and not r.batch_cfg:
            raise invalid("batch_cfg", False, "True with MagCache (one forward per step: its cache follows the steps)")
    _validate_conditioning(r)


def validate_text(cfg, what: str, context, mask, pooled) -> None:
    if not isinstance(context, torch.Tensor) or context.ndim != 2 or context.shape[1] != cfg.text_dim \
            or context.shape[0] < 1:
        shown = tuple(context.shape) if isinstance(context, torch.Tensor) else context
        raise invalid(f"{what} embeddings", shown, f"[tokens, {cfg.text_dim}] LLM hidden states for {cfg.variant}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (context.shape[0],):
            shown = tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask
            raise invalid(f"{what} mask", shown, f"[{context.shape[0]}] (one flag per token)")
        if not bool(mask.bool().any()):
            raise invalid(f"{what} mask", "no real token", "at least one True (unpadded) token")
    if not isinstance(pooled, torch.Tensor) or pooled.numel() != cfg.text_pool_dim or pooled.ndim > 2:
        shown = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else pooled
        raise invalid(f"{what} pooled embedding", shown, f"[{cfg.text_pool_dim}] CLIP-L pooled vector")


def _validate_conditioning(r: HunyuanGenerateRequest) -> None:
    cond = r.conditioning
    if r.task not in ("v2v", "i2v"):
        if cond is not None:
            raise invalid("conditioning", cond.kind, f"none for task {r.task} (text only)")
        return
    if cond is None:
        what = "a source video (prepare_v2v)" if r.task == "v2v" else "a start image (prepare_skyreels_i2v)"
        raise invalid("conditioning", None, f"{what} for task {r.task}")
    if cond.kind != r.task:
        raise invalid("conditioning", cond.kind, f"{r.task} conditioning for task {r.task}")
    shape = (LATENT_CHANNELS, latent_frames(r.frames), r.height // VAE_STRIDE[1], r.width // VAE_STRIDE[2])
    if tuple(cond.latents.shape) != shape:
        raise invalid(f"{cond.kind} latents", tuple(cond.latents.shape), f"{list(shape)} for {r.width}x{r.height}, "
                      f"{r.frames} frames (prepare it again with the request's size and frame count)")


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

def _text(context, mask, pooled, b: int, device) -> dict:
    """One prompt as the DiT's batched text inputs (b copies)."""
    mask = torch.ones(context.shape[0], dtype=torch.bool) if mask is None else mask.bool()
    return {"text_states": context.to(device)[None].expand(b, -1, -1),
            "text_mask": mask.to(device)[None].expand(b, -1),
            "pooled": pooled.reshape(1, -1).to(device).expand(b, -1)}


def _hunyuan_predict(model, block_cache=None):
    """The family's forward for the generic guidance: cond = text inputs + guidance [B] (or None) + y (or None)."""

    def predict(x, t, cond, skip_blocks):
        return model(x, t, cond["text_states"], cond["text_mask"], cond["pooled"], guidance=cond["guidance"],
                     y=cond["y"], block_cache=block_cache)
    return predict


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """[B, L, ...] -> [B, length, ...] with zeros (masked off) after the real tokens."""
    pad = length - t.shape[1]
    return t if pad == 0 else torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)


def merge_text_batches(conds: Sequence[dict]) -> dict:
    """Stack conditionings on the batch axis; prompts of different lengths are padded (and masked)."""
    length = max(c["text_states"].shape[1] for c in conds)
    cat = lambda key: None if conds[0][key] is None else torch.cat([c[key] for c in conds])  # noqa: E731
    return {"text_states": torch.cat([_pad_tokens(c["text_states"], length) for c in conds]),
            "text_mask": torch.cat([_pad_tokens(c["text_mask"], length) for c in conds]),
            "pooled": cat("pooled"), "guidance": cat("guidance"), "y": cat("y")}


@torch.no_grad()
def generate(model, request: HunyuanGenerateRequest, progress: Progress | None = None) -> torch.Tensor:
    """-> float32 latents [B, 16, F_lat, H/8, W/8] on the model device (the DiT's latent space).

    `progress(step, total, x0_estimate)` runs after every step; it may raise (ComfyUI interrupt) to cancel."""
    r = request.resolve()
    validate_request(model, r)
    cfg = model.config
    device = torch.device(r.device) if r.device is not None else execution_device(model)
    b = r.batch_size
    shape = (LATENT_CHANNELS, latent_frames(r.frames), r.height // VAE_STRIDE[1], r.width // VAE_STRIDE[2])
    x = make_noise(shape, r.seed, b, r.noise_device, device)                       # [B, 16, F_lat, h, w]
    solver = make_solver(r.solver, r.steps, r.shift, run_steps=r.run_steps())
    if r.task == "v2v":     # start part-way: the source latents noised to the first sigma run
        sigma = solver.sigma(0)
        x = x * sigma + r.conditioning.latents.to(device, torch.float32)[None] * (1.0 - sigma)

    scale = embedded_guidance_of(cfg, r)
    guidance = None if scale is None else torch.full((b,), scale * GUIDANCE_EMBED_SCALE, device=device)
    y = None
    if r.task == "i2v":
        y = r.conditioning.latents.to(device, torch.float32)[None].expand(b, *shape)
    cond = {**_text(r.context, r.context_mask, r.pooled, b, device), "guidance": guidance, "y": y}
    # one forward per step (CFG batched), so one cache follows the run
    block_cache = MagCache(r.magcache, solver.steps) if r.magcache is not None else None
    predict = _hunyuan_predict(model, block_cache)
    if r.uses_cfg:
        uncond = {**_text(r.negative_context, r.negative_context_mask, r.negative_pooled, b, device),
                  "guidance": guidance, "y": y}
        velocity = GuidedVelocity(predict, cond, uncond, GuidanceConfig(scale=float(r.guidance_scale),
                                                                        batch_cfg=r.batch_cfg), solver.steps,
                                  merge=merge_text_batches)
    else:   # no negative pass at all at guidance_scale 1 (Musubi)
        def velocity(x, t, step):
            return predict(x, t, cond, None).float()
    with eval_mode(model):  # adapter dropout never applies to samples, whatever mode a trainer left it in
        return run_sampler(solver, x, velocity, progress)


# ---------------------------------------------------------------------------------------------------------------
# Live preview
# ---------------------------------------------------------------------------------------------------------------

# ComfyUI's HunyuanVideo latent→RGB linear map (comfy/latent_formats.py, HunyuanVideo.latent_rgb_factors / _bias),
# applied to the scaled latents the sampler works on; [16 channels][R, G, B].
HUNYUAN_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
)
HUNYUAN_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latent_to_rgb_preview(latents: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """latents [B, 16, F, h, w] or [16, F, h, w] -> float32 RGB [h, w, 3] in [0, 1] of sample 0, latent `frame`
    (a cheap approximation at 1/8 resolution; no VAE)."""
    if latents.ndim == 5:
        latents = latents[0]
    if latents.ndim != 4 or latents.shape[0] != LATENT_CHANNELS:
        raise invalid("latents", tuple(latents.shape), "[B, 16, F, h, w] or [16, F, h, w] HunyuanVideo latents")
    x = latents[:, frame].float().movedim(0, -1)                               # [h, w, 16]
    w = torch.tensor(HUNYUAN_RGB_FACTORS, device=x.device)                      # [16, 3]
    rgb = x @ w + torch.tensor(HUNYUAN_RGB_BIAS, device=x.device)               # [h, w, 3] in ~[-1, 1]
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
