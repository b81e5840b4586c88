"""Move the pack's models to the compute device only while they are used, asking ComfyUI for room first.

Two entry points:

* `on_compute_device(obj, offload_after)`: encoders and the VAE (whole module to the device, back to CPU after).
* `dit_on_device(model, offload_after, training)` / `place_dit(model)` / `offload_dit(model)`: every node that runs
  the Wan DiT (sampler, training, validation) goes through these. With `model.blocks_to_swap > 0` on a CUDA device
  they attach a block swapper (engine/memory/block_swap.py) instead of moving the whole model.

Block swap and LoRA views (nodes/lora.py): the loader's model and every LoRA view of it share one set of weights
(the same `_parameters` dicts) but have their own module objects and hooks. A swapper hooks one module's blocks and
re-points the shared weights, so there is exactly one active swapper per weight set, kept in `_ACTIVE`: it stays
attached while the same module keeps running (across steps, nodes and queue runs); when another module of the same
weight set is about to run, the active swapper is detached to CPU (never to the GPU: the swapped blocks would not
fit) and a new one is attached to the module about to run. `release_swap()` detaches them (Unload Models, before a
new view is made from a model, when a training session is replaced).

Tests run on CPU: `use_test_transfer(FakeTransfer)` makes the swap path run there with the engine's fake transfer
(evicted weights on the meta device, so a block that runs without its weights fails loudly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Iterator

import torch

from . import comfy_compat as compat
from ..engine.families import blocks_of
from ..engine.memory.block_swap import SWAPPER_ATTR
from ..engine.memory.placement import set_before_move_hook

_MARGIN = 256 << 20

# the engine's own room requests (block swap loading a block, detach to the GPU) ask ComfyUI to free memory first
set_before_move_hook(compat.ask_for_room)


def _module_of(obj) -> torch.nn.Module | None:
    if isinstance(obj, torch.nn.Module):
        return obj
    inner = getattr(obj, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else None


def module_bytes(obj) -> int:
    m = _module_of(obj)
    if m is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def current_device(obj) -> torch.device:
    m = _module_of(obj)
    for p in (m.parameters() if m is not None else ()):
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def on_compute_device(obj, offload_after: bool = True) -> Iterator[torch.device]:
    """Yield the device to compute on, with `obj` moved there; move it back to CPU afterwards if `offload_after`."""
    device = compat.torch_device()
    moved = False
    if device.type != "cpu" and current_device(obj) != device:
        compat.make_room(int(module_bytes(obj) * 1.1) + _MARGIN, device)
        obj.to(device)
        moved = True
    try:
        yield device
    finally:
        if moved and offload_after and not getattr(obj, "keep_on_gpu", False):  # the loader's option wins
            obj.to("cpu")


# --- block swap for the DiT ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Active:
    module: torch.nn.Module      # the module whose blocks carry the hooks (kept alive while attached)
    swapper: object              # engine.memory.BlockSwapper
    blocks_to_swap: int
    device: torch.device
    offload_non_blocks: bool = False


_ACTIVE: dict[int, _Active] = {}          # weight-set key -> the one attached swapper
_LOCK = threading.RLock()
_test_transfer: Callable[[], object] | None = None


def use_test_transfer(factory: Callable[[], object] | None) -> Callable[[], object] | None:
    """Tests: swap with `factory()` (e.g. engine.memory.FakeTransfer) even on CPU. None restores the normal rule
    (swap only on CUDA). Returns the previous factory."""
    global _test_transfer
    previous, _test_transfer = _test_transfer, factory
    return previous


def weight_key(module: torch.nn.Module) -> int:
    """Identity of a module's weight set: the root's `_parameters` dict, shared by the model and all its views."""
    return id(module._parameters)


def blocks_to_swap(module) -> int:
    return int(getattr(module, "blocks_to_swap", 0) or 0)


def _swap_enabled(module, device: torch.device) -> bool:
    return blocks_to_swap(module) > 0 and (device.type == "cuda" or _test_transfer is not None)


def _swapped_indices(module, n: int) -> list[int]:
    from ..engine.memory import choose_swapped, validate_blocks_to_swap

    num = len(blocks_of(module))
    name = getattr(getattr(module, "config", None), "variant", None) or type(module).__name__
    validate_blocks_to_swap(n, num, name)
    return choose_swapped(num, n)


def check_blocks_to_swap(module) -> None:
    """Raise MusubiInputError naming blocks_to_swap when the model's value is out of its range (checked on every
    device, as the loader does, so a graph that fails on the GPU fails on CPU too)."""
    if getattr(module, "blocks_to_swap", 0):
        _swapped_indices(module, module.blocks_to_swap)


def _swap_room(module, swapped: list[int], device: torch.device, prefetch: int = 1) -> int:
    """Bytes that will land on the device when swapping: what of the resident part is not there yet, plus the
    swapped blocks in flight (prefetch + 1 at most)."""
    from ..engine.memory import bytes_to_move, estimate_module_bytes

    all_blocks = blocks_of(module)
    blocks = [all_blocks[i] for i in swapped]
    biggest = max((estimate_module_bytes(b) for b in blocks), default=0)
    return bytes_to_move(module, device, exclude=blocks) + (prefetch + 1) * biggest


def _pinned_masters(module, swapped: list[int]) -> int:
    """Pinned host bytes the swapper allocates: the swapped blocks' masters (declared to newer ComfyUI)."""
    from ..engine.memory import estimate_module_bytes

    return sum(estimate_module_bytes(module.blocks[i]) for i in swapped)


