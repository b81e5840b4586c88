"""FramePack section schedules, per-section SPECs and one-frame indices: pure functions, no model.

A FramePack video is `sections` windows of `lws` latent frames (latent window size, default 9) after one start latent:
output latent frames = sections * lws + 1, pixel frames = sections * lws * 4 + 1. Each section is one DiT sampling
run over `lws` new latents that attend to "clean" latents placed at explicit RoPE frame indices:

* clean_latents    [B, 16, 2, h, w]   start latent (+ the nearest history latent: "post" / F1's "1x")
* clean_latents_2x [B, 16, 2, h, w]   the next 2 history latents (the DiT downsamples them 2x)
* clean_latents_4x [B, 16, 16, h, w]  the next 16 history latents (downsampled 4x)

Original FramePack ("inverted anti-drifting") samples the sections last-in-time first; its history buffer holds the
latents *after* the section (front = nearest), seeded with the end image latent (or zeros). FramePack-F1 samples
forward; its history holds the latents *before* the section (back = nearest). Index layouts (Musubi Tuner,
`fpack_generate_video.py` / `fpack_cache_latents.py`):

    original, padding p:  [start 0 | blank p*lws | target lws | post 1 | 2x 2 | 4x 16]
    F1:                   [start 0 | 4x 1..16 | 2x 17..18 | 1x 19 | target 20..19+lws]
    one frame:            target at `target_index` (default lws), controls at `control_index`, zero post at 1+lws,
                          2x zeros at lws+2..lws+3, 4x zeros at lws+4..lws+19

A section's "time index" counts from the start of the video (0 = the section right after the start frame), its
"generation order" counts sampling runs. Musubi's section caches are numbered by time index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ...errors import invalid

DEFAULT_LATENT_WINDOW_SIZE = 9
SECTION_COUNT_FPS = 30   # Musubi counts sections at 30 fps whatever `--fps` says
N_POST, N_2X, N_4X = 1, 2, 16
HISTORY_LEN = N_POST + N_2X + N_4X   # 19 history latents feed each section

# Where the clean latents come from, per history slot (`SectionPlan.clean_sources` etc.):
START = "start"   # the section's start-image latent
END = "end"       # the end-image latent (original schedule only; zeros when there is no end image)
# an int = that latent frame of the output video; None = zeros


# --- lengths --------------------------------------------------------------------------------------------------------

def _check_lws(lws) -> int:
    if isinstance(lws, bool) or not isinstance(lws, (int, np.integer)) or lws < 1:
        raise invalid("latent_window_size", lws, "a positive integer (FramePack's default is 9)")
    return int(lws)


def section_count(video_seconds: float, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE,
                  fps: int = SECTION_COUNT_FPS) -> int:
    """Sections for a video length: max(round(seconds * 30 / (lws * 4)), 1) (Python's round: halves go to even).

    5 s, lws 9 -> 150 / 36 = 4.17 -> 4 sections. Musubi always uses 30 here (not its `--fps`)."""
    lws = _check_lws(latent_window_size)
    if not isinstance(video_seconds, (int, float)) or isinstance(video_seconds, bool) or not video_seconds > 0:
        raise invalid("video_seconds", video_seconds, "a length in seconds > 0")
    return int(max(round(video_seconds * fps / (lws * 4)), 1))


def seconds_for_sections(sections: int, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE,
                         fps: float = SECTION_COUNT_FPS) -> float:
    """Musubi's `--video_sections` -> seconds: (sections * lws * 4 + 1) / fps. With fps 30 (the count's rate),
    `section_count` gives `sections` back; Musubi passes its `--fps` here, so another fps changes the count."""
    lws = _check_lws(latent_window_size)
    if isinstance(sections, bool) or not isinstance(sections, (int, np.integer)) or sections < 1:
        raise invalid("video_sections", sections, "a positive integer")
    return (int(sections) * lws * 4 + 1) / fps


def frames_per_section(latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE) -> int:
    """Pixel frames one section decodes to: lws * 4 - 3 (33 for 9)."""
    return _check_lws(latent_window_size) * 4 - 3


def total_latent_frames(sections: int, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE) -> int:
    """Latent frames of the whole video: start latent + sections * lws."""
    return int(sections) * _check_lws(latent_window_size) + 1


def total_pixel_frames(sections: int, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE) -> int:
    return (total_latent_frames(sections, latent_window_size) - 1) * 4 + 1


# --- schedules ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SectionPlan:
    """One sampling run. Index tuples are the DiT's RoPE frame positions ([n] per batch row)."""

    order: int                       # generation order: 0 = sampled first
    index: int                       # time index: 0 = first section after the start frame
    index_from_last: int             # index - sections (-1 = last in time); section SPECs look this up first
    latent_padding: int              # original: blank windows between start and target; F1: 0
    latent_indices: tuple[int, ...]              # [lws] positions of the latents sampled
    clean_latent_indices: tuple[int, ...]        # [2] (start, post) / F1 (start, 1x)
    clean_latent_2x_indices: tuple[int, ...]     # [2]
    clean_latent_4x_indices: tuple[int, ...]     # [16]
    clean_sources: tuple                         # [2] what feeds clean_latents: START, then a frame / END / None
    sources_2x: tuple                            # [2] output frame, END or None (zeros) per 2x slot
    sources_4x: tuple                            # [16] likewise per 4x slot
    output_frames: tuple[int, int]               # [start, stop) of the output latent frames it produces
    is_last: bool                    # last sampling run; original: first in time, the start latent is prepended
                                     # to its output (and to the history)
    f1: bool = False


