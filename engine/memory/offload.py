"""Activation offload: keep what autograd saves for backward in host memory instead of on the GPU.

Two tools:

* `checkpoint_block(block, x, *rest, offload=True)`: gradient checkpointing of one block whose *input* (the only
  activation checkpointing keeps: the residual stream x, [B, L, D]) is stored on the host. This is Musubi's
  `--gradient_checkpointing_cpu_offload`; for a 14B DiT at 832×480×81 it moves 40 × 0.67 GB (fp32) off the GPU.
  x crosses the bus twice per block and step: device->host once in forward (on a side stream, overlapping the
  block's compute; the forward itself runs on the caller's x) and host->device once for the recompute in backward.
  Gradients never leave the device. Only x is copied: the other arguments (time embedding, text context, RoPE
  tables) are shared by all blocks, so keeping references to them costs nothing.
* `offload_saved_tensors()`: a saved-tensor-hooks context (like `torch.autograd.graph.save_on_cpu`) for code that
  is not checkpointed: every tensor autograd saves is copied to the host and brought back in backward.

Both give exactly the gradients of the plain computation (copies are exact, the recompute replays the RNG and
autocast state of the forward), unless `checkpoint_block(saved_dtype=...)` narrows the kept x (e.g. to bf16, half
the memory and traffic of a float32 x; then gradients are those at the rounded input, see docs/memory.md). Host copies are pinned when x is on CUDA so the copies are asynchronous.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from .recompute import declare_upcast, recompute_scope
from .replay import autocast_state, enter_autocast, replayed_rng, rng_state


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


# --- checkpoint_block(offload=True) ---------------------------------------------------------------------------------

_state = threading.local()
_side_streams: dict[torch.device, Any] = {}


def in_offloaded_forward() -> bool:
    """True while `checkpoint_block(offload=True or a narrowing saved_dtype)` runs a block's forward. That forward runs with grad mode off (it
    keeps no graph) but belongs to a training pass whose backward will call the block again; block swap reads this
    to schedule the recompute."""
    return getattr(_state, "depth", 0) > 0


def _side_stream(device: torch.device):
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


class _TensorSlot:
    """Where a tensor sat among the flattened arguments."""


@dataclass
class _Call:
    """The non-differentiable part of one checkpointed call: the block, the argument structure, where x goes."""
    block: nn.Module
    spec: TreeSpec         # structure of (args, kwargs) (tuples, lists, dicts, namedtuples)
    values: list           # its flattened values, a _TensorSlot where a tensor sits (tensors are Function inputs)
    host: torch.device | None   # where the saved x is kept: None = x's own device (no offload)
    stats: OffloadStats | None
    saved_dtype: torch.dtype | None = None   # dtype of the saved x (None: x's); upcast again for the recompute
    prefetch: bool = False   # offload: in backward, start bringing back the input of the block whose backward is next
    recompute_cheap: bool = True   # the recompute saves declared cheap tensors as recipes (engine.memory.recompute)

    def run(self, x: torch.Tensor, leaves) -> Any:
        tensors = iter(leaves)
        values = [next(tensors) if isinstance(v, _TensorSlot) else v for v in self.values]
        args, kwargs = tree_unflatten(values, self.spec)
        return self.block(x, *args, **kwargs)   # as a module: forward hooks (block swap) fire


class _Saved:
    """The kept copy of one block's input, and (with prefetch) its copy back to the device started early."""

    def __init__(self, host_x: torch.Tensor, device: torch.device, dtype: torch.dtype, pinned: bool, event):
        self.host_x, self.device, self.dtype, self.pinned, self.event = host_x, device, dtype, pinned, event
        self.ready: torch.Tensor | None = None   # prefetched device copy
        self.ready_event = None

    def prefetch(self) -> None:
        """Start the host->device copy now: on CUDA on a side stream (overlapping the running block's backward),
        elsewhere (CPU tests, the memory simulation) synchronously, so the extra live input shows in the peak."""
        if self.host_x is None or self.ready is not None:
            return
        if self.device.type == "cuda":
            side = _side_stream(self.device)
            if self.event is not None:
                side.wait_event(self.event)
            with torch.cuda.stream(side):
                self.ready = self.host_x.to(self.device, non_blocking=self.pinned)
                self.ready_event = torch.cuda.Event()
                self.ready_event.record(side)
        else:
            self.ready = self.host_x.to(self.device)
        self.host_x = None

    def restore(self) -> torch.Tensor:
        if self.ready is not None:
            x, self.ready = self.ready, None
            if self.ready_event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self.ready_event)
                x.record_stream(stream)   # allocated on the side stream, used (and freed) on this one
        else:
            if self.event is not None:
                torch.cuda.current_stream(self.device).wait_event(self.event)
            x = self.host_x.to(self.device, non_blocking=self.pinned)
        self.host_x = None   # the host copy is not needed any more
        return x   # in the saved dtype, on the device


