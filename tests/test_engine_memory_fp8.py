"""fp8 / scaled-fp8 Linear layers (engine.memory.fp8).

Tolerances: e4m3 keeps 3 mantissa bits, so one rounding has a relative error of at most 2^-4 (6.25 %) and about
2.5 % rms; a matmul output inherits roughly the rms figure. We allow 4 % for scaled fp8 (every value uses the full
mantissa) and 6 % for the plain cast of weights of std 0.02 (small values lose bits to subnormals).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError
from engine.memory import fp8 as fp8mod
from engine.memory.fp8 import (Fp8Linear, dequantize_weight, enable_fp8_matmul, fp8_matmul_supported,
                               load_fp8_checkpoint, quantize_model_fp8, quantize_weight)

SCALED_TOL = 0.04
PLAIN_TOL = 0.06


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def linear(in_f, out_f, std=0.02, seed=0, dtype=torch.bfloat16, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * std)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    return lin


# --- quantization math ------------------------------------------------------------------------------------------

def test_block_scales_are_block_max_over_448_and_exact_values_roundtrip():
    w = torch.zeros(2, 128)
    w[0, 5], w[0, 70] = 3.0, -0.5          # block 0 and block 1 of row 0
    w[1, 127] = 448.0 * 2                  # row 1, block 1
    q, s = quantize_weight(w, "scaled", block_size=64)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 2, 1) and s.dtype == torch.float32
    assert s[0, 0, 0].item() == pytest.approx(3.0 / 448)
    assert s[0, 1, 0].item() == pytest.approx(0.5 / 448)
    assert s[1, 0, 0].item() == pytest.approx(1e-8)       # all-zero block: clamped scale
    assert s[1, 1, 0].item() == pytest.approx(2.0)
    back = dequantize_weight(q, s)
    # each block's max maps to exactly ±448, which e4m3 represents, so these come back exactly
    assert back[0, 5].item() == pytest.approx(3.0, rel=1e-6)
    assert back[0, 70].item() == pytest.approx(-0.5, rel=1e-6)
    assert back[1, 127].item() == pytest.approx(896.0, rel=1e-6)
    assert back[1, :127].abs().max().item() == 0


def test_scale_fallbacks_per_channel_and_per_tensor():
    _, s = quantize_weight(torch.randn(8, 100), "scaled", block_size=64)   # 100 % 64 != 0
    assert s.shape == (8, 1)
    _, s = quantize_weight(torch.randn(8, 4, 2, 2), "scaled")              # not 2-D (e.g. a conv)
    assert s.shape == ()
    _, s = quantize_weight(torch.randn(8, 128), "scaled", granularity="tensor")
    assert s.shape == ()
    q, s = quantize_weight(torch.randn(8, 128) * 1000, "e4m3")
    assert s.item() == 1.0 and not torch.isnan(q.float()).any()        # clamped, not NaN
    assert q.float().abs().max().item() == 448.0


def test_bad_mode_names_the_field():
    with pytest.raises(MusubiInputError, match="fp8 mode.*e5m2"):
        quantize_weight(torch.randn(4, 4), "e5m2")
    with pytest.raises(MusubiInputError, match="fp8 mode"):
        quantize_model_fp8(nn.Sequential(nn.Linear(4, 4)), mode="fp4")


# --- Fp8Linear ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_f", [256, 200])   # block-wise and per-channel fallback
def test_fp8_linear_matches_bf16_within_tolerance(in_f):
    base = linear(in_f, 96)
    x = torch.randn(4, 17, in_f, dtype=torch.bfloat16)
    ref = F.linear(x.float(), base.weight.float(), base.bias.float())
    errs = {}
    for mode in ("e4m3", "scaled"):
        layer = Fp8Linear.from_linear(base, mode)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (4, 17, 96)
        assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
        assert layer.bias.dtype == torch.bfloat16
        errs[mode] = rel_err(y, ref)
    assert errs["scaled"] < SCALED_TOL
    assert errs["e4m3"] < PLAIN_TOL
    assert errs["scaled"] <= errs["e4m3"]


def test_scaled_is_much_better_than_plain_for_small_weights():
    base = linear(256, 64, std=0.002)   # mostly e4m3 subnormals when cast without a scale
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    ref = F.linear(x.float(), base.weight.float(), base.bias.float())
    e_plain = rel_err(Fp8Linear.from_linear(base, "e4m3")(x), ref)
    e_scaled = rel_err(Fp8Linear.from_linear(base, "scaled")(x), ref)
    assert e_scaled < SCALED_TOL < e_plain


def test_forward_dequantizes_exactly():
    layer = Fp8Linear.from_linear(linear(128, 32), "scaled")
    x = torch.randn(3, 128)
    s = layer.scale_weight                                           # [32, 2, 1]
    w = (layer.weight.float().view(32, 2, 64) * s).view(32, 128)     # W_fp8.float() * scale
    assert torch.equal(layer(x), F.linear(x, w, layer.bias.float()))


# --- model conversion ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(d)
        self.modulation = nn.Parameter(torch.randn(1, 6, d) * 0.02)
        self.self_attn = nn.Module()
        for n in ("q", "k", "v", "o"):
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.self_attn.norm_q = nn.Linear(d, d)   # a Linear whose name contains "norm": must stay high precision
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x) * (1 + self.modulation[:, 0]) + self.modulation[:, 1]
        a = self.self_attn
        h = a.o(a.q(h) * torch.sigmoid(a.k(h)) + a.v(h)) + a.norm_q(h) * 0.1
        x = x + h
        return x + self.ffn(self.norm3(x))


class TinyWanLike(nn.Module):
    family = "wan"   # quantize_model_fp8 takes its targets from the Wan family
    def __init__(self, d=64, n=3):
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(32, d), nn.GELU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Module()
        self.head.head = nn.Linear(d, 16)
        self.img_emb = nn.Module()
        self.img_emb.proj = nn.Linear(d, d)

    def forward(self, x):
        x = self.text_embedding(x)
        x = x + self.time_projection(x) + self.img_emb.proj(x) * 0.0
        for b in self.blocks:
            x = b(x)
        return self.head.head(x)


def make_model(seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    m = TinyWanLike().to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)   # DiT-like scale: some plain-cast weights fall into e4m3 subnormals
    return m


def test_quantize_model_converts_exactly_musubis_wan_targets():
    m = make_model()
    converted = quantize_model_fp8(m, "scaled")
    expected = sorted(f"blocks.{i}.{n}" for i in range(3)
                      for n in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0", "ffn.2"))
    assert sorted(converted) == expected
    for name, mod in m.named_modules():
        if name in expected:
            assert isinstance(mod, Fp8Linear) and mod.scale_layout == "block"
        elif isinstance(mod, nn.Linear):
            assert not isinstance(mod, Fp8Linear), name
            assert mod.weight.dtype == torch.bfloat16, name
    assert m.blocks[0].modulation.dtype == torch.bfloat16
    assert m.blocks[0].norm3.weight.dtype == torch.bfloat16


def test_quantized_model_forward_matches_bf16():
    ref_model, x = make_model(), torch.randn(2, 10, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = ref_model.float()(x.float())
    errs = {}
    for mode in ("e4m3", "scaled"):
        m = make_model()
        quantize_model_fp8(m, mode)
        with torch.no_grad():
            errs[mode] = rel_err(m(x), ref)
    assert errs["scaled"] < SCALED_TOL and errs["e4m3"] < PLAIN_TOL
    assert errs["scaled"] <= errs["e4m3"]


def test_quantize_refuses_linears_with_hooks():
    m = make_model()
    m.blocks[0].self_attn.q.register_forward_hook(lambda *a: None)
    with pytest.raises(MusubiInputError, match="blocks.0.self_attn.q"):
        quantize_model_fp8(m)


# --- adapters on fp8 ------------------------------------------------------------------------------------------------

def test_lora_adapter_trains_on_fp8_base():
    from engine.lora.adapters import LoRAModule

    base = linear(128, 64)
    fp8 = Fp8Linear.from_linear(base, "scaled")
    ref_base = nn.Linear(128, 64)
    with torch.no_grad():   # the same effective weights in fp32: the adapter must see identical gradients
        ref_base.weight.copy_(fp8.dequantized_weight())
        ref_base.bias.copy_(fp8.bias.float())
    ref_base.requires_grad_(False)
    grads = []
    for b in (fp8, ref_base):
        torch.manual_seed(1)
        ad = LoRAModule(b, rank=4, alpha=4)
        with torch.no_grad():
            ad.lora_up.weight.normal_(0, 0.1)
        x = torch.randn(5, 128, requires_grad=True)
        ad(x).float().pow(2).mean().backward()
        grads.append((ad.lora_down.weight.grad.clone(), ad.lora_up.weight.grad.clone(), x.grad.clone()))
        assert b.weight.grad is None
    for g_fp8, g_ref in zip(*grads):
        assert g_fp8.abs().sum() > 0
        torch.testing.assert_close(g_fp8, g_ref, rtol=1e-4, atol=1e-6)


# --- loading ----------------------------------------------------------------------------------------------------------

def _scaled_fp8_file(tmp_path, model):
    """A ComfyUI-style scaled fp8 file: fp8 weights for the block Linears + scale_weight ([] or [out]) + marker."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for i, (name, mod) in enumerate((n, m) for n, m in model.named_modules() if n.endswith(("self_attn.q", "ffn.0"))):
        w = mod.weight.detach().float()
        if i % 2:
            scale = w.abs().amax(dim=1) / 448                 # [out]
            q = (w / scale[:, None]).to(torch.float8_e4m3fn)
        else:
            scale = w.abs().amax() / 448                      # []
            q = (w / scale).to(torch.float8_e4m3fn)
        sd[f"{name}.weight"] = q
        sd[f"{name}.scale_weight"] = scale.float()
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "scaled.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_load_comfy_scaled_fp8_keeps_fp8_bytes(tmp_path):
    src = make_model()
    path, sd = _scaled_fp8_file(tmp_path, src)
    ckpt = Checkpoint.open(path)
    with torch.device("meta"):
        m = TinyWanLike().to(torch.bfloat16)
    unused = load_fp8_checkpoint(m, ckpt, mode="scaled", dtype=torch.bfloat16)
    assert unused == []
    q = m.blocks[0].self_attn.q
    assert isinstance(q, Fp8Linear)
    assert torch.equal(q.weight.view(torch.uint8), sd["blocks.0.self_attn.q.weight"].view(torch.uint8))
    assert q.scale_layout in ("tensor", "channel")
    # the high-precision Linears of the file were quantized block-wise on the way in
    assert m.blocks[0].self_attn.k.scale_layout == "block"
    assert type(m.head.head) is nn.Linear and m.head.head.weight.dtype == torch.bfloat16
    # same function as dequantizing the file
    x = torch.randn(2, 5, 64)
    w = ckpt.get("blocks.0.self_attn.q.weight", torch.float32)
    torch.testing.assert_close(q(x), F.linear(x, w, sd["blocks.0.self_attn.q.bias"].float()))


