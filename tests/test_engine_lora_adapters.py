"""Adapters: forward = (W + ΔW)x, attach/replace/detach, several networks, Musubi state dict naming."""

import re

import pytest
import torch

from engine.errors import MusubiInputError
from engine.lora import AdapterConfig, AdapterNetwork, LoHaModule, LoKrModule, LoRAModule, select_targets
from engine.lora.adapters import attached_networks, lokr_factorization

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
