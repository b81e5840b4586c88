"""Placement helpers: move modules between devices cheaply, and let the host application make room first.

The engine never imports ComfyUI. The node layer registers `set_before_move_hook(fn)`; before any engine helper
puts tensors on an accelerator it calls `fn(bytes_needed, device)` so ComfyUI can unload its own models.
Parameters keep their identity when moved (`p.data` is replaced), so optimizers and adapters holding them survive.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn

BeforeMoveHook = Callable[[int, torch.device], None]
_before_move_hook: BeforeMoveHook | None = None


def set_before_move_hook(fn: BeforeMoveHook | None) -> BeforeMoveHook | None:
    """Install (or clear with None) the hook; returns the previous one so callers can restore it."""
    global _before_move_hook
    previous, _before_move_hook = _before_move_hook, fn
    return previous


def request_room(bytes_needed: int, device: torch.device | str) -> None:
    """Ask the host application for `bytes_needed` free bytes on `device` (no-op on CPU or without a hook)."""
    device = torch.device(device)
    if _before_move_hook is not None and bytes_needed > 0 and device.type not in ("cpu", "meta"):
        _before_move_hook(int(bytes_needed), device)


def _own_tensors(module: nn.Module, exclude: Iterable[nn.Module] = ()) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner, name, tensor, is_param) for every parameter/buffer of `module` outside the `exclude` subtrees."""
    skip = {id(m) for m in exclude}
    stack = [module]
    while stack:
        m = stack.pop()
        if id(m) in skip:
            continue
        for name, p in m._parameters.items():
            if p is not None:
                yield m, name, p, True
        for name, b in m._buffers.items():
            if b is not None:
                yield m, name, b, False
        stack.extend(m._modules.values() if hasattr(m, "_modules") else ())


def estimate_module_bytes(module: nn.Module, exclude: Iterable[nn.Module] = (), only_frozen: bool = False) -> int:
    """Bytes of the module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for _, _, t, is_param in _own_tensors(module, exclude):
        if only_frozen and is_param and t.requires_grad:
            continue
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _same_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def bytes_to_move(module: nn.Module, device: torch.device | str, exclude: Iterable[nn.Module] = ()) -> int:
    device = torch.device(device)
    return sum(t.numel() * t.element_size() for _, _, t, _ in _own_tensors(module, exclude)
               if not _same_device(t, device))


def _to(t: torch.Tensor, device: torch.device, non_blocking: bool, pin_memory: bool) -> torch.Tensor:
    if pin_memory and device.type == "cpu" and t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)   # pinned: a fast way back
        return host.copy_(t)
    return t.to(device, non_blocking=non_blocking)


def move_to(module: nn.Module, device: torch.device | str, exclude: Iterable[nn.Module] = (),
            non_blocking: bool = False, pin_memory: bool = False) -> nn.Module:
    """Move `module`'s tensors (except the `exclude` subtrees) to `device`. Costs one pass over the tensors when
    everything is already there. Calls the before-move hook with the bytes that will land on an accelerator.
    `pin_memory`: tensors leaving a CUDA device for the CPU land in pinned host memory."""
    device = torch.device(device)
    exclude = tuple(exclude)
    need = bytes_to_move(module, device, exclude)
    if need == 0:
        return module
    request_room(need, device)
    with torch.no_grad():
        for owner, name, t, is_param in list(_own_tensors(module, exclude)):
            if _same_device(t, device):
                continue
            moved = _to(t, device, non_blocking, pin_memory)
            if is_param:
                try:
                    t.data = moved                  # same Parameter object: optimizers/adapters keep working
                except RuntimeError:                # to/from meta: incompatible tensor types, replace the Parameter
                    owner._parameters[name] = nn.Parameter(moved, requires_grad=t.requires_grad)
                    continue
                if t.grad is not None:
                    t.grad = t.grad.to(device, non_blocking=non_blocking)
            else:
                owner._buffers[name] = moved
    return module


@contextlib.contextmanager
def offload_after_use(module: nn.Module, device: torch.device | str, offload_device: torch.device | str = "cpu",
                      enabled: bool = True, exclude: Iterable[nn.Module] = ()) -> Iterator[nn.Module]:
    """`with offload_after_use(vae, "cuda"):` moves the module to `device` for the block and back to
    `offload_device` afterwards (also on error or interrupt). `enabled=False` leaves it on `device` afterwards."""
    move_to(module, device, exclude)
    try:
        yield module
    finally:
        if enabled:
            move_to(module, offload_device, exclude)


EXECUTION_DEVICE_ATTR = "_musubi_execution_device"   # set by an attached block swapper


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the attached block swapper's device (its weights may sit in host memory between
    calls, e.g. with offload_non_blocks), else the device of its first tensor."""
    device = module.__dict__.get(EXECUTION_DEVICE_ATTR)
    return device if device is not None else module_device(module)


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (cpu for an empty module)."""
    for _, _, t, _ in _own_tensors(module):
        return t.device
    return torch.device("cpu")