def _hand_dequant(q, scale):
    """q.float() times its scale expanded to q's shape by hand (independent of dequantize_weight's layout code):
    a scalar, one scale per output row ([out] or [out, 1]) or per (row, block of in/nb columns) ([out, nb, 1])."""
    q = q.float()
    if scale.numel() == 1:
        return q * float(scale)
    if scale.ndim == 3:
        return q * scale[..., 0].repeat_interleave(q.shape[1] // scale.shape[1], dim=1)
    return q * scale.reshape(-1)[:, None]


def _assert_fp8_layer_is(layer, q, scale, bias=None):
    """The layer's weight, dequantization and forward are those of (q, scale): values, not only shapes."""
    assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8))
    expected = _hand_dequant(q, scale)
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=0, atol=0)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x.float())
    torch.testing.assert_close(y.float(), F.linear(x, expected, None if bias is None else bias.float()),
                               rtol=1e-5, atol=1e-5)


def _within_e4m3_of(deq, w, scale_full):
    """One e4m3 rounding of w/scale: relative 2^-4 for normals, absolute scale·2^-9 (the subnormal step) below."""
    return bool(((deq - w).abs() <= w.abs() / 16 + scale_full * 2.0 ** -9 + 1e-12).all())


@pytest.mark.parametrize("layout", ["[out]", "[out, 1]", "[out, nb, 1]"])
def test_per_channel_and_block_scales_on_a_non_square_layer(layout, monkeypatch):
    """Rows of very different magnitude, 48 × 192: a scale applied along the wrong axis (or to the wrong block) is
    off by orders of magnitude, not by rounding."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 192, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    w[:, 64:128] *= 30                                    # block 1 of every row is larger: block scales differ
    granularity = "block" if layout == "[out, nb, 1]" else "channel"
    q, scale = quantize_weight(w, "scaled", block_size=64, granularity=granularity)
    assert scale.shape == ((48, 3, 1) if granularity == "block" else (48, 1))
    given = scale.reshape(48) if layout == "[out]" else scale
    layer = Fp8Linear(q, given, None)
    _assert_fp8_layer_is(layer, q, given)
    scale_full = _hand_dequant(torch.ones_like(w).to(torch.float8_e4m3fn), given)
    assert _within_e4m3_of(dequantize_weight(q, layer.scale_weight), w, scale_full)
    # in bf16 too (the dtype generation runs in)
    torch.testing.assert_close(layer.dequantized_weight(torch.bfloat16).float(),
                               _hand_dequant(q, given).to(torch.bfloat16).float(), rtol=0, atol=0)
    if granularity == "channel":   # the fp8 GEMM path takes row-wise scales too (PyTorch's CPU kernel here)
        monkeypatch.setattr(fp8mod, "_SCALED_MM_ON_CPU", True)
        layer.use_fp8_matmul = True
        x = torch.randn(5, 192, generator=g)
        with torch.no_grad():
            y = layer(x.to(torch.bfloat16)).float()
        ref = F.linear(x, _hand_dequant(q, given))
        # per output channel: the rows span four decades, so a scale on the wrong row shows in the small ones
        col_err = (y - ref).norm(dim=0) / ref.norm(dim=0)
        assert col_err.max().item() < 2 * SCALED_TOL, col_err.max()


def test_every_layer_of_a_comfy_scaled_file_dequantizes_with_its_own_scales(tmp_path):
    """Both load paths, layer by layer: fp8 weights of the file with their scalar / [out] scales (ffn.0 is 256 × 64,
    not square), and the file's high-precision Linears quantized on load (block-wise; per channel when the block
    size does not divide in_features)."""
    src = make_model()
    path, sd = _scaled_fp8_file(tmp_path, src)
    for block_size, hp_layout in ((64, "block"), (48, "channel")):
        with torch.device("meta"):
            m = TinyWanLike().to(torch.bfloat16)
        load_fp8_checkpoint(m, Checkpoint.open(path), mode="scaled", dtype=torch.bfloat16, block_size=block_size)
        seen = set()
        for name, layer in m.named_modules():
            if not isinstance(layer, Fp8Linear):
                continue
            w = sd[f"{name}.weight"]
            if w.dtype == torch.float8_e4m3fn:
                scale = sd[f"{name}.scale_weight"]
                _assert_fp8_layer_is(layer, w, scale, sd[f"{name}.bias"])
                seen.add("tensor" if scale.numel() == 1 else "channel-file")
            else:
                assert layer.scale_layout == hp_layout, name
                _assert_fp8_layer_is(layer, layer.weight, layer.scale_weight, sd[f"{name}.bias"])
                scale_full = _hand_dequant(torch.ones(w.shape).to(torch.float8_e4m3fn), layer.scale_weight)
                assert _within_e4m3_of(layer.dequantized_weight(), w.float(), scale_full), name
                seen.add(hp_layout)
        assert seen == {"tensor", "channel-file", hp_layout}


def test_load_reports_missing_tensors(tmp_path):
    src = make_model()
    sd = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("head.")}
    with torch.device("meta"):
        m = TinyWanLike()
    with pytest.raises(MusubiInputError, match="missing"):
        load_fp8_checkpoint(m, Checkpoint.from_state_dict(sd), mode="scaled")


# --- fp8 matmul -----------------------------------------------------------------------------------------------------

def test_fp8_matmul_requantizes_block_scales_and_falls_back_without_support(monkeypatch):
    assert fp8_matmul_supported("cpu") is False
    m = make_model()
    quantize_model_fp8(m, "scaled")
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = make_model().float()(x.float())
    assert enable_fp8_matmul(m) == 18                       # every block-wise layer requantized row-wise
    layers = [mod for mod in m.modules() if isinstance(mod, Fp8Linear)]
    assert all(mod.scale_layout == "channel" and mod.use_fp8_matmul for mod in layers)
    with torch.no_grad():
        y_fallback = m(x)                                    # CPU: no fp8 GEMM, dequantizing path
        monkeypatch.setattr(fp8mod, "_SCALED_MM_ON_CPU", True)
        calls = []
        real = torch._scaled_mm
        monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
        y_fp8 = m(x)
    assert len(calls) == 18
    assert rel_err(y_fallback, ref) < SCALED_TOL
    assert rel_err(y_fp8, ref) < 2 * SCALED_TOL              # activations are quantized too
