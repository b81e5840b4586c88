"""LLaVA-LLaMA-3-8B as HunyuanVideo's text encoder (`text_states`), through transformers' `LlamaModel`.

Only the language model is used (no vision tower, no projector, no lm_head). Accepted weights (layout found from the
key names, sizes from the tensor shapes):

* ComfyUI's `llava_llama3_fp16.safetensors` / `llava_llama3_fp8_scaled.safetensors`: LlamaForCausalLM names under
  `model.` (`model.embed_tokens`, `model.layers.N.{self_attn,mlp}...`, `model.norm`, `lm_head`), scaled fp8
  dequantized on load; newer LLaVA exports put the language model under `model.language_model.` next to
  `model.vision_tower.` / `model.multi_modal_projector.` (ignored);
* an HF folder: `text_encoder/` of `hunyuanvideo-community/HunyuanVideo` or the official `ckpts/text_encoder/`
  (config.json + sharded safetensors with an index), or the folder above it.

Prompt encoding is the official HunyuanVideo one (hyvideo/text_encoder, Musubi Tuner's copy of it): the prompt is
put into a system-prompt template (`video`: PROMPT_TEMPLATE_ENCODE_VIDEO, `image`: PROMPT_TEMPLATE_ENCODE),
tokenized with BOS to `text_len + crop_start(video)` tokens (truncated, right-padded with `<pad>`, attention mask),
run through the model, and the hidden state of layer -3 (`hidden_state_skip_layer` 2, no final norm) is kept from
`crop_start(template)` on: the template's tokens are dropped, the prompt tokens and their `<|eot_id|>` remain.
`crop_start` is the token count of BOS + the template text before `{}` (95 video / 36 image with LLaMA-3's
tokenizer, hyvideo/constants.py), computed from the tokenizer so the tiny preset's own tokenizer crops right.
One `max_length` for both templates, as in the official code: `video` gives 256 tokens, `image` 256 + 95 - 36 = 315.
Musubi Tuner encodes every prompt with the video template (images too).

The last two decoder layers are never built or loaded: layer -3's output is the model's output with the final norm
replaced by an identity.

Tokenizers are never downloaded. Sources, in order: `tokenizer_path` (a `tokenizer.json` or a folder holding one:
ComfyUI ships LLaMA-3's in `comfy/text_encoders/llama_tokenizer/`, the node layer passes it); for an HF folder its
`tokenizer/` sibling or the weights folder itself; for `preset:tiny-llava-llama` the tiny BPE in `tokenizer_assets/`
(regenerate with `scripts/make_tiny_tokenizer.py`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, load_into_module
from ..errors import invalid
from ..families.identify import foreign_hint
from .umt5 import PromptTruncatedWarning, _file_identity

TEXT_LEN = 256                 # prompt tokens kept after the crop (video template)
HIDDEN_STATE_SKIP_LAYER = 2    # hidden_states[-(2 + 1)]: the output of layer num_layers - 2, before the final norm
PRESET_TINY = "preset:tiny-llava-llama"
ASSETS = Path(__file__).resolve().parent / "tokenizer_assets"
TINY_TOKENIZER = ASSETS / "tiny_llava_llama" / "tokenizer.json"

PROMPT_TEMPLATE_VIDEO = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_TEMPLATE_IMAGE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
TEMPLATES = {"video": PROMPT_TEMPLATE_VIDEO, "image": PROMPT_TEMPLATE_IMAGE}
OFFICIAL_CROP_START = {"video": 95, "image": 36}  # hyvideo/constants.py, for LLaMA-3's tokenizer

BOS, PAD, EOS = "<|begin_of_text|>", "<pad>", "<|end_of_text|>"
TEMPLATE_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
TOKENIZER_FILE = "tokenizer.json"


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU hidden dim
    num_layers: int         # in the checkpoint; the encoder builds num_layers - HIDDEN_STATE_SKIP_LAYER of them
    num_heads: int
    num_kv_heads: int       # grouped-query attention
    head_dim: int = 128
    rope_theta: float = 500000.0
    eps: float = 1e-5
    max_positions: int = 8192

    def to_transformers(self, num_layers: int | None = None):
        from transformers import LlamaConfig as HFConfig

        return HFConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers if num_layers is None else num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, rms_norm_eps=self.eps, max_position_embeddings=self.max_positions,
            hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False, use_cache=False,
            attn_implementation="sdpa",
        )


# vocab 128320: LLaMA-3's 128256 + LLaVA's <unk>/<image>/<pad> rounded up
LLAVA_LLAMA3_8B = LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8)
# Same family, tiny dims: hidden 32 = the tiny HunyuanVideo DiT preset's text_dim; vocab = the tiny tokenizer's 512.
TINY_LLAVA_LLAMA = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=8)
_TINY_MAX_WIDTH = 256  # widths below this are test models with 8-dim heads (the head count is not in the weights)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
class LlamaPromptTokenizer:
    """A LLaMA-3 `tokenizer.json` (HF `tokenizers`) applying HunyuanVideo's templates.

    BOS is prepended here rather than by the file's post-processor, so every tokenizer.json behaves like the
    official `AutoTokenizer` (add_bos_token) whatever its post-processor says."""

    def __init__(self, backend, identity: str, source: str):
        self._backend = backend
        self.identity = identity
        self.vocab_size = backend.get_vocab_size()
        ids = {t: backend.token_to_id(t) for t in (BOS, PAD, EOS) + TEMPLATE_TOKENS}
        missing = [t for t in (BOS,) + TEMPLATE_TOKENS if ids[t] is None]
        if missing:
            raise invalid(f"tokenizer {source}", f"no {missing} tokens",
                          "the LLaMA-3 tokenizer.json of LLaVA-LLaMA-3 (HunyuanVideo's templates use them)")
        self.bos_id = ids[BOS]
        # LLaVA's <pad> (what the official tokenizer pads with); pad positions are masked, so any id would do
        self.pad_id = ids[PAD] if ids[PAD] is not None else (ids[EOS] if ids[EOS] is not None else 0)
        self.crop_start = {name: 1 + len(self.encode(t.split("{}")[0])) for name, t in TEMPLATES.items()}

    @classmethod
    def from_file(cls, path: Path) -> "LlamaPromptTokenizer":
        from tokenizers import Tokenizer

        data = path.read_bytes()
        try:
            tok = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own Exception subclass on bad json
            raise invalid("tokenizer", str(path), f"a valid LLaMA-3 {TOKENIZER_FILE} ({e})") from e
        # content hash: the same tokenizer shipped by another ComfyUI install keys the same cache entries
        return cls(tok, f"{TOKENIZER_FILE}:{hashlib.sha256(data).hexdigest()[:16]}", str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def max_length(self, text_len: int = TEXT_LEN) -> int:
        """Tokens fed to the model: one length for both templates, set by the video template (official)."""
        return text_len + self.crop_start["video"]

    def __call__(self, prompts: list[str], template: str = "video",
                 text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, max_length] (int64, right-padded), mask [B, max_length] (int64, 1 on BOS + template + prompt)."""
        length = self.max_length(text_len)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.bos_id] + self.encode(TEMPLATES[template].format(p))
            if len(toks) > length:
                warnings.warn(f"prompt of {len(toks) - self.crop_start[template]} tokens truncated to "
                              f"{length - self.crop_start[template]} (the rest is not used): {p[:60]!r}...",
                              PromptTruncatedWarning, stacklevel=2)
                toks = toks[:length]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = 1
        return ids, mask


