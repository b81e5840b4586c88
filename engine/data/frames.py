"""Which frames of a video become training clips (pure functions on frame counts; no decoding here).

A clip is a `(start, T)` pair: frames [start, start + T) of the video *after* `source_fps` dropping. The video
families' VAEs compress time by 4 with a causal first frame, so T is always 4k + 1.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import invalid

FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform", "full")


def round_down_4k1(n: int) -> int:
    """Largest 4k + 1 <= n (n >= 1)."""
    return (n - 1) // 4 * 4 + 1


def normalize_target_frames(target_frames: list[int], where: str = "target_frames") -> list[int]:
    """Round each value down to 4k + 1 (warning when changed), deduplicate, sort."""
    out = set()
    for t in target_frames:
        if t < 1:
            raise invalid(where, t, "frame counts >= 1")
        r = round_down_4k1(t)
        if r != t:
            warnings.warn(f"{where}: {t} frames is not 4k+1; using {r}", stacklevel=2)
        out.add(r)
    return sorted(out)


def extract_clips(num_frames: int, mode: str, target_frames: list[int], frame_stride: int = 1,
                  frame_sample: int = 1, max_frames: int = 129) -> list[tuple[int, int]]:
    """(start, T) clips of a video with `num_frames` frames (as Musubi Tuner cuts them).

    head:    start 0 for each T <= L
    chunk:   starts 0, T, 2T, ... while start + T <= L
    slide:   starts 0, s, 2s, ... <= L - T (s = frame_stride)
    uniform: `frame_sample` starts spread evenly over [0, L - T] (truncated to int); frame_sample 1 = head
    full:    one clip from 0 with T = min(L, max_frames) rounded down to 4k + 1 (target_frames ignored)
    Targets longer than the video give no clip."""
    L = num_frames
    if mode not in FRAME_EXTRACTION_MODES:
        raise invalid("frame_extraction", mode, f"one of {list(FRAME_EXTRACTION_MODES)}")
    if L <= 0:
        return []
    if mode == "full":
        return [(0, round_down_4k1(min(L, max_frames)))]
    if mode == "uniform" and frame_sample == 1:
        mode = "head"
    clips: list[tuple[int, int]] = []
    for T in target_frames:
        if T > L:
            continue
        if mode == "head":
            starts = [0]
        elif mode == "chunk":
            starts = list(range(0, L - T + 1, T))
        elif mode == "slide":
            starts = list(range(0, L - T + 1, frame_stride))
        else:  # uniform
            starts = [int(x) for x in np.linspace(0, L - T, frame_sample)]
        clips.extend((s, T) for s in starts)
    return clips


def frames_needed(mode: str, target_frames: list[int], max_frames: int) -> int | None:
    """How many (post-drop) frames decoding must produce; None = the whole video."""
    if mode == "head":
        return max(target_frames)
    if mode == "full":
        return max_frames
    return None


def keep_frame(i: int, source_fps: float | None, target_fps: float | None) -> bool:
    """Whether decoded frame i survives `source_fps` -> `target_fps` dropping.

    Frame i maps to target index floor(i * target / source); it is dropped when it maps to the same index as frame
    i - 1. Frames are never duplicated, so a source slower than the target keeps every frame."""
    if not source_fps or not target_fps or target_fps >= source_fps:
        return True
    if i == 0:
        return True
    # Integer arithmetic on a common scale avoids float drift over thousands of frames.
    scale = 1000
    t, s = round(target_fps * scale), round(source_fps * scale)
    return (i * t) // s != ((i - 1) * t) // s


def kept_frame_indices(num_frames: int, source_fps: float | None, target_fps: float | None) -> list[int]:
    return [i for i in range(num_frames) if keep_frame(i, source_fps, target_fps)]


__all__ = ["FRAME_EXTRACTION_MODES", "round_down_4k1", "normalize_target_frames", "extract_clips", "frames_needed",
           "keep_frame", "kept_frame_indices"]
