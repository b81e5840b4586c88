"""Replaying a forward later (a recompute in backward): the autocast and RNG state it ran under."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def autocast_state(device_type: str) -> list[tuple[str, bool, torch.dtype, bool]]:
    """(device type, enabled, dtype, cache) for the CPU and `device_type`: what `autocast_contexts` re-enters."""
    types = ["cpu"] + ([device_type] if device_type not in ("cpu", "meta") else [])
    cache = torch.is_autocast_cache_enabled()
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), cache) for t in types]


def enter_autocast(stack: contextlib.ExitStack, state: list[tuple[str, bool, torch.dtype, bool]]) -> None:
    for device_type, enabled, dtype, cache in state:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache))


def rng_state(tensors) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The CPU RNG state and that of every CUDA device the tensors are on."""
    cuda = {}
    if torch.cuda.is_initialized():
        for d in sorted({t.device.index for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}):
            cuda[d] = torch.cuda.get_rng_state(d)
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def replayed_rng(cpu_state: torch.Tensor, cuda_states: dict[int, torch.Tensor]) -> Iterator[None]:
    """Set the RNG state captured in forward; give the caller's state back afterwards."""
    saved_cpu = torch.get_rng_state()
    saved_cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_states}
    torch.set_rng_state(cpu_state)
    for d, s in cuda_states.items():
        torch.cuda.set_rng_state(s, d)
    try:
        yield
    finally:
        torch.set_rng_state(saved_cpu)
        for d, s in saved_cuda.items():
            torch.cuda.set_rng_state(s, d)
