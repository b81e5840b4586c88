"""Timestep sampling for flow-matching training (Musubi Tuner `--timestep_sampling` and friends).

Convention (docs/ENGINE_INTERFACES.md): t = σ ∈ [0, 1], t = 1 is pure noise, x_t = (1 − t)·x0 + t·ε, the DiT gets
`model_t = 1000·t`.

Every mode is written as an inverse CDF: a uniform u ∈ (0, 1) is pushed through `_mode_from_uniform`. One code path
then serves plain sampling (u from the generator) and stratified sampling (`num_timestep_buckets`: u handed out from
a shuffled pool with equal counts per sub-interval, see `BucketPool`).

Deliberate differences from Musubi Tuner (quirks not reproduced):
* `sigma` mode honours `discrete_flow_shift` (Musubi ignores it in training).
* non-`sigma` modes pass `1000·t` to the model, not `1000·t + 1`.
* `sigma` mode min/max bound the timestep values themselves ([min+1, max]), not an index into the descending table.
* `preserve_distribution_shape` falls back to the rescaled draw for samples that never landed in range
  (Musubi silently uses the last unfiltered, unscaled draw).
* loss weights use σ = t directly instead of the nearest entry of a 1000-step table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import invalid

SAMPLING_MODES = (
    "sigma", "uniform", "sigmoid", "shift", "flux_shift", "flux2_shift", "qwen_shift", "krea2_shift",
    "ideogram4_shift", "logsnr", "qinglong_flux", "qinglong_qwen",
)
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")

# Resolution-dependent shift: μ is a straight line through two (token count, μ) points; S = exp(μ).
# token count = (h/2)·(w/2) latent patches, except flux2 which uses h·w.
_MU_LINES = {
    "flux_shift": ((256, 0.5), (4096, 1.15)),
    "flux2_shift": ((256, 0.5), (4096, 1.15)),
    "qwen_shift": ((256, 0.5), (8192, 0.9)),
    "krea2_shift": ((256, 0.5), (6400, 1.15)),
}
# qinglong mixtures: (probability of the shift branch, of logsnr(mean, std), of "logsnr2" ~ N(5.36, 1)).
_QINGLONG = {"qinglong_flux": ("flux_shift", 0.79, 0.11), "qinglong_qwen": ("qwen_shift", 0.95, 0.0)}
_LOGSNR2 = (5.36, 1.0)
_U_EPS = 1e-6  # keep u off {0, 1}: the normal inverse CDF is infinite there
_PRESERVE_ROUNDS = 1000


@dataclass
class TimestepConfig:
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: int | None = None        # 0..999
    max_timestep: int | None = None        # 1..1000
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None  # None / 0 / 1 = off, ≥ 2 = stratified

    def validate(self) -> None:
        if self.timestep_sampling not in SAMPLING_MODES:
            raise invalid("timestep_sampling", self.timestep_sampling, f"one of {', '.join(SAMPLING_MODES)}")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise invalid("weighting_scheme", self.weighting_scheme, f"one of {', '.join(WEIGHTING_SCHEMES)}")
        if not self.sigmoid_scale > 0:
            raise invalid("sigmoid_scale", self.sigmoid_scale, "a number > 0")
        if not self.discrete_flow_shift > 0:
            raise invalid("discrete_flow_shift", self.discrete_flow_shift, "a number > 0")
        if not self.logit_std > 0:
            raise invalid("logit_std", self.logit_std, "a number > 0")
        lo, hi = self.bounds()
        if not 0 <= lo < 1000:
            raise invalid("min_timestep", self.min_timestep, "an integer in 0..999")
        if not 0 < hi <= 1000:
            raise invalid("max_timestep", self.max_timestep, "an integer in 1..1000")
        if lo >= hi:
            raise invalid("min_timestep/max_timestep", (lo, hi), "min_timestep < max_timestep")
        if self.num_timestep_buckets is not None and self.num_timestep_buckets < 0:
            raise invalid("num_timestep_buckets", self.num_timestep_buckets, "0 (off) or an integer ≥ 2")

    def bounds(self) -> tuple[int, int]:
        lo = 0 if self.min_timestep is None else self.min_timestep
        hi = 1000 if self.max_timestep is None else self.max_timestep
        return lo, hi

    @property
    def bucketed(self) -> bool:
        return (self.num_timestep_buckets or 0) >= 2


@dataclass
class TimestepSample:
    t: torch.Tensor          # [B] float32 in [0, 1] (σ); x_t = (1 − t)·x0 + t·ε
    model_t: torch.Tensor    # [B] float32, 1000·t: what the DiT is given
    weight: torch.Tensor | None  # [B] per-sample loss weight, None = unweighted


# --- closed-form pieces ---------------------------------------------------------------------------------------

def shift_sigma(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """σ' = S·σ / (1 + (S − 1)·σ); identity for S = 1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(mode: str, latent_hw: tuple[int, int]) -> float:
    """S = exp(μ) with μ linear in the latent token count (flux/flux2/qwen/krea2 shift modes)."""
    (x0, y0), (x1, y1) = _MU_LINES[mode]
    h, w = latent_hw
    tokens = h * w if mode == "flux2_shift" else (h / 2) * (w / 2)
    mu = y0 + (y1 - y0) / (x1 - x0) * (tokens - x0)
    return math.exp(mu)


