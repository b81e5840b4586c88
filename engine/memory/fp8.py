"""fp8 base weights: `Fp8Linear` stores its weight in float8_e4m3fn and computes in the input's dtype.

Two storage modes (Musubi Tuner `--fp8_base` and `--fp8_base --fp8_scaled`):

* ``"e4m3"``   plain cast, scale 1 (values clamped to ±448 first so nothing saturates to NaN).
* ``"scaled"`` E4M3 with block-wise scales: each output row's input dimension is cut into blocks of 64 and
  ``scale = max|w| in block / 448`` (clamped ≥ 1e-8), stored as ``scale_weight`` [out, in/64, 1]. When in_features
  is not a multiple of the block size the scale is per output channel [out, 1]; a non-2D weight gets one scale [].

Forward dequantizes exactly: ``W = (W_fp8.float() * scale).to(compute dtype)`` then a normal ``F.linear``, so the
only error is the fp8 rounding itself. Scales are kept in float32 (Musubi stores them in the original dtype; fp32
costs 4 bytes per 64 weights and removes a second rounding).

Optional fp8 matmul (`enable_fp8_matmul`, Musubi's ``--fp8_fast``): ``torch._scaled_mm`` accepts only per-tensor or
row-wise scales, so block-wise layers are first requantized to row-wise scales (Musubi raises at runtime here).
It is used only for inference (no autograd through ``_scaled_mm``) on GPUs with compute capability ≥ 8.9; everything
else falls back to the dequantizing path.

Targets: the model family's `Fp8Spec` (e.g. Linear layers inside the transformer blocks minus norms, embeddings,
modulations and the head), unless `include` / `exclude` are given; everything else stays in high precision.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import Checkpoint, load_into_module
from ..errors import invalid

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)   # 448
MIN_SCALE = 1e-8
DEFAULT_BLOCK_SIZE = 64
MODES = ("e4m3", "scaled")
GRANULARITIES = ("block", "channel", "tensor")
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



# ---------------------------------------------------------------------------------------------------------------
# Quantize / dequantize (pure functions)
# ---------------------------------------------------------------------------------------------------------------

def quantize_weight(w: torch.Tensor, mode: str = "scaled", block_size: int = DEFAULT_BLOCK_SIZE,
                    granularity: str = "block") -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (q [out, in] float8_e4m3fn, scale float32).

    scale shape: e4m3 -> []; scaled/block -> [out, in/bs, 1]; scaled/channel (or in % bs != 0) -> [out, 1];
    scaled/tensor (or w not 2-D) -> []."""
    if mode not in MODES:
        raise invalid("fp8 mode", mode, f"one of {MODES}")
    if granularity not in GRANULARITIES:
        raise invalid("fp8 scale granularity", granularity, f"one of {GRANULARITIES}")
    w32 = w.detach().float()
    if mode == "e4m3":
        return w32.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), torch.ones((), dtype=torch.float32, device=w.device)
    if w.ndim == 2 and granularity == "block" and block_size > 0 and w.shape[1] % block_size == 0:
        out_f, in_f = w.shape
        blocks = w32.view(out_f, in_f // block_size, block_size)          # [out, nb, bs]
        scale = (blocks.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)  # [out, nb, 1]
        q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(out_f, in_f)
        return q, scale
    if w.ndim == 2 and granularity in ("block", "channel"):
        scale = (w32.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)        # [out, 1]
    else:
        scale = (w32.abs().amax() / FP8_MAX).clamp_min(MIN_SCALE)                            # []
    return (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


_DEQUANT_CHUNK_BYTES = 64 << 20   # float32 bytes of one row chunk when dequantizing a large weight


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact inverse layout of `quantize_weight`: (q.float() * scale) -> dtype, shape of q. Large 2-D weights are
    done in row chunks, so the float32 intermediate is at most 64 MB instead of the whole weight (0.28 GB for a
    14B FFN layer); the result is the same."""
    rows = max(1, _DEQUANT_CHUNK_BYTES // (4 * max(1, q[0].numel()))) if q.ndim == 2 and q.shape[0] else 0
    if dtype != torch.float32 and rows and q.shape[0] > rows and (scale.numel() == 1 or scale.shape[0] == q.shape[0]):
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
        for start in range(0, q.shape[0], rows):
            part = scale if scale.numel() == 1 else scale[start:start + rows]
            out[start:start + rows] = _dequantize(q[start:start + rows], part, dtype)
        return out
    return _dequantize(q, scale, dtype)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    w = q.float()
    if scale.ndim == 3:                                   # block-wise [out, nb, 1]
        out_f, nb = scale.shape[0], scale.shape[1]
        w = (w.view(out_f, nb, -1) * scale).view(q.shape)
    elif scale.numel() == 1:
        w = w * scale.reshape(())
    else:                                                 # per output channel
        w = w * scale.reshape(-1, *([1] * (q.ndim - 1)))
    return w.to(dtype)


def normalize_scale(scale: torch.Tensor, weight_shape: tuple[int, ...], name: str) -> torch.Tensor:
    """A stored scale (ComfyUI: [] / [1] / [out]; Musubi: [out, 1] / [out, nb, 1]) in the layout Fp8Linear uses."""
    scale = scale.float()
    out_f = weight_shape[0]
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.ndim == 3 and scale.shape[0] == out_f and scale.shape[2] == 1 and len(weight_shape) == 2 \
            and weight_shape[1] % scale.shape[1] == 0:
        return scale
    if scale.numel() == out_f and (scale.ndim == 1 or scale.shape[0] == out_f):
        return scale.reshape(out_f, 1)
    raise invalid(f"fp8 scale {name!r}", tuple(scale.shape),
                  f"a scalar, [{out_f}] / [{out_f}, 1] per channel, or [{out_f}, blocks, 1] for weight {weight_shape}")


# ---------------------------------------------------------------------------------------------------------------
# fp8 matmul support
# ---------------------------------------------------------------------------------------------------------------

def fp8_matmul_supported(device: torch.device | str) -> bool:
    """`torch._scaled_mm` with e4m3 needs an NVIDIA GPU of compute capability ≥ 8.9 (Ada, Hopper, Blackwell)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _fp8_linear_scaled_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., in] -> [..., out] with one fp8 GEMM. scale is per-tensor [] or row-wise [out, 1]."""
    x2 = x.reshape(-1, x.shape[-1])                                               # [M, K]
    if scale.numel() == 1:                                                        # per-tensor for both operands
        sx = (x2.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
        sw = scale.reshape(()).float()
    else:                                                                         # row-wise: [M, 1] and [1, N]
        sx = (x2.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)
        sw = scale.reshape(1, -1).float()
    xq = (x2.float() / sx).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    out = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)  # q.t(): column-major [K, N]
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out.reshape(*x.shape[:-1], q.shape[0])


class _Fp8LinearFunction(torch.autograd.Function):
    """F.linear on the dequantized weight, for training on a frozen fp8 base. Autograd would keep the dequantized
    (bf16) weight of every layer until backward; this keeps only the fp8 weight it already has (and never the input:
    the frozen weight needs no gradient) and dequantizes again in backward: 0.7 GB less per 14B video DiT block."""

    @staticmethod
    def forward(ctx, x, weight_fp8, scale, bias, dtype):
        ctx.save_for_backward(weight_fp8, scale)
        ctx.dtype, ctx.x_dtype, ctx.has_bias = dtype, x.dtype, bias is not None
        # on 2-D rows and reshaped with _unsafe_view, as F.linear does for a contiguous input: the output is then
        # not a view, so a LoRA hook may add its term in place
        y = F.linear(x.to(dtype).reshape(-1, x.shape[-1]), dequantize_weight(weight_fp8, scale, dtype), bias)
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out):
        weight_fp8, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.to(ctx.dtype).matmul(dequantize_weight(weight_fp8, scale, ctx.dtype)).to(ctx.x_dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias, None


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------

class Fp8Linear(nn.Linear):
    """An nn.Linear whose weight is a frozen float8_e4m3fn Parameter with a float32 `scale_weight` buffer.

    Subclassing nn.Linear keeps `isinstance(m, nn.Linear)` true, so LoRA adapters (forward hooks on the Linear)
    and block swap treat it like any Linear; the bias stays in its original precision."""

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)   # not nn.Linear.__init__: it would allocate a high-precision weight
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.ndim != 2:
            raise invalid("Fp8Linear weight", (weight_fp8.dtype, tuple(weight_fp8.shape)), "a 2-D float8_e4m3fn tensor")
        self.out_features, self.in_features = weight_fp8.shape
        self.weight = nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("scale_weight", normalize_scale(scale, tuple(weight_fp8.shape), "scale_weight"))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.use_fp8_matmul = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "scaled", block_size: int = DEFAULT_BLOCK_SIZE,
                    granularity: str = "block") -> "Fp8Linear":
        q, scale = quantize_weight(linear.weight, mode, block_size, granularity)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale, bias)

    @property
    def scale_layout(self) -> str:
        s = self.scale_weight
        return "block" if s.ndim == 3 else "tensor" if s.numel() == 1 else "channel"

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in COMPUTE_DTYPES else torch.bfloat16
        if self.use_fp8_matmul and self._can_scaled_mm(x, dtype):
            return _fp8_linear_scaled_mm(x, self.weight, self.scale_weight, self.bias, dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            return _Fp8LinearFunction.apply(x, self.weight, self.scale_weight, bias, dtype)
        return F.linear(x.to(dtype), self.dequantized_weight(dtype), bias)

    def _can_scaled_mm(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        # inference only (no autograd formula for _scaled_mm); GEMM dims must be multiples of 16; row-wise scales
        # need a bf16 output
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        if self.in_features % 16 or self.out_features % 16 or self.scale_layout == "block":
            return False
        if self.scale_layout == "channel" and dtype != torch.bfloat16:
            return False
        return _SCALED_MM_ON_CPU or fp8_matmul_supported(x.device)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scale={self.scale_layout}, fp8_matmul={self.use_fp8_matmul}")


# Tests flip this to run the _scaled_mm path through PyTorch's CPU kernel; never set in production.
_SCALED_MM_ON_CPU = False


# ---------------------------------------------------------------------------------------------------------------
# Model conversion
# ---------------------------------------------------------------------------------------------------------------

def is_fp8_target(name: str, include: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> bool:
    """Musubi's rule: the module name starts with an include prefix and contains none of the exclude substrings."""
    if include is not None and not any(name.startswith(p) for p in include):
        return False
    return not any(e in name for e in exclude)


def _targets(model: nn.Module, include, exclude) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """The given include/exclude, or the model family's fp8 spec when neither is given (a model of no family: every
    Linear layer)."""
    if include is None and exclude is None:
        from ..families import family_of

        if getattr(type(model), "family", None) is None:
            return None, ()
        spec = family_of(model).fp8
        return tuple(spec.include), tuple(spec.exclude)
    return (None if include is None else tuple(include)), tuple(exclude or ())


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def quantize_model_fp8(model: nn.Module, mode: str = "scaled", include: Iterable[str] | None = None,
                       exclude: Iterable[str] | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                       granularity: str = "block") -> list[str]:
    """Replace every target nn.Linear of a loaded model by an Fp8Linear, one layer at a time (peak extra memory is
    one layer: the high-precision weight is released as soon as its fp8 copy exists). Quantization runs where the
    weight lives (GPU weights quantize on the GPU). Returns the converted module names.

    Quantize before attaching adapters: an adapter hooked on the old Linear would be lost."""
    if mode not in MODES:
        raise invalid("fp8 mode", mode, f"one of {MODES}")
    if block_size < 1:
        raise invalid("fp8 block size", block_size, "an integer >= 1 (Musubi uses 64)")
    include, exclude = _targets(model, include, exclude)
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) is nn.Linear and is_fp8_target(n, include, exclude)]
    for name, linear in targets:
        if linear._forward_hooks or linear._forward_pre_hooks:
            raise invalid(f"fp8 conversion of {name!r}", "a Linear with hooks (adapters attached?)",
                          "fp8 conversion before LoRA adapters or block swap are attached")
        if linear.weight.device.type == "meta":
            raise invalid(f"fp8 conversion of {name!r}", "weights on the meta device",
                          "a loaded model (use load_fp8_checkpoint for a model built on meta)")
        with torch.no_grad():
            _set_submodule(model, name, Fp8Linear.from_linear(linear, mode, block_size, granularity))
        linear.weight = None  # drop our reference now: the caller's model no longer holds it either
    return [n for n, _ in targets]


