"""Write a LoRA in one of three formats (atomic write, never over an input file).

  comfyui (default)  diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha
  musubi             lora_unet_<module with "_">.lora_down.weight / .lora_up.weight / .alpha  (+ ss_* metadata)
  diffusers          transformer.<diffusers module>.lora_A.weight / .lora_B.weight, alpha folded into lora_B
                     (B·scale), so a loader without alpha support computes the same ΔW
  musubi-other       diffusion_model.<module>.lora_A.weight / .lora_B.weight, no alpha key: Musubi Tuner's
                     `convert_lora --target other` layout (diffusion-pipe style). Like Musubi, alpha is folded into
                     both factors (each times sqrt(alpha/rank)); its `--target default` reads it back with alpha = rank

LoHa/LoKr keep their LyCORIS tensor names under the comfyui / musubi / musubi-other stems (with .alpha); diffusers
has no such format. Every format gets the same metadata (Musubi ss_* + ModelSpec + hashes, plus the caller's
entries), except that ss_network_dim / ss_network_alpha always describe the tensors written: with alpha folded in,
alpha = rank (scale 1), whatever the source file's metadata said.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..atomic import save_safetensors_atomic
from ..errors import invalid
from ..families import family_for_lora_names
from . import targets as T
from .dialects import LoRAFile, read_lora
from .metadata import lora_metadata, with_hashes
from .weights import LOW_RANK, ModuleWeights

FORMATS = ("comfyui", "musubi", "diffusers", "musubi-other")
FOLDED = ("diffusers", "musubi-other")  # alpha multiplied into the factors: the file's alpha is its rank
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def lora_file_from_network(network) -> LoRAFile:
    """An attached/trained `AdapterNetwork` as a LoRAFile (tensors detached, on CPU, adapter dtype)."""
    modules = {}
    for name, adapter in network.adapters().items():
        sd = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
        alpha = float(sd.pop("alpha"))
        if adapter.kind == "lora":
            tensors = {"down": sd["lora_down.weight"], "up": sd["lora_up.weight"]}
        else:
            tensors = sd
        modules[name] = ModuleWeights(adapter.kind, tensors, alpha, [])
    return LoRAFile(modules, {}, "network", None)


def refuse_overwrite(out_path, inputs) -> None:
    out = Path(out_path).resolve()
    for p in inputs:
        if p is not None and Path(p).resolve() == out:
            raise invalid("output path", str(out_path), "a file different from every input file")


def save_lora(source, path, format: str = "comfyui", metadata: dict | None = None, dtype=torch.float32,
              input_paths=()) -> Path:
    """Write `source` (LoRAFile, AdapterNetwork, path or state dict) to `path` in `format`. Returns the path."""
    if format not in FORMATS:
        raise invalid("LoRA format", format, f"one of {FORMATS}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise invalid("save dtype", dtype, f"one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    inputs = list(input_paths)
    if isinstance(source, (str, os.PathLike)):
        inputs.append(source)
        refuse_overwrite(path, inputs)
        source = read_lora(source)
    elif isinstance(source, dict):
        source = read_lora(source)
    elif not isinstance(source, LoRAFile):
        source = lora_file_from_network(source)  # AdapterNetwork
    inputs.append(source.source)
    refuse_overwrite(path, inputs)
    if source.unresolved:
        raise invalid(f"LoRA {source.source or ''} module names", sorted(source.unresolved)[:3],
                      "module names of the model (read the LoRA with its model to resolve them)")

    family = family_for_lora_names(source.modules)
    if family is None:
        raise invalid(f"LoRA {source.source or ''} module names", sorted(source.modules)[:3],
                      "module names of a known model family")
    tensors: dict[str, torch.Tensor] = {}
    for name, mw in source.modules.items():
        tensors.update(_module_tensors(name, mw, format, dtype, family.lora))

    low_rank = [mw for mw in source.modules.values() if mw.kind in LOW_RANK] or list(source.modules.values())
    ranks = {mw.rank for mw in low_rank}
    alphas = {_written_alpha(mw, format) for mw in low_rank}
    kinds = source.kinds
    meta = lora_metadata(next(iter(kinds)) if len(kinds) == 1 else "mixed",
                         ranks.pop() if len(ranks) == 1 else None, alphas.pop() if len(alphas) == 1 else None,
                         spec=family.lora, user=metadata, title=Path(path).stem, facts_win=True)
    meta = with_hashes(tensors, meta)
    save_safetensors_atomic(tensors, path, meta)
    return Path(path)


def _written_alpha(mw: ModuleWeights, format: str = "comfyui") -> float:
    """The alpha that reproduces the module's scale in readers that use alpha / rank (rank when the file had none)."""
    if format in FOLDED and mw.kind == "lora":
        return float(mw.rank)   # the scale is already in the factors
    if mw.rank is None:        # LoKr with two full factors: scale is 1; alpha = max(w2) also gives 1 in Musubi
        w2 = mw.tensors.get("lokr_w2")
        return float(max(w2.shape)) if w2 is not None else 1.0
    return mw.scale * mw.rank


