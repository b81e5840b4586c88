"""Read any LoRA dialect into one normalized form: canonical module name -> `ModuleWeights`.

Dialects (key examples for module `blocks.0.self_attn.q`):
  musubi / kohya     lora_unet_blocks_0_self_attn_q.lora_down.weight, .lora_up.weight, .alpha
  VideoX-Fun         lora_unet__blocks_0_self_attn_q.lora_down.weight          (double underscore)
  comfyui            diffusion_model.blocks.0.self_attn.q.lora_down.weight     (or lora_A / lora_B, optional .alpha)
  diffusion-pipe     diffusion_model.blocks.0.self_attn.q.lora_A.weight
  diffusers / PEFT   transformer.blocks.0.attn1.to_q.lora_A.weight, base_model.model.blocks.0.attn1.to_q.lora_A.weight
  LyCORIS            <any of the stems above>.hada_w1_a ... / .lokr_w1 ... (+ .alpha)

Underscore names are resolved against the model's real module list when one is given (so `self_attn`, `k_img`
come back exactly); without a model each registered family's layout is tried (engine.families). `match_lora` checks
a file against a model and refuses other model families, other variants and shape mismatches before any weight is
touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn

from ..checkpoint import Checkpoint
from ..errors import MusubiInputError, invalid
from ..families import family_for_lora_names, family_of, names_in_blocks
from ..families.identify import foreign_lora_layout
from . import targets as T
from .weights import ModuleWeights

# file suffix -> (kind, part name in ModuleWeights.tensors); longest suffixes first
_SUFFIXES: list[tuple[str, str, str]] = sorted([
    (".lora_down.weight", "lora", "down"), (".lora_up.weight", "lora", "up"),
    (".lora_A.weight", "lora", "down"), (".lora_B.weight", "lora", "up"),
    (".lora_A.default.weight", "lora", "down"), (".lora_B.default.weight", "lora", "up"),
    (".lora_A", "lora", "down"), (".lora_B", "lora", "up"),
    (".lora.down.weight", "lora", "down"), (".lora.up.weight", "lora", "up"),
    *[(f".{p}", "loha", p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")],
    *[(f".{p}", "lokr", p) for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")],
    (".alpha", "", "alpha"),
], key=lambda s: -len(s[0]))
# Understood but not supported: reported as unused keys (so merges refuse them, loaders list them).
_UNSUPPORTED = (".lora_mid.weight", ".hada_t1", ".hada_t2", ".lokr_t1", ".lokr_t2", ".dora_scale", ".diff",
                ".diff_b", ".lora_B.bias", ".set_weight", ".w_norm", ".b_norm")
_BOOKKEEPING = {"lokr_factor"}  # Musubi LoKr network buffer, not a module


@dataclass
class LoRAFile:
    modules: dict[str, ModuleWeights]              # official dotted name (or raw stem if unresolved) -> weights
    metadata: dict[str, str] = field(default_factory=dict)
    dialect: str = ""                              # e.g. "musubi", "comfyui", "diffusers", "videox-fun" (+ "/lycoris")
    source: Path | None = None
    unresolved: set[str] = field(default_factory=set)       # module keys whose name could not be resolved
    unused_keys: list[str] = field(default_factory=list)    # file keys not understood (unsupported parts)
    stems: dict[str, tuple[str, str]] = field(default_factory=dict)  # module key -> (prefix kind, raw stem)

    @property
    def name(self) -> str:
        return self.source.stem if self.source else "lora"

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}


def read_lora(source, model: nn.Module | None = None, module_names=None,
              metadata: Mapping[str, str] | None = None) -> LoRAFile:
    """Read a LoRA file (path) or state dict into a `LoRAFile`.

    `model` (or an explicit iterable `module_names`) resolves underscore names against the real module list."""
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        ckpt = Checkpoint.open(path)  # refuses truncated files and pickles with code (weights_only)
        state = {k: ckpt.raw(k) for k in ckpt.keys()}
        meta = dict(ckpt.metadata)
    elif isinstance(source, Mapping):
        state = dict(source)
        meta = dict(metadata or {})
    else:
        raise invalid("LoRA", type(source).__name__, "a file path or a state dict of tensors")
    if not state:
        raise invalid(f"LoRA {path or 'state dict'}", "no tensors", "a LoRA file")
    if module_names is None and model is not None:
        module_names = [n for n, _ in model.named_modules()]
    known = T.underscore_map(module_names) if module_names is not None else None
    where = str(path) if path else "LoRA state dict"

    groups: dict[str, dict] = {}          # raw stem -> {"parts": {}, "alpha": .., "kind": .., "keys": []}
    unused: list[str] = []
    for key, value in state.items():
        if key in _BOOKKEEPING:
            continue
        if not isinstance(value, torch.Tensor):
            raise invalid(f"{where} key {key!r}", type(value).__name__, "a tensor")
        hit = next(((suf, kind, part) for suf, kind, part in _SUFFIXES if key.endswith(suf)), None)
        if hit is None or key.endswith(_UNSUPPORTED):
            unused.append(key)
            continue
        suf, kind, part = hit
        stem = key[: -len(suf)]
        g = groups.setdefault(stem, {"parts": {}, "alpha": None, "kind": None, "keys": []})
        g["keys"].append(key)
        if part == "alpha":
            g["alpha"] = float(value.float().reshape(-1)[0]) if value.numel() else None
            continue
        if g["kind"] not in (None, kind):
            raise invalid(f"{where} module {stem!r}", f"{g['kind']} and {kind} tensors", "one adapter kind per module")
        g["kind"] = kind
        g["parts"][part] = value

    modules: dict[str, ModuleWeights] = {}
    unresolved: set[str] = set()
    stems: dict[str, tuple[str, str]] = {}
    dialects: set[str] = set()
    for stem, g in groups.items():
        if g["kind"] is None:  # an alpha with nothing else
            unused.extend(g["keys"])
            continue
        name, dialect = normalize_stem(stem, known)
        dialects.add(dialect)
        if name is None:
            name = stem
            unresolved.add(stem)
        mw = ModuleWeights(g["kind"], g["parts"], g["alpha"], sorted(g["keys"]))
        mw.validate(f"{where} module {stem!r}")
        if name in modules:
            raise invalid(f"{where} module {name!r}", "two sets of weights (e.g. two dialects mixed)",
                          "one set of adapter weights per module")
        modules[name] = mw
        stems[name] = (dialect, stem)
    if not modules:
        raise invalid(f"LoRA {where}", f"{len(state)} tensors and no adapter weights (e.g. {list(state)[:3]})",
                      "LoRA/LoHa/LoKr tensors (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*)")
    dialect = "+".join(sorted(dialects))
    if {"loha", "lokr"} & {m.kind for m in modules.values()}:
        dialect += "/lycoris"
    return LoRAFile(modules, meta, dialect, path, unresolved, unused, stems)


def normalize_stem(stem: str, known: dict[str, str] | None) -> tuple[str | None, str]:
    """Raw key stem -> (official module name or None, dialect)."""
    for prefix, dialect in (("lora_unet__", "videox-fun"), ("lora_unet_", "musubi"), ("lycoris_", "lycoris")):
        if stem.startswith(prefix):
            return T.resolve_underscore(stem[len(prefix):], known), dialect
    for prefix, dialect in (("model.diffusion_model.", "comfyui"), ("diffusion_model.", "comfyui"),
                            ("base_model.model.", "peft"), ("transformer.", "diffusers"), ("", "bare")):
        if stem.startswith(prefix):
            rest = stem[len(prefix):]
            if T.looks_diffusers(rest):
                return T.diffusers_to_official(rest), ("peft" if dialect == "peft" else "diffusers")
            return rest, dialect
    return None, "unknown"  # unreachable: "" always matches


# --- matching against a model ---------------------------------------------------------------------------------------

@dataclass
class MatchReport:
    matched: list[str]              # official module names that will be changed
    unmatched_keys: list[str]       # LoRA file keys that match nothing in the model
    uncovered: list[str]            # default LoRA targets of the model the file does not touch
    summary: str

    @property
    def complete(self) -> bool:
        return not self.unmatched_keys


def model_linear_shapes(model) -> dict[str, tuple[int, int]]:
    """module name -> weight shape (out, in) for every Linear-like module (2-D weight) of a model or a mapping."""
    if isinstance(model, Mapping):
        return {k: tuple(v) for k, v in model.items()}
    out = {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and name:
            out[name] = tuple(w.shape)
    return out


def _model_family(model, shapes: dict):
    """The family of the model a LoRA is matched against (a module, or the module names of a checkpoint)."""
    if isinstance(model, nn.Module):
        return family_of(model)
    family = family_for_lora_names(shapes)
    if family is None:
        raise invalid("model", f"{len(shapes)} weights (e.g. {list(shapes)[:2]})", "the weights of a known DiT")
    return family


def match_lora(lora: LoRAFile, model, label: str | None = None) -> MatchReport:
    """Check `lora` against `model` (an nn.Module, or a mapping module name -> weight shape).

    Raises MusubiInputError for another model family, an I2V-only LoRA on a model without image cross-attention,
    or a shape mismatch (names the key, the LoRA shape and the model shape)."""
    label = label or (str(lora.source) if lora.source else "LoRA")
    shapes = model_linear_shapes(model)
    raw = [stem for _, stem in lora.stems.values()]
    family = _model_family(model, shapes)
    # another model's layout, unless the names are this family's own (a family may share a layout's names)
    foreign = None if any(family.lora.owns(n) for n in lora.modules) else foreign_lora_layout(raw)
    if foreign:
        other, example = foreign
        raise invalid(f"{label}", f"a {other} LoRA (key {example!r})", f"a LoRA trained for {family.display_name}")
    known = T.underscore_map(shapes)
    matched, unmatched = [], list(lora.unused_keys)
    for name, mw in lora.modules.items():
        target = name
        if name in lora.unresolved:  # re-resolve underscore names against this model
            dialect, stem = lora.stems[name]
            target = normalize_stem(stem, known)[0] or name
        if target not in shapes:
            if target.endswith(("k_img", "v_img")) and not any(n.endswith("k_img") for n in shapes):
                raise invalid(f"{label}", f"image cross-attention weights ({mw.source_keys[0]!r})",
                              "a LoRA for this model variant: it was trained on an I2V/FLF2V model and this "
                              "model has no k_img/v_img (text-to-video)")
            unmatched.extend(mw.source_keys)
            continue
        if tuple(mw.shape) != shapes[target]:
            raise invalid(f"{label} key {mw.source_keys[0]!r}", f"LoRA shape {tuple(mw.shape)}",
                          f"the model's {target}.weight shape {shapes[target]} (LoRA made for another model size, "
                          "e.g. 14B vs 1.3B)")
        matched.append(target)
    uncovered = [n for n in names_in_blocks(shapes, family.lora) if n not in set(matched)]
    summary = (f"{label}: {len(matched)}/{len(lora.modules)} LoRA modules matched"
               + (f", {len(unmatched)} keys unmatched (e.g. {unmatched[0]})" if unmatched else "")
               + f"; {len(uncovered)} default targets not covered")
    return MatchReport(matched, unmatched, uncovered, summary)


def resolved_modules(lora: LoRAFile, model) -> dict[str, ModuleWeights]:
    """Model module name -> weights, for a LoRA already checked by `match_lora` (unmatched ones left out)."""
    shapes = model_linear_shapes(model)
    known = T.underscore_map(shapes)
    out = {}
    for name, mw in lora.modules.items():
        target = name
        if name in lora.unresolved:
            target = normalize_stem(lora.stems[name][1], known)[0] or name
        if target in shapes:
            out[target] = mw
    return out


def require_complete(report: MatchReport, label: str) -> None:
    if report.unmatched_keys:
        k = report.unmatched_keys
        raise MusubiInputError(f"{label}: {len(k)} LoRA keys match no weight of the model (e.g. {k[:3]}); "
                               "expected every key to apply")
