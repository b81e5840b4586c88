"""The three configs a training session is built from (plus `TimestepConfig`, which lives with its sampler).

Defaults follow Musubi Tuner unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import invalid
from .optimizers import OptimizerConfig
from .timesteps import TimestepConfig

MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_DTYPES = ("compute", "float32")
SAVE_DTYPES = {"fp32": torch.float32, "float": torch.float32, "float32": torch.float32,
               "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
TRAINING_BACKENDS_REFUSED = {"sage": "SageAttention has no backward pass; use sdpa, flash or xformers for training"}


@dataclass
class NetworkConfig:
    """The adapter to train (Musubi `--network_*`). Turned into `engine.lora.AdapterConfig`."""

    kind: str = "lora"                 # "lora" | "loha" | "lokr"
    rank: int = 4                      # network_dim (Musubi: None -> 4)
    alpha: float | None = 1.0          # network_alpha; None -> alpha = rank. Must be > 0 when given.
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    lokr_factor: int = -1
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    network_weights: str | None = None  # start from an existing LoRA file (same kind/rank)
    name: str = "training"             # registry name on the model (attaching again replaces, never stacks)

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise invalid("network rank (network_dim)", self.rank, "an integer ≥ 1")
        if self.alpha is not None and not self.alpha > 0:
            raise invalid("network alpha", self.alpha, "a number > 0 (or empty for alpha = rank)")
        if self.network_weights is not None and not Path(self.network_weights).is_file():
            raise invalid("network_weights", self.network_weights, "an existing LoRA file")

    def adapter_config(self):
        from ..lora.adapters import AdapterConfig

        return AdapterConfig(kind=self.kind, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                             rank_dropout=self.rank_dropout, module_dropout=self.module_dropout,
                             lokr_factor=self.lokr_factor, include=list(self.include), exclude=list(self.exclude))


@dataclass
class TrainingConfig:
    output_dir: str = "output"
    output_name: str = "lora"
    lora_dir: str | None = None               # where the LoRA files go (None = output_dir; states stay in output_dir)
    max_train_steps: int = 1600
    max_train_epochs: int | None = None       # overrides steps: epochs × ceil(batches per epoch / grad accum)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"             # "no" | "fp16" (GradScaler) | "bf16"; adapter weights stay fp32
    gradient_checkpointing: bool = True
    # what checkpointing saves (and activation offload moves) of each block input: "compute" = the mixed-precision
    # dtype (half of float32; Musubi keeps its residual stream in it), "float32" = exact gradients. No effect
    # without mixed precision.
    checkpoint_dtype: str = "compute"
    # keep the optimizer's state (AdamW: two float32 moments per adapter weight) in host memory except during the
    # optimizer step: same arithmetic, one copy each way per step (rank 32 on a 14B DiT: 1.2 GB less on the GPU)
    offload_optimizer_state: bool = False
    attention_backend: str | None = None      # None: keep the model's
    seed: int = 42
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    # saving; retention counts are "keep the last K files"
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = None
    keep_last_n_saves: int | None = None
    save_state: bool = False                  # also write a state folder at every periodic save
    keep_last_n_states: int | None = None
    save_state_every_minutes: float | None = 10.0   # also write the latest state after this much training time
    save_format: str = "musubi"               # engine.lora.writer format: "musubi" | "comfyui" | "diffusers" | "musubi-other"
    save_precision: str = "fp32"
    # logging
    logging_dir: str | None = None            # TensorBoard event files (tensorboardX); None = off
    log_every_n_steps: int = 1

    def validate(self) -> None:
        if not isinstance(self.max_train_steps, int) or self.max_train_steps < 1:
            raise invalid("max_train_steps", self.max_train_steps, "an integer ≥ 1")
        if self.max_train_epochs is not None and (not isinstance(self.max_train_epochs, int)
                                                  or self.max_train_epochs < 1):
            raise invalid("max_train_epochs", self.max_train_epochs, "an integer ≥ 1 or empty")
        if not isinstance(self.gradient_accumulation_steps, int) or self.gradient_accumulation_steps < 1:
            raise invalid("gradient_accumulation_steps", self.gradient_accumulation_steps, "an integer ≥ 1")
        if self.mixed_precision not in MIXED_PRECISION:
            raise invalid("mixed_precision", self.mixed_precision, f"one of {MIXED_PRECISION}")
        if self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise invalid("checkpoint_dtype", self.checkpoint_dtype, f"one of {CHECKPOINT_DTYPES}")
        if not isinstance(self.offload_optimizer_state, bool):
            raise invalid("offload_optimizer_state", self.offload_optimizer_state, "true or false")
        if self.attention_backend in TRAINING_BACKENDS_REFUSED:
            raise invalid("attention_backend", self.attention_backend, TRAINING_BACKENDS_REFUSED[self.attention_backend])
        if self.save_precision not in SAVE_DTYPES:
            raise invalid("save_precision", self.save_precision, f"one of {sorted(SAVE_DTYPES)}")
        from ..lora.writer import FORMATS
        if self.save_format not in FORMATS:
            raise invalid("save_format", self.save_format, f"one of {FORMATS}")
        for name in ("save_every_n_steps", "save_every_n_epochs", "keep_last_n_saves", "keep_last_n_states",
                     "log_every_n_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise invalid(name, v, "an integer ≥ 1 or empty")
        m = self.save_state_every_minutes
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise invalid("save_state_every_minutes", m, "a number of minutes > 0 or empty (no time-based saves)")
        if not self.output_name or any(c in self.output_name for c in '/\\:*?"<>|'):
            raise invalid("output_name", self.output_name, "a file name without path separators")
        self.timesteps.validate()
        check_writable(self.output_dir, "output_dir")
        if self.lora_dir:
            check_writable(self.lora_dir, "lora_dir")
        if self.logging_dir:
            check_writable(self.logging_dir, "logging_dir")


def check_writable(folder: str | os.PathLike, name: str) -> Path:
    """Create `folder` if needed and prove it is writable by writing a probe file."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".musubi_write_probe_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise invalid(name, str(folder), f"a writable folder ({e.strerror or e})") from e
    return path


def to_plain(obj):
    """Dataclass/config -> nested dicts of str/int/float/bool/None/list (safe for torch.load(weights_only=True))."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


__all__ = ["NetworkConfig", "TrainingConfig", "OptimizerConfig", "TimestepConfig", "check_writable", "to_plain"]
