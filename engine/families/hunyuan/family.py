"""HunyuanVideo as the generic engine sees it (`engine.families.Family`): the family's capability rules live here,
once. Everything else of the family is in this folder: the DiT (`dit`), VAE (`vae`), checkpoint detection
(`detect`), loaders (`loader`), tiny presets (`presets`), generation (`pipeline`), caches (`cache`), LoRA names
(`names`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import invalid
from ..family import Fp8Spec, LoRASpec
from . import cache, names, pipeline
from .dit import FP8_EXCLUDE, FP8_INCLUDE

# The embedded guidance a guidance-distilled DiT is trained at: 1.0, given to the embedder x 1000 as at inference.
# Musubi's trainer passes `--guidance_scale` (default 1.0) *unscaled* (an embedding of 0.001, reference §8.2); this
# pack does not copy that.
TRAINING_GUIDANCE = 1.0


class HunyuanFamily:
    name = "hunyuan"
    display_name = "HunyuanVideo"
    cache_arch = cache.ARCH
    lora = LoRASpec(
        block_lists=("double_blocks", "single_blocks"), default_exclude=names.DEFAULT_EXCLUDE,
        base_model_version="hunyuan_video", architecture="hunyuan-video/lora",
        implementation="https://github.com/Tencent/HunyuanVideo", network_module="networks.lora",
        underscore_to_name=names.underscore_to_name, diffusers_to_name=names.diffusers_to_name,
        name_to_diffusers=names.name_to_diffusers, diffusers_marker=names.DIFFUSERS_MARKER,
        fused_to_diffusers=names.fused_to_diffusers, diffusers_to_fused=names.diffusers_to_fused)
    fp8 = Fp8Spec(include=FP8_INCLUDE, exclude=FP8_EXCLUDE)

    # --- models ---------------------------------------------------------------------------------------------------
    @staticmethod
    def load_dit(source, dtype: torch.dtype | None = None, device="cpu", fp8: str | None = None) -> nn.Module:
        """The DiT of a file or preset (the headless trainer: engine/train.py)."""
        from .loader import load_hunyuan_dit

        return load_hunyuan_dit(source, dtype=dtype, device=device, fp8=fp8)

    @staticmethod
    def block_lists(model: nn.Module) -> list[nn.ModuleList]:
        return [model.double_blocks, model.single_blocks]

    # --- data -----------------------------------------------------------------------------------------------------
    @staticmethod
    def cache_adapter(**encoders_and_options) -> cache.HunyuanCacheAdapter:
        return cache.HunyuanCacheAdapter(**encoders_and_options)

    @staticmethod
    def latent_cache_adapter(vae, task: str, clip_vision=None, **options) -> cache.HunyuanCacheAdapter:
        """Latents only (task t2v): T2V and SkyReels I2V train from the same cache (I2V takes the clip's own first
        latent frame, as Musubi), and no image encoder is used."""
        if options:   # the one-frame history options are FramePack's
            raise invalid("one_frame_history", sorted(options), "2x and 4x (the default) for HunyuanVideo caches")
        if task != "t2v":
            raise invalid("task", task, "t2v for HunyuanVideo: its latent cache holds the video latents only, and "
                                        "SkyReels I2V trains from that same cache (the clip's first frame is its "
                                        "start image)")
        if clip_vision is not None:
            raise invalid("clip_vision", "connected", "nothing for HunyuanVideo (it uses no CLIP vision features): "
                                                      "disconnect it")
        return cache.HunyuanCacheAdapter(vae=vae)

    @staticmethod
    def cache_requirements(model: nn.Module, **identities) -> "cache.CacheRequirements":
        """Latents + LLM states/mask + CLIP-L pooled, for T2V and SkyReels I2V alike (I2V uses the clip's frame 0)."""
        return cache.cache_requirements(text_dim=model.config.text_dim, **identities)

    @staticmethod
    def described_cache_requirements(latent: dict | None, text: dict | None, text_dim: int | None = None):
        lat, txt = latent or {}, text or {}
        return cache.cache_requirements(text_dim=text_dim, vae_identity=lat.get("vae"),
                                        text_identity=txt.get("text_encoder"),
                                        text_2_identity=txt.get("text_encoder_2"))

    collate = staticmethod(cache.HunyuanCacheAdapter.collate)

    # --- training -------------------------------------------------------------------------------------------------
    @staticmethod
    def check_batch(model: nn.Module, batch: dict) -> None:
        """Is the cache made for this DiT? (latent channels, LLM width, CLIP-L width)."""
        cfg = model.config
        variant = cfg.variant
        lat = batch.get("latents") if isinstance(batch, dict) else None
        if not isinstance(lat, torch.Tensor) or lat.ndim != 5:
            raise invalid("dataset latents", getattr(lat, "shape", type(lat).__name__),
                          "cached video latents [B, 16, F, H, W]")
        if lat.shape[1] != cfg.out_channels:
            raise invalid("dataset latents", tuple(lat.shape),
                          f"{cfg.out_channels}-channel latents cached with the HunyuanVideo VAE: re-cache the dataset")
        states, pooled = batch.get("text_states"), batch.get("pooled")
        if states is None or pooled is None:
            missing = [n for n, v in (("LLM states", states), ("CLIP-L pooled", pooled)) if v is None]
            raise invalid("dataset text cache", f"missing {missing}",
                          f"cached LLaVA-LLaMA-3 and CLIP-L embeddings for {variant}: cache the captions")
        if states.ndim != 3 or states.shape[-1] != cfg.text_dim:
            raise invalid("dataset text embeddings", tuple(states.shape),
                          f"[B, tokens, {cfg.text_dim}] (the LLM of {variant}): re-cache the captions")
        if pooled.shape[-1] != cfg.text_pool_dim:
            raise invalid("dataset CLIP-L embeddings", tuple(pooled.shape),
                          f"[B, {cfg.text_pool_dim}] (the CLIP-L of {variant}): re-cache the captions")
        mask = batch.get("text_mask")
        if mask is not None and not bool(mask.bool().any(dim=1).all()):
            raise invalid("dataset text mask", "a caption with no real token", "at least one token per caption")

    @staticmethod
    def training_forward(model: nn.Module, batch: dict, noisy: torch.Tensor, t: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v̂ = DiT(x_t, t, LLM states + mask, CLIP-L pooled, guidance 1.0 x 1000 on a distilled DiT). SkyReels I2V
        (32 input channels): y = the clean latents' first frame, zeros elsewhere (Musubi's `--dit_in_channels 32`)."""
        device = noisy.device
        cfg = model.config
        mask = batch.get("text_mask")
        guidance = None
        if cfg.guidance_embed:
            guidance = torch.full((noisy.shape[0],), TRAINING_GUIDANCE * pipeline.GUIDANCE_EMBED_SCALE, device=device)
        y = None
        if cfg.in_channels == pipeline.I2V_CHANNELS:
            x0 = batch["latents"].to(device, noisy.dtype)
            y = torch.zeros_like(x0)
            y[:, :, :1] = x0[:, :, :1]
        pred = model(noisy, t, batch["text_states"].to(device), None if mask is None else mask.to(device),
                     batch["pooled"].to(device), guidance=guidance, y=y)
        return pred, target

    # --- sampling -------------------------------------------------------------------------------------------------
    @staticmethod
    def sampling_request(prompt) -> pipeline.HunyuanGenerateRequest:
        """A validation prompt: `context` [L, D] LLM states (real tokens), `pooled` [768] CLIP-L; `guidance_scale` is
        real CFG (1 = none), `embedded_guidance` the distilled scale (None: 6.0 on a distilled DiT)."""
        cond = prompt.conditioning
        task = prompt.task or (cond.kind if cond is not None else ("t2i" if prompt.frames == 1 else "t2v"))
        return pipeline.HunyuanGenerateRequest(
            task=task, context=prompt.context, pooled=prompt.pooled, negative_context=prompt.negative_context,
            negative_pooled=prompt.negative_pooled, width=prompt.width, height=prompt.height, frames=prompt.frames,
            steps=prompt.steps, shift=prompt.shift, guidance_scale=prompt.guidance_scale,
            embedded_guidance=prompt.embedded_guidance, seed=prompt.seed, conditioning=cond)

    @staticmethod
    def check_sampling(model: nn.Module, request) -> None:
        pipeline.validate_request(model, request.resolve())

    @staticmethod
    def sample(model: nn.Module, request, progress=None) -> torch.Tensor:
        return pipeline.generate(model, request, progress)

    @staticmethod
    def latent_preview(latents: torch.Tensor) -> torch.Tensor:
        return pipeline.latent_to_rgb_preview(latents)


FAMILY = HunyuanFamily()
