"""Reader (every dialect), writer (every format), convert, match/refusals, bad files."""

import os
import pickle

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import MusubiInputError
from engine.lora import AdapterConfig, AdapterNetwork, convert_lora, match_lora, read_lora, save_lora
from engine.lora.dialects import resolved_modules
from engine.lora.metadata import sshs_hashes

from lora_fixtures import DIFFUSERS_NAME, random_lora_factors, reference_delta, tiny_model, weight_shapes


def _dialect_sd(factors, dialect):
    """Keys spelled from each dialect's published pattern."""
    sd = {}
    for name, (down, up, alpha) in factors.items():
        blk, sub = name.split(".", 2)[1], name.split(".", 2)[2]
        under = name.replace(".", "_")
        if dialect == "musubi":
            s = f"lora_unet_{under}"; sd |= {f"{s}.lora_down.weight": down, f"{s}.lora_up.weight": up,
                                            f"{s}.alpha": torch.tensor(alpha)}
        elif dialect == "videox-fun":
            s = f"lora_unet__{under}"; sd |= {f"{s}.lora_down.weight": down, f"{s}.lora_up.weight": up,
                                             f"{s}.alpha": torch.tensor(alpha)}
        elif dialect == "comfyui":
            s = f"diffusion_model.{name}"; sd |= {f"{s}.lora_down.weight": down, f"{s}.lora_up.weight": up,
                                                 f"{s}.alpha": torch.tensor(alpha)}
        elif dialect == "diffusion-pipe":  # lora_A/B, alpha folded (no alpha key)
            s = f"diffusion_model.{name}"; sd |= {f"{s}.lora_A.weight": down,
                                                 f"{s}.lora_B.weight": up * (alpha / down.shape[0])}
        elif dialect == "diffusers":
            s = f"transformer.blocks.{blk}.{DIFFUSERS_NAME[sub]}"
            sd |= {f"{s}.lora_A.weight": down, f"{s}.lora_B.weight": up * (alpha / down.shape[0])}
        elif dialect == "peft":
            s = f"base_model.model.blocks.{blk}.{DIFFUSERS_NAME[sub]}"
            sd |= {f"{s}.lora_A.weight": down, f"{s}.lora_B.weight": up * (alpha / down.shape[0])}
    return sd


@pytest.fixture(scope="module")
def i2v():
    return tiny_model("i2v")


@pytest.mark.parametrize("dialect", ["musubi", "videox-fun", "comfyui", "diffusion-pipe", "diffusers", "peft",
                                     "model.diffusion_model", "lycoris"])
@pytest.mark.parametrize("with_model", [True, False])
def test_every_lora_dialect_reads_to_same_delta(i2v, dialect, with_model):
    factors = random_lora_factors(i2v, rank=4, seed=1)
    if dialect == "model.diffusion_model":           # ComfyUI's full prefix
        sd = {f"model.{k}": v for k, v in _dialect_sd(factors, "comfyui").items()}
    elif dialect == "lycoris":                       # LyCORIS' prefix for the same underscore names
        sd = {k.replace("lora_unet_", "lycoris_"): v for k, v in _dialect_sd(factors, "musubi").items()}
    else:
        sd = _dialect_sd(factors, dialect)
    lora = read_lora(sd, model=i2v if with_model else None)
    assert set(lora.modules) == set(factors)  # self_attn/cross_attn/k_img recovered exactly
    assert lora.dialect == {"diffusion-pipe": "comfyui", "model.diffusion_model": "comfyui"}.get(dialect, dialect)
    for name, (down, up, alpha) in factors.items():
        torch.testing.assert_close(lora.modules[name].delta(), reference_delta(down, up, alpha), rtol=1e-5, atol=1e-7)
    report = match_lora(lora, i2v)
    assert report.complete and len(report.matched) == 24 and report.uncovered == []
    assert report.summary == "LoRA: 24/24 LoRA modules matched; 0 default targets not covered"


def test_lycoris_loha_and_lokr_read(i2v):
    g = torch.Generator().manual_seed(3)
    q = "blocks.0.self_attn.q"  # [256, 256]
    w = {k: torch.randn(s, generator=g) for k, s in
         [("hada_w1_a", (256, 4)), ("hada_w1_b", (4, 256)), ("hada_w2_a", (256, 4)), ("hada_w2_b", (4, 256))]}
    k1, k2 = torch.randn(16, 16, generator=g), torch.randn(16, 2, generator=g)
    k3 = torch.randn(2, 16, generator=g)
    sd = {f"lora_unet_blocks_0_self_attn_q.{k}": v for k, v in w.items()}
    sd["lora_unet_blocks_0_self_attn_q.alpha"] = torch.tensor(2.0)
    sd |= {"diffusion_model.blocks.1.ffn.2.lokr_w1": k1, "diffusion_model.blocks.1.ffn.2.lokr_w2_a": k2,
           "diffusion_model.blocks.1.ffn.2.lokr_w2_b": torch.randn(2, 32, generator=g),
           "diffusion_model.blocks.1.ffn.2.alpha": torch.tensor(1.0)}
    lora = read_lora(sd, model=i2v)
    ref_h = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * 0.5
    torch.testing.assert_close(lora.modules[q].delta(), ref_h)
    ref_k = torch.kron(k1, k2 @ sd["diffusion_model.blocks.1.ffn.2.lokr_w2_b"]) * 0.5  # ffn.2: [256, 512]
    torch.testing.assert_close(lora.modules["blocks.1.ffn.2"].delta(), ref_k)
    assert match_lora(lora, i2v).complete
    with pytest.raises(MusubiInputError, match="diffusers"):
        save_lora(lora, "/tmp/lt/x.safetensors", format="diffusers")


