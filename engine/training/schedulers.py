"""Learning-rate schedulers (Musubi Tuner `--lr_scheduler`).

Each built-in schedule is a pure factor function f(step) -> multiplier of the base lr, wrapped in a `LambdaLR`.
The scheduler is stepped once per optimizer step; `total_steps` = max_train_steps.
Formulas follow the usual transformers/diffusers definitions (the ones Musubi calls).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import invalid
from .optimizers import OptimizerConfig, import_class, parse_kwargs

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay", "piecewise_constant", "adafactor", "rex")


def resolve_steps(value, total: int, name: str) -> int:
    """int steps | float < 1 (fraction of total) | "N%" -> int steps."""
    if value is None or value == "":
        return 0
    try:
        if isinstance(value, str):
            v = value.strip()
            steps = float(v[:-1]) / 100 * total if v.endswith("%") else float(v)
            if not v.endswith("%") and steps < 1 and steps != 0:
                steps *= total
        else:
            steps = value * total if isinstance(value, float) and 0 < value < 1 else value
        steps = int(steps)
    except (TypeError, ValueError):
        raise invalid(name, value, 'an integer step count, a fraction < 1 of the total steps, or "N%"') from None
    if steps < 0 or steps > total:
        raise invalid(name, value, f"between 0 and the total step count ({total})")
    return steps


# --- factor functions (step -> multiplier) -------------------------------------------------------------------

def _warm(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def constant(warmup: int) -> Callable[[int], float]:
    return lambda s: _warm(s, warmup) if s < warmup else 1.0


def linear(warmup: int, total: int):
    return lambda s: _warm(s, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))


def cosine(warmup: int, total: int, num_cycles: float = 0.5, min_ratio: float = 0.0):
    def f(s):
        if s < warmup:
            return _warm(s, warmup)
        progress = (s - warmup) / max(1, total - warmup)
        value = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
        return min_ratio + (1 - min_ratio) * value
    return f


def cosine_with_restarts(warmup: int, total: int, num_cycles: int = 1):
    def f(s):
        if s < warmup:
            return _warm(s, warmup)
        progress = (s - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    return f


def polynomial(warmup: int, total: int, power: float, base_lr: float, lr_end: float = 1e-7):
    def f(s):
        if s < warmup:
            return _warm(s, warmup)
        if s > total:
            return lr_end / base_lr
        remaining = 1 - (s - warmup) / max(1, total - warmup)
        return ((base_lr - lr_end) * remaining ** power + lr_end) / base_lr
    return f


def inverse_sqrt(warmup: int, timescale: int | None):
    timescale = timescale or warmup or 10_000
    shift = timescale - warmup

    def f(s):
        if s < warmup:
            return _warm(s, warmup)
        return 1.0 / math.sqrt((s + shift) / timescale)
    return f


def warmup_stable_decay(warmup: int, decay: int, total: int, min_ratio: float):
    """Linear warmup, constant plateau, cosine decay to `min_ratio` over the last `decay` steps."""
    stable_end = total - decay

    def f(s):
        if s < warmup:
            return _warm(s, warmup)
        if s < stable_end:
            return 1.0
        progress = min(1.0, (s - stable_end) / max(1, decay))
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def piecewise_constant(step_rules: str):
    """diffusers rule string "1:10,0.1:20,0.5": multiplier 1 before step 10, 0.1 before step 20, then 0.5."""
    try:
        parts = [p.strip() for p in str(step_rules).split(",") if p.strip()]
        rules = [(int(p.split(":")[1]), float(p.split(":")[0])) for p in parts[:-1]]
        last = float(parts[-1])
    except (IndexError, ValueError):
        raise invalid("lr_scheduler_args step_rules", step_rules, 'rules like "1:10,0.1:20,0.01"') from None

    def f(s):
        for until, mult in rules:
            if s < until:
                return mult
        return last
    return f


def rex(warmup: int, total: int, min_ratio: float = 0.01, alpha: float = 0.1, beta: float = 0.9):
    """REX: m + (1 − m)·z / (α + β·z), z = remaining fraction of the decay phase; warmup rises linearly from m."""
    def f(s):
        if s < warmup:
            return min_ratio + (1 - min_ratio) * s / max(1, warmup)
        z = max(0.0, 1 - (s - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * z / (alpha + beta * z) if z > 0 else min_ratio
    return f


# --- construction ----------------------------------------------------------------------------------------------

def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int,
                    forced: str | None = None):
    """A torch LR scheduler, stepped once per optimizer step. `forced` = BuiltOptimizer.forced_scheduler."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise invalid("max_train_steps", total_steps, "an integer ≥ 1")
    name = (forced or cfg.lr_scheduler or "constant").strip()
    extra = parse_kwargs(cfg.lr_scheduler_args, "lr_scheduler_args")
    warmup = resolve_steps(cfg.lr_warmup_steps, total_steps, "lr_warmup_steps")
    decay = resolve_steps(cfg.lr_decay_steps, total_steps, "lr_decay_steps")
    base_lr = float(cfg.learning_rate)
    min_ratio = cfg.lr_scheduler_min_lr_ratio

    if name.startswith("adafactor"):
        from transformers.optimization import AdafactorSchedule

        initial = float(name.split(":", 1)[1]) if ":" in name else base_lr
        return AdafactorSchedule(optimizer, initial)
    if "." in name:  # a class by import path, e.g. torch.optim.lr_scheduler.StepLR
        cls = import_class(name, "lr_scheduler")
        try:
            return cls(optimizer, **extra)
        except (TypeError, ValueError) as e:
            raise invalid("lr_scheduler_args", extra, f"arguments accepted by {cls.__name__} ({e})") from e
    if name not in SCHEDULERS:
        raise invalid("lr_scheduler", name, f"one of {', '.join(SCHEDULERS)} or a module.Class path")
    if name == "constant":
        factor = constant(0)
    elif name == "constant_with_warmup":
        factor = constant(warmup)
    elif name == "linear":
        factor = linear(warmup, total_steps)
    elif name == "cosine":
        factor = cosine(warmup, total_steps)
    elif name == "cosine_with_restarts":
        factor = cosine_with_restarts(warmup, total_steps, cfg.lr_scheduler_num_cycles)
    elif name == "polynomial":
        factor = polynomial(warmup, total_steps, cfg.lr_scheduler_power, base_lr)
    elif name == "inverse_sqrt":
        factor = inverse_sqrt(warmup, cfg.lr_scheduler_timescale)
    elif name == "cosine_with_min_lr":
        factor = cosine(warmup, total_steps, 0.5, min_ratio or 0.0)
    elif name == "warmup_stable_decay":
        factor = warmup_stable_decay(warmup, decay, total_steps, min_ratio or 0.0)
    elif name == "piecewise_constant":
        if "step_rules" not in extra:
            raise invalid("lr_scheduler_args", extra, 'step_rules="1:10,0.1:20,0.01" for piecewise_constant')
        factor = piecewise_constant(extra["step_rules"])
    else:  # rex
        factor = rex(warmup, total_steps, 0.01 if min_ratio is None else min_ratio,
                     float(extra.get("rex_alpha", 0.1)), float(extra.get("rex_beta", 0.9)))
    if warmup + decay > total_steps:
        raise invalid("lr_warmup_steps + lr_decay_steps", warmup + decay, f"≤ total steps ({total_steps})")
    return LambdaLR(optimizer, factor)
