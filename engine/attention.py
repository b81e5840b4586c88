"""Scaled dot-product attention with interchangeable kernels.

All backends take and return [B, L, heads, head_dim] (the layout the DiTs produce after splitting heads), no mask,
no dropout, non-causal, softmax scale 1/sqrt(head_dim) unless given.

| backend      | kernel                                            | notes                                              |
|--------------|---------------------------------------------------|----------------------------------------------------|
| "sdpa"       | torch.nn.functional.scaled_dot_product_attention   | default, always available, training and inference  |
| "sdpa_split" | SDPA over chunks of the query sequence             | bounds the memory of math/efficient kernels         |
| "flash"      | FlashAttention 3 (`flash_attn_interface`) or 2     | CUDA, fp16/bf16 (fp32 inputs run in bf16)          |
| "sage"       | SageAttention (`sageattention.sageattn`)           | CUDA, inference only (no backward)                 |
| "xformers"   | xformers.ops.memory_efficient_attention            | CUDA                                               |

The optional kernels are imported on first use. A requested kernel that is missing (or cannot run on the inputs'
device) falls back to SDPA with one warning per backend.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .errors import MusubiInputError, invalid

BACKENDS = ("sdpa", "sdpa_split", "flash", "sage", "xformers")
DEFAULT_SPLIT_QUERY_CHUNK = 4096      # query tokens per SDPA call in "sdpa_split"
_warned: set[str] = set()


# --- optional kernels ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _load_kernel(backend: str):
    """The kernel callable for an optional backend, or None when its package is missing or broken."""
    try:
        if backend == "flash":
            try:
                import flash_attn_interface  # FlashAttention 3 (Hopper)
                return ("fa3", flash_attn_interface.flash_attn_func)
            except ImportError:
                from flash_attn import flash_attn_func
                return ("fa2", flash_attn_func)
        if backend == "sage":
            from sageattention import sageattn
            return ("sage", sageattn)
        if backend == "xformers":
            import xformers.ops
            return ("xformers", xformers.ops.memory_efficient_attention)
    except Exception:  # ImportError, or a package built for another torch/CUDA raising at import
        return None
    return None


def set_backend(root, name: str) -> str:
    """Check `name` and give it to every submodule of `root` that has an `attention_backend` (its attention layers);
    returns it (a model's `attention_backend` setter stores it)."""
    if name not in BACKENDS:
        raise invalid("attention_backend", name, f"one of {list(BACKENDS)}")
    for m in root.modules():
        if m is not root and hasattr(m, "attention_backend"):
            m.attention_backend = name
    return name


def available_backends() -> list[str]:
    """Backends usable in this Python environment (the CUDA-only ones still need CUDA tensors at call time)."""
    return [b for b in BACKENDS if b in ("sdpa", "sdpa_split") or _load_kernel(b) is not None]


def _fallback(backend: str, reason: str) -> None:
    if backend not in _warned:
        _warned.add(backend)
        warnings.warn(f"attention backend {backend!r} {reason}; using 'sdpa' instead", RuntimeWarning, stacklevel=3)


# --- implementations -----------------------------------------------------------------------------------------------

def _sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def _sdpa_split(q, k, v, scale, chunk: int):
    # Each chunk's attention is exact (softmax runs over all keys), so the result equals unsplit SDPA.
    if q.shape[1] <= chunk:
        return _sdpa(q, k, v, scale)
    return torch.cat([_sdpa(qc, k, v, scale) for qc in q.split(chunk, dim=1)], dim=1)


def _run_kernel(kind: str, fn, q, k, v, scale):
    dtype = q.dtype
    if dtype not in (torch.float16, torch.bfloat16):  # these kernels are half precision only
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if kind in ("fa2", "fa3"):
        out = fn(q, k, v, softmax_scale=scale, causal=False)
        if isinstance(out, tuple):  # some FA3 releases return (out, softmax_lse)
            out = out[0]
    elif kind == "sage":
        out = fn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)
    else:  # xformers, [B, M, H, K] layout
        out = fn(q, k, v, scale=scale)
    return out.to(dtype)


# --- entry point --------------------------------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa", *,
              scale: float | None = None, split_chunk: int = DEFAULT_SPLIT_QUERY_CHUNK) -> torch.Tensor:
    """q [B, Lq, N, d], k/v [B, Lk, N, d] -> [B, Lq, N, d] in q's dtype."""
    if backend not in BACKENDS:
        raise invalid("attention backend", backend, f"one of {list(BACKENDS)}")
    if backend == "sage" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise MusubiInputError("attention backend 'sage': got a call that needs gradients (training); expected "
                               "inference only (SageAttention has no backward). Use 'sdpa', 'flash' or 'xformers' "
                               "for training.")
    if backend == "sdpa":
        return _sdpa(q, k, v, scale)
    if backend == "sdpa_split":
        return _sdpa_split(q, k, v, scale, max(1, int(split_chunk)))

    kernel = _load_kernel(backend)
    if kernel is None:
        _fallback(backend, "is not installed")
        return _sdpa(q, k, v, scale)
    if q.device.type != "cuda":
        _fallback(backend, f"needs CUDA tensors (got {q.device.type})")
        return _sdpa(q, k, v, scale)
    return _run_kernel(*kernel, q, k, v, scale)
