"""umT5-XXL text encoder (Wan 2.1 / 2.2) through transformers' `UMT5EncoderModel`.

Accepted weight files (the layout is recognised from the key names, the size from the tensor shapes):

* official Wan `models_t5_umt5-xxl-enc-bf16.pth`: Wan's own names (`token_embedding`, `blocks.N.attn.{q,k,v,o}`,
  `blocks.N.norm1/norm2`, `blocks.N.ffn.{gate.0,fc1,fc2}`, `blocks.N.pos_embedding.embedding`, `norm`), optionally
  under an `encoder.` prefix;
* ComfyUI's repackaged `umt5_xxl_fp16.safetensors` / `umt5_xxl_fp8_e4m3fn_scaled.safetensors`: transformers names
  (`shared.weight`, `encoder.block.N.layer.{0,1}...`, `encoder.final_layer_norm`), scaled fp8 dequantized on load,
  usually with the SentencePiece model embedded as a uint8 tensor `spiece_model`.

Prompts are encoded like the official Wan pipeline: whitespace-cleaned, tokenized with EOS appended, truncated to
512 tokens, padded with id 0 to 512 with an attention mask, and each output trimmed to its true length
(tokens + EOS): `encode(prompts) -> list[Tensor[L_i, d_model]]`.

Tokenizers are never downloaded. Sources, in order: the `tokenizer_path` argument (folder with `tokenizer.json` or
`spiece.model`, or a `.model` / `tokenizer.json` file); the `spiece_model` tensor ComfyUI embeds in its files; the
official Wan checkpoint folder layout (`google/umt5-xxl/` next to the weights); for `preset:tiny-umt5` the tiny
SentencePiece model shipped in `tokenizer_assets/` (regenerate with `scripts/make_tiny_tokenizer.py`).
"""

from __future__ import annotations

import html
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families.identify import foreign_hint
from ..checkpoint import Checkpoint, load_into_module
from ..errors import invalid

TEXT_LEN = 512  # Wan's text context length (tokens incl. EOS)
PAD_ID = 0
EMBEDDED_SPIECE_KEY = "spiece_model"  # ComfyUI stores the SentencePiece proto in the weight file under this name
PRESET_TINY = "preset:tiny-umt5"
TINY_SPIECE = Path(__file__).resolve().parent / "tokenizer_assets" / "tiny_umt5_spiece.model"
ACCEPTED_TOKENIZERS = ("a folder with tokenizer.json or spiece.model, a .model SentencePiece file, a tokenizer.json "
                       "file, or a ComfyUI umt5 file that embeds 'spiece_model'")


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UMT5Config:
    vocab_size: int
    d_model: int
    d_kv: int          # per-head dim; inner attention dim = num_heads * d_kv
    d_ff: int          # gated-GELU hidden dim
    num_heads: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def to_transformers(self):
        from transformers import UMT5Config as HFConfig

        return HFConfig(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_heads=self.num_heads, num_layers=self.num_layers,
            relative_attention_num_buckets=self.num_buckets, relative_attention_max_distance=self.max_distance,
            layer_norm_epsilon=self.eps, dropout_rate=0.0,
            # gated-gelu = GELU(tanh approximation) gate * linear, exactly Wan's T5FeedForward
            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
            pad_token_id=PAD_ID, eos_token_id=1,
        )


UMT5_XXL = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_heads=64, num_layers=24)
# Same family, tiny dims; d_model 32 = the tiny DiT preset's text_dim. Vocab = the tiny tokenizer's 384 pieces.
TINY_UMT5 = UMT5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy (when installed), html-unescape twice, collapse whitespace, strip."""
    try:
        import ftfy  # optional: only repairs mojibake, a no-op on clean text

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class PromptTruncatedWarning(UserWarning):
    """A prompt or caption longer than Wan's 512-token context: the end is cut off."""


