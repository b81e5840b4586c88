"""Activation offload: keep what autograd saves for backward in host memory instead of on the GPU.

Two tools:

* `checkpoint_block(block, x, *rest, offload=True)`: gradient checkpointing of one block whose *input* (the only
  activation checkpointing keeps: the residual stream x, [B, L, D]) is stored on the host. The block runs on the
  device: x goes host->device at the start of the forward and again at the recompute in backward. This is Musubi's
  `--gradient_checkpointing_cpu_offload` (§2.6); for Wan 14B at 832×480×81 it moves ~40 × 335 MB off the GPU.
  Only x is offloaded: the other arguments (time embedding, text context, RoPE tables) are shared by all blocks,
  so checkpointing stores them once anyway.
* `offload_saved_tensors()`: a saved-tensor-hooks context (like `torch.autograd.graph.save_on_cpu`) for code that
  is not checkpointed: every tensor autograd saves is copied to the host and brought back in backward.

Both give exactly the gradients of the plain computation (copies are exact). Host copies are pinned when CUDA is
available so the copies can overlap compute.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@dataclass
class OffloadStats:
    tensors_offloaded: int = 0
    bytes_offloaded: int = 0
    tensors_restored: int = 0


def _host_copy(t: torch.Tensor, host: torch.device) -> torch.Tensor:
    pin = host.type == "cpu" and t.device.type == "cuda"
    out = torch.empty(t.shape, dtype=t.dtype, device=host, pin_memory=pin)
    out.copy_(t, non_blocking=pin)   # pinned: async D2H ordered on the current stream
    return out


class _ToHost(torch.autograd.Function):
    """Differentiable copy to host memory (pinned where possible); gradients go back to the source device."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, host: torch.device) -> torch.Tensor:
        ctx.device = x.device
        return _host_copy(x, host)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.device, non_blocking=True), None


def checkpoint_block(block: nn.Module, x: torch.Tensor, *args, offload: bool = False,
                     host: torch.device | str = "cpu", stats: OffloadStats | None = None, **kwargs) -> torch.Tensor:
    """`torch.utils.checkpoint` (non-reentrant) of `block(x, *args, **kwargs)`, called as a module so block-swap
    hooks fire in forward and in the recompute. With `offload`, the saved input x lives on `host`."""
    if not offload:
        return checkpoint(block, x, *args, use_reentrant=False, **kwargs)
    device = x.device
    x_host = _ToHost.apply(x, torch.device(host))
    if stats is not None:
        stats.tensors_offloaded += 1
        stats.bytes_offloaded += x.numel() * x.element_size()

    def run(xh: torch.Tensor, *a, **kw):
        if stats is not None:
            stats.tensors_restored += 1
        return block(xh.to(device, non_blocking=True), *a, **kw)

    return checkpoint(run, x_host, *args, use_reentrant=False, **kwargs)


@contextlib.contextmanager
def offload_saved_tensors(host: torch.device | str = "cpu", min_bytes: int = 0,
                          stats: OffloadStats | None = None) -> Iterator[OffloadStats]:
    """Every tensor autograd saves inside the block (of at least `min_bytes`, parameters excepted: they are
    already resident and must not be duplicated) is kept on `host` until backward needs it."""
    host = torch.device(host)
    stats = stats if stats is not None else OffloadStats()

    def pack(t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or nbytes < min_bytes or t.device.type == "meta":
            return ("keep", t)
        stats.tensors_offloaded += 1
        stats.bytes_offloaded += nbytes
        return ("host", t.device, _host_copy(t, host))

    def unpack(packed):
        if packed[0] == "keep":
            return packed[1]
        stats.tensors_restored += 1
        _, device, h = packed
        return h.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield stats
