"""Wan 2.2 A14B LoRA training with timestep experts (engine/training/experts.py) on two tiny T2V experts of different
seeds: the per-batch expert choice against a hand trace, one-expert timestep ranges, both LoRA layouts learning,
per-expert networks moving only on their batches, parking with the least traffic, exact resume across a switch,
the saved pair read back, validation samples through both experts, refusals before any step."""

import pytest
import torch

from engine.families.wan.experts import WanExperts
from engine.families.wan.loader import load_wan_dit
from engine.families.wan.pipeline import generate
from engine.families.wan.presets import write_preset_checkpoint
from engine.lora.adapters import attached_networks
from engine.lora.dialects import read_lora
from engine.memory.residency import Residency
from engine.training import (EvalConfig, InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig,
                             TimestepSampler, TrainingConfig, TrainingSession, ValidationConfig, ValidationPrompt,
                             sample_timesteps)
from engine.training.experts import HIGH, LOW, TimestepExperts, choose_expert, expert_timesteps, side_of
from test_engine_training_wan import batches

SHAPE = (1, 16, 1, 4, 4)
BOUNDARY = 0.6     # a boundary that gives both experts batches within a few steps of the tiny runs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan22_train")
    return {"low": write_preset_checkpoint("tiny-t2v", d / "low_noise.safetensors", torch.float32, seed=1),
            "high": write_preset_checkpoint("tiny-t2v", d / "high_noise.safetensors", torch.float32, seed=2),
            "i2v": write_preset_checkpoint("tiny-i2v", d / "i2v.safetensors", torch.float32, seed=3)}


def experts(files):
    """Fresh expert modules (each session trains its own)."""
    return {k: load_wan_dit(files[k], dtype=torch.float32).eval() for k in ("low", "high")}


def session(files, out, steps=30, layout="separate", mode="both", resume=None, lr=1e-2, models=None,
            boundary=BOUNDARY, optimizer_args=None, validation=None, evaluation=None, network_weights=None,
            gradient_accumulation_steps=1, **kw):
    m = models or experts(files)
    cfg = TrainingConfig(output_dir=str(out), max_train_steps=steps, mixed_precision="no", seed=1,
                         gradient_checkpointing=True, timesteps=TimestepConfig("shift", discrete_flow_shift=2.0),
                         gradient_accumulation_steps=gradient_accumulation_steps)
    pair = TimestepExperts(m["high"], boundary, layout=layout, mode=mode, **kw)
    return TrainingSession(m["low"], NetworkConfig(rank=8, alpha=8, network_weights=network_weights),
                           OptimizerConfig(learning_rate=lr, optimizer_args=optimizer_args),
                           InMemoryBatchLoader(batches(32), seed=0), cfg, validation=validation, evaluation=evaluation,
                           resume_from=resume, experts=pair)


def train(s, n):
    """(losses, expert per step)."""
    picked = []
    losses = s.train_steps(n, progress=lambda step, total, info: picked.append(info["experts"][0]))
    return losses, picked


def weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# The per-batch choice (Musubi Tuner's algorithm)
# ---------------------------------------------------------------------------------------------------------------

# uniform t drawn one at a time from torch.Generator().manual_seed(7): the stream the traces below walk through
STREAM = [0.2794, 0.2737, 0.8621, 0.6567, 0.9225, 0.8395, 0.2947, 0.5607, 0.763, 0.7594, 0.063]


def stream(n):
    sampler, g = TimestepSampler(TimestepConfig("uniform")), torch.Generator().manual_seed(7)
    return [float(sampler.sample(1, SHAPE, g).t[0]) for _ in range(n)]


