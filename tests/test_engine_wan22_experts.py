"""Wan 2.2 A14B expert pairs (engine/families/wan/experts.py) on two tiny T2V experts of different seeds: which
expert runs each step (by hand and against diffusers' WanPipeline), per-expert guidance, memory modes (with block
swap), refusals before any model call. On CUDA the same tests place on the GPU and check the parked expert is in
pinned host memory; on CPU only that assertion is left out."""

import copy
import dataclasses
import gc
import types
import weakref

import pytest
import torch

from engine.families.wan import experts as E
from engine.families.wan.detect import model_kind
from engine.families.wan.experts import LazyExpert, WanExperts
from engine.families.wan.loader import load_wan_dit
from engine.families.wan.pipeline import WanGenerateRequest, generate
from engine.families.wan.presets import write_preset_checkpoint
from engine.handle import ModelHandle, RunOptions
from engine.memory.residency import Residency
from engine.memory.transfer import FakeTransfer

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan22")
    return {"low": write_preset_checkpoint("tiny-t2v", d / "low_noise.safetensors", torch.float32, seed=1),
            "high": write_preset_checkpoint("tiny-t2v", d / "high_noise.safetensors", torch.float32, seed=2),
            "i2v": write_preset_checkpoint("tiny-i2v", d / "i2v_expert.safetensors", torch.float32, seed=3),
            "ti2v": write_preset_checkpoint("tiny-ti2v-5b", d / "ti2v_5B.safetensors", torch.float32, seed=5),
            "i2v_a14b": write_preset_checkpoint("tiny-i2v-a14b-low-noise", d / "i2v_low_noise.safetensors",
                                                torch.float32, seed=4)}


def _load(path):
    return load_wan_dit(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def pair(files):
    return {k: _load(files[k]) for k in ("low", "high")}


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return torch.randn(7, 32, generator=g), torch.randn(5, 32, generator=g)


def _req(prompts, **kw):
    base = dict(width=32, height=32, frames=1, seed=3)
    base.update(kw)
    return WanGenerateRequest("t2v", prompts[0], prompts[1], **base)


class Calls:
    """Every DiT call of the given experts: (expert name, timestep) in order (forward pre-hooks)."""

    def __init__(self, **models):
        self.calls, self.handles = [], []
        for name, m in models.items():
            self.handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: self.calls.append((name, float(args[1].flatten()[0])))))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------------------------
# Which expert runs
# ---------------------------------------------------------------------------------------------------------------

def _hand_unipc_timesteps(steps, shift):
    """The official FlowUniPC timesteps written out: σ_k = 0.999·(1 − k/N) (0.999 as float32), shifted
    S·σ/(1 + (S−1)·σ), truncated σ·1000."""
    smax = float(torch.tensor(0.999, dtype=torch.float32))
    out = []
    for k in range(steps):
        s = smax + (0.0 - smax) * k / steps
        s = shift * s / (1 + (shift - 1) * s)
        out.append(int(s * 1000))
    return out


def test_t2v_a14b_schedule_by_hand(pair, prompts):
    """40 steps, shift 12, boundary 0.875 (all A14B T2V defaults): steps with t >= 875 run the high-noise expert
    with guidance 4.0, the rest the low-noise expert with 3.0; cond and uncond in one batched call per step."""
    ts = _hand_unipc_timesteps(40, 12.0)
    want = ["high" if t >= 875 else "low" for t in ts]
    switch = want.index("low")
    assert 0 < switch < 40 and all(w == "low" for w in want[switch:])   # one switch
    with Calls(**pair) as spy:
        generate(WanExperts(low=pair["low"], high=pair["high"]), _req(prompts))
    assert [name for name, _ in spy.calls] == want
    assert [int(t) for _, t in spy.calls] == ts


