"""Aspect-ratio buckets and the resize + center-crop that puts a frame into its bucket.

All sizes are (W, H) with W and H multiples of the step: 16 by default (VAE /8, then DiT patch 2); an adapter whose
latents are coarser asks for its own (`bucket_step`: 32 for a VAE /16 with patch 2).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import invalid

STEP = 16


def _floor(x: float, step: int = STEP) -> int:
    return int(x) // step * step


def bucket_resolutions(resolution: tuple[int, int], step: int = STEP) -> list[tuple[int, int]]:
    """Buckets of (about) the area W*H: widths from sqrt(A)/2 up to just above sqrt(A), both orientations.

    For 960x544: widths 352, 368, ..., 736, each with height floor(A / w) to the step, plus the transposes."""
    area = resolution[0] * resolution[1]
    s = math.isqrt(area)
    out: set[tuple[int, int]] = set()
    w = _floor(s // 2, step)
    while w < s + step:
        h = _floor(area / w, step)
        if w >= step and h >= step:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def select_bucket(size: tuple[int, int], resolution: tuple[int, int], enable_bucket: bool,
                  bucket_no_upscale: bool = False, buckets: list[tuple[int, int]] | None = None,
                  step: int = STEP) -> tuple[int, int]:
    """The (W, H) bucket for a frame of `size` (W, H).

    Without bucketing: the resolution itself (floored to the step). With `bucket_no_upscale`, a frame no larger
    than the bucket area keeps its own size, floored to the step. Otherwise the bucket with the nearest aspect ratio
    (first in sorted order on ties)."""
    w, h = size
    if w < step or h < step:
        raise invalid("frame size", f"{w}x{h}", f"at least {step}x{step} pixels")
    if not enable_bucket:
        if min(resolution) < step:
            raise invalid("resolution", list(resolution), f"at least {step}x{step} pixels for this model's latents")
        return (_floor(resolution[0], step), _floor(resolution[1], step))
    if bucket_no_upscale and w * h <= resolution[0] * resolution[1]:
        return (_floor(w, step), _floor(h, step))
    buckets = buckets or bucket_resolutions(resolution, step)
    ar = w / h
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ar))


def resize_and_crop(frames: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """Resize [F, H, W, 3] (or [H, W, 3]) uint8 to cover the bucket, then center-crop to exactly (bw, bh).

    LANCZOS when enlarging, box filter (area average, like cv2 INTER_AREA) when shrinking."""
    from PIL import Image

    single = frames.ndim == 3
    if single:
        frames = frames[None]
    bw, bh = bucket
    h, w = frames.shape[1:3]
    if (w, h) == (bw, bh):
        return frames[0] if single else frames
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    resample = Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BOX
    left, top = (nw - bw) // 2, (nh - bh) // 2
    out = np.empty((frames.shape[0], bh, bw, 3), dtype=np.uint8)
    for i, f in enumerate(frames):
        im = Image.fromarray(f).resize((nw, nh), resample)
        out[i] = np.asarray(im)[top:top + bh, left:left + bw]
    return out[0] if single else out


RESIZE_MODES = ("stretch", "crop", "pad")


def fit_frames(x, width: int, height: int, mode: str = "stretch"):
    """Float frames [N, C, H, W] -> [N, C, height, width] (bicubic): "stretch" ignores the aspect ratio (ComfyUI's
    default), "crop" covers the size and center-crops (what the training buckets do), "pad" fits inside and pads
    the borders with zeros (black for 0..1 images: letterbox)."""
    import torch.nn.functional as F

    if mode not in RESIZE_MODES:
        raise invalid("resize_mode", mode, f"one of {RESIZE_MODES}")
    h, w = x.shape[-2:]
    if mode == "stretch" or (w, h) == (width, height):
        return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    scale = (max if mode == "crop" else min)(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if mode == "crop":
        nw, nh = max(nw, width), max(nh, height)
    y = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
    if mode == "crop":
        top, left = (nh - height) // 2, (nw - width) // 2
        return y[..., top:top + height, left:left + width]
    nw, nh = min(nw, width), min(nh, height)
    out = x.new_zeros(*x.shape[:-2], height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[..., top:top + nh, left:left + nw] = y[..., :nh, :nw]
    return out