def enable_fp8_matmul(model: nn.Module, enabled: bool = True, granularity: str = "channel") -> int:
    """Turn on `_scaled_mm` for every Fp8Linear (used only where supported, see `Fp8Linear._can_scaled_mm`).

    Block-wise scales are requantized to `granularity` ("channel" = row-wise, or "tensor") because `_scaled_mm`
    rejects block-wise scales. Returns how many layers were requantized."""
    if granularity not in ("channel", "tensor"):
        raise invalid("fp8 matmul scale granularity", granularity, "'channel' (row-wise) or 'tensor'")
    requantized = 0
    for m in model.modules():
        if not isinstance(m, Fp8Linear):
            continue
        if enabled and m.scale_layout == "block":
            with torch.no_grad():
                q, scale = quantize_weight(m.dequantized_weight(torch.float32), "scaled", granularity=granularity)
            m.weight.data = q
            m.scale_weight = scale
            requantized += 1
        m.use_fp8_matmul = enabled
    return requantized


# ---------------------------------------------------------------------------------------------------------------
# Loading straight into fp8
# ---------------------------------------------------------------------------------------------------------------

def load_fp8_linears(model: nn.Module, ckpt: Checkpoint, mode: str | None = "scaled",
                     device: torch.device | str = "cpu", bias_dtype: torch.dtype | None = None,
                     include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> list[str]:
    """Install an Fp8Linear for every target Linear of `model` (built on meta or loaded), reading from `ckpt`.

    * weight stored as float8_e4m3fn (plain or ComfyUI scaled fp8): used as is with its `scale_weight` (or 1),
      never dequantized to bf16;
    * weight stored in high precision: quantized with `mode` ("e4m3"/"scaled") one tensor at a time; with
      mode None it is left for the normal loader.

    Returns the checkpoint keys consumed (weights, scales, biases); load the rest with `load_into_module` on a view
    hiding them (see `load_fp8_checkpoint`)."""
    if mode is not None and mode not in MODES:
        raise invalid("fp8 mode", mode, f"one of {MODES} or None (keep high-precision weights)")
    include, exclude = _targets(model, include, exclude)
    consumed: list[str] = []
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and is_fp8_target(n, include, exclude)]
    for name, linear in targets:
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        if wkey not in ckpt:
            continue  # the strict loader reports it as missing
        shape = tuple(ckpt.shape(wkey))
        if shape != tuple(linear.weight.shape):
            raise invalid(f"checkpoint {ckpt.source} tensor {wkey!r}", shape, f"shape {tuple(linear.weight.shape)}")
        stored = ckpt.dtype(wkey)
        skey = ckpt.scale_key(wkey)
        if stored == FP8_DTYPE:
            q = ckpt.raw(wkey)
            scale = ckpt.raw(skey) if skey else torch.ones(())
            scale = normalize_scale(scale, shape, skey or wkey)
        elif mode is not None:
            q, scale = quantize_weight(ckpt.get(wkey), mode, block_size)
        else:
            continue
        bias = None
        if linear.bias is not None and bkey in ckpt:
            bdt = bias_dtype or (linear.bias.dtype if linear.bias.device.type != "meta" else torch.bfloat16)
            bias = ckpt.get(bkey, bdt).to(device)
            consumed.append(bkey)
        _set_submodule(model, name, Fp8Linear(q.to(device), scale.to(device), bias))
        consumed.append(wkey)
        if skey:
            consumed.append(skey)
    return consumed


