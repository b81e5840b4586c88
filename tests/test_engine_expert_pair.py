"""The generic two-expert training pieces of engine/training/experts.py, one by one (the sessions that use them are
tested in test_engine_wan22_training.py): the boundary's forms, each side's timestep range against a brute-force
walk of the schedule, every refusal's whole message, which expert `ExpertPair.activate` places or parks with which
options, the handles and sampling target it gives a family, the file names and metadata of each LoRA layout, and
its saved state."""

import copy
import math
import re
from pathlib import Path

import pytest
import torch

from engine.errors import MusubiInputError
from engine.handle import RunOptions
from engine.lora.adapters import AdapterConfig, attached_networks
from engine.memory.residency import Residency
from engine.training import TimestepConfig
from engine.training.experts import (HIGH, LOW, ExpertPair, TimestepExperts, check_experts, choose_expert,
                                     expert_timesteps, normalize_boundary)
from engine.training.timesteps import TimestepSample, shift_sigma
from test_engine_wan22_training import experts, files  # noqa: F401  (files: the presets fixture)


def refused(message: str):
    """The whole refusal message, not only its start."""
    return pytest.raises(MusubiInputError, match="^" + re.escape(message) + "$")


# ---------------------------------------------------------------------------------------------------------------
# The boundary and each side's timesteps
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [(0.875, 0.875), (875, 0.875), (1e-9, 1e-9), (0.999, 0.999),
                                             (1.5, 0.0015), (999, 0.999), (500, 0.5)])
def test_boundary_as_a_fraction_or_a_timestep(given, expected):
    got = normalize_boundary(given)
    assert got == pytest.approx(expected, rel=1e-12) and type(got) is float


@pytest.mark.parametrize("given", [0, 0.0, 1, 1.0, 1000, 1000.0, -0.5, 2000, float("nan"), float("inf"), True,
                                   "0.5", None])
def test_boundary_out_of_range_is_refused_whole(given):
    with refused(f"boundary: got {given!r}; expected a fraction 0 < b < 1 (e.g. 0.875) or a timestep 1 < b < 1000 "
                 "(875)"):
        normalize_boundary(given)


@pytest.mark.parametrize("mode", ["uniform", "shift", "logsnr"])
@pytest.mark.parametrize("boundary, cut", [(0.875, 875), (0.7 + 0.1, 800), (0.8755, 875.5)])
def test_continuous_sides_meet_at_the_boundary(mode, boundary, cut):
    """The cut is the boundary in timesteps, a whole number when it is one up to float rounding (0.7 + 0.1)."""
    cfg = TimestepConfig(mode)
    high, low = expert_timesteps(cfg, HIGH, boundary), expert_timesteps(cfg, LOW, boundary)
    assert high.bounds() == (cut, 1000) and low.bounds() == (0, cut)
    assert type(high.min_timestep) is type(cut) and type(low.max_timestep) is type(cut)
    assert high.preserve_distribution_shape and low.preserve_distribution_shape
    assert (high.timestep_sampling, high.discrete_flow_shift) == (mode, cfg.discrete_flow_shift)
    assert not cfg.preserve_distribution_shape and cfg.bounds() == (0, 1000)      # the given config is unchanged


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 12.0])
@pytest.mark.parametrize("boundary", [0.001, 0.5, 0.875, 0.9, 0.999])
def test_sigma_sides_split_the_shifted_schedule_where_a_walk_of_it_does(shift, boundary):
    """`sigma` draws schedule timesteps k in lo+1..hi, shifted after: high gets every k whose shifted timestep (as
    `sample_timesteps` computes it, in float32) is >= 1000·boundary, low every other one."""
    first_high = next(k for k in range(1, 1001)
                      if float(shift_sigma(torch.tensor(k / 1000.0, dtype=torch.float64), shift).float() * 1000.0)
                      >= boundary * 1000)
    cfg = TimestepConfig("sigma", discrete_flow_shift=shift)
    assert expert_timesteps(cfg, HIGH, boundary).bounds() == (first_high - 1, 1000)
    if first_high > 1:
        assert expert_timesteps(cfg, LOW, boundary).bounds() == (0, first_high - 1)
    else:                                   # no schedule timestep is low-noise
        with refused(f"min_timestep/max_timestep: got (0, 1000); expected a range reaching the low-noise expert's "
                     f"side of the boundary {boundary} (timesteps 0..0)"):
            expert_timesteps(cfg, LOW, boundary)


