"""Timestep experts: two models of one architecture that split the noise levels at a boundary, a high-noise expert
for t >= boundary and a low-noise one below (t in [0, 1]; the DiT's timestep 1000·t is compared with 1000·boundary,
as the samplers do, so the boundary itself is high-noise).

One expert at a time: `expert_timesteps` restricts the timestep config to that expert's side, keeping the
distribution's shape (rejection sampling; `sigma` mode bounds its discrete schedule, where the shift is applied after).

Both experts in one session (`TimestepExperts` given to `TrainingSession`, run by `ExpertPair`), as Musubi Tuner
picks them: per batch, one draw for the first sample decides the expert; then every sample, the first included, is
re-drawn (at most 100 tries each) until it falls on that side; if any sample never does, the whole batch takes one
unconstrained draw per sample instead (the decided expert still runs it) with a warning. The noise of each sample is
drawn after the batch's timesteps.

LoRA layouts:
* "separate": one adapter network per expert, saved as `<name>_high_noise` / `<name>_low_noise` (the pair ComfyUI's
  two model loaders take). One optimizer holds both: the inactive expert's adapters are not in the batch's graph, so
  their gradients stay None and the optimizer skips them (AdamW: no moment update, no weight decay, its own step
  count): each network moves only on its own batches, and both share the learning-rate schedule.
* "shared": one network trained on every batch (Musubi Tuner's layout): both experts carry adapters whose parameters
  are the same tensors, so the sampler can run either expert with it; saved as one file.

Memory modes: "both" keeps both experts placed; "offload" parks the inactive one (`Residency.park`) only when the
expert changes between batches (`switches` counts the changes; two batches in a row on one expert move nothing).
Each expert is placed with its own run options (`TimestepExperts.options`: its loader's block swap), so each weight
set keeps its own swapper in the `Residency`, as in sampling.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import invalid
from ..handle import ModelHandle, RunOptions
from ..lora.adapters import AdapterConfig, AdapterNetwork
from ..memory.residency import Residency
from .timesteps import TimestepConfig, TimestepSample, TimestepSampler, shift_sigma

HIGH, LOW = "high", "low"
EXPERTS = (HIGH, LOW)
NAMES = {HIGH: "high-noise expert", LOW: "low-noise expert"}
SUFFIX = {HIGH: "_high_noise", LOW: "_low_noise"}      # ComfyUI users' file names for the two model loaders
LAYOUTS = ("separate", "shared")
MODES = ("both", "offload")
MAX_TRIES = 100        # Musubi Tuner's re-draws per sample
TIMESTEPS = 1000


def normalize_boundary(boundary) -> float:
    """0 < b < 1 as is; 1 < b < 1000 as a timestep (b / 1000), as Musubi Tuner takes both."""
    ok = isinstance(boundary, (int, float)) and not isinstance(boundary, bool) and boundary == boundary
    if ok and 0 < boundary < 1:
        return float(boundary)
    if ok and 1 < boundary < TIMESTEPS:
        return float(boundary) / TIMESTEPS
    raise invalid("boundary", boundary, "a fraction 0 < b < 1 (e.g. 0.875) or a timestep 1 < b < 1000 (875)")


def side_of(model_t, boundary: float) -> str:
    """HIGH when the DiT's timestep (1000·t) >= 1000·boundary, else LOW."""
    return HIGH if float(model_t) >= boundary * TIMESTEPS else LOW


def _check_expert(expert) -> str:
    if expert not in EXPERTS:
        raise invalid("expert", expert, f"one of {EXPERTS}")
    return expert


# ---------------------------------------------------------------------------------------------------------------
# One expert: its side of the boundary
# ---------------------------------------------------------------------------------------------------------------

def expert_timesteps(config: TimestepConfig, expert: str, boundary) -> TimestepConfig:
    """`config` restricted to `expert`'s side of the boundary, shape-preserving (the user's min/max, if any, are
    intersected with it). Non-`sigma` modes: min/max = the side in timesteps with `preserve_distribution_shape`;
    `sigma` mode (discrete schedule lo+1..hi, shifted after): the schedule bounds whose shifted t fall on the side."""
    _check_expert(expert)
    b = normalize_boundary(boundary)
    config.validate()
    lo, hi = config.bounds()
    if config.timestep_sampling == "sigma":
        edge = _sigma_edge(config, b)       # smallest schedule timestep on the high side
        side = (edge - 1, TIMESTEPS) if expert == HIGH else (0, edge - 1)
    else:
        cut = _whole(b * TIMESTEPS)
        side = (cut, TIMESTEPS) if expert == HIGH else (0, cut)
    new_lo, new_hi = max(lo, side[0]), min(hi, side[1])
    if new_lo >= new_hi:
        raise invalid("min_timestep/max_timestep", (lo, hi),
                      f"a range reaching the {NAMES[expert]}'s side of the boundary {b} "
                      f"(timesteps {side[0]}..{side[1]})")
    return dataclasses.replace(config, min_timestep=new_lo, max_timestep=new_hi, preserve_distribution_shape=True)


