"""Checks that run when a prompt is queued (ComfyUI's `VALIDATE_INPUTS`), so a bad widget value is refused before
any upstream node (model loading, caching, training) runs.

ComfyUI skips its own min/max/combo checks for every argument a `VALIDATE_INPUTS` declares, so `validate_inputs`
re-checks those against the node's own `INPUT_TYPES` first. Linked inputs are not known at queue time: ComfyUI
leaves them out (the argument keeps its default None) and the node checks them when it runs.
"""

from __future__ import annotations

import os
from typing import Callable

# characters Windows refuses in file names (a workflow shared from Linux must still save there)
_BAD_NAME_CHARS = set('<>:"|?*') | {chr(i) for i in range(32)}


def input_spec(cls, name: str) -> tuple:
    types = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        if name in types.get(section, {}):
            return types[section][name]
    raise KeyError(name)


def validate_inputs(cls, checks: dict[str, Callable[[object], str | None]], **values) -> bool | str:
    """True, or the first problem as `"<input>: <message>"` (ComfyUI shows it under the node)."""
    for name, value in values.items():
        if value is None:
            continue
        spec = input_spec(cls, name)
        opts = spec[1] if len(spec) > 1 else {}
        if "min" in opts and value < opts["min"]:
            return f"{name}: {value} is smaller than the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{name}: {value} is bigger than the maximum {opts['max']}"
        check = checks.get(name)
        problem = check(value) if check is not None else None
        if problem:
            return f"{name}: {problem}"
    return True


# --- the individual checks (None = fine) ------------------------------------------------------------------------
def multiple_of_16(value) -> str | None:
    return None if int(value) % 16 == 0 else f"{value} is not a multiple of 16 (the VAE and the DiT patches need it)"


def frames_4k1(value) -> str | None:
    return None if (int(value) - 1) % 4 == 0 else f"{value} frames is not of the form 4k+1 (1, 5, 9, ..., 81)"


def relative_name(value) -> str | None:
    """A file name or prefix inside the chosen folder: 'name' or 'sub/name', no absolute path, no '..'."""
    text = str(value or "").strip().replace("\\", "/")
    parts = [p for p in text.split("/") if p]
    if not parts:
        return "empty; expected a name such as 'my_lora' or 'folder/my_lora'"
    if text.startswith("/") or os.path.isabs(text) or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        return f"{value!r} is an absolute path; expected a name relative to the output folder"
    if any(p in ("..", ".") for p in parts):
        return f"{value!r} contains '..' or '.'; expected a name inside the output folder"
    bad = sorted({c for c in text if c in _BAD_NAME_CHARS})
    if bad:
        return f"{value!r} contains characters not allowed in file names: {''.join(bad)!r}"
    return None


def plain_file_name(value) -> str | None:
    """One file name, no folders (the training output_name)."""
    problem = relative_name(value)
    if problem:
        return problem
    if "/" in str(value).strip().replace("\\", "/"):
        return f"{value!r} contains a folder; expected a file name only (choose the folder with output_dir)"
    return None


VIDEO_SIZE = {"width": multiple_of_16, "height": multiple_of_16, "frames": frames_4k1}


def size_inputs(width: int = 832, height: int = 480, frames: int | None = 81) -> dict:
    """The width / height (/ frames) widgets of the video nodes, checked by VIDEO_SIZE when a prompt is queued."""
    spec = {"width": ("INT", {"default": width, "min": 16, "max": 4096, "step": 16,
                              "tooltip": "Width in pixels (multiple of 16)."}),
            "height": ("INT", {"default": height, "min": 16, "max": 4096, "step": 16,
                               "tooltip": "Height in pixels (multiple of 16)."})}
    if frames is not None:
        spec["frames"] = ("INT", {"default": frames, "min": 1, "max": 1025, "step": 4,
                                  "tooltip": "Frames, 4k+1 (1 = a still image)."})
    return spec
