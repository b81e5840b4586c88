"""fp8 / scaled-fp8 Linear layers (engine.memory.fp8).

Tolerances: e4m3 keeps 3 mantissa bits, so one rounding has a relative error of at most 2^-4 (6.25 %) and about
2.5 % rms; a matmul output inherits roughly the rms figure. We allow 4 % for scaled fp8 (every value uses the full
mantissa) and 6 % for the plain cast of weights of std 0.02 (small values lose bits to subnormals).
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError
from engine.memory import fp8 as fp8mod
from engine.memory.fp8 import (Fp8Linear, dequantize_weight, enable_fp8_matmul, fp8_matmul_supported, fp8_summary,
                               load_fp8_checkpoint, load_fp8_linears, quantize_model_fp8, quantize_weight,
                               warn_if_fp8_fast_unavailable)

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


def test_quantize_refuses_linears_with_hooks(raises_input):
    m = make_model()
    m.blocks[0].self_attn.q.register_forward_hook(lambda *a: None)
    with raises_input("fp8 conversion of 'blocks.0.self_attn.q'", "a Linear with hooks (adapters attached?)",
                      "fp8 conversion before LoRA adapters or block swap are attached"):
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


# --- exact values, defaults and refusals (mutation testing, docs/testing.md) -----------------------------------------

def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_defaults_are_scaled_block_64():
    w = _rand(3, 128)
    q, s = quantize_weight(w)
    q2, s2 = quantize_weight(w, "scaled", 64, "block")
    assert s.shape == (3, 2, 1) and torch.equal(s, s2) and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    lin = nn.Linear(128, 3, bias=False)
    layer = Fp8Linear.from_linear(lin)
    assert layer.scale_layout == "block" and layer.bias is None               # no bias: none made up
    assert Fp8Linear.from_linear(lin, granularity="channel").scale_layout == "channel"


def test_per_tensor_and_per_channel_scale_values():
    w = _rand(6, 40)
    w[2, 7] = -5.0                                         # the largest magnitude of the tensor (and of row 2)
    w[4] = 0                                               # an all-zero row: clamped scale, zeros come back
    _, s = quantize_weight(w, "scaled", granularity="tensor")
    assert s.shape == () and s.item() == pytest.approx(5.0 / 448)
    q, s = quantize_weight(w, "scaled", granularity="channel")
    expected = (w.abs().amax(dim=1, keepdim=True) / 448).clamp_min(1e-8)
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    back = dequantize_weight(q, s)
    assert back[2, 7].item() == pytest.approx(-5.0, rel=1e-6) and back[4].abs().max().item() == 0
    # a non-2-D weight (a conv) gets one scale whatever the granularity
    w4 = _rand(4, 3, 2, 2)
    w4[1, 2, 0, 1] = 7.0
    q4, s4 = quantize_weight(w4, "scaled", granularity="channel")
    assert s4.shape == () and s4.item() == pytest.approx(7.0 / 448)
    assert q4.shape == w4.shape and _within_e4m3_of(dequantize_weight(q4, s4), w4, s4)


def test_block_size_one_and_zero(raises_input):
    w = _rand(3, 5)
    q, s = quantize_weight(w, "scaled", block_size=1)      # one scale per weight: every value maps to ±448 exactly
    assert s.shape == (3, 5, 1)
    torch.testing.assert_close(dequantize_weight(q, s), w, rtol=1e-6, atol=0)
    _, s = quantize_weight(w, "scaled", block_size=0)      # no block size: per output channel, not a division by 0
    assert s.shape == (3, 1)
    m = nn.Sequential(nn.Linear(5, 3))
    assert quantize_model_fp8(m, block_size=1) == ["0"] and m[0].scale_weight.shape == (3, 5, 1)
    with raises_input("fp8 block size", 0, "an integer >= 1 (Musubi uses 64)"):
        quantize_model_fp8(nn.Sequential(nn.Linear(5, 3)), block_size=0)


def test_refusals_name_the_input_the_value_and_the_choices(raises_input):
    with raises_input("fp8 mode", "e5m2", "one of ('e4m3', 'scaled')"):
        quantize_weight(torch.randn(4, 4), "e5m2")
    with raises_input("fp8 scale granularity", "row", "one of ('block', 'channel', 'tensor')"):
        quantize_weight(torch.randn(4, 4), granularity="row")
    with raises_input("fp8 mode", "fp4", "one of ('e4m3', 'scaled')"):
        quantize_model_fp8(nn.Sequential(nn.Linear(4, 4)), mode="fp4")
    with raises_input("fp8 matmul scale granularity", "block", "'channel' (row-wise) or 'tensor'"):
        enable_fp8_matmul(nn.Sequential(), granularity="block")
    with raises_input("Fp8Linear weight", (torch.bfloat16, (4, 8)), "a 2-D float8_e4m3fn tensor"):
        Fp8Linear(torch.zeros(4, 8, dtype=torch.bfloat16), torch.ones(()))
    with raises_input("Fp8Linear weight", (torch.float8_e4m3fn, (2, 4, 8)), "a 2-D float8_e4m3fn tensor"):
        Fp8Linear(torch.zeros(2, 4, 8).to(torch.float8_e4m3fn), torch.ones(()))
    with torch.device("meta"):
        m = TinyWanLike()
    with raises_input("fp8 conversion of 'blocks.0.self_attn.q'", "weights on the meta device",
                      "a loaded model (use load_fp8_checkpoint for a model built on meta)"):
        quantize_model_fp8(m)


@pytest.mark.parametrize("given, stored", [((), ()), ((1,), ()), ((4,), (4, 1)), ((4, 1), (4, 1)),
                                           ((4, 2, 1), (4, 2, 1))])
def test_accepted_scale_layouts_are_stored_as_fp8linear_uses_them(given, stored):
    q = _rand(4, 10).to(torch.float8_e4m3fn)
    scale = torch.rand(given, generator=torch.Generator().manual_seed(1)) + 0.5
    layer = Fp8Linear(q, scale)
    assert layer.scale_weight.shape == stored and layer.scale_weight.dtype == torch.float32
    _assert_fp8_layer_is(layer, q, scale)


@pytest.mark.parametrize("shape", [(4, 3, 1), (5,), (1, 4), (4, 2), (2, 2)])
def test_scales_of_no_known_layout_are_refused_naming_the_tensor(shape, raises_input):
    """(4, 3, 1): 3 blocks do not divide 10 columns; (5,): not one per row; (1, 4) / (4, 2) / (2, 2): neither a
    column of row scales nor blocks."""
    q = _rand(4, 10).to(torch.float8_e4m3fn)
    with raises_input("fp8 scale 'scale_weight'", shape,
                      "a scalar, [4] / [4, 1] per channel, or [4, blocks, 1] for weight (4, 10)"):
        Fp8Linear(q, torch.ones(shape))


# --- chunked dequantization ------------------------------------------------------------------------------------------

def _scale_for(q, layout):
    g = torch.Generator().manual_seed(2)
    shape = {"tensor": (), "channel": (q.shape[0], 1), "block": (q.shape[0], 2, 1)}[layout]
    return torch.rand(shape, generator=g) * 3 + 0.01


@pytest.mark.parametrize("layout", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shape, budget", [((10, 8), 96), ((10, 2), 24), ((5, 2), 24), ((4, 8), 16), ((7, 8), 10**9)])
def test_chunked_dequantization_equals_the_whole_and_bounds_the_float32_rows(shape, budget, layout, monkeypatch):
    """A budget of `budget` float32 bytes per chunk: chunks of max(1, budget // row bytes) rows (the last one
    shorter), the same values as dequantizing at once. (10, 8) / 96 B: 3 rows per chunk, 4 chunks; (10, 2) / 24 B:
    3 rows of 2 columns (fewer columns than rows per chunk); (4, 8) / 16 B: a row larger than the budget, one row per
    chunk; (7, 8): within the budget, one piece."""
    q = (_rand(*shape) * 100).to(torch.float8_e4m3fn)
    scale = _scale_for(q, layout)
    whole = _hand_dequant(q, scale).to(torch.bfloat16)
    seen = []
    real = fp8mod._dequantize
    monkeypatch.setattr(fp8mod, "_dequantize", lambda qq, ss, dt: seen.append(qq.shape[0]) or real(qq, ss, dt))
    monkeypatch.setattr(fp8mod, "_DEQUANT_CHUNK_BYTES", budget)
    out = dequantize_weight(q, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == shape
    assert torch.equal(out, whole)
    rows = max(1, budget // (4 * shape[1]))
    assert seen == [min(rows, shape[0] - s) for s in range(0, shape[0], rows)]


@pytest.mark.parametrize("shape, budget", [((5, 1), 12), ((1, 8), 4), ((2, 8), 32)])
def test_chunking_edge_shapes(shape, budget, monkeypatch):
    """One column (5 rows of 4 bytes, 12 B: chunks of 3 and 2); one row; two rows with one per chunk (per-channel
    scale of two elements)."""
    q = (_rand(*shape) * 100).to(torch.float8_e4m3fn)
    seen = []
    real = fp8mod._dequantize
    monkeypatch.setattr(fp8mod, "_dequantize", lambda qq, ss, dt: seen.append(qq.shape[0]) or real(qq, ss, dt))
    monkeypatch.setattr(fp8mod, "_DEQUANT_CHUNK_BYTES", budget)
    rows = max(1, budget // (4 * shape[1]))
    for scale in (_scale_for(q, "tensor"), _scale_for(q, "channel")):
        for dtype in (torch.float32, torch.bfloat16):
            seen.clear()
            out = dequantize_weight(q, scale, dtype)
            assert out.dtype == dtype and torch.equal(out, _hand_dequant(q, scale).to(dtype))
        assert seen == [min(rows, shape[0] - s) for s in range(0, shape[0], rows)]     # bf16: in chunks


def test_non_2d_weights_dequantize_in_one_piece_in_every_dtype(monkeypatch):
    monkeypatch.setattr(fp8mod, "_DEQUANT_CHUNK_BYTES", 8)
    w = _rand(6, 3, 2, 2)
    q, s = quantize_weight(w, "scaled")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = dequantize_weight(q, s, dtype)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, (q.float() * s).to(dtype))


# --- fp8 matmul eligibility and the _scaled_mm path ---------------------------------------------------------------

def test_fp8_matmul_supported_rules(monkeypatch):
    """Only a CUDA device of compute capability >= 8.9 (its own, not the current device's), with CUDA available and
    torch._scaled_mm present. The CUDA queries are faked: this runs on CPU."""
    caps = {0: (9, 0), 1: (8, 6), 2: (8, 9), 3: (12, 0)}

    def capability(device=None):
        d = torch.device("cuda", 0) if device is None else torch.device(device)
        return caps[d.index or 0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert [fp8_matmul_supported(f"cuda:{i}") for i in range(4)] == [True, False, True, True]
    assert fp8_matmul_supported(torch.device("cuda", 1)) is False
    assert fp8_matmul_supported("cpu") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_fp8_fast_unavailable("cuda:2")              # supported: silent
    with pytest.warns(UserWarning, match="compute capability >= 8.9; cuda:1 falls back to dequantize"):
        warn_if_fp8_fast_unavailable("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fp8_matmul_supported("cuda:0") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(torch, "_scaled_mm")
    assert fp8_matmul_supported("cuda:0") is False


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """Run the _scaled_mm path through PyTorch's CPU kernel and count its calls."""
    monkeypatch.setattr(fp8mod, "_SCALED_MM_ON_CPU", True)
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _layer(out_f, in_f, granularity, bias_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight(torch.randn(out_f, in_f, generator=g), "scaled", granularity=granularity)
    return Fp8Linear(q, s, torch.randn(out_f, generator=g).to(bias_dtype))


def _dequant_forward(layer, x, dtype):
    return F.linear(x.to(dtype), _hand_dequant(layer.weight, layer.scale_weight).to(dtype), layer.bias.to(dtype))


def test_fp8_matmul_is_used_only_where_eligible(scaled_mm_calls):
    """Off by default; then only without autograd through the layer, GEMM dims multiples of 16, no block scales,
    and row-wise scales only with a bf16 output. Everywhere else the layer is the exact dequantizing one."""
    x = _rand(3, 32).to(torch.bfloat16)
    layer = _layer(48, 32, "channel")
    assert layer.use_fp8_matmul is False and "fp8_matmul=False" in repr(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), _dequant_forward(layer, x, torch.bfloat16)) and not scaled_mm_calls
    layer.use_fp8_matmul = True
    assert "in_features=32, out_features=48, bias=True, scale=channel, fp8_matmul=True" in repr(layer)
    layer(x)                                             # grad mode on, but nothing needs a gradient: inference
    assert len(scaled_mm_calls) == 1
    xg = x.clone().requires_grad_(True)
    y = layer(xg)                                        # training: no autograd formula for _scaled_mm
    assert len(scaled_mm_calls) == 1 and torch.equal(y, _dequant_forward(layer, x, torch.bfloat16))
    y.float().sum().backward()
    assert xg.grad is not None
    with torch.no_grad():
        x32 = x.float()
        assert torch.equal(layer(x32), _dequant_forward(layer, x32, torch.float32))   # row-wise needs bf16 out
        assert len(scaled_mm_calls) == 1
        tensor_layer = _layer(48, 32, "tensor")
        tensor_layer.use_fp8_matmul = True
        tensor_layer(x32)                                    # per-tensor scales: any output dtype
        assert len(scaled_mm_calls) == 2
        for out_f, in_f, granularity in ((48, 24, "channel"), (24, 32, "channel"), (32, 128, "block")):
            other = _layer(out_f, in_f, granularity)
            other.use_fp8_matmul = True
            xi = _rand(3, in_f).to(torch.bfloat16)
            assert torch.equal(other(xi), _dequant_forward(other, xi, torch.bfloat16)), (out_f, in_f, granularity)
        assert len(scaled_mm_calls) == 2


@pytest.mark.parametrize("granularity, dtype", [("tensor", torch.float32), ("tensor", torch.bfloat16),
                                                ("channel", torch.bfloat16)])
def test_fp8_matmul_values_per_tensor_and_row_wise(granularity, dtype, scaled_mm_calls):
    """The activations are quantized with their own scale (per tensor, or per row for row-wise weights) and the
    GEMM is rescaled by both: small activations (1e-3, below e4m3's normal range unscaled) keep their precision.
    The bias (float32 here, as small as the outputs) is added in the output dtype."""
    layer = _layer(32, 48, granularity)
    layer.bias.data *= 1e-3
    layer.use_fp8_matmul = True
    x = (_rand(2, 3, 48, seed=4) * 1e-3).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert len(scaled_mm_calls) == 1 and y.dtype == dtype and y.shape == (2, 3, 32)
    x2 = x.float().reshape(6, 48)
    sx = x2.abs().amax() / 448 if granularity == "tensor" else x2.abs().amax(dim=1, keepdim=True) / 448
    xq = (x2 / sx).to(torch.float8_e4m3fn).float()
    sw = layer.scale_weight.reshape(()) if granularity == "tensor" else layer.scale_weight.reshape(1, -1)
    expected = ((xq @ layer.weight.float().t()) * sx * sw).to(dtype) + layer.bias.to(dtype)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(y.reshape(6, 32), expected, **tol)


# --- training through an fp8 Linear -----------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("in_f", [128, 40])                  # block-wise and per-channel scales
def test_backward_matches_a_float_reference(x_dtype, in_f):
    """Gradients of the input and of an unfrozen bias equal those of F.linear on the dequantized weight in the compute
    dtype (the input's, bf16 for a dtype fp8 layers do not compute in); the weight gets none."""
    layer = Fp8Linear.from_linear(linear(in_f, 24, dtype=torch.float32))
    assert not layer.bias.requires_grad
    layer.bias.requires_grad_(True)
    compute = x_dtype if x_dtype != torch.float64 else torch.bfloat16
    x = _rand(2, 3, in_f).to(x_dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == compute and y.shape == (2, 3, 24)
    g = _rand(2, 3, 24, seed=5).to(compute)
    y.backward(g)
    w = _hand_dequant(layer.weight, layer.scale_weight).to(compute)
    xr = x.detach().to(compute).requires_grad_(True)
    br = layer.bias.detach().to(compute).requires_grad_(True)
    yr = F.linear(xr, w, br)
    yr.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if compute == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, yr, **tol)
    assert x.grad.dtype == x_dtype and layer.bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.to(compute), xr.grad, **tol)
    torch.testing.assert_close(layer.bias.grad, br.grad.float(), **tol)
    assert layer.bias.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert layer.weight.grad is None


