"""HunyuanVideo caches in Musubi Tuner's layout (`_hv.safetensors`, `_hv_te.safetensors`), so either tool reads the
other's caches: the family's `CacheAdapter`, its cache requirements and batch collation.

Latent file: `latents_{F}x{H}x{W}_{dtype}` [16, F_lat, H/8, W/8]: the *raw* VAE posterior mean, not scaled — Musubi
             stores it so and its trainer multiplies by 0.476986; `collate` does the same, so a batch holds the DiT's
             latents (what the pipeline samples and the VAE's `encode` returns).
Text file:   `llm_{dtype}` [256, 4096] LLaVA-LLaMA-3 states (padded to the template's 256 prompt tokens),
             `llm_mask` [256] int64, `clipL_{dtype}` [768] CLIP-L pooled. (Musubi also writes `clipL_mask` [77], the
             CLIP tokens' mask, which nothing reads; it is not written here and is ignored when present.)
SkyReels I2V trains from these same files: the image latent is the clip's own first latent frame (Musubi).
"""

from __future__ import annotations

import torch

from ...data.encoding import (DTYPE_NAMES, CacheRequirements, Clip, dtype_name, encoder_identity, latent_key,
                              pixels_to_video, weights_placement)
from ...errors import invalid
from .text import HunyuanTextEncoders
from .vae import SCALING_FACTOR  # raw cached latents x this = the DiT's latents

ARCH = "hv"                      # Musubi's architecture short name (full name "hunyuan_video")
LATENT_CHANNELS = 16
TEXT_KEY = "llm"


def cache_requirements(*, text_dim: int | None = 4096, vae_identity: str | None = None,
                       text_identity: str | None = None, text_2_identity: str | None = None) -> CacheRequirements:
    ids = {k: v for k, v in (("vae", vae_identity), ("text_encoder", text_identity),
                             ("text_encoder_2", text_2_identity)) if v}
    return CacheRequirements(ARCH, LATENT_CHANNELS, text_dim, ("latents", "llm", "llm_mask", "clipL"), None,
                             ids or None, text_key=TEXT_KEY)


class HunyuanCacheAdapter:
    """Encoders are loaded objects, each with an `identity` string:
    `vae.encode([B,3,F,H,W] in [-1,1]) -> DiT latents [B,16,F_lat,H/8,W/8]` (x 0.476986; stored divided back),
    `text_encoder.encode(list[str]) -> (states [B, 256, D], mask [B, 256])` (LLaVA-LLaMA-3, video template),
    `text_encoder_2.encode(list[str]) -> pooled [B, 768]` (CLIP-L).
    Pass only the encoders of this run (latents with `vae`, text with both text encoders). `text_encoder` may also be
    the pair a loader node hands on (`text.HunyuanTextEncoders`, text_encoder_2 left out)."""

    arch = ARCH
    target_fps = 24.0            # Musubi's TARGET_FPS_HUNYUAN

    def __init__(self, vae=None, text_encoder=None, text_encoder_2=None, *, dtype: torch.dtype = torch.float16,
                 text_dtype: torch.dtype = torch.float16):
        if dtype not in DTYPE_NAMES or text_dtype not in DTYPE_NAMES:
            raise invalid("cache dtype", (dtype, text_dtype), "float16, bfloat16 or float32")
        if text_encoder_2 is None and isinstance(text_encoder, HunyuanTextEncoders):
            text_encoder, text_encoder_2 = text_encoder.llm, text_encoder.clip
        if (text_encoder is None) != (text_encoder_2 is None):
            raise invalid("HunyuanVideo text encoders", "only one of them",
                          "both the LLaVA-LLaMA-3 and the CLIP-L text encoder (one text file holds both outputs)")
        self.vae, self.text_encoder, self.text_encoder_2 = vae, text_encoder, text_encoder_2
        self.dtype, self.text_dtype = dtype, text_dtype

    def latent_description(self) -> dict | None:
        if self.vae is None:
            return None
        return {"vae": encoder_identity(self.vae, "VAE"), "dtype": dtype_name(self.dtype)}

    def text_description(self) -> dict | None:
        if self.text_encoder is None:
            return None
        return {"text_encoder": encoder_identity(self.text_encoder, "LLaVA-LLaMA-3 text encoder"),
                "text_encoder_2": encoder_identity(self.text_encoder_2, "CLIP-L text encoder"),
                "dtype": dtype_name(self.text_dtype)}

    @torch.no_grad()
    def encode_clip(self, clip: Clip) -> dict[str, torch.Tensor]:
        if self.vae is None:
            raise invalid("HunyuanVideo cache", "no VAE", "a VAE to encode latents")
        if clip.one_frame is not None or clip.control is not None:
            raise invalid("HunyuanVideo cache", "a one-frame or control dataset item",
                          "plain image/video datasets (HunyuanVideo has no one-frame or control training)")
        device, dtype = weights_placement(self.vae)
        latents = self.vae.encode(pixels_to_video(clip.frames, device, dtype))[0]   # [16, F_lat, h, w] scaled
        raw = (latents.float() / SCALING_FACTOR).to("cpu", self.dtype)
        return {latent_key("latents", raw): raw}

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        if self.text_encoder is None:
            raise invalid("HunyuanVideo cache", "no text encoders", "LLaVA-LLaMA-3 and CLIP-L text encoders")
        captions = list(captions)
        states, mask = self.text_encoder.encode(captions)                 # [B, 256, D], [B, 256]
        pooled = self.text_encoder_2.encode(captions)                     # [B, 768]
        for name, t in (("LLM states", states), ("LLM mask", mask), ("CLIP-L pooled", pooled)):
            if t.shape[0] != len(captions):
                raise invalid(f"text encoder output ({name})", tuple(t.shape), f"one row per caption "
                                                                                f"({len(captions)})")
        td = dtype_name(self.text_dtype)
        return [{f"llm_{td}": states[i].detach().to("cpu", self.text_dtype).clone(),
                 "llm_mask": mask[i].detach().to("cpu", torch.int64).clone(),
                 f"clipL_{td}": pooled[i].detach().to("cpu", self.text_dtype).clone()} for i in range(len(captions))]

    @staticmethod
    def collate(samples: list[dict[str, torch.Tensor]]) -> dict:
        """Loaded samples (batch names) -> HunyuanVideo batch:
        latents [B,16,F,H,W] float32 = raw cached latents x 0.476986 (the DiT's latents, as Musubi's trainer);
        text_states [B,256,D]; text_mask [B,256] bool; pooled [B,768]."""
        batch: dict = {"latents": torch.stack([s["latents"].float() for s in samples]) * SCALING_FACTOR}
        if all("llm" in s for s in samples):
            batch["text_states"] = torch.stack([s["llm"] for s in samples])
            if all("llm_mask" in s for s in samples):
                batch["text_mask"] = torch.stack([s["llm_mask"].bool() for s in samples])
        if all("clipL" in s for s in samples):
            batch["pooled"] = torch.stack([s["clipL"].reshape(-1) for s in samples])
        return batch