@pytest.mark.parametrize("fmt", ["comfyui", "musubi", "diffusers"])
def test_format_round_trip_preserves_w_plus_delta(tmp_path, i2v, fmt):
    factors = random_lora_factors(i2v, rank=4, seed=2)
    src = read_lora(_dialect_sd(factors, "musubi"), model=i2v)
    out = save_lora(src, tmp_path / f"l_{fmt}.safetensors", format=fmt, metadata={"ss_steps": 100, "data": {"a": 1}})
    back = read_lora(out, model=i2v)
    shapes = weight_shapes(i2v)
    W = dict(i2v.named_modules())
    for name in factors:
        w = W[name].weight.detach()
        torch.testing.assert_close(w + back.modules[name].delta(), w + src.modules[name].delta(), rtol=0, atol=1e-6)
        assert back.modules[name].shape == shapes[name]
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["ss_steps"] == "100" and meta["data"] == '{"a": 1}' and meta["modelspec.architecture"] == "wan2.1/lora"
    prefix = {"comfyui": "diffusion_model.blocks.", "musubi": "lora_unet_blocks_", "diffusers": "transformer.blocks."}
    assert all(k.startswith(prefix[fmt]) for k in keys)
    if fmt == "diffusers":
        assert any(".attn2.add_k_proj.lora_A.weight" in k for k in keys) and not any(k.endswith("alpha") for k in keys)
    # hashes: recomputed independently as sd-scripts does (ss_* metadata only, tensor bytes after the header)
    from safetensors.torch import load_file
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(
        load_file(str(out)), {k: v for k, v in meta.items() if k.startswith("ss_")})


def test_musubi_metadata_and_network_save(tmp_path):
    model = tiny_model("t2v")
    net = AdapterNetwork.create(model, AdapterConfig(kind="loha", rank=4, alpha=2))
    out = save_lora(net, tmp_path / "n.safetensors", format="musubi")
    with safe_open(str(out), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["ss_base_model_version"] == "wan" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_network_module"] == "networks.loha"
    assert "lora_unet_blocks_0_cross_attn_o.hada_w2_b" in keys
    back = read_lora(out, model=model)
    torch.testing.assert_close(back.modules["blocks.1.ffn.0"].delta(), net.delta_weight("blocks.1.ffn.0"))


def test_convert_any_to_any(tmp_path, i2v):
    factors = random_lora_factors(i2v, rank=2, seed=4)
    save_file(_dialect_sd(factors, "peft"), str(tmp_path / "peft.safetensors"))
    a = convert_lora(tmp_path / "peft.safetensors", tmp_path / "m.safetensors", "musubi")
    b = convert_lora(a, tmp_path / "c.safetensors", "comfyui", model=i2v)
    lora = read_lora(b, model=i2v)
    for name, (down, up, alpha) in factors.items():
        torch.testing.assert_close(lora.modules[name].delta(), reference_delta(down, up, alpha), rtol=1e-5, atol=1e-7)
    with pytest.raises(MusubiInputError, match="output path"):
        convert_lora(a, a, "comfyui")
    with pytest.raises(MusubiInputError, match="output path"):
        save_lora(str(b), str(tmp_path / "." / "c.safetensors"))


def test_refuses_other_families_variants_and_sizes(raises_input):
    t2v = tiny_model("t2v")
    hv = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 4)}
    with raises_input("LoRA", "a HunyuanVideo or Flux LoRA (key 'lora_unet_double_blocks_0_img_attn_qkv')",
                      "a LoRA trained for Wan 2.1"):
        match_lora(read_lora(hv), t2v)
    for piece in ("k_img", "v_img"):                     # either one names an I2V LoRA
        stem = f"diffusion_model.blocks.0.cross_attn.{piece}"
        one = {f"{stem}.lora_down.weight": torch.zeros(4, 256), f"{stem}.lora_up.weight": torch.zeros(256, 4)}
        with raises_input("my.safetensors", f"image cross-attention weights ('{stem}.lora_down.weight')",
                          "a LoRA for this model variant: it was trained on an I2V/FLF2V model and this model has "
                          "no k_img/v_img (text-to-video)"):
            match_lora(read_lora(one), t2v, label="my.safetensors")
    q = "diffusion_model.blocks.0.self_attn.q"
    with raises_input(f"LoRA key '{q}.lora_down.weight'", "LoRA shape (512, 512)", "the model's blocks.0.self_attn"
                      ".q.weight shape (256, 256) (LoRA made for another model size, e.g. 14B vs 1.3B)"):
        match_lora(read_lora({f"{q}.lora_down.weight": torch.zeros(4, 512), f"{q}.lora_up.weight": torch.zeros(512, 4)}), t2v)
    with raises_input(f"LoRA key '{q}.diff_b'", "shape (7,)", "the model's blocks.0.self_attn.q.bias shape (256,) "
                      "(LoRA made for another model size)"):
        match_lora(read_lora({f"{q}.diff_b": torch.zeros(7)}), t2v)
    fp = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}
    with pytest.raises(MusubiInputError, match="HunyuanVideo"):   # diffusers pieces of HunyuanVideo's fused qkv
        match_lora(read_lora(fp), t2v)
    i2v_lora = read_lora(_dialect_sd(random_lora_factors(tiny_model("i2v"), seed=5), "musubi"))
    with pytest.raises(MusubiInputError, match="k_img"):
        match_lora(i2v_lora, t2v)
    partial = {"diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(4, 256),
               "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(256, 4)}
    report = match_lora(read_lora(partial), t2v)
    assert not report.complete and "blocks.9" in report.unmatched_keys[0] and len(report.uncovered) == 20
    assert "0/1" in report.summary


def test_bad_files_refused(tmp_path, raises_input):
    good = tmp_path / "good.safetensors"
    save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 256),
               "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(256, 4)}, str(good))
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(MusubiInputError, match="truncated or corrupt"):
        read_lora(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(MusubiInputError):
        read_lora(garbage)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    evil = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, evil)  # a pickle that would run code
    with pytest.raises(MusubiInputError, match="weights_only"):
        read_lora(evil)
    assert not (tmp_path / "pwned").exists()
    mismatch = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(4, 256),
                "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(256, 8)}
    with pytest.raises(MusubiInputError, match="factor shapes"):
        read_lora(mismatch)
    with raises_input("LoRA state dict", "4 tensors and no adapter weights (e.g. ['a.weight', 'b.weight', "
                      "'c.weight'])", "LoRA/LoHa/LoKr tensors (lora_down/lora_up, lora_A/lora_B, hada_*, lokr_*) or "
                      "weight differences (.diff, .diff_b)"):
        read_lora({f"{k}.weight": torch.zeros(2) for k in "abcd"})


