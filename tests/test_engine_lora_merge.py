"""Checkpoint merge (streaming), in-memory merge/restore, apply_loras, post-hoc EMA."""

import json
import os
import re
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError
from engine.lora import (EMAConfig, apply_loras, attached_networks, merge_into_model, merge_loras_into_checkpoint,
                         post_hoc_ema, read_lora, sigma_rel_to_gamma)
from engine.families.wan.presets import build_preset_state_dict
from engine.lora.dialects import resolved_modules
from engine.lora.merge import MergeHandle, _detect_prefix, patch_module, write_safetensors_streaming

from lora_fixtures import random_lora_factors, reference_delta, tiny_model


def _musubi_file(path, factors):
    sd = {}
    for name, (down, up, alpha) in factors.items():
        s = "lora_unet_" + name.replace(".", "_")
        sd |= {f"{s}.lora_down.weight": down, f"{s}.lora_up.weight": up, f"{s}.alpha": torch.tensor(alpha)}
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def t2v():
    return tiny_model("t2v")


@pytest.mark.parametrize("prefix,dtype,out_dtype", [("", torch.float32, None),
                                                     ("model.diffusion_model.", torch.float16, "fp16"),
                                                     ("", torch.bfloat16, "fp8_e4m3fn")])
def test_checkpoint_merge_equals_base_plus_sum(tmp_path, t2v, prefix, dtype, out_dtype):
    base_sd = build_preset_state_dict("tiny-t2v")
    save_file({prefix + k: v.to(dtype) for k, v in base_sd.items()}, str(tmp_path / "base.safetensors"))
    f1 = random_lora_factors(t2v, rank=4, seed=1)
    f2 = random_lora_factors(t2v, rank=2, seed=2, blocks=[1])
    l1 = _musubi_file(tmp_path / "a.safetensors", f1)
    l2 = _musubi_file(tmp_path / "b.safetensors", f2)
    out = merge_loras_into_checkpoint(tmp_path / "base.safetensors", [(l1, 0.8), (l2, -0.5)],
                                      tmp_path / "merged.safetensors", out_dtype=out_dtype)
    merged = load_file(str(out))
    assert set(merged) == {prefix + k for k in base_sd}  # layout (prefix) kept
    for k, w in base_sd.items():
        expected = w.to(dtype).float()
        name = k[: -len(".weight")]
        if name in f1:
            expected = expected + 0.8 * reference_delta(*f1[name])
        if name in f2:
            expected = expected - 0.5 * reference_delta(*f2[name])
        want_dtype = {None: dtype, "fp16": torch.float16}.get(out_dtype, None)
        if out_dtype == "fp8_e4m3fn":
            want_dtype = torch.float8_e4m3fn if (w.ndim == 2 and k.endswith(".weight")) else dtype
        got = merged[prefix + k]
        assert got.dtype == want_dtype, k
        # one rounding of the fp32 sum into the output dtype (reference sum in float64)
        tol = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5),
               torch.float8_e4m3fn: (0.07, 2e-3)}[want_dtype]
        torch.testing.assert_close(got.float(), expected, rtol=tol[0], atol=tol[1])


