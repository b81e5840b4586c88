"""The Wan 2.1 family as the generic engine sees it (`engine.families.Family`): Wan's capability rules live here,
once. Everything else of the family is in this folder: the DiT (`dit`), VAE (`vae`), checkpoint detection
(`detect`), loaders (`loader`), tiny presets (`presets`), generation (`pipeline`), caches (`cache`), LoRA names
(`names`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import invalid
from ..family import Fp8Spec, LoRASpec
from . import cache, cache22, experts, names, pipeline
from .detect import TI2V_CHANNELS, model_kind

LATENT_CHANNELS = 16
LATENT_TASKS = ("t2v", "i2v", "fun_control")   # the latent-caching tasks
CONTROL_CHANNELS = 32      # Fun-Control y: 16 control + 16 image latent channels
I2V_CHANNELS = 20          # I2V/FLF2V y: 4 mask + 16 image latent channels


def needs_clip(config) -> bool:
    """Does this DiT take CLIP vision tokens? (2.1 I2V/FLF2V; Fun-Control feeds zeros when there is no image; the
    Wan 2.2 I2V A14B experts have the I2V channels but no CLIP branch)."""
    return (config.model_type in ("i2v", "flf2v") and config.in_dim - config.out_dim == I2V_CHANNELS
            and bool(getattr(config, "has_image_input", True)))


def conditioning_channels(config) -> int:
    return int(config.in_dim) - int(config.out_dim)


class WanFamily:
    name = "wan"
    display_name = "Wan 2.1"
    cache_arch = cache.ARCH
    cache_arches = (cache.ARCH, cache22.ARCH)   # 2.1 VAE latents, 2.2 VAE latents (TI2V-5B); text always "wan"
    lora = LoRASpec(
        block_lists=("blocks",), default_exclude=names.DEFAULT_EXCLUDE, base_model_version="wan",
        architecture="wan2.1/lora", implementation="https://github.com/Wan-Video/Wan2.1",
        network_module="networks.lora_wan", underscore_to_name=names.underscore_to_name,
        diffusers_to_name=names.diffusers_to_name, name_to_diffusers=names.name_to_diffusers,
        diffusers_marker=names.DIFFUSERS_MARKER)
    # Musubi's Wan fp8 targets: Linear layers under `blocks.` minus these substrings
    fp8 = Fp8Spec(include=("blocks.",), exclude=("norm", "patch_embedding", "text_embedding", "time_embedding",
                                                 "time_projection", "head", "modulation", "img_emb"))

    # --- models ---------------------------------------------------------------------------------------------------
    @staticmethod
    def load_dit(source, dtype: torch.dtype | None = None, device="cpu", fp8: str | None = None) -> nn.Module:
        """The DiT of a file or preset (the headless trainer: engine/train.py)."""
        from .loader import load_wan_dit

        return load_wan_dit(source, dtype=dtype, device=device, fp8=fp8)

    @staticmethod
    def block_lists(model: nn.Module) -> list[nn.ModuleList]:
        return [model.blocks]

    # --- data -----------------------------------------------------------------------------------------------------
    @staticmethod
    def cache_adapter(**encoders_and_options) -> cache.WanCacheAdapter:
        return cache.WanCacheAdapter(**encoders_and_options)

    @staticmethod
    def planning_adapter(latent: dict | None):
        """Without encoders, the clip planning (fps, buckets) of a dataset whose latent cache `latent` describes:
        the Wan 2.2 VAE's (24 fps, 32-pixel buckets) for TI2V-5B caches."""
        if (latent or {}).get("channels") == TI2V_CHANNELS:
            return cache22.Wan22CacheAdapter(None, i2v=bool(latent.get("i2v")))
        return cache.WanCacheAdapter()

    @staticmethod
    def latent_cache_adapter(vae, task: str, clip_vision=None, **options) -> cache.WanCacheAdapter:
        """t2v: latents only; i2v: + first-frame conditioning, and CLIP features when CLIP vision is given (Wan 2.1
        I2V needs them; the Wan 2.2 I2V A14B experts take none); fun_control: + control latents, with CLIP vision
        also the start image (I2V Fun-Control). A cache without CLIP is refused for a model that needs it when
        training starts (`check_batch`). The Wan 2.2 VAE (TI2V-5B): its own rules (`cache22.latent_cache_adapter`)."""
        if getattr(vae, "latent_channels", LATENT_CHANNELS) == TI2V_CHANNELS:
            return cache22.latent_cache_adapter(vae, task, clip_vision, **options)
        if options:   # the one-frame history options are FramePack's
            raise invalid("one_frame_history", sorted(options), "2x and 4x (the default) for Wan 2.1 caches")
        if task not in LATENT_TASKS:
            raise invalid("task", task, f"one of {list(LATENT_TASKS)} for Wan 2.1")
        if task == "t2v" and clip_vision is not None:
            raise invalid("clip_vision", "connected", "no CLIP vision for task t2v (pick i2v or disconnect it)")
        return cache.WanCacheAdapter(vae=vae, clip=clip_vision, i2v=task == "i2v", control=task == "fun_control")

    @staticmethod
    def cache_requirements(model: nn.Module, **identities) -> "cache.CacheRequirements":
        """T2V: latents + text; I2V/FLF2V also image latents and CLIP; Fun-Control control latents."""
        cfg = model.config
        if model_kind(cfg) == "ti2v":   # T2V or I2V: the cache decides (its first-frame latents), both train
            return cache22.cache_requirements(text_dim=cfg.text_dim, **identities)
        extra = conditioning_channels(cfg)
        return cache.cache_requirements(text_dim=cfg.text_dim, i2v=extra == I2V_CHANNELS, clip=needs_clip(cfg),
                                        control=extra == CONTROL_CHANNELS, **identities)

    @staticmethod
    def described_cache_requirements(latent: dict | None, text: dict | None, text_dim: int | None = None):
        lat, txt = latent or {}, text or {}
        if lat.get("channels") == TI2V_CHANNELS:
            return cache22.cache_requirements(text_dim=text_dim, i2v=bool(lat.get("i2v")), vae_identity=lat.get("vae"),
                                              text_identity=txt.get("text_encoder"))
        return cache.cache_requirements(text_dim=text_dim, i2v=bool(lat.get("i2v")), clip="clip" in lat,
                                        control=bool(lat.get("control")), vae_identity=lat.get("vae"),
                                        clip_identity=lat.get("clip"), text_identity=txt.get("text_encoder"))

    collate = staticmethod(cache22.collate)   # the Wan batch, TI2V's first-frame latents named apart

    # --- training -------------------------------------------------------------------------------------------------
    @staticmethod
    def check_batch(model: nn.Module, batch: dict) -> None:
        """Is the cache made for this DiT? (latent channels, text width, image conditioning channels)."""
        cfg = model.config
        lat = batch.get("latents") if isinstance(batch, dict) else None
        if not isinstance(lat, torch.Tensor) or lat.ndim != 5:
            raise invalid("dataset latents", getattr(lat, "shape", type(lat).__name__),
                          "cached video latents [B, 16, F, H, W]")
        variant = cfg.variant
        if lat.shape[1] != cfg.out_dim:
            vae = {TI2V_CHANNELS: "the Wan 2.2 VAE", LATENT_CHANNELS: "the Wan 2.1 VAE"}
            raise invalid("dataset latents", f"{tuple(lat.shape)} ({vae.get(lat.shape[1], 'another VAE')})",
                          f"{cfg.out_dim}-channel latents cached with {vae.get(cfg.out_dim, 'the VAE of ' + variant)} "
                          f"for {variant}: re-cache the dataset with that VAE")
        ctx = batch.get("context")
        if ctx is None:
            raise invalid("dataset text cache", "missing", f"cached text embeddings for {variant}: cache the captions")
        widths = {c.shape[-1] for c in (ctx if isinstance(ctx, (list, tuple)) else [ctx])}
        if widths != {cfg.text_dim}:
            raise invalid("dataset text embeddings", f"width {sorted(widths)}",
                          f"{cfg.text_dim}-wide embeddings (the text encoder of {variant}): re-cache the captions")
        if model_kind(cfg) == "ti2v":
            check_first_frame(cfg, batch)
        extra = conditioning_channels(cfg)
        if extra > 0:
            y = build_y(batch, extra)
            if y is None or y.shape[1] != extra:
                raise invalid("dataset image conditioning", None if y is None else tuple(y.shape),
                              f"{extra} conditioning channels (y) for {variant}: cache the dataset for this task "
                              "(I2V image latents / Fun-Control control latents)")
            if needs_clip(cfg) and batch.get("clip_fea") is None:
                raise invalid("dataset CLIP features", "missing", f"cached CLIP vision features for {variant}")
        one_frame = batch.get("frame_indices") is not None
        if cfg.has_flf_pos_emb and not one_frame:
            raise invalid("dataset for the FLF2V model", "a video cache (first-frame conditioning)",
                          f"a one-frame intermediate-frame dataset for {variant} (image dataset with two control "
                          "images, e.g. fp_1f_clean_indices = [0, 2] and fp_1f_target_index = 1): FLF2V video "
                          "training is not supported, as in Musubi Tuner (its caches hold the first frame only)")
        clip = batch.get("clip_fea")
        if clip is not None and getattr(cfg, "has_image_input", False):
            tokens = (pipeline.one_frame_clip(cfg, clip) if one_frame else clip).shape[-2]
            if tokens != cfg.image_tokens:
                what = ("two control images per item (the FLF2V model takes both images' CLIP features; "
                        "re-cache the one-frame dataset with two controls)" if cfg.has_flf_pos_emb and one_frame
                        else "re-cache the dataset with the CLIP vision encoder")
                raise invalid("dataset CLIP features", f"{tokens} tokens", f"{cfg.image_tokens} tokens for "
                              f"{variant}: {what}")

    @staticmethod
    def training_forward(model: nn.Module, batch: dict, noisy: torch.Tensor, t: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v̂ = DiT(x_t, t, context, clip_fea, y); one-frame batches learn only the target slot (the controls are
        given through y), with the RoPE frame positions fed to the DiT as at inference (Musubi does not)."""
        device = noisy.device
        if model_kind(model.config) == "ti2v":
            return ti2v_forward(model, batch, noisy, t, target)
        frame_indices, slot = one_frame_inputs(batch, noisy.shape[2])
        context = batch["context"]
        context = [c.to(device) for c in context] if isinstance(context, (list, tuple)) else context.to(device)
        clip_fea = batch.get("clip_fea")
        if frame_indices is not None:   # one-frame caches hold every control image's CLIP tokens, as inference
            clip_fea = pipeline.one_frame_clip(model.config, clip_fea)
        extra = conditioning_channels(model.config)
        y = build_y(batch, extra) if extra > 0 else None
        kw = {} if frame_indices is None else {"frame_indices": frame_indices.to(device)}
        pred = model(noisy, t, context, clip_fea=None if clip_fea is None else clip_fea.to(device),
                     y=None if y is None else y.to(device), **kw)
        if slot is not None:
            pred, target = pred[:, :, slot:slot + 1], target[:, :, slot:slot + 1]
        return pred, target

    # --- sampling -------------------------------------------------------------------------------------------------
    @staticmethod
    def sampling_request(prompt) -> pipeline.WanGenerateRequest:
        task = prompt.task or ("t2i" if prompt.frames == 1 else "t2v")
        neg = prompt.negative_context
        if neg is None:
            neg = torch.zeros(1, prompt.context.shape[-1])
        return pipeline.WanGenerateRequest(
            task=task, context=prompt.context, negative_context=neg, width=prompt.width, height=prompt.height,
            frames=prompt.frames, steps=prompt.steps, shift=prompt.shift, guidance_scale=prompt.guidance_scale,
            seed=prompt.seed, clip_fea=prompt.clip_fea, conditioning=prompt.conditioning)

    @staticmethod
    def check_sampling(model: nn.Module, request) -> None:
        pipeline.validate_request(model, request.resolve(model.config))

    @staticmethod
    def sample(model: nn.Module, request, progress=None) -> torch.Tensor:
        return pipeline.generate(model, request, progress)

    @staticmethod
    def expert_pair(high: nn.Module, low: nn.Module, boundary: float, mode: str = "both", device=None,
                    residency=None) -> experts.WanExperts:
        """Two trained experts (Wan 2.2 A14B) as the pipeline's pair: what `sample` takes for validation samples
        during two-expert training (the generic trainer's `ExpertPair.sampling_target`)."""
        return experts.WanExperts(low=low, high=high, boundary=boundary, mode=mode, device=device,
                                  residency=residency)

    @staticmethod
    def latent_preview(latents: torch.Tensor) -> torch.Tensor:
        return pipeline.latent_to_rgb_preview(latents)


def build_y(batch: dict, channels: int) -> torch.Tensor | None:
    """The DiT's channel-concatenated conditioning. Fun-Control: [control(16), image latents(16)], the inference
    layout of `pipeline.prepare_fun_control`: the image part is latent frame 0 of the cached I2V latents (mask
    channels dropped; VideoX-Fun keeps only the first frame) and zeros elsewhere, or all zeros without I2V latents."""
    y, control = batch.get("y"), batch.get("control_latents")
    if control is None:
        return y
    image = torch.zeros_like(control)
    if y is not None:
        image[:, :, :1] = y[:, -LATENT_CHANNELS:, :1].to(control.dtype)
    out = torch.cat([control, image], dim=1)
    return out if out.shape[1] == channels else out[:, :channels]


def check_first_frame(cfg, batch: dict) -> None:
    """A TI2V I2V batch's clean first frame fits its latents: [B, 48, 1, h, w], and the clip has frames after it."""
    lat, first = batch["latents"], batch.get("first_frame")
    if first is None:
        return
    want = (lat.shape[0], cfg.out_dim, 1, *lat.shape[3:])
    if tuple(first.shape) != want:
        raise invalid("dataset first-frame latents", tuple(first.shape), f"{list(want)} (re-cache the dataset)")
    if lat.shape[2] < 2:
        raise invalid("dataset latents", tuple(lat.shape), "clips of 2+ latent frames (5+ frames) for image-to-video "
                      "training: frame 0 is the given image (re-cache the images with task t2v)")


def ti2v_forward(model: nn.Module, batch: dict, noisy: torch.Tensor, t: torch.Tensor,
                 target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TI2V-5B. Text-to-video batches: v̂ = DiT(x_t, t [B], context). Image-to-video batches (cached with task i2v:
    `first_frame`): as inference (`pipeline.generate`), latent frame 0 of x_t is the clean image latent and its tokens
    run at t = 0 (per-token t, `pipeline.first_frame_timesteps`); frame 0 is given, not predicted, so the loss covers
    frames 1.. only. The official Wan2.2 repo ships no training code and Musubi Tuner no TI2V-5B; this follows
    DiffSynth-Studio's TI2V-5B training (diffsynth/diffusion/loss.py `FlowMatchSFTLoss`: first frame put back after
    noising, prediction and target cut to frames 1..; `model_fn_wan_video`: zero timesteps on frame 0's tokens)."""
    device = noisy.device
    context = batch["context"]
    context = [c.to(device) for c in context] if isinstance(context, (list, tuple)) else context.to(device)
    first = batch.get("first_frame")
    if first is None:
        return model(noisy, t, context), target
    noisy = torch.cat([first.to(device, noisy.dtype), noisy[:, :, 1:]], dim=2)          # [B, 48, F, h, w]
    pt, ph, pw = model.config.patch_size
    grid = (noisy.shape[2] // pt, noisy.shape[3] // ph, noisy.shape[4] // pw)
    pred = model(noisy, pipeline.first_frame_timesteps(t, grid), context)              # t [B, f*h*w]
    return pred[:, :, 1:], target[:, :, 1:]


def one_frame_inputs(batch: dict, slots: int) -> tuple[torch.Tensor | None, int | None]:
    """One-frame batches (`frame_indices` [B, n], `target_slot` [B]): the DiT's RoPE frame positions [n] and the
    target slot; (None, None) for normal batches."""
    fi, slot = batch.get("frame_indices"), batch.get("target_slot")
    if fi is None and slot is None:
        return None, None
    if fi is None or slot is None:
        raise invalid("one-frame batch", sorted(k for k in ("frame_indices", "target_slot") if k in batch),
                      "both frame_indices and target_slot (re-cache the one-frame dataset)")
    fi, slot = torch.as_tensor(fi).long().reshape(-1, slots), torch.as_tensor(slot).long().reshape(-1)
    if (fi != fi[0]).any() or (slot != slot[0]).any():
        raise invalid("one-frame batch frame_indices", fi.tolist(), "the same indices for every sample of a batch")
    s = int(slot[0])
    if not 0 <= s < slots:
        raise invalid("one-frame target_slot", s, f"a latent slot 0..{slots - 1}")
    return fi[0], s


FAMILY = WanFamily()