def _normal_icdf(u: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2.0) * torch.erfinv(2 * u - 1)


def _sigma_density_u(u: torch.Tensor, cfg: TimestepConfig) -> torch.Tensor:
    """`sigma` mode: u' ∈ [0, 1] drawn from the weighting-scheme density (uniform unless logit_normal/mode)."""
    if cfg.weighting_scheme == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * _normal_icdf(u))
    if cfg.weighting_scheme == "mode":
        return 1 - u - cfg.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _mode_from_uniform(mode: str, u: torch.Tensor, cfg: TimestepConfig, latent_hw: tuple[int, int],
                       choice: torch.Tensor | None) -> torch.Tensor:
    """t ∈ [0, 1] for every non-`sigma` mode, as a function of u ∈ (0, 1) (and a second uniform `choice` for
    the qinglong mixtures)."""
    s = cfg.sigmoid_scale
    if mode == "uniform":
        return u
    if mode == "sigmoid":
        return torch.sigmoid(s * _normal_icdf(u))
    if mode == "shift":
        return shift_sigma(torch.sigmoid(s * _normal_icdf(u)), cfg.discrete_flow_shift)
    if mode in _MU_LINES:
        return shift_sigma(torch.sigmoid(s * _normal_icdf(u)), resolution_shift(mode, latent_hw))
    if mode == "ideogram4_shift":
        h, w = latent_hw
        mean = 0.5 * math.log((h * 8) * (w * 8) / 512 ** 2)
        return torch.sigmoid(mean + 1.5 * _normal_icdf(u))
    if mode == "logsnr":
        return torch.sigmoid(-(cfg.logit_mean + cfg.logit_std * _normal_icdf(u)) / 2)
    if mode in _QINGLONG:
        shift_mode, p_shift, p_logsnr = _QINGLONG[mode]
        shifted = _mode_from_uniform(shift_mode, u, cfg, latent_hw, None)
        logsnr = _mode_from_uniform("logsnr", u, cfg, latent_hw, None)
        logsnr2 = torch.sigmoid(-(_LOGSNR2[0] + _LOGSNR2[1] * _normal_icdf(u)) / 2)
        return torch.where(choice < p_shift, shifted, torch.where(choice < p_shift + p_logsnr, logsnr, logsnr2))
    raise invalid("timestep_sampling", mode, f"one of {', '.join(SAMPLING_MODES)}")


