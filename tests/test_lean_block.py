"""The leaner Wan block training step (issue 22): the same arithmetic with less memory alive at once.

* `ops.norm_to`, `ops.gated_residual`, `ops.rope`, `ops.rms_norm`: custom autograd Functions that write their
  float32 intermediates in place; forward and backward are the plain expressions' ops in the same order, so the
  values are bit-identical (checked here op by op, float32 and bf16, with and without gradients).
* `engine.memory.recompute`: inside a checkpointed block's recompute, tensors declared cheap (the normalized Linear
  inputs, RoPE'd q/k, merged attention heads, the GELU output, the upcast block input) are saved as recipes and
  recomputed in backward: same values, so the same loss and LoRA gradients as keeping them.
* Time path stored as the file has it (bf16): computed in float32 all the same.
* `TrainingConfig.offload_optimizer_state`: the state moves, the arithmetic does not.

A matmul whose operand arrives in another memory layout may round its last bit differently on CPU (bf16 GEMM
kernels differ by layout); the whole-model comparisons below are set up where layouts do not change."""

import pytest
import torch

from engine.errors import MusubiInputError
from engine.memory import lean_ops as ops
from engine.families.wan.dit import WanLayerNorm, apply_rope, rope_cos_sin
from engine.families.wan.loader import load_wan_dit
from engine.lora.adapters import AdapterConfig, AdapterNetwork
from engine.memory.checkpointing import set_block_checkpointing
from engine.training import TrainingConfig


def _grads(fn, *inputs):
    """fn's output and the gradients of a fixed random projection of it w.r.t. every input that requires grad."""
    out = fn(*inputs)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(out.shape, generator=g).to(out.dtype)
    grads = torch.autograd.grad((out.float() * w.float()).sum(), [t for t in inputs if t.requires_grad])
    return out.detach(), grads


def _same(a, b):
    (oa, ga), (ob, gb) = a, b
    assert torch.equal(oa, ob)
    assert len(ga) == len(gb) and all(torch.equal(x, y) for x, y in zip(ga, gb))


def _leaf(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("affine", [False, True])
def test_norm_to_is_the_plain_expression_bit_for_bit(affine):
    norm = WanLayerNorm(32, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + torch.randn(32) * 0.1).requires_grad_(True)
            norm.bias.copy_(torch.randn(32) * 0.1).requires_grad_(True)
    x, shift, scale = _leaf(2, 9, 32), _leaf(2, 1, 32, seed=1, scale=0.1), _leaf(2, 1, 32, seed=2, scale=0.1)
    plain = lambda x, sh, sc: (norm(x) * (1 + sc) + sh).to(torch.bfloat16)
    _same(_grads(lambda x, sh, sc: ops.norm_to(norm, x, torch.bfloat16, sh, sc), x, shift, scale),
          _grads(plain, x, shift, scale))
    _same(_grads(lambda x: ops.norm_to(norm, x, torch.bfloat16), x), _grads(lambda x: norm(x).to(torch.bfloat16), x))
    with torch.no_grad():
        assert torch.equal(ops.norm_to(norm, x, torch.bfloat16, shift, scale), plain(x, shift, scale))


@pytest.mark.parametrize("gated", [False, True])
def test_gated_residual_is_the_plain_expression_bit_for_bit(gated):
    x, branch, gate = _leaf(2, 9, 32), _leaf(2, 9, 32, dtype=torch.bfloat16, seed=1), _leaf(2, 1, 32, seed=2)
    if gated:
        _same(_grads(ops.gated_residual, x, branch, gate), _grads(lambda x, b, g: x + b.float() * g, x, branch, gate))
    else:
        _same(_grads(ops.gated_residual, x, branch), _grads(lambda x, b: x + b.float(), x, branch))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_rms_norm_are_the_plain_expressions_bit_for_bit(dtype):
    cos, sin = rope_cos_sin((2, 3, 3), 16, "cpu")
    x = _leaf(2, 18, 4, 16, dtype=dtype)

    def plain_rope(x):
        pairs = x.float().unflatten(-1, (-1, 2))
        re, im = pairs[..., 0], pairs[..., 1]
        return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)

    _same(_grads(lambda x: apply_rope(x, cos, sin), x), _grads(plain_rope, x))
    weight = _leaf(64, dtype=dtype, seed=3, scale=0.1)
    h = _leaf(2, 18, 64, dtype=dtype, seed=4)
    _same(_grads(lambda h, w: ops.rms_norm(h, w, 1e-6), h, weight), _grads(_RMSNormOutOfPlace.apply, h, weight))


