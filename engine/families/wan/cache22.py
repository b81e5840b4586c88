"""Wan 2.2 VAE caches (TI2V-5B): the adapter, its cache requirements and the batch it collates to.

Arch `wan22_5b`. Musubi Tuner has no TI2V-5B (its Wan caches are `wan`: 16 channels from the 2.1 VAE, also for the
2.2 A14B experts), so this arch is ours: Musubi's naming with a new short name, which keeps a 2.1 and a 2.2 cache of
one dataset side by side in one folder (`<key>_..._wan22_5b.safetensors`, `musubi_cache_wan22_5b.json`). Captions
are the same umT5 embeddings for both: they stay in the `wan` text cache (`<key>_wan_te.safetensors`), which the
requirements name as their `text_arch`.

Latent file:  `latents_{F}x{H}x{W}` [48, F_lat, H/16, W/16] (24 fps clips: the 5B's frame rate).
              Task i2v: also `latents_image_1x{H}x{W}` [48, 1, H/16, W/16], the clip's first frame encoded alone
              (`pipeline.prepare_ti2v`, as inference; the causal VAE gives latent frame 0 of the clip up to
              rounding). It marks the clip for image-to-video training (frame 0 given clean, see
              `family.training_forward`); a cache without it trains text-to-video.
Buckets are multiples of 32 pixels (VAE stride 16 x DiT patch 2).
"""

from __future__ import annotations

import torch

from ...data.encoding import (DTYPE_NAMES, CacheRequirements, Clip, dtype_name, encoder_identity, latent_key,
                              pixels_to_video, weights_placement)
from ...errors import invalid
from . import cache
from .detect import TI2V_CHANNELS
from .pipeline import TI2V_FPS, prepare_ti2v

ARCH = "wan22_5b"
TASKS = ("t2v", "i2v")
BUCKET_STEP = 32


def cache_requirements(*, text_dim: int | None, i2v: bool = False, vae_identity: str | None = None,
                       text_identity: str | None = None) -> CacheRequirements:
    required = ("latents", "t5") + (("latents_image",) if i2v else ())
    ids = {k: v for k, v in (("vae", vae_identity), ("text_encoder", text_identity)) if v}
    return CacheRequirements(ARCH, TI2V_CHANNELS, text_dim, required, {"latents_image": TI2V_CHANNELS}, ids,
                             text_key="t5", text_arch=cache.ARCH)


def latent_cache_adapter(vae, task: str, clip_vision=None, **options) -> "Wan22CacheAdapter":
    """The Cache Latents node's rules for the Wan 2.2 VAE: t2v or i2v, nothing else (no CLIP, no control)."""
    if options:
        raise invalid("one_frame_history", sorted(options), "2x and 4x (the default) for Wan caches")
    if clip_vision is not None:
        raise invalid("clip_vision", "connected", "no CLIP vision with the Wan 2.2 VAE (TI2V-5B takes the start "
                      "image through its latent only): disconnect it")
    if task not in TASKS:
        raise invalid("task", task, f"one of {list(TASKS)} with the Wan 2.2 VAE (TI2V-5B: text-to-video, or i2v "
                      "to train image-to-video from each clip's first frame)")
    return Wan22CacheAdapter(vae, i2v=task == "i2v")


class Wan22CacheAdapter:
    """Latents of the Wan 2.2 VAE (module docstring). `vae.encode([B,3,F,H,W] in [-1,1]) -> [B,48,F_lat,H/16,W/16]`
    with an `identity` string. Text is cached by the Wan 2.1 adapter (the `wan` text cache)."""

    arch = ARCH
    target_fps = TI2V_FPS
    bucket_step = BUCKET_STEP

    def __init__(self, vae, *, i2v: bool = False, dtype: torch.dtype = torch.bfloat16):
        if dtype not in DTYPE_NAMES:
            raise invalid("cache dtype", dtype, "float16, bfloat16 or float32")
        if vae is not None:    # None: clip planning only (Dataset Preview)
            channels = getattr(vae, "latent_channels", None)
            if channels != TI2V_CHANNELS:
                raise invalid("vae", f"{channels}-channel latents", f"the {TI2V_CHANNELS}-channel Wan 2.2 VAE")
            encoder_identity(vae, "VAE")
        self.vae, self.i2v, self.dtype = vae, bool(i2v), dtype

    def latent_description(self) -> dict:
        # channels: what the requirements read back (`described_cache_requirements`) to tell 2.1 and 2.2 caches apart
        return {"vae": encoder_identity(self.vae, "VAE"), "dtype": dtype_name(self.dtype), "channels": TI2V_CHANNELS,
                "i2v": self.i2v}

    def dataset_latent_description(self, ds) -> dict:
        """Nothing to add to the key; refuses (before any encoding) what I2V cannot learn from: clips of one frame
        (frame 0 is the given image, nothing would be left to predict)."""
        images = ds.kind == "image"
        if self.i2v and (images or (ds.frame_extraction != "full" and 1 in ds.target_frames)):   # "full": whole
            key = "image_directory" if images else "target_frames"
            raise invalid(f"dataset #{ds.index} ({ds.source or 'in-memory'}) {key}",
                          "an image dataset" if images else ds.target_frames,
                          "video clips of 5 frames or more for task i2v on the Wan 2.2 VAE (the first frame is the "
                          "given image; the loss is on the frames after it): use task t2v for images")
        return {}

    def text_description(self) -> None:
        return None

    @torch.no_grad()
    def encode_clip(self, clip: Clip) -> dict[str, torch.Tensor]:
        if clip.one_frame is not None or clip.control is not None or clip.controls:
            raise invalid("dataset control images", "given", "no control files with the Wan 2.2 VAE (TI2V-5B has "
                          "no control or one-frame training)")
        device, dtype = weights_placement(self.vae)
        latents = self.vae.encode(pixels_to_video(clip.frames, device, dtype))[0].to("cpu", self.dtype)
        out = {latent_key("latents", latents): latents}                    # [48, F_lat, h, w]
        if self.i2v:
            first = pixels_to_video(clip.frames[:1], device, dtype)[0, :, 0]        # [3, H, W]
            image = prepare_ti2v(self.vae, first).first_frame.to("cpu", self.dtype)  # [48, 1, h, w]
            out[latent_key("latents_image", image)] = image
        return out

    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        raise invalid("Wan 2.2 VAE cache", "text", "captions cached by the Cache Text Embeddings node (umT5)")

    def one_frame_spec(self, ds):
        """Datasets with control files are refused when the cache is planned (no one-frame / control training)."""
        raise invalid(f"dataset #{ds.index} ({ds.source or 'in-memory'}) control_directory", "set",
                      "no control images with the Wan 2.2 VAE (TI2V-5B has no one-frame or control training)")


def collate(samples: list[dict[str, torch.Tensor]]) -> dict:
    """The Wan batch (`cache.WanCacheAdapter.collate`); a 48-channel `latents_image` is TI2V's clean first frame:
    batch `first_frame` [B, 48, 1, h, w] (not the `y` a 2.1 I2V model concatenates on channels)."""
    batch = cache.WanCacheAdapter.collate(samples)
    y = batch.get("y")
    if y is not None and y.shape[1] == TI2V_CHANNELS:
        batch["first_frame"] = batch.pop("y")
    return batch
