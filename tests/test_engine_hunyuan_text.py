"""HunyuanVideo's text encoders: LLaVA-LLaMA-3 (template, crop, layer -3) and CLIP-L (pooled), layouts, numerics
against independently built transformers models, tokenizers (tiny and ComfyUI's real ones), fp8, bad input.

Tolerances: float32 on CPU, atol/rtol 1e-5 (summation-order rounding between sdpa in the encoder and eager
attention in the references); loaded weights are compared exactly; fp8 against bf16 by cosine similarity.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.encoders import clip_text as ct
from engine.encoders import llava_llama as ll
from engine.encoders import load_clip_text, load_llava_llama
from engine.errors import MusubiInputError

ATOL = 1e-5
PROMPTS = ["a cat walking on a sunny beach, waves in the background",
           "Two dogs playing in a park",
           "x"]
LLAMA_TOK = ll.TINY_TOKENIZER          # tiny LLaMA-3-style tokenizer.json (shipped)
CLIP_TOK = ct.TINY_TOKENIZER           # tiny CLIP vocab.json + merges.txt (shipped)

# A small LLaMA whose shapes differ from the tiny preset (6 heads of 8, 2 KV heads, 5 layers -> 3 built), so the
# config really is inferred from the file. Vocab 520 > the tokenizer's 512, like LLaVA's padded embedding.
V, D, H, KV, HD, F, NL = 520, 48, 6, 2, 8, 80, 5


# ----------------------------------------------------------------------------------------------------------------
# LLaMA fixtures
# ----------------------------------------------------------------------------------------------------------------
def _llama_weights(seed=0):
    """LlamaForCausalLM names (`model.*`, `lm_head`), fp16-representable so every file format holds the same values."""
    g = torch.Generator().manual_seed(seed)

    def r(*s, std):
        return torch.randn(*s, generator=g) * std

    sd = {"model.embed_tokens.weight": r(V, D, std=1.0), "model.norm.weight": 1 + r(D, std=0.1),
          "lm_head.weight": r(V, D, std=0.1)}
    for i in range(NL):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(D, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(D, std=0.1)
        sd[p + "self_attn.q_proj.weight"] = r(H * HD, D, std=D ** -0.5)
        sd[p + "self_attn.k_proj.weight"] = r(KV * HD, D, std=D ** -0.5)
        sd[p + "self_attn.v_proj.weight"] = r(KV * HD, D, std=D ** -0.5)
        sd[p + "self_attn.o_proj.weight"] = r(D, H * HD, std=(H * HD) ** -0.5)
        sd[p + "mlp.gate_proj.weight"] = r(F, D, std=D ** -0.5)
        sd[p + "mlp.up_proj.weight"] = r(F, D, std=D ** -0.5)
        sd[p + "mlp.down_proj.weight"] = r(D, F, std=F ** -0.5)
    return {k: v.half().float() for k, v in sd.items()}


_HF_CONFIG = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=NL, num_attention_heads=H,
                  num_key_value_heads=KV, head_dim=HD, rope_theta=500000.0, rms_norm_eps=1e-5,
                  max_position_embeddings=8192, hidden_act="silu", tie_word_embeddings=False)


def _reference_llama(sd):
    """transformers LlamaModel, all layers and the final norm, eager attention, weights via its own load_state_dict."""
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(**_HF_CONFIG, attn_implementation="eager")).eval()
    model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}, strict=True)
    return model


def _fp8_scaled(sd):
    """ComfyUI scaled fp8: Linear weights of the layers as fp8 / per-tensor scale, plus the `scaled_fp8` marker."""
    out, dequant = {}, {}
    for k, w in sd.items():
        if ".layers." in k and k.endswith("_proj.weight"):
            scale = w.abs().max() / 448.0
            q = (w / scale).to(torch.float8_e4m3fn)
            out[k], out[k[: -len("weight")] + "scale_weight"] = q, scale.reshape(())
            dequant[k] = q.float() * scale
        else:
            out[k] = w.half()
            dequant[k] = w.half().float()
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, dequant


@pytest.fixture(scope="module")
def llama_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llava")
    sd = _llama_weights()
    comfy = d / "comfy"
    comfy.mkdir()
    # ComfyUI single file; Musubi drops an embedded `tokenizer` entry some files carry
    save_file({**{k: v.half() for k, v in sd.items()}, "tokenizer": torch.zeros(4, dtype=torch.uint8)},
              str(comfy / "llava_llama3_fp16.safetensors"))
    fp8, dequant = _fp8_scaled(sd)
    save_file(fp8, str(comfy / "llava_llama3_fp8_scaled.safetensors"))
    # newer LLaVA export: language model under model.language_model., with a vision tower and projector
    llava = {k.replace("model.", "model.language_model.", 1): v.half() for k, v in sd.items()}
    llava["model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(8, 4, dtype=torch.half)
    llava["model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4, dtype=torch.half)
    llava["model.multi_modal_projector.linear_1.weight"] = torch.zeros(4, 4, dtype=torch.half)
    save_file(llava, str(comfy / "llava_llama3_full.safetensors"))
    # HF folder: text_encoder/ (config + two shards + index) and tokenizer/ beside it
    hf = d / "HunyuanVideo"
    te = hf / "text_encoder"
    te.mkdir(parents=True)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k].half() for k in ks}, str(te / name))
    (te / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (te / "config.json").write_text(json.dumps({**_HF_CONFIG, "architectures": ["LlamaForCausalLM"]}))
    (hf / "tokenizer").mkdir()
    shutil.copy(LLAMA_TOK, hf / "tokenizer" / "tokenizer.json")
    return {"dir": d, "comfy": comfy, "hf": hf, "sd": sd, "dequant": dequant}


def _by_hand(model, prompts, template):
    """The official recipe, written out: template -> tokenizer (its own BOS post-processor) -> pad with <pad> to
    256 + crop_start(video) -> hidden_states[-3] (no final norm) -> drop the first crop_start(template) tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(LLAMA_TOK))
    crop = {name: len(tok.encode(t.split("{}")[0]).ids) for name, t in ll.TEMPLATES.items()}
    length = 256 + crop["video"]
    pad = tok.token_to_id("<pad>")
    ids = torch.full((len(prompts), length), pad)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        t = tok.encode(ll.TEMPLATES[template].format(p)).ids[:length]
        assert t[0] == tok.token_to_id("<|begin_of_text|>")
        # what stays after the crop: the prompt's own tokens, then <|eot_id|>
        assert t[crop[template]:] == tok.encode(p, add_special_tokens=False).ids + [tok.token_to_id("<|eot_id|>")]
        ids[i, : len(t)], mask[i, : len(t)] = torch.tensor(t), 1
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    c = crop[template]
    return hs[-3][:, c:], mask[:, c:].bool(), crop


