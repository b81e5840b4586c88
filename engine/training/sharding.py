"""Sharding the frozen base of a DiT across the ranks of a data-parallel run (PyTorch FSDP2, `fully_shard`).

Each transformer block (the family's block lists) is one FSDP2 unit, the rest of the model (embeddings, head) the
root unit: between uses every rank holds 1/W of each base weight (dim-0 shards, DTensors); a block's weights are
all-gathered just before it runs (forward, and again in backward: `reshard_after_forward`) and freed after.

Only the base is sharded. The base is frozen, so FSDP2 has no gradient to reduce-scatter: it only all-gathers.
The adapters are not part of the model (forward hooks on its Linears, engine/lora/adapters.py): they stay whole
on every rank and keep training under DDP exactly as without sharding, so the optimizer state, the saved states
and the LoRA files are those of a single process, and a state resumes with or without sharding.

Runs on a `torch.distributed` group of its own (its all-gathers never queue behind DDP's all-reduces); gloo on
CPU, NCCL on CUDA. Rank-local work on the model (validation, evaluation) would wait for peers that never join:
the session refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import invalid

SHARD_MODES = ("none", "fsdp2")


@dataclass(frozen=True)
class ShardReport:
    units: int                 # FSDP2 units: the blocks, + 1 for the root
    total_bytes: int           # the whole base (every rank's shards together)
    local_bytes: int           # this rank's shards and unsharded tensors (buffers)


def validate_shard_mode(mode: str, what: str = "shard_base") -> None:
    if mode not in SHARD_MODES:
        raise invalid(what, mode, f"one of {SHARD_MODES}")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:   # torch < 2.6 has it under _composable only
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def shard_frozen_base(model: nn.Module, device: torch.device, group=None) -> ShardReport:
    """FSDP2 over `model`'s blocks and root, on a new group of the ranks of `group` (default: the world). Every
    rank calls it at the same point (it forms a group). The model may sit in host memory: each unit moves to
    `device` as it is sharded, so no device ever holds more than one whole block. Frozen base only."""
    from torch.distributed.device_mesh import DeviceMesh

    from ..families import blocks_of
    from ..memory.block_swap import SWAPPER_ATTR

    if any(p.requires_grad for p in model.parameters()):
        raise invalid("shard_base", "fsdp2", "a frozen base model (only the adapters train)")
    if model.__dict__.get(SWAPPER_ATTR) is not None:
        raise invalid("shard_base", "fsdp2 with block swap", "one of the two: each rank holds 1/N of the weights "
                                                             "with fsdp2, set blocks_to_swap to 0")
    blocks = blocks_of(model)
    if not len(blocks):
        raise invalid("shard_base", "fsdp2", "a model whose family names its transformer blocks")
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    shard_group = dist.new_group(ranks=ranks, backend=backend)
    mesh = DeviceMesh.from_group(shard_group, device.type)
    fully_shard = _fully_shard()
    total = _bytes(model, local=False)
    with torch.no_grad():
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return ShardReport(units=len(blocks) + 1, total_bytes=total, local_bytes=_bytes(model, local=True))


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def resident_bytes(model: nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers this rank holds (a sharded weight: its local shard only)."""
    return _bytes(model, local=True)


def _is_dtensor(t) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _bytes(model: nn.Module, local: bool) -> int:
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if local and _is_dtensor(t):
            t = t.to_local()
        total += t.numel() * t.element_size()
    return total


__all__ = ["SHARD_MODES", "ShardReport", "is_sharded", "resident_bytes", "shard_frozen_base", "validate_shard_mode"]
