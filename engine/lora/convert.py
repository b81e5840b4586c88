"""Convert a LoRA from any dialect to any format, preserving ΔW (see writer.py for the formats)."""

from __future__ import annotations

from pathlib import Path

import torch

from .dialects import read_lora
from .writer import refuse_overwrite, save_lora


def convert_lora(in_path, out_path, format: str = "comfyui", model=None, metadata: dict | None = None,
                 dtype=torch.float32) -> Path:
    """Read `in_path` (any dialect; `model` resolves underscore names exactly) and write it as `format`.

    The input metadata is kept (the caller's `metadata` entries win) and the hashes are recomputed."""
    refuse_overwrite(out_path, [in_path])
    lora = read_lora(in_path, model=model)
    meta = {k: v for k, v in lora.metadata.items() if not k.startswith("sshs_")}
    meta.update(metadata or {})
    meta["musubi_converted_from"] = f"{Path(in_path).name} ({lora.dialect})"
    return save_lora(lora, out_path, format=format, metadata=meta, dtype=dtype, input_paths=[in_path])
