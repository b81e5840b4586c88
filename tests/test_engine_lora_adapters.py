"""Adapters: forward = (W + ΔW)x, attach/replace/detach, several networks, Musubi state dict naming."""

import re

import pytest
import torch

from engine.errors import MusubiInputError
from engine.lora import AdapterConfig, AdapterNetwork, LoHaModule, LoKrModule, LoRAModule, select_targets
from engine.lora.adapters import attached_networks, detach_all, lokr_factorization, make_adapter

from lora_fixtures import I2V_EXTRA, T2V_TARGETS_PER_BLOCK, tiny_model


def _randomize(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule, LoKrModule])
def test_adapter_forward_equals_merged_weight(cls):
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 24)
    adapter = cls(base, rank=4, alpha=8.0)
    _randomize(adapter)
    adapter.multiplier = 0.7
    x = torch.randn(3, 5, 48)
    # independent ΔW from the published formulas
    if cls is LoRAModule:
        dw = adapter.lora_up.weight @ adapter.lora_down.weight * (8.0 / 4)
    elif cls is LoHaModule:
        dw = (adapter.hada_w1_a @ adapter.hada_w1_b) * (adapter.hada_w2_a @ adapter.hada_w2_b) * (8.0 / 4)
    else:
        dw = torch.kron(adapter.lokr_w1, adapter.lokr_w2_a @ adapter.lokr_w2_b) * (8.0 / 4)
    expected = torch.nn.functional.linear(x, base.weight + 0.7 * dw, base.bias)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter.delta_weight(), dw.detach(), rtol=1e-6, atol=1e-6)
    adapter.multiplier = 0.0
    torch.testing.assert_close(adapter(x), base(x))


def test_musubi_init_gives_zero_delta_and_fp32_weights():
    base = torch.nn.Linear(32, 16).to(torch.bfloat16)
    for cls in (LoRAModule, LoHaModule, LoKrModule):
        a = cls(base, rank=4, alpha=1.0)
        assert all(p.dtype == torch.float32 for p in a.parameters())
        assert torch.count_nonzero(a.delta_weight()) == 0
    lora = LoRAModule(base, rank=4)
    assert torch.count_nonzero(lora.lora_down.weight) > 0 and torch.count_nonzero(lora.lora_up.weight) == 0
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=√5) on fan_in 32
    assert lora.lora_down.weight.abs().max() <= bound


def test_lokr_factorization_balanced():
    assert lokr_factorization(512) == (16, 32)
    assert lokr_factorization(256, 4) == (4, 64)
    assert lokr_factorization(48) == (6, 8)
    # the largest divisor <= √dim (40: 5, not 4; a prime: 1); a factor that divides is used, the smaller first
    # (factor 1 too); a factor that does not divide, 0 or -1: balanced
    cases = {(40, -1): (5, 8), (7, -1): (1, 7), (48, 12): (4, 12), (48, 1): (1, 48), (48, 0): (6, 8),
             (48, 5): (6, 8), (64, 8): (8, 8)}
    for (dim, factor), expected in cases.items():
        got = lokr_factorization(dim, factor)
        assert got == expected and all(type(v) is int for v in got), (dim, factor, got)


def test_default_targets_match_musubi_wan():
    t2v, i2v = tiny_model("t2v"), tiny_model("i2v")
    names = select_targets(t2v)
    expected = [f"blocks.{b}.{s}" for b in range(2) for s in T2V_TARGETS_PER_BLOCK]
    assert sorted(names) == sorted(expected)
    assert sorted(select_targets(i2v)) == sorted(expected + [f"blocks.{b}.{s}" for b in range(2) for s in I2V_EXTRA])
    only_ffn = select_targets(t2v, exclude=[r".*attn.*"])
    assert sorted(only_ffn) == sorted(f"blocks.{b}.ffn.{i}" for b in range(2) for i in (0, 2))
    readmit = select_targets(t2v, exclude=[".*"], include=[r"blocks\.1\.self_attn\.q"])
    assert readmit == ["blocks.1.self_attn.q"]


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 8, model.config.text_dim, generator=g)
    return x, t, ctx


