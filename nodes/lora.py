"""LoRA toolbox nodes: load, apply (adapter or merge), save, convert, merge into a DiT file, post-hoc EMA, info,
and a random LoRA for tests and demos.

Applying a LoRA never touches the model that comes in: Apply LoRA outputs a *LoRA view* of it (engine/lora/views.py),
so re-queueing never stacks, a graph without the Apply node uses a clean model, and chained Apply nodes keep every
upstream LoRA.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from . import comfy_compat as compat
from . import checks
from .paths import check_write_path
from . import types as T
from .placement import release_swap
from .registry import MODELS
from ..engine.errors import invalid
from ..engine.lora.views import add_network, lora_stack, make_lora_view, merge_into_view, trainable_copy

FORMATS = ["comfyui", "musubi", "diffusers", "musubi-other"]
SAVE_DTYPES = ["fp32", "bf16", "fp16"]
NONE = "none"
LORA_DESTINATIONS = ["models/loras", "output"]
DIT_DESTINATIONS = ["models/diffusion_models", "output"]


# --- files -----------------------------------------------------------------------------------------------------------
def _lora_files() -> list[str]:
    return compat.list_model_files("loras")


def _file_identity(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def resolve_lora_file(name: str, field: str) -> str:
    """A name listed in ComfyUI's loras folder(s), a path relative to the first of them, or an absolute path."""
    name = (name or "").strip()
    if not name or name == NONE:
        raise invalid(field, name, "a LoRA file (a name in models/loras or a full path)")
    path = compat.model_file_path("loras", name)
    if path is None:
        candidates = [Path(name)] if os.path.isabs(name) else [Path(f) / name for f in compat.model_folders("loras")]
        path = next((str(p) for p in candidates if p.is_file()), None)
    if path is None or not os.path.isfile(path):
        raise invalid(field, name, f"an existing LoRA file: a name in models/loras {compat.model_folders('loras')} "
                                   "or a full path")
    return path


def _destination_folder(save_to: str, folder_key: str) -> Path:
    if save_to == "output":
        return Path(compat.output_directory())
    folders = compat.model_folders(folder_key)
    return Path(folders[0]) if folders else Path(compat.output_directory())


def output_file(save_to: str, folder_key: str, name: str, field: str, suffix: str = ".safetensors") -> Path:
    """`name` (subfolders allowed, no escaping the folder) inside the chosen destination, with `suffix`."""
    name = (name or "").strip().replace("\\", "/")
    parts = [p for p in name.split("/") if p]
    if not parts or os.path.isabs(name) or any(p in ("..", ".") for p in parts):
        raise invalid(field, name, "a relative file name such as 'my_lora' or 'folder/my_lora' (no '..')")
    base = _destination_folder(save_to, folder_key)
    path = base.joinpath(*parts)
    if path.suffix.lower() != suffix:
        path = path.with_name(path.name + suffix)
    return check_write_path(path, field)  # a symlinked subfolder may still lead elsewhere


def numbered_file(save_to: str, folder_key: str, prefix: str, field: str) -> Path:
    """`<prefix>_00001_.safetensors`, the next free counter, as ComfyUI's savers number their files."""
    stem = output_file(save_to, folder_key, prefix, field, suffix="")
    folder, base = stem.parent, stem.name
    pattern = re.compile(rf"^{re.escape(base)}_(\d+)_\.safetensors$")
    taken = [int(m.group(1)) for f in (os.listdir(folder) if folder.is_dir() else []) if (m := pattern.match(f))]
    return folder / f"{base}_{max(taken, default=0) + 1:05}_.safetensors"


def previous_numbered(path: Path) -> Path | None:
    """The newest existing `<prefix>_NNNNN_.safetensors` before `path` (a name from `numbered_file`), if any."""
    m = re.match(r"^(?P<base>.*)_(?P<n>\d+)_\.safetensors$", path.name)
    if not m or not path.parent.is_dir():
        return None
    pattern = re.compile(rf"^{re.escape(m['base'])}_(\d+)_\.safetensors$")
    older = [(int(k.group(1)), f) for f in os.listdir(path.parent)
             if (k := pattern.match(f)) and int(k.group(1)) < int(m["n"])]
    return path.parent / max(older)[1] if older else None