def load_fp8_checkpoint(model: nn.Module, ckpt: Checkpoint, mode: str | None = "scaled",
                        dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu",
                        keep_dtype: Callable[[str], bool] | None = None,
                        include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                        block_size: int = DEFAULT_BLOCK_SIZE) -> list[str]:
    """Fill a model built on the meta device: target Linears become Fp8Linear (`load_fp8_linears`), every other
    tensor is streamed by `load_into_module` in `dtype`. Peak RAM: the fp8 model plus one tensor.
    Returns the unused checkpoint keys; raises MusubiInputError if any model tensor is missing."""
    consumed = set(load_fp8_linears(model, ckpt, mode, device, dtype, include, exclude, block_size))
    rest = ckpt.renamed(lambda k: None if k in consumed else k)
    unused = load_into_module(model, rest, dtype, device, strict=False, keep_dtype=keep_dtype)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise invalid(f"checkpoint {ckpt.source}", f"{len(missing)} missing tensors, e.g. {missing[:3]}",
                      f"every weight of {type(model).__name__}")
    return unused


SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def set_fp8_scale_dtype(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keep every Fp8Linear's `scale_weight` in `dtype` (Musubi keeps them in the model dtype): half the scales'
    memory with bf16 (a 14B DiT, block-wise: 0.87 -> 0.44 GB) for a rounding of each scale (bf16: ≤ 0.4 %) on top of
    fp8's own. Dequantization still multiplies in float32. Call before block swap attaches (its host masters pack
    the buffers as they are). Returns the number of layers changed."""
    if dtype not in SCALE_DTYPES:
        raise invalid("fp8 scale dtype", dtype, f"one of {SCALE_DTYPES}")
    changed = 0
    for m in model.modules():
        if isinstance(m, Fp8Linear) and m.scale_weight.dtype != dtype:
            m.scale_weight = m.scale_weight.to(dtype)
            changed += 1
    return changed


def fp8_summary(model: nn.Module) -> dict[str, int]:
    """Counts for logs/tests: fp8 layers by scale layout and bytes of fp8 weights."""
    out = {"block": 0, "channel": 0, "tensor": 0, "fp8_bytes": 0, "high_precision_linears": 0}
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            out[m.scale_layout] += 1
            out["fp8_bytes"] += m.weight.numel()
        elif isinstance(m, nn.Linear):
            out["high_precision_linears"] += 1
    return out


def warn_if_fp8_fast_unavailable(device: torch.device | str) -> None:
    if not fp8_matmul_supported(device):
        warnings.warn(f"fp8 matmul needs a GPU with compute capability >= 8.9; {device} falls back to dequantize")
