"""Activation offload with the restore prefetched in backward (`checkpoint_block(..., prefetch=True)`,
`set_block_checkpointing(..., prefetch=True)`): same gradients, each input restored once, one more input live."""

import torch

from engine.memory import OffloadStats, checkpoint_block


class _Block(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x, scale):
        return x + self.drop(torch.tanh(self.lin(x))) * scale


def _run(blocks, prefetch, saved_dtype=None):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    scale = torch.tensor(0.7, requires_grad=True)
    stats = OffloadStats()
    h = x
    for b in blocks:
        h = checkpoint_block(b, h, scale, offload=True, host="cpu", stats=stats, prefetch=prefetch,
                             saved_dtype=saved_dtype)
    h.square().sum().backward()
    grads = [x.grad, scale.grad] + [p.grad.clone() for b in blocks for p in b.parameters()]
    for b in blocks:
        b.zero_grad(set_to_none=True)
    return grads, stats


def test_prefetched_restore_gives_identical_gradients_and_restores_each_input_once():
    blocks = [_Block(i).train() for i in range(4)]
    for saved_dtype in (None, torch.bfloat16):
        plain, s_plain = _run(blocks, False, saved_dtype)
        pre, s_pre = _run(blocks, True, saved_dtype)
        for a, b in zip(plain, pre):
            assert torch.equal(a, b)
        assert s_pre.tensors_offloaded == s_pre.tensors_restored == s_plain.tensors_restored == 4


def test_prefetch_starts_the_next_restore_before_the_block_recomputes():
    """While block k recomputes, block k-1's input is already back on the device (restored from the early copy)."""
    from engine.memory import offload

    order = []
    original = offload._Saved.prefetch

    def spy(self):
        order.append(("prefetch", self.host_x is not None))
        original(self)

    class Tracing(_Block):
        def forward(self, x, scale):
            if torch.is_grad_enabled():
                order.append(("recompute", self.index))
            return super().forward(x, scale)

    blocks = []
    for i in range(3):
        b = Tracing(i)
        b.index = i
        blocks.append(b)
    offload._Saved.prefetch = spy
    try:
        _run(blocks, True)
    finally:
        offload._Saved.prefetch = original
    assert order == [("prefetch", True), ("recompute", 2), ("prefetch", True), ("recompute", 1), ("recompute", 0)]