def _same_file(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


# --- text ------------------------------------------------------------------------------------------------------------
def describe_lora(lora) -> str:
    """Dialect, module count, kinds, ranks, alphas, blocks and metadata of a LoRAFile, as lines of text."""
    from ..engine.lora.targets import block_index

    mods = lora.modules
    low_rank = [mw for mw in mods.values() if mw.low_rank] or list(mods.values())
    ranks = sorted({mw.rank for mw in low_rank}, key=lambda r: (r is None, r))
    alphas = sorted({mw.alpha for mw in low_rank}, key=lambda a: (a is None, a))
    blocks = sorted({b for b in (block_index(n) for n in mods) if b is not None})
    lines = [f"LoRA: {lora.name}" + (f" ({lora.source})" if lora.source else " (in memory)"),
             f"dialect: {lora.dialect}",
             f"modules: {len(mods)} ({', '.join(sorted(lora.kinds))})",
             f"ranks: {', '.join(map(str, ranks))}",
             f"alphas: {', '.join('none' if a is None else f'{a:g}' for a in alphas)}",
             f"blocks: {_ranges(blocks) if blocks else '-'}"]
    kinds = _patch_kinds(lora, list(mods))
    if kinds:
        lines.append(f"patches: {kinds}")
    if lora.unused_keys:
        lines.append(f"keys not applied: {len(lora.unused_keys)} (e.g. {lora.unused_keys[0]})")
    if lora.unresolved:
        lines.append(f"unresolved module names: {len(lora.unresolved)} (e.g. {sorted(lora.unresolved)[0]})")
    meta = {k: v for k, v in lora.metadata.items() if not k.startswith("sshs_")}
    if meta:
        lines.append("metadata:")
        for k in sorted(meta):
            v = str(meta[k])
            lines.append(f"  {k}: {v if len(v) <= 120 else v[:117] + '...'}")
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


def parse_block_filter(text: str):
    """'' -> None; '0-3,7' -> predicate on block indices; anything else -> regex searched in the module name."""
    from ..engine.lora.apply import block_filter_fn

    text = (text or "").strip()
    if not text:
        return None
    if re.fullmatch(r"[\d,\s-]+", text):
        wanted = set()
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if not m:
                raise invalid("block_filter", text, "block indices and ranges such as '0-9,12', or a regex")
            if m.group(3) is not None:
                wanted.add(int(m.group(3)))
            else:
                lo, hi = int(m.group(1)), int(m.group(2))
                if lo > hi:
                    raise invalid("block_filter", text, f"ranges low-high with low <= high (got {part!r})")
                wanted.update(range(lo, hi + 1))
        return block_filter_fn(sorted(wanted))
    return block_filter_fn(text)  # a regex (the engine names the field "block_filter" on errors)


def parse_metadata(text: str) -> dict[str, str]:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid("metadata", text, f"a JSON object such as {{\"author\": \"me\"}} ({e})") from None
    if not isinstance(data, dict):
        raise invalid("metadata", text, "a JSON object such as {\"author\": \"me\"}")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


# --- nodes -----------------------------------------------------------------------------------------------------------
class MusubiLoadLoRA:
    DESCRIPTION = ("Load a LoRA file from models/loras (any dialect: Musubi/kohya, ComfyUI, diffusers/PEFT, "
                   "diffusion-pipe, Wan Fun, LyCORIS LoHa/LoKr). The loaded file stays in memory between runs "
                   "(re-read only when the file changes).")
    CATEGORY = "Musubi/lora"
    FUNCTION = "load"
    RETURN_TYPES = (T.LORA, "STRING")
    RETURN_NAMES = ("lora", "info")
    OUTPUT_TOOLTIPS = ("The loaded LoRA (apply it with Musubi Apply LoRA).",
                       "Dialect, module count, kinds, ranks, alphas and metadata of the file.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (_lora_files(), {"tooltip": "A LoRA file from ComfyUI's models/loras folder(s)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def load(self, lora_name, unique_id=None):
        from ..engine.lora import read_lora

        path = resolve_lora_file(lora_name, "lora_name")
        owner = None if unique_id is None else ("MusubiLoadLoRA", str(unique_id))  # one file held per node
        lora = MODELS.get_or_create(("lora",) + _file_identity(path), lambda: read_lora(path), owner=owner)
        return (lora, describe_lora(lora))


class MusubiApplyLoRA:
    DESCRIPTION = ("Apply one or two LoRAs to a DiT with strengths, as adapters (hooks; the weights stay "
                   "untouched) or merged into the weights (faster sampling; needs memory for a copy of the changed "
                   "layers). The input model is never modified: the output is a LoRA view sharing the input's "
                   "weights. Re-queueing with another strength replaces this node's LoRA (never stacks); removing "
                   "the node leaves the model clean; chaining Apply nodes keeps the LoRAs of every node. Applies what "
                   "ComfyUI's loader applies: LoRA (with lora_mid), LoHa/LoKr (with Tucker cores), DoRA, .diff, "
                   ".diff_b and .set_weight keys, with ComfyUI's formulas; in adapter mode the patches a hook cannot "
                   "apply (DoRA, .diff, .set_weight, biases) are merged into private copies of those weights. Keys "
                   "that match nothing are skipped and listed in the report (strict: refused). A LoRA for another "
                   "model family, variant or size, or one that matches nothing, is refused.")
    CATEGORY = "Musubi/lora"
    FUNCTION = "apply"
    RETURN_TYPES = (T.DIT, "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the LoRA(s) applied (a view sharing the input model's weights).",
                       "Match report: modules matched, keys unmatched, default targets not covered, LoRAs on the "
                       "model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (T.DIT, {"tooltip": "The DiT (from a Musubi DiT loader, or from another Apply LoRA node)."}),
            "lora": (T.LORA, {"tooltip": "The LoRA to apply (from Musubi Load LoRA or another LoRA node)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                         "tooltip": "Multiplier of the LoRA's change (1.0 = as trained, 0 = off, negative = invert)."}),
            "mode": (["adapter", "merge"], {"default": "adapter",
                     "tooltip": "adapter: hooks compute the LoRA term on the fly (no weight copy); merge: W + "
                                "strength·ΔW baked into private copies of the changed layers (faster, more "
                                "memory)."}),
        }, "optional": {
            "block_filter": ("STRING", {"default": "",
                             "tooltip": "Only apply to some blocks: indices/ranges such as '0-9,12', or a regex "
                                        "searched in module names such as 'self_attn'. Empty = every module."}),
            "lora_2": (T.LORA, {"tooltip": "Optional second LoRA, applied together with the first."}),
            "strength_2": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                           "tooltip": "Multiplier of the second LoRA."}),
            "strict": ("BOOLEAN", {"default": False,
                       "tooltip": "Refuse a LoRA with keys that match no weight of the model or are not applied. "
                                  "Off: such keys are skipped and listed in the report."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def apply(self, model, lora, strength, mode, block_filter="", lora_2=None, strength_2=1.0, strict=False,
              unique_id=None):
        from ..engine.lora import match_lora, network_from_lora
        from ..engine.lora.dialects import LoRAFile

        handle = T.handle(model, "model", "a DiT from a Musubi DiT loader (Wan, HunyuanVideo)")
        model = handle.module
        if mode not in ("adapter", "merge"):
            raise invalid("mode", mode, "'adapter' or 'merge'")
        keep = parse_block_filter(block_filter)
        items = [("lora", lora, float(strength))]
        if lora_2 is not None:
            items.append(("lora_2", lora_2, float(strength_2)))
        plans = []
        for field, item, s in items:
            if not isinstance(item, LoRAFile):
                raise invalid(field, type(item).__name__, "a LoRA (from Musubi Load LoRA or another LoRA node)")
            label = f"{field} '{item.name}'"
            report = match_lora(item, model, label)  # refuses other families / variants / sizes
            if not report.matched:
                raise invalid(field, item.name, f"a LoRA for this model: none of its {len(item.modules)} modules "
                                                f"matches a layer of the model (e.g. key {report.unmatched_keys[:1]})")
            if strict and report.unmatched_keys:
                k = report.unmatched_keys
                raise invalid(field, item.name, f"a LoRA whose keys all match the model (strict); {len(k)} match "
                                                f"no weight or are not applied (e.g. {k[:3]})")
            kept = [n for n in report.matched if keep is None or keep(n)]
            if not kept:
                raise invalid("block_filter", block_filter,
                              f"a filter keeping at least one of the {len(report.matched)} modules of {label}")
            plans.append((field, item, s, report, kept))

        node = str(unique_id) if unique_id is not None else "?"
        release_swap(model)   # block swap: real weights in the shared dicts (merge reads them), no hooks to copy
        view = make_lora_view(model)
        owned: set = set()    # parameters this node made private to the view (cloned once, patched by each LoRA)
        merged_in_adapter_mode = []
        with torch.inference_mode(False):
            for i, (field, item, s, report, kept) in enumerate(plans):
                src = trainable_copy(item)
                entry = {"name": item.name, "strength": s, "mode": mode, "node": node}
                if mode == "adapter":
                    net = network_from_lora(view, src, f"musubi-apply:{node}:{i}:{item.name}", s, keep)
                    written = merge_into_view(view, src, s, kept, None if net.adapters() else entry,
                                              compat.check_interrupt, hooked=True, owned=owned)
                    merged_in_adapter_mode.append(written)
                    if net.adapters():
                        net.requires_grad_(False)   # applied, not trained (a training session on top trains its own)
                        net.attach(view)
                        add_network(view, net, entry)
                else:
                    merge_into_view(view, src, s, kept, entry, compat.check_interrupt, owned=owned)

        lines = [f"Applied {len(plans)} LoRA(s) in {mode} mode:"]
        for i, (field, item, s, report, kept) in enumerate(plans):
            lines.append(f"- {field} {item.name} @ {s:g}: {len(report.matched)}/{len(item.modules)} modules matched, "
                         f"{len(report.unmatched_keys)} keys unmatched, {len(report.uncovered)} default targets not "
                         "covered" + (f", block filter kept {len(kept)}" if keep is not None else ""))
            kinds = _patch_kinds(item, kept)
            if kinds:
                lines.append(f"  patches: {kinds}")
            if mode == "adapter" and merged_in_adapter_mode[i]:
                w = merged_in_adapter_mode[i]
                lines.append(f"  merged into copy-on-write weights (no hook can apply DoRA / .diff / .set_weight / "
                             f"bias patches): {len(w)} parameters (e.g. {', '.join(w[:3])})")
            if report.unmatched_keys:
                k = report.unmatched_keys
                lines.append(f"  skipped {len(k)} keys that match no weight of the model or are not applied: "
                             + ", ".join(k[:_LISTED]) + (f" (+{len(k) - _LISTED} more)" if len(k) > _LISTED else ""))
            if report.overridden_keys:
                k = report.overridden_keys
                lines.append(f"  {len(k)} keys without effect (their module's .diff/.set_weight replaces them, as in "
                             f"ComfyUI): " + ", ".join(k[:_LISTED]) + (" ..." if len(k) > _LISTED else ""))
            if report.uncovered:
                lines.append(f"  not covered (e.g.): {', '.join(report.uncovered[:4])}")
        stack = lora_stack(view)
        lines.append("LoRAs on this model: " + ", ".join(
            f"{e['name']}@{e['strength']:g} ({e['mode']}, node {e['node']})" for e in stack))
        text = "\n".join(lines)
        return {"ui": {"text": [text]}, "result": (handle.with_module(view), text)}


_LISTED = 12   # keys listed by name in a report line


def _patch_kinds(lora, names) -> str:
    """'lora 20, DoRA 4, .diff 6, .diff_b 30' for the modules `names` of a LoRAFile (resolved names may differ from
    the file's for underscore dialects; the counts are over the file's modules then)."""
    mods = [lora.modules[n] for n in names if n in lora.modules] or list(lora.modules.values())
    counts: dict[str, int] = {}

    def add(k):
        counts[k] = counts.get(k, 0) + 1

    for mw in mods:
        if mw.low_rank:
            add(mw.kind + ("+tucker" if {"mid", "hada_t1", "lokr_t2"} & mw.tensors.keys() else ""))
        if mw.dora_scale is not None:
            add("DoRA")
        if mw.weight_patch is not None:
            add(".diff" if mw.weight_patch[0] == "diff" else ".set_weight")
        if mw.bias_diff is not None:
            add(".diff_b")
    return ", ".join(f"{k} {v}" for k, v in counts.items())


class MusubiSaveLoRA:
    DESCRIPTION = ("Save a LoRA as a .safetensors file: comfyui format (loads in core Load LoRA), musubi (kohya "
                   "names, Musubi/sd-scripts metadata) or diffusers/PEFT. Atomic write, numbered like ComfyUI's "
                   "savers; never writes over the file the LoRA was read from.")
    CATEGORY = "Musubi/lora"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = (T.LORA, "STRING")
    RETURN_NAMES = ("lora", "path")
    OUTPUT_TOOLTIPS = ("The LoRA read back from the saved file.", "Full path of the saved file.")

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return checks.validate_inputs(cls, {"filename_prefix": checks.relative_name}, filename_prefix=filename_prefix)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": (T.LORA, {"tooltip": "The LoRA to save."}),
            "filename_prefix": ("STRING", {"default": "loras/musubi_lora",
                                "tooltip": "File name prefix (subfolders allowed); a counter and .safetensors are "
                                           "appended."}),
            "format": (FORMATS, {"default": "comfyui",
                       "tooltip": "comfyui: diffusion_model.* keys; musubi: lora_unet_* keys; diffusers: "
                                  "transformer.* lora_A/lora_B (plain LoRA only); musubi-other: Musubi Tuner's "
                                  "convert_lora --target other layout (diffusion_model.* lora_A/lora_B, alpha "
                                  "folded in)."}),
            "dtype": (SAVE_DTYPES, {"default": "bf16", "tooltip": "Precision of the saved tensors."}),
            "save_to": (["output", "models/loras"], {"default": "output",
                        "tooltip": "output: ComfyUI's output folder; models/loras: the first loras folder (Load "
                                   "LoRA lists it after a refresh)."}),
        }, "optional": {
            "metadata": ("STRING", {"default": "", "multiline": True,
                         "tooltip": "Optional JSON object of extra safetensors metadata, e.g. {\"author\": \"me\"}."}),
        }}

    def save(self, lora, filename_prefix, format, dtype, save_to, metadata=""):
        from ..engine.lora import read_lora, save_lora

        meta = parse_metadata(metadata)
        path = numbered_file(save_to, "loras", filename_prefix, "filename_prefix")
        if lora.source is not None and _same_file(path, lora.source):
            raise invalid("filename_prefix", filename_prefix, "a file different from the LoRA's own file")
        save_lora(lora, path, format=format, metadata=meta, dtype=dtype)
        saved = read_lora(path)
        return {"ui": {"text": [str(path)]}, "result": (saved, str(path))}


class MusubiConvertLoRA:
    DESCRIPTION = ("Convert a LoRA file (any dialect) to comfyui, musubi or diffusers format, keeping its "
                   "weights (ΔW) and metadata. Writes a new file; refuses to write over the input.")
    CATEGORY = "Musubi/lora"
    FUNCTION = "convert"
    OUTPUT_NODE = True
    RETURN_TYPES = (T.LORA, "STRING")
    RETURN_NAMES = ("lora", "path")
    OUTPUT_TOOLTIPS = ("The converted LoRA, read back from the new file.", "Full path of the converted file.")

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None):
        return checks.validate_inputs(cls, {"output_name": checks.relative_name}, output_name=output_name)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": ([NONE] + _lora_files(), {"tooltip": "The LoRA to convert, from models/loras ('none': "
                                                             "use lora_path)."}),
            "format": (FORMATS, {"default": "comfyui", "tooltip": "Target format (musubi-other: Musubi Tuner's "
                                                                "convert_lora --target other layout)."}),
            "output_name": ("STRING", {"default": "converted/lora_comfyui",
                            "tooltip": "Output file name (subfolders allowed; .safetensors is appended)."}),
            "save_to": (LORA_DESTINATIONS, {"default": "models/loras",
                        "tooltip": "models/loras: the first loras folder; output: ComfyUI's output folder."}),
            "dtype": (SAVE_DTYPES, {"default": "fp32", "tooltip": "Precision of the written tensors."}),
        }, "optional": {
            "lora_path": ("STRING", {"default": "",
                          "tooltip": "Instead of lora_name: a full path, or a name relative to models/loras (e.g. "
                                     "the path output of Musubi Save LoRA). Wins when not empty."}),
            "model": (T.DIT, {"tooltip": "Optional DiT to resolve underscore module names exactly (only needed "
                                             "for unusual layouts)."}),
        }}

    def convert(self, lora_name, format, output_name, save_to, dtype, lora_path="", model=None):
        from ..engine.lora import convert_lora, read_lora
        from ..engine.lora.writer import DTYPES

        if (lora_path or "").strip():
            src = resolve_lora_file(lora_path, "lora_path")
        else:
            src = resolve_lora_file(lora_name, "lora_name")
        out = output_file(save_to, "loras", output_name, "output_name")
        if _same_file(out, src):
            raise invalid("output_name", output_name, f"a file different from the input LoRA {src}")
        if model is not None:
            model = T.handle(model, "model", "a DiT from a Musubi DiT loader (Wan, HunyuanVideo)").module
        convert_lora(src, out, format=format, model=model, dtype=DTYPES[dtype])
        return {"ui": {"text": [str(out)]}, "result": (read_lora(out), str(out))}


