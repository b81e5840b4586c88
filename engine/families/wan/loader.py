"""Load a Wan DiT from a user's file (or a tiny preset) into a ready `WanModel`.

Steps: open the checkpoint as a streaming view -> strip the ComfyUI prefix -> detect the config (refusing VAE/T5/
CLIP/other-family files) -> check the task -> build the model on the meta device -> stream every tensor into it
(scaled fp8 is dequantized by the checkpoint reader). No second full copy of the weights is made in RAM.

dtype: bf16/fp16/fp32 casts the floating weights; None keeps the file's precision, except fp8 files (plain or
ComfyUI scaled) which are dequantized to bf16. Time embedding/projection, modulations and the output head compute in
float32 and are stored in float32, or in `dtype` when the file stores them in it (`dit.keep_fp32`). fp8-resident weights are added by `engine.memory` on top of this loader.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint import Checkpoint, load_into_module
from ...errors import invalid
from .detect import detect_wan_config, require_task, strip_wan_prefix
from .dit import WanConfig, WanModel, build_wan_model, keep_fp32
from .presets import build_preset_state_dict

PRESET_PREFIX = "preset:"
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def open_wan_checkpoint(source: str | Path) -> Checkpoint:
    """A prefix-stripped checkpoint view of a file path or `preset:<name>`."""
    if isinstance(source, str) and source.startswith(PRESET_PREFIX):
        name = source[len(PRESET_PREFIX):]
        return Checkpoint.from_state_dict(build_preset_state_dict(name), source)
    return strip_wan_prefix(Checkpoint.open(source))


def resolve_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        # like Musubi Tuner, the precision of a big block Linear (in ComfyUI scaled-fp8 files biases and norms stay
        # in bf16/fp32, so a count over all keys would not see the fp8)
        stored = ckpt.dtype("blocks.0.cross_attn.k.weight")
        return stored if stored in _COMPUTE_DTYPES else torch.bfloat16   # fp8 (plain or scaled) -> bf16
    if dtype not in _COMPUTE_DTYPES:
        raise invalid("DiT dtype", dtype, f"one of {_COMPUTE_DTYPES} or None (keep the file's precision)")
    return dtype


FP8_MODES = (None, "e4m3", "scaled")


def _config(ckpt: Checkpoint, source) -> WanConfig:
    config = detect_wan_config(ckpt)
    if isinstance(source, str) and source.startswith(PRESET_PREFIX):
        config.variant = source[len(PRESET_PREFIX):]
    elif ckpt.metadata.get("musubi_preset"):             # a preset written to disk by write_preset_checkpoint
        config.variant = ckpt.metadata["musubi_preset"]
    return config


def read_wan_config(source: str | Path) -> WanConfig:
    """The config `load_wan_dit` would load, from the file's header only (no weights read)."""
    return _config(open_wan_checkpoint(source), source)


def load_wan_dit(source: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu",
                 attention_backend: str = "sdpa", expected_task: str | None = None, fp8: str | None = None) -> WanModel:
    """A `WanModel` in eval mode with `model.config` and `model.source_path` set.

    fp8: None keeps `dtype` everywhere; "e4m3" (plain cast) or "scaled" (block-wise scales) stores the block Linears
    in float8_e4m3fn (`engine.memory.Fp8Linear`; Musubi's Wan excludes stay in `dtype`). fp8 tensors of the file
    (plain or ComfyUI scaled fp8) are used as they are, never upcast first: peak RAM is the fp8 model plus one tensor.
    """
    if fp8 not in FP8_MODES:
        raise invalid("fp8", fp8, f"one of {FP8_MODES}")
    ckpt = open_wan_checkpoint(source)
    config = _config(ckpt, source)
    if expected_task is not None:
        require_task(config, expected_task, str(source))
    target = resolve_dtype(ckpt, dtype)

    model = build_wan_model(config, "meta")
    model.attention_backend = attention_backend

    def keep_float32(name: str) -> bool:   # stored in `target` only where that is what the file has: exact
        return keep_fp32(name) and not (name in ckpt and ckpt.dtype(name) == target)

    if fp8 is None:
        unused = load_into_module(model, ckpt, dtype=target, device=device, keep_dtype=keep_float32)
    else:
        from ...memory.fp8 import load_fp8_checkpoint

        unused = load_fp8_checkpoint(model, ckpt, mode=fp8, dtype=target, device=device, keep_dtype=keep_float32)
    if unused:
        raise invalid(f"DiT file {source}", f"{len(unused)} unexpected tensors, e.g. {unused[:3]}",
                      f"only the weights of a {config.variant} Wan DiT")
    model.source_path = str(source)
    return model.eval().requires_grad_(False)
