"""umT5 text encoder and CLIP vision encoder: layouts, numerics against independent references, bad input.

Tolerances: everything runs in float32 on CPU; outputs are compared with atol 1e-5 (rtol 1e-5) — the only
differences allowed are summation-order rounding between two implementations of the same math. Loaded weights are
compared exactly.
"""

import math

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from engine.encoders import load_clip_vision, load_umt5
from engine.encoders import clip_vision as cv
from engine.encoders import umt5
from engine.errors import MusubiInputError

ATOL = 1e-5
SPIECE = umt5.TINY_SPIECE
PROMPTS = ["a cat walking on a sunny beach, waves in the background",
           "  two   dogs\nplaying &amp; running  ",
           "x"]

# A small umT5 whose shapes differ from the tiny preset (inner attention width 48 != d_model 40, 3 layers), so the
# config really is inferred from the file.
V, D, H, DKV, DFF, NL, NB = 384, 40, 4, 12, 56, 3, 32


# ----------------------------------------------------------------------------------------------------------------
# umT5 fixtures: one set of random weights (fp16-representable so every file format holds the same values)
# ----------------------------------------------------------------------------------------------------------------
def _wan_weights(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, std):
        return torch.randn(*s, generator=g) * std

    sd = {"token_embedding.weight": r(V, D, std=1.0), "norm.weight": 1 + r(D, std=0.1)}
    for i in range(NL):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + r(D, std=0.1)
        sd[p + "norm2.weight"] = 1 + r(D, std=0.1)
        for n in "qkv":
            sd[p + f"attn.{n}.weight"] = r(H * DKV, D, std=D ** -0.5)
        sd[p + "attn.o.weight"] = r(D, H * DKV, std=(H * DKV) ** -0.5)
        sd[p + "pos_embedding.embedding.weight"] = r(NB, H, std=0.5)
        sd[p + "ffn.gate.0.weight"] = r(DFF, D, std=D ** -0.5)
        sd[p + "ffn.fc1.weight"] = r(DFF, D, std=D ** -0.5)
        sd[p + "ffn.fc2.weight"] = r(D, DFF, std=DFF ** -0.5)
    return {k: v.half().float() for k, v in sd.items()}  # fp16-representable: every file holds the same values


def _wan_to_hf_by_hand(sd):
    """The test's own rename table (transformers names), used only to feed the reference model."""
    out = {"shared.weight": sd["token_embedding.weight"], "encoder.final_layer_norm.weight": sd["norm.weight"]}
    for i in range(NL):
        w, h = f"blocks.{i}.", f"encoder.block.{i}.layer."
        out[h + "0.layer_norm.weight"] = sd[w + "norm1.weight"]
        for n in "qkvo":
            out[h + f"0.SelfAttention.{n}.weight"] = sd[w + f"attn.{n}.weight"]
        out[h + "0.SelfAttention.relative_attention_bias.weight"] = sd[w + "pos_embedding.embedding.weight"]
        out[h + "1.layer_norm.weight"] = sd[w + "norm2.weight"]
        out[h + "1.DenseReluDense.wi_0.weight"] = sd[w + "ffn.gate.0.weight"]
        out[h + "1.DenseReluDense.wi_1.weight"] = sd[w + "ffn.fc1.weight"]
        out[h + "1.DenseReluDense.wo.weight"] = sd[w + "ffn.fc2.weight"]
    return out


def _spiece_tensor():
    return torch.frombuffer(bytearray(SPIECE.read_bytes()), dtype=torch.uint8)