def test_backward_keeps_only_the_fp8_weight_and_its_scale():
    """The memory claim of _Fp8LinearFunction: what autograd saves for backward is the fp8 weight and its scale,
    never the dequantized weight nor the input."""
    layer = Fp8Linear.from_linear(linear(128, 32))
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    x = _rand(5, 128).to(torch.bfloat16).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert sorted(saved, key=str) == sorted([(torch.float8_e4m3fn, (32, 128)), (torch.float32, (32, 2, 1))], key=str)
    y.float().sum().backward()
    assert x.grad.shape == x.shape


def test_forward_without_bias_or_gradients_and_in_float64():
    layer = Fp8Linear.from_linear(nn.Linear(40, 16, bias=False))
    x = _rand(3, 40)
    y = layer(x)                                         # grad mode on, nothing requires grad, no bias
    assert torch.equal(y, F.linear(x, _hand_dequant(layer.weight, layer.scale_weight)))
    with torch.no_grad():
        y64 = layer(x.double())                          # not a compute dtype: computed in bf16
    assert y64.dtype == torch.bfloat16
    assert torch.equal(y64, F.linear(x.to(torch.bfloat16),
                                     _hand_dequant(layer.weight, layer.scale_weight).to(torch.bfloat16)))


# --- targets, conversion options, summary ---------------------------------------------------------------------------

