"""Flow-matching velocity loss.

x_t = (1 − t)·x0 + t·ε, the model predicts v = ε − x0, loss = mean of (optionally weighted) per-element MSE.
"""

from __future__ import annotations

import torch


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like` ([B, C, F, H, W])."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε; x0, noise [B, C, F, H, W], t [B] in [0, 1]."""
    tb = _per_sample(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss: MSE per element in fp32, times the per-sample `weight` [B] when given, mean over everything."""
    err = (pred.float() - target.float()) ** 2
    if weight is not None:
        err = err * _per_sample(weight.float(), err)
    return err.mean()
