"""Wan 2.1 caches: the family's `CacheAdapter`, its cache requirements, batch collation and the
one-frame dataset rules. The generic builder (`engine.data.cache`) decodes, buckets and stores; this module only
encodes and names tensors.
"""

from __future__ import annotations

import numpy as np
import torch

from ...data.encoding import (DTYPE_NAMES, CacheRequirements, Clip, OneFrameSpec, dtype_name, encoder_identity,
                              latent_key, pixels_to_video, weights_placement)
from ...data.buckets import resize_and_crop, select_bucket
from ...data.media import load_image
from ...errors import invalid
from .pipeline import MASK_CHANNELS, prepare_one_frame

ARCH = "wan"


def one_frame_spec(ds, required: bool = False) -> OneFrameSpec | None:
    """The one-frame indices of an image dataset with control images, or None for a normal dataset.

    A dataset is one-frame when it sets `fp_1f_target_index`; `required` (Musubi's `--one_frame` caching flag) makes
    every image dataset with control images one-frame. Wan one-frame caching fails without `fp_1f_target_index` (no
    default in Musubi) or `fp_1f_clean_indices` (only FramePack falls back to [0]); `fp_1f_no_post` is ignored for
    Wan. Datasets that set `fp_1f_clean_indices` alone are refused too (the target index is missing)."""
    if getattr(ds, "kind", None) != "image":
        return None
    target, clean = getattr(ds, "fp_1f_target_index", None), getattr(ds, "fp_1f_clean_indices", None)
    where = f"dataset #{ds.index} ({ds.source or 'in-memory'})"
    if target is None:
        if required or clean is not None:
            raise invalid(f"{where} fp_1f_target_index", None,
                          "the target frame index for one-frame training (e.g. 9 with fp_1f_clean_indices = [0]; "
                          "Musubi has no default)")
        return None
    if clean is None:
        raise invalid(f"{where} fp_1f_clean_indices", None,
                      "one control frame index per control image for Wan one-frame training (e.g. [0])")
    clean = tuple(int(i) for i in clean)
    if not 1 <= len(clean) <= 2:
        raise invalid(f"{where} fp_1f_clean_indices", list(clean), "one or two control indices (Wan one-frame)")
    if target in clean or len(set(clean)) != len(clean):
        raise invalid(f"{where} fp_1f_clean_indices / fp_1f_target_index", (list(clean), target),
                      "distinct indices, the target not among the control indices")
    return OneFrameSpec(clean, int(target))