def _fp8_names(model):
    return sorted(n for n, mod in model.named_modules() if isinstance(mod, Fp8Linear))


ATTN = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")


def test_include_and_exclude_replace_the_family_spec():
    all_linears = sorted(n for n, mod in make_model().named_modules() if type(mod) is nn.Linear)
    m = make_model()
    assert sorted(quantize_model_fp8(m, include=["head."])) == ["head.head"] == _fp8_names(m)
    m = make_model()
    converted = quantize_model_fp8(m, exclude=["ffn", "norm"])          # no include: every other Linear
    assert sorted(converted) == [n for n in all_linears if "ffn" not in n and "norm" not in n] == _fp8_names(m)
    m = make_model()
    converted = quantize_model_fp8(m, include=["blocks.1."], exclude=["ffn"])
    assert sorted(converted) == sorted([f"blocks.1.{n}" for n in ATTN] + ["blocks.1.self_attn.norm_q"])
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))     # a model of no family: every Linear
    assert quantize_model_fp8(m) == ["0", "2"] and _fp8_names(m) == ["0", "2"]


def test_conversion_granularity_matmul_granularity_and_summary():
    m = make_model()
    quantize_model_fp8(m, include=["blocks.0."], exclude=["norm"])
    quantize_model_fp8(m, include=["blocks.1."], exclude=["norm"], granularity="channel")
    quantize_model_fp8(m, include=["blocks.2."], exclude=["norm"], granularity="tensor")
    per_block = 4 * 64 * 64 + 2 * 64 * 128
    assert fp8_summary(m) == {"block": 6, "channel": 6, "tensor": 6, "fp8_bytes": 3 * per_block,
                              "high_precision_linears": 8}
    assert enable_fp8_matmul(m, enabled=False) == 0                       # disabling requantizes nothing
    assert fp8_summary(m)["block"] == 6
    assert not any(mod.use_fp8_matmul for mod in m.modules() if isinstance(mod, Fp8Linear))
    assert enable_fp8_matmul(m, granularity="tensor") == 6
    assert fp8_summary(m) == {"block": 0, "channel": 6, "tensor": 12, "fp8_bytes": 3 * per_block,
                              "high_precision_linears": 8}
    assert all(mod.use_fp8_matmul for mod in m.modules() if isinstance(mod, Fp8Linear))


