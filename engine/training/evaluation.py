"""Held-out eval loss: the flow-matching loss on batches the run never trains on, at fixed timesteps with fixed
noise, so two evaluations differ only because the adapter changed (the one objective quality signal of a video
LoRA run; Musubi Tuner has none).

Every evaluation sees the same numbers: sample k of the held-out set gets the noise of `Generator(seed + k)` for
each σ in `sigmas`; the model and adapter run in eval mode (no dropout) without gradients. The value is the mean over
samples × sigmas of the unweighted MSE between the family's prediction and the velocity target, as the trainer's
loss at the same x_t.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..errors import invalid
from .loss import flow_matching_loss, noisy_latents, velocity_target

DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class EvalConfig:
    batches: Iterable[dict]                       # held-out cached batches, iterated in the same order every time
    every_n_steps: int = 100
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS    # fixed timesteps t = σ
    seed: int = 0
    source: str = ""                              # what the batches were read from (lets a host reuse them)

    def validate(self) -> None:
        if not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise invalid("eval_every_n_steps", self.every_n_steps, "an integer ≥ 1")
        if not self.sigmas or not all(0.0 < float(s) <= 1.0 for s in self.sigmas):
            raise invalid("eval sigmas", self.sigmas, "timesteps in (0, 1]")

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, network: torch.nn.Module | None, family, config: EvalConfig,
                  device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> float:
    """The eval loss of `model` (with `network` attached) on `config.batches`; train/eval flags are restored."""
    modules = [model] + ([network] if network is not None else [])
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    total, count, k = 0.0, 0, 0
    try:
        for batch in config.batches:
            x0 = batch["latents"].to(device, torch.float32)                    # [B, C, F, H, W]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(config.seed + k + i))
                                 for i in range(x0.shape[0])]).to(device)
            k += x0.shape[0]
            for sigma in config.sigmas:
                t = torch.full((x0.shape[0],), float(sigma), device=device)
                with autocast():
                    pred, target = family.training_forward(model, batch, noisy_latents(x0, noise, t), t * 1000.0,
                                                           velocity_target(x0, noise))
                total += float(flow_matching_loss(pred, target)) * x0.shape[0]
                count += x0.shape[0]
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)
    if count == 0:
        raise invalid("eval dataset", "no batches", "at least one cached batch held out for evaluation")
    return total / count
