"""Procedural shape clips: the demo dataset, drawn in numpy (no downloads), deterministic from a seed.

A clip is one filled shape of one colour moving in a straight line on a black background, with its caption
("a red square moving to the right"). The demo models are trained on the base colours and motions; the other palette
colours, a shape staying still and a shape moving diagonally are concepts a demo LoRA teaches (the motions: for
image-to-video models, whose start image already shows the colour).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import invalid

PALETTE = {                       # RGB, far apart so a colour mask tells them apart after a lossy model
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 235),
    "yellow": (235, 215, 40),
    "magenta": (225, 50, 225),
    "cyan": (40, 215, 225),
}
BASE_COLOURS = ("red", "green", "blue", "yellow")   # what the demo base models know
SHAPES = ("square", "circle", "triangle")
MOTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0),   # (dx, dy), image axes
           "diagonally": (1, 1)}
MOTION_WORDS = {"right": "moving to the right", "left": "moving to the left", "up": "moving up",
                "down": "moving down", "still": "staying still", "diagonally": "moving diagonally"}
BASE_MOTIONS = ("right", "left", "up", "down")     # what the demo base models know


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    motion: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {MOTION_WORDS[self.motion]}"


def check_spec(spec: ClipSpec) -> None:
    for field, value, allowed in (("colour", spec.colour, PALETTE), ("shape", spec.shape, SHAPES),
                                  ("motion", spec.motion, MOTIONS)):
        if value not in allowed:
            raise invalid(field, value, f"one of {', '.join(allowed)}")


def parse_caption(caption: str) -> ClipSpec | None:
    """The spec a caption names (None when it names no colour, shape or motion of the demo vocabulary)."""
    words = caption.lower().replace(",", " ").split()
    colour = next((w for w in words if w in PALETTE), None)
    shape = next((w for w in words if w in SHAPES), None)
    motion = next((w for w in reversed(words) if w in MOTIONS), None)
    if colour is None or shape is None or motion is None:
        return None
    return ClipSpec(colour, shape, motion)


def all_specs(colours=BASE_COLOURS, shapes=SHAPES, motions=BASE_MOTIONS) -> list[ClipSpec]:
    return [ClipSpec(c, s, m) for c, s, m in itertools.product(colours, shapes, motions)]


def eval_specs() -> list[ClipSpec]:
    """The fixed prompts the demo models are judged on: 12 of the 48 base ones, every colour and shape, each motion
    three times."""
    return [s for i, s in enumerate(all_specs()) if i % 4 == (i // 4) % 4]


def shape_mask(shape: str, size: float, cx: float, cy: float, height: int, width: int, ss: int = 4) -> np.ndarray:
    """[H, W] float coverage in [0, 1] of a shape whose size x size box is centred on (cx, cy); ss x ss
    supersampled so edges are anti-aliased like real footage."""
    ys = (np.arange(height * ss) + 0.5) / ss
    xs = (np.arange(width * ss) + 0.5) / ss
    x, y = np.meshgrid(xs - cx, ys - cy)
    r = size / 2
    if shape == "square":
        inside = (np.abs(x) <= r) & (np.abs(y) <= r)
    elif shape == "circle":
        inside = x * x + y * y <= r * r
    else:   # upward triangle with its base at the bottom of the size x size box
        inside = (y <= r) & (y >= -r) & (np.abs(x) <= (y + r) / 2)
    return inside.reshape(height, ss, width, ss).mean(axis=(1, 3))


def render_clip(spec: ClipSpec, seed: int, frames: int = 17, height: int = 64, width: int = 64) -> np.ndarray:
    """-> uint8 [F, H, W, 3]. The seed picks the size, start point and speed; the path stays inside the frame."""
    check_spec(spec)
    if frames < 2:
        raise invalid("frames", frames, "at least 2 (a motion needs two frames)")
    if min(height, width) < 32:
        raise invalid("clip size", (height, width), "at least 32x32 pixels")
    rng = np.random.default_rng(seed)
    # large enough that a tiny VAE (8x smaller latents) keeps the corners that tell the shapes apart
    size = rng.uniform(0.34, 0.42) * min(height, width)
    dx, dy = MOTIONS[spec.motion]
    margin = size / 2 + 1
    travel = rng.uniform(0.3, 0.42) * (width if dx else height)   # pixels covered over the clip
    if not (dx or dy):
        travel = 0.0            # (drawn all the same: a seed gives every motion the same size and position stream)
    if dx and dy:               # a diagonal: the same travel along both axes
        x0, y0 = (margin + (travel if d < 0 else 0) + rng.uniform(0, max(extent - 2 * margin - travel, 0))
                  for d, extent in ((dx, width), (dy, height)))
    else:
        along_lo = margin + (travel if (dx + dy) < 0 else 0)        # start so the whole path is visible
        span = (width if dx else height) - 2 * margin - travel
        start_along = along_lo + rng.uniform(0, max(span, 0))
        across = rng.uniform(margin, (height if dx else width) - margin)
        x0, y0 = (start_along, across) if dx else (across, start_along)
    out = np.zeros((frames, height, width, 3), dtype=np.float32)
    colour = np.array(PALETTE[spec.colour], dtype=np.float32)
    for f in range(frames):
        cx, cy = x0 + dx * travel * f / (frames - 1), y0 + dy * travel * f / (frames - 1)
        out[f] = shape_mask(spec.shape, size, cx, cy, height, width)[..., None] * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_dataset(specs: list[ClipSpec], clips_per_spec: int, seed: int, **size) -> list[tuple[np.ndarray, str]]:
    """[(clip uint8 [F, H, W, 3], caption)], spec-major; clip k of spec i uses seed `seed * 100003 + i * 1009 + k`."""
    return [(render_clip(spec, seed * 100003 + i * 1009 + k, **size), spec.caption)
            for i, spec in enumerate(specs) for k in range(clips_per_spec)]


__all__ = ["PALETTE", "BASE_COLOURS", "SHAPES", "MOTIONS", "BASE_MOTIONS", "ClipSpec", "check_spec", "parse_caption",
           "all_specs", "eval_specs", "shape_mask", "render_clip", "make_dataset"]
