"""The pack's models on ComfyUI's compute device, only while they run (engine/memory/residency.py does the work).

Every node that runs a model goes through these, with the model's handle (engine/handle.py): its run options decide
block swap, offloading and what stays on the GPU. ComfyUI is asked to make room before anything lands on the GPU.

Tests run on CPU: `use_test_transfer(FakeTransfer)` makes the swap path run there with the engine's fake transfer
(evicted weights on the meta device, so a block that runs without its weights fails loudly).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

from . import comfy_compat as compat
from ..engine.handle import ModelHandle, apply_run_options, as_handle
from ..engine.memory.placement import set_before_move_hook
from ..engine.memory.residency import Residency, swapped_indices

# the engine's own room requests (block swap loading a block, detach to the GPU) ask ComfyUI to free memory first
set_before_move_hook(compat.ask_for_room)


def _make_room(bytes_needed: int, device, pins_required: int = 0):
    return compat.make_room(bytes_needed, device, pins_required=pins_required)   # looked up per call (tests patch it)


RESIDENCY = Residency(make_room=_make_room)

use_test_transfer = RESIDENCY.use_test_transfer


def _handle(value) -> ModelHandle:
    handle = as_handle(value)
    if handle is None:
        raise TypeError(f"a model handle or module was expected, got {type(value).__name__}")
    return handle


def active_swapper(value=None):
    """The swapper attached to this model (handle or module), or the list of all attached swappers."""
    return RESIDENCY.active_swapper(None if value is None else _handle(value).module)


def release_swap(value=None, only_if_attached_to_it: bool = False) -> int:
    """Detach block swappers to CPU: all of them, or the one of this model's weight set."""
    return RESIDENCY.release(None if value is None else _handle(value).module, only_if_attached_to_it)


@contextlib.contextmanager
def on_compute_device(value, offload_after: bool = True) -> Iterator[torch.device]:
    """An encoder or VAE on the compute device for the block; back to CPU afterwards if `offload_after`, unless its
    loader chose keep_on_gpu."""
    handle = _handle(value)
    apply_run_options(handle)
    keep = handle.options.keep_on_gpu
    with RESIDENCY.on_device(handle.module, compat.torch_device(), offload_after and not keep) as device:
        yield device


def check_blocks_to_swap(value) -> None:
    """Refuse a blocks_to_swap outside the model's range, naming the input (before anything moves)."""
    handle = _handle(value)
    if handle.options.blocks_to_swap:
        swapped_indices(handle.module, handle.options.blocks_to_swap)


def prepare_for_view(value) -> torch.device:
    """Before a new LoRA view of the model is made and gets adapters (see Residency.prepare_for_view)."""
    handle = _handle(value)
    device = compat.torch_device()
    RESIDENCY.prepare_for_view(handle.module, handle.options.blocks_to_swap, device)
    return device


def place_dit(value, training: bool = False) -> torch.device:
    """The DiT (a loaded model or a LoRA view) on the compute device for running it, per its handle's options."""
    handle = _handle(value)
    apply_run_options(handle)
    opts = handle.options
    return RESIDENCY.place(handle.module, compat.torch_device(), opts.blocks_to_swap, opts.offload_non_blocks,
                           training=training)


def offload_dit(value) -> None:
    RESIDENCY.offload(_handle(value).module)


@contextlib.contextmanager
def dit_on_device(value, offload_after: bool = False, training: bool = False) -> Iterator[torch.device]:
    """`with dit_on_device(model, offload_after) as device:` run the DiT there (see `place_dit`); afterwards back
    to CPU memory when the node or the loader (offload_after_use) asks for it."""
    handle = _handle(value)
    device = place_dit(handle, training=training)
    try:
        yield device
    finally:
        if offload_after or handle.options.offload_after_use:
            offload_dit(handle)


def experts_on_device(experts, offload_after: bool = False):
    """A Wan 2.2 expert pair set up to run on the compute device through the pack's residency (each expert with its
    loader's block swap); its runner places, parks and offloads the experts as the steps go."""
    handles = [as_handle(s) for s in (experts.low, experts.high)]   # None for an absent or lazy expert
    for handle in handles:
        if handle is not None:
            check_blocks_to_swap(handle)
    offload = offload_after or any(h is not None and h.options.offload_after_use for h in handles)
    return dataclasses.replace(experts, device=compat.torch_device(), residency=RESIDENCY, offload_after=offload)