def test_switch_rule_matches_diffusers_wan_pipeline(pair):
    """diffusers' WanPipeline itself (tiny transformers, a scheduler stub that yields chosen timesteps, exact
    boundary values included) picks the same expert as `side_of` / `expert_plan` for every timestep."""
    diffusers = pytest.importorskip("diffusers")

    def tiny():
        return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                               in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=32,
                                               num_layers=1, rope_max_seq_len=32)

    class Stub:   # what WanPipeline asks of a scheduler
        order = 1

        def __init__(self, timesteps):
            self.config = types.SimpleNamespace(num_train_timesteps=1000)
            self._ts = torch.tensor(timesteps, dtype=torch.float32)

        def set_timesteps(self, n, device=None):
            self.timesteps, self.sigmas = self._ts, torch.cat([self._ts / 1000, torch.zeros(1)])

        def set_begin_index(self, i):
            pass

        def step(self, v, t, x, return_dict=False, **kw):
            return (x,)

    ours_unipc = [float(t) for t in _hand_unipc_timesteps(40, 12.0)]
    for boundary, ts in ((0.875, ours_unipc + [876.0, 875.0, 874.9990234375, 874.0]),
                         (0.9, [999.0, 900.5, 900.0, 899.9, 120.0])):
        high, low = tiny(), tiny()
        seen = []
        high.register_forward_pre_hook(lambda m, a, kw: seen.append("high"), with_kwargs=True)
        low.register_forward_pre_hook(lambda m, a, kw: seen.append("low"), with_kwargs=True)
        pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=Stub(ts),
                                     transformer=high, transformer_2=low, boundary_ratio=boundary)
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt_embeds=torch.randn(1, 4, 32), negative_prompt_embeds=torch.randn(1, 4, 32), height=16, width=16,
             num_frames=1, num_inference_steps=len(ts), guidance_scale=4.0, guidance_scale_2=3.0, output_type="latent")
        diffusers_choice = seen[::2]   # cond then uncond call per step
        plan = E.expert_plan(torch.tensor(ts, dtype=torch.float32), boundary)
        assert [e for e, _ in plan] == diffusers_choice, boundary
        assert [E.side_of(t, E.normalize_boundary(boundary * 1000)) for t in ts] == diffusers_choice


def test_boundary_inputs_normalized():
    assert E.normalize_boundary(0.875) == 0.875
    assert E.normalize_boundary(875) == 0.875
    assert E.normalize_boundary(900.0) == 0.9
    assert E.side_of(875, 0.875) == "high" and E.side_of(874, 0.875) == "low"


# ---------------------------------------------------------------------------------------------------------------
# Guidance per expert, a missing high-noise expert
# ---------------------------------------------------------------------------------------------------------------

def _hand_euler_pair(models, prompts, steps, shift, boundary, g_low, g_high, seed=3):
    """Euler + CFG with the expert and scale chosen per step from the timestep, written out independently."""
    x = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    sig = [shift * s / (1 + (shift - 1) * s) for s in (1 - k / steps for k in range(steps + 1))]
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([sig[i] * 1000.0], dtype=torch.float32)
            high = float(t) >= boundary * 1000
            m, g = (models["high"], g_high) if high and "high" in models else (models["low"], g_high if high
                                                                                 else g_low)
            vc, vu = m(x, t, [prompts[0]]), m(x, t, [prompts[1]])
            x = x + (vu + g * (vc - vu)) * (sig[i + 1] - sig[i])
    return x


def test_per_expert_guidance_numerics_and_spy(pair, prompts, monkeypatch):
    """Scales 2.0 (low) / 7.0 (high) are the ones applied: a spy on the guided velocity sees each step's scale,
    and the latents match a hand-written loop at fp32 tolerance."""
    from engine.sampling import guidance as G

    seen, call = [], G.GuidedVelocity.__call__

    def spy(self, x, t, step):
        seen.append((step, self.config.scale))
        return call(self, x, t, step)
    monkeypatch.setattr(G.GuidedVelocity, "__call__", spy)
    req = _req(prompts, steps=6, shift=3.0, solver="euler", guidance_scale=2.0, guidance_scale_high=7.0)
    with Calls(**pair) as calls:
        out = generate(WanExperts(low=pair["low"], high=pair["high"], boundary=0.7), req)
    phases = ["high" if t >= 700 else "low" for _, t in calls.calls]   # cond + uncond: one batched call a step
    assert [n for n, _ in calls.calls] == phases
    assert "high" in phases and "low" in phases
    assert seen == [(i, 7.0 if p == "high" else 2.0) for i, p in enumerate(phases)]
    ref = _hand_euler_pair(pair, prompts, 6, 3.0, 0.7, 2.0, 7.0)
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * max(1.0, ref.abs().max().item()), err