def loss_weight(cfg: TimestepConfig, t: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weight for `sigma_sqrt` (σ⁻²) and `cosmap` (2 / (π·(1 − 2σ + 2σ²))); None otherwise."""
    if cfg.weighting_scheme == "sigma_sqrt":
        return t.clamp(min=1e-3) ** -2  # σ floor = the smallest entry of a 1000-step schedule
    if cfg.weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t ** 2))
    return None


# --- sampling ---------------------------------------------------------------------------------------------------

def _uniform(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).clamp_(_U_EPS, 1 - _U_EPS)


def _draw_t(cfg: TimestepConfig, u: torch.Tensor, latent_hw, generator) -> torch.Tensor:
    mode = cfg.timestep_sampling
    choice = _uniform(u.numel(), generator) if mode in _QINGLONG else None
    return _mode_from_uniform(mode, u, cfg, latent_hw, choice)


def sample_timesteps(cfg: TimestepConfig, batch_size: int, latent_shape, generator: torch.Generator | None = None,
                     uniforms: torch.Tensor | None = None) -> TimestepSample:
    """Draw `batch_size` timesteps. `latent_shape` is the latent batch shape [..., H, W] (only H, W are used, for
    the resolution-dependent modes). `uniforms` ([B] in (0, 1)) replaces the generator's first uniform draw
    (stratified sampling); everything else still comes from `generator` (CPU generator: deterministic)."""
    latent_hw = (int(latent_shape[-2]), int(latent_shape[-1]))
    lo, hi = cfg.bounds()
    u = _uniform(batch_size, generator) if uniforms is None else uniforms.to(torch.float64)

    if cfg.timestep_sampling == "sigma":
        # Discrete schedule: integer timesteps hi, hi-1, ..., lo+1 (default 1000..1), σ = timestep / 1000.
        density_u = _sigma_density_u(u, cfg).clamp(0, 1 - 1e-9)
        timestep = hi - torch.floor(density_u * (hi - lo))
        t = shift_sigma(timestep / 1000.0, cfg.discrete_flow_shift)
    else:
        t = _draw_t(cfg, u, latent_hw, generator)
        if (lo, hi) != (0, 1000):
            if cfg.preserve_distribution_shape:
                t = _rejection_sample(cfg, t, u, lo / 1000.0, hi / 1000.0, latent_hw, generator)
            else:
                t = t * (hi - lo) / 1000.0 + lo / 1000.0
    t = t.to(torch.float32)
    return TimestepSample(t=t, model_t=t * 1000.0, weight=loss_weight(cfg, t))


def _rejection_sample(cfg, t, u, lo, hi, latent_hw, generator) -> torch.Tensor:
    """Redraw out-of-range samples (keeps the distribution's shape, truncated to [lo, hi]). Samples still outside
    after `_PRESERVE_ROUNDS` rounds get the linearly rescaled value of their first draw, which is in range."""
    fallback = t * (hi - lo) + lo
    out = t.clone()
    bad = (out < lo) | (out > hi)
    for _ in range(_PRESERVE_ROUNDS):
        if not bad.any():
            return out
        n = int(bad.sum())
        redraw = _draw_t(cfg, _uniform(n, generator), latent_hw, generator)
        out[bad] = redraw
        bad = (out < lo) | (out > hi)
    out[bad] = fallback[bad]
    return out


class BucketPool:
    """Stratified uniforms for `num_timestep_buckets`: a shuffled pool with one draw in each of N equal
    sub-intervals of (0, 1); refilled when empty. Every N consecutive draws cover every bucket exactly once.
    State (the undrawn rest of the pool) is saved with the training state so resume is exact."""

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self.pool = torch.empty(0, dtype=torch.float64)

    def take(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        parts = []
        while n > 0:
            if self.pool.numel() == 0:
                self._refill(generator)
            k = min(n, self.pool.numel())
            parts.append(self.pool[:k])
            self.pool = self.pool[k:]
            n -= k
        return torch.cat(parts)

    def _refill(self, generator) -> None:
        n = self.num_buckets
        offsets = torch.rand(n, generator=generator, dtype=torch.float64)
        values = ((torch.arange(n, dtype=torch.float64) + offsets) / n).clamp_(_U_EPS, 1 - _U_EPS)
        self.pool = values[torch.randperm(n, generator=generator)]

    def state_dict(self) -> dict:
        return {"num_buckets": self.num_buckets, "pool": self.pool.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.num_buckets = int(state["num_buckets"])
        self.pool = state["pool"].to(torch.float64).clone()


class TimestepSampler:
    """`sample_timesteps` plus the bucket pool when stratified sampling is on. Owned by the training session."""

    def __init__(self, cfg: TimestepConfig):
        cfg.validate()
        self.cfg = cfg
        # rejection sampling draws on demand, which would bypass the pool for redraws: buckets apply to first draws
        self.pool = BucketPool(cfg.num_timestep_buckets) if cfg.bucketed else None

    def sample(self, batch_size: int, latent_shape, generator: torch.Generator | None) -> TimestepSample:
        uniforms = self.pool.take(batch_size, generator) if self.pool is not None else None
        return sample_timesteps(self.cfg, batch_size, latent_shape, generator, uniforms)

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()} if self.pool is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.pool is not None and "pool" in state:
            self.pool.load_state_dict(state["pool"])
