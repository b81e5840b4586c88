"""Memory-lean versions of common DiT block ops (q/k RMSNorm, RoPE, modulated LayerNorm, gated residual), for
training.

With gradient checkpointing, what one block saves for backward is the activation memory of a training step; for a
14B DiT at 32 760 tokens (832×480×81 video) every float32 [L, 5120] tensor is 0.67 GB. Autograd saves only what
the inputs that need gradients require, so in LoRA training (frozen modulation, norms and base weights) most of the
block's float32 expressions save nothing big. The exceptions handled here:

* `rms_norm` (q/k normalisation, three per block): plain autograd keeps `x.float()` (fp32) for the backward of
  `pow`/`mul`; this Function keeps the bf16 input and the per-token 1/rms and recomputes the rest: 1 GB less per
  14B block at 32 760 tokens. The forward is the same sequence of ops, so outputs are bit-identical.
* `norm_to` (the block's three LayerNorms, with or without the shift/scale modulation, cast to the compute dtype)
  and `gated_residual` (`x + branch.float() * gate`, the three residual adds): the same ops in the same order,
  so bit-identical, but the float32 [L, D] intermediates are written in place into one buffer instead of two or
  three, in forward and in backward. Autograd keeps none of them either way; what drops is the peak of the
  block's recompute + backward under gradient checkpointing (14B, 32 760 tokens: 2–3 fewer float32 [L, D]
  transients at its largest moment).
* (fp8 base weights: `engine.memory.fp8._Fp8LinearFunction` keeps the fp8 weight instead of its bf16 copy.)

Without gradients (inference) the same in-place expressions run without a graph.
"""

from __future__ import annotations

import torch


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _float_copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor with t's values that may be written in place (a new one even when t is float32)."""
    return t.to(torch.float32, copy=True)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return grad.sum_to_size(like.shape).to(like.dtype)


# --- RMSNorm ----------------------------------------------------------------------------------------------------

