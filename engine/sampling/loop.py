"""The generic denoising loop shared by every family: solver + guided velocity + progress/cancel.

`progress(step, total, x0)` is called after each step with step = 1..total and the current x0 estimate
[B, 16, F, H, W] (float32, on the sample device) for live previews. It may raise to cancel (ComfyUI's interrupt
derives from BaseException on newer versions): nothing here catches exceptions, so cancellation propagates as is.
"""

from __future__ import annotations

from typing import Callable

import torch

from .solvers import FlowSolver

Progress = Callable[[int, int, "torch.Tensor | None"], None]
# velocity_fn(x [B, ...], t [B], step) -> velocity [B, ...]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def run_sampler(solver: FlowSolver, x: torch.Tensor, velocity_fn: VelocityFn,
                progress: Progress | None = None) -> torch.Tensor:
    """Integrate from σ = sigmas[0] to 0. x: float32 noise (or partially noised latents) -> float32 latents."""
    x = x.float()
    batch = x.shape[0]
    for i in range(solver.steps):
        t = solver.timesteps[i].to(x.device).reshape(1).expand(batch)      # [B]
        v = velocity_fn(x, t, i)
        x_next = solver.step(v, i, x)
        if progress is not None:
            progress(i + 1, solver.steps, solver.denoised(v, i, x))
        x = x_next
    return x