def test_a_side_outside_the_users_range_is_refused_whole():
    with refused("min_timestep/max_timestep: got (0, 500); expected a range reaching the high-noise expert's side "
                 "of the boundary 0.875 (timesteps 875..1000)"):
        expert_timesteps(TimestepConfig("shift", max_timestep=500), HIGH, 875)
    with refused("min_timestep/max_timestep: got (875, 1000); expected a range reaching the low-noise expert's side "
                 "of the boundary 0.875 (timesteps 0..875)"):
        expert_timesteps(TimestepConfig("shift", min_timestep=875), LOW, 0.875)
    with refused("expert: got 'middle'; expected one of ('high', 'low')"):
        expert_timesteps(TimestepConfig("shift"), "middle", 0.875)


class ScriptedSampler:
    """Hands out the given model timesteps (0..1000) one draw at a time."""

    def __init__(self, model_ts):
        self.left = list(model_ts)

    def sample(self, n, latent_shape, generator):
        t = torch.tensor([self.left.pop(0) for _ in range(n)])
        return TimestepSample(t / 1000, t, None)


def test_every_sample_that_misses_its_side_is_counted_and_the_batch_falls_back():
    # decided low (500 < 875); each of the 3 samples misses twice; then 3 unconstrained draws
    sampler = ScriptedSampler([500] + [900] * 6 + [100, 950, 300])
    with pytest.warns(UserWarning) as caught:
        choice = choose_expert(sampler, 3, (1,), None, 0.875, max_tries=2)
    assert [str(w.message) for w in caught] == [
        "3 of 3 samples found no timestep on the low-noise expert's side of the boundary 0.875 in 2 draws: this batch "
        "uses unconstrained timesteps"]
    assert choice.expert == LOW and choice.constrained is False and sampler.left == []
    assert [float(d.model_t[0]) for d in choice.draws] == [100, 950, 300]
    choice = choose_expert(ScriptedSampler([900, 950, 100, 875]), 2, (1,), None, 0.875, max_tries=2)
    assert choice.expert == HIGH and choice.constrained is True
    assert [float(d.model_t[0]) for d in choice.draws] == [950, 875]


# ---------------------------------------------------------------------------------------------------------------
# Refusals of a pair
# ---------------------------------------------------------------------------------------------------------------

def test_pair_refusals_name_what_was_given_and_what_was_expected(files):
    m = experts(files)
    low, high = m[LOW], m[HIGH]
    with refused("experts: got 'dict'; expected a TimestepExperts (the high-noise expert and the boundary)"):
        check_experts(low, {"high": high})
    with refused("expert LoRA layout: got 'merged'; expected one of ('separate', 'shared')"):
        check_experts(low, TimestepExperts(high, 0.5, layout="merged"))
    with refused("expert memory mode: got 'lazy'; expected one of ('both', 'offload')"):
        check_experts(low, TimestepExperts(high, 0.5, mode="lazy"))
    with refused("high-noise expert: got 'str'; expected a DiT module"):
        check_experts(low, TimestepExperts("high.safetensors", 0.5))
    with refused("high-noise expert: got 'tiny-t2v from low_noise.safetensors'; expected a model other than the "
                 "low-noise expert (two files)"):
        check_experts(low, TimestepExperts(low, 0.5))
    with refused("boundary: got 1000; expected a fraction 0 < b < 1 (e.g. 0.875) or a timestep 1 < b < 1000 (875)"):
        check_experts(low, TimestepExperts(high, 1000))
    check_experts(low, TimestepExperts(high, 0.5))     # a good pair passes


def test_experts_of_two_architectures_are_refused_with_the_first_differences(files):
    m = experts(files)
    low, high = m[LOW], m[HIGH]
    i2v = experts({"low": files["i2v"], "high": files["i2v"]})[LOW]
    differ = sorted(k for k, p in i2v.named_parameters()
                    if dict(low.named_parameters()).get(k) is None or dict(low.named_parameters())[k].shape != p.shape)
    assert len(differ) > 3          # the message lists the first three, sorted
    with refused(f"high-noise expert: got 'tiny-i2v from i2v.safetensors'; expected the architecture of the "
                 f"low-noise expert tiny-t2v from low_noise.safetensors: two experts of one release (they differ in "
                 f"{', '.join(differ[:3])})"):
        check_experts(low, TimestepExperts(i2v, 0.5))

    # a module with no config nor file, of another class: named by its class
    linear = torch.nn.Linear(2, 2)
    differ = sorted(set(dict(low.named_parameters())) | {"bias", "weight"})
    with refused(f"high-noise expert: got 'Linear'; expected the architecture of the low-noise expert tiny-t2v from "
                 f"low_noise.safetensors: two experts of one release (they differ in {', '.join(differ[:3])})"):
        check_experts(low, TimestepExperts(linear, 0.5))

    # the same shapes in a module of another class: named by its class
    other = copy.deepcopy(high)
    other.__class__ = type("OtherDiT", (type(high),), {})
    other.config = None
    other.source_path = None
    with refused("high-noise expert: got 'OtherDiT'; expected the architecture of the low-noise expert tiny-t2v "
                 "from low_noise.safetensors: two experts of one release (they differ in OtherDiT)"):
        check_experts(low, TimestepExperts(other, 0.5))


