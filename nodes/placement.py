"""Move the pack's models to the compute device only while they are used, asking ComfyUI for room first."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from . import comfy_compat as compat


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
        compat.make_room(int(module_bytes(obj) * 1.1) + (256 << 20), device)
        obj.to(device)
        moved = True
    try:
        yield device
    finally:
        if moved and offload_after:
            obj.to("cpu")
