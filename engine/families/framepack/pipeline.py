"""FramePack generation: image-to-video by sections (original "inverted anti-drifting" and F1), end-image guidance,
per-section prompts and start images, one-frame inference (kisekaeichi, 1f-mc) on in-memory models
(fpack_generate_video).

Flow: `FramePackGenerateRequest` -> `resolve()` fills the defaults -> `validate_request(model, request)` (every user
mistake raises MusubiInputError before any model call) -> one sampling run per section (`sections.schedule`), each
from fresh noise, attending to the start latent and the history buffer -> latents [B, 16, sections·lws + 1, h, w] in
the DiT's latent space (VAE latents x 0.476986), or [B, 16, 1, h, w] in one-frame mode. `decode_sections` turns them
into frames as Musubi does (per section, soft-blended overlaps) or in one piece.

Conditioning (built by `prepare_image` from frames in [-1, 1]): the start image's latent (a 1-frame VAE encode, the
posterior mean; Musubi draws a sample) and its SigLIP last hidden state, per section; an optional end image's latent.
Text: the HunyuanVideo encoders' output (LLM states + mask, CLIP-L pooled), one `FramePackPrompt` per section.

Sampling, as Musubi Tuner's script (frame_pack/k_diffusion_hunyuan.py, wrapper.py):
* embedded guidance (distilled CFG): scale x 1000 into the guidance embedder, default 10.0; the value is rounded
  through the model's compute dtype as Musubi/official FramePack do (bf16: 10000 -> 9984);
* real CFG: `guidance_scale` != 1 runs a negative pass (batched with the positive one), pred = neg + g·(pos − neg),
  then `guidance_rescale` φ: pred ← φ·pred·std(pos)/std(pred) + (1 − φ)·pred (per sample). At g = 1 no negative pass
  runs and no negative prompt is needed (Musubi feeds zeros there and never uses them);
* shift: None = Musubi's dynamic μ from the section's token count L = F_lat·h·w/4 (μ linear 256 → 0.5, 4096 → 1.15,
  capped at ln 7), shift S = e^μ (flux_time_shift with μ equals σ' = S·σ/(1 + (S−1)·σ)); a number = a fixed shift;
* solvers: the shared `engine.sampling` solvers. Musubi's only FramePack sampler is lllyasviel's `uni_pc_fm`
  (UniPC, variant bh1, order up to 3, λ = −log σ, σ = shifted linspace(1, 0), float timesteps σ·1000, returning the
  last x0 prediction at σ_{N−1} rather than stepping to 0). "unipc" here is the official Wan/HunyuanVideo FlowUniPC
  (bh2, order 2, λ = log((1−σ)/σ), σ from 0.999, int timesteps): the same family of solver on the same shifted
  schedule, not bit-identical; "euler" uses exactly Musubi's FramePack sigmas and timesteps.
* noise: one generator per sample (seed + b) drawn once per section in generation order (Musubi: one CPU generator
  for the whole video);
* MagCache: one cache per section (Musubi's `reset_magcache(steps)` before each section), default table the
  HunyuanVideo one; CFG is batched, so the cache follows the steps (Musubi counts forwards).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ...errors import invalid
from ...lora.adapters import eval_mode
from ...memory.placement import execution_device
from ...sampling import make_solver, run_sampler
from ...sampling.inputs import SIZE_MULTIPLE, as_video, encode
from ...sampling.magcache import MagCache, MagCacheConfig
from ...sampling.noise import NOISE_DEVICES, check_seed
from ...sampling.solvers import ALIASES, SOLVERS
from ..hunyuan.pipeline import MAGCACHE_RATIOS, merge_text_batches, validate_text
from . import sections as S

LATENT_CHANNELS = 16
VAE_STRIDE = 8
DEFAULT_STEPS = 25                  # --infer_steps
DEFAULT_EMBEDDED_GUIDANCE = 10.0    # --embedded_cfg_scale
DEFAULT_VIDEO_SECONDS = 5.0         # --video_seconds
DEFAULT_SOLVER = "unipc"
GUIDANCE_EMBED_SCALE = 1000.0
MU_MAX_SHIFT = 7.0                  # calculate_flux_mu(exp_max=7.0)

Progress = Callable[[int, int, "torch.Tensor | None"], None]


# ---------------------------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FramePackPrompt:
    """One prompt: the HunyuanVideo text encoders' output for it."""
    context: torch.Tensor                 # [L, text_dim] LLM hidden states
    pooled: torch.Tensor                  # [text_pool_dim] CLIP-L pooled
    mask: torch.Tensor | None = None      # [L] True on real tokens; None: all real