class PromptTokenizer:
    """SentencePiece (`.model` bytes) or HF `tokenizers` (`tokenizer.json`) behind one small interface.

    `encode(text)` gives the content ids without special tokens; EOS, truncation and padding are done here so both
    backends behave the same (HF's max_length truncation keeps the EOS: content[:511] + [eos])."""

    def __init__(self, backend, kind: str, identity: str):
        self._backend = backend
        self.kind = kind  # "sentencepiece" | "tokenizers"
        self.identity = identity
        if kind == "sentencepiece":
            self.eos_id = backend.eos_id()
            self.vocab_size = backend.get_piece_size()
        else:
            self.eos_id = backend.token_to_id("</s>")
            self.vocab_size = backend.get_vocab_size()
        if self.eos_id is None or self.eos_id < 0:
            raise invalid(f"tokenizer {identity}", "no '</s>' token", "a T5/umT5 tokenizer (EOS token '</s>')")

    @classmethod
    def from_spiece_bytes(cls, data: bytes, identity: str) -> "PromptTokenizer":
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise invalid(f"tokenizer {identity}", f"unreadable SentencePiece model ({e})", ACCEPTED_TOKENIZERS) from e
        return cls(sp, "sentencepiece", identity)

    @classmethod
    def from_tokenizer_json(cls, path: Path) -> "PromptTokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise invalid("tokenizer", str(path), f"a valid tokenizer.json ({e})") from e
        return cls(tok, "tokenizers", _file_identity(path))

    def encode(self, text: str) -> list[int]:
        if self.kind == "sentencepiece":
            return list(self._backend.encode(text))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def __call__(self, prompts: list[str], text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, text_len] (int64, padded with 0), mask [B, text_len] (int64, 1 on tokens incl. EOS)."""
        ids = torch.full((len(prompts), text_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), text_len), dtype=torch.long)
        for i, p in enumerate(prompts):
            content = self.encode(clean_prompt(p))
            if len(content) > text_len - 1:
                warnings.warn(f"prompt of {len(content) + 1} tokens truncated to {text_len} (the rest is not used): "
                              f"{p[:60]!r}...", PromptTruncatedWarning, stacklevel=2)
            toks = content[: text_len - 1] + [self.eos_id]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = 1
        return ids, mask


def load_tokenizer_path(path: str | Path) -> PromptTokenizer:
    """A user-given tokenizer: folder (tokenizer.json preferred, as the official pipeline's fast tokenizer, else
    spiece.model), a `.model` SentencePiece file, or a `tokenizer.json` file."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "spiece.model"):
            if (path / name).is_file():
                return load_tokenizer_path(path / name)
        raise invalid("tokenizer_path", str(path), "a folder containing tokenizer.json or spiece.model")
    if path.is_file() and path.name.endswith(".json"):
        return PromptTokenizer.from_tokenizer_json(path)
    if path.is_file() and path.suffix == ".model":
        return PromptTokenizer.from_spiece_bytes(path.read_bytes(), _file_identity(path))
    raise invalid("tokenizer_path", str(path), ACCEPTED_TOKENIZERS)


def _resolve_tokenizer(tokenizer_path, ckpt: Checkpoint | None, weights: Path | None) -> PromptTokenizer:
    if tokenizer_path:
        return load_tokenizer_path(tokenizer_path)
    embedded = _embedded_spiece_key(ckpt) if ckpt is not None else None
    if embedded is not None:
        data = ckpt.raw(embedded).contiguous().numpy().tobytes()
        return PromptTokenizer.from_spiece_bytes(data, f"{weights.name}:{EMBEDDED_SPIECE_KEY}")
    if weights is not None:
        official = weights.parent / "google" / "umt5-xxl"  # the official Wan checkpoint folder layout
        if official.is_dir():
            return load_tokenizer_path(official)
    raise invalid(f"text encoder {weights}", "no tokenizer (none given, none embedded in the file)",
                  f"a tokenizer_path: {ACCEPTED_TOKENIZERS}")


def _embedded_spiece_key(ckpt: Checkpoint) -> str | None:
    """`spiece_model` (text-encoder file) or `<prefix>.spiece_model` (a full checkpoint bundling the encoder)."""
    for k in ckpt.keys():
        if (k == EMBEDDED_SPIECE_KEY or k.endswith("." + EMBEDDED_SPIECE_KEY)) and ckpt.dtype(k) == torch.uint8:
            return k
    return None