class _RMSNormOutOfPlace(torch.autograd.Function):
    """The RMSNorm Function as it was written before (out-of-place), the reference of the in-place one."""

    @staticmethod
    def forward(ctx, x, weight):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        ctx.save_for_backward(x, weight, rstd)
        return ((xf * rstd).to(x.dtype) * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        g = grad_out.to(torch.promote_types(x.dtype, weight.dtype))
        grad_w = (g * (xf * rstd).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        gn = (g * weight).to(x.dtype).float()
        grad_x = (gn * rstd - xf * rstd.pow(3) * (gn * xf).mean(-1, keepdim=True)).to(x.dtype)
        return grad_x, grad_w


def _tiny_lora(dtype=torch.float32):
    torch.manual_seed(0)
    model = load_wan_dit("preset:tiny-t2v", dtype=dtype)
    for block in model.blocks:   # non-trivial modulation, so every shift/scale/gate matters
        block.modulation.data.normal_(0, 0.1)
    net = AdapterNetwork.create(model, AdapterConfig(rank=4, alpha=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 7, 32, generator=g))
    return model, net, batch


def _step(model, net, batch, amp=True):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        pred = model(*batch)
    loss = pred.float().square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_recomputed_saved_tensors_give_the_same_loss_and_lora_gradients():
    """Checkpointing with bf16 saved inputs, with and without the recipes (`recompute_cheap`), against each other:
    identical; and `recompute_cheap` really changes what is kept (fewer saved bytes in the recompute)."""
    from engine.memory import recompute

    model, net, batch = _tiny_lora()
    results, packed = {}, {}
    for cheap in (True, False):
        set_block_checkpointing(model, True, saved_dtype=torch.bfloat16, recompute_cheap=cheap)
        count = [0]
        original = recompute._Packed.__init__

        def counting(self, *a, _original=original, _count=count):
            _count[0] += 1
            _original(self, *a)

        recompute._Packed.__init__ = counting
        try:
            results[cheap] = _step(model, net, batch)
        finally:
            recompute._Packed.__init__ = original
        packed[cheap] = count[0]
    assert results[True][0] == results[False][0]
    assert all(torch.equal(results[True][1][k], results[False][1][k]) for k in results[False][1])
    # per block: 3 norm outputs (5 users), q/k RoPE, 2 merged heads, GELU, the cross-attention q
    assert packed[False] == 0 and packed[True] >= 2 * 10, packed


def test_time_path_kept_in_the_files_bf16_computes_the_same(tmp_path):
    """A bf16 file: the float32-computed time embedding/projection, head and modulations stay bf16 (the loader no
    longer upcasts them); outputs equal those of float32 copies of the same values."""
    from safetensors.torch import save_file

    from engine.families.wan.presets import build_preset_state_dict

    path = tmp_path / "tiny_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in build_preset_state_dict("tiny-t2v").items()},
              str(path))
    lean = load_wan_dit(str(path), dtype=torch.bfloat16)
    assert lean.time_projection[1].weight.dtype == torch.bfloat16 and lean.head.head.weight.dtype == torch.bfloat16
    upcast = load_wan_dit(str(path), dtype=torch.bfloat16)
    for name, p in upcast.named_parameters():
        if name.startswith(("time_embedding.", "time_projection.", "head.")) or name.endswith("modulation"):
            p.data = p.data.float()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        assert torch.equal(lean(x, t, ctx), upcast(x, t, ctx))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(lean(x, t, ctx), upcast(x, t, ctx))
    # a float32 file keeps them float32 (bf16 would round them)
    assert load_wan_dit("preset:tiny-t2v", dtype=torch.bfloat16).time_projection[1].weight.dtype == torch.float32


def test_optimizer_state_offload_setting(tmp_path):
    from engine.training import InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TrainingSession
    from engine.training.optimizers import move_optimizer_state

    with pytest.raises(MusubiInputError, match="offload_optimizer_state"):
        TrainingConfig(offload_optimizer_state="yes").validate()
    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(1, 16, 2, 4, 4, generator=g), "context": [torch.randn(6, 32, generator=g)]}
               for _ in range(2)]
    runs = {}
    for offload in (False, True):
        model = load_wan_dit("preset:tiny-t2v", dtype=torch.float32)
        cfg = TrainingConfig(output_dir=str(tmp_path / str(offload)), max_train_steps=3, seed=5,
                             offload_optimizer_state=offload)
        session = TrainingSession(model, NetworkConfig(rank=4, alpha=2), OptimizerConfig(learning_rate=1e-3),
                                  InMemoryBatchLoader(batches, seed=1), cfg)
        runs[offload] = (session.train_steps(3), {k: v.clone() for k, v in session.network.state_dict().items()})
        state = [v for s in session.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
        assert state and all(v.device.type == "cpu" for v in state)
        assert move_optimizer_state(session.optimizer, "cpu") == 0      # already there: nothing moves
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])