@pytest.mark.parametrize("boundary, batch, expert, picked", [
    (0.5, 3, LOW, [1, 6, 10]),    # 0.2794 < 0.5: low; sample 1 skips 0.8621 0.6567 0.9225 0.8395, sample 2 skips 3
    (0.75, 2, LOW, [1, 3]),       # sample 1 skips 0.8621 (>= 0.75), takes 0.6567
    (0.25, 2, HIGH, [1, 2]),      # 0.2794 >= 0.25: high; 0.2737 and 0.8621 are high too
])
def test_expert_choice_follows_the_hand_trace(boundary, batch, expert, picked):
    values = stream(12)
    assert [round(v, 4) for v in values[:11]] == STREAM
    g = torch.Generator().manual_seed(7)
    choice = choose_expert(TimestepSampler(TimestepConfig("uniform")), batch, SHAPE, g, boundary)
    assert choice.expert == expert and choice.constrained
    assert [float(d.t[0]) for d in choice.draws] == [values[i] for i in picked]
    assert float(torch.rand(1, generator=g, dtype=torch.float64)) == pytest.approx(values[picked[-1] + 1])


def test_expert_choice_falls_back_to_unconstrained_draws_with_a_warning():
    """3 tries per sample: sample 1 finds no low t in 0.8621 0.6567 0.9225; sample 2 is still tried (0.8395 no,
    0.2947 yes); then the batch takes the next three draws whatever their side, and the decided expert runs it."""
    values = stream(12)
    g = torch.Generator().manual_seed(7)
    with pytest.warns(UserWarning, match="1 of 3 samples found no timestep on the low-noise expert's side"):
        choice = choose_expert(TimestepSampler(TimestepConfig("uniform")), 3, SHAPE, g, 0.5, max_tries=3)
    assert choice.expert == LOW and not choice.constrained
    assert [float(d.t[0]) for d in choice.draws] == values[7:10]     # 0.5607 0.763 0.7594, all high-noise


def test_session_draws_its_batches_with_the_choice_from_its_generator(files, tmp_path):
    """The session's first batch: the choice made from a generator seeded like the session's, then one noise per
    sample; the expert that runs the batch is the chosen one and its timesteps are the chosen draws."""
    s = session(files, tmp_path, steps=2)
    calls = []
    hooks = [s.pair.models[e].register_forward_pre_hook(
        lambda mod, args, e=e: calls.append((e, args[1].detach().clone()))) for e in (HIGH, LOW)]
    s.train_steps(1)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(1)
    choice = choose_expert(TimestepSampler(TimestepConfig("shift", discrete_flow_shift=2.0)), 1, SHAPE, g, BOUNDARY)
    (expert, t), = calls
    assert expert == choice.expert and torch.equal(t, choice.draws[0].model_t)
    assert side_of(t[0], BOUNDARY) == expert


def test_training_side_is_the_sampler_phase():
    """A timestep trains the expert that samples it (one rule): the boundary timestep itself is high-noise."""
    from engine.families.wan.experts import expert_plan

    for b in (0.875, 0.9, 0.6):
        edge = b * 1000
        ts = torch.tensor([edge - 1e-3, edge, edge + 1e-3, 0.0, 1000.0], dtype=torch.float64)
        sampled = [expert for expert, _ in expert_plan(ts, b)]
        assert sampled == [side_of(t, b) for t in ts.tolist()] == [LOW, HIGH, HIGH, LOW, HIGH]
    assert side_of(875.0, 0.875) == HIGH and side_of(874.99, 0.875) == LOW


# ---------------------------------------------------------------------------------------------------------------
# One expert: its side of the boundary, the distribution's shape kept
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["uniform", "shift", "sigmoid"])
def test_expert_timesteps_keep_the_shape_on_each_side(mode):
    cfg = TimestepConfig(mode, discrete_flow_shift=3.0)
    g = torch.Generator().manual_seed(0)
    free = sample_timesteps(cfg, 20000, SHAPE, g).t
    for expert, keep in ((HIGH, free >= 0.875), (LOW, free <= 0.875)):
        side = expert_timesteps(cfg, expert, 0.875)
        assert side.preserve_distribution_shape and side.bounds() == ((875, 1000) if expert == HIGH else (0, 875))
        t = sample_timesteps(side, 20000, SHAPE, torch.Generator().manual_seed(1)).t
        assert ((t >= 0.875) if expert == HIGH else (t <= 0.875)).all()
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
        # the restricted draws have the unconstrained distribution's shape on that side (same quantiles)
        assert torch.allclose(torch.quantile(t, q), torch.quantile(free[keep], q), atol=0.01)


