"""CLIP-L text encoder as HunyuanVideo's second text encoder (`text_states_2`), through transformers' `CLIPTextModel`.

Output: the pooled state (`pooler_output`: final-norm hidden state at the first EOS token) [B, 768] for prompts
tokenized like the official `CLIPTokenizer(max_length=77)`: BOS + lower-cased BPE tokens + EOS, truncated to 77
(EOS kept), padded with EOS (`<|endoftext|>`, CLIP-L's pad token) with an attention mask.

Accepted weights: ComfyUI's `clip_l.safetensors` (transformers names `text_model.*`, sometimes with
`text_projection.weight` / `logit_scale`, ignored; scaled fp8 files dequantized on load), an HF `text_encoder_2/`
folder (config.json + model.safetensors) or the folder above it. Bundled checkpoints with a prefix before
`text_model.` load too.

Tokenizers are never downloaded: `tokenizer_path` (a folder with vocab.json + merges.txt: ComfyUI ships CLIP-L's
as `comfy/sd1_tokenizer/`, the node layer passes it); for an HF folder its `tokenizer_2/` sibling or the weights
folder; for `preset:tiny-clip-l` the tiny BPE in `tokenizer_assets/tiny_clip_l/` (`scripts/make_tiny_tokenizer.py`).
The BPE runs in the HF `tokenizers` library with the pipeline transformers builds for CLIP (NFC, whitespace
collapse, lower case, CLIP's split, byte-level BPE with `</w>` word ends).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, load_into_module
from ..errors import invalid
from ..families.identify import foreign_hint
from .umt5 import _file_identity

MAX_LENGTH = 77
PRESET_TINY = "preset:tiny-clip-l"
TINY_TOKENIZER = Path(__file__).resolve().parent / "tokenizer_assets" / "tiny_clip_l"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"  # CLIP's word split (transformers' converter)


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_positions: int = MAX_LENGTH
    eps: float = 1e-5

    def to_transformers(self, bos_id: int, eos_id: int):
        from transformers import CLIPTextConfig

        # eos_token_id != 2: pool at the first `eos_id` (the legacy value 2 means argmax of the ids, the same
        # position for CLIP-L's vocabulary where EOS is the largest id)
        return CLIPTextConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                              intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                              num_attention_heads=self.num_heads, max_position_embeddings=self.max_positions,
                              layer_norm_eps=self.eps, hidden_act="quick_gelu", projection_dim=self.hidden_size,
                              bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id,
                              attention_dropout=0.0, dropout=0.0, attn_implementation="sdpa")


CLIP_L = ClipTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12)
# Same family, tiny dims: hidden 24 = the tiny HunyuanVideo DiT preset's text_pool_dim; vocab = the tiny BPE's 640.
TINY_CLIP_L = ClipTextConfig(vocab_size=640, hidden_size=24, intermediate_size=48, num_layers=2, num_heads=3)
_TINY_MAX_WIDTH = 256  # widths below this are test models with 8-dim heads; CLIP text models use 64-dim heads


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------
class ClipPromptTokenizer:
    """CLIP's BPE (vocab.json + merges.txt) in the HF `tokenizers` library."""

    def __init__(self, folder: Path):
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        vocab_file, merges_file = (folder / n for n in TOKENIZER_FILES)
        try:
            bpe = models.BPE.from_file(str(vocab_file), str(merges_file), unk_token=EOS, end_of_word_suffix="</w>",
                                       continuing_subword_prefix="", fuse_unk=False)
        except Exception as e:  # tokenizers raises its own Exception subclass on bad files
            raise invalid("tokenizer", str(folder), f"a CLIP tokenizer (vocab.json + merges.txt) ({e})") from e
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self._backend = tok
        self.bos_id, self.eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise invalid(f"tokenizer {folder}", f"no {BOS} / {EOS} tokens", "a CLIP tokenizer (vocab.json)")
        self.vocab_size = tok.get_vocab_size()
        digest = hashlib.sha256(vocab_file.read_bytes() + merges_file.read_bytes()).hexdigest()[:16]
        self.identity = f"clip-bpe:{digest}"  # content hash: the same files anywhere key the same cache entries

    def encode(self, text: str) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def __call__(self, prompts: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, max_length] (int64, padded with EOS), mask [B, max_length] (int64, 1 on BOS..EOS)."""
        ids = torch.full((len(prompts), max_length), self.eos_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), max_length), dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.bos_id] + self.encode(p)[: max_length - 2] + [self.eos_id]  # truncation keeps the EOS
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = 1
        return ids, mask


def load_clip_tokenizer(path: str | Path) -> ClipPromptTokenizer:
    """A user-given tokenizer folder holding vocab.json + merges.txt."""
    path = Path(path)
    missing = [n for n in TOKENIZER_FILES if not (path / n).is_file()]
    if missing:
        raise invalid("tokenizer_path", f"{path} (no {' / '.join(missing)} there)",
                      "a CLIP tokenizer folder with vocab.json and merges.txt (ComfyUI ships it as comfy/sd1_tokenizer/)")
    return ClipPromptTokenizer(path)


def _resolve_tokenizer(tokenizer_path, search: list[Path], weights: Path) -> ClipPromptTokenizer:
    if tokenizer_path:
        return load_clip_tokenizer(tokenizer_path)
    for folder in search:
        if all((folder / n).is_file() for n in TOKENIZER_FILES):
            return ClipPromptTokenizer(folder)
    looked = ", ".join(str(f) for f in search) or "nowhere (a single weight file names no tokenizer folder)"
    raise invalid(f"CLIP-L text encoder {weights}", f"no vocab.json / merges.txt (looked in {looked})",
                  "a tokenizer_path: a CLIP tokenizer folder with vocab.json and merges.txt (ComfyUI ships it as "
                  "comfy/sd1_tokenizer/)")


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------
_PROBE = "text_model.embeddings.token_embedding.weight"


def clip_text_view(ckpt: Checkpoint) -> Checkpoint:
    """A view with the text transformer's names (`embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`: the
    file's `text_model.` and whatever precedes it stripped), as `text_transformer(model)` names them."""
    keys = ckpt.keys()
    hits = [k for k in keys if k == _PROBE or k.endswith("." + _PROBE)]
    if not hits:
        hint = foreign_hint(keys, "CLIP text encoder", "not a CLIP text encoder")
        raise invalid(f"text encoder {ckpt.source}", f"keys like {keys[:3]} ({hint})",
                      "a CLIP-L text encoder: ComfyUI clip_l.safetensors or an HF text_encoder_2/ folder")
    prefix = hits[0][: -len(_PROBE)] + "text_model."
    return ckpt.renamed(lambda k: k[len(prefix):] if k.startswith(prefix) else None)


