"""Token-chunked training of a token-wise part of a block: its wide intermediates exist for one chunk at a time.

Some parts of a transformer block act on every token independently, e.g. a single-stream block's
`x + linear2(cat(attn, gelu(mlp))) * gate`. Under gradient checkpointing the block's memory peak is in its
recompute + backward, and there such a part holds several full-length wide tensors at once: the [L, 15360] input
of linear2, its gradient through the base weight and through the LoRA adapter, and their sum (4 × 2 GB for a 13B
DiT at 67 k tokens). `chunked(fn, tokens, extras, modules)` runs `fn` over chunks of tokens without a
graph; its backward recomputes and backpropagates one chunk at a time, writing each chunk's input gradients into
full-length buffers. What it costs: `fn` runs once more per training step (for linear2, about 2 % of the block's
FLOPs at that shape, where attention dominates). Gradients equal the unchunked ones up to summation order (the
adapters' weight gradients are sums over chunks).

`fn`'s randomness (adapter dropout) is replayed: the recompute runs the chunks in the forward's order from the
forward's RNG state. The modules `fn` calls are re-bound to the tensors they had in forward: a block swapper
re-points a block's weights to host memory after its recompute, before its backward runs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .replay import autocast_state, enter_autocast, replayed_rng, rng_state


def _capture(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(module, "_parameters"/"_buffers", name, tensor) of every tensor of the modules and their submodules.
    Saved for backward as tensors (not held by the node): gradient checkpointing then drops them with the other
    saved tensors and brings back the recompute's (a swapped block's weights must not stay on the device)."""
    found = []
    for root in modules:
        for module in root.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is not None:
                        found.append((module, kind, name, t))
    return found


@contextlib.contextmanager
def _bound(captured) -> Iterator[None]:
    """The modules hold the captured tensors inside; whatever they held before afterwards."""
    current = [(module, kind, name, getattr(module, kind)[name]) for module, kind, name, _ in captured]
    try:
        for module, kind, name, t in captured:
            getattr(module, kind)[name] = t
        yield
    finally:
        for module, kind, name, t in current:
            getattr(module, kind)[name] = t


class _Run:
    def __init__(self, fn: Callable, n_tokens: int, dim: int, chunk: int, modules: Sequence[nn.Module]):
        self.fn, self.n_tokens, self.dim, self.chunk, self.modules = fn, n_tokens, dim, chunk, modules

    def spans(self, length: int) -> list[tuple[int, int]]:
        return [(s, min(self.chunk, length - s)) for s in range(0, length, self.chunk)]


class _Chunked(torch.autograd.Function):
    """Inputs: (run, anchor, *tokens, *extras). `anchor` requires grad, so backward runs for the parameters `fn`
    uses (not inputs of this Function) even when no input requires grad."""

    @staticmethod
    def forward(ctx, run: _Run, anchor: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        tokens, extras = tensors[:run.n_tokens], tensors[run.n_tokens:]
        ctx.run = run
        ctx.rng = rng_state(tensors)
        ctx.autocast = autocast_state(tokens[0].device.type)
        captured = _capture(run.modules)
        ctx.slots = [entry[:3] for entry in captured]
        ctx.save_for_backward(*tensors, *(entry[3] for entry in captured))
        length = tokens[0].shape[run.dim]
        out = None
        for start, n in run.spans(length):
            piece = run.fn(*(t.narrow(run.dim, start, n) for t in tokens), *extras)
            if out is None:
                shape = list(piece.shape)
                shape[run.dim] = length
                out = piece.new_empty(shape)
            out.narrow(run.dim, start, n).copy_(piece)
            del piece
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        run = ctx.run
        saved = ctx.saved_tensors
        tensors, weights = saved[:len(saved) - len(ctx.slots)], saved[len(saved) - len(ctx.slots):]
        tokens, extras = tensors[:run.n_tokens], tensors[run.n_tokens:]
        needs = ctx.needs_input_grad[2:]
        grads: list[torch.Tensor | None] = [torch.empty_like(t) if need else None
                                            for t, need in zip(tokens, needs)]
        grads += [None] * len(extras)
        with contextlib.ExitStack() as stack:
            stack.enter_context(replayed_rng(*ctx.rng))
            enter_autocast(stack, ctx.autocast)
            stack.enter_context(_bound([(*slot, t) for slot, t in zip(ctx.slots, weights)]))
            for start, n in run.spans(tokens[0].shape[run.dim]):
                pieces = [t.narrow(run.dim, start, n).detach().requires_grad_(need)
                          for t, need in zip(tokens, needs)]
                whole = [t.detach().requires_grad_(need) for t, need in zip(extras, needs[run.n_tokens:])]
                with torch.enable_grad():
                    out = run.fn(*pieces, *whole)
                if out.requires_grad:
                    torch.autograd.backward(out, grad.narrow(run.dim, start, n))
                del out
                for i, piece in enumerate(pieces):
                    if grads[i] is not None:
                        g = grads[i].narrow(run.dim, start, n)
                        g.copy_(piece.grad) if piece.grad is not None else g.zero_()
                for j, t in enumerate(whole, start=run.n_tokens):
                    if t.grad is not None:
                        grads[j] = t.grad if grads[j] is None else grads[j] + t.grad
        return (None, None, *grads)


def chunked(fn: Callable[..., torch.Tensor], tokens: Sequence[torch.Tensor], extras: Sequence[torch.Tensor] = (),
            modules: Sequence[nn.Module] = (), chunk: int = 16384, dim: int = 1) -> torch.Tensor:
    """`fn(*tokens, *extras)` for a `fn` that acts on every position along `dim` independently: every `tokens`
    tensor is cut into chunks of `chunk` positions along `dim` (all have the same length there), every `extras`
    tensor (e.g. a per-sample gate) goes whole to each call. `modules`: the modules `fn` calls (their weights may
    be re-pointed between forward and backward). Only with gradients and more than one chunk is anything chunked."""
    length = tokens[0].shape[dim]
    if not torch.is_grad_enabled() or length <= chunk:
        return fn(*tokens, *extras)
    anchor = torch.empty(0, device=tokens[0].device, requires_grad=True)
    return _Chunked.apply(_Run(fn, len(tokens), dim, chunk, modules), anchor, *tokens, *extras)


__all__ = ["chunked"]