# --- loading: options and refusals ------------------------------------------------------------------------------------

def _meta_model():
    with torch.device("meta"):
        return TinyWanLike().to(torch.bfloat16)


def test_load_fp8_linears_defaults_consumed_keys_and_targets(raises_input):
    sd = {k: v.contiguous() for k, v in make_model().state_dict().items()}
    m = _meta_model()
    consumed = load_fp8_linears(m, Checkpoint.from_state_dict(sd))       # scaled, block-wise, on the CPU
    targets = [f"blocks.{i}.{n}" for i in range(3) for n in ATTN + ("ffn.0", "ffn.2")]
    assert sorted(consumed) == sorted(f"{n}.{p}" for n in targets for p in ("weight", "bias"))
    assert _fp8_names(m) == sorted(targets)
    for n in targets:
        layer = m.get_submodule(n)
        assert layer.scale_layout == "block" and layer.weight.device.type == "cpu"
        assert layer.bias.dtype == torch.bfloat16 and torch.equal(layer.bias, sd[f"{n}.bias"])
    m = _meta_model()
    consumed = load_fp8_linears(m, Checkpoint.from_state_dict(sd), include=["blocks.1."], exclude=["ffn"])
    names = [f"blocks.1.{n}" for n in ATTN] + ["blocks.1.self_attn.norm_q"]
    assert sorted(consumed) == sorted(f"{n}.{p}" for n in names for p in ("weight", "bias"))
    assert _fp8_names(m) == sorted(names)
    with raises_input("fp8 mode", "fp4", "one of ('e4m3', 'scaled') or None (keep high-precision weights)"):
        load_fp8_linears(_meta_model(), Checkpoint.from_state_dict(sd), mode="fp4")


