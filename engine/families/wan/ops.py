"""Memory-lean versions of Wan block ops, for training.

With gradient checkpointing, what one block saves for backward is the activation memory of a training step; at
Wan 14B, 832×480×81 (32 760 tokens) every float32 [L, 5120] tensor is 0.67 GB. Autograd saves only what the inputs
that need gradients require, so in LoRA training (frozen modulation, norms and base weights) most of the block's
float32 expressions save nothing big. The exceptions handled here:

* `rms_norm` (q/k normalisation, three per block): plain autograd keeps `x.float()` (fp32) for the backward of
  `pow`/`mul`; this Function keeps the bf16 input and the per-token 1/rms and recomputes the rest: 1 GB less per
  Wan 14B block at 832×480×81. The forward is the same sequence of ops, so outputs are bit-identical.
* (fp8 base weights: `engine.memory.fp8._Fp8LinearFunction` keeps the fp8 weight instead of its bf16 copy.)

Without gradients (inference) the plain expression runs.
"""

from __future__ import annotations

import torch


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(like.shape).to(like.dtype)


# --- RMSNorm ----------------------------------------------------------------------------------------------------

def _rms_norm_plain(x, weight, eps):
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * weight).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = (xf * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return (normed * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float()
        g = grad_out.to(torch.promote_types(x.dtype, weight.dtype))
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _reduce_to(g * (xf * rstd).to(x.dtype), weight)
        if ctx.needs_input_grad[0]:
            gn = (g * weight).to(x.dtype).float()  # through `.to(x.dtype)` of the normalised value
            # d(x·r)/dx with r = 1/sqrt(mean(x²) + eps): g·r − x·r³·mean(g·x)
            grad_x = (gn * rstd - xf * rstd.pow(3) * (gn * xf).mean(-1, keepdim=True)).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`(normalize(x.float()).to(x.dtype) * weight).to(x.dtype)` over the last dim (Wan's q/k RMSNorm)."""
    if not _needs_graph(x, weight):
        return _rms_norm_plain(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


__all__ = ["rms_norm"]
