"""Load a FramePack DiT from a user's file(s) (or a tiny preset) into a ready `FramePackModel`.

Steps: open the checkpoint as a streaming view (a shard, the index json or the model folder opens every shard) ->
prefix stripped -> detect the config (refusing HunyuanVideo/Wan/VAE/text-encoder files) -> build the model on the
meta device -> stream every tensor into it (scaled fp8 is dequantized by the checkpoint reader). No second full copy
of the weights is made in RAM.

dtype: bf16/fp16/fp32 casts the floating weights; None keeps the file's precision, except fp8 files (plain or ComfyUI
scaled) which are dequantized to bf16. `proj_out` is kept in float32 whatever the dtype (the reference's float32
output projection). fp8="e4m3"/"scaled" keeps the block Linears in float8 (`engine.memory.fp8`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...checkpoint import Checkpoint, load_into_module
from ...errors import invalid
from .detect import detect_framepack_config, open_view
from .dit import FP8_EXCLUDE, FP8_INCLUDE, FP32_MODULES, FramePackModel, build_framepack_model
from .presets import build_preset_state_dict

PRESET_PREFIX = "preset:"
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_MODES = (None, "e4m3", "scaled")
_PROBE_KEY = "transformer_blocks.0.attn.to_q.weight"     # a big block Linear: its dtype is the file's precision


def open_framepack_checkpoint(source: str | Path) -> Checkpoint:
    """A checkpoint view (the checkpoint's names) of a file, an index json, a model folder or `preset:<name>`."""
    if isinstance(source, str) and source.startswith(PRESET_PREFIX):
        name = source[len(PRESET_PREFIX):]
        return Checkpoint.from_state_dict(build_preset_state_dict(name), source)
    return open_view(Checkpoint.open(source))


def resolve_dtype(ckpt: Checkpoint, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is None:
        # the precision of a big block Linear (ComfyUI scaled-fp8 files keep biases and norms in bf16/fp32)
        stored = ckpt.dtype(_PROBE_KEY)
        return stored if stored in _COMPUTE_DTYPES else torch.bfloat16   # fp8 (plain or scaled) -> bf16
    if dtype not in _COMPUTE_DTYPES:
        raise invalid("DiT dtype", dtype, f"one of {_COMPUTE_DTYPES} or None (keep the file's precision)")
    return dtype


def _keep_fp32(name: str) -> bool:
    return name.startswith(FP32_MODULES)


def load_framepack_dit(source: str | Path, dtype: torch.dtype | None = torch.bfloat16,
                       device: torch.device | str = "cpu", attention_backend: str = "sdpa",
                       fp8: str | None = None) -> FramePackModel:
    """A `FramePackModel` in eval mode with `model.config` and `model.source_path` set.

    fp8: None keeps `dtype` everywhere; "e4m3" (plain cast) or "scaled" (block-wise scales) stores the block Linears
    in float8_e4m3fn (`engine.memory.Fp8Linear`; Musubi's FramePack excludes, every `norm*` module, stay in `dtype`).
    fp8 tensors of the file (plain or ComfyUI scaled fp8) are used as they are, never upcast first."""
    if fp8 not in FP8_MODES:
        raise invalid("fp8", fp8, f"one of {FP8_MODES}")
    ckpt = open_framepack_checkpoint(source)
    config = detect_framepack_config(ckpt)
    if isinstance(source, str) and source.startswith(PRESET_PREFIX):
        config.variant = source[len(PRESET_PREFIX):]
    elif ckpt.metadata.get("musubi_preset"):             # a preset written to disk by write_preset_checkpoint
        config.variant = ckpt.metadata["musubi_preset"]
    target = resolve_dtype(ckpt, dtype)

    model = build_framepack_model(config, "meta")
    model.attention_backend = attention_backend
    if fp8 is None:
        unused = load_into_module(model, ckpt, dtype=target, device=device, keep_dtype=_keep_fp32)
    else:
        from ...memory.fp8 import load_fp8_checkpoint

        unused = load_fp8_checkpoint(model, ckpt, mode=fp8, dtype=target, device=device, keep_dtype=_keep_fp32,
                                     include=FP8_INCLUDE, exclude=FP8_EXCLUDE)
    if unused:
        raise invalid(f"DiT file {source}", f"{len(unused)} unexpected tensors, e.g. {unused[:3]}",
                      f"only the weights of a {config.variant} FramePack DiT")
    model.source_path = str(source)
    return model.eval().requires_grad_(False)