def test_missing_high_expert_equals_single_model_generate(pair, prompts):
    """No high-noise expert: the low one runs every step (Musubi); with equal scales that is exactly generate() with
    the single model. With different scales the high-noise steps still take guidance_scale_high."""
    req = _req(prompts, steps=5, shift=12.0, guidance_scale=3.0)
    single = generate(pair["low"], req)
    with Calls(low=pair["low"], high=pair["high"]) as calls:
        paired = generate(WanExperts(low=pair["low"]), dataclasses.replace(req, guidance_scale_high=3.0))
    assert {n for n, _ in calls.calls} == {"low"}
    assert torch.equal(single, paired)
    req2 = _req(prompts, steps=5, shift=12.0, solver="euler", guidance_scale=3.0, guidance_scale_high=6.0)
    out = generate(WanExperts(low=pair["low"]), req2)
    ref = _hand_euler_pair({"low": pair["low"]}, prompts, 5, 12.0, 0.875, 3.0, 6.0)
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_a14b_defaults(pair, files):
    low_i2v = _load(files["i2v_a14b"])
    t2v = E.resolve_for_experts(WanExperts(low=pair["low"], high=pair["high"]),
                                WanGenerateRequest("t2v", torch.zeros(1, 32), torch.zeros(1, 32)))
    assert (t2v.steps, t2v.shift, t2v.guidance_scale, t2v.guidance_scale_high) == (40, 12.0, 3.0, 4.0)
    assert E.boundary_of(WanExperts(low=pair["low"])) == 0.875
    i2v_pair = WanExperts(low=low_i2v)
    i2v = E.resolve_for_experts(i2v_pair, WanGenerateRequest("i2v", torch.zeros(1, 32), torch.zeros(1, 32)))
    assert (i2v.steps, i2v.shift, i2v.guidance_scale, i2v.guidance_scale_high) == (40, 5.0, 3.5, 3.5)
    assert E.boundary_of(i2v_pair) == 0.9
    kept = E.resolve_for_experts(i2v_pair, WanGenerateRequest("i2v", torch.zeros(1, 32), torch.zeros(1, 32),
                                                              steps=8, shift=2.0, guidance_scale=1.5,
                                                              guidance_scale_high=2.5))
    assert (kept.steps, kept.shift, kept.guidance_scale, kept.guidance_scale_high) == (8, 2.0, 1.5, 2.5)


# ---------------------------------------------------------------------------------------------------------------
# Memory modes
# ---------------------------------------------------------------------------------------------------------------

class Recorder(Residency):
    """The host's Residency, recording which experts it has placed (and not parked/offloaded since)."""

    def __init__(self, names):
        super().__init__()
        self.names, self.on_device, self.log = names, set(), []

    def place(self, module, device, blocks_to_swap=0, offload_non_blocks=False, training=False):
        self.on_device.add(self.names[id(module)])
        self.log.append(("place", self.names[id(module)]))
        return super().place(module, device, blocks_to_swap, offload_non_blocks, training)

    def park(self, module, pin_memory=True):
        self.on_device.discard(self.names[id(module)])
        self.log.append(("park", self.names[id(module)]))
        return super().park(module, pin_memory)

    def offload(self, module):
        self.on_device.discard(self.names[id(module)])
        self.log.append(("offload", self.names[id(module)]))
        return super().offload(module)


def _resident_tensors(module, swap):
    """Parameters of the blocks block swap leaves resident, and of the non-block layers."""
    streamed = set(swap.swapped) if swap is not None else set()
    blocks = [b for i, b in enumerate(module.blocks) if i not in streamed]
    rest = [p for n, p in module.named_parameters() if not n.startswith("blocks.")]
    return [p for b in blocks for p in b.parameters()] + rest