def test_checkpoint_merge_refusals(tmp_path, t2v):
    save_file(build_preset_state_dict("tiny-t2v"), str(tmp_path / "base.safetensors"))
    f = random_lora_factors(t2v, seed=3)
    f["blocks.7.self_attn.q"] = tuple(t.clone() if torch.is_tensor(t) else t for t in f["blocks.0.self_attn.q"])  # a block the model does not have
    bad = _musubi_file(tmp_path / "bad.safetensors", f)
    with pytest.raises(MusubiInputError, match="match no weight"):
        merge_loras_into_checkpoint(tmp_path / "base.safetensors", [(bad, 1.0)], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    with pytest.raises(MusubiInputError, match="output path"):
        merge_loras_into_checkpoint(tmp_path / "base.safetensors", [(bad, 1.0)], tmp_path / "base.safetensors")


def test_in_memory_merge_and_exact_restore(tmp_path):
    model = tiny_model("t2v").to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = random_lora_factors(model, seed=4)
    handle = merge_into_model(model, _musubi_file(tmp_path / "l.safetensors", f), 0.6)
    w = dict(model.named_modules())["blocks.1.ffn.0"].weight
    expected = (before["blocks.1.ffn.0.weight"].float() + 0.6 * reference_delta(*f["blocks.1.ffn.0"])).bfloat16()
    assert not torch.equal(w, before["blocks.1.ffn.0.weight"])
    torch.testing.assert_close(w.float(), expected.float(), rtol=8e-3, atol=1e-5)  # bf16: one rounding
    handle.restore()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_apply_loras_adapter_and_merge_modes_agree_and_are_idempotent(tmp_path):
    model = tiny_model("t2v")
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 1, 4, 4, generator=g), torch.tensor([300.0]), torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        clean = model(x, t, ctx)
    a = _musubi_file(tmp_path / "a.safetensors", random_lora_factors(model, seed=5))
    b = _musubi_file(tmp_path / "b.safetensors", random_lora_factors(model, rank=2, seed=6))
    spec = [(a, 0.7), (b, 0.4)]
    apply_loras(model, spec, mode="adapter", block_filter=[1])
    apply_loras(model, spec, mode="adapter", block_filter=[1])  # again: no stacking
    assert len(attached_networks(model)) == 2
    with torch.no_grad():
        adapted = model(x, t, ctx)
    applied = apply_loras(model, spec, mode="merge", block_filter=r"^blocks\.1\.")
    assert attached_networks(model) == {}
    with torch.no_grad():
        merged = model(x, t, ctx)
    apply_loras(model, spec, mode="merge", block_filter=r"^blocks\.1\.")
    with torch.no_grad():
        merged_again = model(x, t, ctx)
    assert not torch.allclose(adapted, clean)
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged, merged_again)
    # block 0 untouched by the filter
    w0 = dict(model.named_modules())["blocks.0.self_attn.q"].weight
    assert torch.equal(w0, build_preset_state_dict("tiny-t2v")["blocks.0.self_attn.q.weight"])
    model.__dict__["_musubi_applied_loras"].remove()
    with torch.no_grad():
        assert torch.equal(model(x, t, ctx), clean)


# --- post-hoc EMA -----------------------------------------------------------------------------------------------------