def default_latent_paddings(sections: int) -> list[int]:
    """Original schedule, generation order: [n-1, ..., 1, 0]; above 4 sections [3, 2, ..., 2, 1, 0] (FramePack's
    trick: repeating 2 looks better than growing paddings)."""
    if sections > 4:
        return [3] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


def latent_paddings(sections: int, override: Sequence[int] | str | None = None) -> list[int]:
    """Paddings in generation order. `override` (Musubi's `--latent_paddings`, a list or "3,2,1,0"): a shorter list
    replaces the first defaults, a longer one is cut to `sections` (as Musubi does)."""
    default = default_latent_paddings(sections)
    if override is None:
        return default
    if isinstance(override, str):
        try:
            override = [int(x) for x in override.split(",")]
        except ValueError:
            raise invalid("latent_paddings", override, "comma-separated non-negative integers, e.g. \"3,2,1,0\"") \
                from None
    values = list(override)
    if not values or any(isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 0 for p in values):
        raise invalid("latent_paddings", values, "a non-empty list of non-negative integers (one per section, in "
                                                   "generation order)")
    values = [int(p) for p in values]
    return values[:sections] + default[len(values):]


def _check_sections(sections) -> int:
    if isinstance(sections, bool) or not isinstance(sections, (int, np.integer)) or sections < 1:
        raise invalid("sections", sections, "a positive integer")
    return int(sections)


def original_schedule(sections: int, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE,
                      paddings: Sequence[int] | str | None = None) -> list[SectionPlan]:
    """The inverted anti-drifting schedule in generation order (time index sections-1 down to 0).

    History buffer at each run: [frames after this section in time..., END, zeros...]; post/2x/4x read its first
    1/2/16 slots (`split_history`). Paddings only move the target's indices, never the history."""
    n, lws = _check_sections(sections), _check_lws(latent_window_size)
    total = total_latent_frames(n, lws)
    plans = []
    for order, p in enumerate(latent_paddings(n, paddings)):
        index = n - 1 - order
        base = 1 + p * lws                                     # first target position
        post = base + lws
        # buffer slot j holds output frame first + j while inside the video; the next slot is the end image
        first = 1 + (index + 1) * lws
        slots = tuple(first + j if first + j < total else (END if first + j == total else None)
                      for j in range(HISTORY_LEN))
        plans.append(SectionPlan(
            order=order, index=index, index_from_last=index - n, latent_padding=p,
            latent_indices=tuple(range(base, base + lws)),
            clean_latent_indices=(0, post),
            clean_latent_2x_indices=(post + 1, post + 2),
            clean_latent_4x_indices=tuple(range(post + 3, post + 3 + N_4X)),
            clean_sources=(START, slots[0]), sources_2x=slots[1:3], sources_4x=slots[3:],
            output_frames=(0 if index == 0 else 1 + index * lws, 1 + (index + 1) * lws),
            is_last=index == 0))
    return plans


def f1_schedule(sections: int, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE) -> list[SectionPlan]:
    """FramePack-F1: sections in time order; history = the 19 latents right before the target (zeros before the
    video's start), read as 4x = the oldest 16, 2x = the next 2, 1x = the newest (`split_history`)."""
    n, lws = _check_sections(sections), _check_lws(latent_window_size)
    target = 1 + N_4X + N_2X + N_POST                       # 20: first target position
    plans = []
    for index in range(n):
        first = 1 + index * lws                              # output frame of the first target latent
        slots = tuple(f if f >= 0 else None for f in range(first - HISTORY_LEN, first))   # oldest .. newest
        plans.append(SectionPlan(
            order=index, index=index, index_from_last=index - n, latent_padding=0,
            latent_indices=tuple(range(target, target + lws)),
            clean_latent_indices=(0, target - 1),
            clean_latent_2x_indices=(1 + N_4X, 2 + N_4X),
            clean_latent_4x_indices=tuple(range(1, 1 + N_4X)),
            clean_sources=(START, slots[-1]), sources_2x=slots[N_4X:N_4X + N_2X], sources_4x=slots[:N_4X],
            output_frames=(first, first + lws), is_last=index == n - 1, f1=True))
    return plans