def _module_tensors(name: str, mw: ModuleWeights, format: str, dtype, spec) -> dict[str, torch.Tensor]:
    def cast(t):
        return t.detach().to("cpu", dtype)

    extras = mw.kind not in LOW_RANK or "mid" in mw.tensors or mw.dora_scale is not None or mw.bias_diff is not None
    if format in FOLDED and extras:
        raise invalid(f"LoRA module {name}", "DoRA / lora_mid / .diff / .diff_b / .set_weight weights",
                      f"plain low-rank weights for format {format!r} (save as comfyui or musubi to keep them)")
    if format == "diffusers":
        if mw.kind != "lora":
            raise invalid(f"LoRA module {name}", mw.kind, "plain LoRA weights (diffusers/PEFT has no LoHa/LoKr format;"
                                                          " save as comfyui or musubi)")
        down, up = mw.tensors["down"], mw.tensors["up"].float() * mw.scale
        dname = spec.name_to_diffusers(name)
        pieces = ((dname, None),) if dname is not None else spec.fused_to_diffusers(name)
        if pieces is None:
            raise invalid(f"LoRA module {name}", "no diffusers equivalent", "a DiT Linear layer that diffusers names")
        out, row = {}, 0
        for piece, per_input in pieces:   # a fused layer: each piece shares the down matrix and takes its rows of up
            rows = up.shape[0] if per_input is None else per_input * down.shape[1]
            stem = T.DIFFUSERS_PREFIX + piece
            out[f"{stem}.lora_A.weight"] = cast(down).clone()   # safetensors stores no shared storage
            out[f"{stem}.lora_B.weight"] = cast(up[row:row + rows])
            row += rows
        if row != up.shape[0]:
            raise invalid(f"LoRA module {name} rows", up.shape[0], f"{row} (its diffusers pieces)")
        return out

    if format == "musubi-other" and mw.kind == "lora":
        stem = T.COMFY_PREFIX + name
        root = math.sqrt(mw.scale)
        return {f"{stem}.lora_A.weight": cast(mw.tensors["down"].float() * root),
                f"{stem}.lora_B.weight": cast(mw.tensors["up"].float() * root)}

    stem = T.COMFY_PREFIX + name if format in ("comfyui", "musubi-other") else T.musubi_stem(name)
    out = {}
    if mw.kind in LOW_RANK:
        out[f"{stem}.alpha"] = torch.tensor(_written_alpha(mw), dtype=dtype)
    if mw.kind == "lora":
        out[f"{stem}.lora_down.weight"] = cast(mw.tensors["down"])
        out[f"{stem}.lora_up.weight"] = cast(mw.tensors["up"])
        if "mid" in mw.tensors:
            out[f"{stem}.lora_mid.weight"] = cast(mw.tensors["mid"])
    else:
        for part, t in mw.tensors.items():
            out[f"{stem}.{part}"] = cast(t)
    if mw.dora_scale is not None:
        out[f"{stem}.dora_scale"] = cast(mw.dora_scale)
    if mw.weight_patch is not None:
        how, t = mw.weight_patch
        out[f"{stem}.{'diff' if how == 'diff' else 'set_weight'}"] = cast(t)
    if mw.bias_diff is not None:
        out[f"{stem}.diff_b"] = cast(mw.bias_diff)
    return out
