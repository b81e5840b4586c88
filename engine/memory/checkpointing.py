"""Gradient checkpointing (and activation offload) of a DiT's blocks, applied from outside the model.

A model's forward stays a plain loop over its blocks. `set_block_checkpointing(model, True)` switches each block of
the family's block lists (`engine.families.blocks_of`) to a subclass whose call, while autograd records, goes through
`offload.checkpoint_block`; the recompute calls the block as a module again, so block-swap hooks fire in forward and
in backward. Module names, parameters and state dicts are unchanged (LoRA keys stay the same); with grad disabled
(sampling) the block runs as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from .offload import checkpoint_block


@dataclass(frozen=True)
class _Options:
    offload: bool           # keep the checkpointed block input in host memory (activation offload)
    host: str               # that memory's device ("cpu"; the memory simulation uses "meta")
    saved_dtype: torch.dtype | None = None   # dtype the saved block input is kept in (None: the input's own)
    prefetch: bool = False  # offload: bring the next backward block's input back early (one more input on device)
    recompute_cheap: bool = True   # the recompute keeps declared cheap tensors as recipes (engine.memory.recompute)


_CLASSES: dict[tuple[type, _Options], type] = {}


def _checkpointed_class(base: type, options: _Options) -> type:
    key = (base, options)
    if key not in _CLASSES:
        def __call__(self, *args, **kwargs):
            call = partial(nn.Module.__call__, self)   # hooks + forward, as an ordinary module call
            if not torch.is_grad_enabled() or not args:
                return call(*args, **kwargs)
            return checkpoint_block(call, *args, offload=options.offload, host=options.host,
                                    saved_dtype=options.saved_dtype, prefetch=options.prefetch,
                                    recompute_cheap=options.recompute_cheap, **kwargs)

        _CLASSES[key] = type(base.__name__, (base,), {"__call__": __call__, "_checkpoint_base": base,
                                                       "_checkpoint_options": options, "__module__": base.__module__})
    return _CLASSES[key]


def _base(block: nn.Module) -> type:
    return type(block).__dict__.get("_checkpoint_base") or type(block)


def set_block_checkpointing(model: nn.Module, enabled: bool, offload: bool = False, host: str = "cpu",
                            saved_dtype: torch.dtype | None = None, prefetch: bool = False,
                            recompute_cheap: bool = True) -> None:
    """Checkpoint every block of `model` (its family's block lists), with the input kept on `host` when `offload`;
    `enabled=False` restores plain blocks. Idempotent; switching options re-wraps.

    `saved_dtype`: what the kept block input is cast to (and upcast from for the recompute), e.g. the autocast
    dtype for a float32 residual stream — half the memory of the saved inputs; None keeps the input
    exactly (bit-identical gradients). `prefetch` (with `offload`): see `offload.checkpoint_block`.
    `recompute_cheap`: see `offload.checkpoint_block` (same values; less memory in the block's backward)."""
    from ..families import blocks_of

    options = _Options(bool(offload), str(host), saved_dtype, bool(prefetch and offload), bool(recompute_cheap))
    for block in blocks_of(model):
        base = _base(block)
        block.__class__ = _checkpointed_class(base, options) if enabled else base


def block_checkpointing(model: nn.Module) -> tuple[bool, bool]:
    """(checkpointed, offloaded) of the model's first block."""
    from ..families import blocks_of

    blocks = blocks_of(model)
    options = type(blocks[0]).__dict__.get("_checkpoint_options") if len(blocks) else None
    return (options is not None, bool(options and options.offload))
