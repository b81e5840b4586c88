"""Which models sit on the compute device, and which module of a shared weight set runs with the block swapper.

A host application (the ComfyUI nodes, a script) keeps one `Residency`; every run of a DiT goes through `place` /
`running`, encoders and VAEs through `on_device`.

Block swap and LoRA views (engine/lora/views.py): a loaded model and every LoRA view of it share one set of weights
(the same `_parameters` dicts) but have their own module objects and hooks. A swapper hooks one module's blocks and
re-points the shared weights, so there is exactly one active swapper per weight set: it stays attached while the
same module keeps running (across steps and calls); when another module of the same weight set is about to run,
the active swapper is detached to CPU (never to the GPU: the swapped blocks would not fit) and a new one is attached
to the module about to run. `release` detaches them (unloading, before a new view is made, when a training session
is replaced).

`make_room(bytes, device, pins_required)` asks the host to free device memory before weights land there (ComfyUI
evicts its own models); `pins_required` are the pinned host bytes the swapper is about to allocate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..families import blocks_of
from .block_swap import SWAPPER_ATTR, choose_swapped, swap_blocks, validate_blocks_to_swap
from .placement import bytes_to_move, estimate_module_bytes, module_device, move_to, request_room

MARGIN = 256 << 20    # asked for on top of what will land on the device (allocator slack, temporaries)
MakeRoom = Callable[..., object]


def _default_make_room(bytes_needed: int, device: torch.device, pins_required: int = 0) -> None:
    request_room(bytes_needed, device)


@dataclasses.dataclass
class _Active:
    module: nn.Module            # the module whose blocks carry the hooks (kept alive while attached)
    swapper: object              # memory.BlockSwapper
    blocks_to_swap: int
    device: torch.device
    offload_non_blocks: bool = False


def weight_key(module: nn.Module) -> int:
    """Identity of a module's weight set: the root's `_parameters` dict, shared by the model and all its views."""
    return id(module._parameters)


def swapped_indices(module: nn.Module, n: int) -> list[int]:
    """The block indices `n` swapped blocks take; a value outside the model's range is refused naming
    blocks_to_swap (checked on every device, so a graph that fails on the GPU fails on CPU too)."""
    num = len(blocks_of(module))
    name = getattr(getattr(module, "config", None), "variant", None) or type(module).__name__
    validate_blocks_to_swap(n, num, name)
    return choose_swapped(num, n)


class Residency:
    def __init__(self, make_room: MakeRoom | None = None):
        self.make_room = make_room or _default_make_room
        self._active: dict[int, _Active] = {}    # weight-set key -> the one attached swapper
        self._lock = threading.RLock()
        self._test_transfer: Callable[[], object] | None = None

    # --- encoders and VAEs: the whole module ---------------------------------------------------------------------
    @contextlib.contextmanager
    def on_device(self, obj, device: torch.device, offload_after: bool = True) -> Iterator[torch.device]:
        """A module, or an encoder holding one as `.model`, on `device` for the block; back to CPU afterwards if
        `offload_after` (also on error)."""
        module = obj if isinstance(obj, nn.Module) else obj.model
        moved = False
        if device.type != "cpu" and module_device(module) != device:
            self.make_room(int(estimate_module_bytes(module) * 1.1) + MARGIN, device)
            obj.to(device)
            moved = True
        try:
            yield device
        finally:
            if moved and offload_after:
                obj.to("cpu")

    # --- the DiT: block swap or the whole module -----------------------------------------------------------------
    def use_test_transfer(self, factory: Callable[[], object] | None) -> Callable[[], object] | None:
        """Tests: swap with `factory()` (e.g. memory.FakeTransfer) even on CPU. None restores the normal rule (swap
        only on CUDA). Returns the previous factory."""
        previous, self._test_transfer = self._test_transfer, factory
        return previous

    def swaps(self, blocks_to_swap: int, device: torch.device) -> bool:
        return blocks_to_swap > 0 and (device.type == "cuda" or self._test_transfer is not None)

    def active_swapper(self, module: nn.Module | None = None):
        """The swapper attached to `module` (None if another module of its weight set, or none, holds it); without
        a module: the list of all attached swappers."""
        with self._lock:
            if module is None:
                return [a.swapper for a in self._active.values()]
            entry = self._active.get(weight_key(module))
            return entry.swapper if entry is not None and entry.module is module else None

    def _detach(self, key: int, device="cpu") -> None:
        entry = self._active.pop(key)
        entry.module.__dict__.pop(SWAPPER_ATTR, None)
        with torch.inference_mode(False):   # weights made here must stay usable by autograd (training)
            entry.swapper.detach(device)

    def release(self, module: nn.Module | None = None, only_if_attached_to_it: bool = False) -> int:
        """Detach swappers to CPU: all of them, or the one of `module`'s weight set (only if `module` itself holds
        it when `only_if_attached_to_it`). Resident blocks stay where they are. Returns how many were detached."""
        with self._lock:
            if module is None:
                keys = list(self._active)
            else:
                key = weight_key(module)
                entry = self._active.get(key)
                keys = [key] if entry is not None and (entry.module is module or not only_if_attached_to_it) else []
            for k in keys:
                self._detach(k, "cpu")
            return len(keys)

    @staticmethod
    def drop_loaded(swapper) -> None:
        """Evict prefetched/bound swapped blocks (free: weights are re-pointed at the host masters). Blocks bound
        while sampling (inference mode) hold inference tensors, which autograd refuses to save: training reloads
        them."""
        swapper.evict_loaded()

    def _move_whole(self, module: nn.Module, device: torch.device, exclude=()) -> None:
        """Move what is not on `device` yet (after a swapper's detach to CPU, the first layers may be on the GPU
        and the formerly swapped blocks not), asking for room first."""
        need = bytes_to_move(module, device, exclude)
        if need:
            self.make_room(int(need * 1.1) + MARGIN, device)
            with torch.inference_mode(False):
                move_to(module, device, exclude=exclude)

    def prepare_for_view(self, module: nn.Module, blocks_to_swap: int, device: torch.device) -> None:
        """Before a new LoRA view of `module` gets adapters (training): no swapper on the weight set, and every
        weight that will not be swapped on the device (swapped blocks stay in host memory, so no GPU ever holds the
        whole model). Adapters are created on their base weight's device; `place` on the view then attaches the
        swapper and the caller moves the adapters to the device."""
        with self._lock:
            swapped = swapped_indices(module, blocks_to_swap) if self.swaps(blocks_to_swap, device) else []
            self.release(module)
            if device.type != "cpu":
                blocks = blocks_of(module)
                self._move_whole(module, device, exclude=[blocks[i] for i in swapped])

    def place(self, module: nn.Module, device: torch.device, blocks_to_swap: int = 0,
              offload_non_blocks: bool = False, training: bool = False) -> torch.device:
        """Put a DiT (a loaded model or any LoRA view of it) on `device` for running it; return the device. With
        `blocks_to_swap > 0` (CUDA, or the test transfer) the module gets the weight set's swapper (kept if it
        already has it, moved over from another module of the weight set otherwise); else it moves whole."""
        swapped = swapped_indices(module, blocks_to_swap) if blocks_to_swap else []   # refused before any move
        key = weight_key(module)
        with self._lock:
            entry = self._active.get(key)
            swap = self.swaps(blocks_to_swap, device)
            keep = swap and entry is not None and entry.module is module and entry.blocks_to_swap == blocks_to_swap \
                and entry.device == device and entry.offload_non_blocks == offload_non_blocks
            if entry is not None and not keep:
                self._detach(key, "cpu")
            if not swap:
                if device.type != "cpu":
                    self._move_whole(module, device)
                return device
            blocks = blocks_of(module)
            biggest = max((estimate_module_bytes(blocks[i]) for i in swapped), default=0)
            in_flight = 2 * biggest    # prefetch 1 + the block running
            self.make_room(bytes_to_move(module, device, exclude=[blocks[i] for i in swapped]) + in_flight + MARGIN,
                           device, pins_required=sum(estimate_module_bytes(blocks[i]) for i in swapped))
            with torch.inference_mode(False):
                if keep:
                    if training:
                        self.drop_loaded(entry.swapper)
                    streamed = set(entry.swapper.swapped)
                    for i, block in enumerate(blocks):   # resident blocks `park` left in host memory come back
                        if i not in streamed:
                            move_to(block, device)      # no-op when already there
                    if not offload_non_blocks:   # (offloaded non-block layers come to the device in each forward)
                        move_to(module, device, exclude=list(blocks))   # no-op when already there
                else:
                    transfer = self._test_transfer() if self._test_transfer is not None else None
                    swapper = swap_blocks(module, blocks_to_swap, device if transfer is None else transfer.device,
                                          transfer=transfer, offload_non_blocks=offload_non_blocks)
                    self._active[key] = _Active(module, swapper, blocks_to_swap, device, offload_non_blocks)
                    module.__dict__[SWAPPER_ATTR] = swapper
        return device

    def park(self, module: nn.Module, pin_memory: bool = True) -> None:
        """Off the device between two uses, keeping the weight set's block swapper attached (its host masters and
        hooks stay valid): streamed blocks are dropped (free), every other tensor on the accelerator goes to (pinned)
        host memory. The next `place` with the same settings brings the resident parts back."""
        with self._lock:
            entry = self._active.get(weight_key(module))
            with torch.inference_mode(False):
                if entry is None:
                    move_to(module, "cpu", pin_memory=pin_memory)
                    return
                self.drop_loaded(entry.swapper)
                blocks = blocks_of(module)
                streamed = set(entry.swapper.swapped)
                for i, block in enumerate(blocks):
                    if i not in streamed:
                        move_to(block, "cpu", pin_memory=pin_memory)
                if not entry.offload_non_blocks:   # offloaded non-block layers already live in a host master
                    move_to(module, "cpu", exclude=list(blocks), pin_memory=pin_memory)

    def offload(self, module: nn.Module) -> None:
        """After use: detach the weight set's swapper to CPU and move the whole module to CPU."""
        with self._lock:
            self.release(module)
            with torch.inference_mode(False):
                move_to(module, "cpu")