def _transformers_umt5(hf_sd):
    """Reference: transformers UMT5EncoderModel built directly, weights through its own load_state_dict."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=V, d_model=D, d_kv=DKV, d_ff=DFF, num_heads=H, num_layers=NL,
                     relative_attention_num_buckets=NB, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                     is_encoder_decoder=False, use_cache=False)
    model = UMT5EncoderModel(cfg).eval()
    sd = dict(hf_sd)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    model.load_state_dict(sd, strict=True)
    return model


def _wan_t5_reference(sd, ids, mask):
    """Functional re-statement of the official Wan T5Encoder forward, on Wan's key names (independent of the
    loader's rename table). ids/mask: [B, L] -> [B, L, D]."""
    B, L = ids.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # key - query
    half = NB // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    a = rel.abs()
    large = exact + (torch.log(a.float().clamp(min=1) / exact) / math.log(128 / exact) * (half - exact)).long()
    bucket = bucket + torch.where(a < exact, a, large.clamp(max=half - 1))

    x = sd["token_embedding.weight"][ids]
    key_masked = (mask == 0)[:, None, None, :]  # [B, 1, 1, L]
    for i in range(NL):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{n}.weight"].T).view(B, L, H, DKV) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)[None]  # [1, H, L, L]
        bias = bias.masked_fill(key_masked, torch.finfo(x.dtype).min)
        att = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)  # no 1/sqrt(d) in T5
        o = torch.einsum("bnij,bjnc->binc", att, v).reshape(B, L, H * DKV)
        x = x + o @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gelu_tanh(h @ sd[p + "ffn.gate.0.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def _fp8_scaled(hf_sd):
    """ComfyUI scaled fp8: linear weights stored as fp8 / per-tensor scale, plus the `scaled_fp8` marker."""
    out, dequant = {}, {}
    for k, w in hf_sd.items():
        if k.endswith(("SelfAttention.q.weight", "SelfAttention.k.weight", "SelfAttention.v.weight",
                       "SelfAttention.o.weight", "wi_0.weight", "wi_1.weight", "wo.weight")):
            scale = w.abs().max() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            out[k] = q
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            dequant[k] = q.float() * scale
        else:
            out[k] = w.half()
            dequant[k] = w.half().float()
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, dequant


@pytest.fixture(scope="module")
def t5_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5")
    wan = _wan_weights()
    hf = _wan_to_hf_by_hand(wan)
    torch.save(wan, d / "models_t5_umt5-xxl-enc-bf16.pth")
    save_file({**{k: v.half() for k, v in hf.items()}, "spiece_model": _spiece_tensor()}, str(d / "umt5_fp16.safetensors"))
    fp8, dequant = _fp8_scaled(hf)
    save_file({**fp8, "spiece_model": _spiece_tensor()}, str(d / "umt5_fp8_e4m3fn_scaled.safetensors"))
    return {"dir": d, "wan": wan, "hf": hf, "dequant": dequant}


def _params(enc):
    return {k: v.detach().float() for k, v in enc.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# umT5 tests
# ----------------------------------------------------------------------------------------------------------------
def test_umt5_official_and_comfy_layouts_load_same_weights(t5_files):
    d = t5_files["dir"]
    wan = load_umt5(d / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32, tokenizer_path=SPIECE)
    comfy = load_umt5(d / "umt5_fp16.safetensors", dtype=torch.float32)
    assert wan.config == comfy.config
    assert (wan.config.d_model, wan.config.num_heads, wan.config.d_kv, wan.config.d_ff, wan.config.num_layers,
            wan.config.vocab_size) == (D, H, DKV, DFF, NL, V)
    pw, pc = _params(wan), _params(comfy)
    assert pw.keys() == pc.keys()
    for k in pw:
        assert torch.equal(pw[k], pc[k]), k
    # the embedding stays tied after the streaming load
    assert comfy.model.encoder.embed_tokens.weight is comfy.model.shared.weight
    assert torch.equal(comfy.model.shared.weight, t5_files["hf"]["shared.weight"])
    assert wan.model.shared.weight.device.type == "cpu"


def test_umt5_matches_transformers_and_official_math(t5_files):
    d = t5_files["dir"]
    enc = load_umt5(d / "umt5_fp16.safetensors", dtype=torch.float32)
    ids, mask = enc.tokenizer(PROMPTS)
    assert ids.shape == (3, 512)
    out = enc.encode(PROMPTS)

    ref_model = _transformers_umt5(t5_files["hf"])
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        wan_ref = _wan_t5_reference(t5_files["wan"], ids, mask)
    for i, o in enumerate(out):
        n = int(mask[i].sum())
        torch.testing.assert_close(o, ref[i, :n], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(o, wan_ref[i, :n], atol=ATOL, rtol=1e-5)

    # the official-layout file gives the same embeddings
    enc_wan = load_umt5(d / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32, tokenizer_path=SPIECE)
    for a, b in zip(enc_wan.encode(PROMPTS), out):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


def test_umt5_scaled_fp8_dequantizes_like_comfyui(t5_files):
    enc = load_umt5(t5_files["dir"] / "umt5_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32)
    params = _params(enc)
    for k, v in t5_files["dequant"].items():
        torch.testing.assert_close(params[k], v, atol=0, rtol=0)
    ref_model = _transformers_umt5(t5_files["dequant"])
    ids, mask = enc.tokenizer(PROMPTS[:1])
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
    (out,) = enc.encode(PROMPTS[:1])
    torch.testing.assert_close(out, ref[0, : out.shape[0]], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("fmt,conf_in_metadata", [("float8_e4m3fn", False), ("int8_tensorwise", True)])
def test_umt5_comfy_current_quantized_layout(t5_files, tmp_path, comfy_quantize, fmt, conf_in_metadata):
    linear = ("SelfAttention.q.weight", "SelfAttention.k.weight", "SelfAttention.v.weight", "SelfAttention.o.weight",
              "wi_0.weight", "wi_1.weight", "wo.weight")
    stored, dequant, meta = comfy_quantize(t5_files["hf"], lambda k: k.endswith(linear), fmt, conf_in_metadata)
    path = tmp_path / f"umt5_{fmt}.safetensors"
    save_file({**stored, "spiece_model": _spiece_tensor()}, str(path), meta)
    params = _params(load_umt5(path, dtype=torch.float32))
    for k, v in dequant.items():
        torch.testing.assert_close(params[k], v.float(), atol=0, rtol=0)


def test_umt5_fp8_storage_like_musubi_fp8_t5(t5_files):
    """fp8 weights for the block Linears except `wo` (transformers casts its input to wo's dtype), compute in bf16;
    the file's own fp8 tensors are kept as they are, never re-quantized; the identity tells the caches apart."""
    from engine.memory.fp8 import Fp8Linear

    d = t5_files["dir"]
    ref = load_umt5(d / "umt5_fp16.safetensors", dtype=torch.bfloat16)
    enc = load_umt5(d / "umt5_fp16.safetensors", dtype=torch.bfloat16, fp8=True)
    fp8 = {n for n, m in enc.model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == NL * 6 and not any(n.endswith("wo") for n in fp8)
    assert enc.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert enc.model.shared.weight.dtype == torch.bfloat16 and enc.identity != ref.identity
    for a, b in zip(enc.encode(PROMPTS), ref.encode(PROMPTS)):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.99

    scaled = load_umt5(d / "umt5_fp8_e4m3fn_scaled.safetensors", dtype=torch.bfloat16, fp8=True)
    q = scaled.model.encoder.block[0].layer[0].SelfAttention.q
    file_q = t5_files["dequant"]["encoder.block.0.layer.0.SelfAttention.q.weight"]
    torch.testing.assert_close(q.dequantized_weight(), file_q, atol=0, rtol=0)
    with pytest.raises(MusubiInputError, match="fp8"):
        load_umt5(d / "umt5_fp16.safetensors", dtype=torch.float32, fp8=True)


def test_umt5_tokenization_padding_and_trim(t5_files):
    enc = load_umt5(t5_files["dir"] / "umt5_fp16.safetensors", dtype=torch.float32)
    sp = spm.SentencePieceProcessor(model_file=str(SPIECE))
    batch = enc.encode(PROMPTS)
    for p, o in zip(PROMPTS, batch):
        cleaned = " ".join(p.replace("&amp;", "&").split())
        assert o.shape == (len(sp.encode(cleaned)) + 1, D)  # tokens + EOS
        # independent of the other prompts in the batch
        (alone,) = enc.encode([p])
        torch.testing.assert_close(o, alone, atol=ATOL, rtol=1e-5)
    # independent of padding: the reference model on the bare tokens, no padding, no mask
    ref_model = _transformers_umt5(t5_files["hf"])
    bare = torch.tensor([sp.encode(PROMPTS[0]) + [1]])
    with torch.no_grad():
        ref = ref_model(input_ids=bare).last_hidden_state[0]
    torch.testing.assert_close(batch[0], ref, atol=ATOL, rtol=1e-5)

    # ids: EOS (1) after the tokens, pad (0) after; truncation keeps 511 tokens + EOS
    ids, mask = enc.tokenizer(["a cat", "cat " * 600])
    n = len(sp.encode("a cat"))
    assert ids[0, :n].tolist() == sp.encode("a cat") and ids[0, n] == 1 and ids[0, n + 1:].eq(0).all()
    assert mask[0].sum() == n + 1 and mask[1].sum() == 512 and ids[1, 511] == 1
    assert enc.encode(["cat " * 600])[0].shape == (512, D)


def test_umt5_prefixed_full_checkpoint(t5_files, tmp_path):
    """Encoder weights bundled in a bigger checkpoint under a prefix, tokenizer under the same prefix."""
    pre = "text_encoders.umt5xxl."
    sd = {f"{pre}transformer.{k}": v.half() for k, v in t5_files["hf"].items()}
    # this export keeps only the encoder's (tied) copy of the embedding
    sd[f"{pre}transformer.encoder.embed_tokens.weight"] = sd.pop(f"{pre}transformer.shared.weight")
    sd[f"{pre}spiece_model"] = _spiece_tensor()
    sd["model.diffusion_model.blocks.0.self_attn.q.weight"] = torch.zeros(4, 4)
    path = tmp_path / "bundle.safetensors"
    save_file(sd, str(path))
    enc = load_umt5(path, dtype=torch.float32)
    ref = load_umt5(t5_files["dir"] / "umt5_fp16.safetensors", dtype=torch.float32)
    torch.testing.assert_close(enc.encode(PROMPTS[:1])[0], ref.encode(PROMPTS[:1])[0], atol=0, rtol=0)


def test_umt5_tokenizer_sources(t5_files, tmp_path):
    d = t5_files["dir"]
    pth = d / "models_t5_umt5-xxl-enc-bf16.pth"
    # no tokenizer anywhere: a clear error naming the file and the accepted tokenizer files
    with pytest.raises(MusubiInputError) as e:
        load_umt5(pth, dtype=torch.float32)
    assert "models_t5_umt5-xxl-enc-bf16.pth" in str(e.value) and "spiece.model" in str(e.value)
    # a folder holding spiece.model
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(SPIECE.read_bytes())
    a = load_umt5(pth, dtype=torch.float32, tokenizer_path=folder)
    # the official Wan checkpoint-dir layout: google/umt5-xxl/ next to the weights
    ckdir = tmp_path / "Wan2.1-T2V-1.3B"
    (ckdir / "google" / "umt5-xxl").mkdir(parents=True)
    (ckdir / "google" / "umt5-xxl" / "spiece.model").write_bytes(SPIECE.read_bytes())
    (ckdir / pth.name).write_bytes(pth.read_bytes())
    b = load_umt5(ckdir / pth.name, dtype=torch.float32)
    torch.testing.assert_close(a.encode(PROMPTS[:1])[0], b.encode(PROMPTS[:1])[0], atol=0, rtol=0)
    # the tokenizer is part of the identity unless it is the file's own
    assert "tokenizer=" in a.identity and pth.name in a.identity
    comfy = load_umt5(d / "umt5_fp16.safetensors", dtype=torch.float32)
    assert comfy.identity.startswith("umt5_fp16.safetensors:") and "tokenizer=" not in comfy.identity
    # a tokenizer path that is not a tokenizer
    with pytest.raises(MusubiInputError, match="tokenizer_path"):
        load_umt5(pth, dtype=torch.float32, tokenizer_path=tmp_path / "nothing_here")


def test_umt5_tokenizer_json_backend(tmp_path):
    """A folder with tokenizer.json (what the official pipeline's fast tokenizer reads) is preferred over
    spiece.model; EOS is appended and padding/mask built the same way as for SentencePiece."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "spiece.model").write_bytes(SPIECE.read_bytes())
    tok = umt5.load_tokenizer_path(tmp_path)
    assert tok.kind == "tokenizers" and tok.vocab_size == 5
    ids, mask = tok(["a  cat\tdog", "cat"], text_len=8)
    assert ids.tolist() == [[3, 4, 2, 1, 0, 0, 0, 0], [4, 1, 0, 0, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]]


def test_umt5_tiny_preset():
    enc = load_umt5("preset:tiny-umt5", dtype=torch.float32)
    assert enc.identity == "preset:tiny-umt5"
    out = enc.encode(["a red car at night", "a cat"])
    assert [o.shape[1] for o in out] == [32, 32] and torch.isfinite(out[0]).all()
    again = load_umt5("preset:tiny-umt5", dtype=torch.float32).encode(["a red car at night"])[0]
    torch.testing.assert_close(out[0], again, atol=0, rtol=0)  # deterministic weights
    assert load_umt5("preset:tiny-umt5").encode(["a"])[0].dtype == torch.bfloat16
    with pytest.raises(MusubiInputError):
        load_umt5("preset:huge-umt5")


def test_tiny_tokenizer_script_is_reproducible(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_model_bytes() == SPIECE.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(SPIECE))
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.get_piece_size()) == (0, 1, 2, umt5.TINY_UMT5.vocab_size)
    assert 2 not in sp.encode("unseen ✨ glyphs Ω")  # byte fallback: no <unk>


def test_umt5_refuses_other_files(tmp_path, t5_files):
    clip = tmp_path / "clip_vision_h.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 14, 14)}, str(clip))
    with pytest.raises(MusubiInputError, match="clip_vision_h.safetensors.*CLIP vision"):
        load_umt5(clip)
    # T5 v1.1 (Flux t5xxl): relative bias only in block 0
    hf = {k: v for k, v in t5_files["hf"].items() if not (k.endswith("relative_attention_bias.weight") and ".block.0." not in k)}
    t5 = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.half() for k, v in hf.items()}, str(t5))
    with pytest.raises(MusubiInputError, match="umT5"):
        load_umt5(t5, tokenizer_path=SPIECE)
    with pytest.raises(MusubiInputError, match="existing weight file"):
        load_umt5(tmp_path / "missing.safetensors")
    with pytest.raises(MusubiInputError, match="list of strings"):
        load_umt5("preset:tiny-umt5").encode("not a list")


# ----------------------------------------------------------------------------------------------------------------
# CLIP fixtures
# ----------------------------------------------------------------------------------------------------------------
CW, CF, CL, CH = 48, 80, 4, 6  # width 48 -> 6 heads of 8 (tiny rule), 4 blocks -> penultimate = 3


def _reference_clip(seed=0):
    """transformers CLIPVisionModel with every parameter randomized (LayerNorms included)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=CW, intermediate_size=CF, num_hidden_layers=CL, num_attention_heads=CH,
                           patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5)
    model = CLIPVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if p.ndim == 1 else p.shape[-1] ** -0.5
            base = 1.0 if name.endswith("weight") and p.ndim == 1 and "embedding" not in name else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * std)
    return model


def _to_official_layout(hf):
    """transformers names -> Wan's open-clip names under `visual.` (the inverse direction of the loader)."""
    out = {
        "visual.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": hf["embeddings.class_embedding"].view(1, 1, -1),
        "visual.pos_embedding": hf["embeddings.position_embedding.weight"].unsqueeze(0),
        "visual.pre_norm.weight": hf["pre_layrnorm.weight"], "visual.pre_norm.bias": hf["pre_layrnorm.bias"],
        "visual.post_norm.weight": hf["post_layernorm.weight"], "visual.post_norm.bias": hf["post_layernorm.bias"],
        "visual.head": torch.randn(CW, 16),
        "log_scale": torch.tensor(2.0),
        "textual.token_embedding.weight": torch.randn(10, 8),
    }
    for i in range(CL):
        h, w = f"encoder.layers.{i}.", f"visual.transformer.{i}."
        for leaf in ("weight", "bias"):
            out[w + f"attn.to_qkv.{leaf}"] = torch.cat([hf[h + f"self_attn.{p}_proj.{leaf}"] for p in "qkv"])
            out[w + f"attn.proj.{leaf}"] = hf[h + f"self_attn.out_proj.{leaf}"]
            out[w + f"norm1.{leaf}"] = hf[h + f"layer_norm1.{leaf}"]
            out[w + f"norm2.{leaf}"] = hf[h + f"layer_norm2.{leaf}"]
            out[w + f"mlp.0.{leaf}"] = hf[h + f"mlp.fc1.{leaf}"]
            out[w + f"mlp.2.{leaf}"] = hf[h + f"mlp.fc2.{leaf}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    ref = _reference_clip()
    hf = {k: v.detach().clone() for k, v in ref.state_dict().items() if k != "embeddings.position_ids"}
    comfy = {f"vision_model.{k}": v for k, v in hf.items()}
    comfy["visual_projection.weight"] = torch.randn(16, CW)
    save_file(comfy, str(d / "clip_vision_h.safetensors"))
    torch.save(_to_official_layout(hf), d / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return {"dir": d, "ref": ref}


# ----------------------------------------------------------------------------------------------------------------
# CLIP tests
# ----------------------------------------------------------------------------------------------------------------
def test_clip_layouts_load_same_weights(clip_files):
    d = clip_files["dir"]
    a = load_clip_vision(d / "clip_vision_h.safetensors", dtype=torch.float32)
    b = load_clip_vision(d / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", dtype=torch.float32)
    assert a.config == b.config
    assert (a.config.hidden_size, a.config.num_layers, a.config.num_heads, a.config.num_tokens) == (CW, CL, CH, 257)
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    ref = clip_files["ref"].state_dict()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
        assert torch.equal(pa[k], ref[k].float()), k
    assert len(a.model.encoder.layers) == CL - 1  # the last block is not even loaded
    assert a.identity.startswith("clip_vision_h.safetensors:")


def test_clip_penultimate_matches_transformers_hidden_states(clip_files):
    d = clip_files["dir"]
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 96, 160, generator=g) * 2 - 1
    pixels = cv.preprocess(images)
    with torch.no_grad():
        ref = clip_files["ref"](pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    for name in ("clip_vision_h.safetensors", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"):
        out = load_clip_vision(d / name, dtype=torch.float32).encode(images)
        assert out.shape == (2, 257, CW)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def _cubic_resize_reference(img, out_h, out_w, a=-0.75):
    """Bicubic (Keys, a=-0.75), half-pixel centres, edge-clamped taps, no antialias: [C, H, W] float64 loops."""
    def weights(t):
        def k(x):
            x = abs(x)
            if x <= 1:
                return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
            if x < 2:
                return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
            return 0.0
        return [k(t + 1), k(t), k(1 - t), k(2 - t)]

    def axis_matrix(n_in, n_out):
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        for o in range(n_out):
            src = (o + 0.5) * n_in / n_out - 0.5
            i0 = math.floor(src)
            for tap, wgt in zip(range(i0 - 1, i0 + 3), weights(src - i0)):
                m[o, min(max(tap, 0), n_in - 1)] += wgt
        return m

    _, h, w = img.shape
    return axis_matrix(h, out_h) @ img.double() @ axis_matrix(w, out_w).T


def test_clip_preprocess_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    # already 224x224: only [-1,1] -> [0,1] and the per-channel normalization
    x = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1
    got = cv.preprocess(x)
    for c in range(3):
        torch.testing.assert_close(got[0, c], ((x[0, c] + 1) / 2 - mean[c]) / std[c], atol=1e-6, rtol=1e-6)
    # any other size: the whole frame, aspect not kept, bicubic-resized
    x = torch.rand(2, 3, 61, 300, generator=g) * 2 - 1
    got = cv.preprocess(x)
    assert got.shape == (2, 3, 224, 224)
    for b in range(2):
        resized = _cubic_resize_reference(x[b], 224, 224)
        for c in range(3):
            expect = ((resized[c] + 1) / 2 - mean[c]) / std[c]
            # torch resizes in float32 (source coordinates and tap weights): ~2e-5 before the 1/std (~3.7) scaling
            torch.testing.assert_close(got[b, c].double(), expect, atol=2e-4, rtol=0)


def test_clip_tiny_preset():
    enc = load_clip_vision("preset:tiny-clip", dtype=torch.float32)
    out = enc.encode(torch.zeros(1, 3, 64, 48))
    assert out.shape == (1, 257, 32) and enc.identity == "preset:tiny-clip"
    assert load_clip_vision("preset:tiny-clip").encode(torch.zeros(1, 3, 32, 32)).dtype == torch.float16


def test_clip_refuses_other_files_and_bad_images(tmp_path, t5_files):
    with pytest.raises(MusubiInputError, match="umt5_fp16.safetensors.*T5 text encoder"):
        load_clip_vision(t5_files["dir"] / "umt5_fp16.safetensors")
    dit = tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "blocks.0.cross_attn.q.weight": torch.zeros(4, 4)},
              str(dit))
    with pytest.raises(MusubiInputError, match="diffusion model"):
        load_clip_vision(dit)
    # ViT-L (width 1024) is not the image encoder Wan uses
    vitl = tmp_path / "clip_vision_l.safetensors"
    save_file({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1024, 3, 14, 14),
               "vision_model.embeddings.class_embedding": torch.zeros(1024),
               "vision_model.embeddings.position_embedding.weight": torch.zeros(257, 1024),
               "vision_model.pre_layrnorm.weight": torch.zeros(1024),
               "vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 1024),
               "vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1024, 1024)}, str(vitl))
    with pytest.raises(MusubiInputError, match="width 1024"):
        load_clip_vision(vitl)
    enc = load_clip_vision("preset:tiny-clip", dtype=torch.float32)
    with pytest.raises(MusubiInputError, match="images"):
        enc.encode(torch.zeros(3, 64, 64))