@pytest.mark.parametrize("swap", [0, 1])
def test_memory_modes_bit_identical_and_placement(files, prompts, swap):
    """both / offload / lazy, with and without block swap (the fake transfer on CPU), give bit-identical latents.
    At every DiT call: the running expert is placed and on the device; in offload/lazy mode the other one is not
    (parked: its resident weights in pinned host memory on CUDA, its swapper still attached); lazy loads an expert
    at its first step and unloads it after its last."""
    results, peak = {}, {}
    for mode in ("both", "offload", "lazy"):
        models = {k: _load(files[k]) for k in ("low", "high")}
        names = {id(m): k for k, m in models.items()}
        res = Recorder(names)
        if swap and not CUDA:
            res.use_test_transfer(lambda: FakeTransfer())
        handles = {k: ModelHandle(m, "wan", RunOptions(blocks_to_swap=swap)) for k, m in models.items()}
        loads, unloads = [], []
        if mode == "lazy":
            src = {k: LazyExpert(m.config, load=lambda k=k: (loads.append(k), handles[k])[1],
                                 unload=lambda got, k=k: unloads.append(k), name=str(files[k]))
                   for k, m in models.items()}
        else:
            src = handles
        states = []

        def check(name):
            def hook(mod, args):
                other = "low" if name == "high" else "high"
                assert name in res.on_device
                for p in _resident_tensors(models[name], res.active_swapper(models[name])):
                    assert p.device.type == DEVICE.type
                if mode != "both":
                    assert other not in res.on_device
                    if CUDA and mode == "offload" and ("park", other) in res.log:
                        assert all(p.device.type == "cpu" and p.is_pinned()
                                   for p in _resident_tensors(models[other], res.active_swapper(models[other])))
                states.append((name, frozenset(res.on_device)))
            return hook
        hooks = [m.register_forward_pre_hook(check(k)) for k, m in models.items()]
        experts = WanExperts(low=src["low"], high=src["high"], mode=mode, device=DEVICE, residency=res)
        out = generate(experts, _req(prompts, steps=6, shift=5.0, guidance_scale_high=5.0)).cpu()
        for h in hooks:
            h.remove()
        results[mode], peak[mode] = out, max(len(s) for _, s in states)
        ran = [n for n, _ in states]
        assert ran[0] == "high" and ran[-1] == "low"
        if mode == "lazy":
            assert loads == ["high", "low"] and unloads == ["high", "low"]
            assert res.log.index(("offload", "high")) < res.log.index(("place", "low"))
        if mode == "offload":
            assert res.log == [("place", "high"), ("park", "high"), ("place", "low")]
            if swap:   # the parked expert kept its swapper: a second generation reuses both swappers
                swappers = [res.active_swapper(m) for m in models.values()]
                assert all(s is not None for s in swappers)
                again = generate(experts, _req(prompts, steps=6, shift=5.0, guidance_scale_high=5.0)).cpu()
                assert torch.equal(again, out)
                assert [res.active_swapper(m) for m in models.values()] == swappers
        res.release()
    assert peak == {"both": 2, "offload": 1, "lazy": 1}
    assert torch.equal(results["both"], results["offload"]) and torch.equal(results["both"], results["lazy"])


def test_per_expert_lora_views_stay_separate(pair, prompts):
    """A pair carries whatever module each expert socket brings: a LoRA-merged view of the high-noise expert
    changes the high-noise steps only and leaves the low-noise expert (and the source model) untouched."""
    from engine.lora.views import make_lora_view

    view = make_lora_view(pair["high"])
    w = view.blocks[0].self_attn.q
    private = torch.nn.Linear(w.in_features, w.out_features)   # a merged LoRA's copy-on-write weights
    private.weight.data = w.weight.data + 0.05
    private.bias.data = w.bias.data.clone()
    view.blocks[0].self_attn.q = private
    req = _req(prompts, steps=4, shift=5.0)
    base = generate(WanExperts(low=pair["low"], high=pair["high"]), req)
    with Calls(low=pair["low"], high=view) as calls:
        lora = generate(WanExperts(low=pair["low"], high=view), req)
    assert {n for n, _ in calls.calls} == {"low", "high"}
    assert not torch.equal(base, lora)
    assert pair["high"].blocks[0].self_attn.q is not private
    assert torch.equal(generate(WanExperts(low=pair["low"], high=pair["high"]), req), base)


# ---------------------------------------------------------------------------------------------------------------
# Refusals before any model call
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("boundary", [0, 1, 1000, -0.5, 1500, float("nan"), True, "0.9"])
def test_boundary_out_of_range(pair, prompts, boundary, raises_input):
    loads = []
    lazy = LazyExpert(pair["high"].config, load=lambda: loads.append(1) or pair["high"])
    with Calls(**pair) as calls, raises_input("boundary", boundary, "a fraction 0 < b < 1"):
        generate(WanExperts(low=pair["low"], high=lazy, boundary=boundary, mode="lazy"), _req(prompts, steps=2))
    assert calls.calls == [] and loads == []