def _musubi_target_default(sd: dict) -> dict:
    """Musubi Tuner's `convert_lora --target default`, as its docs describe it: strip `diffusion_model.` /
    `transformer.`, module path dots -> underscores under `lora_unet_`, lora_A/B -> lora_down/up, alpha = rank
    where the file has none."""
    out = {}
    for k, v in sd.items():
        for prefix in ("diffusion_model.", "transformer."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        for src, dst in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight"),
                         (".alpha", ".alpha")):
            if k.endswith(src):
                stem = "lora_unet_" + k[:-len(src)].replace(".", "_")
                out[stem + dst] = v
    for k in [k for k in out if k.endswith(".lora_down.weight")]:
        out.setdefault(k.replace(".lora_down.weight", ".alpha"), torch.tensor(out[k].shape[0]))
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "musubi-other"])
def test_folded_alpha_formats_say_alpha_equals_rank(tmp_path, i2v, fmt):
    # alpha 8 on rank 4 (scale 2): the folded file's ss_network_alpha must be its rank, also when converted from a
    # file whose metadata said otherwise, or a reader applying alpha/rank would double the effect
    factors = {n: (d, u, 8.0) for n, (d, u, _) in random_lora_factors(i2v, rank=4, seed=6).items()}
    save_file(_dialect_sd(factors, "musubi"), str(tmp_path / "m.safetensors"),
              {"ss_network_alpha": "8.0", "ss_network_dim": "4"})
    out = convert_lora(tmp_path / "m.safetensors", tmp_path / f"{fmt}.safetensors", fmt, model=i2v)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    back = read_lora(out, model=i2v)
    for name, (down, up, alpha) in factors.items():
        torch.testing.assert_close(back.modules[name].delta(), reference_delta(down, up, alpha), rtol=1e-5, atol=1e-6)


def test_musubi_other_layout_is_what_musubi_tuner_reads_back(tmp_path, i2v):
    from safetensors.torch import load_file
    from engine.lora.targets import musubi_stem

    factors = {n: (d, u, 2.0) for n, (d, u, _) in random_lora_factors(i2v, rank=4, seed=7).items()}
    src = read_lora(_dialect_sd(factors, "musubi"), model=i2v)
    out = save_lora(src, tmp_path / "other.safetensors", format="musubi-other")
    sd = load_file(str(out))
    # convert_lora --target other: diffusion_model.<native path>.lora_A/B, no alpha, each factor times sqrt(a/r)
    assert all(k.startswith("diffusion_model.blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in sd)
    name = "blocks.0.self_attn.q"
    down, up, alpha = factors[name]
    torch.testing.assert_close(sd[f"diffusion_model.{name}.lora_A.weight"], down * (alpha / 4) ** 0.5)
    torch.testing.assert_close(sd[f"diffusion_model.{name}.lora_B.weight"], up * (alpha / 4) ** 0.5)
    # ... and Musubi's --target default turns it into its own lora_unet_* names with the same ΔW
    musubi = read_lora(_musubi_target_default(sd), model=i2v)
    assert {musubi_stem(n) for n in musubi.modules} == {musubi_stem(n) for n in factors}
    for name, (down, up, alpha) in factors.items():
        torch.testing.assert_close(musubi.modules[name].delta(), reference_delta(down, up, alpha), rtol=1e-5,
                                   atol=1e-6)


# --- writer details the round trips above do not pin (mutation testing, #21 item 9) ------------------------------

def _one_module_sd(rank=4, alpha=8.0, name="blocks.0.self_attn.q", seed=8):
    g = torch.Generator().manual_seed(seed)
    s = "lora_unet_" + name.replace(".", "_")
    return {f"{s}.lora_down.weight": torch.randn(rank, 256, generator=g), f"{s}.lora_up.weight":
            torch.randn(256, rank, generator=g), f"{s}.alpha": torch.tensor(alpha)}


def test_save_dtype_by_name_every_source_kind_and_refusals(tmp_path):
    from safetensors.torch import load_file

    sd = _one_module_sd()
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src))
    outs = [save_lora(sd, tmp_path / "from_dict.safetensors", dtype="bf16"),          # a state dict
            save_lora(str(src), tmp_path / "from_path.safetensors", dtype="bf16"),    # a path
            save_lora(read_lora(src), tmp_path / "from_file.safetensors", dtype=torch.bfloat16)]
    stem = "diffusion_model.blocks.0.self_attn.q"
    for out in outs:
        w = load_file(str(out))
        assert all(t.dtype == torch.bfloat16 for t in w.values()), out
        assert torch.equal(w[f"{stem}.lora_down.weight"], sd["lora_unet_blocks_0_self_attn_q.lora_down.weight"]
                           .to(torch.bfloat16))
        assert w[f"{stem}.alpha"].item() == 8.0
    with pytest.raises(MusubiInputError) as e:
        save_lora(sd, tmp_path / "x.safetensors", dtype="fp8")
    assert str(e.value) == ("save dtype: got 'fp8'; expected one of "
                            "['bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32']")
    with pytest.raises(MusubiInputError) as e:
        save_lora(sd, tmp_path / "x.safetensors", format="kohya")
    assert str(e.value) == ("LoRA format: got 'kohya'; expected one of "
                            "('comfyui', 'musubi', 'diffusers', 'musubi-other')")
    for same in (lambda: save_lora(read_lora(src), src),                       # the LoRAFile's own source
                 lambda: save_lora(sd, src, input_paths=[str(src)]),           # an input the caller names
                 lambda: save_lora(str(src), tmp_path / "." / "src.safetensors")):
        with pytest.raises(MusubiInputError) as e:
            same()
        assert str(e.value).startswith("output path: got '") and str(e.value).endswith(
            "src.safetensors'; expected a file different from every input file")