def load_llama_tokenizer(path: str | Path) -> LlamaPromptTokenizer:
    """A user-given tokenizer: a `tokenizer.json` file or a folder holding one."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not (file.is_file() and file.name.endswith(".json")):
        where = f"no {TOKENIZER_FILE} in folder {path}" if path.is_dir() else f"{path} (no such .json file)"
        raise invalid("tokenizer_path", where, f"a LLaMA-3 {TOKENIZER_FILE} or a folder holding one "
                      "(ComfyUI ships it in comfy/text_encoders/llama_tokenizer/)")
    return LlamaPromptTokenizer.from_file(file)


def _resolve_tokenizer(tokenizer_path, search: list[Path], weights: Path) -> LlamaPromptTokenizer:
    if tokenizer_path:
        return load_llama_tokenizer(tokenizer_path)
    for folder in search:
        if (folder / TOKENIZER_FILE).is_file():
            return LlamaPromptTokenizer.from_file(folder / TOKENIZER_FILE)
    looked = ", ".join(str(f) for f in search) or "nowhere (a single weight file names no tokenizer folder)"
    raise invalid(f"LLaVA-LLaMA-3 text encoder {weights}", f"no {TOKENIZER_FILE} (looked in {looked})",
                  f"a tokenizer_path: the LLaMA-3 {TOKENIZER_FILE} or its folder (ComfyUI ships it in "
                  "comfy/text_encoders/llama_tokenizer/)")


# --------------------------------------------------------------------------------------------------------------
# Weights: any layout -> LlamaModel names, config from shapes
# --------------------------------------------------------------------------------------------------------------
_PROBE = "layers.0.mlp.gate_proj.weight"  # LLaMA-only (CLIP towers have mlp.fc1); the prefix before it is stripped


def to_llama_view(ckpt: Checkpoint, num_layers: int | None = None) -> Checkpoint:
    """A view of `ckpt` with transformers `LlamaModel` names (`embed_tokens.weight`, `layers.N...`, `norm.weight`),
    whatever the prefix (`model.`, `model.language_model.`, none); only layers < num_layers are kept."""
    keys = ckpt.keys()
    prefixes = [k[: -len(_PROBE)] for k in keys if k.endswith(_PROBE) and (k == _PROBE or k.endswith("." + _PROBE))]
    prefixes = [p for p in prefixes if p + "embed_tokens.weight" in ckpt]
    if not prefixes:
        hint = foreign_hint(keys, "LLaMA text encoder", "not a LLaMA language model")
        raise invalid(f"text encoder {ckpt.source}", f"keys like {keys[:3]} ({hint})",
                      "the LLaVA-LLaMA-3 text encoder of HunyuanVideo: ComfyUI llava_llama3_fp16 / "
                      "llava_llama3_fp8_scaled .safetensors or an HF text_encoder/ folder")
    prefix = prefixes[0]

    def rename(k: str) -> str | None:
        if not k.startswith(prefix):
            return None
        k = k[len(prefix):]
        if num_layers is not None and k.startswith("layers.") and int(k.split(".")[1]) >= num_layers:
            return None
        return k

    return ckpt.renamed(rename)


def infer_llama_config(view: Checkpoint, hf_config: dict | None = None) -> LlamaConfig:
    """Sizes from tensor shapes; head size, RoPE base and norm eps from an HF config.json when there is one (the
    weights do not store them), else LLaMA-3's (128, 500000, 1e-5) or, below width 256, the tiny rule (8-dim heads)."""
    src = f"text encoder {view.source}"
    for k in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"):
        if k not in view:
            raise invalid(src, f"no tensor for {k!r}", "a complete LLaMA language model")
    for k, what in (("layers.0.self_attn.q_proj.bias", "attention biases (Qwen-style)"),
                    ("layers.0.self_attn.q_norm.weight", "q/k norms (Qwen3/Gemma-style)"),
                    ("layers.0.post_feedforward_layernorm.weight", "Gemma-style extra norms")):
        if k in view:
            raise invalid(src, what, "a LLaMA language model (LLaVA-LLaMA-3-8B for HunyuanVideo)")
    vocab, hidden = view.shape("embed_tokens.weight")
    num_layers = 1 + max(int(k.split(".")[1]) for k in view.keys() if k.startswith("layers."))
    hf = hf_config or {}
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // hf["num_attention_heads"] if "num_attention_heads" in hf
                                      else (8 if hidden < _TINY_MAX_WIDTH else 128))
    q_rows, k_rows = view.shape("layers.0.self_attn.q_proj.weight")[0], view.shape("layers.0.self_attn.k_proj.weight")[0]
    if q_rows % head_dim or k_rows % head_dim:
        raise invalid(src, f"attention widths {q_rows}/{k_rows}", f"multiples of the head size {head_dim}")
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=num_layers,
                       intermediate_size=view.shape("layers.0.mlp.gate_proj.weight")[0],
                       num_heads=q_rows // head_dim, num_kv_heads=k_rows // head_dim, head_dim=head_dim,
                       rope_theta=float(hf.get("rope_theta", 500000.0)), eps=float(hf.get("rms_norm_eps", 1e-5)))