# ---------------------------------------------------------------------------------------------------------------
# Placement: which expert is placed or parked, when, with which options
# ---------------------------------------------------------------------------------------------------------------

class RecordingResidency(Residency):
    """A Residency that records its calls instead of moving anything."""

    def __init__(self, names):
        super().__init__()
        self.names, self.calls = names, []

    def place(self, module, device, blocks_to_swap=0, offload_non_blocks=False, training=False):
        self.calls.append(("place", self.names[id(module)], device, blocks_to_swap, offload_non_blocks, training))
        return device

    def park(self, module, pin_memory=True):
        self.calls.append(("park", self.names[id(module)]))


def pair_of(m, **kw) -> tuple[ExpertPair, RecordingResidency]:
    res = RecordingResidency({id(m[HIGH]): HIGH, id(m[LOW]): LOW})
    return ExpertPair(m[LOW], TimestepExperts(m[HIGH], 0.5, residency=res, **kw)), res


def test_offload_places_the_running_expert_and_parks_the_other_only_on_a_switch(files):
    m = experts(files)
    cpu = torch.device("cpu")
    options = {HIGH: RunOptions(blocks_to_swap=2, offload_non_blocks=True)}     # LOW: none given -> RunOptions()
    pair, res = pair_of(m, mode="offload", device="cpu", options=options)
    placed_high = ("place", HIGH, cpu, 2, True, True)
    placed_low = ("place", LOW, cpu, 0, False, True)

    assert pair.activate(HIGH) is m[HIGH]
    assert res.calls == [("park", LOW), placed_high]     # first batch: where the other one is is not known
    assert (pair.active, pair.switches, pair.placed) == (HIGH, 0, {HIGH})
    res.calls.clear()
    assert pair.activate(HIGH) is m[HIGH] and res.calls == []
    assert pair.activate(LOW) is m[LOW]
    assert res.calls == [("park", HIGH), placed_low] and (pair.switches, pair.placed) == (1, {LOW})
    res.calls.clear()
    pair.activate(HIGH)
    assert res.calls == [("park", LOW), placed_high] and pair.switches == 2
    res.calls.clear()
    pair.placement_unknown()                              # a validation sample moved them: both again
    pair.activate(HIGH)
    assert res.calls == [("park", LOW), placed_high] and pair.switches == 2
    assert pair.events == [("park", LOW), ("place", HIGH), ("run", HIGH), ("run", HIGH),
                           ("park", HIGH), ("place", LOW), ("run", LOW),
                           ("park", LOW), ("place", HIGH), ("run", HIGH),
                           ("park", LOW), ("place", HIGH), ("run", HIGH)]


def test_both_places_each_expert_once_and_again_after_placement_is_unknown(files):
    m = experts(files)
    cpu = torch.device("cpu")
    pair, res = pair_of(m, mode="both", device="cpu", options={LOW: RunOptions(blocks_to_swap=1)})
    both = [("place", HIGH, cpu, 0, False, True), ("place", LOW, cpu, 1, False, True)]
    pair.activate(LOW)
    assert res.calls == both and pair.placed == {HIGH, LOW}
    pair.activate(HIGH)
    pair.activate(LOW)
    assert res.calls == both and pair.switches == 2
    pair.placement_unknown()
    pair.activate(LOW)
    assert res.calls == both + both
    assert [e for e in pair.events if e[0] == "run"] == [("run", LOW), ("run", HIGH), ("run", LOW), ("run", LOW)]


def test_without_a_device_nothing_moves(files):
    m = experts(files)
    for mode in ("both", "offload"):
        pair, res = pair_of(m, mode=mode)
        assert pair.device is None
        pair.activate(HIGH)
        pair.activate(LOW)
        assert res.calls == [] and pair.events == [("run", HIGH), ("run", LOW)] and pair.switches == 1


