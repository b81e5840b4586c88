"""Which modules a LoRA targets, and how their names are spelled in each LoRA dialect.

The canonical name of a target is the module path in the family's model (also ComfyUI's native name). Each family's
`LoRASpec` (engine.families) says which modules are in its blocks and how other tools spell them; every dialect is
translated to and from the canonical name here, nowhere else.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from ..families import families, family_of

MUSUBI_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."


def select_targets(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = (),
                   default_exclude: bool = True) -> list[str]:
    """Names of the Linear modules inside the model's blocks that an adapter wraps, in model order.

    Musubi's semantics: regexes are full-matched against the dotted name; exclusion first (user patterns plus the
    architecture default), then `include` re-admits excluded modules (it does not restrict on its own)."""
    spec = family_of(model).lora
    excludes = [re.compile(p) for p in exclude]
    if default_exclude:
        excludes.append(re.compile(spec.default_exclude))
    includes = [re.compile(p) for p in include]
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or spec.block_of(name) is None:
            continue
        excluded = any(p.fullmatch(name) for p in excludes)
        if excluded and any(p.fullmatch(name) for p in includes):
            excluded = False
        if not excluded:
            names.append(name)
    return names


def block_index(module_name: str) -> int | None:
    """The block number of a module name (its index inside its block list), for any registered family."""
    return next((b[1] for f in families() if (b := f.lora.block_of(module_name)) is not None), None)


# --- musubi / kohya underscore names -------------------------------------------------------------------------------

def musubi_stem(module_name: str) -> str:
    """`blocks.0.self_attn.q` -> `lora_unet_blocks_0_self_attn_q`."""
    return MUSUBI_PREFIX + module_name.replace(".", "_")


def underscore_map(module_names: Iterable[str]) -> dict[str, str]:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q` for the modules a model really has (no guessing)."""
    return {n.replace(".", "_"): n for n in module_names if n}


def resolve_underscore(name: str, known: dict[str, str] | None) -> str | None:
    """An underscore module name (prefix removed) -> dotted name: the model's own names when known, else the first
    family whose layout resolves it."""
    if known is not None:
        return known.get(name)
    return next((n for f in families() if (n := f.lora.underscore_to_name(name)) is not None), None)


# --- diffusers / PEFT names (each family maps its own) --------------------------------------------------------------

def looks_diffusers(name: str) -> bool:
    return any(f.lora.looks_diffusers(name) for f in families())


def diffusers_to_official(name: str) -> str | None:
    return next((n for f in families() if (n := f.lora.diffusers_to_name(name)) is not None), None)


def diffusers_to_fused(name: str) -> tuple[str, int] | None:
    """A diffusers piece of a fused layer -> (official fused name, piece index); None for anything else."""
    return next((p for f in families() if (p := f.lora.diffusers_to_fused(name)) is not None), None)


def fused_layout(name: str) -> tuple[tuple[str, int], ...] | None:
    """An official fused layer -> its diffusers pieces in row order with their rows per input feature."""
    return next((p for f in families() if (p := f.lora.fused_to_diffusers(name)) is not None), None)
