"""Checkpoint merge (streaming), in-memory merge/restore, apply_loras, post-hoc EMA."""

import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.errors import MusubiInputError
from engine.lora import (EMAConfig, apply_loras, attached_networks, merge_into_model, merge_loras_into_checkpoint,
                         post_hoc_ema, read_lora, sigma_rel_to_gamma)
from engine.families.wan.presets import build_preset_state_dict

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
