"""A loaded model and how it runs: what the pack's model sockets carry (DiT, VAE, text and image encoders).

The module's weights are shared: the pack's model registry hands the same module to every loader node of a file, and
LoRA views share them too. How a model runs (block swap, attention kernel, offloading) is chosen per loader node, so
it travels beside the module in a `ModelHandle`, never on it: two loaders of one file with different settings do not
overwrite each other's. `apply_run_options` puts the per-call settings on the module just before it runs.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a loaded model runs. DiT: attention, swap, offloads, compile; VAE and encoders: `keep_on_gpu`; VAE:
    `cache_on_cpu`."""

    attention: str | None = None        # attention kernel of the DiT; None: the module's own
    blocks_to_swap: int = 0             # blocks kept in host memory and streamed in (memory.block_swap)
    offload_non_blocks: bool = False    # with block swap: embeddings and head in host memory too
    activation_offload: bool = False    # training: checkpointed block inputs in host memory
    offload_after_use: bool = False     # back to CPU memory after each use
    keep_on_gpu: bool = False           # stay on the GPU between uses even when the caller would offload
    cache_on_cpu: bool | None = None    # VAE: temporal feature caches in host memory; None: the module's own
    compile: bool | None = None         # DiT: torch.compile each block's forward; None: as the module is


@dataclasses.dataclass(frozen=True)
class ModelHandle:
    """module + family + run options. `family` is the family name of a DiT or VAE, None for shared encoders."""

    module: object                      # an nn.Module, or an encoder holding one as `.model`
    family: str | None = None
    options: RunOptions = RunOptions()

    @classmethod
    def of(cls, module, **options) -> "ModelHandle":
        return cls(module, getattr(module, "family", None), RunOptions(**options))

    def with_module(self, module) -> "ModelHandle":
        """The same settings on another module of the same weights (a LoRA view)."""
        return dataclasses.replace(self, module=module)


def as_handle(value) -> ModelHandle | None:
    """A handle for a socket value: itself, or a bare model (a module, or an encoder holding one as `.model`) with
    default options (engine callers, scripts). None for anything else."""
    if isinstance(value, ModelHandle):
        return value
    if isinstance(value, nn.Module) or isinstance(getattr(value, "model", None), nn.Module):
        return ModelHandle.of(value)
    return None


def apply_run_options(handle: ModelHandle):
    """Put the settings that the module reads while running (attention kernel, VAE cache device) on it; returns it."""
    module, opts = handle.module, handle.options
    if opts.attention and hasattr(module, "attention_backend"):
        module.attention_backend = opts.attention
    if opts.cache_on_cpu is not None and hasattr(module, "cache_device"):
        module.cache_device = "cpu" if opts.cache_on_cpu else None
    if opts.compile is not None and handle.family is not None and hasattr(type(module), "family"):   # a DiT
        from .families import blocks_of
        from .memory.compile import compile_blocks, is_compiled, uncompile_blocks

        blocks = blocks_of(module)
        if opts.compile and not is_compiled(blocks):
            compile_blocks(blocks)
        elif not opts.compile and is_compiled(blocks):
            uncompile_blocks(blocks)
    return module