def test_load_fp8_linears_skips_absent_and_high_precision_weights_and_refuses_bad_shapes(raises_input):
    sd = {k: v.contiguous() for k, v in make_model().state_dict().items()}
    q_name = "blocks.1.self_attn.q"
    fp8_sd = dict(sd)
    q, s = quantize_weight(sd[f"{q_name}.weight"], "scaled", granularity="channel")
    fp8_sd[f"{q_name}.weight"], fp8_sd[f"{q_name}.scale_weight"] = q, s.reshape(-1)
    m = _meta_model()   # mode None: high-precision weights are left to the normal loader, fp8 ones are installed
    consumed = load_fp8_linears(m, Checkpoint.from_state_dict(fp8_sd), mode=None)
    assert _fp8_names(m) == [q_name]
    assert sorted(consumed) == sorted(f"{q_name}.{p}" for p in ("weight", "bias", "scale_weight"))
    _assert_fp8_layer_is(m.get_submodule(q_name), q, s, sd[f"{q_name}.bias"])
    m = _meta_model()   # a weight absent from the file: that layer is left (the strict loader reports it), not the rest
    partial = {k: v for k, v in sd.items() if not k.startswith("blocks.0.self_attn.q.")}
    load_fp8_linears(m, Checkpoint.from_state_dict(partial))
    assert type(m.blocks[0].self_attn.q) is nn.Linear and len(_fp8_names(m)) == 17
    bad = dict(sd)
    bad["blocks.0.self_attn.k.weight"] = torch.zeros(64, 32)
    ckpt = Checkpoint.from_state_dict(bad)
    with raises_input(f"checkpoint {ckpt.source} tensor 'blocks.0.self_attn.k.weight'", (64, 32), "shape (64, 64)"):
        load_fp8_linears(_meta_model(), ckpt)