def active_swapper(module=None):
    """The swapper attached to `module` (None if another module of its weight set, or none, holds it); without a
    module: the list of all attached swappers."""
    with _LOCK:
        if module is None:
            return [a.swapper for a in _ACTIVE.values()]
        entry = _ACTIVE.get(weight_key(module))
        return entry.swapper if entry is not None and entry.module is module else None


def _detach(key: int, device="cpu") -> None:
    entry = _ACTIVE.pop(key)
    entry.module.__dict__.pop(SWAPPER_ATTR, None)
    with torch.inference_mode(False):   # weights made here must stay usable by autograd (training)
        entry.swapper.detach(device)


def release_swap(module=None, only_if_attached_to_it: bool = False) -> int:
    """Detach swappers to CPU: all of them, or the one of `module`'s weight set (only if `module` itself holds it
    when `only_if_attached_to_it`). Resident blocks stay where they are. Returns how many were detached."""
    with _LOCK:
        if module is None:
            keys = list(_ACTIVE)
        else:
            key = weight_key(module)
            entry = _ACTIVE.get(key)
            keys = [key] if entry is not None and (entry.module is module or not only_if_attached_to_it) else []
        for k in keys:
            _detach(k, "cpu")
        return len(keys)


def _drop_loaded(swapper) -> None:
    """Evict prefetched/bound swapped blocks (free: weights are re-pointed at the host masters). Blocks bound while
    sampling (inference mode) hold inference tensors, which autograd refuses to save: training reloads them."""
    for j in list(getattr(swapper, "_loads", {})):
        swapper._evict(j)


def _move_whole(module: torch.nn.Module, device: torch.device, exclude=()) -> None:
    """Move what is not on `device` yet (after a swapper's detach to CPU, the first layers may be on the GPU and
    the formerly swapped blocks not), asking ComfyUI for room first."""
    from ..engine.memory import bytes_to_move, move_to

    need = bytes_to_move(module, device, exclude)
    if need:
        compat.make_room(int(need * 1.1) + _MARGIN, device)
        with torch.inference_mode(False):
            move_to(module, device, exclude=exclude)


def prepare_for_view(model: torch.nn.Module) -> torch.device:
    """Before a new LoRA view of `model` is made and gets adapters (training): no swapper on the weight set, and
    every weight that will not be swapped on the compute device (swapped blocks stay in CPU memory, so no GPU ever
    holds the whole model). Adapters are created on their base weight's device; `place_dit` on the view then
    attaches the swapper and the caller moves the adapters to the device."""
    device = compat.torch_device()
    with _LOCK:
        swapped = _swapped_indices(model, blocks_to_swap(model)) if _swap_enabled(model, device) else []
        release_swap(model)
        if device.type != "cpu":
            all_blocks = blocks_of(model)
            _move_whole(model, device, exclude=[all_blocks[i] for i in swapped])
    return device


def place_dit(module: torch.nn.Module, training: bool = False) -> torch.device:
    """Put a DiT (the loader's model or any LoRA view of it) on the compute device for running it; return the
    device. With `blocks_to_swap > 0` (CUDA, or the test transfer) the module gets the weight set's swapper (kept
    if it already has it, moved over from another module of the weight set otherwise); else it moves whole."""
    from ..engine.memory import move_to, swap_blocks

    check_blocks_to_swap(module)   # a bad value fails before anything moves
    device = compat.torch_device()
    key = weight_key(module)
    with _LOCK:
        entry = _ACTIVE.get(key)
        swap = _swap_enabled(module, device)
        n = blocks_to_swap(module)
        swapped = _swapped_indices(module, n) if swap else []
        non_blocks = bool(getattr(module, "offload_non_blocks", False))
        keep = swap and entry is not None and entry.module is module and entry.blocks_to_swap == n \
            and entry.device == device and entry.offload_non_blocks == non_blocks
        if entry is not None and not keep:
            _detach(key, "cpu")
        if not swap:
            if device.type != "cpu":
                _move_whole(module, device)
            return device
        compat.make_room(_swap_room(module, swapped, device) + _MARGIN, device,
                         pins_required=_pinned_masters(module, swapped))
        with torch.inference_mode(False):
            if keep:
                if training:
                    _drop_loaded(entry.swapper)
                if not non_blocks:   # (offloaded non-block layers come to the device in each forward)
                    move_to(module, device, exclude=list(blocks_of(module)))   # no-op when already there
            else:
                transfer = _test_transfer() if _test_transfer is not None else None
                swapper = swap_blocks(module, n, device if transfer is None else transfer.device,
                                      transfer=transfer, offload_non_blocks=non_blocks)
                _ACTIVE[key] = _Active(module, swapper, n, device, non_blocks)
                module.__dict__[SWAPPER_ATTR] = swapper
    return device


def offload_dit(module: torch.nn.Module) -> None:
    """After use with offload: detach the weight set's swapper to CPU and move the whole module to CPU."""
    from ..engine.memory import move_to

    with _LOCK:
        release_swap(module)
        with torch.inference_mode(False):
            move_to(module, "cpu")


@contextlib.contextmanager
def dit_on_device(module: torch.nn.Module, offload_after: bool = False,
                  training: bool = False) -> Iterator[torch.device]:
    """`with dit_on_device(model, offload_after) as device:` run the DiT there (see `place_dit`)."""
    device = place_dit(module, training=training)
    try:
        yield device
    finally:
        if offload_after or getattr(module, "offload_after_use", False):  # node option or the loader's option
            offload_dit(module)