class MusubiMergeLoRAIntoModel:
    DESCRIPTION = ("Merge up to three LoRAs into a DiT file (Wan or HunyuanVideo) and write a new .safetensors "
                   "checkpoint (base + Σ strength·ΔW), streaming one tensor at a time (RAM: about two copies of the "
                   "largest tensor). Keeps the file's key layout; optional bf16/fp16/fp8 output. Never writes over "
                   "an input.")
    CATEGORY = "Musubi/lora"
    FUNCTION = "merge"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Full path of the merged checkpoint.",)

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None):
        return checks.validate_inputs(cls, {"output_name": checks.relative_name}, output_name=output_name)

    @classmethod
    def INPUT_TYPES(cls):
        loras = [NONE] + _lora_files()
        req = {
            "model_name": (compat.list_model_files("diffusion_models"),
                           {"tooltip": "The DiT file from models/diffusion_models to merge into."}),
        }
        for i in (1, 2, 3):
            req[f"lora_{i}"] = (loras, {"tooltip": f"LoRA #{i} from models/loras ('none' = unused)."})
            req[f"strength_{i}"] = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                    "tooltip": f"Multiplier of LoRA #{i}."})
        req["out_dtype"] = (["keep", "bf16", "fp16", "fp8_e4m3fn"], {"default": "keep",
                            "tooltip": "Precision of the written weights: keep the file's, or bf16/fp16, or fp8 "
                                       "(2-D weight matrices only; norms and biases keep theirs)."})
        req["device"] = (["cpu", "gpu"], {"default": "cpu", "tooltip": "Where ΔW is computed (gpu is faster)."})
        req["output_name"] = ("STRING", {"default": "wan_merged",
                              "tooltip": "Output file name (subfolders allowed; .safetensors is appended)."})
        req["save_to"] = (DIT_DESTINATIONS, {"default": "models/diffusion_models",
                          "tooltip": "models/diffusion_models: the first such folder; output: ComfyUI's output."})
        return {"required": req, "hidden": {"unique_id": "UNIQUE_ID"}}

    def merge(self, model_name, lora_1, strength_1, lora_2, strength_2, lora_3, strength_3, out_dtype, device,
              output_name, save_to, unique_id=None):
        from ..engine.lora import merge_loras_into_checkpoint

        base = compat.model_file_path("diffusion_models", model_name) if model_name else None
        if base is None or not os.path.isfile(base):
            raise invalid("model_name", model_name, f"a DiT file in models/diffusion_models "
                                                    f"{compat.model_folders('diffusion_models')}")
        loras = []
        for i, (name, s) in enumerate([(lora_1, strength_1), (lora_2, strength_2), (lora_3, strength_3)], 1):
            if name and name != NONE:
                loras.append((resolve_lora_file(name, f"lora_{i}"), float(s)))
        if not loras:
            raise invalid("lora_1", lora_1, "at least one LoRA (lora_1..lora_3 are all 'none')")
        out = output_file(save_to, "diffusion_models", output_name, "output_name")
        for p in [base] + [p for p, _ in loras]:
            if _same_file(out, p):
                raise invalid("output_name", output_name, f"a file different from every input (it is {p})")
        dev = "cpu"
        if device == "gpu":
            dev = compat.torch_device()
            compat.make_room(1 << 30, dev)
        bar = compat.Progress(1, unique_id)  # per tensor: a cancel stops within one tensor, nothing is written
        merge_loras_into_checkpoint(base, loras, out, out_dtype=None if out_dtype == "keep" else out_dtype,
                                    device=dev, progress=bar.callback())
        return {"ui": {"text": [str(out)]}, "result": (str(out),)}


