"""What a model family tells the generic engine (docs/ARCHITECTURE.md): the `Family` protocol and its two data specs.

Generic code (training, data, LoRA, memory, sampling) holds a `Family` and calls it; it never imports a family.
A family is composed of plain functions and data (no base class to inherit): each family folder's `family.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Protocol, runtime_checkable

import torch
import torch.nn as nn

NameMap = Callable[[str], "str | None"]


@dataclass(frozen=True)
class LoRASpec:
    """Which modules a LoRA adapts and how their names are spelled in other tools. Canonical names are the
    module paths of the family's model (also ComfyUI's native names)."""

    block_lists: tuple[str, ...]              # attributes holding the block ModuleLists, in run order
    default_exclude: str                      # regex (full match): Linear layers inside blocks never adapted by default
    base_model_version: str                   # ss_base_model_version (Musubi metadata)
    architecture: str                         # modelspec.architecture
    implementation: str                       # modelspec.implementation
    network_module: str                       # ss_network_module of a plain LoRA (Musubi's networks.lora_*)
    underscore_to_name: NameMap = lambda s: None   # kohya `blocks_0_self_attn_q` -> name, without a model
    diffusers_to_name: NameMap = lambda s: None    # diffusers/PEFT module name -> name (None: unknown)
    name_to_diffusers: NameMap = lambda s: None    # name -> diffusers/PEFT module name (None: none)
    diffusers_marker: str = r"(?!)"           # regex searched in a name: it is spelled the diffusers way
    # A fused Linear that diffusers splits (a fused qkv): name -> its diffusers pieces in row order, each with
    # its row count as a multiple of the layer's input width; None for a layer that is not fused.
    fused_to_diffusers: Callable[[str], tuple[tuple[str, int], ...] | None] = lambda s: None
    # the reverse: a diffusers piece -> (fused name, piece index), None for anything else
    diffusers_to_fused: Callable[[str], tuple[str, int] | None] = lambda s: None
    # Another family's LoRA modules (canonical name -> `engine.lora.weights.ModuleWeights`) -> this family's, for a
    # family whose model descends from another's (converting the parent's LoRAs on load, as Musubi does);
    # None: not a layout this family converts
    adopt: Callable[[dict], dict | None] = lambda modules: None

    @cached_property
    def block_re(self) -> re.Pattern:
        return re.compile(rf"^({'|'.join(map(re.escape, self.block_lists))})\.(\d+)\.")

    def block_of(self, name: str) -> tuple[str, int] | None:
        """`double_blocks.3.attn.q` -> ("double_blocks", 3); None outside the blocks."""
        m = self.block_re.match(name)
        return (m.group(1), int(m.group(2))) if m else None

    def owns(self, name: str) -> bool:
        """Is `name` (canonical or diffusers spelling) a module inside this family's blocks?"""
        return self.block_of(name) is not None or self.underscore_to_name(name) is not None

    def spells(self, name: str) -> bool:
        """Is `name` a module of this family's own layout? (its kohya underscore spelling resolves back to it) —
        tells apart families whose block lists share a name (`double_blocks`)."""
        return self.block_of(name) is not None and self.underscore_to_name(name.replace(".", "_")) == name

    def looks_diffusers(self, name: str) -> bool:
        return re.search(self.diffusers_marker, name) is not None


@dataclass(frozen=True)
class Fp8Spec:
    """Which Linear weights may be stored in fp8 (name prefix included, substring excluded)."""

    include: tuple[str, ...]
    exclude: tuple[str, ...] = field(default_factory=tuple)


@runtime_checkable
class Family(Protocol):
    """The interface of a model family. Attributes are data; methods are called by the generic engine."""

    name: str                    # registry key and `model.family` of its DiT
    display_name: str            # for messages
    lora: LoRASpec
    fp8: Fp8Spec
    cache_arch: str              # short name in cache file names (Musubi's architecture names)
    # optional: `cache_arches` (tuple[str, ...]): every arch its adapters write when there are several (latents of
    # two VAEs); `cache_arch` is also the one its text caches use

    # --- models -------------------------------------------------------------------------------------------------
    def block_lists(self, model: nn.Module) -> list[nn.ModuleList]:
        """The DiT's transformer block lists in run order (block swap, checkpointing, compile walk these)."""

    # --- data -----------------------------------------------------------------------------------------------------
    def cache_adapter(self, **encoders_and_options):
        """An `engine.data.CacheAdapter` that encodes clips and captions for this family."""

    def latent_cache_adapter(self, vae, task: str, clip_vision=None, **options):
        """The adapter for a latent-caching run from its user inputs: `task` (one of the caching node's task names,
        e.g. "t2v", "i2v", "fun_control") and an optional CLIP vision encoder. The family's rules of which tasks and
        inputs it takes live here; anything else is refused naming the input (MusubiInputError), before any work."""

    def cache_requirements(self, model: nn.Module, **identities):
        """`engine.data.CacheRequirements`: what `model` needs from a cache."""

    def described_cache_requirements(self, latent: dict | None, text: dict | None, text_dim: int | None = None):
        """`CacheRequirements` of a cache described by this family's adapter (`latent_description()`,
        `text_description()`); `text_dim` None = not checked."""

    def collate(self, samples: list[dict[str, torch.Tensor]]) -> dict:
        """Loaded cache samples (batch names) -> a training batch."""

    # --- training -------------------------------------------------------------------------------------------------
    def check_batch(self, model: nn.Module, batch: dict) -> None:
        """Raise MusubiInputError when the cached batch was not made for `model` (before any training)."""

    def training_forward(self, model: nn.Module, batch: dict, noisy: torch.Tensor, t: torch.Tensor,
                         target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) for the loss: `noisy` [B, C, F, H, W] latents at model timesteps `t` [B]."""

    # --- sampling -------------------------------------------------------------------------------------------------
    def sampling_request(self, prompt) -> object:
        """A validation prompt (`engine.training.ValidationPrompt`) -> this family's generate request."""

    def check_sampling(self, model: nn.Module, request) -> None:
        """Raise MusubiInputError when `model` cannot sample `request` (before any model call)."""

    def sample(self, model: nn.Module, request, progress=None) -> torch.Tensor:
        """Latents for a request (the family's pipeline)."""

    def latent_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, F, h, w] -> a cheap RGB preview [h, w, 3] in [0, 1] of sample 0, frame 0."""

    # optional: `expert_pair(high, low, boundary, mode, device, residency)` -> what `sample` takes in place of a model
    # for two timestep experts (validation samples while training both; engine.training.experts)
    # optional: `load_dit(source, dtype, device, fp8)` -> the DiT of a file or preset (the headless trainer,
    # engine/train.py, which has no loader node)


def names_in_blocks(names: Iterable[str], spec: LoRASpec) -> list[str]:
    """The default LoRA targets among `names`: inside the blocks and not excluded."""
    ex = re.compile(spec.default_exclude)
    return [n for n in names if spec.block_of(n) is not None and not ex.fullmatch(n)]