class _OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant-style checkpoint: forward runs the block without a graph and keeps only a host copy of x (not x);
    backward copies x back, recomputes the block with grad and backpropagates through it. Gradients of parameters
    used by the block (LoRA adapters hooked on its Linears) accumulate in that inner backward.

    Inputs: (call, anchor, x, *leaves). `anchor` is an empty tensor that requires grad, so the output requires grad
    (and backward runs) even when no input does: the block's parameters are not inputs of this Function."""

    @staticmethod
    def forward(ctx, call: _Call, anchor: torch.Tensor, x: torch.Tensor, *leaves: torch.Tensor):
        ctx.call, ctx.device = call, x.device
        ctx.autocast = autocast_state(x.device.type)
        ctx.rng = rng_state((x, *leaves))
        ctx.dtype = x.dtype
        saved_dtype = call.saved_dtype or x.dtype
        ctx.pinned, ctx.event = False, None
        if call.host is None:   # kept on the device: x itself, or narrowed by an ordinary op on the current stream
            host_x = x.detach() if saved_dtype == x.dtype else x.detach().to(saved_dtype)
        else:
            # host copy of x first: on CUDA it runs on a side stream while the block computes
            ctx.pinned = call.host.type == "cpu" and x.is_cuda
            host_x = torch.empty(x.shape, dtype=saved_dtype, device=call.host, pin_memory=ctx.pinned)
            if x.is_cuda:
                side = _side_stream(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    # narrowed on the device first: half the bus traffic when saved_dtype is 16-bit
                    host_x.copy_(x if saved_dtype == x.dtype else x.to(saved_dtype), non_blocking=ctx.pinned)
                    ctx.event = torch.cuda.Event()
                    ctx.event.record(side)
                x.record_stream(side)   # x's memory is not reused before the copy has read it
            else:   # narrowed before the copy here too (what crosses the bus is the narrow tensor)
                host_x.copy_(x if saved_dtype == x.dtype else x.to(saved_dtype))
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            out = call.run(x, leaves)   # grad mode is off inside Function.forward: no graph, nothing saved
        finally:
            _state.depth -= 1
        ctx.saved = _Saved(host_x, x.device, x.dtype, ctx.pinned, ctx.event)
        # prefetch: the block run before this one has its backward right after this one's
        ctx.previous = None
        if call.prefetch and call.host is not None:
            last = getattr(_state, "last_saved", None)
            ctx.previous = last() if last is not None else None
            _state.last_saved = weakref.ref(ctx.saved)
        ctx.save_for_backward(*leaves)
        if call.stats is not None:
            call.stats.tensors_offloaded += 1
            call.stats.bytes_offloaded += host_x.numel() * host_x.element_size()
        return out

    @staticmethod
    def backward(ctx, *grads):
        call = ctx.call
        need_x, need_leaves = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        kept = ctx.saved.restore().detach()
        grad_box = None
        if kept.dtype == ctx.dtype:
            x = kept.requires_grad_(need_x)
        elif need_x and call.recompute_cheap:
            # the recompute's x is the kept copy upcast; as a non-leaf (its gradient is caught by _Upcast) it can be
            # freed after the recompute: what the block saves of it is the kept narrow copy (declare_upcast)
            grad_box = []
            with torch.enable_grad():
                x = _Upcast.apply(kept, ctx.dtype, grad_box, torch.empty(0, device=kept.device, requires_grad=True))
        else:
            x = kept.to(ctx.dtype).requires_grad_(need_x)
        if ctx.previous is not None:   # next block's input comes back while this block recomputes + backpropagates
            ctx.previous.prefetch()
            ctx.previous = None
        if call.stats is not None:
            call.stats.tensors_restored += 1
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, need_leaves)]
        with contextlib.ExitStack() as stack:
            stack.enter_context(replayed_rng(*ctx.rng))
            enter_autocast(stack, ctx.autocast)
            if call.recompute_cheap:
                stack.enter_context(recompute_scope())
            with torch.enable_grad():
                if kept is not x and (grad_box is not None or not need_x):
                    declare_upcast(x, kept)   # (a leaf x stays alive anyway: its gradient is read from it)
                out = call.run(x, leaves)
        x_leaf = x if grad_box is None else None
        del x, kept
        outs = out if isinstance(out, tuple) else (out,)
        # Seed the recomputed graph through empty stand-ins, so the recomputed outputs themselves (e.g. a float32
        # [B, L, D], 0.67 GB at 14B/832x480x81) are freed before the block's backward runs instead of living on
        # through it as roots of torch.autograd.backward.
        with torch.enable_grad():
            seeds = [_Seed.apply(o, g) for o, g in zip(outs, grads)
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
        del out, outs
        if seeds:
            torch.autograd.backward(seeds, [torch.empty(0, device=s.device) for s in seeds])
        grad_x = None
        if need_x:
            grad_x = x_leaf.grad if grad_box is None else (grad_box[0] if grad_box else None)
        return (None, None, grad_x, *(t.grad if need else None for t, need in zip(leaves, need_leaves)))


class _Upcast(torch.autograd.Function):
    """x.to(dtype), whose gradient (the block input's) goes to `box` instead of flowing further: the recompute's
    graph ends here. `anchor` (an empty tensor that requires grad) makes autograd call this backward."""

    @staticmethod
    def forward(ctx, x, dtype, box, anchor):
        ctx.box = box
        return x.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        # contiguous, as AccumulateGrad would make a leaf's .grad: the layout of the gradient decides which matmul
        # kernels the previous block's backward runs (and so its last-bit rounding)
        ctx.box.append(grad.contiguous())
        return None, None, None, None


class _Seed(torch.autograd.Function):
    """An empty tensor standing for `out` in backward: its gradient is `grad` (kept by the node, not `out`)."""

    @staticmethod
    def forward(ctx, out, grad):
        ctx.grad = grad
        return out.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        grad, ctx.grad = ctx.grad, None
        return grad, None


def checkpoint_block(block: nn.Module, x: torch.Tensor, *args, offload: bool = False,
                     host: torch.device | str = "cpu", stats: OffloadStats | None = None,
                     saved_dtype: torch.dtype | None = None, prefetch: bool = False, recompute_cheap: bool = True,
                     **kwargs) -> torch.Tensor:
    """Gradient checkpointing of `block(x, *args, **kwargs)`, called as a module so block-swap hooks fire in forward
    and in the recompute.

    Without `offload`, a narrowing `saved_dtype` and `recompute_cheap`: `torch.utils.checkpoint` (non-reentrant);
    otherwise this module's reentrant-style Function (the same gradients). With `offload`: the block runs on
    the caller's x without keeping a graph, x is copied to `host` (pinned, asynchronously on CUDA) and only that copy
    is kept; in backward it is copied back once, the block recomputed (same RNG and autocast state) and
    backpropagated. With a `saved_dtype` other than x's (e.g. bf16 for a float32 residual stream under autocast) the
    kept copy, on the device or on the host, is x cast to it: the forward still runs on the exact x, the recompute
    on the rounded one (upcast to x's dtype), so gradients are those at the rounded input — half the memory (and
    offload traffic) for a float32 x. Tensors anywhere in the arguments (also inside tuples/lists/dicts, e.g. RoPE
    tables) get their gradients; the block may return a tensor or a tuple of tensors.

    `prefetch` (with `offload`): in backward, each block starts copying back the input of the block whose backward
    comes next before running its own recompute, so that copy overlaps compute instead of stalling the next
    block; costs one more saved input on the device.

    `recompute_cheap` (with `offload` or a narrowing `saved_dtype`): in the recompute, tensors the block declares
    cheap (`engine.memory.recompute.recomputable`) are kept as recipes and recomputed in backward, and the narrowed
    input is kept instead of its upcast copy: the same values, less memory during the block's backward."""
    narrowed = saved_dtype is not None and saved_dtype != x.dtype and x.is_floating_point()
    if not offload and not narrowed and not recompute_cheap:
        return checkpoint(block, x, *args, use_reentrant=False, **kwargs)
    if not torch.is_grad_enabled():   # nothing to save for a backward
        return block(x, *args, **kwargs)
    values, spec = tree_flatten((args, kwargs))
    leaves = [v for v in values if isinstance(v, torch.Tensor)]
    values = [_TensorSlot() if isinstance(v, torch.Tensor) else v for v in values]
    call = _Call(block, spec, values, torch.device(host) if offload else None, stats,
                 saved_dtype if narrowed else None, bool(prefetch and offload), bool(recompute_cheap))
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(call, anchor, x, *leaves)


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