def _params(enc):
    return {k: v.detach().float() for k, v in enc.model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# LLaMA tests
# ----------------------------------------------------------------------------------------------------------------
def test_llama_matches_transformers_template_crop_and_layer_minus_3(llama_files):
    enc = load_llava_llama(llama_files["comfy"] / "llava_llama3_fp16.safetensors", dtype=torch.float32,
                           tokenizer_path=LLAMA_TOK)
    ref = _reference_llama(llama_files["sd"])
    for template in ("video", "image"):
        states, mask = enc.encode(PROMPTS, template=template)
        want, want_mask, crop = _by_hand(ref, PROMPTS, template)
        assert enc.tokenizer.crop_start == crop
        assert states.shape == (3, 256 + crop["video"] - crop[template], D) and states.dtype == torch.float32
        assert torch.equal(mask, want_mask) and mask.dtype == torch.bool
        torch.testing.assert_close(states, want, atol=ATOL, rtol=1e-5)
    # video: exactly 256 prompt positions; the mask covers the prompt tokens + <|eot_id|>
    states, mask = enc.encode(PROMPTS)
    assert states.shape[1] == 256 and mask[2].sum() == len(enc.tokenizer.encode("x")) + 1
    # layer -3 is not layer -1 nor a normed state: the skipped layers and the norm really are left out
    with torch.no_grad():
        ids, m = enc.tokenizer(PROMPTS[:1])
        last = ref(input_ids=ids, attention_mask=m).last_hidden_state[:, enc.tokenizer.crop_start["video"]:]
    assert (states[:1] - last).abs().max() > 0.1
    assert len(enc.model.layers) == NL - 2 and isinstance(enc.model.norm, torch.nn.Identity)
    # one prompt alone gives the same states as inside a batch
    alone, _ = enc.encode(PROMPTS[1:2])
    torch.testing.assert_close(alone[0], states[1], atol=ATOL, rtol=1e-5)


def test_llama_rope_frequencies_rounded_like_the_official_loader(llama_files):
    """The official loader calls model.to(dtype), which rounds RoPE's inv_freq buffer to bf16/fp16 too."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = llama_files["comfy"] / "llava_llama3_fp16.safetensors"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        enc = load_llava_llama(path, dtype=dtype, tokenizer_path=LLAMA_TOK)
        want = _reference_llama(llama_files["sd"]).to(dtype).rotary_emb.inv_freq  # .to() works in place: fresh one
        assert want.dtype == dtype and torch.equal(enc.model.rotary_emb.inv_freq, want)
    assert isinstance(enc.model.rotary_emb, LlamaRotaryEmbedding)


def test_llama_file_layouts_load_identical_weights(llama_files):
    c, hf = llama_files["comfy"], llama_files["hf"]
    comfy = load_llava_llama(c / "llava_llama3_fp16.safetensors", dtype=torch.float32, tokenizer_path=LLAMA_TOK)
    folder = load_llava_llama(hf, dtype=torch.float32)                      # finds text_encoder/ and tokenizer/
    te = load_llava_llama(hf / "text_encoder", dtype=torch.float32)         # the text_encoder/ folder itself
    llava = load_llava_llama(c / "llava_llama3_full.safetensors", dtype=torch.float32, tokenizer_path=LLAMA_TOK)
    assert comfy.config == folder.config == te.config == llava.config
    assert (comfy.config.hidden_size, comfy.config.num_heads, comfy.config.num_kv_heads, comfy.config.head_dim,
            comfy.config.intermediate_size, comfy.config.num_layers, comfy.config.vocab_size) == (D, H, KV, HD, F, NL, V)
    pc = _params(comfy)
    assert set(pc) == {k[len("model."):] for k in llama_files["sd"] if k.startswith("model.layers.")
                       and int(k.split(".")[2]) < NL - 2} | {"embed_tokens.weight"}
    for other in (folder, te, llava):
        po = _params(other)
        assert po.keys() == pc.keys()
        for k in pc:
            assert torch.equal(po[k], pc[k]), k
    assert torch.equal(pc["embed_tokens.weight"], llama_files["sd"]["model.embed_tokens.weight"])
    torch.testing.assert_close(folder.encode(PROMPTS[:1])[0], comfy.encode(PROMPTS[:1])[0], atol=0, rtol=0)
    # identity: the weight file and the tokenizer's content
    assert comfy.identity.startswith("llava_llama3_fp16.safetensors:") and "|tokenizer=tokenizer.json:" in comfy.identity
    assert folder.identity.startswith("model.safetensors.index.json:")
    assert folder.identity.split("|")[1] == comfy.identity.split("|")[1]   # same tokenizer file, same name


def test_llama_scaled_fp8_file_dequantizes(llama_files):
    enc = load_llava_llama(llama_files["comfy"] / "llava_llama3_fp8_scaled.safetensors", dtype=torch.float32,
                           tokenizer_path=LLAMA_TOK)
    params = _params(enc)
    for k, v in params.items():
        torch.testing.assert_close(v, llama_files["dequant"]["model." + k], atol=0, rtol=0)
    want, _, _ = _by_hand(_reference_llama(llama_files["dequant"]), PROMPTS[:1], "video")
    torch.testing.assert_close(enc.encode(PROMPTS[:1])[0], want, atol=ATOL, rtol=1e-5)


def test_llama_fp8_storage_like_musubi_fp8_llm(llama_files):
    """fp8 weights for every Linear of the decoder layers, embeddings and RMSNorms in the compute dtype."""
    from engine.memory.fp8 import Fp8Linear

    path = llama_files["comfy"] / "llava_llama3_fp16.safetensors"
    ref = load_llava_llama(path, dtype=torch.bfloat16, tokenizer_path=LLAMA_TOK)
    enc = load_llava_llama(path, dtype=torch.bfloat16, tokenizer_path=LLAMA_TOK, fp8=True)
    fp8 = {n for n, m in enc.model.named_modules() if isinstance(m, Fp8Linear)}
    assert len(fp8) == (NL - 2) * 7 and not [n for n, m in enc.model.named_modules()
                                             if type(m) is torch.nn.Linear]
    assert enc.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert enc.model.embed_tokens.weight.dtype == torch.bfloat16
    assert enc.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert enc.identity == ref.identity + "|fp8"
    (a, am), (b, bm) = enc.encode(PROMPTS), ref.encode(PROMPTS)
    assert a.dtype == torch.bfloat16 and torch.equal(am, bm)
    for i in range(len(PROMPTS)):
        real = am[i]
        cos = torch.nn.functional.cosine_similarity(a[i][real].float().flatten(), b[i][real].float().flatten(), dim=0)
        assert cos > 0.99, cos
    assert not torch.equal(a, b)
    # a scaled-fp8 file keeps its own fp8 values
    scaled = load_llava_llama(llama_files["comfy"] / "llava_llama3_fp8_scaled.safetensors", dtype=torch.float16,
                              tokenizer_path=LLAMA_TOK, fp8=True)
    q = scaled.model.layers[1].mlp.down_proj
    torch.testing.assert_close(q.dequantized_weight(), llama_files["dequant"]["model.layers.1.mlp.down_proj.weight"],
                               atol=0, rtol=0)
    with pytest.raises(MusubiInputError, match="fp8"):
        load_llava_llama(path, dtype=torch.float32, tokenizer_path=LLAMA_TOK, fp8=True)


def test_real_llama3_tokenizer_gives_the_official_crop_starts(comfyui_dir):
    """ComfyUI's shipped LLaMA-3 tokenizer: crop_start 95 (video) / 36 (image) as in hyvideo/constants.py, and the
    ids are those of transformers' AutoTokenizer with the official arguments (padding right to max_length)."""
    from transformers import AutoTokenizer

    folder = comfyui_dir / "comfy" / "text_encoders" / "llama_tokenizer"
    tok = ll.load_llama_tokenizer(folder)
    assert tok.crop_start == ll.OFFICIAL_CROP_START == {"video": 95, "image": 36}
    assert tok.pad_id == 128258 and tok.bos_id == 128000 and tok.max_length() == 351
    official = AutoTokenizer.from_pretrained(str(folder), padding_side="right")
    for template in ("video", "image"):
        texts = [ll.TEMPLATES[template].format(p) for p in PROMPTS]
        want = official(texts, truncation=True, max_length=351, padding="max_length", return_tensors="pt")
        ids, mask = tok(PROMPTS, template)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    # the prompt starts right at the crop: "<|start_header_id|>user<|end_header_id|>\n\n" ends just before it
    ids, _ = tok(["a cat"])
    assert ids[0, 91:95].tolist() == [128006, 882, 128007, 271] and ids[0, 95:98].tolist() == tok.encode("a cat") + [128009]
    # a prompt longer than 256 tokens is cut (with a warning), the mask then covers all 256 positions
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = tok(["cat " * 400])
    assert mask[0, 95:].sum() == 256 and ids[0, -1] != 128009


def test_llama_tokenizer_sources_and_missing_tokenizer(llama_files, tmp_path):
    path = llama_files["comfy"] / "llava_llama3_fp16.safetensors"
    # a single file with no tokenizer anywhere: the error names the missing file and where it was looked for
    with pytest.raises(MusubiInputError) as e:
        load_llava_llama(path, dtype=torch.float32)
    msg = str(e.value)
    assert "tokenizer.json" in msg and str(llama_files["comfy"]) in msg and "llama_tokenizer" in msg
    # a tokenizer_path folder without tokenizer.json
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MusubiInputError, match=r"tokenizer_path.*no tokenizer\.json in folder"):
        load_llava_llama(path, tokenizer_path=empty)
    # an HF folder without tokenizer/: both places it looked are named
    hf = tmp_path / "hv"
    shutil.copytree(llama_files["hf"] / "text_encoder", hf / "text_encoder")
    with pytest.raises(MusubiInputError) as e:
        load_llava_llama(hf)
    assert str(hf / "tokenizer") in str(e.value) and str(hf / "text_encoder") in str(e.value)
    # a tokenizer.json beside the weights is found; a tokenizer.json file works as tokenizer_path
    shutil.copy(LLAMA_TOK, hf / "text_encoder" / "tokenizer.json")
    a = load_llava_llama(hf, dtype=torch.float32)
    b = load_llava_llama(path, dtype=torch.float32, tokenizer_path=LLAMA_TOK)  # the file itself
    torch.testing.assert_close(a.encode(["a cat"])[0], b.encode(["a cat"])[0], atol=0, rtol=0)
    # a tokenizer lacking the template's special tokens is refused
    from tokenizers import Tokenizer, models
    bare = tmp_path / "bare" / "tokenizer.json"
    bare.parent.mkdir()
    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(bare))
    with pytest.raises(MusubiInputError, match="start_header_id"):
        load_llava_llama(path, tokenizer_path=bare)