def test_mismatched_experts_refused_naming_files(pair, files, prompts):
    from engine.errors import MusubiInputError

    i2v = _load(files["i2v"])
    with Calls(low=pair["low"], i2v=i2v) as calls:
        with pytest.raises(MusubiInputError) as err:
            generate(WanExperts(low=pair["low"], high=i2v), _req(prompts, steps=2))
        msg = str(err.value)
        assert msg.startswith("high-noise expert: got 'tiny-i2v (i2v, in_dim=36")
        assert str(files["i2v"]) in msg and str(files["low"]) in msg and "in_dim" in msg
        # different dims (a lazy expert: refused from its header config, nothing loaded)
        other = dataclasses.replace(pair["high"].config, ffn_dim=384, variant="tiny-t2v-wide")
        lazy = LazyExpert(other, load=lambda: pytest.fail("loaded"), name="wide_high.safetensors")
        with pytest.raises(MusubiInputError, match="high-noise expert: got 'tiny-t2v-wide .*wide_high.safetensors"
                                                   ".*they differ in ffn_dim"):
            generate(WanExperts(low=pair["low"], high=lazy, mode="lazy"), _req(prompts, steps=2))
        # two Wan 2.1 models: the same architecture, but a CLIP branch (I2V) or a file named as Wan 2.1 (T2V)
        with pytest.raises(MusubiInputError, match="^low-noise expert: got 'tiny-i2v .*with a CLIP image branch "
                                                   r"\(Wan 2.1\)'; expected a Wan 2.2 A14B expert"):
            generate(WanExperts(low=i2v, high=i2v), _req(prompts, steps=2))
        named_21 = LazyExpert(pair["low"].config, load=lambda: pytest.fail("loaded"),
                              name="wan2.1_t2v_14B_fp16.safetensors")
        with pytest.raises(MusubiInputError, match="^low-noise expert: got .*a file named as Wan 2.1'"):
            generate(WanExperts(low=named_21, high=pair["high"], mode="lazy"), _req(prompts, steps=2))
        # the two files in each other's slots: their names (high_noise / low_noise) say so
        assert (pair["low"].config.expert, pair["high"].config.expert) == ("low", "high")
        with pytest.raises(MusubiInputError, match="^low-noise expert: got 'tiny-t2v .*high_noise.safetensors'; "
                                                   "expected the low_noise file of the pair .*swap the two inputs"):
            generate(WanExperts(low=pair["high"], high=pair["low"]), _req(prompts, steps=2))
    assert calls.calls == []


def test_experts_of_one_architecture_pair_whatever_their_names_and_unused_fields(pair):
    """Only the architecture must match: the human name, and a CLIP width without a CLIP branch (file detection
    cannot read it), may differ; the pair's resolved boundary is the release default or the one given."""
    from engine.errors import MusubiInputError

    cfg = pair["high"].config
    renamed = LazyExpert(dataclasses.replace(cfg, variant="my-finetune", clip_dim=cfg.clip_dim + 8),
                         load=lambda: pytest.fail("loaded"))
    experts = WanExperts(low=pair["low"], high=renamed)
    E.check_experts(experts)
    assert experts.resolved_boundary() == E.BOUNDARY["t2v"]
    assert WanExperts(low=pair["low"], boundary=900).resolved_boundary() == 0.9
    image = dataclasses.replace(cfg, model_type="i2v", in_dim=36, has_image_input=True, expert=None)  # CLIP branch
    wider = LazyExpert(dataclasses.replace(image, clip_dim=cfg.clip_dim + 8), load=lambda: pytest.fail("loaded"))
    with pytest.raises(MusubiInputError, match=r"\(they differ in clip_dim\)$"):
        E.check_experts(WanExperts(low=LazyExpert(image, load=lambda: pytest.fail("loaded")), high=wider))


@pytest.mark.parametrize("field,value,name", [("mode", "swap", "expert memory mode"),
                                              ("low", object(), "low-noise expert")])
def test_bad_pair_fields(pair, prompts, field, value, name):
    from engine.errors import MusubiInputError

    experts = dataclasses.replace(WanExperts(low=pair["low"], high=pair["high"]), **{field: value})
    with Calls(**pair) as calls, pytest.raises(MusubiInputError, match=f"^{name}: got"):
        generate(experts, _req(prompts, steps=2))
    assert calls.calls == []


def test_bad_guidance_scale_high(pair, prompts, raises_input):
    with Calls(**pair) as calls, raises_input("guidance_scale_high", "x", "a number"):
        generate(WanExperts(low=pair["low"], high=pair["high"]), _req(prompts, steps=2, guidance_scale_high="x"))
    assert calls.calls == []


def test_lazy_expert_that_loads_another_model_refused(pair, prompts, files):
    """A loader that returns something else than its header described is refused naming the file."""
    from engine.errors import MusubiInputError

    i2v = _load(files["i2v"])
    lazy = LazyExpert(pair["high"].config, load=lambda: i2v, name="high_noise.safetensors")
    with pytest.raises(MusubiInputError, match="^high-noise expert high_noise.safetensors: got 'a loaded tiny-i2v'"):
        generate(WanExperts(low=pair["low"], high=lazy, mode="lazy"), _req(prompts, steps=2))