def test_expert_timesteps_sigma_bounds_the_shifted_schedule():
    """`sigma`: schedule timesteps k (then shifted): the bounds are where the shifted t crosses the boundary, so
    every draw is on the expert's side and the timesteps next to the edge on both sides are reachable."""
    for shift in (1.0, 3.0):
        cfg = TimestepConfig("sigma", discrete_flow_shift=shift)
        high, low = expert_timesteps(cfg, HIGH, 0.9), expert_timesteps(cfg, LOW, 900)
        th = sample_timesteps(high, 50000, SHAPE, torch.Generator().manual_seed(0)).model_t
        tl = sample_timesteps(low, 50000, SHAPE, torch.Generator().manual_seed(0)).model_t
        assert (th >= 900).all() and (tl < 900).all()
        assert high.bounds()[0] == low.bounds()[1]    # the two sides meet: no schedule timestep lost
        k = high.bounds()[0]                           # the last low one; k + 1 the first high one
        sigma = lambda j: shift * (j / 1000) / (1 + (shift - 1) * (j / 1000)) * 1000   # noqa: E731
        assert sigma(k) < 900 <= sigma(k + 1) + 1e-3
        if shift == 1.0:
            assert (k, th.min().item(), tl.max().item()) == (899, 900.0, 899.0)


def test_expert_timesteps_intersect_the_user_range_and_refuse_an_empty_one(raises_input):
    cfg = TimestepConfig("shift", min_timestep=100, max_timestep=950)
    assert expert_timesteps(cfg, HIGH, 0.875).bounds() == (875, 950)
    assert expert_timesteps(cfg, LOW, 875).bounds() == (100, 875)
    with raises_input("min_timestep/max_timestep", (0, 500), "a range reaching the high-noise expert's side"):
        expert_timesteps(TimestepConfig("shift", max_timestep=500), HIGH, 0.875)
    with raises_input("expert", "middle", "one of ('high', 'low')"):
        expert_timesteps(cfg, "middle", 0.875)
    with raises_input("boundary", 1, "a fraction 0 < b < 1"):
        expert_timesteps(cfg, HIGH, 1)


def test_one_expert_training_learns_on_its_side_only(files, tmp_path):
    m = experts(files)
    ts = expert_timesteps(TimestepConfig("shift", discrete_flow_shift=2.0), HIGH, 0.875)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_train_steps=24, mixed_precision="no", seed=1, timesteps=ts)
    s = TrainingSession(m["high"], NetworkConfig(rank=8, alpha=8), OptimizerConfig(learning_rate=1e-2),
                        InMemoryBatchLoader(batches(32), seed=0), cfg)
    seen = []
    losses = s.train_steps(24, progress=lambda step, total, info: seen.extend(info["timesteps"]))
    assert min(seen) >= 0.875 and len(seen) == 24
    assert sum(losses[-6:]) < 0.8 * sum(losses[:6]), losses


# ---------------------------------------------------------------------------------------------------------------
# Both experts in one run
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["separate", "shared"])
def test_both_layouts_learn_on_each_expert(files, tmp_path, layout):
    s = session(files, tmp_path, steps=30, layout=layout)
    losses, picked = train(s, 30)
    for e in (HIGH, LOW):
        mine = [loss for loss, p in zip(losses, picked) if p == e]
        assert len(mine) >= 8, picked
        assert sum(mine[-4:]) < 0.8 * sum(mine[:4]), (e, mine)
    assert s.pair.switches == sum(a != b for a, b in zip(picked, picked[1:]))