def _randomize_net(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_network_on_model_equals_merged_model_and_detach_restores():
    model = tiny_model("t2v")
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        before = model(x, t, ctx)
    net = AdapterNetwork.create(model, AdapterConfig(rank=4, alpha=4), name="a")
    _randomize_net(net, 1)
    net.multiplier = 0.5
    with torch.no_grad():
        adapted = model(x, t, ctx)
        merged_model = tiny_model("t2v")
        mods = dict(merged_model.named_modules())
        for name in net.adapters():
            mods[name].weight += 0.5 * net.delta_weight(name)
        merged = merged_model(x, t, ctx)
    assert not torch.allclose(adapted, before)
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)
    net.detach()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), before)
    assert not any(m._forward_hooks for m in model.modules())
    assert attached_networks(model) == {}


def test_attach_same_name_replaces_and_names_stack():
    model = tiny_model("t2v")
    x, t, ctx = _inputs(model)
    cfg = AdapterConfig(rank=2, alpha=2)
    first = AdapterNetwork.create(model, cfg, name="style")
    _randomize_net(first, 2)
    with torch.no_grad():
        once = model(x, t, ctx)
    again = AdapterNetwork.create(model, cfg, name="style")   # re-queued graph: same name
    again.load_state_dict(first.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), once)
    assert not first.is_attached and attached_networks(model) == {"style": again}
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())
    other = AdapterNetwork.create(model, cfg, name="other")
    _randomize_net(other, 3)
    with torch.no_grad():
        both = model(x, t, ctx)
    assert not torch.allclose(both, once)
    other.multiplier = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, ctx), once)


def test_state_dict_musubi_naming_and_roundtrip():
    model = tiny_model("i2v")
    net = AdapterNetwork.create(model, AdapterConfig(rank=4, alpha=1))
    sd = net.state_dict()
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in sd
    assert "lora_unet_blocks_1_cross_attn_k_img.lora_up.weight" in sd
    assert sd["lora_unet_blocks_0_ffn_0.alpha"].item() == 1.0
    assert all(re.fullmatch(r"lora_unet_blocks_\d_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in sd)
    assert len(net.trainable_parameters()) == 2 * 24
    with pytest.raises(MusubiInputError):
        net.load_state_dict({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(3, 3)}, strict=False)


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 16)
    a = LoRAModule(base, rank=8, alpha=8, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    _randomize(a)
    x = torch.randn(4, 16)
    a.eval()
    assert torch.equal(a(x), a(x))
    a.train()
    outs = {tuple(a(x).flatten().tolist()[:4]) for _ in range(6)}
    assert len(outs) > 1


def test_bad_config_refused():
    model = tiny_model("t2v")
    with pytest.raises(MusubiInputError, match="network kind"):
        AdapterNetwork.create(model, AdapterConfig(kind="dora"))
    with pytest.raises(MusubiInputError, match="targets"):
        AdapterNetwork.create(model, AdapterConfig(exclude=[".*"]))


# --- mutation testing (docs/testing.md): defaults, init, dropouts, dtypes, network life cycle, refusals -------------

def test_config_refusals_and_bounds(raises_input):
    with raises_input("network kind", "dora", "one of ('lora', 'loha', 'lokr')"):
        AdapterConfig(kind="dora").validate()
    with raises_input("network rank", 0, "an integer >= 1"):
        AdapterConfig(rank=0).validate()
    AdapterConfig(rank=1).validate()
    for name in ("dropout", "rank_dropout", "module_dropout"):
        for p in (1.0, -0.1, 1.5):
            with raises_input(f"network {name}", p, "a probability in [0, 1)"):
                AdapterConfig(**{name: p}).validate()
        for p in (None, 0.0, 0.99):
            AdapterConfig(**{name: p}).validate()
    with raises_input("adapter target", "Conv1d", "an nn.Linear module"):
        LoRAModule(torch.nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule, LoKrModule])
def test_module_defaults_rank_4_alpha_1_multiplier_1(cls):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    a = cls(base)
    assert a.rank == 4 and a.alpha.item() == 1.0 and a.scale == 0.25 and a.multiplier == 1.0
    _randomize(a)
    x = torch.randn(3, 64)
    torch.testing.assert_close(a(x), torch.nn.functional.linear(x, base.weight + a.delta_weight(), base.bias),
                               rtol=1e-5, atol=1e-6)


def test_parameter_shapes_dtypes_and_devices():
    """LyCORIS/Musubi shapes (they are the file format), the requested dtype, and CPU parameters for a base built on
    meta."""
    base = torch.nn.Linear(64, 32)
    with torch.device("meta"):
        meta_base = torch.nn.Linear(64, 32)
    for b in (base, meta_base):
        shapes = {k: tuple(v.shape) for k, v in LoRAModule(b, rank=4, dtype=torch.bfloat16).state_dict().items()}
        assert shapes == {"alpha": (), "lora_down.weight": (4, 64), "lora_up.weight": (32, 4)}
        loha = LoHaModule(b, rank=4, dtype=torch.bfloat16)
        assert {k: tuple(v.shape) for k, v in loha.state_dict().items()} == {
            "alpha": (), "hada_w1_a": (32, 4), "hada_w1_b": (4, 64), "hada_w2_a": (32, 4), "hada_w2_b": (4, 64)}
        with torch.device(b.weight.device):
            b48 = torch.nn.Linear(64, 48)
        lokr = LoKrModule(b48, rank=4, dtype=torch.bfloat16, factor=4)    # in 64 = 4·16, out 48 = 4·12
        assert {k: tuple(v.shape) for k, v in lokr.state_dict().items()} == {
            "alpha": (), "lokr_w1": (4, 4), "lokr_w2_a": (12, 4), "lokr_w2_b": (4, 16)}
        for a in (LoRAModule(b, dtype=torch.bfloat16), loha, lokr):
            assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in a.parameters()), type(a)
            assert a.alpha.device.type == "cpu"


