"""LoRA views: a model that carries LoRAs without touching the model it comes from.

A loaded DiT is shared (one copy serves every graph), so applying a LoRA makes a *view*: new module objects that
share every parameter and buffer with the source (no weight is copied; moving one to a device moves both), carrying
the LoRA hooks (adapter mode) or private merged copies of the touched weights (merge mode, copy-on-write).
Consequences: re-applying with another strength builds a fresh view from the clean source (exactly one
application, never stacking); the source never has a LoRA on it; a view of a view keeps the upstream LoRAs.
A training session trains on a view too (`add_network`).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..memory.block_swap import SWAPPER_ATTR, BlockSwapper
from ..memory.placement import execution_device
from .dialects import resolved_modules
from .merge import patch_module

_STACK = "_musubi_lora_stack"          # view attribute: [{"name", "strength", "mode", "node"}] (inherited + own)
_NETWORKS = "_musubi_lora_networks"    # view attribute: AdapterNetworks whose hooks the view carries
_COW = "_musubi_lora_cow"              # view attribute: names of modules holding private merged weights
_VIEW_CLASSES: dict[type, type] = {}


def _view_class(cls: type) -> type:
    if getattr(cls, "_musubi_lora_view", False):
        return cls
    if cls not in _VIEW_CLASSES:
        _VIEW_CLASSES[cls] = type(f"{cls.__name__}WithLoRA", (cls,), {"_musubi_lora_view": True,
                                                                       "__module__": __name__})
    return _VIEW_CLASSES[cls]


def _copy_module(module: nn.Module, root: bool) -> nn.Module:
    """New module objects sharing `_parameters` / `_buffers` with `module`; own children and own hook dicts."""
    cls = _view_class(type(module)) if root else type(module)
    new = cls.__new__(cls)
    d = {}
    for k, v in module.__dict__.items():
        if k == "_modules":
            v = type(v)((name, None if child is None else _copy_module(child, False)) for name, child in v.items())
        elif "hook" in k and isinstance(v, dict):
            v = type(v)(v)
        d[k] = v
    d.pop("forward", None)   # an instance forward (torch.compile's wrapper) is bound to the source module: not ours
    _drop_block_swap_hooks(d)
    if root:
        for k in [k for k in d if k.startswith("_musubi_")]:
            del d[k]
        pre = d.get("_forward_pre_hooks")
        if pre:
            for hid in [hid for hid, fn in pre.items() if fn is _sync_lora_devices]:
                del pre[hid]
                d.get("_forward_pre_hooks_with_kwargs", {}).pop(hid, None)
        d[_STACK] = list(module.__dict__.get(_STACK, []))
        d[_NETWORKS] = list(module.__dict__.get(_NETWORKS, []))
        d[_COW] = set(module.__dict__.get(_COW, set()))
    new.__dict__.update(d)
    return new


def _is_block_swap_hook(fn) -> bool:
    return isinstance(getattr(fn, "__self__", None), BlockSwapper) or \
        getattr(fn, "__qualname__", "").startswith("BlockSwapper.")


def _drop_block_swap_hooks(d: dict) -> None:
    """A view made while a block swapper is attached to the source must not inherit the swapper's hooks (they would
    outlive its detach): drop them, and their ids from the companion dicts (`*_with_kwargs`, `*_always_called`)."""
    doomed = set()
    for k, v in d.items():
        if "hook" in k and isinstance(v, dict):
            doomed.update(hid for hid, fn in v.items() if callable(fn) and _is_block_swap_hook(fn))
    if doomed:
        for k, v in d.items():
            if "hook" in k and isinstance(v, dict):
                for hid in doomed:
                    v.pop(hid, None)


def make_lora_view(model: nn.Module) -> nn.Module:
    view = _copy_module(model, root=True)
    view.register_forward_pre_hook(_sync_lora_devices)
    return view


def _sync_lora_devices(view, args):
    """Adapters and merged weights follow the shared weights' device (they are not submodules of the view)."""
    if next(iter(view.parameters()), None) is None:
        return None
    device = execution_device(view)   # with offload_non_blocks the first layers sit in host memory between calls
    for net in view.__dict__.get(_NETWORKS, ()):
        q = next(iter(net.parameters()), None)
        if q is None:
            q = next(iter(net.buffers()), None)
        if q is not None and q.device != device:
            net.to(device)
    swapper = view.__dict__.get(SWAPPER_ATTR)   # block swap places the swapped blocks' weights itself
    swapped = set() if swapper is None else {id(m) for i in swapper.swapped for m in swapper.blocks[i].modules()}
    for name in view.__dict__.get(_COW, ()):
        m = view.get_submodule(name)
        if id(m) in swapped:
            continue
        for p in m._parameters.values():   # the module's own parameters (a block's modulation: not its children)
            if p is not None and p.device != device:
                p.data = p.data.to(device)
    return None