def one_frame_control(path, ds, bucket: tuple[int, int]) -> np.ndarray:
    """A one-frame control image sized like the target: resized into the target's bucket by default.

    `no_resize_control` keeps the control's own size (cropped to multiples of 16) and `control_resolution` resizes
    it to that area (with both: only when larger), as Musubi does. Wan stacks control and target latents on the frame
    axis, so the result must still be the target's size; anything else is refused naming the key."""
    img = load_image(path)
    no_resize, control_res = getattr(ds, "no_resize_control", False), getattr(ds, "control_resolution", None)
    if not no_resize and control_res is None:
        return resize_and_crop(img, bucket)
    h, w = img.shape[:2]
    size = (w // 16 * 16, h // 16 * 16) if no_resize else None
    if control_res is not None:
        if size is None or w * h > control_res[0] * control_res[1]:
            size = select_bucket((w, h), control_res, True, False)
    if tuple(size) != tuple(bucket):
        key = "no_resize_control" if no_resize else "control_resolution"
        raise invalid(f"dataset #{ds.index} {key} (control {path})", f"{size[0]}x{size[1]}",
                      f"the target's bucket {bucket[0]}x{bucket[1]}: Wan one-frame needs control images the size of "
                      "the target (unset no_resize_control / control_resolution)")
    return resize_and_crop(img, size)


def cache_requirements(*, text_dim: int = 4096, i2v: bool = False, clip: bool = False, control: bool = False,
                           one_frame: bool = False, vae_identity: str | None = None, text_identity: str | None = None,
                           clip_identity: str | None = None) -> CacheRequirements:
    required = ["latents", "t5"] + (["latents_image"] if i2v else []) + (["clip"] if clip else []) + (
        ["latents_control"] if control else []) + (["f_indices", "f_target_slot"] if one_frame else [])
    ids = {k: v for k, v in (("vae", vae_identity), ("text_encoder", text_identity), ("clip", clip_identity)) if v}
    return CacheRequirements(ARCH, 16, text_dim, tuple(required), {"latents_image": 20, "latents_control": 16}, ids,
                             text_key="t5")


class WanCacheAdapter:
    """Wan 2.1 caches.

    Latent file:  `latents_{F}x{H}x{W}` [16, F_lat, H/8, W/8]; I2V: `latents_image_…` [20, F_lat, H/8, W/8] (4 mask
                  channels + 16 latent channels of [first frame, zeros...]) and `clip` [257, clip_dim] from the first
                  frame when a CLIP encoder is given; Fun-Control: `latents_control_…` [16, F_lat, H/8, W/8].
    One-frame items (`Clip.one_frame` set; image dataset with `fp_1f_target_index` + control images,
                  Musubi's layout), n = number of controls + 1 latent frames ordered by the sorted index list:
                  `latents_{n}x{H}x{W}` [16, n, H/8, W/8] control latents in the control slots and the target image
                  latent in its slot (each a 1-frame encode); `latents_image_…` [20, n, H/8, W/8] = the `y` of
                  `pipeline.prepare_one_frame` (mask 1 on control slots, mid-gray latent in the target
                  slot); `f_indices_int32` [n] the RoPE frame positions; `f_target_slot_int32` [1] the target's slot;
                  `clip` [257 · controls, clip_dim]: the CLIP tokens of every control image in their order (required:
                  one-frame uses an I2V model, which takes the first image's 257, or for intermediate frames an FLF2V
                  model, which takes both images' 514; `pipeline.one_frame_clip`). Musubi stores [controls, 257, D].
    Fun-Control with a CLIP encoder (I2V Fun-Control): the I2V tensors above and the control latents; training feeds
                  only latent frame 0 of the image latents, as inference (`family.build_y`).
    Text file:    `varlen_t5` [L, text_dim] (true token length).
    Encoders are already loaded objects: `vae.encode([B,3,F,H,W] in [-1,1]) -> [B,16,F_lat,H/8,W/8]`,
    `text_encoder.encode(list[str]) -> list[[L, D]]`, `clip.encode([B,3,H,W] in [-1,1]) -> [B, 257, D]`; each has an
    `identity` string. Pass only the encoders of this run (latents with `vae`, text with `text_encoder`)."""

    arch = ARCH
    target_fps = 16.0

    def __init__(self, vae=None, text_encoder=None, clip=None, *, i2v: bool = False, control: bool = False,
                 one_frame: bool = False, dtype: torch.dtype = torch.bfloat16,
                 text_dtype: torch.dtype = torch.bfloat16):
        if dtype not in DTYPE_NAMES or text_dtype not in DTYPE_NAMES:
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
            encoder_identity(clip, "CLIP vision encoder")

    def latent_description(self) -> dict | None:
        if self.vae is None:
            return None
        d = {"vae": encoder_identity(self.vae, "VAE"), "dtype": dtype_name(self.dtype), "i2v": self.i2v,
             "control": self.control}
        if self.one_frame:
            d["one_frame"] = True
        if self.clip is not None:
            d["clip"] = encoder_identity(self.clip, "CLIP vision encoder")
        return d

    def dataset_latent_description(self, ds) -> dict:
        """What a dataset's latent files depend on beyond `latent_description` (the generic builder adds it to the
        dataset's cache key): one-frame datasets with two control images store both images' CLIP tokens since the
        FLF2V intermediate-frame fix (caches made before hold the first image's only and are re-encoded)."""
        if self.vae is None or self.clip is None:
            return {}
        spec = one_frame_spec(ds, self.one_frame)
        return {"one_frame_clip": "every_control"} if spec is not None and len(spec.clean_indices) > 1 else {}

    def text_description(self) -> dict | None:
        if self.text_encoder is None:
            return None
        return {"text_encoder": encoder_identity(self.text_encoder, "text encoder"), "dtype": dtype_name(self.text_dtype)}

    @torch.no_grad()
    def _encode_video(self, frames: np.ndarray) -> torch.Tensor:
        device, dtype = weights_placement(self.vae)
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
            device, dtype = weights_placement(self.vae)
            img_lat = self.vae.encode(video.to(device, dtype))[0].to("cpu", self.dtype)  # [16, F_lat, h, w]
            mask = torch.zeros(4, *img_lat.shape[1:], dtype=self.dtype)
            mask[:, 0] = 1  # the 4 pixel frames folded into latent frame 0 are all "given"
            y = torch.cat([mask, img_lat], dim=0)                     # [20, F_lat, h, w]
            out[latent_key("latents_image", y)] = y
            if self.clip is not None:
                device, dtype = weights_placement(self.clip)
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
        device, dtype = weights_placement(self.vae)
        images = [pixels_to_video(c[None], device, dtype)[0, :, 0] for c in controls]     # each [3, H, W]
        cond = prepare_one_frame(self.vae, images, spec.clean_indices, spec.target_index)
        y = cond.y.to("cpu", self.dtype)                                                # [20, n, h, w]
        target = self._encode_video(clip.frames[:1])                                   # [16, 1, h, w]
        latents = y[MASK_CHANNELS:].clone()                   # control latents in the control slots ...
        latents[:, cond.target_slot] = target[:, 0]     # ... and the target latent in its slot
        cdev, cdt = weights_placement(self.clip)
        fea = torch.cat([self.clip.encode(im[None].to(cdev, cdt))[0] for im in images]).to("cpu", self.dtype)
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

    # --- one-frame datasets (generic cache builder asks these) ----------------------------------------------------
    def one_frame_spec(self, ds) -> OneFrameSpec | None:
        return one_frame_spec(ds, self.one_frame)

    @staticmethod
    def one_frame_control(path, ds, bucket: tuple[int, int]) -> np.ndarray:
        return one_frame_control(path, ds, bucket)
