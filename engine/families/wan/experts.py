"""Wan 2.2 A14B: a high-noise and a low-noise expert (two DiTs with the Wan 2.1 14B architecture) sampled as one.

Which expert runs step i: the high-noise one when the step's timestep t_i >= boundary·1000, the low-noise one below
(diffusers' WanPipeline: `t >= boundary_ratio * num_train_timesteps`; Musubi Tuner: `t / 1000 >= boundary`: the
boundary timestep itself is high-noise). The guidance scale follows the same phase, also when the high-noise expert
is absent: the low-noise expert then runs every step, with the high-noise scale on the high-noise steps (Musubi).

Memory modes, i.e. what is on the execution device while a step runs:
* "both":    both experts, placed before the first step.
* "offload": the running expert only; the other one is parked (`Residency.park`: resident weights in pinned host
             memory, its block swapper kept attached), brought back at its next step. A normal schedule switches
             once per generation (high -> low), and the next generation switches back at its first step.
* "lazy":    an expert is loaded (`LazyExpert.load`) at its first step and freed after its last one (`unload`).
Block swap works in every mode: the options ride on each expert's `ModelHandle`, and each expert is its own weight
set with its own swapper in the `Residency`.

Per-expert LoRA: each expert is its own module (or handle), so a LoRA view of one (Apply LoRA on that expert's
socket, or applied inside a `LazyExpert.load`) never touches the other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ...errors import invalid
from ...handle import ModelHandle, apply_run_options, as_handle
from ...lora.adapters import eval_mode
from ...memory.placement import execution_device
from ...memory.residency import Residency
from ...training.experts import HIGH, LOW, NAMES, normalize_boundary, side_of
from ...training.experts import MODES as RESIDENT_MODES   # both / offload: what a pair in training may use
from .detect import model_kind

MODES = RESIDENT_MODES + ("lazy",)     # a lazy pair reads each expert from its file for its own steps
STEPS = 40
# official Wan 2.2 A14B configs (Musubi's wan_t2v_A14B / wan_i2v_A14B): T2V, and image-conditioned experts
BOUNDARY = {"t2v": 0.875, "i2v": 0.9}
SHIFT = {"t2v": 12.0, "i2v": 5.0}
GUIDANCE = {"t2v": (3.0, 4.0), "i2v": (3.5, 3.5)}   # (low-noise, high-noise)


@dataclass(frozen=True)
class LazyExpert:
    """An expert loaded only when its first step comes ("lazy" mode; other modes load it before the first step)."""
    config: object                                   # its WanConfig, read from the file header: pairing is checked
                                                     # before anything loads
    load: Callable[[], object]                       # -> a WanModel or a ModelHandle (LoRA views made in here)
    unload: Callable[[object], None] | None = None   # called with what `load` returned, once it is off the device
    name: str = ""                                   # the file, for messages


@dataclass
class WanExperts:
    """The pair `generate` takes in place of a DiT. Experts: a WanModel, a ModelHandle (block swap and the other run
    options of its loader) or a LazyExpert; `high` may be None (the low-noise expert runs throughout)."""
    low: object
    high: object | None = None
    boundary: float | None = None        # 0 < b < 1, or a timestep 1 < b < 1000 (Musubi takes both); None: per kind
    mode: str = "both"                   # one of MODES
    device: torch.device | str | None = None   # where the experts run; None: where they are (no placement)
    residency: Residency | None = None   # the host's; None: a private one
    offload_after: bool = False          # every expert back to CPU memory after the generation

    def resolved_boundary(self) -> float:
        """The normalized boundary, the release's default when None (what generic callers, e.g. the training
        nodes, read of a pair)."""
        return boundary_of(self)


# ---------------------------------------------------------------------------------------------------------------
# Checks (before any model call)
# ---------------------------------------------------------------------------------------------------------------

def _config(source):
    if isinstance(source, LazyExpert):
        return source.config
    handle = as_handle(source)
    return None if handle is None else getattr(handle.module, "config", None)


def _source_path(source) -> str | None:
    """The file an expert comes from (None for a model built in memory). Only for sources `_config` accepted."""
    return source.name if isinstance(source, LazyExpert) else as_handle(source).module.source_path


def _describe(source) -> str:
    cfg, where = _config(source), _source_path(source)
    return f"{cfg.variant} ({model_kind(cfg)}, in_dim={cfg.in_dim}, dim={cfg.dim}, {cfg.num_layers} blocks)" + \
        (f" from {where}" if where else "")


def _architecture(config) -> dict:
    """What two experts must share: every config field but the human name."""
    fields = dataclasses.asdict(config)
    del fields["variant"]
    del fields["expert"]            # which expert a file is (from its name), checked against its slot
    if not fields["has_image_input"]:
        del fields["clip_dim"]      # unused without an image branch (detection cannot read it from such a file)
    return fields


def check_experts(experts: WanExperts) -> None:
    """Refuse a pair that cannot run: wrong mode, a missing or unusable expert, experts of different kinds/shapes
    (naming which file is which), a boundary out of range."""
    if not isinstance(experts, WanExperts):
        raise invalid("experts", type(experts).__name__, "a WanExperts pair")
    if experts.mode not in MODES:
        raise invalid("expert memory mode", experts.mode, f"one of {MODES}")
    sources = {LOW: experts.low} if experts.high is None else {LOW: experts.low, HIGH: experts.high}
    for name, source in sources.items():
        cfg = _config(source)
        if cfg is None or not hasattr(cfg, "in_dim"):
            raise invalid(NAMES[name], type(source).__name__, "a Wan DiT (model, handle or LazyExpert)")
        named = cfg.expert
        if named not in (None, name):
            raise invalid(NAMES[name], _describe(source), f"the {name}_noise file of the pair (its name says it "
                                                          f"is the {NAMES[named]}: swap the two inputs)")
    if experts.high is not None:
        low, high = _architecture(_config(experts.low)), _architecture(_config(experts.high))
        if low != high:
            differ = sorted(k for k in set(low) | set(high) if low.get(k) != high.get(k))
            raise invalid(NAMES[HIGH], _describe(experts.high),
                          f"the same architecture as the {NAMES[LOW]} {_describe(experts.low)}: both experts of one "
                          f"Wan 2.2 A14B release (they differ in {', '.join(differ)})")
    for name, source in sources.items():
        _check_a14b(name, source)
    if experts.boundary is not None:
        normalize_boundary(experts.boundary)


_WAN21_NAME = re.compile(r"wan[ _.-]?2[ _.-]?1(?!\d)", re.IGNORECASE)


def _check_a14b(name: str, source) -> None:
    """An A14B expert is a T2V or I2V DiT without a CLIP branch; a Wan 2.1 I2V / FLF2V / Fun-Control model, TI2V-5B,
    or a file named as Wan 2.1 (its T2V-14B has the A14B T2V layout) is refused."""
    cfg, path = _config(source), _source_path(source)
    wan21_file = path is not None and _WAN21_NAME.search(Path(str(path)).name) is not None
    if model_kind(cfg) not in ("t2v", "i2v") or cfg.has_image_input or wan21_file:
        why = "a file named as Wan 2.1" if wan21_file else f"a model of kind {model_kind(cfg)}" + (
            " with a CLIP image branch (Wan 2.1)" if cfg.has_image_input else "")
        raise invalid(NAMES[name], f"{_describe(source)}: {why}", "a Wan 2.2 A14B expert (a T2V or I2V DiT without "
                      "CLIP, e.g. wan2.2_t2v_high_noise_14B / wan2.2_i2v_low_noise_14B)")


def defaults_kind(config) -> str:
    """Which release's defaults apply: "t2v" for a text-to-video expert, "i2v" for an image-conditioned one."""
    return "t2v" if model_kind(config) == "t2v" else "i2v"