def test_refusal_messages_name_input_value_and_expectation(pair, files, prompts, raises_input):
    """The whole message of each refusal: the input, what was found (the file, or no file for a model built in
    memory) and what was expected."""
    from engine.families.wan.dit import WanModel
    from engine.errors import MusubiInputError

    req = _req(prompts, steps=2)
    with raises_input("experts", "str", "a WanExperts pair"):
        E.check_experts("low_noise.safetensors")
    with raises_input("expert memory mode", "swap", f"one of {E.MODES}"):
        generate(WanExperts(low=pair["low"], high=pair["high"], mode="swap"), req)
    no_config = torch.nn.Linear(2, 2)
    other_config = torch.nn.Linear(2, 2)
    other_config.config = types.SimpleNamespace(variant="a text encoder")
    expected = "a Wan DiT (model, handle or LazyExpert)"
    for bad in (object(), no_config, other_config):
        with raises_input("low-noise expert", type(bad).__name__, expected):
            generate(WanExperts(low=bad, high=pair["high"]), req)
        with raises_input("high-noise expert", type(bad).__name__, expected):
            generate(WanExperts(low=pair["low"], high=bad), req)
    with raises_input("guidance_scale_high", "x", "a number (4.0 T2V, 3.5 I2V)"):
        generate(WanExperts(low=pair["low"], high=pair["high"]), _req(prompts, guidance_scale_high="x"))

    def about(cfg, where=None):
        return (f"{cfg.variant} ({model_kind(cfg)}, in_dim={cfg.in_dim}, dim={cfg.dim}, {cfg.num_layers} blocks)"
                + (f" from {where}" if where else ""))
    low = pair["low"].config
    wide = WanModel(dataclasses.replace(pair["high"].config, ffn_dim=384, variant="wide"))
    with pytest.raises(MusubiInputError) as err:      # built in memory: no file to name
        generate(WanExperts(low=pair["low"], high=wide), req)
    assert str(err.value) == (f"high-noise expert: got {about(wide.config)!r}; expected the same architecture as "
                              f"the low-noise expert {about(low, files['low'])}: both experts of one Wan 2.2 A14B "
                              f"release (they differ in ffn_dim)")
    i2v = _load(files["i2v"])                          # every differing field, also one only the I2V model has
    with pytest.raises(MusubiInputError, match=r"\(they differ in clip_dim, has_image_input, in_dim, model_type\)$"):
        generate(WanExperts(low=pair["low"], high=i2v), req)

    a14b = "a Wan 2.2 A14B expert (a T2V or I2V DiT without CLIP, e.g. wan2.2_t2v_high_noise_14B / " \
           "wan2.2_i2v_low_noise_14B)"
    renamed = _load(files["low"])                      # a loaded model whose file is named as Wan 2.1
    renamed.source_path = "/models/wan2.1_t2v_14B_fp16.safetensors"
    with raises_input("low-noise expert", f"{about(renamed.config, renamed.source_path)}: a file named as Wan 2.1",
                      a14b):
        generate(WanExperts(low=renamed, high=pair["high"]), req)
    ti2v = _load(files["ti2v"])
    with raises_input("low-noise expert", f"{about(ti2v.config, files['ti2v'])}: a model of kind ti2v", a14b):
        generate(WanExperts(low=ti2v, high=ti2v), req)


# ---------------------------------------------------------------------------------------------------------------
# The runner step by step: what is loaded, placed, parked, freed and offloaded when
# ---------------------------------------------------------------------------------------------------------------

T_HIGH_THEN_LOW = torch.tensor([999.0, 500.0, 400.0, 100.0])   # boundary 0.875: high, low, low, low


class PlacementLog:
    """A Residency that records its calls and moves nothing, so any device can be asked for."""

    def __init__(self, names):
        self.names, self.calls = names, []

    def place(self, module, device, blocks_to_swap=0, offload_non_blocks=False, training=False):
        self.calls.append(("place", self.names(module), str(device), blocks_to_swap, offload_non_blocks))

    def park(self, module, pin_memory=True):
        self.calls.append(("park", self.names(module)))

    def offload(self, module):
        self.calls.append(("offload", self.names(module)))