def test_llama_refuses_other_files(tmp_path, llama_files):
    t5 = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)},
              str(t5))
    with pytest.raises(MusubiInputError, match="umt5_xxl_fp16.safetensors.*T5 text encoder"):
        load_llava_llama(t5, tokenizer_path=LLAMA_TOK)
    dit = tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "blocks.0.cross_attn.q.weight": torch.zeros(4, 4)},
              str(dit))
    with pytest.raises(MusubiInputError, match="diffusion model"):
        load_llava_llama(dit, tokenizer_path=LLAMA_TOK)
    clip = tmp_path / "clip_l.safetensors"
    save_file(ct.tiny_clip_l_state_dict(), str(clip))
    with pytest.raises(MusubiInputError, match="CLIP text encoder"):
        load_llava_llama(clip, tokenizer_path=LLAMA_TOK)
    # a Qwen-style model (attention biases) is not LLaMA
    qwen = dict(llama_files["sd"])
    qwen["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(H * HD)
    save_file(qwen, str(tmp_path / "qwen.safetensors"))
    with pytest.raises(MusubiInputError, match="attention biases"):
        load_llava_llama(tmp_path / "qwen.safetensors", tokenizer_path=LLAMA_TOK)
    # a tokenizer with more ids than the embedding has rows
    small = {k: v for k, v in llama_files["sd"].items()}
    small["model.embed_tokens.weight"] = small["model.embed_tokens.weight"][:100]
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(MusubiInputError, match="wrong tokenizer"):
        load_llava_llama(tmp_path / "small.safetensors", tokenizer_path=LLAMA_TOK)
    with pytest.raises(MusubiInputError, match="existing weight file"):
        load_llava_llama(tmp_path / "missing.safetensors", tokenizer_path=LLAMA_TOK)
    enc = load_llava_llama("preset:tiny-llava-llama", dtype=torch.float32)
    with pytest.raises(MusubiInputError, match="list of strings"):
        enc.encode("not a list")
    with pytest.raises(MusubiInputError, match="prompt template"):
        enc.encode(["a"], template="poster")


def test_llama_tiny_preset():
    enc = load_llava_llama("preset:tiny-llava-llama", dtype=torch.float32)
    assert enc.identity == "preset:tiny-llava-llama" and enc.config == ll.TINY_LLAVA_LLAMA
    states, mask = enc.encode(["a red car at night", "a cat"])
    assert states.shape == (2, 256, 32) and mask.shape == (2, 256) and torch.isfinite(states).all()
    again, _ = load_llava_llama("preset:tiny-llava-llama", dtype=torch.float32).encode(["a red car at night"])
    torch.testing.assert_close(again[0], states[0], atol=0, rtol=0)  # deterministic weights
    # the preset is the real architecture: a reference LlamaModel on its weights, by hand, agrees
    from transformers import LlamaConfig, LlamaModel
    c = ll.TINY_LLAVA_LLAMA
    ref = LlamaModel(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                 num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                                 num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=500000.0,
                                 rms_norm_eps=1e-5, attn_implementation="eager")).eval()
    ref.load_state_dict({k[6:]: v for k, v in ll.tiny_llava_llama_state_dict().items() if k.startswith("model.")})
    ids, m = enc.tokenizer(["a cat"])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=m, output_hidden_states=True).hidden_states[-3]
    torch.testing.assert_close(states[1], want[0, enc.tokenizer.crop_start["video"]:], atol=ATOL, rtol=1e-5)
    assert load_llava_llama("preset:tiny-llava-llama").encode(["a"])[0].dtype == torch.float16
    with pytest.raises(MusubiInputError):
        load_llava_llama("preset:huge-llava")