def infer_clip_text_config(view: Checkpoint, hf_config: dict | None = None) -> ClipTextConfig:
    """Sizes from tensor shapes; the head count from an HF config.json when there is one, else 64-dim heads
    (CLIP-L/G) or, below width 256, the tiny rule (8-dim heads)."""
    src = f"text encoder {view.source}"
    for k in ("embeddings.position_embedding.weight", "encoder.layers.0.mlp.fc1.weight", "final_layer_norm.weight"):
        if k not in view:
            raise invalid(src, f"no tensor for {k!r}", "a complete CLIP text encoder")
    vocab, hidden = view.shape("embeddings.token_embedding.weight")
    positions = view.shape("embeddings.position_embedding.weight")[0]
    layers = 1 + max(int(k.split(".")[2]) for k in view.keys() if k.startswith("encoder.layers."))
    heads = (hf_config or {}).get("num_attention_heads") or hidden // (8 if hidden < _TINY_MAX_WIDTH else 64)
    if hidden % heads:
        raise invalid(src, f"width {hidden} with {heads} heads", "a width divisible by the head count")
    return ClipTextConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                          intermediate_size=view.shape("encoder.layers.0.mlp.fc1.weight")[0],
                          max_positions=positions)


def _open_weights(source: Path) -> tuple[Checkpoint, Path, list[Path], dict | None]:
    """(checkpoint, file naming it, folders to look for the tokenizer in, HF config.json or None)."""
    if source.is_dir():
        folder = source / "text_encoder_2" if (source / "text_encoder_2").is_dir() else source
        files = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.safetensors"))
        if not files:
            raise invalid("text encoder folder", str(folder), "an HF text_encoder_2/ folder with .safetensors weights")
        config_file = folder / "config.json"
        hf_config = json.loads(config_file.read_text()) if config_file.is_file() else None
        if hf_config and "text_config" in hf_config:  # a full CLIPModel config: the text part
            hf_config = hf_config["text_config"]
        return Checkpoint.open(files[0]), files[0], [folder.parent / "tokenizer_2", folder], hf_config
    return Checkpoint.open(source), source, [source.parent], None


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------
class ClipTextEncoder:
    """A loaded CLIP text model + tokenizer. `identity` names weights and tokenizer (for embedding caches)."""

    def __init__(self, model, tokenizer: ClipPromptTokenizer, config: ClipTextConfig, identity: str,
                 batch_size: int = 16):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.identity = identity
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return text_transformer(self.model).embeddings.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return text_transformer(self.model).embeddings.token_embedding.weight.dtype

    def to(self, device) -> "ClipTextEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """-> pooled states [B, hidden] (768 for CLIP-L) in the model dtype."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise invalid("prompts", prompts, "a list of strings")
        out = []
        for start in range(0, len(prompts), self.batch_size):
            ids, mask = self.tokenizer(list(prompts[start: start + self.batch_size]), self.config.max_positions)
            out.append(self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).pooler_output)
        return torch.cat(out)


def text_transformer(model) -> torch.nn.Module:
    """The module holding embeddings / encoder / final_layer_norm: `model.text_model` up to transformers 4.x,
    the model itself from 5.0 (which flattened CLIPTextModel)."""
    return getattr(model, "text_model", model)