def test_separate_networks_move_only_on_their_own_batches(files, tmp_path):
    """One AdamW (with weight decay) over both networks: the inactive expert's adapters have no gradient, so the
    optimizer leaves them bit-identical; the active one's change every step."""
    s = session(files, tmp_path, steps=12, optimizer_args={"weight_decay": 0.1})
    nets = s.network.networks()
    assert nets[HIGH].is_attached and nets[LOW].is_attached
    assert set(map(id, s.network.trainable_parameters())) == \
        set(map(id, nets[HIGH].trainable_parameters())) | set(map(id, nets[LOW].trainable_parameters()))
    seen = set()
    for _ in range(12):
        before = {e: weights(n) for e, n in nets.items()}
        _, (expert,) = train(s, 1)
        other = HIGH if expert == LOW else LOW
        seen.add(expert)
        assert same(before[other], weights(nets[other])), f"{other} moved on a {expert} batch"
        changed = weights(nets[expert])
        assert any(not torch.equal(before[expert][k], changed[k]) for k in changed if "lora_up" in k)
    assert seen == {HIGH, LOW}


def test_accumulation_steps_both_networks_when_its_micro_batches_differ(files, tmp_path):
    """Each micro-batch picks its expert; one optimizer step then moves exactly the networks that ran."""
    s = session(files, tmp_path, steps=8, gradient_accumulation_steps=2)
    nets, mixed = s.network.networks(), 0
    for _ in range(8):
        before = {e: weights(n) for e, n in nets.items()}
        info = []
        s.train_steps(1, progress=lambda step, total, i: info.append(i["experts"]))
        (ran,) = info
        assert len(ran) == 2
        mixed += len(set(ran)) == 2
        for e in (HIGH, LOW):
            assert same(before[e], weights(nets[e])) == (e not in ran)
    assert mixed >= 1


def test_network_weights_start_both_experts_and_networks_reattach(files, tmp_path):
    first = session(files, tmp_path / "a", steps=3)
    train(first, 3)
    start = tmp_path / "a" / "lora_low_noise.safetensors"
    m = experts(files)
    s = session(files, tmp_path / "b", steps=2, models=m, network_weights=str(start))
    stored = read_lora(start).modules
    assert any(bool(w.tensors["up"].any()) for w in stored.values())   # trained: not the zero init
    for net in s.network.networks().values():
        for name, a in net.adapters().items():
            assert torch.equal(a.lora_up.weight, stored[name].tensors["up"])
    s.network.detach()
    assert not attached_networks(m["low"]) and not attached_networks(m["high"])
    s.network.attach(m["low"])
    assert attached_networks(m["high"])["training"] is s.network.high
    assert attached_networks(m["low"])["training"] is s.network.low


def test_shared_network_is_one_set_of_tensors_on_both_experts(files, tmp_path):
    s = session(files, tmp_path, steps=4, layout="shared")
    nets = s.network.networks()
    hi, lo = nets[HIGH].adapters(), nets[LOW].adapters()
    assert hi.keys() == lo.keys()
    for name in hi:
        assert hi[name].lora_up.weight is lo[name].lora_up.weight and hi[name].base is not lo[name].base
    assert len(s.network.trainable_parameters()) == len(nets[LOW].trainable_parameters())
    before = weights(nets[LOW])
    _, picked = train(s, 4)
    assert not same(before, weights(nets[LOW])) and same(weights(nets[HIGH]), weights(nets[LOW]))