def _ema_files(tmp_path, n=4):
    g = torch.Generator().manual_seed(7)
    paths, values = [], []
    for i in range(n):
        sd = {"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.randn(2, 8, generator=g).bfloat16(),
              "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(1.0), "step": torch.tensor([i], dtype=torch.int64)}
        p = tmp_path / f"ck_{i}.safetensors"
        save_file(sd, str(p), metadata={"ss_steps": str(100 * i), "sshs_model_hash": "stale"})
        t = time.time() - 100 + 10 * (n - i)   # mtimes in reverse name order: sorting must reverse them
        os.utime(p, (t, t))
        paths.append(p)
        values.append(sd["lora_unet_blocks_0_ffn_0.lora_down.weight"].double())
    return paths, values


def _gamma_bisect(s):  # independent root finding
    f = lambda g: g ** 3 + 7 * g ** 2 + (16 - s ** -2) * g + (12 - s ** -2)  # noqa: E731
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return lo


@pytest.mark.parametrize("mode", ["constant", "linear", "power"])
def test_post_hoc_ema_against_hand_reference(tmp_path, mode):
    paths, values = _ema_files(tmp_path)
    order = values[::-1]  # mtime order
    if mode == "constant":
        cfg, betas = EMAConfig(beta=0.9), [0.9, 0.9, 0.9]
    elif mode == "linear":
        cfg, betas = EMAConfig(beta=0.8, beta2=0.95), [0.8, 0.875, 0.95]
    else:
        gamma = _gamma_bisect(0.2)
        assert abs(sigma_rel_to_gamma(0.2) - gamma) < 1e-6
        cfg, betas = EMAConfig(sigma_rel=0.2), [(1 - 1 / t) ** (gamma + 1) for t in (1, 2, 3)]
    # closed form: weight of checkpoint j = (1-β_j) Π_{i>j} β_i, with β_0 term = 1 for the first file
    weights = []
    for j in range(4):
        w = 1.0 if j == 0 else 1 - betas[j - 1]
        for b in betas[j:]:
            w *= b
        weights.append(w)
    expected = sum(w * v for w, v in zip(weights, order)).float().bfloat16()
    out = post_hoc_ema(tmp_path, tmp_path / "out" / "ema.safetensors", cfg)
    got = load_file(str(out))
    assert got["lora_unet_blocks_0_ffn_0.lora_down.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(got["lora_unet_blocks_0_ffn_0.lora_down.weight"].float(), expected.float(),
                               rtol=1e-2, atol=1e-2)  # bf16 output: one rounding
    assert got["step"].tolist() == [3]  # non-float from the first file (mtime order: ck_3)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_steps"] == "0" and meta["sshs_model_hash"] != "stale" and mode in meta["musubi_ema"]


def test_post_hoc_ema_unsorted_and_errors(tmp_path):
    paths, values = _ema_files(tmp_path, 2)
    out = post_hoc_ema(paths, tmp_path / "o.safetensors", EMAConfig(beta=0.5, sort=False))
    ref = (0.5 * values[0] + 0.5 * values[1]).float()
    torch.testing.assert_close(load_file(str(out))["lora_unet_blocks_0_ffn_0.lora_down.weight"].float(), ref,
                               rtol=1e-2, atol=1e-2)
    with pytest.raises(MusubiInputError, match="at least one"):
        post_hoc_ema([], tmp_path / "e.safetensors")
    with pytest.raises(MusubiInputError, match="output path"):
        post_hoc_ema(paths, paths[1])
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(3, 8),
               "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(1.0), "step": torch.tensor([0])}, str(odd))
    with pytest.raises(MusubiInputError, match=r"odd\.safetensors key 'lora_unet_blocks_0_ffn_0\.lora_down"):
        post_hoc_ema([paths[0], odd], tmp_path / "e.safetensors", EMAConfig(sort=False))
    alpha = tmp_path / "alpha.safetensors"
    save_file({"lora_unet_blocks_0_ffn_0.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_blocks_0_ffn_0.alpha": torch.tensor(4.0), "step": torch.tensor([0])}, str(alpha))
    with pytest.raises(MusubiInputError, match="alpha"):
        post_hoc_ema([paths[0], alpha], tmp_path / "e.safetensors", EMAConfig(sort=False))


# --- mutation testing (docs/testing.md): refusals, labels, bias patches, scaled fp8 base, metadata, progress ----------


def _bias_lora(path, model, seed=8):
    """A Musubi LoRA on two layers of block 0, with a bias patch (`.diff_b`) on one of them."""
    g = torch.Generator().manual_seed(seed)
    q, ffn = model.blocks[0].self_attn.q, model.blocks[0].ffn[0]
    f = {"blocks.0.self_attn.q": (torch.randn(2, q.in_features, generator=g) * 0.1,
                                  torch.randn(q.out_features, 2, generator=g) * 0.1, 4.0),
         "blocks.0.ffn.0": (torch.randn(2, ffn.in_features, generator=g) * 0.1,
                            torch.randn(ffn.out_features, 2, generator=g) * 0.1, 2.0)}
    _musubi_file(path, f)
    sd = load_file(str(path))
    sd["lora_unet_blocks_0_ffn_0.diff_b"] = torch.randn(ffn.out_features, generator=g) * 0.1
    save_file(sd, str(path))
    return f, sd["lora_unet_blocks_0_ffn_0.diff_b"]


def test_checkpoint_merge_refusals_name_the_input(tmp_path, t2v):
    base = tmp_path / "base.safetensors"
    save_file(build_preset_state_dict("tiny-t2v"), str(base))
    lora = _musubi_file(tmp_path / "l.safetensors", random_lora_factors(t2v, seed=1, blocks=[0]))
    with pytest.raises(MusubiInputError, match=re.escape(
            "out_dtype: got 'fp64'; expected one of [None, 'bf16', 'fp16', 'fp32', 'fp8_e4m3fn']")):
        merge_loras_into_checkpoint(base, [(lora, 1.0)], tmp_path / "o.safetensors", out_dtype="fp64")
    with pytest.raises(MusubiInputError,
                       match=re.escape("loras: got []; expected at least one (LoRA, multiplier) pair")):
        merge_loras_into_checkpoint(base, [], tmp_path / "o.safetensors")
    with pytest.raises(MusubiInputError, match="output path"):               # never over one of the LoRAs
        merge_loras_into_checkpoint(base, [(lora, 1.0)], lora)
    f = random_lora_factors(t2v, seed=3, blocks=[0])
    f["blocks.7.self_attn.q"] = tuple(t.clone() if torch.is_tensor(t) else t for t in f["blocks.0.self_attn.q"])
    bad = _musubi_file(tmp_path / "bad.safetensors", f)
    with pytest.raises(MusubiInputError, match="^" + re.escape(f"{bad}: 3 LoRA keys match no weight")):
        merge_loras_into_checkpoint(base, [(bad, 1.0)], tmp_path / "o.safetensors")
    in_memory = read_lora(load_file(str(bad)))                                # no source: labelled "LoRA"
    with pytest.raises(MusubiInputError, match=r"^LoRA: 3 LoRA keys match no weight"):
        merge_loras_into_checkpoint(base, [(in_memory, 1.0)], tmp_path / "o.safetensors")
    model = tiny_model("t2v")
    with pytest.raises(MusubiInputError, match="^" + re.escape(f"{bad}: 3 LoRA keys match no weight")):
        merge_into_model(model, bad)                                          # strict by default
    with pytest.raises(MusubiInputError, match=r"^LoRA: 3 LoRA keys match no weight"):
        merge_into_model(model, in_memory)


def test_checkpoint_merge_bias_patches_metadata_progress_and_lorafile_items(tmp_path, t2v):
    base_sd = build_preset_state_dict("tiny-t2v")
    base = tmp_path / "base.safetensors"
    save_file(base_sd, str(base), metadata={"modelspec.title": "tiny"})
    f, diff_b = _bias_lora(tmp_path / "b.safetensors", t2v)
    lora_file = read_lora(tmp_path / "b.safetensors")
    calls = []
    out = merge_loras_into_checkpoint(base, [(lora_file, 0.5)], tmp_path / "m.safetensors",
                                      progress=lambda i, n: calls.append((i, n)))
    merged = load_file(str(out))
    n = len(base_sd)
    assert calls == [(i, n) for i in range(n)]
    for name, factors in f.items():
        expected = base_sd[f"{name}.weight"] + 0.5 * reference_delta(*factors)
        torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged["blocks.0.ffn.0.bias"], base_sd["blocks.0.ffn.0.bias"] + 0.5 * diff_b)
    assert torch.equal(merged["blocks.0.self_attn.q.bias"], base_sd["blocks.0.self_attn.q.bias"])
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.title"] == "tiny"
    assert json.loads(meta["musubi_merged_loras"]) == [[str(tmp_path / "b.safetensors"), 0.5]]
    out2 = merge_loras_into_checkpoint(base, [(tmp_path / "b.safetensors", -1.0)], tmp_path / "m2.safetensors")
    with safe_open(str(out2), "pt") as fh:
        assert json.loads(fh.metadata()["musubi_merged_loras"]) == [[str(tmp_path / "b.safetensors"), -1.0]]
    with open(out2, "rb") as fh:
        assert int.from_bytes(fh.read(8), "little") % 8 == 0                    # data start aligned to 8 bytes


