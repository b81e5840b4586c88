"""The family registry: the one place generic code asks "which family is this model / cache / LoRA?".

Built-in families are imported on first use (one line each in `_BUILT_IN`); tests and add-ons `register()` more.
"""

from __future__ import annotations

import importlib
from typing import Iterable

import torch.nn as nn

from ..errors import invalid
from .family import Family, Fp8Spec, LoRASpec, names_in_blocks

_BUILT_IN = {"wan": ".wan.family", "hunyuan": ".hunyuan.family",   # name -> module whose FAMILY implements `Family`
             "framepack": ".framepack.family"}
_REGISTERED: dict[str, Family] = {}


def register(family: Family) -> Family:
    _REGISTERED[family.name] = family
    return family


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def families() -> list[Family]:
    for name, module in _BUILT_IN.items():
        if name not in _REGISTERED:
            register(importlib.import_module(module, __name__).FAMILY)
    return list(_REGISTERED.values())


def get_family(name: str) -> Family:
    for f in families():
        if f.name == name:
            return f
    raise invalid("model family", name, f"one of {[f.name for f in families()]}")


def family_of(model) -> Family:
    """The family of a DiT: its class declares `family = "<name>"` (LoRA views inherit it)."""
    name = getattr(type(model), "family", None) or getattr(model, "family", None)
    if not isinstance(name, str):
        raise invalid("model", type(model).__name__, "a DiT of a known model family (loaded by a Musubi DiT loader)")
    return get_family(name)


def family_for_cache_arch(arch: str) -> Family:
    for f in families():
        if arch == f.cache_arch or arch in getattr(f, "cache_arches", ()):   # a family may write several
            return f
    known = [a for f in families() for a in dict.fromkeys((f.cache_arch, *getattr(f, "cache_arches", ())))]
    raise invalid("cache architecture", arch, f"one of {known}")


def family_for_lora_names(names: Iterable[str]) -> Family | None:
    """The family whose blocks most of these canonical/underscore module names belong to (None: no family); among
    families with the same block lists, the one whose layout spells the names."""
    names = list(names)
    best, count = None, 0
    for f in families():
        n = sum(f.lora.owns(name) + f.lora.spells(name) for name in names)
        if n > count:
            best, count = f, n
    return best


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """Every transformer block of a DiT in run order, as one ModuleList (not registered on the model)."""
    return nn.ModuleList(b for blocks in family_of(model).block_lists(model) for b in blocks)


__all__ = ["Family", "Fp8Spec", "LoRASpec", "blocks_of", "families", "family_for_cache_arch",
           "family_for_lora_names", "family_of", "get_family", "names_in_blocks", "register", "unregister"]