def _sigma_edge(config: TimestepConfig, boundary: float) -> int:
    """The first schedule timestep k (1..1000) whose t, computed as `sample_timesteps` does (k/1000 shifted, float32),
    is high-noise (k = 1000 always is: any shift leaves t = 1, and the boundary is below 1)."""
    k = torch.arange(1, TIMESTEPS + 1, dtype=torch.float64)
    model_t = shift_sigma(k / 1000.0, config.discrete_flow_shift).to(torch.float32) * 1000.0
    return int((model_t >= boundary * TIMESTEPS).nonzero()[0]) + 1


def _whole(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


# ---------------------------------------------------------------------------------------------------------------
# Both experts: the per-batch choice
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ExpertChoice:
    expert: str                      # the expert that runs the batch
    draws: list[TimestepSample]      # one per sample, in order
    constrained: bool                # False: a sample never fell on the expert's side (unconstrained draws)


def choose_expert(sampler: TimestepSampler, batch_size: int, latent_shape, generator: torch.Generator | None,
                  boundary: float, max_tries: int = MAX_TRIES) -> ExpertChoice:
    """Musubi Tuner's choice (module docstring), every draw from `sampler` with `generator` in this order: the
    deciding draw, then each sample's tries (every sample is tried even after one failed), then the fallback."""
    expert = side_of(sampler.sample(1, latent_shape, generator).model_t[0], boundary)
    draws, missed = [], 0
    for _ in range(batch_size):
        for _ in range(max_tries):
            d = sampler.sample(1, latent_shape, generator)
            if side_of(d.model_t[0], boundary) == expert:
                draws.append(d)
                break
        else:
            missed += 1
    if not missed:
        return ExpertChoice(expert, draws, True)
    warnings.warn(f"{missed} of {batch_size} samples found no timestep on the {NAMES[expert]}'s side of the "
                  f"boundary {boundary} in {max_tries} draws: this batch uses unconstrained timesteps")
    return ExpertChoice(expert, [sampler.sample(1, latent_shape, generator) for _ in range(batch_size)], False)


# ---------------------------------------------------------------------------------------------------------------
# Both experts: the session's pair
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class TimestepExperts:
    """A second expert for `TrainingSession`: the session's `model` is the low-noise expert, `high` the high-noise
    one (Musubi Tuner: `--dit` and `--dit_high_noise`)."""
    high: nn.Module
    boundary: float                        # 0 < b < 1, or a timestep 1 < b < 1000
    layout: str = "separate"               # one of LAYOUTS
    mode: str = "both"                     # one of MODES
    device: torch.device | str | None = None   # where the experts run; None: where they are (no placement)
    residency: Residency | None = None     # the host's; None: a private one
    options: dict[str, RunOptions] | None = None   # HIGH / LOW -> the expert's run options (block swap); None: none

    def plain(self) -> dict:
        """What a saved state records (and a resume must match)."""
        return {"boundary": normalize_boundary(self.boundary), "layout": self.layout}


def _describe(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "variant", None) or type(model).__name__
    where = getattr(model, "source_path", None)
    return f"{name} from {Path(where).name}" if where else name


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def check_experts(low: nn.Module, spec: TimestepExperts) -> None:
    """Refuse a pair that cannot train, before any heavy work: a wrong layout/mode/boundary, one module twice, or
    experts of different architectures (names and shapes of every parameter must match, so a LoRA fits both)."""
    if not isinstance(spec, TimestepExperts):
        raise invalid("experts", type(spec).__name__, "a TimestepExperts (the high-noise expert and the boundary)")
    if spec.layout not in LAYOUTS:
        raise invalid("expert LoRA layout", spec.layout, f"one of {LAYOUTS}")
    if spec.mode not in MODES:
        raise invalid("expert memory mode", spec.mode, f"one of {MODES}")
    normalize_boundary(spec.boundary)
    if not isinstance(spec.high, nn.Module):
        raise invalid(NAMES[HIGH], type(spec.high).__name__, "a DiT module")
    if spec.high is low:
        raise invalid(NAMES[HIGH], _describe(spec.high), f"a model other than the {NAMES[LOW]} (two files)")
    a, b = _shapes(low), _shapes(spec.high)
    if type(low) is not type(spec.high) or a != b:
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise invalid(NAMES[HIGH], _describe(spec.high),
                      f"the architecture of the {NAMES[LOW]} {_describe(low)}: two experts of one release "
                      f"(they differ in {', '.join(differ[:3]) or type(spec.high).__name__})")


def tie_parameters(dst: AdapterNetwork, src: AdapterNetwork) -> None:
    """Make every adapter parameter of `dst` the very tensor of `src`'s same-named adapter (shared layout)."""
    theirs = src.adapters()
    for name, adapter in dst.adapters().items():
        source = dict(theirs[name].named_modules())
        for owner, module in adapter.named_modules():
            for leaf, _ in list(module.named_parameters(recurse=False)):
                setattr(module, leaf, getattr(source[owner], leaf))


class ExpertNetworks(nn.Module):
    """The session's adapters for a pair: `high` on the high-noise expert, `low` on the low-noise one (in the shared
    layout their parameters are the same tensors: `parameters()` lists each once)."""

    def __init__(self, high: AdapterNetwork, low: AdapterNetwork, shared: bool, models: dict[str, nn.Module]):
        super().__init__()
        self.high, self.low = high, low
        self.shared = shared
        object.__setattr__(self, "_models", dict(models))   # plain attribute: the experts are not adapter state

    def networks(self) -> dict[str, AdapterNetwork]:
        return {HIGH: self.high, LOW: self.low}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def is_attached(self) -> bool:
        return self.high.is_attached and self.low.is_attached

    def attach(self, model: nn.Module | None = None) -> "ExpertNetworks":
        """Each network back on its own expert (`model`, a host's single-model call, is the low-noise one)."""
        if model is not None and model is not self._models[LOW]:
            raise invalid("model", type(model).__name__, f"the {NAMES[LOW]} these adapters were made for")
        for expert, net in self.networks().items():
            net.attach(self._models[expert])
        return self

    def detach(self) -> None:
        self.high.detach()
        self.low.detach()


class ExpertPair:
    """The two experts of a session: their networks, the per-batch choice, placement with the least traffic, the
    saved files. `events`: ("place" | "park", expert) moves and ("run", expert) per micro-batch."""

    def __init__(self, low: nn.Module, spec: TimestepExperts):
        check_experts(low, spec)
        self.spec = spec
        self.models = {HIGH: spec.high, LOW: low}
        self.boundary = normalize_boundary(spec.boundary)
        self.layout, self.mode = spec.layout, spec.mode
        self.device = torch.device(spec.device) if spec.device is not None else None
        self.residency = spec.residency if spec.residency is not None else Residency()
        self.options: dict[str, RunOptions] = dict(spec.options or {})   # a host may update them between calls
        self.active: str | None = None        # the expert of the last batch
        self.switches = 0                     # batches whose expert differs from the previous batch's
        self.placed: set[str] = set()         # experts this pair has placed and not parked since
        self.networks: ExpertNetworks | None = None
        self._stale = True                    # placement not known (yet): the first batch sets it
        self.events: list[tuple] = []

    # --- networks ---------------------------------------------------------------------------------------------
    def create_networks(self, config: AdapterConfig, name: str) -> ExpertNetworks:
        low = AdapterNetwork.create(self.models[LOW], config, name=name)
        high = AdapterNetwork.create(self.models[HIGH], config, name=name)
        if self.layout == "shared":
            tie_parameters(high, low)
        self.networks = ExpertNetworks(high, low, self.layout == "shared", self.models)
        return self.networks

    # --- per batch --------------------------------------------------------------------------------------------
    def choose(self, sampler: TimestepSampler, batch_size: int, latent_shape, generator) -> ExpertChoice:
        return choose_expert(sampler, batch_size, latent_shape, generator, self.boundary)

    def activate(self, expert: str) -> nn.Module:
        """The expert's module, ready for its batch. With a device: "both" places both once; "offload" parks the
        other expert and places this one, only when the expert changes (or after `placement_unknown`)."""
        if self.active is not None and expert != self.active:
            self.switches += 1
        self.active = expert
        stale, self._stale = self._stale, False
        if self.device is not None:
            if self.mode == "offload":
                for other in EXPERTS:
                    if other != expert and (stale or other in self.placed):
                        self.residency.park(self.models[other])
                        self.placed.discard(other)
                        self.events.append(("park", other))
            for name in (EXPERTS if self.mode == "both" else (expert,)):
                if stale or name not in self.placed:
                    opts = self.options.get(name, RunOptions())
                    self.residency.place(self.models[name], self.device, opts.blocks_to_swap,
                                         opts.offload_non_blocks, training=True)
                    if self.networks is not None:   # adapters follow their expert (they stay there when it parks)
                        with torch.inference_mode(False):
                            self.networks.networks()[name].to(self.device)
                    self.placed.add(name)
                    self.events.append(("place", name))
        self.events.append(("run", expert))
        return self.models[expert]

    def placement_unknown(self) -> None:
        """Something else placed or parked the experts (a validation sample, a new session on them): the next batch
        parks the other expert ("offload") and places its own again (moving what is already there costs nothing)."""
        self._stale = True

    # --- sampling, saving, state ------------------------------------------------------------------------------
    def handles(self) -> dict[str, ModelHandle]:
        """Each expert with its run options (what a sampler places it with), less the attention kernel: the
        module's, which the training chose (a loader's kernel may have no backward pass)."""
        return {e: ModelHandle(m, getattr(type(m), "family", None),
                               dataclasses.replace(self.options.get(e, RunOptions()), attention=None))
                for e, m in self.models.items()}

    def sampling_target(self, family, device=True):
        """What the family's `sample` takes for both experts (its `expert_pair` of handles), placed as in training
        (`device=False`: no device nor residency, for a host that places them itself)."""
        make = getattr(family, "expert_pair", None)
        if make is None:
            raise invalid("sampling with two experts", family.display_name, "a family that samples expert pairs")
        h = self.handles()
        return make(high=h[HIGH], low=h[LOW], boundary=self.boundary, mode=self.mode,
                    device=self.device if device else None, residency=self.residency if device else None)

    def lora_files(self, networks: ExpertNetworks, name: str, path: Path | None, folder: Path, step, epoch,
                   lora_path) -> list[tuple[Path, AdapterNetwork, dict, nn.Module]]:
        """(file, network, metadata entries, model) per file to write: `<name>_high_noise` / `<name>_low_noise`
        (or `<file stem>_high_noise.safetensors` for an explicit path, or `path[HIGH]` / `path[LOW]` for a dict of
        both); the shared layout writes one file (a dict's LOW path)."""
        meta = {"ss_timestep_boundary": self.boundary}
        if isinstance(path, dict):
            if set(path) != set(EXPERTS):
                raise invalid("LoRA paths", sorted(path), f"one path per expert {EXPERTS}")
            path = {e: Path(p) for e, p in path.items()}
        if self.layout == "shared":
            where = path[LOW] if isinstance(path, dict) else path
            where = where if where is not None else lora_path(folder, name, step, epoch)
            return [(where, networks.low, {**meta, "ss_timestep_expert": "both"}, self.models[LOW])]
        out = []
        for expert in EXPERTS:
            if isinstance(path, dict):
                where = path[expert]
            else:
                where = (path.with_name(path.stem + SUFFIX[expert] + path.suffix) if path is not None
                         else lora_path(folder, name + SUFFIX[expert], step, epoch))
            out.append((where, networks.networks()[expert], {**meta, "ss_timestep_expert": f"{expert}_noise"},
                        self.models[expert]))
        return out

    def file_names(self, name: str) -> list[str]:
        """The output names periodic saves are pruned under."""
        return [name] if self.layout == "shared" else [name + SUFFIX[e] for e in EXPERTS]

    def state_dict(self) -> dict:
        return {"active": self.active, "switches": self.switches}

    def load_state_dict(self, state: dict) -> None:
        self.active = state.get("active")
        self.switches = int(state.get("switches", 0))
        self.placement_unknown()


__all__ = ["HIGH", "LOW", "EXPERTS", "LAYOUTS", "MODES", "TimestepExperts", "ExpertPair", "ExpertNetworks",
           "ExpertChoice", "choose_expert", "expert_timesteps", "normalize_boundary", "side_of", "check_experts"]
