"""Activation offload, placement helpers and per-block compile (engine.memory.offload / placement / compile)."""

import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

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
    # one host->device copy per block, for the recompute in backward: the forward runs on the caller's x
    assert stats.tensors_restored == 4


def test_checkpoint_offload_forward_runs_on_x_and_keeps_only_the_host_copy():
    """Forward runs on the caller's x (no host->device copy); the recompute runs on the restored copy; x itself is
    not kept alive by the checkpoint (only its host copy is)."""
    block = make_blocks(1)[0]
    seen = []
    leaf = torch.randn(2, 3, 32, requires_grad=True)
    x = leaf * 1.0                      # non-leaf: only the graph could keep it alive
    x_ptr, x_ref = x.data_ptr(), weakref.ref(x)
    orig = block.forward

    def spy(xx, s):
        seen.append((xx.data_ptr(), torch.is_grad_enabled()))
        return orig(xx, s)
    block.forward = spy
    y = checkpoint_block(block, x, 1.0, offload=True)
    del x
    gc.collect()
    assert x_ref() is None
    y.sum().backward()
    assert seen[0] == (x_ptr, False)                    # forward: x itself, no graph
    assert seen[1][0] != x_ptr and seen[1][1] is True   # recompute: the restored copy, with grad
    ref = make_blocks(1)[0]
    x2 = leaf.detach().clone().requires_grad_(True)
    ref(x2, 1.0).sum().backward()
    torch.testing.assert_close(leaf.grad, x2.grad, rtol=0, atol=0)


class _CrossDeviceCopies(TorchDispatchMode):
    """Records (source device, destination device) of every copy between devices."""

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst = args[0].device, kwargs.get("device") or args[0].device
            if src != dst:
                self.copies.append((src.type, torch.device(dst).type))
        elif func is torch.ops.aten.copy_.default and args[0].device != args[1].device:
            self.copies.append((args[1].device.type, args[0].device.type))
        return func(*args, **kwargs)


def test_checkpoint_offload_moves_x_twice_per_block_and_never_a_gradient():
    """With shape-only tensors (FakeTensorMode, like the memory simulation), the device played by cpu and the host by
    meta: per block exactly one device->host copy (forward) and one host->device copy (recompute); gradients stay
    on the device (the former implementation made 5 copies per block, 2 of them of the gradient)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        blocks = make_blocks(3)
        x = torch.randn(2, 7, 32, requires_grad=True)
        stats = OffloadStats()
        with _CrossDeviceCopies() as mode:
            h = x
            for b in blocks:
                h = checkpoint_block(b, h, torch.tensor(0.5), offload=True, host="meta", stats=stats)
            assert mode.copies == [("cpu", "meta")] * 3
            h.pow(2).sum().backward()
        assert mode.copies == [("cpu", "meta")] * 3 + [("meta", "cpu")] * 3
        assert x.grad.device.type == "cpu" and all(p.grad.device.type == "cpu" for p in blocks.parameters())
    assert stats.tensors_offloaded == 3 and stats.tensors_restored == 3


def test_checkpoint_offload_gradients_of_other_arguments():
    """A tensor argument that requires grad (a full fine-tune's context / e0), also one nested in a tuple or passed
    as keyword, gets its gradient; non-tensor and None arguments pass through."""

    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)

        def forward(self, x, scale, maybe, pair, *, bias):
            assert maybe is None
            cos, sin = pair
            return x + self.lin(x * cos + sin) * scale + bias

    def run(mode):
        torch.manual_seed(0)
        blocks = nn.ModuleList(Multi() for _ in range(3))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 7, 32, generator=g, requires_grad=True)
        scale = torch.randn(32, generator=g, requires_grad=True)
        cos = torch.randn(7, 32, generator=g, requires_grad=True)
        sin = torch.randn(7, 32, generator=g)
        bias = torch.randn(32, generator=g, requires_grad=True)
        h = x
        for b in blocks:
            if mode == "plain":
                h = b(h, scale, None, (cos, sin), bias=bias)
            else:
                h = checkpoint_block(b, h, scale, None, (cos, sin), offload=True, bias=bias)
        h.pow(2).sum().backward()
        return [x.grad, scale.grad, cos.grad, bias.grad] + [p.grad for p in blocks.parameters()], sin.grad

    got, got_sin = run("offload")
    ref, _ = run("plain")
    assert got_sin is None and all(g is not None for g in got)
    for u, v in zip(got, ref):
        # per-block contributions to a shared argument are summed in another order than in one graph
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


def test_checkpoint_offload_replays_dropout_and_restores_caller_rng():
    class DropBlock(Block):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x, scale):
            return x + self.drop(self.b(torch.tanh(self.a(x)))) * scale

    torch.manual_seed(0)
    blocks = nn.ModuleList(DropBlock() for _ in range(3)).train()

    def run(offload):
        blocks.zero_grad(set_to_none=True)
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(123)
        h = x
        for b in blocks:
            h = checkpoint_block(b, h, 0.5, offload=True) if offload else b(h, 0.5)
        torch.rand(5)                       # the caller draws between forward and backward
        h.pow(2).sum().backward()
        after = torch.rand(5)               # the recompute must not disturb the caller's stream
        return [h.detach(), x.grad] + [p.grad.clone() for p in blocks.parameters()], after

    got, got_after = run(True)
    ref, ref_after = run(False)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert torch.equal(got_after, ref_after)


def test_checkpoint_offload_replays_autocast():
    blocks = make_blocks()

    def run(mode, enabled=True):
        blocks.zero_grad(set_to_none=True)
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            h = x
            for b in blocks:
                h = checkpoint_block(b, h, 0.5, offload=mode == "offload")
        h.pow(2).sum().backward()   # backward outside autocast: the recompute re-enters it
        return [h.detach(), x.grad] + [p.grad.clone() for p in blocks.parameters()]

    got = run("offload")
    for u, v in zip(got, run("ckpt")):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert not torch.equal(got[1], run("offload", enabled=False)[1])   # autocast did change the computation


def test_checkpoint_offload_trains_parameters_when_no_input_requires_grad():
    """The first block's input (patch embedding of latents) needs no gradient, yet adapters in the block do."""
    blocks = make_blocks(2)
    x = torch.randn(2, 7, 32)
    h = x
    for b in blocks:
        h = checkpoint_block(b, h, 0.5, offload=True)
    h.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.parameters())
    assert x.grad is None
    with torch.no_grad():                   # no backward coming: nothing is saved or copied
        stats = OffloadStats()
        assert torch.equal(checkpoint_block(blocks[0], x, 0.5, offload=True, stats=stats), blocks[0](x, 0.5))
        assert stats.tensors_offloaded == 0


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
