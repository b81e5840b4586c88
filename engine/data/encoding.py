"""Encoding for caches: the `CacheAdapter` protocol a family implements, stored tensor names, `CacheRequirements`.

The generic cache builder (`cache.py`) decodes, buckets and stores; an adapter (made by the family,
`Family.cache_adapter`) only turns pixels and captions into named tensors, and the family's `collate` turns loaded
tensors back into a batch. A new family brings its own adapter; nothing generic changes.

Stored tensor names follow Musubi Tuner's convention: `latents_{F}x{H}x{W}_{dtype}` (latent-space
dims), other tensors `<name>_{dtype}`, variable-length tensors prefixed `varlen_`. `strip_key` recovers the batch
name (`latents`, `latents_image`, `clip`, `t5`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import invalid

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}
_DTYPE_SUFFIX = re.compile(r"_(float16|bfloat16|float32|int64|int32|bool)$")
_SHAPE_SUFFIX = re.compile(r"_\d+x\d+x\d+$")


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES[dtype]


def latent_key(name: str, latent: torch.Tensor) -> str:
    """`latents_image` + [C, F, H, W] bf16 -> `latents_image_{F}x{H}x{W}_bfloat16`."""
    _, f, h, w = latent.shape
    return f"{name}_{f}x{h}x{w}_{dtype_name(latent.dtype)}"


def strip_key(stored: str) -> str:
    """Stored tensor name -> batch name (drop `varlen_`, the dtype suffix and, for latents, the shape suffix)."""
    name = stored[len("varlen_"):] if stored.startswith("varlen_") else stored
    if name.endswith("_mask"):
        return name
    name = _DTYPE_SUFFIX.sub("", name)
    if name.startswith("latents"):
        name = _SHAPE_SUFFIX.sub("", name)
    return name


@dataclass
class OneFrameSpec:
    """Musubi's "one frame" training item (image dataset with `fp_1f_target_index` and control images)."""

    clean_indices: tuple[int, ...]     # `fp_1f_clean_indices`: one RoPE frame index per control image, in order
    target_index: int                  # `fp_1f_target_index`
    no_post: bool = False              # `fp_1f_no_post`: no zero "post" clean latent after the controls


@dataclass
class Clip:
    """One decoded training sample, already in its bucket."""

    frames: np.ndarray                 # [F, H, W, 3] uint8, H/W = bucket size, F = 4k + 1 (1 for images)
    control: np.ndarray | None = None  # [F, H, W, 3] uint8 control frames (same bucket and length), if any
    controls: list[np.ndarray] | None = None  # one-frame: the control images [H, W, 3] uint8 (same size as frames)
    one_frame: OneFrameSpec | None = None     # one-frame: the indices (set together with `controls`)


@runtime_checkable
class CacheAdapter(Protocol):
    arch: str            # short name used in cache file names (`Family.cache_arch`)
    target_fps: float    # the family's training frame rate (source_fps frames are dropped to it)
    # optional: `bucket_step` (int, default buckets.STEP = 16): the multiple bucket sizes are floored to

    def latent_description(self) -> dict | None:
        """Encoder identities + options that determine latent files; None = this run writes no latents. An adapter
        may also define `dataset_latent_description(ds) -> dict`: what one dataset's latent files depend on besides
        (added to that dataset's cache key)."""

    def text_description(self) -> dict | None:
        """Encoder identity + options that determine text files; None = this run writes no text caches."""

    def encode_clip(self, clip: Clip) -> dict[str, torch.Tensor]:
        """Stored tensors for one clip (names with suffixes, see module docstring). An adapter that stores a clip
        as several training samples (one file each) defines `encode_clip_files(file, clip, ds) -> {file name: tensors}`
        instead (names ending like `file`, `_<arch>.safetensors`; `ds` is the item's dataset config)."""

    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Stored tensors for each caption."""


def encoder_identity(obj, what: str) -> str:
    ident = getattr(obj, "identity", None)
    if not isinstance(ident, str) or not ident:
        raise invalid(what, type(obj).__name__, "an encoder with an `identity` string (file name + size + mtime)")
    return ident


def weights_placement(obj) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of an encoder's weights (CPU float32 for weightless test doubles)."""
    params = getattr(obj, "parameters", None)
    if callable(params):
        for p in params():
            return p.device, p.dtype
    return torch.device(getattr(obj, "device", "cpu")), getattr(obj, "dtype", torch.float32)


def pixels_to_video(frames: np.ndarray, device, dtype) -> torch.Tensor:
    """[F, H, W, 3] uint8 -> [1, 3, F, H, W] in [-1, 1] (x / 127.5 - 1)."""
    t = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    t = t.permute(3, 0, 1, 2).unsqueeze(0).to(torch.float32) / 127.5 - 1.0
    return t.to(dtype)


@dataclass
class CacheRequirements:
    """What a model needs from a cache (`check_cache_for_model`). Identities left None are not compared."""

    arch: str
    latent_channels: int = 16
    text_dim: int | None = None
    required: tuple[str, ...] = ("latents",)           # batch names every sample must have
    channels: dict | None = None                       # batch name -> expected first-dim size (e.g. y: 20)
    identities: dict | None = None                     # e.g. {"vae": ..., "text_encoder": ..., "clip": ...}
    text_key: str | None = None                        # batch name of the text embeddings whose width is text_dim
    text_arch: str | None = None                       # manifest holding the text cache (None: `arch`'s own)


def collate_for(arch: str):
    """The batch builder of the family whose caches carry `arch` in their names."""
    from ..families import family_for_cache_arch

    return family_for_cache_arch(arch).collate
