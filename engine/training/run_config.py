"""The headless trainer's config file (`python -m engine.train CONFIG`): one JSON or TOML file with the sections
the training nodes fill from their inputs. Every key is a field of a dataclass below (or of the engine's own
`NetworkConfig`, `OptimizerConfig`, `TrainingConfig`, `TimestepConfig`); an unknown section or key, a value of the
wrong type or a missing required key is refused naming it, before any model is loaded. Relative paths are relative
to the config file's folder.

    [model]       family, path, dtype, fp8, fp8_matmul, fp8_scale_dtype, attention, blocks_to_swap,
                  offload_non_blocks, activation_offload, compile_blocks, shard_base; a pair of timestep experts:
                  high_path (then `path` is the low-noise expert), boundary, expert_layout, expert_mode
    [dataset]     config (the dataset TOML whose caches were built: Cache Latents / Cache Text Embeddings)
    [network]     NetworkConfig      [optimizer] OptimizerConfig
    [training]    TrainingConfig, with [training.timesteps] TimestepConfig
    [run]         resume_from, continue_saved, device, timeout_s, stop_file
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import invalid
from .config import NetworkConfig, TrainingConfig
from .optimizers import OptimizerConfig
from .sharding import validate_shard_mode

if sys.version_info >= (3, 11):
    import tomllib
else:   # Python 3.10: the `tomli` backport (a dependency there)
    import tomli as tomllib

DTYPES = ("bf16", "fp16", "fp32", "keep")
FP8 = ("none", "e4m3", "scaled")


@dataclass
class ModelConfig:
    family: str                          # the model family's name (engine.families), e.g. the one of a loader node
    path: str                            # a DiT file, or a preset ("preset:<name>")
    dtype: str = "bf16"                  # weights: bf16 | fp16 | fp32 | keep (as stored)
    fp8: str = "none"                    # block Linears in fp8: none | e4m3 | scaled
    fp8_matmul: bool = False             # fp8 weights: multiply in fp8 (_scaled_mm) where the GPU can
    fp8_scale_dtype: str = "float32"     # fp8 weights: scales in float32 | bf16
    attention: str | None = None         # the DiT's attention kernel; None: the model's
    blocks_to_swap: int = 0              # blocks kept in host memory and streamed in (CUDA)
    offload_non_blocks: bool = False     # with block swap: embeddings and head in host memory too
    activation_offload: bool = False     # checkpointed block inputs in host memory
    compile_blocks: bool = False         # torch.compile each block
    shard_base: str = "none"             # none | fsdp2: each of W ranks holds 1/W of the frozen base (FSDP2)
    # two timestep experts trained in one run (experts.py): `path` is the low-noise one, loaded with the same options
    high_path: str | None = None         # the high-noise expert's DiT file (or preset); None: one DiT
    boundary: float | None = None        # with high_path: 0 < b < 1, or a timestep 1 < b < 1000
    expert_layout: str = "separate"      # separate (one LoRA per expert) | shared (one LoRA for both)
    expert_mode: str = "both"            # both experts on the device | offload: the idle one parked in host memory

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise invalid("[model] dtype", self.dtype, f"one of {DTYPES}")
        if self.fp8 not in FP8:
            raise invalid("[model] fp8", self.fp8, f"one of {FP8}")
        if self.fp8_scale_dtype not in ("float32", "bf16"):
            raise invalid("[model] fp8_scale_dtype", self.fp8_scale_dtype, "float32 or bf16")
        if self.blocks_to_swap < 0:
            raise invalid("[model] blocks_to_swap", self.blocks_to_swap, "an integer ≥ 0")
        validate_shard_mode(self.shard_base, "[model] shard_base")
        if self.shard_base != "none" and (self.blocks_to_swap or self.offload_non_blocks):
            raise invalid("[model] blocks_to_swap / offload_non_blocks with shard_base = fsdp2",
                          (self.blocks_to_swap, self.offload_non_blocks),
                          "0 and false: sharding and block swap are two answers to the same problem (a model "
                          "larger than one GPU), use one")
        if not self.path.startswith("preset:") and not Path(self.path).is_file():
            raise invalid("[model] path", self.path, "an existing DiT file (or preset:<name>)")
        self._validate_pair()

    def _validate_pair(self) -> None:
        from .experts import LAYOUTS, MODES, normalize_boundary

        if self.high_path is None:
            changed = {k: getattr(self, k) for k, default in (("boundary", None), ("expert_layout", "separate"),
                                                              ("expert_mode", "both")) if getattr(self, k) != default}
            if changed:
                raise invalid(f"[model] {', '.join(changed)}", tuple(changed.values()),
                              "unset without high_path (they describe a pair of timestep experts)")
            return
        if not self.high_path.startswith("preset:") and not Path(self.high_path).is_file():
            raise invalid("[model] high_path", self.high_path, "an existing DiT file of the high-noise expert (or "
                                                               "preset:<name>)")
        if self.high_path == self.path:
            raise invalid("[model] high_path", self.high_path, "a file other than path (the low-noise expert)")
        if self.boundary is None:
            raise invalid("[model] boundary", None, "the pair's boundary with high_path: a fraction 0 < b < 1 "
                                                    "(e.g. 0.875) or a timestep 1 < b < 1000")
        try:
            normalize_boundary(self.boundary)
        except ValueError as e:
            raise invalid("[model] boundary", self.boundary, str(e).split("expected ", 1)[-1]) from None
        if self.expert_layout not in LAYOUTS:
            raise invalid("[model] expert_layout", self.expert_layout, f"one of {LAYOUTS}")
        if self.expert_mode not in MODES:
            raise invalid("[model] expert_mode", self.expert_mode, f"one of {MODES}")
        if self.shard_base != "none":
            raise invalid("[model] shard_base with high_path", self.shard_base,
                          "none: a pair of experts trains with each rank holding both whole experts")


@dataclass
class DatasetSection:
    config: str                          # the dataset TOML (its cache directories hold the cached latents/text)

    def validate(self) -> None:
        if not Path(self.config).is_file():
            raise invalid("[dataset] config", self.config, "an existing dataset TOML file")


@dataclass
class RunSection:
    resume_from: str | None = None       # a state folder to resume from (any world size)
    continue_saved: bool = True          # else: continue from `<output_name>-state` when it exists
    device: str = "auto"                 # auto: cuda:LOCAL_RANK when CUDA is there, else cpu
    timeout_s: float = 1800.0            # how long a rank waits for a hung peer before failing
    stop_file: str | None = None         # rank 0 stops (state saved) when it exists; default <output>/<name>.stop

    def validate(self) -> None:
        if not self.timeout_s > 0:
            raise invalid("[run] timeout_s", self.timeout_s, "a number of seconds > 0")
        if self.resume_from is not None and not Path(self.resume_from).exists():
            raise invalid("[run] resume_from", self.resume_from, "an existing state folder")


@dataclass
class RunConfig:
    model: ModelConfig
    dataset: DatasetSection
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        self.model.validate()
        self.dataset.validate()
        self.network.validate()
        self.optimizer.validate()
        self.training.validate()
        self.run.validate()

    def stop_path(self) -> Path:
        if self.run.stop_file:
            return Path(self.run.stop_file)
        return Path(self.training.output_dir) / f"{self.training.output_name}.stop"


# paths of the file, resolved against its folder
_PATHS = {"model": ("path", "high_path"), "dataset": ("config",), "network": ("network_weights",),
          "training": ("output_dir", "lora_dir", "logging_dir"), "run": ("resume_from", "stop_file")}


def load_run_config(path: str | Path) -> RunConfig:
    """Read, check and validate a config file (`.json` or `.toml`)."""
    path = Path(path)
    if not path.is_file():
        raise invalid("config file", str(path), "an existing .json or .toml file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raw = json.loads(text)
    except ValueError as e:
        raise invalid("config file", str(path), f"valid {path.suffix.lstrip('.') or 'JSON'} ({e})") from None
    config = parse_run_config(raw, base_dir=path.parent)
    config.validate()
    return config


def parse_run_config(raw: dict, base_dir: str | Path | None = None) -> RunConfig:
    """A dict as read from the file -> a RunConfig (types checked; `validate()` checks the values)."""
    if not isinstance(raw, dict):
        raise invalid("config", type(raw).__name__, "a table of sections")
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    if base_dir is not None:
        for section, keys in _PATHS.items():
            values = raw.get(section)
            for key in keys if isinstance(values, dict) else ():
                v = values.get(key)
                if isinstance(v, str) and v and not v.startswith("preset:") and not Path(v).is_absolute():
                    values[key] = str(Path(base_dir) / v)
    return _build(RunConfig, raw, "")


def to_dict(config: RunConfig) -> dict:
    """A config (or one section) as plain JSON data, None kept (what `parse_run_config` reads back)."""
    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        if isinstance(obj, dict):
            return {str(k): plain(v) for k, v in obj.items()}
        return obj
    return plain(config)


# --- typed building ------------------------------------------------------------------------------------------

def _build(cls, raw, where: str):
    name = f"[{where}]" if where else "config"
    if not isinstance(raw, dict):
        raise invalid(name, raw, "a table of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            what = "section" if not where else "key"
            raise invalid(f"{name} {what} {key!r}", raw[key], f"one of {sorted(fields)}")
    kwargs = {}
    for key, f in fields.items():
        if key in raw:
            kwargs[key] = _value(f"{where}.{key}" if where else key, raw[key], hints[key])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise invalid(f"{name} {key}", None, "a value (this key is required)")
    return cls(**kwargs)


def _value(where: str, value, hint):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        if value is None and type(None) in args:
            return None
        problems = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _value(where, value, option)
            except ValueError as e:
                problems.append(str(e))
        raise invalid(f"[{where.rsplit('.', 1)[0]}] {where.rsplit('.', 1)[-1]}" if "." in where else where, value,
                      " or ".join(_type_name(a) for a in args if a is not type(None)))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    base = origin or hint
    if base in ok:
        if not ok[base]:
            section, _, key = where.rpartition(".")
            raise invalid(f"[{section}] {key}" if section else key, value, _type_name(hint))
        return float(value) if base is float else value
    if base is list:
        if not isinstance(value, list) or (args and args[0] is str and not all(isinstance(v, str) for v in value)):
            section, _, key = where.rpartition(".")
            raise invalid(f"[{section}] {key}" if section else key, value, _type_name(hint))
        return list(value)
    if base is dict:
        if not isinstance(value, dict):
            section, _, key = where.rpartition(".")
            raise invalid(f"[{section}] {key}" if section else key, value, "a table")
        return dict(value)
    return value


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table",
             list: "a list"}
    base = typing.get_origin(hint) or hint
    if base is list and typing.get_args(hint) == (str,):
        return "a list of strings"
    return names.get(base, getattr(base, "__name__", str(base)))


__all__ = ["DatasetSection", "ModelConfig", "RunConfig", "RunSection", "load_run_config", "parse_run_config",
           "to_dict"]
