"""What every family's loader nodes share: model file choices, file identity, and the pack's model registry.

Files are listed from ComfyUI's own model folders; tiny random-weight presets (real architectures and key names)
follow, so graphs also run without any download. Loaded models go through the pack registry (nodes/registry.py): a
re-run (or an evicted cache entry) never loads a second copy.
"""

from __future__ import annotations

import os

import torch

from . import comfy_compat as compat
from .registry import MODELS
from ..engine.errors import invalid

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_choices(presets: list[str], folder: str) -> list[str]:
    """Files of ComfyUI's model folder first (a combo's first entry is a new node's default: a user's real model,
    not a test preset), then the tiny presets."""
    return compat.list_model_files(folder) + presets


def resolve_source(name: str, folder: str, field: str) -> str:
    """A preset name stays as it is; a file name becomes its full path in ComfyUI's model folder."""
    if name.startswith("preset:"):
        return name
    path = compat.model_file_path(folder, name)
    if path is None:
        if os.path.isfile(name):
            return name
        raise invalid(field, name, f"a file in ComfyUI's models/{folder} folder(s) {compat.model_folders(folder)} "
                                   "or a preset")
    return path


def owner_of(node, unique_id) -> tuple | None:
    """The registry owner of a loader node: its class and node id (None outside a prompt: no bound applies)."""
    return None if unique_id is None else (type(node).__name__, str(unique_id))


def room_for(source: str, prompt, load):
    """`load`, preceded under RAM pressure by releasing the models of loader nodes that are not in this prompt
    (another workflow's): ComfyUI's RAM-pressure cache cannot free what the registry holds."""
    def create():
        if isinstance(prompt, dict) and not source.startswith("preset:") and os.path.isfile(source):
            keep = {(node.get("class_type"), str(nid)) for nid, node in prompt.items() if isinstance(node, dict)}
            MODELS.make_room(os.path.getsize(source), keep)
        return load()
    return create


def source_identity(source: str) -> tuple:
    if source.startswith("preset:"):
        return (source,)
    st = os.stat(source)
    return (os.path.realpath(source), st.st_size, st.st_mtime_ns)