def _rms_norm_plain(x, weight, eps):
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed * weight).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    # Both directions write their float32 [.., D] intermediates in place where the plain expression would allocate
    # new ones (same ops in the same order per element, so the same values): at most three float32 copies of x live
    # at once in backward instead of five.

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = _float_copy(x)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = xf.mul_(rstd).to(x.dtype)
        del xf
        ctx.save_for_backward(x, weight, rstd)
        return (normed * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        g = grad_out.to(torch.promote_types(x.dtype, weight.dtype))
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _reduce_to(g * _float_copy(x).mul_(rstd).to(x.dtype), weight)
        if ctx.needs_input_grad[0]:
            gn = _float_copy((g * weight).to(x.dtype))  # through `.to(x.dtype)` of the normalised value
            xf = _float_copy(x)
            # d(x·r)/dx with r = 1/sqrt(mean(x²) + eps): g·r − x·r³·mean(g·x)
            m = (gn * xf).mean(-1, keepdim=True)
            xf.mul_(rstd.pow(3)).mul_(m)   # x·r³·mean(g·x)
            grad_x = gn.mul_(rstd).sub_(xf).to(x.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`(normalize(x.float()).to(x.dtype) * weight).to(x.dtype)` over the last dim (a q/k RMSNorm)."""
    if not _needs_graph(x, weight):
        return _rms_norm_plain(x, weight, eps)
    return _RMSNorm.apply(x, weight, eps)


# --- RoPE ----------------------------------------------------------------------------------------------------------

def _rotate(x, cos, sin, inverse: bool = False) -> torch.Tensor:
    """float32 [.., d/2, 2] pairs of x rotated by +θ (or −θ): (re·cos − im·sin, re·sin + im·cos), written into
    one buffer (plus a half-size temporary) instead of the plain expression's six half-size tensors and a stack."""
    pairs = x.float().unflatten(-1, (-1, 2))           # [B, L, N, d/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.empty(pairs.shape, dtype=torch.float32, device=x.device)
    o_re, o_im = out[..., 0], out[..., 1]
    if not inverse:   # re·cos − im·sin, re·sin + im·cos
        tmp = im * sin
        torch.mul(re, cos, out=o_re).sub_(tmp)
        torch.mul(im, cos, out=tmp)
        torch.mul(re, sin, out=o_im).add_(tmp)
    else:             # the gradient: re·cos + im·sin, im·cos − re·sin (the order autograd sums them in)
        tmp = im * sin
        torch.mul(re, cos, out=o_re).add_(tmp)
        torch.mul(re, sin, out=tmp)
        torch.mul(im, cos, out=o_im).sub_(tmp)
    return out.flatten(-2)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return _rotate(x, cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True).to(ctx.x_dtype), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, N, d] rotated pairwise by the [L, 1, d/2] cos/sin tables, in float32, back in x's dtype."""
    if _needs_graph(x):
        return _Rope.apply(x, cos, sin)
    return _rotate(x, cos, sin).to(x.dtype)


# --- LayerNorm (+ modulation) cast to the compute dtype ---------------------------------------------------------

def _norm_forward(x, weight, bias, shift, scale, eps):
    """float32 (layer_norm(x.float(), weight, bias) * (1 + scale) + shift), mean, rstd: one [.., D] buffer, the
    modulation applied in place (same values as the out-of-place expression)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    y, mean, rstd = torch.native_layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    if scale is not None:
        y.mul_(1 + scale)
    if shift is not None:
        y.add_(shift)
    return y, mean, rstd


class _NormTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, eps, dtype):
        y, mean, rstd = _norm_forward(x, weight, bias, shift, scale, eps)
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        ctx.eps, ctx.shift_shape = eps, None if shift is None else shift.shape
        return y.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b, need_shift, need_scale = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_shift = grad_scale = None
        if need_shift:
            grad_shift = grad_out.float().sum_to_size(ctx.shift_shape)
        if need_scale:   # d/d scale needs the normalized value: recomputed
            normed, _, _ = _norm_forward(x, weight, bias, None, None, ctx.eps)
            grad_scale = _reduce_to(grad_out.float() * normed, scale)
            del normed
        if need_x or need_w or need_b:
            # grad_out (compute dtype) * (1 + scale) promotes to float32: the value of grad_out.float() * (1 + scale)
            g = grad_out * (1 + scale) if scale is not None else grad_out.float()
            w = None if weight is None else weight.float()
            b = None if bias is None else bias.float()
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                g, x.float(), (x.shape[-1],), mean, rstd, w, b, [need_x, need_w, need_b])
            if grad_x is not None:
                grad_x = grad_x.to(x.dtype)
            grad_w = None if grad_w is None else grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_x, grad_w, grad_b, grad_shift, grad_scale, None, None


def norm_to(norm, x: torch.Tensor, dtype: torch.dtype, shift: torch.Tensor | None = None,
            scale: torch.Tensor | None = None) -> torch.Tensor:
    """`((norm(x) * (1 + scale) + shift) if scale/shift given else norm(x)).to(dtype)` for a LayerNorm module
    (float32 normalization, optional affine weight/bias), bit-identical to that expression. In training it keeps
    x, mean and rstd like the plain graph, without its float32 intermediates."""
    return layer_norm_to(x, norm.weight, norm.bias, norm.eps, dtype, shift, scale)


def layer_norm_to(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                  dtype: torch.dtype, shift: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """`norm_to` on the norm's tensors (what a recomputation keeps: a block swapper may re-point the module's
    parameters to host memory before backward)."""
    if _needs_graph(x, weight, bias, shift, scale):
        return _NormTo.apply(x, weight, bias, shift, scale, eps, dtype)
    return _norm_forward(x, weight, bias, shift, scale, eps)[0].to(dtype)


# --- gated residual add -------------------------------------------------------------------------------------------

def _gated_forward(x, branch, gate):
    out = branch.to(torch.promote_types(x.dtype, torch.float32), copy=True)
    if gate is not None:
        out.mul_(gate)
    return out.add_(x)   # m + x == x + m


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, gate):
        ctx.x_dtype, ctx.branch_dtype = x.dtype, branch.dtype
        need_gate = gate is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(gate, branch if need_gate else None)
        return _gated_forward(x, branch, gate)

    @staticmethod
    def backward(ctx, grad):
        gate, branch = ctx.saved_tensors
        grad_x = grad_branch = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_x = grad if grad.dtype == ctx.x_dtype else grad.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            if gate is None:
                grad_branch = grad.to(ctx.branch_dtype)
            else:   # written straight in the branch's dtype: same value as (grad * gate).to(dtype)
                grad_branch = torch.empty(grad.shape, dtype=ctx.branch_dtype, device=grad.device)
                torch.mul(grad, gate, out=grad_branch)
        if gate is not None and ctx.needs_input_grad[2]:
            grad_gate = _reduce_to(grad * branch.float(), gate)
        return grad_x, grad_branch, grad_gate


def gated_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """`x + branch.float() * gate` (or `x + branch.float()`), bit-identical, with one float32 buffer instead of
    the float32 copy of the branch, its product and the sum."""
    if _needs_graph(x, branch, gate):
        return _GatedResidual.apply(x, branch, gate)
    return _gated_forward(x, branch, gate)


__all__ = ["rms_norm", "rope", "norm_to", "layer_norm_to", "gated_residual"]
