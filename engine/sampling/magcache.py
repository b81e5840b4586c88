"""MagCache: skip the transformer blocks on steps where their residual is predictable, reusing the last one.

(Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache"; as Musubi Tuner runs it.)
The blocks of a DiT map the embedded tokens x to x + r. Across sampling steps the magnitude ratio
|r_t| / |r_{t-1}| follows a curve that depends on the model and the schedule, not on the prompt; a calibration run
records it once (a family ships its model's table). At sampling time, step t may reuse the previous residual (output x + r_cached, no block runs) while
the accumulated error of doing so stays small:

    ratio ← ratio · mag_ratio[t];  error += |1 − ratio|;  skips += 1
    skip if error ≤ threshold and skips ≤ max_skips, else run the blocks and reset (ratio 1, error 0, skips 0)

The first `retention_ratio` of the steps (at least one) and the last step always run. A ratio table of another
length is resampled to the step count by nearest index (Musubi's rule). One `MagCache` follows one sampling run:
`run` is called once per step (a CFG pair batched into one forward counts as one step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import invalid



@dataclass
class MagCacheConfig:
    mag_ratios: Sequence[float] | None = None   # the calibration, any length (resampled to the steps); None only
                                                # with `calibrate`
    retention_ratio: float = 0.2                # this fraction of the first steps always runs
    threshold: float = 0.24                     # accumulated error allowed while skipping
    max_skips: int = 6                          # consecutive skips at most (MagCache's K)
    calibrate: bool = False                     # run every step and record the ratios instead of skipping
    on_done: Callable[["MagCache"], None] | None = field(default=None, compare=False)  # after the last step

    def validate(self) -> None:
        if self.mag_ratios is None and not self.calibrate:
            raise invalid("magcache mag_ratios", None, "a calibration (the model's table or a calibration run's)")
        if self.mag_ratios is not None:
            ratios = list(self.mag_ratios)
            if not ratios or not all(isinstance(r, (int, float)) and r > 0 for r in ratios):
                raise invalid("magcache mag_ratios", self.mag_ratios, "a list of positive numbers (a calibration)")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise invalid("magcache retention_ratio", self.retention_ratio, "a fraction from 0 to 1")
        if not self.threshold >= 0.0:
            raise invalid("magcache threshold", self.threshold, "a number ≥ 0 (0.24 is the default)")
        if isinstance(self.max_skips, bool) or not isinstance(self.max_skips, int) or self.max_skips < 1:
            raise invalid("magcache max_skips", self.max_skips, "an integer ≥ 1 (6 is the default)")


def resample_ratios(ratios: Sequence[float], steps: int) -> list[float]:
    """The table at `steps` entries by nearest index: entry i takes round(i·(n−1)/(steps−1)); one step takes the last."""
    n = len(ratios)
    if steps == 1:
        return [float(ratios[-1])]
    scale = (n - 1) / (steps - 1)
    return [float(ratios[round(i * scale)]) for i in range(steps)]


@dataclass
class Calibration:
    """Per step from the second on: mean and std over tokens of |r_t| / |r_{t−1}|, and mean cosine distance."""
    norm_ratio: list[float] = field(default_factory=list)
    norm_std: list[float] = field(default_factory=list)
    cosine_distance: list[float] = field(default_factory=list)

    def mag_ratios(self) -> list[float]:
        """The table to sample with (step 0 gets 1.0)."""
        return [1.0] + list(self.norm_ratio)


class MagCache:
    def __init__(self, config: MagCacheConfig, steps: int):
        config.validate()
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise invalid("magcache steps", steps, "the number of sampling steps (≥ 1)")
        self.config, self.steps = config, steps
        table = config.mag_ratios if config.mag_ratios is not None else [1.0] * steps
        self.ratios = list(table) if len(table) == steps else resample_ratios(table, steps)
        self.first_skippable = max(int(config.retention_ratio * steps), 1)
        self.step = 0
        self.residual: torch.Tensor | None = None
        self.skipped: list[int] = []
        self.calibration = Calibration()
        self._ratio, self._error, self._skips = 1.0, 0.0, 0

    def _may_skip(self) -> bool:
        if self.config.calibrate or self.residual is None:
            return False
        if not self.first_skippable <= self.step < self.steps - 1:
            return False
        self._ratio *= self.ratios[self.step]
        self._error += abs(1.0 - self._ratio)
        self._skips += 1
        if self._error <= self.config.threshold and self._skips <= self.config.max_skips:
            return True
        self._ratio, self._error, self._skips = 1.0, 0.0, 0
        return False

    def run(self, x: torch.Tensor, blocks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """blocks(x) for this step, or x + the cached residual when the step is skipped."""
        if self.step >= self.steps:
            raise invalid("magcache step", self.step + 1, f"at most the {self.steps} steps it was set up for")
        if self._may_skip():
            out = x + self.residual
            self.skipped.append(self.step)
        else:
            out = blocks(x)
            residual = out - x
            if self.config.calibrate and self.residual is not None:
                self._record(residual, self.residual)
            self.residual = residual
        self.step += 1
        if self.step == self.steps and self.config.on_done is not None:
            self.config.on_done(self)
        return out

    def _record(self, current: torch.Tensor, previous: torch.Tensor) -> None:
        ratio = current.float().norm(dim=-1) / previous.float().norm(dim=-1)
        cos = F.cosine_similarity(current.float(), previous.float(), dim=-1, eps=1e-8)
        self.calibration.norm_ratio.append(round(ratio.mean().item(), 5))
        self.calibration.norm_std.append(round(ratio.std().item(), 5))
        self.calibration.cosine_distance.append(round((1 - cos).mean().item(), 5))


__all__ = ["MagCacheConfig", "MagCache", "Calibration", "resample_ratios"]
