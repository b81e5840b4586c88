"""Merge LoRAs into base weights: into a checkpoint file (streaming) or into a live model (restorable)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import atomic_path
from ..checkpoint import SCALED_FP8_MARKER, SCALE_SUFFIX, Checkpoint
from ..errors import invalid
from .dialects import LoRAFile, match_lora, patch_params, read_lora, require_complete, resolved_modules
from .writer import refuse_overwrite

OUT_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp8_e4m3fn": torch.float8_e4m3fn}
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
             torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "")


def _as_lora(item, module_names) -> LoRAFile:
    return item if isinstance(item, LoRAFile) else read_lora(item, module_names=module_names)


def merge_loras_into_checkpoint(base_path, loras, out_path, out_dtype=None, device="cpu", progress=None) -> Path:
    """Write base + Σ multiplier·ΔW to `out_path`, streaming one tensor at a time.

    `loras`: [(path or LoRAFile, multiplier), ...]. The original key layout is kept (a `model.diffusion_model.`
    prefix stays). `out_dtype`: None (keep each tensor's dtype), "bf16", "fp16", "fp32" or "fp8_e4m3fn" (fp8 is
    applied to 2-D `.weight` matrices only; biases, norms and modulation keep their dtype). A ComfyUI scaled-fp8 base
    is dequantized (its scale tensors are dropped) and written in `out_dtype` (bf16 when None).

    Peak RAM: the LoRA files (small) plus about two copies of the largest single tensor (one read, one fp32 sum);
    the output is written tensor by tensor through a streaming safetensors writer, so neither the base nor the merged
    model is ever held in memory as a whole.
    Refuses LoRA keys that match no weight of the base (nothing is written then). `progress(i, total)` runs after
    every tensor and may raise to cancel (the temporary file is removed; the output is untouched).
    """
    if out_dtype not in OUT_DTYPES:
        raise invalid("out_dtype", out_dtype, f"one of {list(OUT_DTYPES)}")
    if not loras:
        raise invalid("loras", loras, "at least one (LoRA, multiplier) pair")
    lora_paths = [p for p, _ in loras if not isinstance(p, LoRAFile)]
    refuse_overwrite(out_path, [base_path, *lora_paths])
    ckpt = Checkpoint.open(base_path)
    refuse_overwrite(out_path, ckpt.files)
    target_dtype = OUT_DTYPES[out_dtype]
    scaled = ckpt.is_scaled_fp8
    if scaled and target_dtype is None:
        target_dtype = torch.bfloat16

    prefix = _detect_prefix(ckpt)
    shapes = {k[len(prefix):-len(".weight")]: ckpt.shape(k) for k in ckpt.weight_keys()
              if k.startswith(prefix) and k.endswith(".weight") and len(ckpt.shape(k)) == 2}
    params = {k[len(prefix):]: tuple(ckpt.shape(k)) for k in ckpt.weight_keys() if k.startswith(prefix)}
    plan: dict[str, list[tuple]] = {}       # checkpoint key -> [(ModuleWeights, multiplier, "weight" | "bias")]
    for item, mult in loras:
        lora = _as_lora(item, shapes)
        label = str(lora.source or "LoRA")
        require_complete(match_lora(lora, shapes, label, params), label)
        for name, mw in resolved_modules(lora, shapes, params).items():
            for path, part in patch_params(name, mw, params):
                plan.setdefault(f"{prefix}{path}", []).append((mw, float(mult), part))

    keys = [k for k in ckpt.weight_keys()] if scaled else [k for k in ckpt.keys() if k != SCALED_FP8_MARKER]
    specs = {}
    for k in keys:
        dt = ckpt.dtype(k)
        if scaled and ckpt.scale_key(k):
            dt = torch.float32
        specs[k] = (_out_dtype(k, dt, ckpt.shape(k), target_dtype), ckpt.shape(k))

    order = {k: i for i, k in enumerate(specs)}

    def produce(key: str) -> torch.Tensor:
        if progress is not None:
            progress(order[key], len(specs))
        w = ckpt.get(key)  # scaled fp8 -> dequantized float32
        adds = plan.get(key)
        if adds:   # in file order, each on the result of the previous one (as ComfyUI stacks patches)
            acc = w.to(device=device, dtype=torch.float32)
            for mw, mult, part in adds:
                acc = mw.patched_weight(acc, mult) if part == "weight" else mw.patched_bias(acc, mult)
            w = acc
        return w.to(device="cpu", dtype=specs[key][0])

    meta = dict(ckpt.metadata)
    meta["musubi_merged_loras"] = json.dumps([[str(getattr(p, "source", p)), m] for p, m in loras])
    write_safetensors_streaming(out_path, specs, produce, meta)
    return Path(out_path)


def _detect_prefix(ckpt: Checkpoint) -> str:
    keys = ckpt.weight_keys()
    for p in _PREFIXES:
        if p and sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p
    return ""


def _out_dtype(key: str, dtype: torch.dtype, shape, target: torch.dtype | None) -> torch.dtype:
    if target is None or not dtype.is_floating_point:
        return dtype
    if target.itemsize == 1 and not (key.endswith(".weight") and len(shape) == 2):
        return dtype if dtype.itemsize > 1 else torch.bfloat16
    return target


def write_safetensors_streaming(path, specs: dict[str, tuple], produce, metadata: dict[str, str] | None) -> None:
    """Write a .safetensors file whose tensors are produced one at a time by `produce(key)` (atomic).

    specs: key -> (dtype, shape), known before any data is read, so the header can be written first."""
    header, offset = {}, 0
    for k, (dt, shape) in specs.items():
        n = int(torch.Size(shape).numel()) * dt.itemsize
        header[k] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for k, (dt, shape) in specs.items():
                t = produce(k)
                if t.dtype != dt or tuple(t.shape) != tuple(shape):
                    raise RuntimeError(f"internal: {k} produced {t.dtype}{tuple(t.shape)}, header says {dt}{shape}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


# --- in-memory merge ------------------------------------------------------------------------------------------------

@dataclass
class MergeHandle:
    """Undo record of an in-memory merge: the touched parameters as they were (on CPU)."""
    model: nn.Module
    backups: dict[str, torch.Tensor] = field(default_factory=dict)   # parameter path -> original value (CPU)
    restored: bool = False

    def restore(self) -> None:
        """Put the original parameters back, bit for bit."""
        if self.restored:
            return
        with torch.no_grad():
            for path, original in self.backups.items():
                p = self.model.get_parameter(path)
                p.data.copy_(original.to(p.device))
        self.restored = True


def patch_module(model: nn.Module, name: str, mw, multiplier: float, handle: MergeHandle | None = None,
                 hooked: bool = False, param=None, params: dict | None = None) -> list[str]:
    """Write one resolved module patch into `model`'s parameters (fp32 math, cast back to each parameter's dtype);
    `hooked`: a forward hook applies the plain low-rank ΔW, so only the rest (DoRA, full weight, bias) is written.
    `param(path)` returns the parameter to write (default: the model's own); `params`: the model's
    `dict(named_parameters())` when the caller has it. Returns the parameter paths written."""
    params = params if params is not None else dict(model.named_parameters())
    written = []
    for path, part in patch_params(name, mw, params, hooked):
        p = param(path) if param is not None else params[path]
        if handle is not None and path not in handle.backups:
            handle.backups[path] = p.detach().to("cpu", copy=True)
        new = mw.patched_weight(p, multiplier) if part == "weight" else mw.patched_bias(p, multiplier)
        p.data.copy_(new.to(p.dtype))
        written.append(path)
    return written


def merge_into_model(model: nn.Module, lora, multiplier: float = 1.0, module_filter=None,
                     handle: MergeHandle | None = None, strict: bool = True, hooked: bool = False) -> MergeHandle:
    """W ← W + multiplier·ΔW for every module the LoRA matches (DoRA, `.diff`, `.set_weight` and bias patches as
    ComfyUI applies them; fp32 math, cast back to the parameter dtype).

    `strict` refuses keys that match nothing (else they are skipped). `module_filter(name) -> bool` limits the
    merge (per-block strength). `hooked`: leave plain low-rank ΔW to adapters (see `patch_module`). Returns a handle
    whose `restore()` puts the original parameters back exactly; pass `handle` to accumulate several merges."""
    lora = lora if isinstance(lora, LoRAFile) else read_lora(lora, model=model)
    label = str(lora.source or "LoRA")
    report = match_lora(lora, model, label)
    if strict:
        require_complete(report, label)
    handle = handle or MergeHandle(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mw in resolved_modules(lora, model).items():
            if module_filter is not None and not module_filter(name):
                continue
            patch_module(model, name, mw, multiplier, handle, hooked, params=params)
    return handle
