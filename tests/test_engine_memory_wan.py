"""The memory engine on the tiny Wan DiT preset: fp8 targets, block swap with LoRA adapters and checkpointing."""

import pytest
import torch

from engine.memory.checkpointing import set_block_checkpointing
from engine.errors import MusubiInputError
from engine.lora.adapters import AdapterConfig, AdapterNetwork
from engine.memory import (FakeTransfer, Fp8Linear, fp8_summary, pinned_bytes_in_use, quantize_model_fp8,
                           swap_blocks)
from lora_fixtures import tiny_model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 7, 32, generator=g)
    return x, t, ctx


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_targets_on_wan_are_block_linears_without_norms_or_modulation():
    m = tiny_model(dtype=torch.bfloat16)
    converted = set(quantize_model_fp8(m, "scaled"))
    block_linears = {"self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                     "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"}
    assert converted == {f"blocks.{i}.{n}" for i in range(2) for n in block_linears}
    mods = dict(m.named_modules())
    for name in ("text_embedding.0", "time_embedding.0", "time_projection.1", "head.head"):
        # left as they were (the time path and head are float32-computing Linears, `dit.Float32Linear`)
        assert isinstance(mods[name], torch.nn.Linear) and mods[name].weight.dtype != torch.float8_e4m3fn
    assert m.blocks[0].modulation.dtype == torch.float32          # kept fp32 by the loader, untouched
    assert fp8_summary(m)["block"] == 20


def test_fp8_wan_forward_close_to_bf16():
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = tiny_model(dtype=torch.bfloat16)(x, t, ctx).float()
        errs = {}
        for mode in ("e4m3", "scaled"):
            m = tiny_model(dtype=torch.bfloat16)
            quantize_model_fp8(m, mode)
            errs[mode] = rel_err(m(x, t, ctx), ref)
    # fp8 rounding through two blocks and a residual stream: measured 0.0096 (e4m3) / 0.0102 (scaled) on CPU; 2×
    # that still fails a coarser format (rounding through e5m2 gives 0.028–0.030)
    assert errs["scaled"] < 0.02 and errs["e4m3"] < 0.02, errs


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_block_swap_with_lora_identical_on_wan(gc, fp8):
    def run(swap: bool):
        torch.manual_seed(0)
        m = tiny_model()
        m.requires_grad_(False)
        if fp8:
            quantize_model_fp8(m, "scaled")
        set_block_checkpointing(m, gc)
        net = AdapterNetwork.create(m, AdapterConfig(rank=4, alpha=4))
        with torch.no_grad():
            for p in net.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.05)
        sw = swap_blocks(m, 1, "cpu", transfer=FakeTransfer()) if swap else None
        outs = []
        for step in range(2):
            x, t, ctx = inputs(step)
            y = m(x, t, ctx)
            y.pow(2).mean().backward()
            outs.append([y.detach()] + [p.grad.clone() for p in net.trainable_parameters()])
            net.zero_grad(set_to_none=True)
        if sw is not None:
            assert sw.transfer.log.of("run").count(sw.swapped[0]) == (4 if gc else 2)
            sw.detach()
        return outs

    base = pinned_bytes_in_use()
    for a, b in zip(run(False), run(True)):
        assert len(a) == len(b) > 1
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    assert pinned_bytes_in_use() == base


def test_block_swap_count_validated_per_model():
    m = tiny_model()
    with pytest.raises(MusubiInputError, match=r"blocks_to_swap.*0 to 1 \(tiny-t2v has 2 blocks"):
        swap_blocks(m, 2, "cpu", transfer=FakeTransfer())