def _drive(runner, steps, on_step=None):
    """Run the runner as `generate` does (start, then one velocity call per step) with a stand-in for the guided
    DiT; -> the device start() returned and (expert module id, guidance scale) per step."""
    ran = []

    def make_guided(module, guidance):
        def velocity(x, t, step):
            ran.append((id(module), guidance.scale))
            if on_step is not None:
                on_step(step)
            return x
        return velocity
    from engine.sampling.guidance import GuidanceConfig

    device = runner.start()
    with runner:
        v = runner.velocity(GuidanceConfig(scale=3.0), 4.0, make_guided)
        for step in range(steps):
            v(torch.zeros(1), torch.tensor(0.0), step)
    return device, ran


RUN_EVENTS = [("run", "high", 0), ("run", "low", 1), ("run", "low", 2), ("run", "low", 3)]


@pytest.mark.parametrize("mode,events", [
    ("both", [("place", "high"), ("place", "low")] + RUN_EVENTS),
    ("offload", [("place", "high"), RUN_EVENTS[0], ("park", "high"), ("place", "low")] + RUN_EVENTS[1:]),
    ("lazy", [("load", "high"), ("place", "high"), RUN_EVENTS[0], ("free", "high"), ("load", "low"),
              ("place", "low")] + RUN_EVENTS[1:] + [("free", "low")]),
])
def test_runner_places_each_expert_with_its_options_when_the_mode_says(pair, mode, events):
    """Where each expert is after each phase, per mode, with each expert's own block swap options; the device asked
    for is where the steps run; every step runs the expert and guidance scale of its phase."""
    ids = {id(pair["high"]): "high", id(pair["low"]): "low"}
    log = PlacementLog(lambda m: ids[id(m)])
    options = {"high": RunOptions(blocks_to_swap=1, offload_non_blocks=True), "low": RunOptions(blocks_to_swap=2)}
    handles = {k: ModelHandle(pair[k], "wan", options[k]) for k in ("high", "low")}
    loaded, unloaded = [], []
    if mode == "lazy":
        sources = {k: LazyExpert(pair[k].config, load=lambda k=k: loaded.append(k) or handles[k],
                                 unload=lambda got: unloaded.append(got)) for k in handles}
    else:
        sources = handles
    runner = E.ExpertRunner(WanExperts(low=sources["low"], high=sources["high"], mode=mode, device="cuda:7",
                                       residency=log), T_HIGH_THEN_LOW)
    device, ran = _drive(runner, 4)
    assert device == torch.device("cuda:7")
    assert runner.events == events
    placements = {"high": ("place", "high", "cuda:7", 1, True), "low": ("place", "low", "cuda:7", 2, False)}
    assert log.calls == [placements[e[1]] if e[0] == "place" else ("offload", e[1]) if e[0] == "free" else e
                         for e in events if e[0] in ("place", "park", "free")]
    assert ran == [(id(pair["high"]), 4.0)] + [(id(pair["low"]), 3.0)] * 3
    if mode == "lazy":
        assert loaded == ["high", "low"] and unloaded[0] is handles["high"] and unloaded[1] is handles["low"]
        assert runner.placed == set() and runner.handles == {}


def test_runner_without_a_device_places_nothing_and_runs_where_the_experts_are(pair):
    log = PlacementLog(lambda m: m)
    runner = E.ExpertRunner(WanExperts(low=pair["low"], high=pair["high"], mode="offload", residency=log),
                            T_HIGH_THEN_LOW)
    device, _ = _drive(runner, 4)
    assert device == torch.device("cpu") and log.calls == [] and runner.events == RUN_EVENTS


def test_runner_without_a_residency_uses_its_own(pair, prompts):
    """A pair given a device but no host Residency places through a private one (CPU here)."""
    experts = WanExperts(low=pair["low"], high=pair["high"], mode="offload", device="cpu")
    req = _req(prompts, steps=3, shift=5.0)
    assert torch.equal(generate(experts, req), generate(WanExperts(low=pair["low"], high=pair["high"]), req))


def test_an_expert_parked_earlier_is_placed_again_at_its_next_step(pair):
    ids = {id(pair["high"]): "high", id(pair["low"]): "low"}
    log = PlacementLog(lambda m: ids[id(m)])
    runner = E.ExpertRunner(WanExperts(low=pair["low"], high=pair["high"], mode="offload", device="cpu",
                                       residency=log), torch.tensor([999.0, 100.0, 950.0]))
    _drive(runner, 3)
    assert runner.events == [("place", "high"), ("run", "high", 0), ("park", "high"), ("place", "low"),
                             ("run", "low", 1), ("park", "low"), ("place", "high"), ("run", "high", 2)]