def test_load_fp8_linears_scales_from_the_file(raises_input):
    sd = {k: v.contiguous() for k, v in make_model().state_dict().items()}
    name = "blocks.0.ffn.0"                                  # 128 x 64
    plain = dict(sd)
    plain[f"{name}.weight"] = sd[f"{name}.weight"].float().clamp(-448, 448).to(torch.float8_e4m3fn)
    m = _meta_model()
    consumed = load_fp8_linears(m, Checkpoint.from_state_dict(plain))      # plain fp8 (no scale): scale 1
    assert f"{name}.weight" in consumed and not any(k.endswith("scale_weight") for k in consumed)
    layer = m.get_submodule(name)
    assert layer.scale_layout == "tensor" and layer.scale_weight.item() == 1.0
    _assert_fp8_layer_is(layer, plain[f"{name}.weight"], torch.ones(()), sd[f"{name}.bias"])
    plain[f"{name}.scale_weight"] = torch.ones(128, 3)
    with raises_input(f"fp8 scale '{name}.scale_weight'", (128, 3),
                      "a scalar, [128] / [128, 1] per channel, or [128, blocks, 1] for weight (128, 64)"):
        load_fp8_linears(_meta_model(), Checkpoint.from_state_dict(plain))


def test_load_fp8_linears_bias_dtype_and_extra_bias():
    lin = nn.Linear(16, 16, dtype=torch.float32)
    sd = {"0.weight": lin.weight.detach().clone(), "0.bias": lin.bias.detach().to(torch.bfloat16)}
    loaded = nn.Sequential(nn.Linear(16, 16))                # a loaded float32 model: biases keep its dtype
    load_fp8_linears(loaded, Checkpoint.from_state_dict(sd))
    assert loaded[0].bias.dtype == torch.float32 and torch.equal(loaded[0].bias, sd["0.bias"].float())
    loaded = nn.Sequential(nn.Linear(16, 16))
    load_fp8_linears(loaded, Checkpoint.from_state_dict(sd), bias_dtype=torch.float16)
    assert loaded[0].bias.dtype == torch.float16
    with torch.device("meta"):                               # built on meta: its float32 means nothing yet, bf16
        meta = nn.Sequential(nn.Linear(16, 16))
    load_fp8_linears(meta, Checkpoint.from_state_dict(sd))
    assert meta[0].bias.dtype == torch.bfloat16
    # a bias in the file for a Linear without one is not taken (it stays an unused key)
    no_bias = nn.Sequential(nn.Linear(16, 16, bias=False))
    assert load_fp8_linears(no_bias, Checkpoint.from_state_dict(sd), bias_dtype=torch.bfloat16) == ["0.weight"]
    assert no_bias[0].bias is None
    assert load_fp8_checkpoint(nn.Sequential(nn.Linear(16, 16, bias=False)).to("meta"),
                               Checkpoint.from_state_dict(sd)) == ["0.bias"]