def _max_over_bound(t, fan_in):
    return (t.abs().max() / (1 / fan_in ** 0.5)).item()


def test_init_distributions():
    """Kaiming-uniform(a=√5) is U(±1/√fan_in): the largest of many draws comes close to the bound and never passes
    it; LoHa's w2_a has std 0.1, its w1_b / w2_b std 1."""
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 256)
    down = LoRAModule(base, rank=16).lora_down.weight
    assert 0.97 < _max_over_bound(down, 256) <= 1.0
    lokr = LoKrModule(base, rank=8, factor=16)                 # w1 [16, 16], w2_a [16, 8]
    assert 0.95 < _max_over_bound(lokr.lokr_w1, 16) <= 1.0
    assert 0.95 < _max_over_bound(lokr.lokr_w2_a, 8) <= 1.0
    loha = LoHaModule(base, rank=16)
    assert 0.09 < loha.hada_w2_a.std().item() < 0.11
    assert 0.9 < loha.hada_w1_b.std().item() < 1.1 and 0.9 < loha.hada_w2_b.std().item() < 1.1


def test_lokr_with_a_full_w2_has_scale_1_and_alpha_max_w2_dim():
    """rank >= max(w2 shape): w2 is one full matrix, rank and the stored alpha become max(w2 shape), scale 1."""
    base = torch.nn.Linear(8, 8)                                 # 8 = 2·4 both ways: w2 [4, 4]
    for rank in (4, 9):
        a = LoKrModule(base, rank=rank, alpha=1.0, dtype=torch.bfloat16)
        assert a.full_w2 and a.rank == 4 and a.alpha.item() == 4.0 and a.scale == 1.0
        assert all(p.dtype == torch.bfloat16 for p in a.parameters())
        assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == {
            "alpha": (), "lokr_w1": (2, 2), "lokr_w2": (4, 4)}
        assert torch.count_nonzero(a.lokr_w2) == 0
    a = LoKrModule(base, rank=4)
    _randomize(a)
    torch.testing.assert_close(a.delta_weight(), torch.kron(a.lokr_w1, a.lokr_w2).detach())
    low = LoKrModule(base, rank=3)
    assert not low.full_w2 and low.rank == 3 and low.scale == 1.0 / 3


def test_load_factors():
    base = torch.nn.Linear(16, 8)
    a = LoRAModule(base, rank=2, alpha=4.0)
    down, up = torch.randn(2, 16), torch.randn(8, 2)
    a.load_factors(down, up)
    torch.testing.assert_close(a.delta_weight(), up @ down * 2.0)