def test_checkpoint_merge_of_a_scaled_fp8_base(tmp_path, t2v, comfy_quantize):
    """A ComfyUI quantized base is dequantized and merged; its scale / format tensors are dropped. out_dtype None:
    the whole file in bf16; fp8: the 2-D weights in fp8, the other tensors in their own dtype."""
    base_sd = {k: v.to(torch.bfloat16) for k, v in build_preset_state_dict("tiny-t2v").items()}
    stored, dequant, meta = comfy_quantize(base_sd, lambda k: k.startswith("blocks."))
    base = tmp_path / "q.safetensors"
    save_file(stored, str(base), metadata=meta)
    f = random_lora_factors(t2v, seed=9, blocks=[1])
    lora = _musubi_file(tmp_path / "l.safetensors", f)
    for out_dtype in (None, "fp8_e4m3fn"):
        out = merge_loras_into_checkpoint(base, [(lora, 1.0)], tmp_path / f"m_{out_dtype}.safetensors",
                                          out_dtype=out_dtype)
        merged = load_file(str(out))
        assert set(merged) == set(base_sd)
        for k, w in base_sd.items():
            quantized = k.endswith(".weight") and w.ndim == 2 and k.startswith("blocks.")
            want = torch.bfloat16 if out_dtype is None else \
                torch.float8_e4m3fn if (k.endswith(".weight") and w.ndim == 2) else w.dtype
            assert merged[k].dtype == want, (out_dtype, k)
            if out_dtype is None and quantized:
                expected = dequant[k].float()
                name = k[: -len(".weight")]
                if name in f:
                    expected = expected + reference_delta(*f[name])
                torch.testing.assert_close(merged[k].float(), expected, rtol=8e-3, atol=1e-5)


