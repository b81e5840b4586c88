"""FramePack as the generic engine sees it (`engine.families.Family`). The rest of the family is in this folder:
the packed DiT (`dit`), checkpoint detection (`detect`), loaders (`loader`), presets, section schedules (`sections`),
section caches (`cache`), LoRA names (`names`); its VAE and text encoders are HunyuanVideo's."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...data.encoding import CacheRequirements
from ...errors import invalid
from ..family import Fp8Spec, LoRASpec
from ..hunyuan.pipeline import latent_to_rgb_preview
from . import cache, names, pipeline
from . import sections as S
from .dit import FP8_EXCLUDE, FP8_INCLUDE

# The embedded guidance the distilled DiT trains at: 1.0, embedded x 1000 as at inference (see HunyuanVideo's family).
TRAINING_GUIDANCE = 1.0
SECTION_INPUTS = ("latent_indices", "clean_latents", "clean_latent_indices", "clean_latents_2x",
                  "clean_latent_2x_indices", "clean_latents_4x", "clean_latent_4x_indices", "image_embeddings")


class FramePackFamily:
    name = "framepack"
    display_name = "FramePack"
    cache_arch = cache.ARCH
    lora = LoRASpec(
        block_lists=names.BLOCK_LISTS, default_exclude=names.DEFAULT_EXCLUDE, base_model_version="framepack",
        architecture="framepack/lora", implementation="https://github.com/lllyasviel/FramePack",
        network_module="networks.lora_framepack", underscore_to_name=names.underscore_to_name,
        name_to_diffusers=names.name_to_diffusers, adopt=names.adopt_hunyuan)
    fp8 = Fp8Spec(include=FP8_INCLUDE, exclude=FP8_EXCLUDE)

    # --- models ---------------------------------------------------------------------------------------------------
    @staticmethod
    def load_dit(source, dtype: torch.dtype | None = None, device="cpu", fp8: str | None = None) -> nn.Module:
        """The DiT of a file or preset (the headless trainer: engine/train.py)."""
        from .loader import load_framepack_dit

        return load_framepack_dit(source, dtype=dtype, device=device, fp8=fp8)

    @staticmethod
    def block_lists(model: nn.Module) -> list[nn.ModuleList]:
        return [model.transformer_blocks, model.single_transformer_blocks]

    # --- data -----------------------------------------------------------------------------------------------------
    @staticmethod
    def cache_adapter(**encoders_and_options) -> cache.FramePackCacheAdapter:
        return cache.FramePackCacheAdapter(**encoders_and_options)

    @staticmethod
    def latent_cache_adapter(vae, task: str, clip_vision=None, **options) -> cache.FramePackCacheAdapter:
        """i2v: Musubi's section caches (the original FramePack layout); f1: FramePack-F1's. Image datasets with
        control images become one-frame caches either way. The SigLIP image encoder comes in as `clip_vision`."""
        if task not in ("i2v", "f1"):
            raise invalid("task", task, "i2v (FramePack section caches) or f1 (FramePack-F1 section caches) for "
                                        "FramePack")
        if clip_vision is None:
            raise invalid("clip_vision", None, "the SigLIP image encoder (Musubi FramePack Image Encoder Loader): "
                                               "every FramePack cache holds the start image's embedding")
        return cache.FramePackCacheAdapter(vae=vae, image_encoder=clip_vision, f1=task == "f1", **options)

    @staticmethod
    def cache_requirements(model: nn.Module, **identities) -> CacheRequirements:
        return FramePackFamily.described_cache_requirements(None, None, model.config.text_dim, **identities)

    @staticmethod
    def described_cache_requirements(latent: dict | None, text: dict | None, text_dim: int | None = None,
                                     **identities) -> CacheRequirements:
        lat, txt = latent or {}, text or {}
        ids = {k: v for k, v in (("vae", lat.get("vae")), ("image_encoder", lat.get("image_encoder")),
                                 ("text_encoder", txt.get("text_encoder"))) if v}
        ids.update({k: v for k, v in identities.items() if v})
        return CacheRequirements(cache.ARCH, cache.LATENT_CHANNELS, text_dim,
                                 ("latents", "latent_indices", "latents_clean", "clean_latent_indices",
                                  "image_embeddings", "llama_vec", "llama_attention_mask", "clip_l_pooler"),
                                 None, ids or None, text_key="llama_vec")

    collate = staticmethod(cache.family_collate)

    # --- training -------------------------------------------------------------------------------------------------
    @staticmethod
    def check_batch(model: nn.Module, batch: dict) -> None:
        """Is the cache a FramePack section / one-frame cache made for this DiT?"""
        cfg = model.config
        lat = batch.get("latents") if isinstance(batch, dict) else None
        if not isinstance(lat, torch.Tensor) or lat.ndim != 5 or lat.shape[1] != cfg.out_channels:
            raise invalid("dataset latents", getattr(lat, "shape", type(lat).__name__),
                          f"FramePack section latents [B, {cfg.out_channels}, F, H, W]: cache the dataset with a "
                          "FramePack VAE and image encoder")
        missing = [k for k in ("latent_indices", "clean_latents", "clean_latent_indices", "image_embeddings")
                   if batch.get(k) is None]
        if missing:
            raise invalid("dataset cache", f"missing {missing}", "FramePack section caches (re-cache the dataset "
                                                                 "with a FramePack VAE)")
        if batch["image_embeddings"].shape[-1] != cfg.image_dim:
            raise invalid("dataset image embeddings", tuple(batch["image_embeddings"].shape),
                          f"[B, tokens, {cfg.image_dim}] SigLIP embeddings: re-cache with the model's image encoder")
        states, pooled = batch.get("text_states"), batch.get("pooled")
        if states is None or pooled is None:
            raise invalid("dataset text cache", "missing", "cached LLaMA and CLIP-L embeddings: cache the captions")
        if states.ndim != 3 or states.shape[-1] != cfg.text_dim:
            raise invalid("dataset text embeddings", tuple(states.shape), f"[B, tokens, {cfg.text_dim}]")
        if pooled.shape[-1] != cfg.text_pool_dim:
            raise invalid("dataset CLIP-L embeddings", tuple(pooled.shape), f"[B, {cfg.text_pool_dim}]")

    @staticmethod
    def training_forward(model: nn.Module, batch: dict, noisy: torch.Tensor, t: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v̂ = DiT(section x_t at its latent indices, history latents at theirs, SigLIP start image, LLaMA + CLIP-L
        text, guidance 1.0 x 1000)."""
        device = noisy.device
        guidance = torch.full((noisy.shape[0],), TRAINING_GUIDANCE * pipeline.GUIDANCE_EMBED_SCALE, device=device)
        section = {k: (None if batch.get(k) is None else batch[k].to(device)) for k in SECTION_INPUTS}
        mask = batch.get("text_mask")
        pred = model(noisy, t, batch["text_states"].to(device), None if mask is None else mask.to(device),
                     batch["pooled"].to(device), guidance=guidance, **section)
        return pred, target

    # --- sampling -------------------------------------------------------------------------------------------------
    @staticmethod
    def sampling_request(prompt) -> pipeline.FramePackGenerateRequest:
        """A validation prompt: `conditioning` is the start image (`pipeline.FramePackImage`, Musubi FramePack Image
        Encode); `frames` asks for enough sections of the default window to cover them (at least one: 37 frames);
        `guidance_scale` is real CFG (None: 1), `embedded_guidance` the distilled scale (None: 10)."""
        lws = S.DEFAULT_LATENT_WINDOW_SIZE
        sections = max(1, math.ceil((int(prompt.frames) - 1) / (4 * lws)))
        negative = None
        if prompt.negative_context is not None:
            negative = pipeline.FramePackPrompt(prompt.negative_context, prompt.negative_pooled)
        return pipeline.FramePackGenerateRequest(
            prompt=pipeline.FramePackPrompt(prompt.context, prompt.pooled), image=prompt.conditioning,
            negative_prompt=negative, sections=sections, latent_window_size=lws, width=prompt.width,
            height=prompt.height, steps=prompt.steps, shift=prompt.shift,
            guidance_scale=1.0 if prompt.guidance_scale is None else prompt.guidance_scale,
            embedded_guidance=prompt.embedded_guidance, seed=prompt.seed)

    @staticmethod
    def check_sampling(model: nn.Module, request) -> None:
        pipeline.validate_request(model, request.resolve())

    @staticmethod
    def sample(model: nn.Module, request, progress=None) -> torch.Tensor:
        return pipeline.generate(model, request, progress)

    @staticmethod
    def latent_preview(latents: torch.Tensor) -> torch.Tensor:
        return latent_to_rgb_preview(latents)     # the HunyuanVideo VAE's latent space


FAMILY = FramePackFamily()