def resolve_for_experts(experts: WanExperts, request):
    """The request with the A14B defaults where it leaves them open (steps 40, shift 12 T2V / 5 I2V, guidance
    (low, high) 3.0/4.0 T2V, 3.5/3.5 I2V); the Wan 2.1 `resolve` fills the rest. Checks the pair first."""
    check_experts(experts)
    kind = defaults_kind(_config(experts.low))
    low, high = GUIDANCE[kind]
    r = dataclasses.replace(request)
    r.steps = STEPS if r.steps is None else r.steps
    r.shift = SHIFT[kind] if r.shift is None else r.shift
    r.guidance_scale = low if r.guidance_scale is None else r.guidance_scale
    r.guidance_scale_high = high if r.guidance_scale_high is None else r.guidance_scale_high
    g = r.guidance_scale_high
    if isinstance(g, bool) or not isinstance(g, (int, float)) or g != g:
        raise invalid("guidance_scale_high", g, "a number (4.0 T2V, 3.5 I2V)")
    return r


def boundary_of(experts: WanExperts) -> float:
    """The normalized boundary (the per-kind default when None)."""
    if experts.boundary is None:
        return BOUNDARY[defaults_kind(_config(experts.low))]
    return normalize_boundary(experts.boundary)


class _Reference:
    """What the request checks read of a model (its config) for a pair whose experts may not be loaded yet."""

    def __init__(self, config):
        self.config = config