# --------------------------------------------------------------------------------------------------------------
# Weights: layouts -> transformers names, config from shapes
# --------------------------------------------------------------------------------------------------------------
_WAN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_WAN_BLOCK_MODULES = {  # Wan module path inside a block -> transformers path inside encoder.block.N
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",  # Wan: fc1(x) * GELU(gate(x)) ; HF: GELU(wi_0(x)) * wi_1(x)
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}
_WAN_TOP = {"token_embedding": "shared", "norm": "encoder.final_layer_norm"}


def wan_to_transformers_key(key: str) -> str | None:
    """`blocks.3.ffn.fc1.weight` -> `encoder.block.3.layer.1.DenseReluDense.wi_1.weight`; unknown keys -> None.
    The leaf (`weight`, `scale_weight`) is kept so scaled-fp8 scales follow their weight."""
    module, _, leaf = key.rpartition(".")
    if module in _WAN_TOP:
        return f"{_WAN_TOP[module]}.{leaf}"
    m = _WAN_BLOCK.match(module)
    if m and m[2] in _WAN_BLOCK_MODULES:
        return f"encoder.block.{m[1]}.{_WAN_BLOCK_MODULES[m[2]]}.{leaf}"
    return None


_WAN_PROBE = "blocks.0.attn.q.weight"
_HF_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"


def to_transformers_view(ckpt: Checkpoint) -> Checkpoint:
    """A view of `ckpt` with transformers `UMT5EncoderModel` names, whatever the file's layout and prefix."""
    keys = [k for k in ckpt.keys() if not k.endswith(EMBEDDED_SPIECE_KEY)]
    wan = [k for k in keys if k == _WAN_PROBE or k.endswith("." + _WAN_PROBE)]
    hf = [k for k in keys if k == _HF_PROBE or k.endswith("." + _HF_PROBE)]
    if hf:
        prefix = hf[0][: -len(_HF_PROBE)]
        has_shared = prefix + "shared.weight" in ckpt  # some exports keep only the encoder's (tied) copy

        def rename(k: str) -> str | None:
            if not k.startswith(prefix) or k.endswith(EMBEDDED_SPIECE_KEY):
                return None
            k = k[len(prefix):]
            if k.startswith("encoder.embed_tokens.") and not has_shared:
                return "shared." + k[len("encoder.embed_tokens."):]
            return k

        return ckpt.renamed(rename)
    if wan:
        prefix = wan[0][: -len(_WAN_PROBE)]
        return ckpt.renamed(lambda k: wan_to_transformers_key(k[len(prefix):]) if k.startswith(prefix) else None)
    hint = foreign_hint(keys, "T5 text encoder", "not a umT5 encoder")
    raise invalid(f"text encoder {ckpt.source}", f"keys like {keys[:3]} ({hint})",
                  "a umT5-XXL text encoder: official Wan models_t5_umt5-xxl-enc-bf16.pth or ComfyUI "
                  "umt5_xxl_fp16 / umt5_xxl_fp8_e4m3fn_scaled .safetensors")


def infer_umt5_config(view: Checkpoint) -> UMT5Config:
    """Sizes from tensor shapes of a transformers-named view (works for XXL, smaller umT5 and the tiny preset)."""
    src = f"text encoder {view.source}"
    for k in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "encoder.final_layer_norm.weight"):
        if k not in view:
            raise invalid(src, f"no tensor for {k!r}", "a complete umT5 encoder with gated-GELU feed-forward")
    vocab, d_model = view.shape("shared.weight")
    num_layers = 1 + max(int(k.split(".")[2]) for k in view.keys() if k.startswith("encoder.block."))
    inner = view.shape(_HF_PROBE)[0]
    num_buckets, num_heads = view.shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    d_ff = view.shape("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
    if num_layers > 1 and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in view:
        # T5 v1.1 (Flux/SD3 t5xxl) shares one bias across layers; umT5 has one per layer.
        raise invalid(src, "a relative attention bias in block 0 only (T5 v1.1, e.g. t5xxl for Flux/SD3)",
                      "umT5 (one relative attention bias per layer), e.g. umt5_xxl_fp16.safetensors")
    if inner % num_heads:
        raise invalid(src, f"attention width {inner} with {num_heads} heads", "a width divisible by the head count")
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // num_heads, d_ff=d_ff, num_heads=num_heads,
                      num_layers=num_layers, num_buckets=num_buckets)


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------
class UMT5TextEncoder:
    """A loaded umT5 encoder + its tokenizer. `identity` names weights and tokenizer (for embedding caches)."""

    def __init__(self, model, tokenizer: PromptTokenizer, config: UMT5Config, identity: str,
                 text_len: int = TEXT_LEN, batch_size: int = 8):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.identity = identity
        self.text_len = text_len
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, device) -> "UMT5TextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """-> one [L_i, d_model] tensor per prompt, L_i = token count incl. EOS (<= 512), in the model dtype."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise invalid("prompts", prompts, "a list of strings")
        out: list[torch.Tensor] = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self.tokenizer(list(prompts[start: start + self.batch_size]), self.text_len)
            hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
            lengths = mask.sum(dim=1).tolist()  # [B]; hidden: [B, 512, d_model]
            out.extend(hidden[i, :n] for i, n in enumerate(lengths))
        return out