def test_save_refuses_unresolved_and_unknown_module_names(tmp_path):
    unresolved = read_lora({"lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 4),
                            "lora_unet_foo_bar.lora_up.weight": torch.zeros(4, 2)})
    assert unresolved.unresolved == {"lora_unet_foo_bar"}
    with pytest.raises(MusubiInputError) as e:
        save_lora(unresolved, tmp_path / "u.safetensors")
    assert str(e.value) == ("LoRA  module names: got ['lora_unet_foo_bar']; expected module names of the model "
                            "(read the LoRA with its model to resolve them)")
    with pytest.raises(MusubiInputError) as e:
        save_lora({"diffusion_model.foo.bar.lora_down.weight": torch.zeros(2, 4),
                   "diffusion_model.foo.bar.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "k.safetensors")
    assert str(e.value) == "LoRA  module names: got ['foo.bar']; expected module names of a known model family"


def test_metadata_of_mixed_kinds_and_ranks_and_the_title(tmp_path):
    g = torch.Generator().manual_seed(9)
    sd = _one_module_sd(rank=4, alpha=4.0) | _one_module_sd(rank=2, alpha=2.0, name="blocks.0.self_attn.k")
    sd |= {f"lora_unet_blocks_1_ffn_2.{k}": torch.randn(*s, generator=g) for k, s in
           [("hada_w1_a", (256, 2)), ("hada_w1_b", (2, 512)), ("hada_w2_a", (256, 2)), ("hada_w2_b", (2, 512))]}
    sd["lora_unet_blocks_1_ffn_2.alpha"] = torch.tensor(2.0)
    out = save_lora(sd, tmp_path / "my title.safetensors", format="musubi")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("mixed", "mixed", "mixed")
    assert meta["modelspec.title"] == "my title"
    out = save_lora(_one_module_sd(rank=4, alpha=4.0) | _one_module_sd(rank=2, alpha=2.0, name="blocks.0.self_attn.k"),
                    tmp_path / "r.safetensors", format="musubi")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("mixed", "mixed")
    assert meta["ss_network_module"] == "networks.lora_wan"


def test_lokr_with_two_full_factors_is_written_with_alpha_max_w2(tmp_path):
    """Scale 1 (no low-rank factor); alpha = max(w2.shape) also gives 1 in Musubi, which divides by that dim."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(10)
    w1, w2 = torch.randn(16, 16, generator=g), torch.randn(16, 32, generator=g)     # kron -> [256, 512] = ffn.2
    for alpha in (None, 3.0):
        sd = {"diffusion_model.blocks.1.ffn.2.lokr_w1": w1, "diffusion_model.blocks.1.ffn.2.lokr_w2": w2}
        if alpha is not None:
            sd["diffusion_model.blocks.1.ffn.2.alpha"] = torch.tensor(alpha)
        w = load_file(str(save_lora(sd, tmp_path / f"k{alpha}.safetensors")))
        assert w["diffusion_model.blocks.1.ffn.2.alpha"].item() == 32.0
        torch.testing.assert_close(read_lora(w).modules["blocks.1.ffn.2"].delta(), torch.kron(w1, w2))


def test_trained_lora_network_saves_its_scale_and_lycoris_keeps_the_comfy_stem_in_musubi_other(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("t2v")
    net = AdapterNetwork.create(model, AdapterConfig(kind="lora", rank=4, alpha=2))     # scale 0.5
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    back = read_lora(save_lora(net, tmp_path / "n.safetensors"), model=model)
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        torch.testing.assert_close(back.modules[name].delta(), net.delta_weight(name))
        assert back.modules[name].alpha == 2.0 and back.modules[name].rank == 4
    loha = AdapterNetwork.create(model, AdapterConfig(kind="loha", rank=2, alpha=1))
    keys = set(load_file(str(save_lora(loha, tmp_path / "h.safetensors", format="musubi-other"))))
    assert "diffusion_model.blocks.0.self_attn.q.hada_w1_a" in keys and "diffusion_model.blocks.0.self_attn.q.alpha" in keys


def test_diffusers_refusals_name_the_module_and_the_reason(tmp_path):
    g = torch.Generator().manual_seed(12)
    loha = {f"lora_unet_blocks_0_self_attn_q.{k}": torch.randn(*s, generator=g) for k, s in
            [("hada_w1_a", (256, 2)), ("hada_w1_b", (2, 256)), ("hada_w2_a", (256, 2)), ("hada_w2_b", (2, 256))]}
    with pytest.raises(MusubiInputError) as e:
        save_lora(loha, tmp_path / "d.safetensors", format="diffusers")
    assert str(e.value) == ("LoRA module blocks.0.self_attn.q: got 'loha'; expected plain LoRA weights (diffusers/PEFT "
                            "has no LoHa/LoKr format; save as comfyui or musubi)")
    norm = {"diffusion_model.blocks.0.norm3.lora_down.weight": torch.zeros(2, 4),
            "diffusion_model.blocks.0.norm3.lora_up.weight": torch.zeros(4, 2)}
    with pytest.raises(MusubiInputError) as e:
        save_lora(norm, tmp_path / "d.safetensors", format="diffusers")
    assert str(e.value) == ("LoRA module blocks.0.norm3: got 'no diffusers equivalent'; expected a DiT Linear layer "
                            "that diffusers names")


# --- dialect details the round trips above do not pin (mutation testing, #21 item 9) -----------------------------

def _fused_sd(pieces, prefix="transformer.", block="transformer_blocks.1", shared_down=None, seed=3):
    """{piece index: (piece name, rank, rows, alpha)} -> a diffusers state dict of LoRA pieces of one fused layer."""
    g = torch.Generator().manual_seed(seed)
    sd, factors = {}, {}
    for i, (piece, r, rows, alpha) in pieces.items():
        down = shared_down if shared_down is not None else torch.randn(r, 8, generator=g)
        up = torch.randn(rows, r, generator=g)
        stem = f"{prefix}{block}.{piece}"
        sd[f"{stem}.lora_A.weight"], sd[f"{stem}.lora_B.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
        factors[i] = (down, up, alpha / r)
    return sd, factors


@pytest.mark.parametrize("prefix", ["base_model.model.", "diffusion_model.", "model.diffusion_model."])
def test_fused_pieces_sharing_one_down_join_into_one_lora(prefix):
    """All pieces of a fused layer with the same down matrix (as the pack writes them): the joined LoRA keeps that
    down, stacks the scaled ups in piece order and says alpha = rank (scale already folded in). PEFT's prefix, and
    ComfyUI's (a diffusers-named model keeps diffusers' names in ComfyUI)."""
    down = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    pieces = {0: ("attn.to_q", 2, 8, 4.0), 1: ("attn.to_k", 2, 8, 4.0), 2: ("attn.to_v", 2, 8, 4.0)}
    sd, factors = _fused_sd(pieces, prefix=prefix, shared_down=down)
    lora = read_lora(sd)
    assert set(lora.modules) == {"double_blocks.1.img_attn_qkv"} and lora.stems["double_blocks.1.img_attn_qkv"] == (
        "diffusers", "double_blocks.1.img_attn_qkv")
    mw = lora.modules["double_blocks.1.img_attn_qkv"]
    assert mw.kind == "lora" and mw.alpha == 2.0 and mw.rank == 2 and torch.equal(mw.tensors["down"], down)
    assert torch.equal(mw.tensors["up"], torch.cat([factors[i][1] * 2.0 for i in range(3)]))
    assert mw.source_keys == sorted(sd)
    torch.testing.assert_close(mw.delta(), torch.cat([2.0 * f[1] @ down for f in factors.values()]))


def test_fused_pieces_with_their_own_downs_join_block_diagonally_in_row_order():
    """Bare diffusers names (no prefix), three pieces of a single block's linear1 (q, k: 8 rows each, proj_mlp:
    4·8 rows), v missing: downs stacked on the rank axis, each up in its own rows and rank columns, alpha = total
    rank."""
    pieces = {0: ("attn.to_q", 1, 8, 3.0), 1: ("attn.to_k", 2, 8, 2.0), 3: ("proj_mlp", 3, 32, 9.0)}
    sd, factors = _fused_sd(pieces, prefix="", block="single_transformer_blocks.0")
    lora = read_lora(sd)
    mw = lora.modules["single_blocks.0.linear1"]
    assert set(lora.modules) == {"single_blocks.0.linear1"} and mw.source_keys == sorted(sd)
    (d0, u0, s0), (d1, u1, s1), (d3, u3, s3) = factors[0], factors[1], factors[3]
    assert mw.alpha == 6.0 and mw.rank == 6 and torch.equal(mw.tensors["down"], torch.cat([d0, d1, d3]))
    up = torch.zeros(56, 6)
    up[0:8, :1], up[8:16, 1:3], up[24:56, 3:] = u0 * s0, u1 * s1, u3 * s3
    assert torch.equal(mw.tensors["up"], up)


def test_fused_piece_of_the_wrong_size_is_refused(raises_input):
    pieces = {0: ("attn.to_q", 2, 8, 2.0), 1: ("attn.to_k", 2, 9, 2.0)}
    sd, _ = _fused_sd(pieces)
    with raises_input("LoRA state dict transformer_blocks.1.attn.to_k shape", ((9, 2), (2, 8)),
                      "8 rows and 8 inputs (a piece of double_blocks.1.img_attn_qkv)"):
        read_lora(sd)
    sd, _ = _fused_sd(pieces={0: ("attn.to_q", 2, 8, 2.0)})
    other, _ = _fused_sd(pieces={1: ("attn.to_k", 2, 8, 2.0)})
    other["transformer.transformer_blocks.1.attn.to_k.lora_A.weight"] = torch.randn(2, 6)   # 6 inputs, not 8
    with raises_input("LoRA state dict transformer_blocks.1.attn.to_k shape", ((8, 2), (2, 6)), "8 rows and 8 inputs"):
        read_lora({**sd, **other})


def test_a_fused_lora_whose_rows_do_not_fill_its_diffusers_pieces_is_refused(tmp_path, raises_input):
    """Saving in the diffusers format splits a fused qkv LoRA into q/k/v by rows (3 × hidden); an up matrix of
    another height is refused naming the module and both row counts, not written as wrong pieces."""
    hidden, rank = 8, 2
    good = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(rank, hidden),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * hidden, rank)}
    out = save_lora(read_lora(good), tmp_path / "good.safetensors", format="diffusers")
    with safe_open(str(out), "pt") as f:
        assert {k.split(".lora_")[0] for k in f.keys()} == {
            f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"}
    bad = {**good, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * hidden + 1, rank)}
    with raises_input("LoRA module double_blocks.0.img_attn_qkv rows", 3 * hidden + 1, f"{3 * hidden} (its "
                      "diffusers pieces)"):
        save_lora(read_lora(bad), tmp_path / "bad.safetensors", format="diffusers")


def test_a_bias_patch_stays_when_the_weight_part_cannot_apply():
    """The bias key (`.diff_b`, or `.b_norm` beside `.w_norm`) is kept out of the unmatched keys when only the
    module's weight part has nowhere to go: a LoRA on a 1-D weight, a `.w_norm` on a module with no weight."""
    from engine.lora.dialects import _resolve

    g = torch.Generator().manual_seed(0)
    lora = read_lora({"m.lora_down.weight": torch.randn(2, 4, generator=g), "m.lora_up.weight": torch.randn(4, 2, generator=g),
                      "m.diff_b": torch.randn(4, generator=g)})
    resolved, unmatched = _resolve(lora, {"m.weight": (4,), "m.bias": (4,)}, "L")
    assert unmatched == ["m.lora_down.weight", "m.lora_up.weight"] and list(resolved) == ["m"]
    assert resolved["m"].kind == "diff" and torch.equal(resolved["m"].bias_diff, lora.modules["m"].bias_diff)
    lora = read_lora({"m.w_norm": torch.randn(4, 4, generator=g), "m.b_norm": torch.randn(4, generator=g)})
    resolved, unmatched = _resolve(lora, {"m.bias": (4,)}, "L")
    assert unmatched == ["m.w_norm"] and resolved["m"].weight_patch is None and resolved["m"].bias_diff is not None