def test_the_networks_follow_their_expert_onto_the_device(files, monkeypatch):
    m = experts(files)
    pair, _ = pair_of(m, mode="offload", device="cpu")
    nets = pair.create_networks(AdapterConfig(rank=4, alpha=4), "default")
    moved = []
    for expert, net in nets.networks().items():
        monkeypatch.setattr(net, "to", lambda device, expert=expert: moved.append((expert, device,
                                                                                   torch.is_inference_mode_enabled())))
    with torch.inference_mode():            # as ComfyUI runs a prompt: the adapters must stay trainable
        pair.activate(HIGH)
        pair.activate(HIGH)
        pair.activate(LOW)
    assert moved == [(HIGH, torch.device("cpu"), False), (LOW, torch.device("cpu"), False)]


def test_a_new_pair_copies_its_options_and_makes_its_own_residency(files):
    m = experts(files)
    options = {HIGH: RunOptions(blocks_to_swap=1)}
    spec = TimestepExperts(m[HIGH], 875, options=options, device="cpu")
    pair = ExpertPair(m[LOW], spec)
    options[LOW] = RunOptions(blocks_to_swap=3)
    assert pair.options == {HIGH: RunOptions(blocks_to_swap=1)}
    assert isinstance(pair.residency, Residency) and pair.device == torch.device("cpu")
    assert (pair.boundary, pair.layout, pair.mode, pair.active, pair.switches, pair.networks) == \
        (0.875, "separate", "both", None, 0, None)
    assert spec.plain() == {"boundary": 0.875, "layout": "separate"}
    assert ExpertPair(m[LOW], TimestepExperts(m[HIGH], 0.5)).options == {}


# ---------------------------------------------------------------------------------------------------------------
# Networks, handles, sampling target
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_networks_of_each_layout(files, layout):
    m = experts(files)
    pair, _ = pair_of(m, layout=layout)
    nets = pair.create_networks(AdapterConfig(rank=4, alpha=4), "mine")
    assert pair.networks is nets and nets.shared == (layout == "shared") and nets.is_attached
    assert attached_networks(m[HIGH])["mine"] is nets.high and attached_networks(m[LOW])["mine"] is nets.low
    low = nets.low.trainable_parameters()
    params = nets.trainable_parameters()
    assert len(params) == (len(low) if layout == "shared" else 2 * len(low))
    same = [a is b for a, b in zip(nets.high.trainable_parameters(), low)]
    assert all(same) if layout == "shared" else not any(same)

    nets.detach()
    assert not nets.is_attached and not attached_networks(m[HIGH]) and not attached_networks(m[LOW])
    assert nets.attach(m[LOW]) is nets and nets.is_attached
    assert attached_networks(m[HIGH])["mine"] is nets.high       # each on its own expert, not both on the model
    nets.detach()
    assert nets.attach() is nets and attached_networks(m[LOW])["mine"] is nets.low
    with refused(f"model: got '{type(m[HIGH]).__name__}'; expected the low-noise expert these adapters were made "
                 "for"):
        nets.attach(m[HIGH])


def test_handles_keep_each_experts_options_but_the_attention_kernel(files):
    m = experts(files)
    opts = RunOptions(attention="sage", blocks_to_swap=2, offload_non_blocks=True, compile=True)
    pair, _ = pair_of(m, options={HIGH: opts})
    h = pair.handles()
    assert set(h) == {HIGH, LOW} and h[HIGH].module is m[HIGH] and h[LOW].module is m[LOW]
    assert h[HIGH].family == h[LOW].family == type(m[LOW]).family
    assert h[HIGH].options == RunOptions(attention=None, blocks_to_swap=2, offload_non_blocks=True, compile=True)
    assert h[LOW].options == RunOptions()


def test_a_module_of_no_family_gets_handles_of_no_family():
    pair = ExpertPair(torch.nn.Linear(2, 2), TimestepExperts(torch.nn.Linear(2, 2), 0.5))
    assert {e: h.family for e, h in pair.handles().items()} == {HIGH: None, LOW: None}


class PairFamily:
    display_name = "Pairs"

    def expert_pair(self, **kw):
        return kw