# fp8 storage (Musubi's --fp8_t5): the attention and gate/up Linears of the blocks. `wo` stays in the compute dtype
# because transformers casts the FFN activations to `wo.weight.dtype` before it, which would quantize them too.
FP8_INCLUDE = ("encoder.block.",)
FP8_EXCLUDE = ("DenseReluDense.wo",)


def load_umt5(source: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
              tokenizer_path: str | Path | None = None, fp8: bool = False) -> UMT5TextEncoder:
    """Load a umT5 encoder from a weight file (any accepted layout/precision) or `preset:tiny-umt5`.
    fp8: the block Linears (`FP8_INCLUDE` minus `FP8_EXCLUDE`) are stored in float8_e4m3fn with block-wise scales and
    computed in `dtype` (bf16 or fp16): about 40 % less memory for umT5-XXL."""
    from transformers import UMT5EncoderModel

    from ..memory.fp8 import load_fp8_checkpoint, quantize_model_fp8

    if fp8 and dtype not in (torch.bfloat16, torch.float16):
        raise invalid("umT5 compute dtype with fp8 weights", dtype, "bf16 or fp16")
    suffix = "|fp8" if fp8 else ""   # fp8 weights give other embeddings: caches must tell them apart

    if isinstance(source, str) and source.startswith("preset:"):
        if source != PRESET_TINY:
            raise invalid("text encoder preset", source, f"'{PRESET_TINY}'")
        tokenizer = load_tokenizer_path(tokenizer_path) if tokenizer_path else \
            PromptTokenizer.from_spiece_bytes(TINY_SPIECE.read_bytes(), PRESET_TINY)
        _check_vocab(tokenizer, TINY_UMT5, source)
        model = UMT5EncoderModel(TINY_UMT5.to_transformers())
        state = tiny_umt5_state_dict(with_tokenizer=False)
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in the model, listed twice
        model.load_state_dict(state, strict=True)
        model.to(device=device, dtype=dtype)
        if fp8:
            quantize_model_fp8(model, "scaled", include=FP8_INCLUDE, exclude=FP8_EXCLUDE)
        return UMT5TextEncoder(model, tokenizer, TINY_UMT5,
                               _join_identity(PRESET_TINY, tokenizer, default=PRESET_TINY) + suffix)

    path = Path(source)
    ckpt = Checkpoint.open(path)  # raises MusubiInputError for missing/unreadable files
    view = to_transformers_view(ckpt)
    config = infer_umt5_config(view)
    tokenizer = _resolve_tokenizer(tokenizer_path, ckpt, path)  # before the heavy load: fail fast
    _check_vocab(tokenizer, config, str(path))

    with torch.device("meta"):
        model = UMT5EncoderModel(config.to_transformers())
    # transformers keeps T5's FFN output projection in fp32 for fp16 (activations overflow otherwise).
    keep_fp32 = (lambda name: name.endswith("DenseReluDense.wo.weight")) if dtype == torch.float16 else None
    if fp8:   # fp8 tensors of the file are kept as they are; high-precision ones are quantized one at a time
        unused = load_fp8_checkpoint(model, view, "scaled", dtype=dtype, device=device, keep_dtype=keep_fp32,
                                     include=FP8_INCLUDE, exclude=FP8_EXCLUDE)
        unknown = [k for k in unused if k != EMBEDDED_SPIECE_KEY and not k.endswith("encoder.embed_tokens.weight")]
        if unknown:
            raise invalid(f"umT5 file {path.name}", f"unexpected tensors {unknown[:3]}", "a umT5 encoder file")
    else:
        load_into_module(model, view, dtype=dtype, device=device, strict=True, keep_dtype=keep_fp32)
    model.encoder.set_input_embeddings(model.shared)  # re-tie: only `shared` was replaced by the loader
    file_id = _file_identity(path)
    own_tokenizer = f"{path.name}:{EMBEDDED_SPIECE_KEY}"
    return UMT5TextEncoder(model, tokenizer, config,
                           _join_identity(file_id, tokenizer, default=own_tokenizer) + suffix)