def test_checkpoint_merge_fp8_output_keeps_non_matrices_in_their_dtype(tmp_path, t2v):
    """fp8 output applies to 2-D `.weight` matrices; other tensors keep their dtype, or become bf16 when they are
    1-byte floats themselves (an all-fp8 file)."""
    base_sd = build_preset_state_dict("tiny-t2v")
    lora = _musubi_file(tmp_path / "l.safetensors", random_lora_factors(t2v, seed=10, blocks=[0]))
    for dtype, other in ((torch.float16, torch.float16), (torch.float8_e4m3fn, torch.bfloat16)):
        base = tmp_path / f"base_{dtype}.safetensors".replace("torch.", "")
        save_file({k: v.to(dtype) for k, v in base_sd.items()}, str(base))
        merged = load_file(str(merge_loras_into_checkpoint(base, [(lora, 1.0)], base.with_suffix(".m.safetensors"),
                                                           out_dtype="fp8_e4m3fn")))
        for k, w in base_sd.items():
            matrix = k.endswith(".weight") and w.ndim == 2
            assert merged[k].dtype == (torch.float8_e4m3fn if matrix else other), (dtype, k)


def test_prefix_is_the_one_more_than_half_the_keys_share():
    def ckpt(n_prefixed, n_plain):
        sd = {f"model.diffusion_model.a{i}.weight": torch.zeros(1) for i in range(n_prefixed)}
        sd |= {f"b{i}.weight": torch.zeros(1) for i in range(n_plain)}
        return Checkpoint.from_state_dict(sd)

    assert _detect_prefix(ckpt(2, 2)) == ""
    assert _detect_prefix(ckpt(3, 2)) == "model.diffusion_model."
    assert _detect_prefix(ckpt(2, 1)) == "model.diffusion_model."
    assert _detect_prefix(ckpt(1, 2)) == ""


