"""The one rule for every folder or file a graph input makes the pack write to (output_dir, cache directories,
save prefixes, output names):

* it must lie inside one of ComfyUI's own folders: output, input, temp, models, or a model folder registered with
  ComfyUI (extra_model_paths.yaml);
* the check is made on the real path: `..`, absolute paths and symlinks that lead out of those folders are refused;
* `MUSUBI_ALLOW_ANY_PATH=1` in the environment of the ComfyUI server lifts the rule (for a single-user machine that
  keeps its training runs on another disk). A shared workflow can never set it.

Reading (dataset folders, TOML files, LoRA files given by full path) is not restricted: only writes are.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import comfy_compat as compat
from ..engine.errors import invalid

ALLOW_ANY_PATH_ENV = "MUSUBI_ALLOW_ANY_PATH"


def any_path_allowed() -> bool:
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def allowed_roots() -> list[Path]:
    return list(dict.fromkeys(_real(f) for f in compat.user_folders()))


def outside_problem(path) -> str | None:
    """None when writing to `path` is allowed, else why not (for VALIDATE_INPUTS and errors)."""
    if any_path_allowed():
        return None
    real = _real(path)
    roots = allowed_roots()
    if any(real == r or r in real.parents for r in roots):
        return None
    return (f"{str(path)!r} resolves to {str(real)!r}, outside ComfyUI's output, input and models folders; "
            f"use a folder inside them, or start ComfyUI with {ALLOW_ANY_PATH_ENV}=1 to allow any folder")


def check_write_path(path, field: str) -> Path:
    """`path` (expanded), refused naming `field` when it leads outside ComfyUI's folders."""
    problem = outside_problem(path)
    if problem:
        raise invalid(field, str(path), f"a path inside ComfyUI's output, input or models folders ({problem})")
    return Path(os.path.expanduser(str(path)))


def resolve_write_folder(text: str, field: str, default: Path, base: Path | None = None) -> Path:
    """A folder input: empty = `default`; relative = inside `base` (ComfyUI's output folder); absolute = as given.
    Whatever it is, it must pass the rule above."""
    text = (text or "").strip()
    if not text:
        return check_write_path(default, field)
    p = Path(os.path.expanduser(text))
    if not p.is_absolute():
        p = Path(base if base is not None else compat.output_directory()) / p
    return check_write_path(p, field)


def folder_problem(text) -> str | None:
    """VALIDATE_INPUTS check of a folder input (empty = the node's default, always fine)."""
    text = str(text or "").strip()
    if not text:
        return None
    p = Path(os.path.expanduser(text))
    if not p.is_absolute():
        p = Path(compat.output_directory()) / p
    return outside_problem(p)