def _build(config: ClipTextConfig, tokenizer: ClipPromptTokenizer, meta: bool):
    from transformers import CLIPTextModel

    hf = config.to_transformers(tokenizer.bos_id, tokenizer.eos_id)
    if meta:
        with torch.device("meta"):
            model = CLIPTextModel(hf)
    else:
        model = CLIPTextModel(hf)
    # position ids are computed, not loaded (some files still store them): a real buffer off the meta device
    text_transformer(model).embeddings.register_buffer("position_ids", torch.arange(config.max_positions)[None],
                                                persistent=False)
    return model


def load_clip_text(source: str | Path, dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                   tokenizer_path: str | Path | None = None) -> ClipTextEncoder:
    """Load from a ComfyUI `clip_l.safetensors`, an HF folder (`text_encoder_2/` or the folder above it) or
    `preset:tiny-clip-l`. dtype: fp16 is Musubi's default for HunyuanVideo's text encoders."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise invalid("CLIP text encoder dtype", dtype, "float32, float16 or bfloat16")
    if isinstance(source, str) and source.startswith("preset:"):
        if source != PRESET_TINY:
            raise invalid("text encoder preset", source, f"'{PRESET_TINY}'")
        tokenizer = load_clip_tokenizer(tokenizer_path or TINY_TOKENIZER)
        _check_vocab(tokenizer, TINY_CLIP_L, source)
        model = _build(TINY_CLIP_L, tokenizer, meta=False)
        state = clip_text_view(Checkpoint.from_state_dict(tiny_clip_l_state_dict(), PRESET_TINY))
        text_transformer(model).load_state_dict(dict(state.items()), strict=False)  # position_ids: built
        identity = PRESET_TINY if tokenizer_path is None else f"{PRESET_TINY}|tokenizer={tokenizer.identity}"
        return ClipTextEncoder(model.to(device=device, dtype=dtype), tokenizer, TINY_CLIP_L, identity)

    path = Path(source)
    ckpt, named_by, search, hf_config = _open_weights(path)
    view = clip_text_view(ckpt)
    config = infer_clip_text_config(view, hf_config)
    tokenizer = _resolve_tokenizer(tokenizer_path, search, path)  # before the heavy load: fail fast
    _check_vocab(tokenizer, config, str(path))
    model = _build(config, tokenizer, meta=True)
    inner = text_transformer(model)
    load_into_module(inner, view, dtype=dtype, device=device, strict=False)
    missing = [n for n, t in inner.state_dict().items() if t.device.type == "meta"]
    if missing:
        raise invalid(f"checkpoint {path}", f"{len(missing)} missing tensors, e.g. {missing[:3]}",
                      "every weight of a CLIP text encoder")
    inner.embeddings.position_ids = inner.embeddings.position_ids.to(device)
    return ClipTextEncoder(model, tokenizer, config, f"{_file_identity(named_by)}|tokenizer={tokenizer.identity}")


def _check_vocab(tokenizer: ClipPromptTokenizer, config: ClipTextConfig, where: str) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise invalid(f"tokenizer {tokenizer.identity}", f"{tokenizer.vocab_size} tokens",
                      f"at most the {config.vocab_size} embeddings of {where} (wrong tokenizer for this model?)")


def tiny_clip_l_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny CLIP text weights in ComfyUI layout (`text_model.*`, float32), deterministic per seed."""
    c = TINY_CLIP_L
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    d, f, p = c.hidden_size, c.intermediate_size, "text_model."
    sd = {p + "embeddings.token_embedding.weight": rnd(c.vocab_size, d, std=1.0),
          p + "embeddings.position_embedding.weight": rnd(c.max_positions, d, std=0.1),
          p + "final_layer_norm.weight": 1.0 + rnd(d, std=0.1), p + "final_layer_norm.bias": rnd(d, std=0.1)}
    for i in range(c.num_layers):
        b = f"{p}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            sd[f"{b}{ln}.weight"] = 1.0 + rnd(d, std=0.1)
            sd[f"{b}{ln}.bias"] = rnd(d, std=0.1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{b}self_attn.{proj}.weight"] = rnd(d, d, std=d ** -0.5)
            sd[f"{b}self_attn.{proj}.bias"] = rnd(d, std=0.02)
        sd[f"{b}mlp.fc1.weight"] = rnd(f, d, std=d ** -0.5)
        sd[f"{b}mlp.fc1.bias"] = rnd(f, std=0.02)
        sd[f"{b}mlp.fc2.weight"] = rnd(d, f, std=f ** -0.5)
        sd[f"{b}mlp.fc2.bias"] = rnd(d, std=0.02)
    return sd


__all__ = ["ClipTextConfig", "CLIP_L", "TINY_CLIP_L", "ClipTextEncoder", "ClipPromptTokenizer", "load_clip_text",
           "load_clip_tokenizer", "clip_text_view", "text_transformer", "infer_clip_text_config", "tiny_clip_l_state_dict", "MAX_LENGTH"]