def _expected_rank_dropped(a, x, mask, rescale):
    m = mask.float()
    if isinstance(a, LoRAModule):
        dw = a.lora_up.weight @ (a.lora_down.weight * m[:, None])
    elif isinstance(a, LoHaModule):
        dw = ((a.hada_w1_a * m) @ a.hada_w1_b) * ((a.hada_w2_a * m) @ a.hada_w2_b)
    else:
        dw = torch.kron(a.lokr_w1, (a.lokr_w2_a * m) @ a.lokr_w2_b)
    return torch.nn.functional.linear(x, a.base.weight + dw * a.scale * rescale, a.base.bias)


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule, LoKrModule])
def test_rank_dropout_drops_the_same_ranks_everywhere_and_rescales(cls):
    """Training with rank_dropout p: a mask over the rank (rand > p, one draw per call) on every factor that carries
    the rank, the term rescaled by 1/(1 − p); reproduced here from the same random draw."""
    base = torch.nn.Linear(64, 48)                              # LoKr: w2 [8, 8] in rank 6
    a = cls(base, rank=6, alpha=3.0, rank_dropout=0.4)
    assert not getattr(a, "full_w2", False)
    _randomize(a, seed=1)
    a.train()
    x = torch.randn(5, 64)
    for seed in range(3):
        torch.manual_seed(seed)
        mask = torch.rand(6) > 0.4
        torch.manual_seed(seed)
        y = a(x)
        torch.testing.assert_close(y, _expected_rank_dropped(a, x, mask, 1 / 0.6), rtol=1e-5, atol=1e-5)


def test_rank_dropout_does_not_touch_a_full_lokr_w2():
    base = torch.nn.Linear(8, 8)
    a = LoKrModule(base, rank=4, rank_dropout=0.5)
    _randomize(a)
    a.train()
    x = torch.randn(3, 8)
    expected = torch.nn.functional.linear(x, base.weight + torch.kron(a.lokr_w1, a.lokr_w2), base.bias)
    torch.testing.assert_close(a(x), expected.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [LoRAModule, LoHaModule, LoKrModule])
def test_dropout_and_module_dropout(cls):
    """dropout p: LoRA drops rank activations, LoHa/LoKr drop input features (F.dropout, rescaled by 1/(1 − p));
    module dropout skips the whole term. Reproduced from the same random draws."""
    F = torch.nn.functional
    base = torch.nn.Linear(16, 12)
    a = cls(base, rank=6, alpha=3.0, dropout=0.3)
    _randomize(a, seed=2)
    a.train()
    x = torch.randn(5, 16)
    torch.manual_seed(4)
    y = a(x)
    torch.manual_seed(4)
    if cls is LoRAModule:
        term = a.lora_up(F.dropout(a.lora_down(x), p=0.3)) * a.scale
    else:
        term = F.linear(F.dropout(x, p=0.3), a.delta_weight())
    torch.testing.assert_close(y, base(x) + term, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, a.eval()(x))
    b = cls(base, rank=6, alpha=3.0, module_dropout=0.5)
    _randomize(b, seed=2)
    full = b.eval()(x).detach()
    b.train()
    outs = [b(x).detach() for _ in range(12)]
    assert all(torch.equal(o, base(x)) or torch.allclose(o, full) for o in outs)
    assert any(torch.equal(o, base(x)) for o in outs) and any(torch.allclose(o, full) for o in outs)


def test_term_is_computed_in_the_adapter_dtype_and_returned_in_the_base_dtype():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16).to(torch.bfloat16)
    a = LoRAModule(base, rank=4, alpha=4.0)
    _randomize(a)
    x = torch.randn(3, 32).to(torch.bfloat16)
    y = a(x)
    assert y.dtype == torch.bfloat16
    term = (a.lora_up(a.lora_down(x.float())) * a.scale).to(torch.bfloat16)
    assert torch.equal(y, base(x) + term)
    model = tiny_model("t2v", dtype=torch.bfloat16)
    net = AdapterNetwork.create(model, AdapterConfig(rank=2))
    _randomize_net(net, 1)
    layer = model.blocks[0].ffn[0]
    xb = torch.randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(xb)
        assert out.dtype == torch.bfloat16
        adapter = net.adapters()["blocks.0.ffn.0"]
        expected = torch.nn.functional.linear(xb, layer.weight, layer.bias) + adapter.term(xb, torch.bfloat16)
    assert torch.equal(out, expected)