class MusubiLoRAPostHocEMA:
    DESCRIPTION = ("Post-hoc EMA of saved LoRA checkpoints (Musubi's lora_post_hoc_ema): constant β, linear β→β2, "
                   "or the power-function EMA from sigma_rel (Karras et al.). Files: a folder or one file per line; "
                   "relative names are looked up in models/loras.")
    CATEGORY = "Musubi/lora"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = (T.LORA, "STRING", "STRING")
    RETURN_NAMES = ("lora", "path", "summary")
    OUTPUT_TOOLTIPS = ("The averaged LoRA, read back from the new file.", "Full path of the averaged file.",
                       "Method, β values and the files averaged, in order.")

    @classmethod
    def VALIDATE_INPUTS(cls, output_name=None):
        return checks.validate_inputs(cls, {"output_name": checks.relative_name}, output_name=output_name)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "files": ("STRING", {"default": "", "multiline": True,
                      "tooltip": "A folder of .safetensors checkpoints, or one LoRA file per line (full paths or "
                                 "names relative to models/loras)."}),
            "beta": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.001,
                     "tooltip": "EMA decay β: avg ← β·avg + (1−β)·next file."}),
            "beta2": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                      "tooltip": "If > 0: β goes linearly from beta to beta2 over the files. 0 = constant β."}),
            "sigma_rel": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                          "tooltip": "If > 0: power-function EMA with this relative width (e.g. 0.2); overrides "
                                     "beta/beta2. 0 = off."}),
            "sort_by_mtime": ("BOOLEAN", {"default": True,
                              "tooltip": "Order the files by modification time (oldest first); off = as listed."}),
            "output_name": ("STRING", {"default": "ema/lora_ema",
                            "tooltip": "Output file name (subfolders allowed; .safetensors is appended)."}),
            "save_to": (LORA_DESTINATIONS, {"default": "models/loras",
                        "tooltip": "models/loras: the first loras folder; output: ComfyUI's output folder."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def run(self, files, beta, beta2, sigma_rel, sort_by_mtime, output_name, save_to, unique_id=None):
        from ..engine.lora import EMAConfig, post_hoc_ema, read_lora

        lines = [ln.strip() for ln in (files or "").splitlines() if ln.strip()]
        if not lines:
            raise invalid("files", files, "a folder or one LoRA file per line")
        sources: list[str] = []
        if len(lines) == 1 and not lines[0].lower().endswith(".safetensors"):
            folder = lines[0]
            candidates = [Path(folder)] if os.path.isabs(folder) else [Path(f) / folder
                                                                        for f in compat.model_folders("loras")]
            found = next((p for p in candidates if p.is_dir()), None)
            if found is None:
                raise invalid("files", folder, "an existing folder (full path or relative to models/loras) or "
                                               "one .safetensors file per line")
            inputs = str(found)      # the engine leaves the output file out of a folder's listing
        else:
            sources = [resolve_lora_file(ln, "files") for ln in lines]
            inputs = sources
        out = output_file(save_to, "loras", output_name, "output_name")
        for p in sources:
            if _same_file(out, p):
                raise invalid("output_name", output_name, f"a file different from every input (it is {p})")
        config = EMAConfig(beta=float(beta), beta2=float(beta2) or None, sigma_rel=float(sigma_rel) or None,
                           sort=bool(sort_by_mtime))
        bar = compat.Progress(1, unique_id)  # per checkpoint file; a cancel writes nothing
        post_hoc_ema(inputs, out, config, progress=bar.callback())
        lora = read_lora(out)
        method = json.loads(lora.metadata.get("musubi_ema", "{}"))
        used = json.loads(lora.metadata.get("musubi_ema_files", "[]"))
        summary = (f"EMA ({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in method.items())})"
                   f" of {len(used)} file(s): {', '.join(used)}\n-> {out}")
        return {"ui": {"text": [summary]}, "result": (lora, str(out), summary)}


class MusubiLoRAInfo:
    DESCRIPTION = "Show what a LoRA holds: dialect, number of modules, kinds, ranks, alphas, blocks and metadata."
    CATEGORY = "Musubi/lora"
    FUNCTION = "info"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_TOOLTIPS = ("The description, as text.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora": (T.LORA, {"tooltip": "The LoRA to describe."})}}

    def info(self, lora):
        text = describe_lora(lora)
        return {"ui": {"text": [text]}, "result": (text,)}


class MusubiCreateRandomLoRA:
    DESCRIPTION = ("A random LoRA for tests and demos: rank-r factors on every default LoRA target of the model, "
                   "seeded, with a visible but moderate effect (|ΔW| about 20% of a typical weight).")
    CATEGORY = "Musubi/lora"
    FUNCTION = "create"
    RETURN_TYPES = (T.LORA,)
    RETURN_NAMES = ("lora",)
    OUTPUT_TOOLTIPS = ("The random LoRA (in memory; save it with Musubi Save LoRA).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (T.DIT, {"tooltip": "The DiT whose layers the LoRA targets (sizes are read from it)."}),
            "rank": ("INT", {"default": 4, "min": 1, "max": 256, "tooltip": "LoRA rank."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": False,
                     "tooltip": "Random seed."}),
        }}

    def create(self, model, rank, seed):
        from ..engine.lora import select_targets
        from ..engine.lora.dialects import LoRAFile
        from ..engine.lora.weights import ModuleWeights

        model = T.handle(model, "model", "a DiT from a Musubi DiT loader (Wan, HunyuanVideo)").module
        modules = dict(model.named_modules())
        g = torch.Generator().manual_seed(int(seed) % (2**63))
        out = {}
        with torch.inference_mode(False):
            for name in select_targets(model):
                o, i = modules[name].weight.shape
                down = torch.randn(rank, i, generator=g)
                up = torch.randn(o, rank, generator=g) * (0.2 / math.sqrt(i * rank))
                out[name] = ModuleWeights("lora", {"down": down, "up": up}, float(rank), [])
        meta = {"musubi_random_lora": json.dumps({"rank": rank, "seed": seed})}
        return (LoRAFile(out, meta, "random", None),)


NODE_CLASS_MAPPINGS = {
    "MusubiLoadLoRA": MusubiLoadLoRA,
    "MusubiApplyLoRA": MusubiApplyLoRA,
    "MusubiSaveLoRA": MusubiSaveLoRA,
    "MusubiConvertLoRA": MusubiConvertLoRA,
    "MusubiMergeLoRAIntoModel": MusubiMergeLoRAIntoModel,
    "MusubiLoRAPostHocEMA": MusubiLoRAPostHocEMA,
    "MusubiLoRAInfo": MusubiLoRAInfo,
    "MusubiCreateRandomLoRA": MusubiCreateRandomLoRA,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiLoadLoRA": "Musubi Load LoRA",
    "MusubiApplyLoRA": "Musubi Apply LoRA",
    "MusubiSaveLoRA": "Musubi Save LoRA",
    "MusubiConvertLoRA": "Musubi Convert LoRA",
    "MusubiMergeLoRAIntoModel": "Musubi Merge LoRA into Model File",
    "MusubiLoRAPostHocEMA": "Musubi LoRA Post-hoc EMA",
    "MusubiLoRAInfo": "Musubi LoRA Info",
    "MusubiCreateRandomLoRA": "Musubi Create Random LoRA",
}
