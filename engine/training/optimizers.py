"""Optimizer construction (Musubi Tuner `--optimizer_type` / `--optimizer_args`).

Short names: AdamW (default), AdamW8bit (bitsandbytes), Adafactor (transformers), Prodigy (prodigyopt).
Anything else is a class by import path: "torch.optim.SGD", "bitsandbytes.optim.AdEMAMix8bit", or a bare torch.optim
name ("SGD"). Arguments come as a dict or as "k=v" strings whose values are parsed with `ast.literal_eval`.
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field

import torch

from ..errors import MusubiInputError, invalid


@dataclass
class OptimizerConfig:
    optimizer_type: str = "AdamW"
    learning_rate: float = 2e-6
    optimizer_args: dict | list | str | None = None   # {"weight_decay": 0.01} or ["weight_decay=0.01", ...]
    max_grad_norm: float = 1.0                         # 0 = no clipping
    lr_scheduler: str = "constant"
    lr_warmup_steps: int | float | str = 0             # steps, fraction (< 1) of total, or "N%"
    lr_decay_steps: int | float | str = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_args: dict | list | str | None = None
    loraplus_lr_ratio: float | None = None             # LoRA-B (lora_up) params get lr × ratio

    def validate(self) -> None:
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise invalid("learning_rate", self.learning_rate, "a number > 0")
        if self.max_grad_norm is None or self.max_grad_norm < 0:
            raise invalid("max_grad_norm", self.max_grad_norm, "a number ≥ 0 (0 = no clipping)")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise invalid("loraplus_lr_ratio", self.loraplus_lr_ratio, "a number > 0")
        parse_kwargs(self.optimizer_args, "optimizer_args")
        parse_kwargs(self.lr_scheduler_args, "lr_scheduler_args")


def parse_kwargs(args, name: str = "optimizer_args") -> dict:
    """dict | ["k=v", ...] | "k=v k2=v2" -> dict; values through `ast.literal_eval` (bare words stay strings)."""
    if args is None or args == "":
        return {}
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, str):
        args = args.replace(",", " ").split() if "=" in args else [args]
    out = {}
    for item in args:
        if not isinstance(item, str) or "=" not in item:
            raise invalid(name, item, 'entries like "weight_decay=0.01"')
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise invalid(name, item, "a Python identifier before '='")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()  # e.g. decouple=True works, betas=(0.9,0.99) works, a bare word stays a string
    return out


def import_class(path: str, what: str):
    """"package.module.Class" -> the class; a bare name is looked up in torch.optim."""
    module_name, _, cls_name = path.rpartition(".")
    module_name = module_name or "torch.optim"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise invalid(what, path, f"an importable module.Class ({e})") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise invalid(what, path, f"a class that exists in {module_name}")
    return cls


@dataclass
class BuiltOptimizer:
    optimizer: torch.optim.Optimizer
    name: str                         # full class path, for metadata (ss_optimizer)
    kwargs: dict = field(default_factory=dict)
    forced_scheduler: str | None = None   # Adafactor relative_step: the scheduler must be "adafactor"
    is_schedule_free: bool = False


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], lr: float,
                 loraplus_ratio: float | None) -> list[dict]:
    """One group, or two with LoRA+ (params whose name contains "lora_up" get lr × ratio)."""
    params = [p for _, p in named_params if p.requires_grad]
    if not params:
        raise invalid("network", "no trainable parameters", "an adapter with at least one trainable tensor")
    if not loraplus_ratio:
        return [{"params": params, "lr": lr}]
    up = [p for n, p in named_params if p.requires_grad and "lora_up" in n]
    rest = [p for n, p in named_params if p.requires_grad and "lora_up" not in n]
    groups = [{"params": rest, "lr": lr}]
    if up:
        groups.append({"params": up, "lr": lr * loraplus_ratio})
    return groups


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], cfg: OptimizerConfig) -> BuiltOptimizer:
    cfg.validate()
    kwargs = parse_kwargs(cfg.optimizer_args, "optimizer_args")
    lr = float(cfg.learning_rate)
    groups = param_groups(named_params, lr, cfg.loraplus_lr_ratio)
    key = (cfg.optimizer_type or "AdamW").strip()
    low = key.lower()
    forced_scheduler = None

    if low == "adamw":
        cls = torch.optim.AdamW
    elif low == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional dependency
        except ImportError as e:
            raise invalid("optimizer_type", key, "an installed bitsandbytes package for AdamW8bit "
                          "(pip install bitsandbytes), or AdamW") from e
        cls = bnb.optim.AdamW8bit
    elif low == "adafactor":
        from transformers.optimization import Adafactor

        cls = Adafactor
        # transformers' defaults, made explicit: relative_step=True lets Adafactor compute its own step size
        kwargs.setdefault("relative_step", True)
        if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True  # warmup_init only exists with relative steps
        if kwargs["relative_step"]:
            # lr must be None (Adafactor refuses both); the "adafactor" scheduler then reports Adafactor's own lr
            for g in groups:
                g.pop("lr")
            lr = None
            kwargs.setdefault("scale_parameter", True)
            forced_scheduler = f"adafactor:{cfg.learning_rate}"
    elif low == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise invalid("optimizer_type", key, "an installed prodigyopt package") from e
        cls = Prodigy
    else:
        if low.endswith("8bit") and "." not in key:
            raise invalid("optimizer_type", key, "AdamW8bit or a full path such as bitsandbytes.optim.AdEMAMix8bit")
        cls = import_class(key, "optimizer_type")
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise invalid("optimizer_type", key, "a torch.optim.Optimizer subclass")

    try:
        optimizer = cls(groups, lr=lr, **kwargs)
    except TypeError as e:
        raise invalid("optimizer_args", kwargs, f"arguments accepted by {cls.__name__} ({e})") from e
    except ValueError as e:
        raise invalid("optimizer_args", kwargs, f"valid values for {cls.__name__} ({e})") from e
    name = f"{cls.__module__}.{cls.__name__}"
    return BuiltOptimizer(optimizer, name, kwargs, forced_scheduler, is_schedule_free=low.endswith("schedulefree"))


def optimizer_train_mode(optimizer, train: bool) -> None:
    """Schedule-free optimizers keep two weight sets: switch them around sampling/saving."""
    fn = getattr(optimizer, "train" if train else "eval", None)
    if callable(fn):
        fn()


__all__ = ["OptimizerConfig", "BuiltOptimizer", "build_optimizer", "parse_kwargs", "import_class",
           "optimizer_train_mode", "MusubiInputError"]


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> int:
    """Move the per-parameter state tensors of `optimizer` (AdamW's two moments, 8-bit states and their scales) to
    `device`; scalar step counters stay where the optimizer keeps them. To the CPU from a GPU they go to pinned
    memory, asynchronously (later copies back are ordered after them on the same stream). Returns the bytes moved.

    `TrainingConfig.offload_optimizer_state` uses it to keep the state on the host except during the optimizer
    step: the state never changes outside it, so the arithmetic is the same; the cost is one copy each way per step
    (AdamW, rank 32 on a 14B video DiT: 1.2 GB)."""
    device = torch.device(device)
    moved = 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.device == device:
                continue
            if device.type == "cpu" and value.is_cuda:
                host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
                state[key] = host.copy_(value, non_blocking=True)
            else:
                state[key] = value.to(device, non_blocking=value.is_pinned())
            moved += value.numel() * value.element_size()
    return moved

