"""Flow-matching ODE solvers: Euler, UniPC (bh2, order 2), DPM-Solver++ 2M.

API: one stateful solver object per sampling run.

    solver = make_solver("unipc", steps=50, shift=5.0)
    for i in range(solver.steps):
        v = model(x, solver.timesteps[i])            # velocity ε − x0 at σ = solver.sigmas[i]
        x = solver.step(v, i, x)                     # sample at σ = solver.sigmas[i + 1]

Multistep solvers keep the previous x0 predictions, so `step` must be called with index 0, 1, 2, ... in order (a
skipped or repeated index raises). The math runs in float32 on the sample's device; coefficients are computed in
float64 on the host from the schedule, so the result does not depend on the device's float rounding of logs/exps.

Both multistep solvers work on x0 predictions m = x − σ·v, in half-log-SNR time λ(σ) = log((1 − σ)/σ), with
α = 1 − σ (flow matching: x = α·x0 + σ·ε).
"""

from __future__ import annotations

import math

import torch

from ..errors import invalid
from .schedule import FlowSchedule, dpmpp_schedule, euler_schedule, unipc_schedule


def _lambda(sigma: float) -> float:
    """log((1 − σ)/σ) with the limits σ=1 → −inf (pure noise) and σ=0 → +inf (clean)."""
    if sigma >= 1.0:
        return -math.inf
    if sigma <= 0.0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