def test_streaming_writer_refuses_a_tensor_that_differs_from_its_header(tmp_path):
    specs = {"a": (torch.float32, (2,))}
    for bad in (torch.zeros(2, dtype=torch.float16), torch.zeros(3)):
        with pytest.raises(RuntimeError, match=re.escape(
                f"internal: a produced {bad.dtype}{tuple(bad.shape)}, header says torch.float32(2,)")):
            write_safetensors_streaming(tmp_path / "w.safetensors", specs, lambda k, t=bad: t, {"x": 1})
        assert not (tmp_path / "w.safetensors").exists()
    for n in range(8):                    # every header length: the data start is aligned to 8 bytes
        write_safetensors_streaming(tmp_path / "w.safetensors", specs, lambda k: torch.ones(2), {"x": "y" * n})
        with open(tmp_path / "w.safetensors", "rb") as fh:
            assert int.from_bytes(fh.read(8), "little") % 8 == 0
        with safe_open(str(tmp_path / "w.safetensors"), "pt") as fh:
            assert fh.metadata() == {"x": "y" * n} and torch.equal(fh.get_tensor("a"), torch.ones(2))


def test_in_memory_merge_defaults_bias_patches_and_restore_once(tmp_path):
    model = tiny_model("t2v")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f, diff_b = _bias_lora(tmp_path / "b.safetensors", model)
    handle = merge_into_model(model, tmp_path / "b.safetensors")           # multiplier 1
    params = dict(model.named_parameters())
    for name, factors in f.items():
        torch.testing.assert_close(params[f"{name}.weight"], before[f"{name}.weight"] + reference_delta(*factors),
                                   rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(params["blocks.0.ffn.0.bias"], before["blocks.0.ffn.0.bias"] + diff_b)
    handle.restore()
    assert handle.restored is True
    merged_again = merge_into_model(model, tmp_path / "b.safetensors", 0.5)
    after_second = {k: v.clone() for k, v in model.state_dict().items()}
    handle.restore()                                                        # already restored: does nothing
    assert all(torch.equal(after_second[k], v) for k, v in model.state_dict().items())
    merged_again.restore()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patch_module_defaults_return_value_and_param_callback(tmp_path):
    model = tiny_model("t2v")
    _, diff_b = _bias_lora(tmp_path / "b.safetensors", model)
    lora = read_lora(tmp_path / "b.safetensors", model=model)
    mw = resolved_modules(lora, model)["blocks.0.ffn.0"]
    w0, b0 = model.blocks[0].ffn[0].weight.clone(), model.blocks[0].ffn[0].bias.clone()
    handle = MergeHandle(model)
    written = patch_module(model, "blocks.0.ffn.0", mw, 1.0, handle)        # not hooked: the weight is written too
    assert written == ["blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias"]
    assert not torch.equal(model.blocks[0].ffn[0].weight, w0)
    torch.testing.assert_close(model.blocks[0].ffn[0].bias, b0 + diff_b)
    handle.restore()
    assert torch.equal(model.blocks[0].ffn[0].weight, w0) and torch.equal(model.blocks[0].ffn[0].bias, b0)
    copies = {"blocks.0.ffn.0.weight": torch.nn.Parameter(w0.clone()),
              "blocks.0.ffn.0.bias": torch.nn.Parameter(b0.clone())}
    assert patch_module(model, "blocks.0.ffn.0", mw, 1.0, hooked=True, param=copies.__getitem__) == \
        ["blocks.0.ffn.0.bias"]                                             # hooked: the adapter applies ΔW
    torch.testing.assert_close(copies["blocks.0.ffn.0.bias"], b0 + diff_b)
    assert torch.equal(copies["blocks.0.ffn.0.weight"], w0)
    assert torch.equal(model.blocks[0].ffn[0].bias, b0)                     # the callback's parameter, not the model's
