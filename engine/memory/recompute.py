"""Saved tensors that are cheap to recompute: keep the recipe, not the tensor.

Inside a checkpointed block's recompute (`checkpoint_block` with a narrowing `saved_dtype` or offload), autograd
saves what the block's backward needs. Some of it is a cheap elementwise function of a tensor that is saved anyway:
a normalized and modulated Linear input (a function of the residual stream the LayerNorm keeps), a RoPE'd query
(a function of the query before its RMSNorm, which the RMSNorm keeps), an activation (a function of its input,
which its own backward keeps). Model code declares such a tensor with `recomputable(out, fn, *args)` (`out` was just
computed as `fn(*args)`); while a `recompute_scope()` is active, autograd's saved-tensor hooks then store
`(fn, args)` instead of `out`, and the backward recomputes `fn(*args)` once, when the first node that saved it runs,
and drops it after the last one. Same ops on the same inputs, so the same values: gradients are bit-identical. What
it costs: the elementwise recompute in backward (no matmul). What it saves: each such tensor's memory from the
recompute to its use in backward — where a block's recompute + backward has its peak.

The block's own input can be declared the same way (`checkpoint_block` does it for its upcast copy of a narrowed
saved input: the float32 tensor is the bf16 one upcast, so the bf16 one is kept instead).

Outside a scope (inference, a plain forward, the no-grad forward of a checkpointed block) `recomputable` does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef

_state = threading.local()


class _Recipe:
    """out == fn(*args) (a tensor argument may itself be an _Arg: a recipe), evaluated in the forward's autocast
    state; the value is cached from the first unpack of a saved reference to the last."""

    def __init__(self, fn: Callable, args: tuple, autocast: list, dtype: torch.dtype):
        self.fn, self.args, self.autocast, self.dtype = fn, args, autocast, dtype
        self.pending = 0       # saved references not yet unpacked
        self.value: torch.Tensor | None = None

    def compute(self) -> torch.Tensor:
        if self.value is not None:
            return self.value
        args = [a.value() if isinstance(a, _Arg) else a for a in self.args]
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.no_grad())
            return self.fn(*args)

    def acquire(self) -> torch.Tensor:
        if self.value is None:
            self.value = self.compute()
        value = self.value
        self.pending -= 1
        if self.pending <= 0:
            self.value = None
        return value


class _View:
    """The geometry of a tensor that shares the recipe's storage."""

    def __init__(self, t: torch.Tensor):
        self.size, self.stride, self.offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()

    def of(self, base: torch.Tensor) -> torch.Tensor:
        return base.as_strided(self.size, self.stride, self.offset)


class _Packed:
    """A saved tensor stored as its recipe (counted: the cached value is dropped after the last unpack)."""

    def __init__(self, recipe: _Recipe, t: torch.Tensor):
        self.recipe, self.view = recipe, _View(t)
        recipe.pending += 1

    def unpack(self) -> torch.Tensor:
        return self.view.of(self.recipe.acquire())


class _Arg:
    """A recipe's argument that is itself declared recomputable (not counted: uses the cached value if any)."""

    def __init__(self, recipe: _Recipe, t: torch.Tensor):
        self.recipe, self.view = recipe, _View(t)

    def value(self) -> torch.Tensor:
        return self.view.of(self.recipe.compute())


class _Scope:
    def __init__(self):
        # storage key -> (weak ref to the storage, recipe, the tensor's version when declared); the weak ref keeps
        # the key from being reused by another storage and tells whether the declared one is still alive
        self.recipes: dict[int, tuple[StorageWeakRef, _Recipe, int]] = {}

    def find(self, t) -> _Recipe | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return None
        storage = t.untyped_storage()
        entry = self.recipes.get(storage._cdata)
        if entry is None or entry[0].expired() or entry[2] != t._version or entry[1].dtype != t.dtype:
            return None   # not declared, or changed in place since
        return entry[1]

    def declare(self, out: torch.Tensor, recipe: _Recipe) -> None:
        storage = out.untyped_storage()
        self.recipes[storage._cdata] = (StorageWeakRef(storage), recipe, out._version)

    def pack(self, t):
        recipe = self.find(t)
        return t if recipe is None else _Packed(recipe, t)

    @staticmethod
    def unpack(packed):
        return packed.unpack() if isinstance(packed, _Packed) else packed


def _autocast_state() -> list:
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types]


def recomputable(out: torch.Tensor, fn: Callable, *args) -> torch.Tensor:
    """Declare that `out` (just computed) equals `fn(*args)`, an elementwise-cheap function whose tensor arguments
    the backward keeps anyway. Inside `recompute_scope()` autograd then saves the recipe instead of `out`.
    Returns `out`."""
    scope = getattr(_state, "scope", None)
    if scope is None or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
        return out
    # an argument that is itself declared is referenced through its recipe (its tensor may be freed)
    packed = []
    for a in args:
        recipe = scope.find(a)
        packed.append(a if recipe is None else _Arg(recipe, a))
    scope.declare(out, _Recipe(fn, tuple(packed), _autocast_state(), out.dtype))
    return out


def declare_upcast(out: torch.Tensor, narrow: torch.Tensor) -> torch.Tensor:
    """`out` == `narrow.to(out.dtype)` (an exact upcast): keep `narrow` for whatever saves `out`."""
    return recomputable(out, _upcast, narrow, out.dtype)


def _upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype)


@contextlib.contextmanager
def recompute_scope() -> Iterator[None]:
    """Tensors declared `recomputable` inside are saved for backward as their recipes."""
    previous = getattr(_state, "scope", None)
    scope = _Scope()
    _state.scope = scope
    try:
        with torch.autograd.graph.saved_tensors_hooks(scope.pack, scope.unpack):
            yield
    finally:
        _state.scope = previous
        # the saved tensors keep the hooks (and so this scope) until they are released: the registry, which
        # references every recipe and its arguments, must not live that long
        scope.recipes.clear()


__all__ = ["recomputable", "declare_upcast", "recompute_scope"]
