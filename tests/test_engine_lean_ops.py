"""Memory-lean training ops: the q/k RMSNorm (engine/memory/lean_ops.py) and the fp8 Linear's autograd Function:
same forward bit for bit, same gradients, less saved for backward."""

import pytest
import torch

from engine.memory.fp8 import Fp8Linear, dequantize_weight, quantize_weight
from engine.memory import lean_ops as ops


def _plain_rms(x, w, eps):
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * w).to(x.dtype)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the tensors autograd saves for backward while running fn (parameters and inputs included)."""
    total = []

    def pack(t):
        total.append(t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(total)


def _grads(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    fn(*inputs).backward(grad_out)
    return [None if t.grad is None else t.grad.clone() for t in inputs]


def _leaves(*tensors, grads=None):
    grads = grads or [True] * len(tensors)
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grads)]


g = torch.Generator().manual_seed(0)
B, L, D, H = 2, 24, 64, 4


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                          (torch.bfloat16, torch.float32)])
def test_rms_norm(dtype, wdtype):
    x = (torch.randn(B, L, D, generator=g) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g)).to(wdtype)
    a, b = _leaves(x, w), _leaves(x, w)
    assert torch.equal(ops.rms_norm(*a, 1e-6), _plain_rms(*b, 1e-6))
    go = torch.randn(B, L, D, generator=g).to(dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for u, v in zip(_grads(lambda *t: ops.rms_norm(*t, 1e-6), a, go), _grads(lambda *t: _plain_rms(*t, 1e-6), b, go)):
        torch.testing.assert_close(u.float(), v.float(), **tol)
    frozen_w = w.clone()   # Wan's q/k norm weights are frozen in LoRA training: only the input is saved
    lean = _saved_bytes(lambda: ops.rms_norm(a[0], frozen_w, 1e-6))
    plain = _saved_bytes(lambda: _plain_rms(b[0], frozen_w, 1e-6))
    assert lean < plain and lean <= x.numel() * x.element_size() + B * L * 4 + frozen_w.numel() * 4


def test_fp8_linear_training_keeps_fp8_weight_not_dequantized_copy():
    lin = torch.nn.Linear(256, 128)
    fp8 = Fp8Linear.from_linear(lin, "scaled")
    x = torch.randn(4, 9, 256, generator=g).to(torch.bfloat16).requires_grad_(True)
    out = fp8(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(ref_x, fp8.dequantized_weight(torch.bfloat16), fp8.bias.to(torch.bfloat16))
    assert torch.equal(out, ref)
    go = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    out.backward(go)
    ref.backward(go)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)
    saved = _saved_bytes(fp8, x)
    assert saved <= 256 * 128 + 128 * 4 * 4 + 64   # the fp8 weight and its scales, no bf16 weight, no input


def test_chunked_dequantize_is_exact(monkeypatch):
    import engine.memory.fp8 as fp8mod
    w = torch.randn(300, 128, generator=g)
    for mode, granularity in (("scaled", "block"), ("scaled", "channel"), ("scaled", "tensor"), ("e4m3", "block")):
        q, s = quantize_weight(w, mode, 64, granularity)
        whole = dequantize_weight(q, s, torch.bfloat16)
        monkeypatch.setattr(fp8mod, "_DEQUANT_CHUNK_BYTES", 4 * 128 * 7)   # 7 rows per chunk
        assert torch.equal(dequantize_weight(q, s, torch.bfloat16), whole)
        monkeypatch.undo()


def test_block_gradients_match_plain_ops(monkeypatch):
    """A tiny Wan model with LoRA: the lean RMSNorm gives the gradients of the plain expression."""
    from engine.lora.adapters import AdapterConfig, AdapterNetwork
    from engine.families.wan import dit
    from engine.families.wan.dit import build_wan_model
    from engine.families.wan.presets import preset_config, random_state_dict

    cfg = preset_config("tiny-t2v")
    model = build_wan_model(cfg, "meta")
    model.load_state_dict(random_state_dict(cfg, seed=0, dtype=torch.float32), assign=True)
    model.requires_grad_(False)
    net = AdapterNetwork.create(model, AdapterConfig(rank=4, alpha=4))
    for p in net.parameters():   # non-zero up weights so every adapter gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(1, 7, cfg.text_dim, generator=g)

    def grads():
        net.zero_grad(set_to_none=True)
        model(x, torch.tensor([300.0]), ctx).pow(2).mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    lean = grads()
    monkeypatch.setattr(dit, "rms_norm", _plain_rms)
    plain = grads()
    assert len(lean) == len(plain) > 0
    for u, v in zip(lean, plain):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6)
