"""Optional `torch.compile` of each block's forward (Musubi `--compile`), compatible with block swap.

Only `block.forward` is compiled: module hooks (block swap, adapters) run in `Module.__call__` around it, eagerly.
Compilation is lazy (it happens on the first call), so failures show up there: a Dynamo/Inductor error or a missing
triton switches that block back to eager once, with a warning, instead of failing the run. Errors raised by the
model itself (bad shapes, out of memory) are not swallowed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import invalid

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig:
    backend: object = "inductor"      # a backend name or callable
    mode: str | None = None
    dynamic: bool | None = None
    fullgraph: bool = False


@dataclass
class CompileReport:
    compiled: list[int] = field(default_factory=list)
    fell_back: dict[int, str] = field(default_factory=dict)   # block index -> reason


def _is_compiler_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    if mod.startswith(("torch._dynamo", "torch._inductor")):
        return True
    return isinstance(e, (ImportError, RuntimeError)) and "triton" in str(e).lower()


class _CompiledForward:
    """Callable stored as `block.forward`: the compiled forward, or the eager one after a compiler failure."""

    def __init__(self, index: int, eager, compiled, report: CompileReport):
        self.index, self.eager, self.compiled, self.report = index, eager, compiled, report

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - filtered just below
                if not _is_compiler_error(e):
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"torch.compile failed for block {self.index}, running it eagerly ({reason})")
                self.report.fell_back[self.index] = reason
                if self.index in self.report.compiled:
                    self.report.compiled.remove(self.index)
                self.compiled = None
        return self.eager(*args, **kwargs)


def compile_blocks(blocks: nn.ModuleList, config: CompileConfig | None = None) -> CompileReport:
    """Compile every block's forward separately. Returns a report that is updated as blocks fall back."""
    config = config or CompileConfig()
    if config.mode not in COMPILE_MODES:
        raise invalid("compile mode", config.mode, f"one of {COMPILE_MODES}")
    report = CompileReport()
    for i, block in enumerate(blocks):
        if isinstance(block.__dict__.get("forward"), _CompiledForward):
            eager = block.__dict__["forward"].eager
        else:
            eager = block.forward
        try:
            compiled = torch.compile(eager, backend=config.backend, mode=config.mode, dynamic=config.dynamic,
                                     fullgraph=config.fullgraph)
            report.compiled.append(i)
        except Exception as e:  # noqa: BLE001 - torch.compile itself failing (unknown backend, no triton)
            compiled = None
            report.fell_back[i] = f"{type(e).__name__}: {e}"
        block.forward = _CompiledForward(i, eager, compiled, report)
    return report


def is_compiled(blocks: nn.ModuleList) -> bool:
    return any(isinstance(b.__dict__.get("forward"), _CompiledForward) for b in blocks)


def uncompile_blocks(blocks: nn.ModuleList) -> None:
    for block in blocks:
        if isinstance(block.__dict__.get("forward"), _CompiledForward):
            del block.forward