def test_offload_parks_only_when_the_expert_changes(files, tmp_path, monkeypatch):
    """Every DiT call runs the chosen expert, placed and not parked since; the other one is parked; a batch on the
    same expert as the previous one moves nothing; parks = switches + the first batch's."""
    m = experts(files)
    names = {id(m["high"]): HIGH, id(m["low"]): LOW}
    res, log, on_device = Residency(), [], set()

    def place(module, device, blocks_to_swap=0, offload_non_blocks=False, training=False):
        log.append(("place", names[id(module)]))
        on_device.add(names[id(module)])
        return torch.device(device)

    def park(module, pin_memory=True):
        log.append(("park", names[id(module)]))
        on_device.discard(names[id(module)])
    monkeypatch.setattr(res, "place", place)
    monkeypatch.setattr(res, "park", park)
    runs = []
    for e in (HIGH, LOW):
        m[e].register_forward_pre_hook(lambda mod, args, e=e: runs.append((e, frozenset(on_device))))
    s = session(files, tmp_path, steps=16, mode="offload", device="cpu", residency=res, models=m)
    _, picked = train(s, 16)
    assert [e for e, _ in runs] == picked                       # one DiT call per step, the chosen expert
    assert all(where == {e} for e, where in runs)               # only the running expert is on the device
    switches = sum(a != b for a, b in zip(picked, picked[1:]))
    assert switches >= 3 and s.pair.switches == switches
    assert [x for x in log if x[0] == "park"].__len__() == switches + 1
    assert len(log) == 2 * (switches + 1)
    moves = iter(log[2:])
    for a, b in zip(picked, picked[1:]):   # each switch: park the previous expert, place the next
        if a != b:
            assert (next(moves), next(moves)) == (("park", a), ("place", b))


def test_both_mode_places_each_expert_once(files, tmp_path, monkeypatch):
    m = experts(files)
    res, log = Residency(), []
    monkeypatch.setattr(res, "place", lambda module, device, *a, **k: log.append(("place", id(module))))
    monkeypatch.setattr(res, "park", lambda module, pin_memory=True: log.append(("park", id(module))))
    s = session(files, tmp_path, steps=8, mode="both", device="cpu", residency=res, models=m)
    train(s, 8)
    assert sorted(log) == sorted([("place", id(m["high"])), ("place", id(m["low"]))])


def test_resume_across_a_switch_is_exact(files, tmp_path):
    full = session(files, tmp_path / "full", steps=12, mode="offload", device="cpu")
    losses, picked = train(full, 12)
    k = next(i for i in range(3, 12) if picked[i] != picked[i - 1])   # the step after k switches expert
    part = session(files, tmp_path / "run", steps=12, mode="offload", device="cpu")
    assert train(part, k)[1] == picked[:k]
    state = part.save_state()
    torch.manual_seed(1234)   # whatever ran in between must not matter
    resumed = session(files, tmp_path / "run", steps=12, mode="offload", device="cpu", resume=state)
    assert resumed.step == k and resumed.pair.active == picked[k - 1]
    rest, rest_picked = train(resumed, 12 - k)
    assert rest == losses[k:] and rest_picked == picked[k:]
    assert resumed.pair.switches == full.pair.switches
    assert same(weights(resumed.network), weights(full.network))


def test_saved_pair_reads_back_with_each_experts_weights(files, tmp_path):
    s = session(files, tmp_path, steps=6)
    train(s, 6)   # the final save at the end of training
    nets = s.network.networks()
    for expert, suffix in ((HIGH, "_high_noise"), (LOW, "_low_noise")):
        path = tmp_path / f"lora{suffix}.safetensors"
        assert path in s.saved_loras
        lora = read_lora(path)
        adapters = nets[expert].adapters()
        assert lora.modules.keys() == adapters.keys()
        for name, a in adapters.items():
            assert torch.equal(lora.modules[name].tensors["down"], a.lora_down.weight)
            assert torch.equal(lora.modules[name].tensors["up"], a.lora_up.weight)
        assert lora.metadata["ss_timestep_expert"] == f"{expert}_noise"
        assert float(lora.metadata["ss_timestep_boundary"]) == BOUNDARY
        assert lora.metadata["ss_sd_model_name"] == f"{expert}_noise.safetensors"
    high = read_lora(tmp_path / "lora_high_noise.safetensors").modules
    low = read_lora(tmp_path / "lora_low_noise.safetensors").modules
    assert any(not torch.equal(high[n].tensors["up"], low[n].tensors["up"]) for n in high)

    explicit = s.save_lora(tmp_path / "named.safetensors")
    assert explicit == tmp_path / "named_high_noise.safetensors" and explicit.is_file()
    assert (tmp_path / "named_low_noise.safetensors").is_file()

    shared = session(files, tmp_path / "shared", steps=2, layout="shared")
    train(shared, 2)
    (one,) = shared.saved_loras
    assert one == tmp_path / "shared" / "lora.safetensors"
    assert read_lora(one).metadata["ss_timestep_expert"] == "both"