def test_patch_params_names_weight_and_bias_and_resolved_modules_labels_its_refusals():
    from engine.lora.dialects import patch_params, resolved_modules
    from engine.lora.weights import ModuleWeights

    mw = ModuleWeights("diff", {}, weight_patch=("diff", torch.zeros(4, 4)), bias_diff=torch.zeros(4))
    assert patch_params("m", mw, {"m.weight": (4, 4)}) == [("m.weight", "weight"), ("m.bias", "bias")]
    lora = read_lora({"m.diff": torch.zeros(4, 3)})
    with pytest.raises(MusubiInputError, match=r"^LoRA key 'm\.diff': got 'LoRA shape \(4, 3\)'"):
        resolved_modules(lora, None, params={"m.weight": (4, 4)})


def test_require_complete_lists_the_first_three_keys():
    from engine.lora.dialects import MatchReport, require_complete

    report = MatchReport([], ["a", "b", "c", "d"], [], "")
    with pytest.raises(MusubiInputError) as e:
        require_complete(report, "L")
    assert str(e.value) == ("L: 4 LoRA keys match no weight of the model (e.g. ['a', 'b', 'c']); "
                            "expected every key to apply")


def test_conv_shaped_factors_read_as_matrices_and_other_shapes_are_refused(raises_input):
    """[a, b, 1, 1] and [a, b, 1] factors are the [a, b] matrices of a Linear (ComfyUI flattens them); a 1-D or a
    real conv factor ([a, b, 3, 1]) is refused as not a matrix."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    lora = read_lora({"m.lora_down.weight": down[:, :, None, None], "m.lora_up.weight": up[:, :, None]})
    assert torch.equal(lora.modules["m"].tensors["down"], down) and torch.equal(lora.modules["m"].tensors["up"], up)
    for bad in (torch.randn(4, generator=g), torch.randn(2, 4, 3, 1, generator=g)):
        with raises_input("LoRA state dict module 'm' tensor down", tuple(bad.shape), "a 2-D matrix"):
            read_lora({"m.lora_down.weight": bad, "m.lora_up.weight": up})


def test_match_against_a_mapping_of_shapes_and_bare_parameters():
    """A model given as {module: weight shape} (a checkpoint's names); a patch may name a bare parameter; an
    underscore name no family knows is resolved against the model's own names; unknown weights are refused."""
    from engine.lora.dialects import _resolve

    model = tiny_model("t2v")
    shapes = weight_shapes(model)
    factors = random_lora_factors(model)
    report = match_lora(read_lora(_dialect_sd(factors, "comfyui")), shapes)
    assert sorted(report.matched) == sorted(factors) and report.complete
    resolved, unmatched = _resolve(read_lora({"p.diff": torch.zeros(4, 4)}), {"p": (4, 4)}, "L")
    assert list(resolved) == ["p"] and unmatched == []
    lora = read_lora({"lora_unet_foo_bar_baz.diff": torch.zeros(4, 4)})
    assert lora.unresolved == {"lora_unet_foo_bar_baz"}
    resolved, unmatched = _resolve(lora, {"foo_bar.baz.weight": (4, 4)}, "L")
    assert list(resolved) == ["foo_bar.baz"] and unmatched == []
    with pytest.raises(MusubiInputError) as e:
        match_lora(lora, {"a.x": (4, 4), "b.y": (4, 4), "c.z": (4, 4)})
    assert str(e.value) == "model: got \"3 weights (e.g. ['a.x', 'b.y'])\"; expected the weights of a known DiT"


def test_image_cross_attention_beyond_the_model_is_unmatched_on_an_i2v_model():
    """The I2V-only refusal is for a model without image cross-attention: on an I2V model, a k_img/v_img key of a
    block it does not have is just a key that matches nothing."""
    sd = {f"diffusion_model.blocks.9.cross_attn.{p}.lora_{s}.weight": torch.zeros(*shape)
          for p in ("k_img", "v_img") for s, shape in (("down", (4, 256)), ("up", (256, 4)))}
    report = match_lora(read_lora(sd), tiny_model("i2v"))
    assert sorted(report.unmatched_keys) == sorted(sd) and report.matched == []
    with pytest.raises(MusubiInputError, match="k_img"):
        match_lora(read_lora(sd), tiny_model("t2v"))


# --- read_lora's refusals and its reading of names (mutation testing, #21) -----------------------------------------

def _lora_pair(stem: str, rank: int = 2, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"{stem}.lora_down.weight": torch.randn(rank, size, generator=g),
            f"{stem}.lora_up.weight": torch.randn(size, rank, generator=g)}


def test_read_lora_refusals_say_where_what_and_what_was_expected(tmp_path, raises_input):
    with raises_input("LoRA", "int", "a file path or a state dict of tensors"):
        read_lora(42)
    with raises_input("LoRA state dict", "no tensors", "a LoRA file"):
        read_lora({})
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with raises_input(f"checkpoint {empty}", "no tensors", "a file with model weights"):
        read_lora(empty)
    with raises_input("LoRA state dict key 'x.lora_down.weight'", "int", "a tensor"):
        read_lora({"x.lora_down.weight": 3})
    q = "lora_unet_blocks_0_self_attn_q"
    two_kinds = {**_lora_pair(q), f"{q}.hada_w1_a": torch.zeros(8, 2)}
    mixed = tmp_path / "mixed.safetensors"            # (safetensors files keep their keys sorted: hada_ first)
    save_file(two_kinds, str(mixed))
    with raises_input(f"{mixed} module {q!r}", "loha and lora tensors", "one adapter kind per module"):
        read_lora(mixed)
    with raises_input("LoRA state dict module 'blocks.0.self_attn.q'", "two sets of weights (e.g. two dialects "
                      "mixed)", "one set of adapter weights per module"):
        read_lora({**_lora_pair(q), **_lora_pair("diffusion_model.blocks.0.self_attn.q")})
    fused, _ = _fused_sd({0: ("attn.to_q", 2, 8, 2.0)})
    with raises_input("LoRA state dict module 'double_blocks.1.img_attn_qkv'", "fused and split weights",
                      "one set of weights per module"):
        read_lora({**fused, **_lora_pair("diffusion_model.double_blocks.1.img_attn_qkv", size=8)})
    piece = "transformer.transformer_blocks.1.attn.to_q"
    with raises_input(f"LoRA state dict module {piece!r}", {"down": (3, 8), "up": (8, 2)}, "factor shapes that "
                      "multiply"):                                            # a fused piece, checked on its own
        read_lora({f"{piece}.lora_A.weight": torch.zeros(3, 8), f"{piece}.lora_B.weight": torch.zeros(8, 2)})


class _Toy(nn.Module):
    """Module names that only a model resolves: `my_layer_sub_mod` could be `my.layer_sub.mod` or others."""

    def __init__(self):
        super().__init__()
        self.my_layer = nn.Module()
        self.my_layer.sub_mod = nn.Linear(8, 8)


def test_underscore_names_resolve_against_the_model_or_the_names_given():
    sd = {"lokr_factor": torch.tensor(4), **_lora_pair("lora_unet_my_layer_sub_mod")}   # a bookkeeping key first
    alone = read_lora(sd)
    assert set(alone.modules) == alone.unresolved == {"lora_unet_my_layer_sub_mod"}
    for lora in (read_lora(sd, model=_Toy()), read_lora(sd, module_names=["my_layer.sub_mod"])):
        assert set(lora.modules) == {"my_layer.sub_mod"} and lora.unresolved == set()
        assert lora.stems == {"my_layer.sub_mod": ("musubi", "lora_unet_my_layer_sub_mod")}
    assert alone.source is None and alone.metadata == {} and alone.unused_keys == []
    assert read_lora(sd, metadata={"ss_network_dim": "2"}).metadata == {"ss_network_dim": "2"}


def test_a_stem_without_usable_weights_does_not_stop_the_others():
    """A lone `alpha` (no factors) goes to the unused keys; the modules after it are still read."""
    sd = {"lora_unet_blocks_0_self_attn_k.alpha": torch.tensor(2.0), **_lora_pair("lora_unet_blocks_0_self_attn_q")}
    lora = read_lora(sd)
    assert set(lora.modules) == {"blocks.0.self_attn.q"} and lora.unused_keys == ["lora_unet_blocks_0_self_attn_k.alpha"]


def test_match_report_counts_unmatched_and_overridden_keys_and_keeps_bias_patches_alone(tmp_path):
    t2v = tiny_model("t2v")
    q, norm3 = "diffusion_model.blocks.0.self_attn.q", "diffusion_model.blocks.0.norm3"
    sd = {f"{q}.lora_down.weight": torch.zeros(4, 256), f"{q}.lora_up.weight": torch.zeros(256, 4),
          f"{q}.diff": torch.zeros(256, 256), "foo": torch.zeros(1),
          # low-rank factors on a norm (not a Linear: unmatched) with a bias patch that applies
          f"{norm3}.lora_down.weight": torch.zeros(4, 256), f"{norm3}.lora_up.weight": torch.zeros(256, 4),
          f"{norm3}.diff_b": torch.ones(256)}
    path = tmp_path / "mine.safetensors"
    save_file(sd, str(path))
    report = match_lora(read_lora(path), t2v)
    assert report.summary == (f"{path}: 2/2 LoRA modules matched, 3 keys unmatched (e.g. foo), 2 keys overridden by "
                              ".diff/.set_weight; 20 default targets not covered")
    assert report.unmatched_keys == ["foo", f"{norm3}.lora_down.weight", f"{norm3}.lora_up.weight"]
    norm = resolved_modules(read_lora(sd), t2v)["blocks.0.norm3"]      # its bias patch alone
    assert (norm.kind, norm.tensors, norm.alpha, norm.dora_scale, norm.touches_weight) == ("diff", {}, None, None, False)
    assert torch.equal(norm.bias_diff, torch.ones(256))
    # a bias patch where the model has no bias: unmatched with the rest of the module
    nq = "diffusion_model.blocks.0.self_attn.norm_q"
    alone = {f"{nq}.lora_down.weight": torch.zeros(4, 256), f"{nq}.lora_up.weight": torch.zeros(256, 4),
             f"{nq}.diff_b": torch.zeros(256)}
    report = match_lora(read_lora(alone), t2v)
    assert report.summary.startswith("LoRA: 0/1 LoRA modules matched, 3 keys unmatched (e.g. ")
    assert sorted(report.unmatched_keys) == sorted(alone) and report.matched == []


def test_full_weight_patches_override_in_comfyuis_order_and_say_what_they_override():
    """set_weight > diff > w_norm > the low-rank factors (with their alpha and DoRA scale); diff_b > b_norm, and
    b_norm only counts beside w_norm. Every key read is listed; what lost is in `overridden`."""
    s = "diffusion_model.blocks.0.self_attn.q"
    z = torch.zeros
    sd = {f"{s}.lora_down.weight": z(2, 8), f"{s}.lora_up.weight": z(8, 2), f"{s}.alpha": torch.tensor(1.0),
          f"{s}.dora_scale": z(8, 1), f"{s}.w_norm": z(8, 8), f"{s}.diff": z(8, 8), f"{s}.set_weight": torch.ones(8, 8),
          f"{s}.b_norm": z(8), f"{s}.diff_b": torch.ones(8)}
    lora = read_lora(sd)
    mw = lora.modules["blocks.0.self_attn.q"]
    assert (mw.kind, mw.tensors, mw.alpha, mw.dora_scale, mw.weight_patch[0]) == ("diff", {}, None, None, "set")
    assert torch.equal(mw.weight_patch[1], torch.ones(8, 8)) and torch.equal(mw.bias_diff, torch.ones(8))
    assert mw.source_keys == sorted(sd) and lora.unused_keys == []
    assert lora.overridden_keys == sorted(f"{s}.{p}" for p in ("alpha", "b_norm", "diff", "dora_scale",
                                                                "lora_down.weight", "lora_up.weight", "w_norm"))
    w_norm = read_lora({f"{s}.w_norm": torch.ones(8, 8), f"{s}.b_norm": torch.ones(8)}).modules["blocks.0.self_attn.q"]
    assert w_norm.weight_patch[0] == "diff" and torch.equal(w_norm.bias_diff, torch.ones(8)) and w_norm.overridden == []
    # b_norm without w_norm is not read; an empty alpha is no alpha
    lora = read_lora({f"{s}.lora_down.weight": z(2, 8), f"{s}.lora_up.weight": z(8, 2), f"{s}.alpha": torch.tensor([]),
                      f"{s}.b_norm": z(8)})
    mw = lora.modules["blocks.0.self_attn.q"]
    assert (mw.kind, mw.alpha, mw.bias_diff, lora.unused_keys) == ("lora", None, None, [f"{s}.b_norm"])
    assert read_lora({f"{s}.lora_down.weight": z(2, 8), f"{s}.lora_up.weight": z(8, 2),
                      f"{s}.alpha": torch.tensor([[3.0]])}).modules["blocks.0.self_attn.q"].alpha == 3.0


def test_the_dialect_names_every_layout_in_the_file_and_lycoris_kinds():
    q, k = "blocks.0.self_attn.q", "blocks.0.self_attn.k"
    mixed = {**_lora_pair(f"diffusion_model.{q}"), **_lora_pair("lora_unet_blocks_0_self_attn_k")}
    assert read_lora(mixed).dialect == "comfyui+musubi"
    loha = {f"diffusion_model.{k}.{p}": torch.ones(8, 2) if p.endswith("_a") else torch.ones(2, 8)
            for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    assert read_lora({**_lora_pair(f"diffusion_model.{q}"), **loha}).dialect == "comfyui/lycoris"
    lokr = {f"{k}.lokr_w1": torch.ones(2, 2), f"{k}.lokr_w2": torch.ones(4, 4)}      # official names, no prefix
    assert read_lora(lokr).dialect == "bare/lycoris"
    # LoCon's mid without an up matrix: refused as an incomplete LoRA
    with pytest.raises(MusubiInputError, match=r"^LoRA state dict module 'x': got \['down'\]; expected all of "):
        read_lora({"x.lora_down.weight": torch.ones(2, 8), "x.lora_mid.weight": torch.ones(2, 2)})
