"""Per-family cache adapters: what a model family encodes from a clip/caption and how cached tensors form a batch.

The generic cache builder (`cache.py`) decodes, buckets and stores; an adapter only turns pixels and captions into
named tensors and turns loaded tensors back into a batch. HunyuanVideo / FramePack add an adapter class and register
it in `ADAPTERS`; nothing generic changes.

Stored tensor names follow Musubi Tuner's convention (reference §3.6): `latents_{F}x{H}x{W}_{dtype}` (latent-space
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

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}
_DTYPE_SUFFIX = re.compile(r"_(float16|bfloat16|float32|int64|int32|bool)$")
_SHAPE_SUFFIX = re.compile(r"_\d+x\d+x\d+$")
MASK_CH = 4  # Wan I2V conditioning: 4 mask channels before the 16 latent channels


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


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


@dataclass
class Clip:
    """One decoded training sample, already in its bucket."""

    frames: np.ndarray                 # [F, H, W, 3] uint8, H/W = bucket size, F = 4k + 1 (1 for images)
    control: np.ndarray | None = None  # [F, H, W, 3] uint8 control frames (same bucket and length), if any
    controls: list[np.ndarray] | None = None  # one-frame: the control images [H, W, 3] uint8 (same size as frames)
    one_frame: OneFrameSpec | None = None     # one-frame: the indices (set together with `controls`)


@runtime_checkable
class CacheAdapter(Protocol):
    arch: str            # short name used in cache file names ("wan", later "hv", "fp")
    target_fps: float    # the family's training frame rate (source_fps frames are dropped to it)

    def latent_description(self) -> dict | None:
        """Encoder identities + options that determine latent files; None = this run writes no latents."""

    def text_description(self) -> dict | None:
        """Encoder identity + options that determine text files; None = this run writes no text caches."""

    def encode_clip(self, clip: Clip) -> dict[str, torch.Tensor]:
        """Stored tensors for one clip (names with suffixes, see module docstring)."""

    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """Stored tensors for each caption."""


def _identity(obj, what: str) -> str:
    ident = getattr(obj, "identity", None)
    if not isinstance(ident, str) or not ident:
        raise invalid(what, type(obj).__name__, "an encoder with an `identity` string (file name + size + mtime)")
    return ident


def _placement(obj) -> tuple[torch.device, torch.dtype]:
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


class WanCacheAdapter:
    """Wan 2.1 caches (reference §3.7).

    Latent file:  `latents_{F}x{H}x{W}` [16, F_lat, H/8, W/8]; I2V: `latents_image_…` [20, F_lat, H/8, W/8] (4 mask
                  channels + 16 latent channels of [first frame, zeros...]) and `clip` [257, clip_dim] from the first
                  frame when a CLIP encoder is given; Fun-Control: `latents_control_…` [16, F_lat, H/8, W/8].
    One-frame items (`Clip.one_frame` set; image dataset with `fp_1f_target_index` + control images, reference
                  §3.7), n = number of controls + 1 latent frames ordered by the sorted index list:
                  `latents_{n}x{H}x{W}` [16, n, H/8, W/8] control latents in the control slots and the target image
                  latent in its slot (each a 1-frame encode); `latents_image_…` [20, n, H/8, W/8] = the `y` of
                  `engine.pipelines.wan.prepare_one_frame` (mask 1 on control slots, mid-gray latent in the target
                  slot); `f_indices_int32` [n] the RoPE frame positions; `f_target_slot_int32` [1] the target's slot;
                  `clip` [257, clip_dim] of the first control image (required: one-frame uses an I2V model).
    Text file:    `varlen_t5` [L, text_dim] (true token length).
    Encoders are already loaded objects: `vae.encode([B,3,F,H,W] in [-1,1]) -> [B,16,F_lat,H/8,W/8]`,
    `text_encoder.encode(list[str]) -> list[[L, D]]`, `clip.encode([B,3,H,W] in [-1,1]) -> [B, 257, D]`; each has an
    `identity` string. Pass only the encoders of this run (latents with `vae`, text with `text_encoder`)."""

    arch = "wan"
    target_fps = 16.0

    def __init__(self, vae=None, text_encoder=None, clip=None, *, i2v: bool = False, control: bool = False,
                 one_frame: bool = False, dtype: torch.dtype = torch.bfloat16,
                 text_dtype: torch.dtype = torch.bfloat16):
        if dtype not in _DTYPE_NAMES or text_dtype not in _DTYPE_NAMES:
            raise invalid("cache dtype", (dtype, text_dtype), "float16, bfloat16 or float32")
        self.vae, self.text_encoder, self.clip = vae, text_encoder, clip
        self.i2v = i2v or clip is not None  # a CLIP encoder implies I2V (as Musubi's --clip)
        self.control = control
        # one_frame=True (Musubi's `--one_frame`): image datasets with control images must be one-frame datasets
        # (`fp_1f_target_index` required). Without it, datasets that set `fp_1f_target_index` are still cached
        # for one-frame training (the cache builder decides per dataset, see `cache.prepare_item`).
        self.one_frame = bool(one_frame)
        self.dtype, self.text_dtype = dtype, text_dtype
        if (self.i2v or control) and vae is None:
            raise invalid("Wan cache", "i2v/control without a VAE", "a VAE to encode conditioning latents")
        if clip is not None:
            _identity(clip, "CLIP vision encoder")

    def latent_description(self) -> dict | None:
        if self.vae is None:
            return None
        d = {"vae": _identity(self.vae, "VAE"), "dtype": dtype_name(self.dtype), "i2v": self.i2v,
             "control": self.control}
        if self.one_frame:
            d["one_frame"] = True
        if self.clip is not None:
            d["clip"] = _identity(self.clip, "CLIP vision encoder")
        return d

    def text_description(self) -> dict | None:
        if self.text_encoder is None:
            return None
        return {"text_encoder": _identity(self.text_encoder, "text encoder"), "dtype": dtype_name(self.text_dtype)}

    @torch.no_grad()
    def _encode_video(self, frames: np.ndarray) -> torch.Tensor:
        device, dtype = _placement(self.vae)
        lat = self.vae.encode(pixels_to_video(frames, device, dtype))  # [1, 16, F_lat, h, w]
        return lat[0].to("cpu", self.dtype)

    @torch.no_grad()
    def encode_clip(self, clip: Clip) -> dict[str, torch.Tensor]:
        if self.vae is None:
            raise invalid("Wan cache", "no VAE", "a VAE to encode latents")
        if clip.one_frame is not None:
            return self._encode_one_frame(clip)
        frames = clip.frames
        out = {}
        latents = self._encode_video(frames)                           # [16, F_lat, h, w]
        out[latent_key("latents", latents)] = latents
        if self.i2v:
            # Conditioning video: the first frame, then mid-gray frames (0 in [-1, 1]), encoded in one pass.
            video = torch.zeros(1, 3, *frames.shape[:3])                  # [1, 3, F, H, W]
            video[:, :, :1] = pixels_to_video(frames[:1], "cpu", torch.float32)
            device, dtype = _placement(self.vae)
            img_lat = self.vae.encode(video.to(device, dtype))[0].to("cpu", self.dtype)  # [16, F_lat, h, w]
            mask = torch.zeros(4, *img_lat.shape[1:], dtype=self.dtype)
            mask[:, 0] = 1  # the 4 pixel frames folded into latent frame 0 are all "given"
            y = torch.cat([mask, img_lat], dim=0)                     # [20, F_lat, h, w]
            out[latent_key("latents_image", y)] = y
            if self.clip is not None:
                device, dtype = _placement(self.clip)
                first = pixels_to_video(frames[:1], device, dtype)[:, :, 0]  # [1, 3, H, W]
                fea = self.clip.encode(first)[0].to("cpu", self.dtype)   # [257, clip_dim]
                out[f"clip_{dtype_name(self.dtype)}"] = fea
        if self.control:
            if clip.control is None:
                raise invalid("Wan Fun-Control cache", "an item without control frames", "a control video/image per item")
            ctrl = self._encode_video(clip.control)
            out[latent_key("latents_control", ctrl)] = ctrl
        return out

    @torch.no_grad()
    def _encode_one_frame(self, clip: Clip) -> dict[str, torch.Tensor]:
        """One-frame tensors (see the class docstring); `y` comes from the inference helper so the layouts agree."""
        from ..pipelines.wan import prepare_one_frame

        spec, controls = clip.one_frame, clip.controls or []
        if self.clip is None:
            raise invalid("Wan one-frame cache", "no CLIP vision encoder",
                          "a CLIP vision encoder (one-frame training uses an I2V model; Musubi requires --clip)")
        if len(controls) != len(spec.clean_indices):
            raise invalid("fp_1f_clean_indices", list(spec.clean_indices),
                          f"one index per control image ({len(controls)} found)")
        if any(c.shape != clip.frames.shape[1:] for c in controls):
            raise invalid("Wan one-frame control image size", [tuple(c.shape[:2]) for c in controls],
                          f"the target's size {tuple(clip.frames.shape[1:3])} (H, W)")
        device, dtype = _placement(self.vae)
        images = [pixels_to_video(c[None], device, dtype)[0, :, 0] for c in controls]     # each [3, H, W]
        cond = prepare_one_frame(self.vae, images, spec.clean_indices, spec.target_index)
        y = cond.y.to("cpu", self.dtype)                                                # [20, n, h, w]
        target = self._encode_video(clip.frames[:1])                                   # [16, 1, h, w]
        latents = y[MASK_CH:].clone()                   # control latents in the control slots ...
        latents[:, cond.target_slot] = target[:, 0]     # ... and the target latent in its slot
        cdev, cdt = _placement(self.clip)
        fea = self.clip.encode(images[0][None].to(cdev, cdt))[0].to("cpu", self.dtype)  # [257, clip_dim]
        return {latent_key("latents", latents): latents, latent_key("latents_image", y): y,
                f"clip_{dtype_name(self.dtype)}": fea,
                "f_indices_int32": torch.tensor(cond.frame_indices, dtype=torch.int32),
                "f_target_slot_int32": torch.tensor([cond.target_slot], dtype=torch.int32)}

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        if self.text_encoder is None:
            raise invalid("Wan cache", "no text encoder", "a umT5 text encoder to encode captions")
        embs = self.text_encoder.encode(list(captions))
        if len(embs) != len(captions):
            raise invalid("text encoder output", f"{len(embs)} tensors", f"one per caption ({len(captions)})")
        name = f"varlen_t5_{dtype_name(self.text_dtype)}"
        return [{name: e.detach().to("cpu", self.text_dtype).clone()} for e in embs]

    @staticmethod
    def collate(samples: list[dict[str, torch.Tensor]]) -> dict:
        """Loaded samples (batch names) -> Wan batch.

        latents [B,16,F,H,W]; context: list of B [L_i, D]; y [B,20,F,H,W] (I2V); clip_fea [B,257,D] (I2V with CLIP);
        control_latents [B,16,F,H,W] (Fun-Control; the trainer builds the DiT's `y` from them); one-frame:
        frame_indices [B, n] int64 (RoPE frame position of each latent slot) and target_slot [B] int64."""
        batch: dict = {"latents": torch.stack([s["latents"] for s in samples])}
        if all("t5" in s for s in samples):
            batch["context"] = [s["t5"] for s in samples]
        for stored, name in (("latents_image", "y"), ("clip", "clip_fea"), ("latents_control", "control_latents")):
            if all(stored in s for s in samples):
                batch[name] = torch.stack([s[stored] for s in samples])
        if all("f_indices" in s and "f_target_slot" in s for s in samples):
            batch["frame_indices"] = torch.stack([s["f_indices"].long() for s in samples])
            batch["target_slot"] = torch.cat([s["f_target_slot"].long().reshape(1) for s in samples])
        return batch


@dataclass
class CacheRequirements:
    """What a model needs from a cache (`check_cache_for_model`). Identities left None are not compared."""

    arch: str
    latent_channels: int = 16
    text_dim: int | None = None
    required: tuple[str, ...] = ("latents",)           # batch names every sample must have
    channels: dict | None = None                       # batch name -> expected first-dim size (e.g. y: 20)
    identities: dict | None = None                     # e.g. {"vae": ..., "text_encoder": ..., "clip": ...}


def wan_cache_requirements(*, text_dim: int = 4096, i2v: bool = False, clip: bool = False, control: bool = False,
                           one_frame: bool = False, vae_identity: str | None = None, text_identity: str | None = None,
                           clip_identity: str | None = None) -> CacheRequirements:
    required = ["latents", "t5"] + (["latents_image"] if i2v else []) + (["clip"] if clip else []) + (
        ["latents_control"] if control else []) + (["f_indices", "f_target_slot"] if one_frame else [])
    ids = {k: v for k, v in (("vae", vae_identity), ("text_encoder", text_identity), ("clip", clip_identity)) if v}
    return CacheRequirements("wan", 16, text_dim, tuple(required), {"latents_image": 20, "latents_control": 16}, ids)


ADAPTERS = {"wan": WanCacheAdapter}


def collate_for(arch: str):
    if arch not in ADAPTERS:
        raise invalid("cache architecture", arch, f"one of {sorted(ADAPTERS)}")
    return ADAPTERS[arch].collate