def schedule(sections: int, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE, *, f1: bool = False,
             paddings: Sequence[int] | str | None = None) -> list[SectionPlan]:
    """`f1_schedule` or `original_schedule` (F1 ignores paddings, as Musubi)."""
    return f1_schedule(sections, latent_window_size) if f1 else original_schedule(sections, latent_window_size,
                                                                                  paddings)


def initial_history(latent: torch.Tensor, end_latent: torch.Tensor | None = None, *, f1: bool = False,
                    start_latent: torch.Tensor | None = None) -> torch.Tensor:
    """The history buffer before the first run: [B, 16, 19, h, w] zeros (`latent`: any [B, C, F, h, w] giving the
    shape). Original: the end latent in slot 0 (the first run's post). F1: the start latent appended ([.., 20, ..])."""
    b, c, _, h, w = latent.shape
    hist = torch.zeros(b, c, HISTORY_LEN, h, w, dtype=torch.float32, device=latent.device)
    if f1:
        if start_latent is None:
            raise invalid("F1 start latent", None, "the start image latent [B, 16, 1, h, w]")
        return torch.cat([hist, start_latent.to(hist)], dim=2)
    if end_latent is not None:
        hist[:, :, :1] = end_latent.to(hist)
    return hist


def split_history(history: torch.Tensor, f1: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """History [B, C, T, h, w] -> (post or 1x [.., 1, ..], 2x [.., 2, ..], 4x [.., 16, ..])."""
    if f1:
        h4, h2, h1 = history[:, :, -HISTORY_LEN:].split([N_4X, N_2X, N_POST], dim=2)
        return h1, h2, h4
    post, h2, h4 = history[:, :, :HISTORY_LEN].split([N_POST, N_2X, N_4X], dim=2)
    return post, h2, h4


def update_history(history: torch.Tensor, generated: torch.Tensor, plan: SectionPlan,
                   start_latent: torch.Tensor | None = None) -> torch.Tensor:
    """After a run: original prepends its latents (the start latent first on the last run), F1 appends them."""
    if plan.f1:
        return torch.cat([history, generated.to(history)], dim=2)
    if plan.is_last:
        if start_latent is None:
            raise invalid("start latent", None, "the start image latent for the first section in time")
        generated = torch.cat([start_latent.to(generated), generated], dim=2)
    return torch.cat([generated.to(history), history], dim=2)


def index_tensor(indices: Sequence[int] | None, batch: int = 1) -> torch.Tensor | None:
    """Index tuple -> [B, n] int64 (the DiT's input form); None stays None."""
    if indices is None:
        return None
    return torch.tensor(list(indices), dtype=torch.int64).unsqueeze(0).expand(batch, -1).contiguous()


# --- per-section values (prompts, start images) ---------------------------------------------------------------------

_SPEC = re.compile(r"^\s*(-?\d+)(?:\s*-\s*(\d+))?\s*$")


def spec_indices(spec, sections: int) -> list[int]:
    """One SPEC -> the section indices it names: `N` (time index), `-N` (from the end: -1 = last), `S-E` (S..E
    inclusive). Indices outside the video are refused (Musubi ignores them silently)."""
    n = _check_sections(sections)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        start = end = int(spec)
    else:
        m = _SPEC.match(str(spec)) if isinstance(spec, str) else None
        if m is None:
            raise invalid("section SPEC", spec, "N, -N or S-E (section indices, 0 = first section, -1 = last)")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        if m.group(2) is not None and (start < 0 or end < start):
            raise invalid("section SPEC", spec, "a range S-E with 0 <= S <= E")
    lo = -n if start < 0 else 0
    if not lo <= start <= n - 1 or end > n - 1:
        raise invalid("section SPEC", spec, f"indices in 0..{n - 1} or -{n}..-1 (this video has {n} sections)")
    return list(range(start, end + 1))


def resolve_section_values(specs, sections: int) -> list:
    """Per-section values (prompts, images), time order, from {SPEC: value} or [(SPEC, value), ...].

    Musubi's rules: later entries overwrite earlier ones for the same index; section i takes the value given for
    i - sections (its index from the end) if any, else for i, else section 0's; when no SPEC names section 0, section
    0 takes the value of the smallest non-negative index (or of the smallest index when all are negative)."""
    n = _check_sections(sections)
    pairs = list(specs.items()) if isinstance(specs, dict) else list(specs)
    if not pairs:
        raise invalid("section values", specs, "at least one SPEC: value (e.g. {\"0\": ...})")
    table: dict[int, object] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise invalid("section values", pair, "(SPEC, value) pairs")
        for i in spec_indices(pair[0], n):
            table[i] = pair[1]
    if 0 not in table:
        keys = list(table)
        table[0] = table[min(keys) if all(k < 0 for k in keys) else min(k for k in keys if k >= 0)]
    return [table.get(i - n, table.get(i, table[0])) for i in range(n)]


def parse_section_string(text: str) -> list[tuple[str, str]]:
    """Musubi's `SPEC:value;;;SPEC:value` string -> [(SPEC, value)]. Without `;;;` the whole string is section 0's
    value; a part without `:` is section 0's too. A part whose text before the first `:` is a single letter (a
    Windows drive, `C:\\img.png`) is a value for section 0 (Musubi would cut it at the colon); any other text that is
    not a SPEC is refused."""
    if not isinstance(text, str):
        raise invalid("section string", text, "a string like \"0:first;;;-1:last\"")
    if ";;;" not in text:
        return [("0", text)]
    out = []
    for part in text.split(";;;"):
        head, sep, value = part.partition(":")
        if not sep or re.fullmatch(r"\s*[A-Za-z]\s*", head):
            out.append(("0", part.strip()))
        elif _SPEC.match(head):
            out.append((head.strip(), value.strip()))
        else:
            raise invalid("section string part", part, "SPEC:value with SPEC N, -N or S-E")
    return out


# --- one-frame inference / training ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class OneFrameOptions:
    """Musubi's `--one_frame_inference` options."""

    target_index: int | None = None                  # None = latent_window_size
    control_indices: tuple[int, ...] | None = None   # placed over the clean slots in order (default 0 each)
    no_post: bool = False                            # no zero "post" latent at 1 + lws
    no_2x: bool = False
    no_4x: bool = False


def parse_one_frame_options(text: str) -> OneFrameOptions:
    """"target_index=1,control_index=0;10,no_post,no_2x,no_4x" (and `default`, which changes nothing).
    Unknown options are refused (Musubi ignores them)."""
    opts: dict = {}
    for raw in str(text).split(","):
        item = raw.strip()
        try:
            if item in ("", "default"):
                continue
            if item in ("no_post", "no_2x", "no_4x"):
                opts[item] = True
            elif item.startswith("target_index="):
                opts["target_index"] = int(item.split("=", 1)[1])
            elif item.startswith("control_index="):
                opts["control_indices"] = tuple(int(x) for x in item.split("=", 1)[1].split(";"))
            else:
                raise ValueError
        except ValueError:
            raise invalid("one-frame option", item, "default, no_post, no_2x, no_4x, target_index=N or "
                                                    "control_index=a;b") from None
    return OneFrameOptions(**opts)


@dataclass(frozen=True)
class OneFrameIndices:
    latent_indices: tuple[int, ...]                  # [1] the target's position
    clean_latent_indices: tuple[int, ...]            # [n_controls (+1 post)]
    clean_latent_2x_indices: tuple[int, ...] | None  # [2] or None (no_2x)
    clean_latent_4x_indices: tuple[int, ...] | None  # [16] or None (no_4x)
    post_slot: int | None                            # slot of the zero post latent in clean_latents


def one_frame_indices(options: OneFrameOptions, latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE,
                      controls: int = 1) -> OneFrameIndices:
    """Indices of one-frame inference (Musubi's `generate_with_one_frame_inference`).

    Clean slots: one per control latent (a zero latent when there is none), then the zero post unless no_post; all
    start at 0, the post at 1 + lws; `control_indices` overwrite the slots in order — including the post slot when
    there are more indices than controls (Musubi); more indices than slots are refused. 2x / 4x positions follow
    the post (lws+2.., lws+4..) whether or not the post is used."""
    lws = _check_lws(latent_window_size)
    n_ctrl = max(1, int(controls))
    idx = [0] * n_ctrl + ([] if options.no_post else [1 + lws])
    if options.control_indices is not None:
        ci = [int(i) for i in options.control_indices]
        if len(ci) > len(idx) or any(i < 0 for i in ci):
            raise invalid("one-frame control_index", ci, f"at most {len(idx)} non-negative indices ({n_ctrl} "
                                                         f"control latent(s){'' if options.no_post else ' + post'})")
        idx[:len(ci)] = ci
    target = lws if options.target_index is None else int(options.target_index)
    if target < 0:
        raise invalid("one-frame target_index", target, "a non-negative frame index (default: latent_window_size)")
    return OneFrameIndices(
        latent_indices=(target,), clean_latent_indices=tuple(idx),
        clean_latent_2x_indices=None if options.no_2x else (lws + 2, lws + 3),
        clean_latent_4x_indices=None if options.no_4x else tuple(range(lws + 4, lws + 4 + N_4X)),
        post_slot=None if options.no_post else n_ctrl)


@dataclass
class OneFrameInputs:
    indices: OneFrameIndices
    clean_latents: torch.Tensor                      # [B, 16, n, h, w] controls (masked) + zero post
    clean_latents_2x: torch.Tensor | None            # [B, 16, 2, h, w] zeros
    clean_latents_4x: torch.Tensor | None            # [B, 16, 16, h, w] zeros


def one_frame_inputs(options: OneFrameOptions, control_latents: Sequence[torch.Tensor], latent_shape,
                     latent_window_size: int = DEFAULT_LATENT_WINDOW_SIZE,
                     masks: Sequence[torch.Tensor | None] | None = None) -> OneFrameInputs:
    """Clean latents of one-frame inference: controls [B, 16, 1, h, w] each (none: one zero latent), masks
    ([1, 1, 1, h, w] from `latent_mask`, None = unmasked) multiplied into their control, then the zero post; 2x/4x
    zeros. `latent_shape` = (B, C, h, w)."""
    b, c, h, w = latent_shape
    ctrls = [t.to(torch.float32) for t in control_latents] or [torch.zeros(b, c, 1, h, w)]
    for i, t in enumerate(ctrls):
        if tuple(t.shape) != (b, c, 1, h, w):
            raise invalid(f"one-frame control latent {i}", tuple(t.shape), f"{(b, c, 1, h, w)}")
    masks = list(masks or [])
    if len(masks) > len(ctrls):
        raise invalid("one-frame control masks", f"{len(masks)} masks", f"at most one per control ({len(ctrls)})")
    ctrls = [t * m.to(t) if m is not None else t for t, m in zip(ctrls, masks + [None] * len(ctrls))]
    idx = one_frame_indices(options, latent_window_size, len(control_latents))
    if idx.post_slot is not None:
        ctrls.append(torch.zeros(b, c, 1, h, w))
    z2 = None if idx.clean_latent_2x_indices is None else torch.zeros(b, c, N_2X, h, w)
    z4 = None if idx.clean_latent_4x_indices is None else torch.zeros(b, c, N_4X, h, w)
    return OneFrameInputs(idx, torch.cat(ctrls, dim=2), z2, z4)


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A mask image ([H, W] or [H, W, 1] uint8, 255 = keep, 0 = ignore; e.g. a control image's alpha) -> [1, 1, 1, h, w]
    float32 in [0, 1]: LANCZOS-resized straight to the latent size (Musubi: no crop, so a mask whose aspect differs
    from the bucket is stretched while the image itself is center-cropped)."""
    from PIL import Image

    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise invalid("control mask", f"{arr.dtype} {tuple(arr.shape)}", "a [H, W] uint8 grayscale mask")
    h, w = latent_hw
    small = np.array(Image.fromarray(arr, mode="L").resize((int(w), int(h)), Image.Resampling.LANCZOS))
    return torch.from_numpy(small).float().div(255.0)[None, None, None]


def alpha_mask(image: np.ndarray) -> np.ndarray | None:
    """[H, W, 4] RGBA -> its alpha [H, W] uint8 (Musubi's control mask); RGB -> None."""
    arr = np.asarray(image)
    return arr[..., 3].copy() if arr.ndim == 3 and arr.shape[-1] == 4 else None


__all__ = ["DEFAULT_LATENT_WINDOW_SIZE", "SECTION_COUNT_FPS", "HISTORY_LEN", "START", "END", "section_count",
           "seconds_for_sections", "frames_per_section", "total_latent_frames", "total_pixel_frames", "SectionPlan",
           "default_latent_paddings", "latent_paddings", "original_schedule", "f1_schedule", "schedule",
           "initial_history", "split_history", "update_history", "index_tensor", "spec_indices",
           "resolve_section_values", "parse_section_string", "OneFrameOptions", "parse_one_frame_options",
           "OneFrameIndices", "one_frame_indices", "OneFrameInputs", "one_frame_inputs", "latent_mask", "alpha_mask"]
