"""LoRA views (engine/lora/views.py) on the tiny Wan preset, without ComfyUI: a view shares the source's weights,
carries its own LoRAs (adapter or merged copy-on-write), never stacks, and a view of a view keeps upstream LoRAs."""

import torch

from engine.lora import network_from_lora, read_lora
from engine.lora.views import add_network, lora_stack, make_lora_view, merge_into_view
from lora_fixtures import random_lora_factors, reference_delta, tiny_model


def _lora(model, seed):
    factors = random_lora_factors(model, rank=4, seed=seed, blocks=[0])
    state = {}
    for name, (down, up, alpha) in factors.items():
        stem = "diffusion_model." + name
        state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
    return read_lora(state), factors


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([300.0]), [torch.randn(5, 32, generator=g)]


def _with_delta(model, factors, strength):
    ref = tiny_model()
    with torch.no_grad():
        for name, (down, up, alpha) in factors.items():
            ref.get_submodule(name).weight += strength * reference_delta(down, up, alpha)
    return ref


@torch.no_grad()
def test_adapter_and_merged_views_leave_the_source_untouched_and_never_stack():
    source = tiny_model()
    x, t, ctx = _inputs()
    clean = source(x, t, ctx)
    lora, factors = _lora(source, 1)
    expected = _with_delta(source, factors, 0.5)(x, t, ctx)

    view = make_lora_view(source)
    assert view.blocks[0].self_attn.q.weight is source.blocks[0].self_attn.q.weight    # shared, not copied
    net = network_from_lora(view, lora, "a", 0.5).attach(view)
    add_network(view, net, {"name": "a", "strength": 0.5, "mode": "adapter", "node": "1"})
    torch.testing.assert_close(view(x, t, ctx), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(source(x, t, ctx), clean)                                          # source has no LoRA
    assert [e["name"] for e in lora_stack(view)] == ["a"] and lora_stack(source) == []

    again = make_lora_view(source)                                                        # re-apply: fresh view
    merge_into_view(again, lora, 0.5, sorted(factors), {"name": "a", "strength": 0.5, "mode": "merge", "node": "1"})
    torch.testing.assert_close(again(x, t, ctx), expected, rtol=1e-4, atol=1e-5)          # once, not twice
    assert torch.equal(source(x, t, ctx), clean)                                          # copy-on-write
    assert again.blocks[0].self_attn.q.weight is not source.blocks[0].self_attn.q.weight
    assert again.blocks[1].self_attn.q.weight is source.blocks[1].self_attn.q.weight


@torch.no_grad()
def test_a_view_of_a_view_keeps_the_upstream_lora():
    source = tiny_model()
    x, t, ctx = _inputs()
    first, f1 = _lora(source, 1)
    second, f2 = _lora(source, 2)
    up = make_lora_view(source)
    add_network(up, network_from_lora(up, first, "first", 1.0).attach(up), {"name": "first", "strength": 1.0,
                                                                             "mode": "adapter", "node": "1"})
    down = make_lora_view(up)
    merge_into_view(down, second, 1.0, sorted(f2), {"name": "second", "strength": 1.0, "mode": "merge", "node": "2"})
    assert [e["name"] for e in lora_stack(down)] == ["first", "second"]
    ref = _with_delta(source, f1, 1.0)
    with torch.no_grad():
        for name, (d, u, a) in f2.items():
            ref.get_submodule(name).weight += reference_delta(d, u, a)
    torch.testing.assert_close(down(x, t, ctx), ref(x, t, ctx), rtol=1e-4, atol=1e-5)