def lora_stack(model) -> list[dict]:
    """The LoRAs a view carries, oldest first: {"name", "strength", "mode", "node"}."""
    return list(getattr(model, "__dict__", {}).get(_STACK, []))


def add_network(view: nn.Module, network, entry: dict) -> None:
    """Record an attached AdapterNetwork on the view (its device follows the view's weights) and in its stack."""
    view.__dict__[_NETWORKS].append(network)
    view.__dict__[_STACK].append(dict(entry))


def trainable_copy(lora):
    """The LoRA's tensors as normal tensors (inference-mode tensors are refused by autograd)."""
    def plain(t):
        if isinstance(t, torch.Tensor) and t.is_inference():
            with torch.inference_mode(False):
                return t.clone()
        return t

    modules = {name: dataclasses.replace(
        mw, tensors={k: plain(v) for k, v in mw.tensors.items()}, dora_scale=plain(mw.dora_scale),
        bias_diff=plain(mw.bias_diff),
        weight_patch=None if mw.weight_patch is None else (mw.weight_patch[0], plain(mw.weight_patch[1])))
        for name, mw in lora.modules.items()}
    return dataclasses.replace(lora, modules=modules)


def private_param(view: nn.Module, path: str, owned: set) -> nn.Parameter:
    """The view's own copy of the parameter at `path` (copy-on-write: cloned once per `owned` set, i.e. per Apply
    node; the module gets its own parameter dict so the source and upstream views keep theirs)."""
    mod_name, _, pname = path.rpartition(".")
    m = view.get_submodule(mod_name)
    if path not in owned:
        p = m._parameters[pname]
        params = type(m._parameters)(m._parameters)
        params[pname] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        m._parameters = params
        owned.add(path)
        view.__dict__[_COW].add(mod_name)
    return m._parameters[pname]


def merge_into_view(view: nn.Module, lora, strength: float, names: list[str], entry: dict | None,
                    check_cancel=lambda: None, hooked: bool = False, owned: set | None = None) -> list[str]:
    """Merge the LoRA's patches of the modules `names` into private copies of the parameters they change
    (copy-on-write; DoRA, `.diff`, `.set_weight` and bias patches included). `hooked`: the plain low-rank ΔW is
    applied by adapters on the view, so only the rest is merged. `owned`: parameters already private to this
    application (shared across the LoRAs of one node). `check_cancel()` runs before each module (it may raise).
    Records `entry` in the view's stack when given. Returns the parameter paths written."""
    owned = set() if owned is None else owned
    selected = set(names)
    written, params = [], dict(view.named_parameters())
    with torch.no_grad():
        for name, mw in resolved_modules(lora, view).items():
            if name not in selected:
                continue
            check_cancel()
            written += patch_module(view, name, mw, strength, None, hooked,
                                    param=lambda path: private_param(view, path, owned), params=params)
    if entry is not None:
        view.__dict__[_STACK].append(dict(entry))
    return written