def test_sampling_target_gives_the_family_both_handles_placed_as_in_training(files):
    m = experts(files)
    pair, res = pair_of(m, mode="offload", device="cpu")
    got = pair.sampling_target(PairFamily())
    assert set(got) == {"high", "low", "boundary", "mode", "device", "residency"}
    assert got["high"].module is m[HIGH] and got["low"].module is m[LOW]
    assert (got["boundary"], got["mode"], got["device"], got["residency"]) == (0.5, "offload", torch.device("cpu"),
                                                                               res)
    got = pair.sampling_target(PairFamily(), device=False)
    assert (got["device"], got["residency"]) == (None, None)

    class Single:
        display_name = "Singles"
    with refused("sampling with two experts: got 'Singles'; expected a family that samples expert pairs"):
        pair.sampling_target(Single())


# ---------------------------------------------------------------------------------------------------------------
# Files and state
# ---------------------------------------------------------------------------------------------------------------

def lora_path(folder, name, step, epoch):
    return Path(folder) / f"{name}-{step}-{epoch}.safetensors"


def test_separate_layout_writes_one_file_per_expert(files, tmp_path):
    m = experts(files)
    pair, _ = pair_of(m)
    nets = pair.create_networks(AdapterConfig(rank=4, alpha=4), "default")
    meta = {HIGH: {"ss_timestep_boundary": 0.5, "ss_timestep_expert": "high_noise"},
            LOW: {"ss_timestep_boundary": 0.5, "ss_timestep_expert": "low_noise"}}

    def expect(paths):
        return [(paths[e], nets.networks()[e], meta[e], m[e]) for e in (HIGH, LOW)]
    got = pair.lora_files(nets, "run", None, tmp_path, 7, 2, lora_path)
    assert got == expect({HIGH: tmp_path / "run_high_noise-7-2.safetensors",
                          LOW: tmp_path / "run_low_noise-7-2.safetensors"})
    got = pair.lora_files(nets, "run", tmp_path / "my.lora.safetensors", tmp_path, 7, 2, lora_path)
    assert got == expect({HIGH: tmp_path / "my.lora_high_noise.safetensors",
                          LOW: tmp_path / "my.lora_low_noise.safetensors"})
    given = {HIGH: str(tmp_path / "a.safetensors"), LOW: tmp_path / "b.safetensors"}
    got = pair.lora_files(nets, "run", given, tmp_path, 7, 2, lora_path)
    assert got == expect({HIGH: tmp_path / "a.safetensors", LOW: tmp_path / "b.safetensors"})
    assert all(isinstance(f[0], Path) for f in got)
    with refused("LoRA paths: got ['high', 'other']; expected one path per expert ('high', 'low')"):
        pair.lora_files(nets, "run", {HIGH: "a", "other": "b"}, tmp_path, 7, 2, lora_path)
    assert pair.file_names("run") == ["run_high_noise", "run_low_noise"]


def test_shared_layout_writes_one_file(files, tmp_path):
    m = experts(files)
    pair, _ = pair_of(m, layout="shared")
    nets = pair.create_networks(AdapterConfig(rank=4, alpha=4), "default")
    meta = {"ss_timestep_boundary": 0.5, "ss_timestep_expert": "both"}
    assert pair.lora_files(nets, "run", None, tmp_path, 3, 1, lora_path) == \
        [(tmp_path / "run-3-1.safetensors", nets.low, meta, m[LOW])]
    assert pair.lora_files(nets, "run", tmp_path / "x.safetensors", tmp_path, 3, 1, lora_path) == \
        [(tmp_path / "x.safetensors", nets.low, meta, m[LOW])]
    assert pair.lora_files(nets, "run", {HIGH: "h.safetensors", LOW: "l.safetensors"}, tmp_path, 3, 1,
                           lora_path) == [(Path("l.safetensors"), nets.low, meta, m[LOW])]
    assert pair.file_names("run") == ["run"]


def test_state_round_trip_and_defaults(files):
    m = experts(files)
    pair, res = pair_of(m, mode="offload", device="cpu")
    pair.activate(HIGH)
    pair.activate(LOW)
    assert pair.state_dict() == {"active": LOW, "switches": 1}
    fresh, res2 = pair_of(m, mode="offload", device="cpu")
    fresh.activate(LOW)
    res2.calls.clear()
    fresh.load_state_dict({"active": LOW, "switches": "1"})
    assert (fresh.active, fresh.switches) == (LOW, 1) and type(fresh.switches) is int
    fresh.activate(LOW)                    # the same expert, but placement is not known after a resume
    assert res2.calls == [("park", HIGH), ("place", LOW, torch.device("cpu"), 0, False, True)]
    fresh.load_state_dict({})
    assert (fresh.active, fresh.switches) == (None, 0)
    assert math.isclose(fresh.boundary, 0.5)