def _open_weights(source: Path) -> tuple[Checkpoint, Path, list[Path], dict | None]:
    """(checkpoint, file naming it, folders to look for tokenizer.json in, HF config.json or None)."""
    if source.is_dir():
        folder = source / "text_encoder" if (source / "text_encoder").is_dir() else source
        index = sorted(folder.glob("*.safetensors.index.json"))
        files = index or sorted(folder.glob("*.safetensors"))
        if not files:
            raise invalid("text encoder folder", str(folder), "an HF text_encoder/ folder with .safetensors weights")
        config_file = folder / "config.json"
        hf_config = json.loads(config_file.read_text()) if config_file.is_file() else None
        if hf_config and "text_config" in hf_config:  # a LLaVA config: the language model's part
            hf_config = hf_config["text_config"]
        return Checkpoint.open(files[0]), files[0], [folder.parent / "tokenizer", folder], hf_config
    return Checkpoint.open(source), source, [source.parent], None


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------
class LlavaLlamaTextEncoder:
    """A loaded LLaVA-LLaMA-3 language model (first num_layers - 2 layers) + tokenizer. `identity` names weights,
    tokenizer and fp8 (for embedding caches); the template is chosen per `encode` call, so caches key it too."""

    def __init__(self, model, tokenizer: LlamaPromptTokenizer, config: LlamaConfig, identity: str,
                 text_len: int = TEXT_LEN, batch_size: int = 4):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.identity = identity
        self.text_len = text_len
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def to(self, device) -> "LlavaLlamaTextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], template: str = "video") -> tuple[torch.Tensor, torch.Tensor]:
        """-> (states [B, L, hidden] in the model dtype, mask [B, L] bool), L = text_len (256) for `video`,
        text_len + crop_start(video) - crop_start(image) (315) for `image`; states at masked positions are the
        model's outputs at the pad tokens (kept, like the official encoder)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise invalid("prompts", prompts, "a list of strings")
        if template not in TEMPLATES:
            raise invalid("prompt template", template, f"one of {sorted(TEMPLATES)}")
        crop = self.tokenizer.crop_start[template]
        states, masks = [], []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self.tokenizer(list(prompts[start: start + self.batch_size]), template, self.text_len)
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            states.append(hidden[:, crop:])                # [b, max_length - crop, hidden]
            masks.append(mask[:, crop:].bool().to(self.device))
        return torch.cat(states), torch.cat(masks)


def _build(config: LlamaConfig, dtype: torch.dtype, meta: bool):
    """LlamaModel with the first num_layers - 2 layers and no final norm: its output is hidden_states[-3]."""
    from transformers import LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = config.to_transformers(config.num_layers - HIDDEN_STATE_SKIP_LAYER)
    if meta:
        with torch.device("meta"):
            model = LlamaModel(hf)
    else:
        model = LlamaModel(hf)
    model.norm = torch.nn.Identity()
    # RoPE frequencies are computed, not loaded: rebuilt off the meta device, then rounded to the compute dtype as
    # the official loader's `model.to(dtype)` does (bf16/fp16 inv_freq; the embeddings the DiT was trained on)
    model.rotary_emb = LlamaRotaryEmbedding(config=hf)
    model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.to(dtype)
    return model


# fp8 storage (Musubi's --fp8_llm): every Linear of the decoder layers; embeddings and RMSNorms stay in `dtype`.
FP8_INCLUDE = ("layers.",)


def load_llava_llama(source: str | Path, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                     tokenizer_path: str | Path | None = None, fp8: bool = False) -> LlavaLlamaTextEncoder:
    """Load from a ComfyUI file, an HF folder (`text_encoder/` or the folder above it) or `preset:tiny-llava-llama`.
    dtype: fp16 is Musubi's default for this encoder. fp8: the decoder layers' Linears are stored in float8_e4m3fn
    with block-wise scales and computed in `dtype` (bf16 or fp16): about half the memory of fp16."""
    from ..memory.fp8 import load_fp8_checkpoint, quantize_model_fp8

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise invalid("LLaVA-LLaMA compute dtype", dtype, "float32, float16 or bfloat16")
    if fp8 and dtype not in (torch.bfloat16, torch.float16):
        raise invalid("LLaVA-LLaMA compute dtype with fp8 weights", dtype, "bf16 or fp16")
    suffix = "|fp8" if fp8 else ""   # fp8 weights give other embeddings: caches must tell them apart

    if isinstance(source, str) and source.startswith("preset:"):
        if source != PRESET_TINY:
            raise invalid("text encoder preset", source, f"'{PRESET_TINY}'")
        tokenizer = load_llama_tokenizer(tokenizer_path or TINY_TOKENIZER)
        _check_vocab(tokenizer, TINY_LLAVA_LLAMA, source)
        model = _build(TINY_LLAVA_LLAMA, dtype, meta=False)
        used = TINY_LLAVA_LLAMA.num_layers - HIDDEN_STATE_SKIP_LAYER
        view = to_llama_view(Checkpoint.from_state_dict(tiny_llava_llama_state_dict(), PRESET_TINY), used)
        model.load_state_dict({k: v for k, v in view.items() if k != "norm.weight"}, strict=True)
        model.to(device=device, dtype=dtype)
        if fp8:
            quantize_model_fp8(model, "scaled", include=FP8_INCLUDE, exclude=())
        identity = PRESET_TINY if tokenizer_path is None else _identity(PRESET_TINY, tokenizer)
        return LlavaLlamaTextEncoder(model, tokenizer, TINY_LLAVA_LLAMA, identity + suffix)

    path = Path(source)
    ckpt, named_by, search, hf_config = _open_weights(path)  # MusubiInputError for missing/unreadable files
    config = infer_llama_config(to_llama_view(ckpt), hf_config)
    if config.num_layers <= HIDDEN_STATE_SKIP_LAYER:
        raise invalid(f"text encoder {path}", f"{config.num_layers} layers", f"more than {HIDDEN_STATE_SKIP_LAYER}")
    view = to_llama_view(ckpt, config.num_layers - HIDDEN_STATE_SKIP_LAYER)
    tokenizer = _resolve_tokenizer(tokenizer_path, search, path)  # before the heavy load: fail fast
    _check_vocab(tokenizer, config, str(path))

    model = _build(config, dtype, meta=True)
    if fp8:   # fp8 tensors of the file are kept as they are; high-precision ones are quantized one at a time
        load_fp8_checkpoint(model, view, "scaled", dtype=dtype, device=device, include=FP8_INCLUDE, exclude=())
    else:
        load_into_module(model, view, dtype=dtype, device=device, strict=True)
    model.rotary_emb.to(device)
    return LlavaLlamaTextEncoder(model, tokenizer, config, _identity(_file_identity(named_by), tokenizer) + suffix)


def _check_vocab(tokenizer: LlamaPromptTokenizer, config: LlamaConfig, where: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise invalid(f"tokenizer {tokenizer.identity}", f"{tokenizer.vocab_size} tokens",
                      f"at most the {config.vocab_size} embeddings of {where} (wrong tokenizer for this model?)")


def _identity(weights_id: str, tokenizer: LlamaPromptTokenizer) -> str:
    # no tokenizer is embedded in these files: the one used is always named
    return f"{weights_id}|tokenizer={tokenizer.identity}"


# --------------------------------------------------------------------------------------------------------------
# Tiny preset weights (deterministic)
# --------------------------------------------------------------------------------------------------------------
def tiny_llava_llama_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny LLaMA weights in ComfyUI layout (`model.*` + `lm_head.weight`, float32), all layers and the
    final norm included like a real file. Scales keep activations O(1) through the layers."""
    c = TINY_LLAVA_LLAMA
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": rnd(c.vocab_size, d, std=1.0)}
    for i in range(c.num_layers):
        b = f"model.layers.{i}."
        sd[b + "input_layernorm.weight"] = 1.0 + rnd(d, std=0.1)
        sd[b + "post_attention_layernorm.weight"] = 1.0 + rnd(d, std=0.1)
        for name, shape in (("q_proj", (q, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, q))):
            sd[b + f"self_attn.{name}.weight"] = rnd(*shape, std=shape[1] ** -0.5)
        sd[b + "mlp.gate_proj.weight"] = rnd(f, d, std=d ** -0.5)
        sd[b + "mlp.up_proj.weight"] = rnd(f, d, std=d ** -0.5)
        sd[b + "mlp.down_proj.weight"] = rnd(d, f, std=f ** -0.5)
    sd["model.norm.weight"] = 1.0 + rnd(d, std=0.1)
    sd["lm_head.weight"] = rnd(c.vocab_size, d, std=d ** -0.5)
    return sd


__all__ = ["LlamaConfig", "LLAVA_LLAMA3_8B", "TINY_LLAVA_LLAMA", "LlavaLlamaTextEncoder", "LlamaPromptTokenizer",
           "load_llava_llama", "load_llama_tokenizer", "infer_llama_config", "to_llama_view",
           "tiny_llava_llama_state_dict", "PROMPT_TEMPLATE_VIDEO", "PROMPT_TEMPLATE_IMAGE", "OFFICIAL_CROP_START",
           "TEXT_LEN", "HIDDEN_STATE_SKIP_LAYER"]