def test_offload_after_puts_every_loaded_expert_back_in_cpu_memory(pair):
    ids = {id(pair["high"]): "high", id(pair["low"]): "low"}
    log = PlacementLog(lambda m: ids[id(m)])
    runner = E.ExpertRunner(WanExperts(low=pair["low"], high=pair["high"], mode="both", device="cpu",
                                       residency=log, offload_after=True), T_HIGH_THEN_LOW)
    _drive(runner, 4)
    assert runner.events[-2:] == [("offload", "high"), ("offload", "low")]
    assert log.calls[-2:] == [("offload", "high"), ("offload", "low")] and runner.placed == set()


def test_lazy_frees_an_expert_after_its_last_step_and_nothing_keeps_it_alive(pair):
    """In lazy mode the high-noise expert is unloaded after its last step and no reference to it remains while the
    low-noise steps run (the runner's eval-mode guard and guided-velocity cache included), so its memory is
    returned before the generation ends; an expert without `unload` is simply dropped."""
    refs, alive = {}, []

    def load(k):
        m = copy.deepcopy(pair[k])
        refs[k] = weakref.ref(m)
        return m
    lazy = {"high": LazyExpert(pair["high"].config, load=lambda: load("high")),
            "low": LazyExpert(pair["low"].config, load=lambda: load("low"))}

    def on_step(step):
        if step >= 1:
            gc.collect()
            alive.append(refs["high"]() is not None)
    runner = E.ExpertRunner(WanExperts(low=lazy["low"], high=lazy["high"], mode="lazy"), T_HIGH_THEN_LOW)
    _drive(runner, 4, on_step)
    assert alive == [False, False, False]
    assert runner.events[:2] == [("load", "high"), ("run", "high", 0)] and runner.events[-1] == ("free", "low")


def test_an_interrupted_generation_frees_lazy_experts_and_offloads(pair):
    """An interrupt (any exception) between steps still frees what lazy mode loaded and, with offload_after, puts
    the experts back in CPU memory."""
    class Interrupt(Exception):
        pass

    def stop(step):
        if step == 0:
            raise Interrupt
    unloaded = []
    lazy = LazyExpert(pair["high"].config, load=lambda: pair["high"], unload=unloaded.append)
    runner = E.ExpertRunner(WanExperts(low=pair["low"], high=lazy, mode="lazy"), T_HIGH_THEN_LOW)
    with pytest.raises(Interrupt):
        _drive(runner, 4, stop)
    assert unloaded == [pair["high"]] and runner.events[-1] == ("free", "high") and runner.handles == {}
    ids = {id(pair["high"]): "high", id(pair["low"]): "low"}
    log = PlacementLog(lambda m: ids[id(m)])
    runner = E.ExpertRunner(WanExperts(low=pair["low"], high=pair["high"], mode="offload", device="cpu",
                                       residency=log, offload_after=True), T_HIGH_THEN_LOW)
    with pytest.raises(Interrupt):
        _drive(runner, 4, stop)
    assert log.calls == [("place", "high", "cpu", 0, False), ("offload", "high")]


def test_a_lazy_loader_that_returns_no_model_is_refused_naming_the_file(pair, prompts, raises_input):
    for got, shown in (("oops", "str"), (torch.nn.Linear(2, 2), "Linear")):
        lazy = LazyExpert(pair["high"].config, load=lambda got=got: got, name="high_noise.safetensors")
        with raises_input("high-noise expert high_noise.safetensors", f"a loaded {shown}",
                          f"the model its file header describes ({pair['high'].config.variant})"):
            generate(WanExperts(low=pair["low"], high=lazy, mode="lazy"), _req(prompts, steps=2))


def test_a_failure_after_the_first_expert_loaded_still_frees_it(pair, prompts, monkeypatch):
    """`generate` starts the runner (loading a lazy first expert) inside its `with`: an error before the first step
    (here, making the noise) still gives the loaded expert back."""
    import engine.families.wan.pipeline as P

    def broken(*a, **k):
        raise RuntimeError("noise")
    monkeypatch.setattr(P, "make_noise", broken)
    unloaded = []
    lazy = LazyExpert(pair["high"].config, load=lambda: pair["high"], unload=unloaded.append)
    with pytest.raises(RuntimeError, match="noise"):
        generate(WanExperts(low=pair["low"], high=lazy, mode="lazy"), _req(prompts, steps=2))
    assert unloaded == [pair["high"]]
