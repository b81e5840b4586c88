"""Token-chunked training (engine/memory/chunked.py): the same values and gradients as the unchunked part, with the
adapters' dropout replayed, weights re-pointed between forward and backward (block swap), under both kinds of
gradient checkpointing, and a lower backward peak."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.lora.adapters import AdapterConfig, AdapterNetwork, make_adapter
from engine.memory import checkpoint_block
from engine.memory.chunked import chunked
from engine.memory.meter import LiveMemoryMeter

D, WIDE, L = 8, 48, 11


class Part(nn.Module):
    """x + fc2(gelu(fc1(x))) * gate: token-wise, with LoRA adapters on both Linears."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, WIDE), nn.Linear(WIDE, D)

    def fn(self, x, gate):
        return x + self.fc2(F.gelu(self.fc1(x))) * gate

    def forward(self, x, gate, chunk):
        return chunked(self.fn, (x,), (gate,), (self,), chunk=chunk)


def _part(dropout=None, seed=0):
    torch.manual_seed(seed)
    part = Part().requires_grad_(False)
    net = AdapterNetwork()
    for name in ("fc1", "fc2"):
        net.add(name, make_adapter(getattr(part, name), AdapterConfig(rank=4, alpha=4, dropout=dropout)))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return part, net.attach(part)


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, L, D, generator=g).requires_grad_(True),
            torch.randn(2, 1, D, generator=g).requires_grad_(True))


def _step(part, net, chunk, seed=5, wrap=None):
    """Output, input gradients and adapter gradients of sum(out * w) with the RNG at `seed`."""
    x, gate = _inputs()
    net.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = wrap(part, x, gate, chunk) if wrap else part(x, gate, chunk)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out * w).sum().backward()
    return out.detach(), [x.grad, gate.grad] + [p.grad.clone() for p in net.parameters()]


def _close(a, b):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa, ob, rtol=1e-6, atol=1e-6)
    assert len(ga) == len(gb)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_chunks_give_the_unchunked_values_and_gradients():
    part, net = _part()
    whole = _step(part, net, chunk=L)            # one chunk: the plain expression
    for chunk in (1, 3, 4, 10):
        _close(_step(part, net, chunk), whole)
    with torch.no_grad():                        # no graph: the plain call
        x, gate = _inputs()
        assert torch.equal(part(x, gate, 3), part.fn(x, gate))


def test_adapters_train_when_no_input_needs_a_gradient():
    """The first block of a frozen DiT: its inputs need no gradient, the adapters inside the part do."""
    part, net = _part()
    x, gate = (t.detach() for t in _inputs())
    grads = []
    for chunk in (L, 3):
        net.zero_grad(set_to_none=True)
        part(x, gate, chunk).square().sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for whole, chunked_grad in zip(*grads):
        torch.testing.assert_close(chunked_grad, whole, rtol=1e-5, atol=1e-6)


def test_a_token_input_the_part_does_not_use_gets_a_zero_gradient():
    x, unused = _inputs()[0], torch.randn(2, L, D).requires_grad_(True)
    chunked(lambda a, b: a * 2, (x, unused), chunk=3).sum().backward()
    assert torch.equal(unused.grad, torch.zeros_like(unused)) and torch.equal(x.grad, torch.full_like(x, 2.0))


def test_adapter_dropout_is_replayed_in_backward():
    part, net = _part(dropout=0.5)
    net.train()

    def loop(part, x, gate, chunk):                # the same chunks in plain autograd: the same RNG draws
        return torch.cat([part.fn(x[:, s:s + chunk], gate) for s in range(0, L, chunk)], dim=1)

    _close(_step(part, net, 3), _step(part, net, 3, wrap=loop))


def test_weights_re_pointed_after_forward_are_not_used_in_backward():
    """A block swapper re-binds a block's frozen weights to host tensors after it ran: the backward must use the
    tensors the forward used."""
    part, net = _part()
    reference = _step(part, net, 3)

    def evicting(part, x, gate, chunk):
        out = part(x, gate, chunk)
        for lin in (part.fc1, part.fc2):
            lin._parameters["weight"] = nn.Parameter(torch.zeros_like(lin.weight), requires_grad=False)
        return out

    before = part.fc1.weight
    _close(_step(part, net, 3, wrap=evicting), reference)
    assert part.fc1.weight.eq(0).all() and not before.eq(0).all()   # the module keeps what it was re-bound to


@pytest.mark.parametrize("kind", ["torch", "offloaded"])
def test_inside_gradient_checkpointing(kind):
    part, net = _part()
    reference = _step(part, net, L)

    def wrapped(part, x, gate, chunk):
        if kind == "torch":   # non-reentrant: the saved tensors (weights included) come back from the recompute
            return checkpoint(part, x, gate, chunk, use_reentrant=False)
        return checkpoint_block(part, x, gate, chunk, offload=True)

    _close(_step(part, net, 3, wrap=wrapped), reference)


def test_backward_peak_is_lower():
    """The wide [L, 48] intermediates and their gradients exist for one chunk at a time."""
    def peak(chunk):
        part, net = _part()
        x, gate = _inputs()
        with LiveMemoryMeter("cpu") as meter:
            part(x, gate, chunk).sum().backward()
        return meter.report().peak_bytes

    assert peak(2) < 0.6 * peak(L)
