"""Attention backends: numerics against a float64 softmax reference, split attention, fallbacks, sage guard."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine import attention as attn_mod
from engine.attention import BACKENDS, attention, available_backends
from engine.errors import MusubiInputError


def _qkv(lq=37, lk=23, heads=3, d=16, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, lq, heads, d, generator=g, dtype=dtype)
    k = torch.randn(batch, lk, heads, d, generator=g, dtype=dtype)
    v = torch.randn(batch, lk, heads, d, generator=g, dtype=dtype)
    return q, k, v


def _reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v in float64, written out with einsum ([B, L, N, d] layout)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    weights = torch.softmax(torch.einsum("bqnd,bknd->bnqk", q, k) * scale, dim=-1)
    return torch.einsum("bnqk,bknd->bqnd", weights, v)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(attn_mod, "_warned", set())


@pytest.mark.parametrize("scale", [None, 0.3])
def test_sdpa_matches_reference(scale):
    q, k, v = _qkv()
    out = attention(q, k, v, "sdpa", scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), _reference(q, k, v, scale), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 1000])
def test_split_equals_unsplit(chunk):
    q, k, v = _qkv()
    out = attention(q, k, v, "sdpa_split", split_chunk=chunk)
    torch.testing.assert_close(out.double(), _reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_split_backward_matches():
    q, k, v = (t.requires_grad_() for t in _qkv(lq=20, lk=20))
    attention(q, k, v, "sdpa_split", split_chunk=6).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    _reference(q, k, v).square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "xformers", "sage"])
def test_missing_or_cpu_backend_falls_back_with_one_warning(backend):
    q, k, v = _qkv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            first = attention(q, k, v, backend)
            second = attention(q, k, v, backend)
    messages = [str(w.message) for w in caught]
    # CPU tensors: even an installed kernel cannot run, so the fallback is always taken here
    assert len(messages) == 1 and backend in messages[0] and "sdpa" in messages[0]
    torch.testing.assert_close(first.double(), _reference(q, k, v), rtol=1e-5, atol=1e-5)
    assert torch.equal(first, second)


def test_sage_refuses_training():
    q, k, v = _qkv()
    q.requires_grad_()
    with pytest.raises(MusubiInputError, match="inference only"):
        attention(q, k, v, "sage")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no GPU here: the call falls back to sdpa
        attention(q, k, v, "sage")       # inference is fine


def test_unknown_backend_and_available():
    with pytest.raises(MusubiInputError, match="attention backend"):
        attention(*_qkv(), backend="flash4")
    avail = available_backends()
    assert avail[:2] == ["sdpa", "sdpa_split"] and set(avail) <= set(BACKENDS)
    for name in ("flash", "sage", "xformers"):
        assert (name in avail) == (attn_mod._load_kernel(name) is not None)


def test_bf16_inputs_keep_dtype():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = attention(q, k, v, "sdpa_split", split_chunk=8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _reference(q, k, v), rtol=2e-2, atol=2e-2)