def test_load_fp8_checkpoint_options(raises_input):
    sd = {k: v.contiguous() for k, v in make_model().state_dict().items()}
    sd["blocks.0.modulation"] = sd["blocks.0.modulation"].float()
    m = _meta_model()
    assert load_fp8_checkpoint(m, Checkpoint.from_state_dict(sd)) == []    # defaults: scaled, bf16
    assert fp8_summary(m)["block"] == 18 and m.head.head.weight.dtype == torch.bfloat16
    m = _meta_model()
    load_fp8_checkpoint(m, Checkpoint.from_state_dict(sd), dtype=torch.float16, include=["blocks.0."],
                        exclude=["ffn", "norm"], keep_dtype=lambda n: n.endswith("modulation"))
    assert _fp8_names(m) == sorted(f"blocks.0.{n}" for n in ATTN)
    assert m.blocks[0].self_attn.q.bias.dtype == torch.float16                  # fp8 biases in `dtype` too
    assert m.blocks[0].ffn[0].weight.dtype == torch.float16 and m.blocks[1].norm3.weight.dtype == torch.float16
    assert m.blocks[0].modulation.dtype == torch.float32 and m.blocks[1].modulation.dtype == torch.float32
    torch.testing.assert_close(m.blocks[0].modulation, sd["blocks.0.modulation"], rtol=0, atol=0)
    partial = {k: v for k, v in sd.items() if not k.startswith("head.")}
    ckpt = Checkpoint.from_state_dict(partial)
    with raises_input(f"checkpoint {ckpt.source}", "2 missing tensors, e.g. ['head.head.weight', 'head.head.bias']",
                      "every weight of TinyWanLike"):
        load_fp8_checkpoint(_meta_model(), ckpt)
