"""Activation offload, placement helpers and per-block compile (engine.memory.offload / placement / compile)."""

import pytest
import torch
import torch.nn as nn

from engine.errors import MusubiInputError
from engine.memory import (CompileConfig, OffloadStats, bytes_to_move, checkpoint_block, compile_blocks,
                           estimate_module_bytes, move_to, offload_after_use, offload_saved_tensors,
                           set_before_move_hook, uncompile_blocks)


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.a = nn.Linear(d, 2 * d)
        self.b = nn.Linear(2 * d, d)

    def forward(self, x, scale):
        return x + self.b(torch.tanh(self.a(x))) * scale


def make_blocks(n=4, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(Block() for _ in range(n))


def grads_of(blocks, mode, stats=None):
    blocks.zero_grad(set_to_none=True)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    scale = torch.tensor(0.5)
    h = x
    for b in blocks:
        if mode == "plain":
            h = b(h, scale)
        elif mode == "ckpt":
            h = checkpoint_block(b, h, scale)
        elif mode == "ckpt_offload":
            h = checkpoint_block(b, h, scale, offload=True, stats=stats)
    if mode == "saved_hooks":
        with offload_saved_tensors(stats=stats):
            h = x
            for b in blocks:
                h = b(h, scale)
    h.pow(2).sum().backward()
    return [h.detach()] + [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]


def test_checkpoint_offload_same_gradients_and_input_lives_on_host():
    blocks = make_blocks()
    ref = grads_of(blocks, "plain")
    for got in (grads_of(blocks, "ckpt"), grads_of(blocks, "ckpt_offload", OffloadStats())):
        for u, v in zip(got, ref):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    stats = OffloadStats()
    grads_of(blocks, "ckpt_offload", stats)
    assert stats.tensors_offloaded == 4 and stats.bytes_offloaded == 4 * 2 * 7 * 32 * 4
    assert stats.tensors_restored == 8          # forward + recompute in backward, per block


def test_checkpoint_offload_stores_host_copy_not_the_input():
    """The tensor checkpoint keeps is the host copy made by the offload, not the caller's tensor."""
    block = make_blocks(1)[0]
    seen = []
    x = torch.randn(2, 3, 32, requires_grad=True)
    orig = block.forward

    def spy(xx, s):
        seen.append(xx)
        return orig(xx, s)
    block.forward = spy
    checkpoint_block(block, x, 1.0, offload=True).sum().backward()
    assert len(seen) == 2 and all(t.data_ptr() != x.data_ptr() for t in seen)


def test_saved_tensor_offload_same_gradients_and_counts():
    blocks = make_blocks()
    ref = grads_of(blocks, "plain")
    stats = OffloadStats()
    got = grads_of(blocks, "saved_hooks", stats)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert stats.tensors_offloaded > 0 and stats.tensors_restored == stats.tensors_offloaded


# --- placement ----------------------------------------------------------------------------------------------------------

def test_estimate_and_move_cheap_when_already_there():
    m = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20))
    m.register_buffer("buf", torch.zeros(5, dtype=torch.float16))
    assert estimate_module_bytes(m) == (10 * 20 + 20 + 20 + 20) * 4 + 5 * 2
    assert bytes_to_move(m, "cpu") == 0
    calls = []
    prev = set_before_move_hook(lambda n, d: calls.append((n, d)))
    try:
        w = m[0].weight
        assert move_to(m, "cpu") is m and calls == [] and m[0].weight is w
        assert bytes_to_move(m, "meta") == estimate_module_bytes(m)
        move_to(m, "meta")                                  # meta stands in for an accelerator
        assert m[0].weight.device.type == "meta" and m.buf.device.type == "meta"
        assert bytes_to_move(m, "meta") == 0
        assert calls == []                                  # cpu/meta never ask the host application for room
    finally:
        set_before_move_hook(prev)


def test_before_move_hook_gets_bytes_and_device(monkeypatch):
    from engine.memory import placement

    calls = []
    prev = set_before_move_hook(lambda n, d: calls.append((n, str(d))))
    try:
        placement.request_room(1234, "cuda:0")
        placement.request_room(0, "cuda:0")     # nothing to ask for
        placement.request_room(99, "cpu")
    finally:
        set_before_move_hook(prev)
    assert calls == [(1234, "cuda:0")]


def test_offload_after_use_moves_back_even_on_error(monkeypatch):
    # no second real device on a CPU machine: record the moves instead (move_to itself is tested above)
    from engine.memory import placement

    moves = []
    monkeypatch.setattr(placement, "move_to", lambda m, d, exclude=(): moves.append(str(d)))
    m = nn.Linear(4, 4)
    with offload_after_use(m, "cuda", offload_device="cpu"):
        assert moves == ["cuda"]
    assert moves == ["cuda", "cpu"]
    with pytest.raises(KeyError):
        with offload_after_use(m, "cuda"):
            raise KeyError("boom")
    assert moves[2:] == ["cuda", "cpu"]
    with offload_after_use(m, "cuda", enabled=False):
        pass
    assert moves[4:] == ["cuda"]


# --- compile --------------------------------------------------------------------------------------------------------

def _failing_backend(gm, example_inputs):
    raise RuntimeError("deliberately broken compiler backend")


def test_compile_blocks_falls_back_gracefully():
    blocks = make_blocks(2)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        ref = [b(x, 1.0) for b in blocks]
    with pytest.warns(UserWarning, match="running it eagerly"):
        report = compile_blocks(blocks, CompileConfig(backend=_failing_backend))
        with torch.no_grad():
            got = [b(x, 1.0) for b in blocks]
    assert report.compiled == [] and sorted(report.fell_back) == [0, 1]
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    uncompile_blocks(blocks)
    assert "forward" not in blocks[0].__dict__


def test_compile_blocks_eager_backend_runs_and_hooks_still_fire():
    blocks = make_blocks(1)
    fired = []
    blocks[0].register_forward_pre_hook(lambda m, a: fired.append(1))
    report = compile_blocks(blocks, CompileConfig(backend="eager"))
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        y = blocks[0](x, 1.0)
    assert report.compiled == [0] and fired == [1]
    uncompile_blocks(blocks)
    with torch.no_grad():
        assert torch.allclose(y, blocks[0](x, 1.0))


def test_compile_mode_validated():
    with pytest.raises(MusubiInputError, match="compile mode"):
        compile_blocks(make_blocks(1), CompileConfig(mode="fastest"))