def test_make_adapter_passes_every_setting():
    base = torch.nn.Linear(64, 32)
    for kind, cls in (("lora", LoRAModule), ("loha", LoHaModule), ("lokr", LoKrModule)):
        cfg = AdapterConfig(kind=kind, rank=2, alpha=6.0, dropout=0.1, rank_dropout=0.2, module_dropout=0.3,
                            lokr_factor=4, dtype=torch.bfloat16)
        a = make_adapter(base, cfg)
        assert type(a) is cls and a.rank == 2 and a.scale == 3.0
        assert (a.dropout, a.rank_dropout, a.module_dropout) == (0.1, 0.2, 0.3)
        assert all(p.dtype == torch.bfloat16 for p in a.parameters())
        if cls is LoKrModule:
            assert tuple(a.lokr_w1.shape) == (4, 4)                      # factor 4: 32 = 4·8, 64 = 4·16
    assert make_adapter(base, AdapterConfig(rank=3, alpha=0)).scale == 1.0   # alpha 0: alpha = rank


def test_network_defaults_multiplier_and_refusals(raises_input):
    model = tiny_model("t2v")
    net = AdapterNetwork.create(model, AdapterConfig(rank=2))
    assert attached_networks(model) == {"default": net} and net.multiplier == 1.0
    assert all(a.multiplier == 1.0 for a in net.adapters().values())
    half = AdapterNetwork.create(model, AdapterConfig(rank=2), name="half", multiplier=0.5)
    assert half.multiplier == 0.5 and all(a.multiplier == 0.5 for a in half.adapters().values())
    with raises_input("network targets", {"include": [], "exclude": [".*"]},
                      "patterns that leave at least one Linear layer inside the DiT blocks"):
        AdapterNetwork.create(model, AdapterConfig(exclude=[".*"]))
    with raises_input("module name", "blocks.0.norm3", "one of the 20 adapted modules"):
        net.delta_weight("blocks.0.norm3")
    other = tiny_model("t2v")
    first = next(iter(net.adapters()))
    with raises_input(f"adapter {first!r}", "not a module of this model", "a network built for this model instance"):
        net.attach(other)
    assert not any(m._forward_hooks for m in other.modules())
    detach_all(model)
    assert attached_networks(model) == {} and not any(m._forward_hooks for m in model.modules())


def test_a_network_built_by_hand_defaults_to_name_default_and_full_strength():
    model = tiny_model("t2v")
    net = AdapterNetwork()
    assert net.name == "default" and net.multiplier == 1.0
    net.add("blocks.0.ffn.0", LoRAModule(model.blocks[0].ffn[0], rank=2))
    assert net.adapters()["blocks.0.ffn.0"].multiplier == 1.0
    net.attach(model)
    assert attached_networks(model) == {"default": net}


def test_attaching_an_attached_network_again_hooks_once():
    model = tiny_model("t2v")
    x, t, ctx = _inputs(model)
    net = AdapterNetwork.create(model, AdapterConfig(rank=2), name="a")
    _randomize_net(net, 1)
    with torch.no_grad():
        once = model(x, t, ctx)
    net.attach(model)
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), once)


def test_load_state_dict_strictness_casting_and_shape_message(raises_input):
    model = tiny_model("t2v")
    net = AdapterNetwork.create(model, AdapterConfig(rank=4))
    sd = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    assert all(p.dtype == torch.float32 for p in net.parameters())             # cast, not assigned
    key = "lora_unet_blocks_0_self_attn_q.lora_down.weight"
    torch.testing.assert_close(net.state_dict()[key], sd[key].float())
    partial = {key: torch.zeros(4, 256)}
    with pytest.raises(RuntimeError, match="Missing key"):
        net.load_state_dict(partial)                                            # strict by default
    net.load_state_dict(partial, strict=False)
    assert torch.count_nonzero(net.state_dict()[key]) == 0
    with raises_input(f"adapter weights {key!r}", (3, 3), "shape (4, 256)"):
        net.load_state_dict({key: torch.zeros(3, 3)}, strict=False)
