"""Sampling prompts during training with the same in-memory model and attached adapter.

The model and the adapter network switch to eval + no_grad for the duration and back to their previous mode
afterwards; the global torch RNG is restored so sampling never changes the training's random stream.
Generation goes through the model's family (`Family.sampling_request` + `Family.sample`), or a `sample_fn` with the
signature of `Family.sample`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import invalid
from ..families import family_of


@dataclass
class ValidationPrompt:
    context: torch.Tensor                          # [L, text_dim] prompt embeddings
    negative_context: torch.Tensor | None = None   # [L', text_dim]; None -> one zero token (an "empty" negative)
    width: int = 256                               # Musubi sample defaults: 256×256, 1 frame, 20 steps
    height: int = 256
    frames: int = 1
    seed: int = 0
    steps: int = 20
    guidance_scale: float | None = None            # real CFG; None: the family's default
    shift: float | None = None                     # None: the pipeline's task default
    task: str | None = None                        # None: "t2i" for 1 frame, else "t2v"
    clip_fea: torch.Tensor | None = None
    conditioning: object | None = None            # the family's image/control conditioning (its pipeline's type)
    pooled: torch.Tensor | None = None             # [D] pooled text vector of families that take one (CLIP-L)
    negative_pooled: torch.Tensor | None = None    # [D] the negative prompt's pooled vector
    embedded_guidance: float | None = None         # guidance-distilled models: the embedded scale; None: default


@dataclass
class ValidationConfig:
    prompts: list[ValidationPrompt] = field(default_factory=list)
    every_n_steps: int | None = None
    at_first: bool = False                         # sample before the first step
    vae: object | None = None                      # the family's VAE: decode to frames; None -> return latents
    sample_fn: Callable | None = None              # (model, request, progress) -> latents; default: Family.sample

    def validate(self) -> None:
        if self.every_n_steps is not None and (not isinstance(self.every_n_steps, int) or self.every_n_steps < 1):
            raise invalid("sample_every_n_steps", self.every_n_steps, "an integer ≥ 1 or empty")
        for i, p in enumerate(self.prompts):
            if not isinstance(p.context, torch.Tensor) or p.context.ndim != 2:
                raise invalid(f"validation prompt {i} context", getattr(p.context, "shape", p.context),
                              "a [tokens, text_dim] tensor")

    def due(self, step: int) -> bool:
        return bool(self.prompts) and self.every_n_steps is not None and step % self.every_n_steps == 0


def build_request(model, p: ValidationPrompt):
    return family_of(model).sampling_request(p)


@contextlib.contextmanager
def sampling_mode(*modules: torch.nn.Module):
    """eval + no_grad + saved/restored global torch RNG; each module's train/eval flag is restored after."""
    flags = [m.training for m in modules]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def run_validation(model: torch.nn.Module, prompts: list[ValidationPrompt], network: torch.nn.Module | None = None,
                   vae=None, sample_fn: Callable | None = None, progress=None, sampled=None,
                   modules: list[torch.nn.Module] = ()) -> list[torch.Tensor]:
    """One output per prompt: frames [B, 3, F, H, W] in [-1, 1] when `vae` is given, else latents
    [B, C, F_lat, h, w]. `progress(step, total, x0)` is passed to the sampler (it may raise to cancel).
    `sampled`: what the sampler gets in place of `model` (a family's expert pair), `modules`: further models it runs."""
    if sample_fn is None:
        sample_fn = family_of(model).sample
    outputs = []
    modules = [model, *[m for m in modules if m is not model]] + ([network] if network is not None else [])
    with sampling_mode(*modules):
        for p in prompts:
            latents = sample_fn(model if sampled is None else sampled, build_request(model, p), progress)
            outputs.append(vae.decode(latents).float().cpu() if vae is not None else latents.float().cpu())
    return outputs