def _check_vocab(tokenizer: PromptTokenizer, config: UMT5Config, where: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise invalid(f"tokenizer {tokenizer.identity}", f"{tokenizer.vocab_size} pieces",
                      f"at most the {config.vocab_size} embeddings of {where} (wrong tokenizer for this model?)")


def _file_identity(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _join_identity(weights_id: str, tokenizer: PromptTokenizer, default: str) -> str:
    # The tokenizer changes the embeddings too, so a cache key must name it unless it is the file's own.
    return weights_id if tokenizer.identity == default else f"{weights_id}|tokenizer={tokenizer.identity}"


# --------------------------------------------------------------------------------------------------------------
# Tiny preset weights (deterministic)
# --------------------------------------------------------------------------------------------------------------
def tiny_umt5_state_dict(seed: int = 0, with_tokenizer: bool = True) -> dict[str, torch.Tensor]:
    """Random tiny umT5 weights in ComfyUI/transformers layout (float32), plus the tiny tokenizer as `spiece_model`
    so that a file written from it loads like a ComfyUI file. Scales keep activations O(1) through the layers."""
    c = TINY_UMT5
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    inner = c.num_heads * c.d_kv
    sd = {"shared.weight": rnd(c.vocab_size, c.d_model, std=1.0)}
    for i in range(c.num_layers):
        b = f"encoder.block.{i}.layer."
        sd[b + "0.layer_norm.weight"] = 1.0 + rnd(c.d_model, std=0.1)
        for name, shape in (("q", (inner, c.d_model)), ("k", (inner, c.d_model)), ("v", (inner, c.d_model)),
                            ("o", (c.d_model, inner))):
            sd[b + f"0.SelfAttention.{name}.weight"] = rnd(*shape, std=shape[1] ** -0.5)
        sd[b + "0.SelfAttention.relative_attention_bias.weight"] = rnd(c.num_buckets, c.num_heads, std=0.5)
        sd[b + "1.layer_norm.weight"] = 1.0 + rnd(c.d_model, std=0.1)
        sd[b + "1.DenseReluDense.wi_0.weight"] = rnd(c.d_ff, c.d_model, std=c.d_model ** -0.5)
        sd[b + "1.DenseReluDense.wi_1.weight"] = rnd(c.d_ff, c.d_model, std=c.d_model ** -0.5)
        sd[b + "1.DenseReluDense.wo.weight"] = rnd(c.d_model, c.d_ff, std=c.d_ff ** -0.5)
    sd["encoder.final_layer_norm.weight"] = 1.0 + rnd(c.d_model, std=0.1)
    if with_tokenizer:
        sd[EMBEDDED_SPIECE_KEY] = torch.frombuffer(bytearray(TINY_SPIECE.read_bytes()), dtype=torch.uint8)
    return sd


__all__ = ["UMT5Config", "UMT5_XXL", "TINY_UMT5", "UMT5TextEncoder", "PromptTokenizer", "load_umt5",
           "load_tokenizer_path", "clean_prompt", "infer_umt5_config", "to_transformers_view",
           "wan_to_transformers_key", "tiny_umt5_state_dict"]