@dataclass
class FramePackImage:
    """What `prepare_image` produces: a start / end / control image."""
    latent: torch.Tensor                          # [16, 1, H/8, W/8] DiT latents (1-frame encode)
    embeddings: torch.Tensor | None = None        # [tokens, image_dim] SigLIP last hidden state (start images)


def _fit(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[3, H, W] in [-1, 1] -> [3, height, width]: Musubi's bucket resize (cover, center-crop) on uint8 levels."""
    from ...data.buckets import resize_and_crop

    u8 = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    out = resize_and_crop(np.ascontiguousarray(u8), (int(width), int(height)))
    return torch.from_numpy(out).float().div(127.5).sub(1.0).permute(2, 0, 1)


def prepare_image(vae, image_encoder, image: torch.Tensor, width: int | None = None,
                  height: int | None = None) -> FramePackImage:
    """image [3, H, W] (or [1, 3, H, W]) in [-1, 1] -> its 1-frame latent and, with an image encoder, its SigLIP
    embedding (both of the same frame). `width`/`height`: resize to that size first (cover + center crop, Musubi's
    bucket resize); None keeps the image's size (a multiple of 16). `image_encoder` None: latent only (end and
    control images)."""
    if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise invalid("image", got, "an RGB image [3, H, W] in [-1, 1]")
    if (width is None) != (height is None):
        raise invalid("image size", (width, height), "both width and height, or neither (keep the image's size)")
    if width is not None:
        for name, v in (("width", width), ("height", height)):
            if not _is_int(v) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
                raise invalid(name, v, f"a positive multiple of {SIZE_MULTIPLE} pixels")
        if tuple(image.shape[1:]) != (height, width):
            image = _fit(image, width, height)
    latent = encode(vae, as_video(image, "image", frames_axis=False))             # [16, 1, h, w]
    emb = None
    if image_encoder is not None:
        with torch.no_grad():
            emb = image_encoder.encode(image[None].float())[0].float().cpu()        # [tokens, dim]
    return FramePackImage(latent, emb)


# ---------------------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FramePackGenerateRequest:
    prompt: FramePackPrompt | Sequence[FramePackPrompt]       # one, or one per section (time order, resolved)
    image: FramePackImage | Sequence[FramePackImage] | None = None   # start image(s): one, or one per section
    negative_prompt: FramePackPrompt | None = None            # needed when guidance_scale != 1
    end_image: FramePackImage | None = None                   # original schedule only
    f1: bool = False                                          # FramePack-F1 forward sampling (the F1 DiT)
    video_seconds: float | None = None                        # None: 5.0 (ignored when `sections` is set)
    sections: int | None = None                               # overrides video_seconds (Musubi --video_sections)
    latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE
    width: int | None = None                                  # None: the start image's size
    height: int | None = None
    steps: int | None = None                                  # None: 25 per section
    embedded_guidance: float | None = None                    # None: 10.0
    guidance_scale: float = 1.0                               # real CFG; 1.0: no negative pass
    guidance_rescale: float = 0.0
    shift: float | None = None                                # None: Musubi's dynamic shift (token count)
    solver: str = DEFAULT_SOLVER                              # unipc | dpm++ | euler (see the module docstring)
    latent_paddings: Sequence[int] | str | None = None        # original schedule, generation order
    seed: int = 0
    batch_size: int = 1                                       # sample b uses seed + b
    noise_device: str = "cpu"
    rope_scaling: tuple[float, float] | None = None           # (timestep threshold, h/w factor)
    magcache: MagCacheConfig | None = None                    # no ratios: the HunyuanVideo table
    one_frame: S.OneFrameOptions | None = None                # one-frame inference (sections = 1)
    control_latents: Sequence[torch.Tensor] = ()              # one-frame: [16, 1, h, w] each (prepare_image)
    control_masks: Sequence[torch.Tensor | None] = ()         # one-frame: [h, w] in [0, 1] each (S.latent_mask)
    device: torch.device | str | None = None                  # None: the model's execution device

    def resolve(self) -> "FramePackGenerateRequest":
        """A copy with the defaults filled in (fpack_generate_video's values); single prompt / image broadcast to
        every section. Invalid values are left for `validate_request` to name."""
        r = dataclasses.replace(self)
        if r.steps is None:
            r.steps = DEFAULT_STEPS
        if r.embedded_guidance is None:
            r.embedded_guidance = DEFAULT_EMBEDDED_GUIDANCE
        if r.magcache is not None and r.magcache.mag_ratios is None and not r.magcache.calibrate:
            r.magcache = dataclasses.replace(r.magcache, mag_ratios=MAGCACHE_RATIOS)
        if r.sections is None:
            if r.one_frame is not None:
                r.sections = 1
            else:
                if r.video_seconds is None:
                    r.video_seconds = DEFAULT_VIDEO_SECONDS
                if _is_number(r.video_seconds) and r.video_seconds > 0 and _is_int(r.latent_window_size) \
                        and r.latent_window_size > 0:
                    r.sections = S.section_count(float(r.video_seconds), r.latent_window_size)
        if _is_int(r.sections) and r.sections >= 1:
            if isinstance(r.prompt, FramePackPrompt):
                r.prompt = [r.prompt] * r.sections
            if isinstance(r.image, FramePackImage):
                r.image = [r.image] * r.sections
        if r.image is not None and not isinstance(r.image, FramePackImage):
            r.image = list(r.image)
        if not isinstance(r.prompt, FramePackPrompt):
            r.prompt = list(r.prompt) if isinstance(r.prompt, (list, tuple)) else r.prompt
        r.control_latents, r.control_masks = list(r.control_latents), list(r.control_masks)
        first = r.image if isinstance(r.image, FramePackImage) else (r.image[0] if r.image else None)
        if isinstance(first, FramePackImage) and isinstance(first.latent, torch.Tensor) and first.latent.ndim == 4:
            h, w = (int(s) * VAE_STRIDE for s in first.latent.shape[-2:])
            r.height = h if r.height is None else r.height
            r.width = w if r.width is None else r.width
        return r

    @property
    def uses_cfg(self) -> bool:
        return float(self.guidance_scale) != 1.0

    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latents."""
        return self.height // VAE_STRIDE, self.width // VAE_STRIDE

    def section_frames(self) -> int:
        """Latent frames one sampling run makes: lws, or 1 in one-frame mode."""
        return 1 if self.one_frame is not None else self.latent_window_size

    def plans(self) -> list[S.SectionPlan]:
        return S.schedule(self.sections, self.latent_window_size, f1=self.f1, paddings=self.latent_paddings)

    def output_shape(self) -> tuple[int, int, int, int, int]:
        h, w = self.latent_size()
        frames = 1 if self.one_frame is not None else S.total_latent_frames(self.sections, self.latent_window_size)
        return (self.batch_size, LATENT_CHANNELS, frames, h, w)


def dynamic_shift(latent_frames: int, h: int, w: int) -> float:
    """Musubi's shift for a run over [F, h, w] latents: e^μ, μ = min(0.5 + (L − 256)·0.65/3840, ln 7), L = F·h·w//4
    (the generated tokens only; the history does not count)."""
    length = latent_frames * h * w // 4
    k = (1.15 - 0.5) / (4096 - 256)
    mu = min(k * length + (0.5 - k * 256), math.log(MU_MAX_SHIFT))
    return math.exp(mu)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _shape(v):
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def validate_request(model, r: FramePackGenerateRequest) -> None:
    """Raise MusubiInputError for anything that would fail (or silently misbehave) later. `r` is resolved."""
    cfg = model.config
    if not isinstance(r.f1, bool):
        raise invalid("f1", r.f1, "True (FramePack-F1 forward sampling) or False (original FramePack)")
    if not _is_int(r.latent_window_size) or r.latent_window_size < 1:
        raise invalid("latent_window_size", r.latent_window_size, "a positive integer (FramePack's default is 9)")
    if r.one_frame is not None:
        if not isinstance(r.one_frame, S.OneFrameOptions):
            raise invalid("one_frame", type(r.one_frame).__name__, "OneFrameOptions (sections.parse_one_frame_options)")
        if r.f1:
            raise invalid("f1", True, "False with one-frame inference (it has its own index layout; Musubi does not "
                                      "support it with F1)")
        if r.sections != 1:
            raise invalid("sections", r.sections, "1 (or unset) with one-frame inference")
        if r.end_image is not None:
            raise invalid("end_image", "an end image", "none with one-frame inference (use control images)")
        if r.latent_paddings is not None:
            raise invalid("latent_paddings", r.latent_paddings, "none with one-frame inference")
    else:
        if r.control_latents or r.control_masks:
            raise invalid("control images", f"{len(r.control_latents)} latents, {len(r.control_masks)} masks",
                          "none outside one-frame inference (set one_frame)")
        if r.sections is None:
            raise invalid("video_seconds", r.video_seconds, "a length in seconds > 0")
        if not _is_int(r.sections) or r.sections < 1:
            raise invalid("sections", r.sections, "a positive integer")
    if r.f1 and r.end_image is not None:
        raise invalid("end_image", "an end image", "none with F1 (FramePack-F1 samples forward; only the original "
                                                   "schedule takes an end image)")
    if r.f1 and r.latent_paddings is not None:
        raise invalid("latent_paddings", r.latent_paddings, "none with F1 (F1 has no paddings)")
    if r.latent_paddings is not None:
        S.latent_paddings(r.sections, r.latent_paddings)          # refuses a malformed list
    for name, v in (("width", r.width), ("height", r.height)):
        if not _is_int(v) or v < SIZE_MULTIPLE or v % SIZE_MULTIPLE:
            raise invalid(name, v, f"a positive multiple of {SIZE_MULTIPLE} pixels (None: the start image's size)")
    if not _is_int(r.steps) or r.steps < 1:
        raise invalid("steps", r.steps, "an integer >= 1")
    if not _is_int(r.batch_size) or r.batch_size < 1:
        raise invalid("batch_size", r.batch_size, "an integer >= 1")
    if r.shift is not None and (not _is_number(r.shift) or not r.shift > 0):
        raise invalid("shift", r.shift, "a number > 0, or None for Musubi's dynamic shift")
    key = ALIASES.get(str(r.solver).lower(), str(r.solver).lower())
    if key not in SOLVERS:
        raise invalid("solver", r.solver, f"one of {sorted(SOLVERS)} (or 'vanilla' for euler)")
    check_seed(r.seed)
    if r.noise_device not in NOISE_DEVICES:
        raise invalid("noise_device", r.noise_device, f"one of {NOISE_DEVICES}")
    if not _is_number(r.guidance_scale):
        raise invalid("guidance_scale", r.guidance_scale, "a number (1.0 = no real CFG)")
    if not _is_number(r.guidance_rescale) or not 0.0 <= r.guidance_rescale <= 1.0:
        raise invalid("guidance_rescale", r.guidance_rescale, "a number from 0 to 1 (0 = off)")
    if not _is_number(r.embedded_guidance):
        raise invalid("embedded_guidance", r.embedded_guidance, "a number (10.0 is FramePack's default)")
    if not cfg.guidance_embed:
        raise invalid("model", cfg.variant, "a FramePack DiT with a guidance embedder")
    if r.rope_scaling is not None:
        ok = isinstance(r.rope_scaling, (tuple, list)) and len(r.rope_scaling) == 2 \
            and _is_number(r.rope_scaling[0]) and _is_number(r.rope_scaling[1]) and r.rope_scaling[1] > 0
        if not ok:
            raise invalid("rope_scaling", r.rope_scaling, "(timestep threshold, factor > 0), e.g. (800, 0.5), or None")
    if r.magcache is not None:
        r.magcache.validate()
    _validate_prompts(cfg, r)
    h, w = r.latent_size()
    _validate_images(cfg, r, h, w)
    if r.one_frame is not None:
        _validate_controls(r, h, w)


def _validate_prompts(cfg, r: FramePackGenerateRequest) -> None:
    prompts = r.prompt
    if not isinstance(prompts, list) or not prompts:
        raise invalid("prompt", type(prompts).__name__, "a FramePackPrompt or a list of them (one per section)")
    if len(prompts) != r.sections:
        raise invalid("section prompts", f"{len(prompts)} prompts", f"{r.sections} (one per section, time order; "
                      "resolve SPECs with sections.resolve_section_values)")
    for i, p in enumerate(prompts):
        if not isinstance(p, FramePackPrompt):
            raise invalid(f"section {i} prompt", type(p).__name__, "a FramePackPrompt")
        validate_text(cfg, "prompt" if r.sections == 1 else f"section {i} prompt", p.context, p.mask, p.pooled)
    if r.uses_cfg:
        n = r.negative_prompt
        if not isinstance(n, FramePackPrompt):
            raise invalid("negative prompt", n, f"negative prompt embeddings (FramePackPrompt) for guidance_scale "
                          f"{r.guidance_scale} (encode an empty prompt, or set guidance_scale 1)")
        validate_text(cfg, "negative prompt", n.context, n.mask, n.pooled)


def _check_latent(name: str, latent, h: int, w: int, size_hint: str) -> None:
    want = (LATENT_CHANNELS, 1, h, w)
    if not isinstance(latent, torch.Tensor) or tuple(latent.shape) != want:
        raise invalid(name, _shape(latent), f"{list(want)} ({size_hint})")


def _validate_images(cfg, r: FramePackGenerateRequest, h: int, w: int) -> None:
    images = r.image
    if images is None or (isinstance(images, list) and not images):
        raise invalid("start image", None, "a start image (prepare_image with the image encoder): FramePack is "
                                           "image-to-video only")
    if len(images) != r.sections:
        raise invalid("section start images", f"{len(images)} images", f"{r.sections} (one per section, time "
                      "order; resolve SPECs with sections.resolve_section_values)")
    hint = f"a 1-frame latent of a {r.width}x{r.height} image (prepare_image)"
    for i, im in enumerate(images):
        name = "start image" if r.sections == 1 else f"section {i} start image"
        if not isinstance(im, FramePackImage):
            raise invalid(name, type(im).__name__, "a FramePackImage (prepare_image)")
        _check_latent(f"{name} latent", im.latent, h, w, hint)
        e = im.embeddings
        if not isinstance(e, torch.Tensor) or e.ndim != 2 or e.shape[1] != cfg.image_dim or e.shape[0] < 1:
            raise invalid(f"{name} embeddings", _shape(e) if e is not None else None,
                          f"[tokens, {cfg.image_dim}] SigLIP last hidden state (prepare_image with the image encoder)")
    if r.end_image is not None:
        if not isinstance(r.end_image, FramePackImage):
            raise invalid("end_image", type(r.end_image).__name__, "a FramePackImage (prepare_image)")
        _check_latent("end image latent", r.end_image.latent, h, w, hint)


def _validate_controls(r: FramePackGenerateRequest, h: int, w: int) -> None:
    for i, c in enumerate(r.control_latents):
        _check_latent(f"control image {i} latent", c, h, w, f"a 1-frame latent of a {r.width}x{r.height} image")
    if len(r.control_masks) > max(1, len(r.control_latents)):
        raise invalid("control masks", f"{len(r.control_masks)} masks",
                      f"at most one per control image ({len(r.control_latents)})")
    for i, m in enumerate(r.control_masks):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.numel() != h * w or tuple(m.shape[-2:]) != (h, w) \
                or any(s != 1 for s in m.shape[:-2]):
            raise invalid(f"control mask {i}", _shape(m), f"[{h}, {w}] (the latent size of {r.width}x{r.height}; "
                                                         "sections.latent_mask makes one from a mask image)")
    S.one_frame_indices(r.one_frame, r.latent_window_size, len(r.control_latents))   # bad control_index etc.


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

class _Noise:
    """One generator per sample (seed + b) that every section draws from in turn (Musubi: one generator)."""

    def __init__(self, seed: int, batch: int, noise_device: str, device: torch.device):
        self.device = device
        gen_device = torch.device("cpu") if noise_device == "cpu" else device
        self.gens = [torch.Generator(device=gen_device).manual_seed((seed + b) % 2**64) for b in range(batch)]

    def draw(self, shape) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=g.device, dtype=torch.float32)
                            for g in self.gens]).to(self.device)


def _text(p: FramePackPrompt, b: int, device) -> dict:
    mask = torch.ones(p.context.shape[0], dtype=torch.bool) if p.mask is None else p.mask.bool()
    return {"text_states": p.context.to(device)[None].expand(b, -1, -1),
            "text_mask": mask.to(device)[None].expand(b, -1),
            "pooled": p.pooled.reshape(1, -1).to(device).expand(b, -1)}


def _batch(t: torch.Tensor | None, b: int, device) -> torch.Tensor | None:
    """[1 or B, ...] -> [B, ...] float32 on device."""
    if t is None:
        return None
    t = t.to(device, torch.float32)
    return t.expand(b, *t.shape[1:]) if t.shape[0] == 1 else t


def _indices(idx, b: int, device) -> torch.Tensor | None:
    return None if idx is None else S.index_tensor(idx, b).to(device)


def _merge_all(conds: Sequence[dict]) -> dict:
    """Stack cond + uncond on the batch axis: text via the HunyuanVideo merge (padding + mask), the rest by cat."""
    text = merge_text_batches([{**{k: c[k] for k in ("text_states", "text_mask", "pooled")}, "guidance": c["guidance"],
                    "y": None} for c in conds])
    out = {k: text[k] for k in ("text_states", "text_mask", "pooled", "guidance")}
    for k, v in conds[0].items():
        if k not in out:
            out[k] = None if v is None else torch.cat([c[k] for c in conds])
    return out


def rescale_guidance(pred: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """Std-based CFG rescale (Lin et al. 2023; Musubi's `rescale_noise_cfg`), per sample."""
    if rescale == 0:
        return pred
    dims = list(range(1, pred.ndim))
    rescaled = pred * (positive.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1.0 - rescale) * pred


def _velocity(model, cond: dict, uncond: dict | None, r: FramePackGenerateRequest, block_cache):
    rope_scaling = None if r.rope_scaling is None else (float(r.rope_scaling[0]), float(r.rope_scaling[1]))

    def predict(x, t, c):
        return model(x, t, c["text_states"], c["text_mask"], c["pooled"], guidance=c["guidance"],
                     latent_indices=c["latent_indices"], image_embeddings=c["image_embeddings"],
                     clean_latents=c["clean_latents"], clean_latent_indices=c["clean_latent_indices"],
                     clean_latents_2x=c["clean_latents_2x"], clean_latent_2x_indices=c["clean_latent_2x_indices"],
                     clean_latents_4x=c["clean_latents_4x"], clean_latent_4x_indices=c["clean_latent_4x_indices"],
                     rope_scaling=rope_scaling, block_cache=block_cache).float()

    if uncond is None:      # guidance_scale 1: no negative pass (Musubi's pred_negative = 0, pred = positive)
        return lambda x, t, step: predict(x, t, cond)
    both = _merge_all([cond, uncond])
    g, phi = float(r.guidance_scale), float(r.guidance_rescale)

    def velocity(x, t, step):
        pos, neg = predict(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return rescale_guidance(neg + g * (pos - neg), pos, phi)
    return velocity


def _section_cond(r: FramePackGenerateRequest, prompt: FramePackPrompt, image: FramePackImage, guidance, b, device,
                  clean, idx_clean, c2x, idx_2x, c4x, idx_4x, latent_indices) -> dict:
    return {**_text(prompt, b, device), "guidance": guidance,
            "image_embeddings": image.embeddings.to(device, torch.float32)[None].expand(b, -1, -1),
            "latent_indices": _indices(latent_indices, b, device),
            "clean_latents": _batch(clean, b, device), "clean_latent_indices": _indices(idx_clean, b, device),
            "clean_latents_2x": _batch(c2x, b, device), "clean_latent_2x_indices": _indices(idx_2x, b, device),
            "clean_latents_4x": _batch(c4x, b, device), "clean_latent_4x_indices": _indices(idx_4x, b, device)}


@torch.no_grad()
def generate(model, request: FramePackGenerateRequest, progress: Progress | None = None) -> torch.Tensor:
    """-> float32 latents on the model device (the DiT's latent space): the whole video [B, 16, sections·lws + 1,
    H/8, W/8] in time order (start latent first), or [B, 16, 1, H/8, W/8] in one-frame mode.

    `progress(step, total, x0_estimate)` runs after every step of every section (total = sections·steps, x0 of the
    section being sampled); it may raise (ComfyUI interrupt) to cancel."""
    r = request.resolve()
    validate_request(model, r)
    device = torch.device(r.device) if r.device is not None else execution_device(model)
    b = r.batch_size
    h, w = r.latent_size()
    frames = r.section_frames()
    shift = float(r.shift) if r.shift is not None else dynamic_shift(frames, h, w)
    # the guidance embedder sees the value the model's dtype holds (Musubi / official: bf16 9984 for 10.0)
    guidance_value = float(torch.tensor(float(r.embedded_guidance) * GUIDANCE_EMBED_SCALE).to(model.compute_dtype))
    guidance = torch.full((b,), guidance_value, device=device)
    noise = _Noise(r.seed, b, r.noise_device, device)
    total = r.sections * r.steps
    done = [0]                       # steps finished in earlier sections

    def run(cond: dict, prompt_uncond: dict | None) -> torch.Tensor:
        solver = make_solver(r.solver, r.steps, shift)
        cache = MagCache(r.magcache, solver.steps) if r.magcache is not None else None   # fresh per section
        velocity = _velocity(model, cond, prompt_uncond, r, cache)
        offset = done[0]
        done[0] += solver.steps

        def section_progress(step, _steps, x0):
            if progress is not None:
                progress(offset + step, total, x0)
        return run_sampler(solver, noise.draw((LATENT_CHANNELS, frames, h, w)), velocity, section_progress)

    def uncond_of(cond: dict) -> dict | None:
        if not r.uses_cfg:
            return None
        return {**cond, **_text(r.negative_prompt, b, device)}

    with eval_mode(model):   # adapter dropout never applies to samples
        if r.one_frame is not None:
            return _one_frame(r, run, uncond_of, guidance, b, device, h, w)
        plans = r.plans()
        ref = torch.zeros(b, LATENT_CHANNELS, 1, h, w, device=device)
        end = None if r.end_image is None else _batch(r.end_image.latent[None], b, device)
        # F1's history starts with section 0's start latent (Musubi: the image given for index 0; the lists here are
        # already resolved, so a "-N" SPEC naming section 0 counts too)
        history = S.initial_history(ref, end, f1=r.f1, start_latent=_batch(r.image[0].latent[None], b, device))
        for plan in plans:
            image, prompt = r.image[plan.index], r.prompt[plan.index]
            start = _batch(image.latent[None], b, device)                      # [B, 16, 1, h, w]
            near, h2x, h4x = S.split_history(history, r.f1)
            cond = _section_cond(r, prompt, image, guidance, b, device, torch.cat([start, near], dim=2),
                                 plan.clean_latent_indices, h2x, plan.clean_latent_2x_indices, h4x,
                                 plan.clean_latent_4x_indices, plan.latent_indices)
            generated = run(cond, uncond_of(cond))
            history = S.update_history(history, generated, plan, start_latent=start)
        n = S.total_latent_frames(r.sections, r.latent_window_size)
        return history[:, :, -n:] if r.f1 else history[:, :, :n]


def _one_frame(r: FramePackGenerateRequest, run, uncond_of, guidance, b, device, h, w) -> torch.Tensor:
    """Musubi's generate_with_one_frame_inference: one 1-frame run at `target_index` over the control latents."""
    masks = [None if m is None else m.reshape(1, 1, 1, h, w) for m in r.control_masks]
    inputs = S.one_frame_inputs(r.one_frame, [c[None] for c in r.control_latents], (1, LATENT_CHANNELS, h, w),
                                r.latent_window_size, masks)
    idx = inputs.indices
    cond = _section_cond(r, r.prompt[0], r.image[0], guidance, b, device, inputs.clean_latents,
                         idx.clean_latent_indices, inputs.clean_latents_2x, idx.clean_latent_2x_indices,
                         inputs.clean_latents_4x, idx.clean_latent_4x_indices, idx.latent_indices)
    return run(cond, uncond_of(cond))


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------

def soft_append(history: torch.Tensor, current: torch.Tensor, overlap: int) -> torch.Tensor:
    """[B, C, T, H, W] clips joined on time; the last `overlap` frames of `history` cross-fade linearly (weights 1
    -> 0) into the first `overlap` of `current` (Musubi's soft_append_bcthw)."""
    if overlap <= 0:
        return torch.cat([history, current], dim=2)
    if history.shape[2] < overlap or current.shape[2] < overlap:
        raise invalid("soft append overlap", overlap, f"at most {min(history.shape[2], current.shape[2])} frames")
    wts = torch.linspace(1, 0, overlap, dtype=history.dtype, device=history.device).view(1, 1, -1, 1, 1)
    blended = wts * history[:, :, -overlap:] + (1 - wts) * current[:, :, :overlap].to(history)
    return torch.cat([history[:, :, :-overlap], blended, current[:, :, overlap:].to(history)], dim=2)


def section_chunks(latent_frames: int, latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE
                   ) -> list[tuple[int, int]]:
    """Musubi's per-section decode windows over T = n·lws + 1 latents, time order: [0, 2·lws + 1), then
    [1 + k·lws, 1 + (k + 2)·lws) for k = 1..n−1, cut at T (each window: two sections, so neighbours share one
    section, whose 4·lws − 3 frames are blended)."""
    lws = S._check_lws(latent_window_size)
    if not _is_int(latent_frames) or latent_frames < 1 + lws or (latent_frames - 1) % lws:
        raise invalid("latents frames", latent_frames, f"sections·{lws} + 1 latent frames (a FramePack video with "
                                                       f"latent_window_size {lws})")
    n = (latent_frames - 1) // lws
    chunks = [(0, min(2 * lws + 1, latent_frames))]
    chunks += [(1 + k * lws, min(1 + (k + 2) * lws, latent_frames)) for k in range(1, n)]
    return chunks


def decode_sections(vae, latents: torch.Tensor, latent_window_size: int = S.DEFAULT_LATENT_WINDOW_SIZE, *,
                    bulk: bool = False, one_frame: bool = False, **tiling) -> torch.Tensor:
    """DiT latents [B, 16, T, h, w] (or [16, T, h, w]) -> frames [B, 3, F, 8h, 8w] float32 on the CPU in [-1, 1].

    Default (Musubi without --bulk_decode): the windows of `section_chunks` decoded one by one and joined from the
    back with `soft_append` over 4·lws − 3 frames (the frames two windows share); F = 4(T − 1) + 1. `bulk`: one
    decode of everything. `one_frame`: each latent frame decoded alone (one-frame outputs; F = T). `tiling`: the
    VAE's `decode` options (tile_size, tile_overlap, temporal_tile, temporal_overlap). Each decode is clamped to
    [-1, 1] before blending (Musubi blends the raw decodes and clamps when saving)."""
    if isinstance(latents, torch.Tensor) and latents.ndim == 4:
        latents = latents[None]
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != LATENT_CHANNELS:
        raise invalid("latents", _shape(latents), "[B, 16, T, h, w] FramePack latents")

    def dec(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z, **tiling).float().cpu()

    if one_frame:
        return torch.cat([dec(latents[:, :, i:i + 1]) for i in range(latents.shape[2])], dim=2)
    if bulk:
        return dec(latents)
    chunks = section_chunks(int(latents.shape[2]), latent_window_size)
    overlap = 4 * int(latent_window_size) - 3
    pixels = None
    for lo, hi in reversed(chunks):
        current = dec(latents[:, :, lo:hi])
        pixels = current if pixels is None else soft_append(current, pixels, overlap)
    return pixels


__all__ = ["FramePackPrompt", "FramePackImage", "prepare_image", "FramePackGenerateRequest", "dynamic_shift",
           "validate_request", "generate", "rescale_guidance", "soft_append", "section_chunks", "decode_sections",
           "DEFAULT_STEPS", "DEFAULT_EMBEDDED_GUIDANCE", "DEFAULT_VIDEO_SECONDS"]