class FlowSolver:
    """Base: holds the schedule and checks the step order. Subclasses implement `_step`."""

    name = "base"

    def __init__(self, schedule: FlowSchedule):
        self.schedule = schedule
        self._next_index = 0

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def sigmas(self) -> torch.Tensor:        # [N+1] float64, last is 0
        return self.schedule.sigmas

    @property
    def timesteps(self) -> torch.Tensor:     # [N] model timesteps (0..1000)
        return self.schedule.timesteps

    def sigma(self, index: int) -> float:
        return float(self.schedule.sigmas[index])

    def denoised(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """x0 estimate x − σ·v (used for previews)."""
        return sample.float() - self.sigma(index) * velocity.float()

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """velocity, sample [B, C, ...] at sigmas[index] -> float32 sample at sigmas[index + 1]."""
        if index != self._next_index or index >= self.steps:
            raise RuntimeError(f"{self.name} solver: step {index} called, expected step {self._next_index} "
                               f"of {self.steps} (multistep solvers run each step once, in order)")
        self._next_index += 1
        return self._step(velocity.float(), index, sample.float())

    def _step(self, v: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EulerSolver(FlowSolver):
    """x ← x + v·(σ_next − σ) (Musubi "vanilla")."""

    name = "euler"

    def _step(self, v, i, x):
        return x + v * (self.sigma(i + 1) - self.sigma(i))


class DPMPP2MSolver(FlowSolver):
    """DPM-Solver++ (data prediction), multistep order 2, midpoint variant; first and last step are order 1
    (warm-up, and the final σ = 0 step, where a second-order term would be ill-conditioned)."""

    name = "dpm++"

    def __init__(self, schedule: FlowSchedule):
        super().__init__(schedule)
        self._prev_m: torch.Tensor | None = None

    def _step(self, v, i, x):
        s, t = self.sigma(i), self.sigma(i + 1)
        m = x - s * v                                  # x0 prediction at σ_s
        h = _lambda(t) - _lambda(s)
        phi = math.expm1(-h)                           # e^{−h} − 1 (−1 when t = 0)
        alpha_t = 1.0 - t
        out = (t / s) * x - alpha_t * phi * m
        second_order = self._prev_m is not None and i < self.steps - 1
        if second_order:
            h_prev = _lambda(s) - _lambda(self.sigma(i - 1))
            # D1 = (m − m_prev)/r with r = h_prev/h; h_prev is +inf after a σ = 1 start, which makes D1 vanish
            inv_r = h / h_prev
            out = out - 0.5 * alpha_t * phi * inv_r * (m - self._prev_m)
        self._prev_m = m
        return out


class UniPCSolver(FlowSolver):
    """UniPC multistep (Zhao et al. 2023) as used by the official releases: x0 prediction, B(h) = e^{h}−1 ("bh2"),
    predictor order ≤ 2 (1 on the first and the last step), UniC corrector after every model call but the first.

    Step i: the corrector refines the sample handed to the model at σ_i using the new x0 prediction m_i (it costs no
    extra model call), then the predictor extrapolates to σ_{i+1} from m_i (and m_{i−1}).
    """

    name = "unipc"
    max_order = 2

    def __init__(self, schedule: FlowSchedule):
        super().__init__(schedule)
        self._ms: list[torch.Tensor] = []        # last x0 predictions, newest last (≤ 2)
        # written by step 0 before the corrector first reads them (steps >= 1): their initial values never matter
        self._last_sample: torch.Tensor | None = None  # pragma: no mutate
        self._last_order = 0  # pragma: no mutate

    @staticmethod
    def _coeffs(s: float, t: float) -> tuple[float, float, float]:
        """(h, σ_t/σ_s, α_t·(e^{−h}−1)) for a move from σ_s to σ_t."""
        h = _lambda(t) - _lambda(s)
        return h, t / s, (1.0 - t) * math.expm1(-h)

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        s, t = self.sigma(i), self.sigma(i + 1)
        h, ratio, a_phi = self._coeffs(s, t)
        m0 = self._ms[-1]
        out = ratio * x - a_phi * m0
        if order == 2:
            r = (_lambda(self.sigma(i - 1)) - _lambda(s)) / h
            d1 = (self._ms[-2] - m0) / r
            # bh2: B(h) equals h·φ1 (both e^{−h}−1), and the order-2 predictor weight ρ is 1/2
            out = out - a_phi * 0.5 * d1
        return out

    def _correct(self, m_t: torch.Tensor, i: int) -> torch.Tensor:
        """Refine the sample at σ_i (the previous predictor's output, kept as _last_sample) with the fresh
        prediction m_t."""
        s, t = self.sigma(i - 1), self.sigma(i)
        h, ratio, a_phi = self._coeffs(s, t)
        m0 = self._ms[-1]
        x = self._last_sample
        base = ratio * x - a_phi * m0
        if self._last_order == 1:
            return base - a_phi * 0.5 * (m_t - m0)
        # order 2: solve R·ρ = b with R = [[1, 1], [r, 1]] (columns: the older point, the new point)
        hh = -h
        phi1 = math.expm1(hh)
        b1 = (phi1 / hh - 1.0) / phi1
        b2 = ((phi1 / hh - 1.0) / hh - 0.5) * 2.0 / phi1
        r = (_lambda(self.sigma(i - 2)) - _lambda(s)) / h
        rho_old = (b1 - b2) / (1.0 - r)
        rho_new = b1 - rho_old
        d1 = (self._ms[-2] - m0) / r
        return base - a_phi * (rho_old * d1 + rho_new * (m_t - m0))

    def _step(self, v, i, x):
        m = x - self.sigma(i) * v
        if i > 0:
            x = self._correct(m, i)
        self._ms = (self._ms + [m])[-self.max_order:]
        # warm-up (order grows with the history) and lower order on the final step(s)
        order = min(self.max_order, i + 1, self.steps - i)
        self._last_sample, self._last_order = x, order
        return self._predict(x, i, order)


SOLVERS = {"unipc": (UniPCSolver, unipc_schedule), "dpm++": (DPMPP2MSolver, dpmpp_schedule),
           "euler": (EulerSolver, euler_schedule)}
ALIASES = {"vanilla": "euler", "dpmpp": "dpm++", "dpm++2m": "dpm++"}


def make_solver(name: str, steps: int, shift: float, run_steps: int | None = None) -> FlowSolver:
    """A fresh solver for one run. name: "unipc" (the official default), "dpm++", "euler" (alias "vanilla").
    `run_steps`: run only the last `run_steps` of the `steps`-step schedule (start part-way, e.g. video-to-video
    strength); None runs them all."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in SOLVERS:
        raise invalid("solver", name, f"one of {sorted(SOLVERS)} (or 'vanilla' for euler)")
    cls, schedule_fn = SOLVERS[key]
    schedule = schedule_fn(steps, shift)
    return cls(schedule if run_steps is None else schedule.tail(run_steps))
