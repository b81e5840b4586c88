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

import dataclasses
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

# file suffix -> (kind, part name); longest suffixes first. Kind "" marks the parts any module may carry.
_SUFFIXES: list[tuple[str, str, str]] = sorted([
    (".lora_down.weight", "lora", "down"), (".lora_up.weight", "lora", "up"),
    (".lora_A.weight", "lora", "down"), (".lora_B.weight", "lora", "up"),
    (".lora_A.default.weight", "lora", "down"), (".lora_B.default.weight", "lora", "up"),
    (".lora_A", "lora", "down"), (".lora_B", "lora", "up"),
    (".lora.down.weight", "lora", "down"), (".lora.up.weight", "lora", "up"),
    (".lora_mid.weight", "lora", "mid"),
    *[(f".{p}", "loha", p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")],
    *[(f".{p}", "lokr", p) for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                     "lokr_t2")],
    *[(f".{p}", "", p) for p in ("alpha", "dora_scale", "diff", "diff_b", "set_weight", "w_norm", "b_norm")],
], key=lambda s: -len(s[0]))
# Not listed, so reported as keys not applied, as ComfyUI's loader leaves them: `lokr_t1` (ComfyUI reads no Tucker
# core for w1), `lora_B.bias` / `lora_up.bias` (ComfyUI converts them only for one other family's files),
# `reshape_weight`, and GLoRA/OFT/BOFT tensors.
_BOOKKEEPING = {"lokr_factor"}  # Musubi LoKr network buffer, not a module
_EXTRAS = ("alpha", "dora_scale", "diff", "diff_b", "set_weight", "w_norm", "b_norm")


@dataclass
class LoRAFile:
    modules: dict[str, ModuleWeights]              # official dotted name (or raw stem if unresolved) -> weights
    metadata: dict[str, str] = field(default_factory=dict)
    dialect: str = ""                              # e.g. "musubi", "comfyui", "diffusers", "videox-fun" (+ "/lycoris")
    source: Path | None = None
    unresolved: set[str] = field(default_factory=set)       # module keys whose name could not be resolved
    unused_keys: list[str] = field(default_factory=list)    # file keys not understood (not applied)
    stems: dict[str, tuple[str, str]] = field(default_factory=dict)  # module key -> (prefix kind, raw stem)

    @property
    def name(self) -> str:
        return self.source.stem if self.source else "lora"

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    @property
    def overridden_keys(self) -> list[str]:
        """Keys read but without effect: a module's low-rank weights replaced by its `.diff` / `.set_weight` (the
        precedence of ComfyUI's loader)."""
        return [k for m in self.modules.values() for k in m.overridden]


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """A conv-shaped [a, b, 1, 1] factor as the [a, b] matrix it is for a Linear layer (ComfyUI flattens it)."""
    if t.ndim > 2 and all(d == 1 for d in t.shape[2:]):
        return t.reshape(t.shape[0], t.shape[1])
    return t


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
    if not state:                    # (a file without tensors is refused by Checkpoint.open)
        raise invalid("LoRA state dict", "no tensors", "a LoRA file")
    if module_names is None and model is not None:
        module_names = _target_names(dict(model.named_parameters()))
    known = T.underscore_map(module_names) if module_names is not None else None
    where = str(path) if path else "LoRA state dict"

    groups: dict[str, dict] = {}          # raw stem -> {"parts": {}, "extras": {}, "kind": .., "keys": {part: key}}
    unused: list[str] = []
    for key, value in state.items():
        if key in _BOOKKEEPING:
            continue
        if not isinstance(value, torch.Tensor):
            raise invalid(f"{where} key {key!r}", type(value).__name__, "a tensor")
        hit = next(((suf, kind, part) for suf, kind, part in _SUFFIXES if key.endswith(suf)), None)
        if hit is None:
            unused.append(key)
            continue
        suf, kind, part = hit
        stem = key[: -len(suf)]
        g = groups.setdefault(stem, {"parts": {}, "extras": {}, "kind": None, "keys": {}})
        g["keys"][part] = key
        if not kind:
            g["extras"][part] = value
            continue
        if g["kind"] not in (None, kind):
            raise invalid(f"{where} module {stem!r}", f"{g['kind']} and {kind} tensors", "one adapter kind per module")
        g["kind"] = kind
        g["parts"][part] = _as_matrix(value)

    modules: dict[str, ModuleWeights] = {}
    unresolved: set[str] = set()
    stems: dict[str, tuple[str, str]] = {}
    dialects: set[str] = set()
    fused: dict[str, dict[int, ModuleWeights]] = {}   # fused layer -> its diffusers pieces, joined below
    for stem, g in groups.items():
        mw = _module_weights(g, unused)
        if mw is None:
            continue
        name, dialect = normalize_stem(stem, known)
        dialects.add(dialect)
        piece = _fused_piece(stem) if name is None else None
        if piece is not None and mw.kind == "lora" and mw.hookable and "mid" not in mw.tensors:
            mw.validate(f"{where} module {stem!r}")
            fused.setdefault(piece[0], {})[piece[1]] = mw
            continue
        if name is None:
            name = stem
            unresolved.add(stem)
        mw.validate(f"{where} module {stem!r}")
        if name in modules:
            raise invalid(f"{where} module {name!r}", "two sets of weights (e.g. two dialects mixed)",
                          "one set of adapter weights per module")
        modules[name] = mw
        stems[name] = (dialect, stem)
    for name, pieces in fused.items():
        if name in modules:
            raise invalid(f"{where} module {name!r}", "fused and split weights", "one set of weights per module")
        modules[name] = _join_fused(name, pieces, where)
        stems[name] = ("diffusers", name)
    if not modules:
        raise invalid(where, f"{len(state)} tensors and no adapter weights (e.g. {list(state)[:3]})",
                      "LoRA/LoHa/LoKr tensors (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*) or weight "
                      "differences (.diff, .diff_b)")
    dialect = "+".join(sorted(dialects))
    if {"loha", "lokr"} & {m.kind for m in modules.values()}:
        dialect += "/lycoris"
    return LoRAFile(modules, meta, dialect, path, unresolved, unused, stems)


def _module_weights(g: dict, unused: list[str]) -> ModuleWeights | None:
    """One stem's parts as ComfyUI's loader reads them, or None (its keys then go to `unused`)."""
    parts, extras, keys, kind = dict(g["parts"]), g["extras"], g["keys"], g["kind"]
    if kind == "lora" and "mid" in parts and not keys.get("up", "").endswith(".lora_up.weight"):
        del parts["mid"]                    # ComfyUI reads lora_mid only beside lora_up/lora_down: not applied
    used = set(parts)
    alpha_t, dora = extras.get("alpha"), extras.get("dora_scale")
    alpha = (float(alpha_t.float().reshape(-1)[0]) if alpha_t.numel() else None) if alpha_t is not None else None
    weight_patch, wp_part, bias, overridden = None, None, None, []
    for part, how in (("w_norm", "diff"), ("diff", "diff"), ("set_weight", "set")):   # later ones win
        if part in extras:
            if wp_part is not None:
                overridden.append(keys[wp_part])
            weight_patch, wp_part = (how, extras[part]), part
    for part in ("b_norm", "diff_b"):
        if part == "b_norm" and "w_norm" not in extras:
            continue                         # ComfyUI reads b_norm only together with w_norm
        if part in extras:
            if bias is not None:
                overridden.append(keys["b_norm"])
            bias = extras[part]
            used.add(part)
    used |= {p for p in ("w_norm", "diff", "set_weight") if p in extras}
    if kind is not None and weight_patch is None:
        used |= {p for p in ("alpha", "dora_scale") if p in extras}
    elif kind is not None:                   # the full weight patch replaces the low-rank one
        overridden += [keys[p] for p in parts] + [keys[p] for p in ("alpha", "dora_scale") if p in extras]
        used |= {p for p in ("alpha", "dora_scale") if p in extras}
        kind, parts, dora = None, {}, None
    unused.extend(keys[p] for p in keys if p not in used)
    if kind is None and weight_patch is None and bias is None:
        return None
    return ModuleWeights(kind or "diff", parts, alpha if kind else None, sorted(keys[p] for p in used),
                         dora_scale=dora if kind else None, weight_patch=weight_patch, bias_diff=bias,
                         overridden=sorted(overridden))


def _fused_piece(stem: str) -> tuple[str, int] | None:
    """A diffusers/PEFT stem naming a piece of a fused layer (the q piece of a fused qkv) -> (fused name,
    piece index). ComfyUI's prefix too: a diffusers-named model keeps diffusers' names in ComfyUI."""
    for prefix in ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", ""):
        if stem.startswith(prefix):
            return T.diffusers_to_fused(stem[len(prefix):])
    return None


def _join_fused(name: str, pieces: dict[int, ModuleWeights], where: str) -> ModuleWeights:
    """The diffusers pieces of one fused layer as one LoRA on it (ComfyUI joins them the same way): each piece's
    up matrix (scale folded in) in its own rows; pieces sharing one down matrix (as the pack writes them) keep it,
    otherwise the downs are stacked on the rank axis with a block-diagonal up. Missing pieces change nothing."""
    layout = T.fused_layout(name)
    width = next(iter(pieces.values())).tensors["down"].shape[1]
    rows = [per_input * width for _, per_input in layout]
    for i, mw in pieces.items():
        if mw.tensors["down"].shape[1] != width or mw.tensors["up"].shape[0] != rows[i]:
            raise invalid(f"{where} {layout[i][0]} shape", (tuple(mw.tensors["up"].shape), tuple(mw.tensors["down"].shape)),
                          f"{rows[i]} rows and {width} inputs (a piece of {name})")
    ups = {i: mw.tensors["up"].float() * mw.scale for i, mw in pieces.items()}
    downs = {i: mw.tensors["down"].float() for i, mw in pieces.items()}
    first = downs[min(downs)]
    keys = sorted(k for mw in pieces.values() for k in mw.source_keys)
    if len(pieces) == len(layout) and all(torch.equal(d, first) for d in downs.values()):
        up = torch.cat([ups[i] for i in range(len(layout))])
        return ModuleWeights("lora", {"down": first, "up": up}, float(first.shape[0]), keys)
    rank = sum(d.shape[0] for d in downs.values())
    up = torch.zeros(sum(rows), rank)
    row = col = 0
    for i, n in enumerate(rows):
        if i in pieces:
            r = downs[i].shape[0]
            up[row:row + n, col:col + r] = ups[i]
            col += r
        row += n
    down = torch.cat([downs[i] for i in sorted(downs)])
    return ModuleWeights("lora", {"down": down, "up": up}, float(rank), keys)


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
    matched: list[str]              # model names (modules, or bare parameters) that will be changed
    unmatched_keys: list[str]       # LoRA file keys that match nothing in the model, or that are not applied
    uncovered: list[str]            # default LoRA targets of the model the file does not touch
    summary: str
    overridden_keys: list[str] = field(default_factory=list)  # read, but replaced by a .diff/.set_weight

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


def model_param_shapes(model) -> dict[str, tuple]:
    """parameter path -> shape (a mapping of Linear module names only stands for their `.weight`s)."""
    if isinstance(model, Mapping):
        return {f"{k}.weight": tuple(v) for k, v in model.items()}
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _target_names(params: Mapping) -> list[str]:
    """What a LoRA key stem may name: a module owning a weight or bias, or a bare parameter (e.g. a modulation
    table); ComfyUI's key map offers the same (`<module>` for `<module>.weight`, and any other key as it is)."""
    names = set(params)
    names.update(k.rsplit(".", 1)[0] for k in params if k.endswith((".weight", ".bias")))
    return sorted(names)


def weight_param(target: str, params: Mapping) -> str | None:
    """The parameter a module-level weight patch changes: `<target>.weight`, or `target` itself if it is one."""
    if f"{target}.weight" in params:
        return f"{target}.weight"
    return target if target in params else None


def patch_params(target: str, mw: ModuleWeights, params: Mapping, hooked: bool = False) -> list[tuple[str, str]]:
    """[(parameter path, "weight" | "bias")] a resolved module patch writes; `hooked`: leave out the weight when a
    forward hook applies it (a plain low-rank ΔW)."""
    out = []
    if mw.touches_weight and not (hooked and mw.hookable):
        out.append((weight_param(target, params), "weight"))
    if mw.bias_diff is not None:
        out.append((f"{target}.bias", "bias"))
    return out


def _model_family(model, shapes: dict):
    """The family of the model a LoRA is matched against (a module, or the module names of a checkpoint)."""
    if isinstance(model, nn.Module):
        return family_of(model)
    family = family_for_lora_names(shapes)
    if family is None:
        raise invalid("model", f"{len(shapes)} weights (e.g. {list(shapes)[:2]})", "the weights of a known DiT")
    return family


def _bias_key(mw: ModuleWeights) -> str:
    return next((k for k in mw.source_keys if k.endswith((".diff_b", ".b_norm"))), "?")


def _nonleaf_owners(params: Mapping) -> set[str]:
    """Modules whose own parameters ComfyUI never patches: those that also have submodules with parameters (its
    model patcher skips them as "random weights in non leaf modules", e.g. a DiT block's modulation table)."""
    out = set()
    for k in params:
        parts = k.split(".")
        out.update(".".join(parts[:i]) for i in range(len(parts) - 1))   # every ancestor above the direct owner
    return out


def _resolve(lora: LoRAFile, params: Mapping, label: str):
    """(target -> ModuleWeights trimmed to what the model has, unmatched keys). Raises on shape mismatches."""
    known = T.underscore_map(_target_names(params))
    linear_img = any(k.endswith(("k_img.weight", "v_img.weight")) for k in params)
    nonleaf = _nonleaf_owners(params)
    params = {k: v for k, v in params.items() if k.rpartition(".")[0] not in nonleaf}   # as ComfyUI: not patched
    resolved, unmatched = {}, []
    for name, mw in lora.modules.items():
        target = name
        if name in lora.unresolved:  # re-resolve underscore names against this model
            target = normalize_stem(lora.stems[name][1], known)[0] or name
        wp = weight_param(target, params)
        if wp is None and f"{target}.bias" not in params:
            if target.split(".")[-1].endswith(("k_img", "v_img")) and not linear_img:
                raise invalid(f"{label}", f"image cross-attention weights ({mw.source_keys[0]!r})",
                              "a LoRA for this model variant: it was trained on an I2V/FLF2V model and this "
                              "model has no k_img/v_img (text-to-video)")
            unmatched.extend(mw.source_keys)
            continue
        if mw.low_rank and (wp is None or len(params[wp]) != 2):
            unmatched.extend(k for k in mw.source_keys if k != _bias_key(mw))   # low-rank: Linear layers only
            mw = dataclasses.replace(mw, kind="diff", tensors={}, alpha=None, dora_scale=None)
        elif mw.weight_patch is not None and wp is None:
            unmatched.extend(k for k in mw.source_keys if k != _bias_key(mw))
            mw = dataclasses.replace(mw, weight_patch=None)
        if mw.touches_weight and tuple(mw.shape) != tuple(params[wp]):
            raise invalid(f"{label} key {mw.source_keys[0]!r}", f"LoRA shape {tuple(mw.shape)}",
                          f"the model's {wp} shape {tuple(params[wp])} (LoRA made for another model size, "
                          "e.g. 14B vs 1.3B)")
        if mw.bias_diff is not None:
            bias = params.get(f"{target}.bias")
            if bias is None:
                unmatched.append(_bias_key(mw))
                mw = dataclasses.replace(mw, bias_diff=None)
            elif tuple(mw.bias_diff.shape) != tuple(bias):
                raise invalid(f"{label} key {_bias_key(mw)!r}", f"shape {tuple(mw.bias_diff.shape)}",
                              f"the model's {target}.bias shape {tuple(bias)} (LoRA made for another model size)")
        if mw.touches_weight or mw.bias_diff is not None:
            resolved[target] = mw
    return resolved, unmatched


def adopted(lora: LoRAFile, family) -> LoRAFile:
    """`lora` with its modules in `family`'s names when they are another family's layout the family converts
    (`LoRASpec.adopt`: a family whose model descends from another's), else `lora` itself."""
    if not lora.modules or any(family.lora.owns(n) for n in lora.modules):
        return lora
    # names read against this model did not resolve: the layout's own names, without a model
    named = {(normalize_stem(lora.stems[n][1], None)[0] or n) if n in lora.unresolved else n: mw
             for n, mw in lora.modules.items()}
    modules = family.lora.adopt(named)
    if modules is None:
        return lora
    return dataclasses.replace(lora, modules=modules, unresolved=set(), stems={n: ("adopted", n) for n in modules})


def match_lora(lora: LoRAFile, model, label: str | None = None, params: Mapping | None = None) -> MatchReport:
    """Check `lora` against `model` (an nn.Module, or a mapping module name -> weight shape; `params`, parameter
    path -> shape, adds the model's other parameters for a mapping).

    Raises MusubiInputError for another model family, an I2V-only LoRA on a model without image cross-attention,
    or a shape mismatch (names the key, the LoRA shape and the model shape)."""
    label = label or (str(lora.source) if lora.source else "LoRA")
    shapes = model_linear_shapes(model)
    params = params if params is not None else model_param_shapes(model)
    family = _model_family(model, shapes)
    lora = adopted(lora, family)
    raw = [stem for _, stem in lora.stems.values()]
    # another model's layout, unless the names are this family's own (a family may share a layout's names)
    foreign = None if any(family.lora.owns(n) for n in lora.modules) else foreign_lora_layout(raw)
    if foreign:
        other, example = foreign
        raise invalid(f"{label}", f"a {other} LoRA (key {example!r})", f"a LoRA trained for {family.display_name}")
    resolved, unmatched = _resolve(lora, params, label)
    unmatched = list(lora.unused_keys) + unmatched
    matched = list(resolved)
    low_rank = {n for n, mw in resolved.items() if mw.low_rank}
    uncovered = [n for n in names_in_blocks(shapes, family.lora) if n not in low_rank]
    overridden = lora.overridden_keys
    summary = (f"{label}: {len(matched)}/{len(lora.modules)} LoRA modules matched"
               + (f", {len(unmatched)} keys unmatched (e.g. {unmatched[0]})" if unmatched else "")
               + (f", {len(overridden)} keys overridden by .diff/.set_weight" if overridden else "")
               + f"; {len(uncovered)} default targets not covered")
    return MatchReport(matched, unmatched, uncovered, summary, overridden)


def resolved_modules(lora: LoRAFile, model, params: Mapping | None = None) -> dict[str, ModuleWeights]:
    """Model name -> weights (trimmed to the parts the model has), for a LoRA already checked by `match_lora`."""
    params = params if params is not None else model_param_shapes(model)
    if model is not None:
        lora = adopted(lora, _model_family(model, model_linear_shapes(model)))
    return _resolve(lora, params, str(lora.source or "LoRA"))[0]


def require_complete(report: MatchReport, label: str) -> None:
    if report.unmatched_keys:
        k = report.unmatched_keys
        raise MusubiInputError(f"{label}: {len(k)} LoRA keys match no weight of the model (e.g. {k[:3]}); "
                               "expected every key to apply")