def reference(experts: WanExperts) -> _Reference:
    return _Reference(_config(experts.low))


# ---------------------------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------------------------

def expert_plan(timesteps: torch.Tensor, boundary: float, has_high: bool = True) -> list[tuple[str, str]]:
    """(expert that runs, guidance phase) per step: without a high-noise expert the low one runs the high phase."""
    phases = [side_of(t, boundary) for t in timesteps.tolist()]
    return [(p if has_high else LOW, p) for p in phases]


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

class ExpertRunner:
    """Places, parks, loads and frees the experts as the steps go (see the module docstring); `events` records
    what it did: ("load" | "place" | "park" | "free" | "offload", expert) and ("run", expert, step).

    `start()` (returns the execution device), then `with runner:` around the loop that calls `velocity(...)`."""

    def __init__(self, experts: WanExperts, timesteps: torch.Tensor):
        plan = expert_plan(timesteps, boundary_of(experts), experts.high is not None)
        self.experts, self.plan = experts, plan
        self.mode = experts.mode
        self.residency = experts.residency if experts.residency is not None else Residency()
        self.device = torch.device(experts.device) if experts.device is not None else None
        self.sources = {LOW: experts.low, HIGH: experts.high}
        self.handles: dict[str, ModelHandle] = {}      # loaded experts
        self.loaded_by_us: dict[str, object] = {}      # what LazyExpert.load returned (given back to unload)
        self.last_step = {name: max(i for i, (e, _) in enumerate(plan) if e == name) for name, _ in plan}
        self.placed: set[str] = set()
        self.events: list[tuple] = []
        self._eval_modes: dict[str, contextlib.ExitStack] = {}   # per expert: a freed one's ends with it

    # --- one expert ---------------------------------------------------------------------------------------------
    def _load(self, name: str) -> ModelHandle:
        if name not in self.handles:
            source = self.sources[name]
            if isinstance(source, LazyExpert):
                got = source.load()
                self.loaded_by_us[name] = got
                handle = as_handle(got)
                cfg = getattr(getattr(handle, "module", None), "config", None)
                if handle is None or cfg is None or _architecture(cfg) != _architecture(source.config):
                    shown = cfg.variant if cfg is not None else type(got).__name__
                    raise invalid(f"{NAMES[name]} {source.name}".strip(), f"a loaded {shown}",
                                  f"the model its file header describes ({source.config.variant})")
                self.events.append(("load", name))
            else:
                handle = as_handle(source)
            self.handles[name] = handle
            modes = self._eval_modes[name] = contextlib.ExitStack()
            modes.enter_context(eval_mode(handle.module))   # adapter dropout never applies to samples
        return self.handles[name]

    def _place(self, name: str) -> None:
        handle = self._load(name)
        apply_run_options(handle)
        if self.device is not None and name not in self.placed:
            opts = handle.options
            self.residency.place(handle.module, self.device, opts.blocks_to_swap, opts.offload_non_blocks)
            self.events.append(("place", name))
        self.placed.add(name)

    def _park(self, name: str) -> None:
        if name in self.placed:
            if self.device is not None:
                self.residency.park(self.handles[name].module)
                self.events.append(("park", name))
            self.placed.discard(name)

    def _free(self, name: str) -> None:
        """Lazy mode after the expert's last step: off the device, handed to `unload`, forgotten (nothing here keeps
        its module alive)."""
        handle = self.handles.pop(name)
        self._eval_modes.pop(name).close()
        if self.device is not None:
            self.residency.offload(handle.module)
        self.placed.discard(name)
        source = self.sources[name]
        if name in self.loaded_by_us:
            got = self.loaded_by_us.pop(name)
            if isinstance(source, LazyExpert) and source.unload is not None:
                source.unload(got)
        self.events.append(("free", name))

    # --- the generation -------------------------------------------------------------------------------------------
    def start(self) -> torch.device:
        """Before the first step: load/place what the mode wants there; returns the execution device."""
        first = self.plan[0][0]
        if self.mode == "both":
            for name in (HIGH, LOW):
                if name in self.last_step:
                    self._place(name)
        self.activate(first)
        return self.device if self.device is not None else execution_device(self.handles[first].module)

    def activate(self, name: str) -> nn.Module:
        """The module of `name`, on the device; in "offload" mode the other expert is parked first."""
        if name not in self.placed:
            if self.mode == "offload":
                for other in list(self.placed):
                    self._park(other)
            self._place(name)
        return self.handles[name].module

    def step_done(self, step: int) -> None:
        """After the model calls of `step`: in "lazy" mode, free an expert whose last step it was."""
        if self.mode == "lazy":
            for name, last in self.last_step.items():
                if last == step:
                    self._free(name)

    def velocity(self, guidance, guidance_scale_high: float, make_guided: Callable) -> Callable:
        """velocity_fn(x, t, step) for the generic loop. guidance: the request's GuidanceConfig (its scale is the
        low-noise one); make_guided(module, guidance) -> a GuidedVelocity of that module, made once per
        (expert, phase) that occurs."""
        scales = {LOW: guidance.scale, HIGH: float(guidance_scale_high)}
        guided: dict[str, dict[str, object]] = {}     # expert -> phase -> its GuidedVelocity

        def velocity_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
            name, phase = self.plan[step]
            module = self.activate(name)
            by_phase = guided.setdefault(name, {})
            if phase not in by_phase:
                by_phase[phase] = make_guided(module, dataclasses.replace(guidance, scale=scales[phase]))
            self.events.append(("run", name, step))
            v = by_phase[phase](x, t, step)
            self.step_done(step)
            if name not in self.handles:        # freed (lazy): nothing may keep its module alive
                del guided[name]
            return v
        return velocity_fn

    def __enter__(self) -> "ExpertRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """After the last step (or on error / interrupt): lazy experts freed; with `offload_after`, every expert
        that is still loaded back in CPU memory."""
        try:
            if self.mode == "lazy":
                for name in list(self.handles):
                    self._free(name)
            elif self.experts.offload_after and self.device is not None:
                for name, handle in self.handles.items():
                    self.residency.offload(handle.module)
                    self.events.append(("offload", name))
                self.placed.clear()
        finally:
            for modes in self._eval_modes.values():
                modes.close()
            self._eval_modes.clear()
