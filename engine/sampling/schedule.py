"""Flow-matching sigma schedules (Musubi Tuner and the official model releases).

Convention (docs/ENGINE_INTERFACES.md): x_σ = (1 − σ)·x0 + σ·ε, the model predicts v = ε − x0 at timestep 1000·σ.
A schedule is N+1 descending sigmas (the last one is 0: the clean sample) plus the N timesteps fed to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import invalid

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = S·σ / (1 + (S − 1)·σ): S > 1 spends more steps at high noise. Keeps 0 → 0 and 1 → 1."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    sigmas: torch.Tensor      # [N+1] float64, descending, sigmas[N] == 0
    timesteps: torch.Tensor   # [N] what the model sees (0..1000 scale); int64 for unipc/dpm++, float for euler

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def tail(self, steps: int) -> "FlowSchedule":
        """The last `steps` steps: a run that starts part-way down, at sigmas[N − steps] (video-to-video)."""
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.steps:
            raise invalid("steps to run", steps, f"an integer between 1 and {self.steps}")
        return FlowSchedule(self.sigmas[self.steps - steps:], self.timesteps[self.steps - steps:])


def _check(steps: int, shift: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise invalid("steps", steps, "an integer >= 1")
    if not (shift > 0):
        raise invalid("shift", shift, "a number > 0 (flow shift, e.g. 5.0)")


def unipc_schedule(steps: int, shift: float) -> FlowSchedule:
    """The official FlowUniPC schedule: σ = linspace(0.999, 0, N+1)[:N] shifted, final σ 0, timesteps int64(σ·1000).

    0.999 (not 1) keeps log(1 − σ) finite in the UniPC coefficient math on the first step. The official scheduler
    reads its σ_max back from a float32 tensor, so it is float32(0.999) = 0.99900001287...; using the same value
    keeps the int64 truncation of the timesteps identical (e.g. 666 rather than 665 for N=3, shift 1).
    """
    _check(steps, shift)
    sigma_max = float(torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32))
    base = torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64)[:steps]
    sig = shift_sigmas(base, shift)
    timesteps = (sig * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return FlowSchedule(torch.cat([sig, sig.new_zeros(1)]), timesteps)


def dpmpp_schedule(steps: int, shift: float) -> FlowSchedule:
    """The official FlowDPM-Solver++ schedule: σ = shifted linspace(1, 0, N+1)[:N], final σ 0, timesteps int64(σ·1000)."""
    _check(steps, shift)
    sig = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:steps], shift)
    timesteps = (sig * NUM_TRAIN_TIMESTEPS).to(torch.int64)
    return FlowSchedule(torch.cat([sig, sig.new_zeros(1)]), timesteps)


def euler_schedule(steps: int, shift: float) -> FlowSchedule:
    """Musubi "vanilla": σ = shifted linspace(1, 0, N+1) (already ends at 0), float timesteps σ·1000."""
    _check(steps, shift)
    sig = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    return FlowSchedule(sig, (sig[:steps] * NUM_TRAIN_TIMESTEPS).to(torch.float32))