def test_tiny_tokenizer_files_are_reproducible():
    import importlib.util
    from pathlib import Path

    from tokenizers import Tokenizer

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.build_llama_tokenizer_json() == LLAMA_TOK.read_text(encoding="utf-8")
    vocab, merges = mod.build_clip_files()
    assert vocab == (CLIP_TOK / "vocab.json").read_text(encoding="utf-8")
    assert merges == (CLIP_TOK / "merges.txt").read_text(encoding="utf-8")
    tok = Tokenizer.from_file(str(LLAMA_TOK))
    assert tok.get_vocab_size() == ll.TINY_LLAVA_LLAMA.vocab_size
    assert [tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                         "<|eot_id|>", "<pad>")] == [506, 508, 509, 510, 511]
    assert tok.decode(tok.encode("unseen ✨ glyphs Ω").ids) == "unseen ✨ glyphs Ω"  # byte-level: nothing lost


# ----------------------------------------------------------------------------------------------------------------
# CLIP-L
# ----------------------------------------------------------------------------------------------------------------
CW, CL, CF = 40, 3, 72   # 5 heads of 8 (tiny rule), 3 layers: differs from the preset


def _reference_clip_text(seed=0):
    """transformers CLIPTextModel, every parameter random, Musubi's legacy eos_token_id=2 (argmax pooling)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=640, hidden_size=CW, intermediate_size=CF, num_hidden_layers=CL,
                         num_attention_heads=CW // 8, max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, bos_token_id=638, eos_token_id=2, pad_token_id=639,
                         attn_implementation="eager")
    model = CLIPTextModel(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if p.ndim == 1 else p.shape[-1] ** -0.5
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * std)
    return model


def _text_model_state(model):
    """State dict with `text_model.` names whatever the transformers version (5.x flattened CLIPTextModel)."""
    sd = {k: v.detach().clone() for k, v in ct.text_transformer(model).state_dict().items() if "position_ids" not in k}
    return {f"text_model.{k}": v for k, v in sd.items()}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clipl")
    ref = _reference_clip_text()
    sd = _text_model_state(ref)
    comfy = {**sd, "text_projection.weight": torch.randn(CW, CW), "logit_scale": torch.tensor(4.6),
             "text_model.embeddings.position_ids": torch.arange(77)[None]}  # older files store it
    save_file(comfy, str(d / "clip_l.safetensors"))
    hf = d / "HunyuanVideo"
    (hf / "text_encoder_2").mkdir(parents=True)
    save_file(sd, str(hf / "text_encoder_2" / "model.safetensors"))
    (hf / "text_encoder_2" / "config.json").write_text(json.dumps({"num_attention_heads": CW // 8, "hidden_size": CW}))
    shutil.copytree(CLIP_TOK, hf / "tokenizer_2")
    return {"dir": d, "hf": hf, "ref": ref, "sd": sd}


def test_clip_pooled_matches_transformers(clip_files):
    from transformers import CLIPTokenizer

    enc = load_clip_text(clip_files["dir"] / "clip_l.safetensors", dtype=torch.float32, tokenizer_path=CLIP_TOK)
    assert (enc.config.hidden_size, enc.config.num_layers, enc.config.num_heads, enc.config.intermediate_size) == \
        (CW, CL, CW // 8, CF)
    prompts = PROMPTS + ["A Very long prompt, " * 40]
    # the official tokenization, by transformers' own CLIPTokenizer on the same files
    official = CLIPTokenizer.from_pretrained(str(CLIP_TOK))
    want_ids = official(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = enc.tokenizer(prompts)
    assert torch.equal(ids, want_ids["input_ids"]) and torch.equal(mask, want_ids["attention_mask"])
    assert ids[3, 76] == official.eos_token_id and mask[3].sum() == 77      # truncated, EOS kept
    with torch.no_grad():
        want = clip_files["ref"](input_ids=ids, attention_mask=mask).pooler_output
    got = enc.encode(prompts)
    assert got.shape == (4, CW)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    # pooled = final-norm state at the first EOS, not the last position
    with torch.no_grad():
        last = clip_files["ref"](input_ids=ids, attention_mask=mask).last_hidden_state
    n = int(mask[0].sum())
    torch.testing.assert_close(got[0], last[0, n - 1], atol=ATOL, rtol=1e-5)
    assert (got[0] - last[0, -1]).abs().max() > 1e-3


def test_clip_layouts_load_identical_weights(clip_files):
    comfy = load_clip_text(clip_files["dir"] / "clip_l.safetensors", dtype=torch.float32, tokenizer_path=CLIP_TOK)
    folder = load_clip_text(clip_files["hf"], dtype=torch.float32)                  # text_encoder_2/ + tokenizer_2/
    te = load_clip_text(clip_files["hf"] / "text_encoder_2", dtype=torch.float32)
    assert comfy.config == folder.config == te.config
    pa = {k: v for k, v in ct.text_transformer(comfy.model).state_dict().items() if "position_ids" not in k}
    for other in (folder, te):
        pb = {k: v for k, v in ct.text_transformer(other.model).state_dict().items() if "position_ids" not in k}
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    for k, v in pa.items():
        assert torch.equal(v, clip_files["sd"]["text_model." + k]), k
    torch.testing.assert_close(folder.encode(PROMPTS), comfy.encode(PROMPTS), atol=0, rtol=0)
    assert comfy.identity.startswith("clip_l.safetensors:") and folder.identity.split("|")[1] == comfy.identity.split("|")[1]


def test_real_clip_tokenizer_matches_transformers(comfyui_dir):
    from transformers import CLIPTokenizer

    folder = comfyui_dir / "comfy" / "sd1_tokenizer"
    tok = ct.load_clip_tokenizer(folder)
    official = CLIPTokenizer.from_pretrained(str(folder))
    texts = PROMPTS + ["Hello WORLD 1080p, it's 16:9 — naïve café ✨  tabs\tand\nnewlines", "word " * 100]
    ids, mask = tok(texts)
    want = official(texts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (49406, 49407, 49408)


def test_clip_tokenizer_missing_and_other_files(clip_files, tmp_path, llama_files):
    path = clip_files["dir"] / "clip_l.safetensors"
    with pytest.raises(MusubiInputError) as e:
        load_clip_text(path)
    assert "vocab.json" in str(e.value) and str(clip_files["dir"]) in str(e.value) and "sd1_tokenizer" in str(e.value)
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(CLIP_TOK / "vocab.json", half / "vocab.json")
    with pytest.raises(MusubiInputError, match="no merges.txt"):
        load_clip_text(path, tokenizer_path=half)
    with pytest.raises(MusubiInputError, match="looks like a LLaMA text encoder"):
        load_clip_text(llama_files["comfy"] / "llava_llama3_fp16.safetensors", tokenizer_path=CLIP_TOK)
    t5 = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({"shared.weight": torch.zeros(8, 4), "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4)},
              str(t5))
    with pytest.raises(MusubiInputError, match="T5 text encoder"):
        load_clip_text(t5, tokenizer_path=CLIP_TOK)
    with pytest.raises(MusubiInputError, match="list of strings"):
        load_clip_text("preset:tiny-clip-l").encode("a cat")


def test_clip_tiny_preset():
    enc = load_clip_text("preset:tiny-clip-l", dtype=torch.float32)
    assert enc.identity == "preset:tiny-clip-l" and enc.config == ct.TINY_CLIP_L
    out = enc.encode(["a red car at night", "a cat"])
    assert out.shape == (2, 24) and torch.isfinite(out).all() and not torch.equal(out[0], out[1])
    torch.testing.assert_close(load_clip_text("preset:tiny-clip-l", dtype=torch.float32).encode(["a cat"])[0], out[1],
                               atol=0, rtol=0)
    assert load_clip_text("preset:tiny-clip-l").encode(["a"]).dtype == torch.float16
    with pytest.raises(MusubiInputError):
        load_clip_text("preset:tiny-clip-g")
