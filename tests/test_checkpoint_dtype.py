"""What gradient checkpointing saves of each block input (`set_block_checkpointing(..., saved_dtype=...)`,
`TrainingConfig.checkpoint_dtype`): the compute dtype (bf16) by default under mixed precision, float32 for exactness.

The forward always runs on the exact float32 residual stream, so the loss is identical; only the backward's recompute
starts from the rounded input. Measured on the tiny t2v preset (CPU, bf16 autocast, one step, rank-4 LoRA with
non-zero up weights): LoRA gradients differ from the float32-saved path by 0.50 % (norm of the difference over the
norm, all adapters together; worst single tensor 1.2 %, cosine 0.99999), which is half of what bf16 autocast itself
changes against a float32 step (1.08 %). Tolerance: 1 % overall, 3 % per tensor, and below autocast's own change."""

import pytest
import torch

from engine.errors import MusubiInputError
from engine.families.wan.loader import load_wan_dit
from engine.lora.adapters import AdapterConfig, AdapterNetwork
from engine.memory import OffloadStats, checkpoint_block
from engine.memory.checkpointing import set_block_checkpointing
from engine.training import TrainingConfig


def _tiny_with_lora():
    torch.manual_seed(0)
    model = load_wan_dit("preset:tiny-t2v", dtype=torch.float32)
    net = AdapterNetwork.create(model, AdapterConfig(rank=4, alpha=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():   # up weights start at zero: give the down weights a gradient to compare
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 32, generator=g))
    return model, net, batch, torch.randn(1, 16, 2, 4, 4, generator=g)


def _step(model, net, batch, target, saved_dtype, amp=True, checkpointing=True):
    net.zero_grad(set_to_none=True)
    set_block_checkpointing(model, checkpointing, saved_dtype=saved_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        pred = model(*batch)
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _rel(a: dict, b: dict) -> float:
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b])
    return (diff.norm() / torch.cat([v.flatten() for v in b.values()]).norm()).item()


def test_bf16_saved_inputs_keep_the_loss_and_lora_gradients_within_tolerance():
    model, net, batch, target = _tiny_with_lora()
    loss32, grads32 = _step(model, net, batch, target, None)
    loss16, grads16 = _step(model, net, batch, target, torch.bfloat16)
    _, exact = _step(model, net, batch, target, None, amp=False, checkpointing=False)
    assert loss16 == loss32                       # the forward runs on the exact residual stream
    assert grads16.keys() == grads32.keys() and len(grads32) == 40   # 2 blocks × 10 Linears × (down, up)
    err, floor = _rel(grads16, grads32), _rel(grads32, exact)
    assert 0 < err < 0.01, err                    # > 0: the recompute really starts from the rounded input
    assert err < floor, (err, floor)              # smaller than what bf16 autocast changes anyway
    for k in grads32:
        assert (grads16[k] - grads32[k]).norm() <= 0.03 * grads32[k].norm(), k


def test_without_mixed_precision_saved_dtype_float32_is_bit_identical():
    """saved_dtype float32 on a float32 stream (what "compute" means without autocast) takes the exact path."""
    model, net, batch, target = _tiny_with_lora()
    _, plain = _step(model, net, batch, target, None, amp=False)
    _, same = _step(model, net, batch, target, torch.float32, amp=False)
    for k in plain:
        assert torch.equal(plain[k], same[k]), k


def test_offloaded_input_in_bf16_moves_half_the_bytes():
    block = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    bytes_moved = {}
    for dtype in (None, torch.bfloat16):
        stats = OffloadStats()
        checkpoint_block(block, x, offload=True, host="cpu", stats=stats, saved_dtype=dtype).sum().backward()
        bytes_moved[dtype] = stats.bytes_offloaded
        assert x.grad is not None and x.grad.dtype == torch.float32
        x.grad = None
    assert bytes_moved[torch.bfloat16] * 2 == bytes_moved[None] == 4 * 8 * 4


def test_checkpoint_dtype_setting_is_checked():
    TrainingConfig(checkpoint_dtype="float32").validate()
    with pytest.raises(MusubiInputError, match="checkpoint_dtype"):
        TrainingConfig(checkpoint_dtype="bf16").validate()


def test_training_session_saves_block_inputs_in_the_compute_dtype_unless_float32(tmp_path):
    from engine.training import InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TrainingSession

    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(1, 16, 2, 4, 4, generator=g), "context": [torch.randn(6, 32, generator=g)]}
               for _ in range(2)]
    losses, saved = {}, {}
    for mixed, ckpt in (("bf16", "compute"), ("bf16", "float32"), ("no", "compute")):
        model = load_wan_dit("preset:tiny-t2v", dtype=torch.float32)
        cfg = TrainingConfig(output_dir=str(tmp_path / f"{mixed}-{ckpt}"), max_train_steps=3, mixed_precision=mixed,
                             checkpoint_dtype=ckpt, seed=5)
        session = TrainingSession(model, NetworkConfig(rank=4, alpha=2), OptimizerConfig(learning_rate=1e-3),
                                  InMemoryBatchLoader(batches, seed=1), cfg)
        losses[mixed, ckpt] = session.train_steps(3)
        saved[mixed, ckpt] = type(model.blocks[0])._checkpoint_options.saved_dtype
    assert saved == {("bf16", "compute"): torch.bfloat16, ("bf16", "float32"): None, ("no", "compute"): None}
    # LoRA up starts at zero, so the first step's gradients are exact either way; later losses stay close
    assert losses["bf16", "compute"][0] == losses["bf16", "float32"][0]
    torch.testing.assert_close(losses["bf16", "compute"], losses["bf16", "float32"], rtol=1e-3, atol=1e-5)