def test_validation_samples_run_both_experts_with_their_adapters(files, tmp_path):
    prompt = ValidationPrompt(context=torch.randn(5, 32, generator=torch.Generator().manual_seed(0)), width=32,
                              height=32, frames=1, steps=4, shift=3.0, seed=3)
    m = experts(files)
    calls = []
    for e in (HIGH, LOW):
        m[e].register_forward_pre_hook(lambda mod, args, e=e: calls.append(e))
    s = session(files, tmp_path, steps=3, models=m, validation=ValidationConfig(prompts=[prompt], every_n_steps=3))
    train(s, 3)
    sampled = calls[3:]
    assert HIGH in sampled and LOW in sampled and sampled[0] == HIGH
    (latents,) = s.last_samples
    request = s.family.sampling_request(prompt)
    direct = generate(WanExperts(low=m["low"], high=m["high"], boundary=BOUNDARY), request)
    assert torch.equal(latents, direct)
    s.network.high.multiplier = 0.0   # the high-noise expert's adapter is part of that sample
    assert not torch.equal(generate(WanExperts(low=m["low"], high=m["high"], boundary=BOUNDARY), request), direct)
    s.network.high.multiplier = 1.0
    assert m["low"].training is False and m["high"].training is False


# ---------------------------------------------------------------------------------------------------------------
# Refusals before any step
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, name, value, expected", [
    ({"boundary": 1}, "boundary", 1, "a fraction 0 < b < 1"),
    ({"boundary": 0.0}, "boundary", 0.0, "a fraction 0 < b < 1"),
    ({"boundary": 1000}, "boundary", 1000, "a fraction 0 < b < 1"),
    ({"boundary": True}, "boundary", True, "a fraction 0 < b < 1"),
    ({"layout": "merged"}, "expert LoRA layout", "merged", "one of ('separate', 'shared')"),
    ({"mode": "lazy"}, "expert memory mode", "lazy", "one of ('both', 'offload')"),
])
def test_bad_pairs_are_refused_before_any_step(files, tmp_path, raises_input, change, name, value, expected):
    m = experts(files)
    kw = {"boundary": BOUNDARY, "layout": "separate", "mode": "both", **change}
    with raises_input(name, value, expected):
        session(files, tmp_path, models=m, **kw)
    assert not attached_networks(m["low"]) and not attached_networks(m["high"])
    assert not list(tmp_path.iterdir())


def test_experts_of_different_architectures_or_one_module_twice_are_refused(files, tmp_path, raises_input):
    m = experts(files)
    i2v = load_wan_dit(files["i2v"], dtype=torch.float32)
    with raises_input("high-noise expert", "tiny-i2v from i2v.safetensors",
                      "the architecture of the low-noise expert tiny-t2v from low_noise.safetensors"):
        session(files, tmp_path, models={"low": m["low"], "high": i2v})
    with raises_input("high-noise expert", "tiny-t2v from low_noise.safetensors", "a model other than"):
        session(files, tmp_path, models={"low": m["low"], "high": m["low"]})
    with raises_input("eval dataset", "given", "no held-out evaluation while training two experts"):
        session(files, tmp_path, models=m, evaluation=EvalConfig(batches=batches(32)))
    assert not attached_networks(m["low"]) and not attached_networks(i2v)


def test_a_single_model_state_does_not_resume_a_pair(files, tmp_path, raises_input):
    m = experts(files)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_train_steps=2, mixed_precision="no", seed=1)
    single = TrainingSession(m["low"], NetworkConfig(rank=8, alpha=8), OptimizerConfig(),
                             InMemoryBatchLoader(batches(32), seed=0), cfg)
    single.train_steps(1)
    state = single.save_state()
    with raises_input("resume state experts", None, "{'boundary': 0.6, 'layout': 'separate'}"):
        session(files, tmp_path, resume=state)
