"""Score a generated clip against its caption: which colour, shape and motion does it show? Pure numpy.

Colour: the palette colour covering the most pixels (each pixel goes to its nearest palette colour when it is close
enough to it). Shape: which shape, drawn with the mask's area and centroid, overlaps the mask best (intersection over
union), by majority over frames; robust to the blur of a tiny VAE, which rounds corners but keeps the mass where it
is. Motion: the direction of the mask centroid's least-squares path, when it moves far enough; "still" when it
hardly moves at all (in between: none); a diagonal when it moves along both axes alike (only the demo's diagonal
has a name).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..errors import invalid
from .shapes import MOTIONS, PALETTE, ClipSpec, parse_caption, shape_mask

COLOUR_DISTANCE = 100.0     # RGB distance within which a pixel counts as that palette colour
MIN_PIXELS = 12             # a colour needs this many pixels per frame on average to count as shown
MIN_TRAVEL = 0.12           # of the frame size: less is no direction
STILL_TRAVEL = 0.04         # of the frame size: less is "still"
DIAGONAL_RATIO = 0.5        # the lesser axis travels at least this share of the greater: a diagonal
_MOTION_NAMES = {direction: name for name, direction in MOTIONS.items()}


@dataclass
class ClipScore:
    colour: str | None
    shape: str | None
    motion: str | None

    def matches(self, spec: ClipSpec) -> dict[str, bool]:
        return {"colour": self.colour == spec.colour, "shape": self.shape == spec.shape,
                "motion": self.motion == spec.motion}


def colour_masks(clip: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 [F, H, W, 3] -> {colour: bool [F, H, W]}: each pixel in the mask of its nearest palette colour."""
    names = list(PALETTE)
    palette = np.array([PALETTE[n] for n in names], dtype=np.float32)          # [P, 3]
    dist = np.linalg.norm(clip.astype(np.float32)[..., None, :] - palette, axis=-1)   # [F, H, W, P]
    nearest = dist.argmin(axis=-1)
    close = dist.min(axis=-1) < COLOUR_DISTANCE
    return {n: close & (nearest == i) for i, n in enumerate(names)}


def _best_shape(mask: np.ndarray) -> str:
    """The shape whose template, with the mask's area and centroid, has the largest IoU with the mask [H, W]."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    area, cx, cy = len(ys), xs.mean() + 0.5, ys.mean() + 0.5
    # size from the area (square s^2, circle pi s^2 / 4, triangle s^2 / 2); the triangle's centroid lies s/6 below
    # its box centre
    sizes = {"square": np.sqrt(area), "circle": np.sqrt(4 * area / np.pi), "triangle": np.sqrt(2 * area)}
    ious = {}
    for shape, size in sizes.items():
        box_cy = cy - size / 6 if shape == "triangle" else cy
        template = shape_mask(shape, size, cx, box_cy, h, w, ss=2) >= 0.5
        ious[shape] = (template & mask).sum() / max((template | mask).sum(), 1)
    return max(ious, key=ious.get)


def _shape_of(mask: np.ndarray) -> str | None:
    votes = Counter(_best_shape(m) for m in mask if m.sum() >= MIN_PIXELS)
    return votes.most_common(1)[0][0] if votes else None


def _motion_of(mask: np.ndarray) -> str | None:
    f, h, w = mask.shape
    t, cx, cy = [], [], []
    for i, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(ys) >= MIN_PIXELS:
            t.append(i), cx.append(xs.mean()), cy.append(ys.mean())
    if len(t) < max(2, f // 2):
        return None
    t = np.array(t, dtype=np.float64)
    slope_x = np.polyfit(t, cx, 1)[0] * (f - 1) / w      # travel over the clip, in frame widths
    slope_y = np.polyfit(t, cy, 1)[0] * (f - 1) / h
    travel = max(abs(slope_x), abs(slope_y))
    if travel < STILL_TRAVEL:
        return "still"
    if travel < MIN_TRAVEL:
        return None
    sx, sy = int(np.sign(slope_x)), int(np.sign(slope_y))
    if min(abs(slope_x), abs(slope_y)) >= DIAGONAL_RATIO * travel:
        return _MOTION_NAMES.get((sx, sy))
    return _MOTION_NAMES[(sx, 0) if abs(slope_x) >= abs(slope_y) else (0, sy)]


def score_clip(clip: np.ndarray) -> ClipScore:
    """uint8 [F, H, W, 3] (or float in [0, 1]) -> what the clip shows."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise invalid("clip", clip.shape, "frames [F, H, W, 3]")
    if clip.dtype != np.uint8:
        clip = np.clip(np.rint(clip.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    masks = colour_masks(clip)
    colour, mask = max(masks.items(), key=lambda kv: kv[1].sum())
    if mask.sum() < MIN_PIXELS * len(clip):
        return ClipScore(None, None, None)
    return ClipScore(colour, _shape_of(mask), _motion_of(mask))


def clip_matches(clip: np.ndarray, caption: str) -> dict[str, bool]:
    """Per attribute, does the clip show what the caption says? Adds "all"."""
    spec = parse_caption(caption)
    if spec is None:
        raise invalid("caption", caption, "a caption naming a palette colour, a shape and a motion")
    m = score_clip(clip).matches(spec)
    m["all"] = all(m.values())
    return m


__all__ = ["ClipScore", "colour_masks", "score_clip", "clip_matches"]
