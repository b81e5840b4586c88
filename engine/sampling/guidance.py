"""Classifier-free guidance with a negative prompt, CFG skip schedules and skip-layer guidance.

Generic over the model family: the family supplies `predict(x, t, cond, skip_blocks) -> velocity` and, to run
cond and uncond in one batched forward, `merge(conds) -> cond` that stacks two conditioning objects on the batch
axis (e.g. list concatenation of per-sample text embeddings, cat of y/clip features).

Per step i (n steps):
* CFG applied (mask from `cfg_step_mask`): pred = uncond + g·(cond − uncond). The uncond pass runs even at g = 1
  (Musubi does; it keeps results identical to Musubi's at g = 1).
* CFG skipped: pred = cond only (one forward).
* SLG active (only on CFG steps, ⌊start·n⌋ ≤ i < ⌊end·n⌋, and `slg_layers` non-empty):
  - "original" (SD3.5): pred = uncond + g·(cond − uncond) + slg_scale·(cond − skip), skip = uncond pass with the
    listed blocks skipped (a third forward);
  - "uncond" (Wan2GP): the uncond pass itself runs with the blocks skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import invalid

CFG_SKIP_MODES = ("none", "early", "late", "middle", "early_late", "alternate")
SLG_MODES = ("original", "uncond")

# predict(x [B, ...], t [B], cond, skip_blocks or None) -> velocity [B, ...]
Predict = Callable[[torch.Tensor, torch.Tensor, Any, "frozenset[int] | None"], torch.Tensor]
Merge = Callable[[Sequence[Any]], Any]


@dataclass
class GuidanceConfig:
    scale: float = 5.0                      # CFG scale g
    cfg_skip_mode: str = "none"
    cfg_apply_ratio: float | None = None    # fraction of steps that get CFG (None: all of them)
    slg_layers: tuple[int, ...] = ()        # block indices skipped by SLG; empty: SLG off
    slg_mode: str = "original"
    slg_scale: float = 3.0
    slg_start: float = 0.0                  # fractions of the step count
    slg_end: float = 0.3
    batch_cfg: bool = True                  # cond + uncond in one B=2 forward when they share skip_blocks

    def validate(self, num_blocks: int | None = None) -> None:
        if not isinstance(self.scale, (int, float)) or self.scale != self.scale:
            raise invalid("guidance_scale", self.scale, "a number (5.0 is a common default)")
        if self.cfg_skip_mode not in CFG_SKIP_MODES:
            raise invalid("cfg_skip_mode", self.cfg_skip_mode, f"one of {CFG_SKIP_MODES}")
        if self.cfg_apply_ratio is not None and not (0.0 <= self.cfg_apply_ratio <= 1.0):
            raise invalid("cfg_apply_ratio", self.cfg_apply_ratio, "a fraction between 0 and 1")
        if self.slg_mode not in SLG_MODES:
            raise invalid("slg_mode", self.slg_mode, f"one of {SLG_MODES}")
        if not (0.0 <= self.slg_start <= self.slg_end <= 1.0):
            raise invalid("slg_start/slg_end", (self.slg_start, self.slg_end), "0 <= start <= end <= 1")
        for layer in self.slg_layers:
            if not isinstance(layer, int) or layer < 0 or (num_blocks is not None and layer >= num_blocks):
                bound = f" < {num_blocks}" if num_blocks is not None else ""
                raise invalid("slg_layers", list(self.slg_layers), f"block indices 0 <= i{bound}")


def cfg_step_mask(steps: int, mode: str = "none", ratio: float | None = None) -> list[bool]:
    """Which steps apply CFG. With a = ⌊n·ratio⌋: early → last a steps, late → first a, early_late → a centred
    window of a, middle → all but a window of n − a starting at ⌊a/2⌋, alternate → accumulate ratio, apply at ≥ 1."""
    if mode == "none" or ratio is None:
        return [True] * steps
    a = int(steps * ratio)
    if mode == "early":
        return [i >= steps - a for i in range(steps)]
    if mode == "late":
        return [i < a for i in range(steps)]
    if mode == "early_late":
        start = (steps - a) // 2
        return [start <= i < start + a for i in range(steps)]
    if mode == "middle":
        skip = steps - a
        start = (steps - skip) // 2
        return [not (start <= i < start + skip) for i in range(steps)]
    if mode == "alternate":
        mask, acc = [], 0.0
        for _ in range(steps):
            acc += ratio
            mask.append(acc >= 1.0)
            if acc >= 1.0:
                acc -= 1.0
        return mask
    raise invalid("cfg_skip_mode", mode, f"one of {CFG_SKIP_MODES}")


def slg_step_mask(steps: int, start: float, end: float) -> list[bool]:
    """SLG window in steps: ⌊start·n⌋ ≤ i < ⌊end·n⌋."""
    lo, hi = int(start * steps), int(end * steps)
    return [lo <= i < hi for i in range(steps)]


class GuidedVelocity:
    """Combines the cond/uncond (and skip-layer) passes of one step into the guided velocity."""

    def __init__(self, predict: Predict, cond: Any, uncond: Any, config: GuidanceConfig, steps: int,
                 merge: Merge | None = None):
        self.predict, self.cond, self.uncond, self.config, self.merge = predict, cond, uncond, config, merge
        self.cfg_mask = cfg_step_mask(steps, config.cfg_skip_mode, config.cfg_apply_ratio)
        slg_on = len(config.slg_layers) > 0
        self.slg_mask = slg_step_mask(steps, config.slg_start, config.slg_end) if slg_on else [False] * steps
        self.skip = frozenset(config.slg_layers)
        self.forwards = 0                    # model calls made (counts a batched call once); for tests/benchmarks

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond: Any, skip) -> torch.Tensor:
        self.forwards += 1
        return self.predict(x, t, cond, skip)

    def _cond_and_uncond(self, x, t, uncond_skip):
        if self.config.batch_cfg and self.merge is not None and uncond_skip is None:
            both = self._run(torch.cat([x, x]), torch.cat([t, t]), self.merge([self.cond, self.uncond]), None)
            return both.chunk(2)
        return self._run(x, t, self.cond, None), self._run(x, t, self.uncond, uncond_skip)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """x [B, C, ...], t [B] -> guided velocity [B, C, ...] (float32)."""
        cfg = self.config
        if not self.cfg_mask[step]:
            return self._run(x, t, self.cond, None).float()
        slg = self.slg_mask[step]
        uncond_skip = self.skip if slg and cfg.slg_mode == "uncond" else None
        cond, uncond = self._cond_and_uncond(x, t, uncond_skip)
        cond, uncond = cond.float(), uncond.float()
        pred = uncond + cfg.scale * (cond - uncond)
        if slg and cfg.slg_mode == "original":
            skipped = self._run(x, t, self.uncond, self.skip).float()
            pred = pred + cfg.slg_scale * (cond - skipped)
        return pred
