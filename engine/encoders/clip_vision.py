"""CLIP ViT-H/14 image encoder (Wan 2.1 I2V / FLF2V) through transformers' `CLIPVisionModel`.

Wan conditions on the *penultimate* tokens: the output of the first 31 of 32 blocks, no post-layernorm and no
projection, [B, 257, 1280] (class token + 16x16 patches). So the model is built with one block fewer than the file
holds and its `last_hidden_state` (which transformers' CLIP returns before `post_layernorm`) is the answer; the last
block is never loaded.

Accepted weight files (layout from key names, sizes from shapes):

* ComfyUI `clip_vision_h.safetensors`: transformers names under `vision_model.` (+ `visual_projection`, ignored);
* official open-clip `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`: Wan's names under `visual.`
  (`patch_embedding`, `cls_embedding` [1,1,D], `pos_embedding` [1,257,D], `pre_norm`, `transformer.N.{norm1,
  attn.to_qkv (q|k|v stacked on the output dim), attn.proj, norm2, mlp.0, mlp.2}`, `post_norm`); the XLM-RoBERTa
  text tower (`textual.*`) is ignored.

Preprocessing (as the official pipeline): the whole frame, aspect not kept, bicubic
resized to 224x224 (align_corners=False, no antialias) from [-1, 1], mapped to [0, 1], normalized with the OpenAI
CLIP mean/std.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..families.identify import foreign_hint
from ..checkpoint import Checkpoint, load_into_module
from ..errors import invalid

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRESET_TINY = "preset:tiny-clip"
EXPECTED_FILES = ("a CLIP ViT-H/14 vision model: ComfyUI clip_vision_h.safetensors or the official "
                  "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")


@dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int     # blocks in the file; the encoder runs num_layers - 1 of them
    num_heads: int
    patch_size: int = 14
    image_size: int = 224
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_transformers(self, num_layers: int):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, num_hidden_layers=num_layers,
            num_attention_heads=self.num_heads, patch_size=self.patch_size, image_size=self.image_size,
            num_channels=3, layer_norm_eps=self.eps,
            hidden_act="gelu",  # open-clip ViT-H uses exact GELU (OpenAI's ViT-L would be quick_gelu)
            attention_dropout=0.0,
        )


VIT_H_14 = ClipVisionConfig(hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=16)
# Keeps 224 px / patch 14 so the token count stays 257; only width/depth/heads shrink.
TINY_CLIP = ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4)
_TINY_MAX_WIDTH = 256  # widths below this are test models: 8-dim heads (head count is not stored in the weights)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------
def preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, size, size] normalized CLIP pixel values (float32)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise invalid("images", getattr(images, "shape", type(images).__name__), "a [B, 3, H, W] tensor in [-1, 1]")
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------------------------
# Weights: a lazy name -> tensor view with transformers names (q/k/v split and reshapes need more than renaming)
# --------------------------------------------------------------------------------------------------------------
class _TensorView:
    """Duck-typed `Checkpoint` for `load_into_module`: each name maps to (shape, loader); loaders read one tensor
    from the underlying file when called, so weights still stream one at a time."""

    def __init__(self, source: Path, entries: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]):
        self.source = source
        self._entries = entries

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._entries[key][1]()
        return t if dtype is None else t.to(dtype)

    def weight_keys(self) -> list[str]:
        return list(self._entries)


_HF_PROBE = "embeddings.patch_embedding.weight"
_WAN_PROBE = "visual.patch_embedding.weight"


def _hf_entries(ckpt: Checkpoint, prefix: str) -> dict:
    """`vision_model.*` (transformers <5 / ComfyUI names) -> transformers 5 `CLIPVisionModel` names (no prefix)."""
    out = {}
    for k in ckpt.weight_keys():
        if k.startswith(prefix):
            name = k[len(prefix):]
            out[name] = (tuple(ckpt.shape(k)), lambda k=k: ckpt.get(k))
    return out


_WAN_SIMPLE = {  # Wan VisionTransformer module -> transformers CLIPVisionModel module
    "patch_embedding": "embeddings.patch_embedding",
    "pre_norm": "pre_layrnorm",  # sic: transformers' spelling
    "post_norm": "post_layernorm",
}
_WAN_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
              "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
_WAN_BLOCK_RE = re.compile(r"^transformer\.(\d+)\.(.+)\.(weight|bias)$")


def _wan_entries(ckpt: Checkpoint, prefix: str) -> dict:
    out = {}

    def add(name, key, transform=lambda t: t, shape=None):
        out[name] = (shape or tuple(ckpt.shape(key)), lambda: transform(ckpt.get(key)))

    for k in ckpt.weight_keys():
        if not k.startswith(prefix):
            continue  # textual.*, log_scale
        rest = k[len(prefix):]
        module, _, leaf = rest.rpartition(".")
        if module in _WAN_SIMPLE:
            add(f"{_WAN_SIMPLE[module]}.{leaf}", k)
        elif rest == "cls_embedding":  # [1, 1, D] -> [D]
            d = ckpt.shape(k)[-1]
            add("embeddings.class_embedding", k, lambda t: t.reshape(-1), (d,))
        elif rest == "pos_embedding":  # [1, 257, D] -> [257, D]
            add("embeddings.position_embedding.weight", k, lambda t: t[0], tuple(ckpt.shape(k)[1:]))
        elif m := _WAN_BLOCK_RE.match(rest):
            i, mod, leaf = m[1], m[2], m[3]
            base = f"encoder.layers.{i}."
            if mod in _WAN_BLOCK:
                add(f"{base}{_WAN_BLOCK[mod]}.{leaf}", k)
            elif mod == "attn.to_qkv":  # rows [q; k; v], each D wide (Wan: view(b, s, 3, heads, head_dim))
                shape = tuple(ckpt.shape(k))
                d = shape[0] // 3
                for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    add(f"{base}self_attn.{proj}.{leaf}", k, lambda t, j=j, d=d: t[j * d:(j + 1) * d],
                        (d, *shape[1:]))
    return out


def clip_view(ckpt: Checkpoint) -> _TensorView:
    """A transformers-named view of a ComfyUI or official open-clip file; refuses anything else."""
    keys = ckpt.weight_keys()
    hf = [k for k in keys if k == _HF_PROBE or k.endswith("." + _HF_PROBE)]
    wan = [k for k in keys if k == _WAN_PROBE or k.endswith("." + _WAN_PROBE)]
    if hf:
        entries = _hf_entries(ckpt, hf[0][: -len(_HF_PROBE)])
    elif wan:
        entries = _wan_entries(ckpt, wan[0][: -len("patch_embedding.weight")])
    else:
        hint = foreign_hint(keys, "CLIP vision model")
        raise invalid(f"image encoder {ckpt.source}", f"keys like {keys[:3]} ({hint})", EXPECTED_FILES)
    pos = entries.get("embeddings.position_embedding.weight")
    n = pos[0][0] if pos else 0
    # transformers' non-persistent position ids buffer: not in any file, supplied so the strict load passes.
    entries["embeddings.position_ids"] = ((1, n), lambda n=n: torch.arange(n).unsqueeze(0))
    return _TensorView(ckpt.source, entries)


def infer_clip_config(view: _TensorView) -> ClipVisionConfig:
    src = f"image encoder {view.source}"
    need = ("embeddings.class_embedding", "embeddings.position_embedding.weight", "pre_layrnorm.weight",
            "encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.self_attn.q_proj.weight")
    missing = [k for k in need if k not in view]
    if missing:
        raise invalid(src, f"missing {missing}", EXPECTED_FILES)
    width, _, patch, _ = view.shape("embeddings.patch_embedding.weight")
    positions = view.shape("embeddings.position_embedding.weight")[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise invalid(src, f"{positions} position embeddings", "a square patch grid plus one class token")
    layers = 1 + max(int(k.split(".")[2]) for k in view.keys() if k.startswith("encoder.layers."))
    if width == VIT_H_14.hidden_size:
        heads = VIT_H_14.num_heads
    elif width < _TINY_MAX_WIDTH and width % 8 == 0:
        heads = width // 8
    else:
        raise invalid(src, f"width {width}", "ViT-H/14 (width 1280), the image encoder Wan 2.1 I2V/FLF2V uses")
    if layers < 2:
        raise invalid(src, f"{layers} block", "at least 2 blocks (the penultimate block's output is used)")
    return ClipVisionConfig(hidden_size=width, intermediate_size=view.shape("encoder.layers.0.mlp.fc1.weight")[0],
                            num_layers=layers, num_heads=heads, patch_size=patch, image_size=grid * patch)


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------
class ClipVisionEncoder:
    """Penultimate-layer CLIP vision tokens. `identity` names the weights (for embedding caches)."""

    def __init__(self, model, config: ClipVisionConfig, identity: str):
        self.model = model.eval().requires_grad_(False)  # holds config.num_layers - 1 blocks
        self.config = config
        self.identity = identity

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    def to(self, device) -> "ClipVisionEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 257, hidden] (model dtype)."""
        pixels = preprocess(images.to(self.device), self.config.image_size).to(self.dtype)
        return self.model(pixel_values=pixels).last_hidden_state  # before post_layernorm


def _build(config: ClipVisionConfig, meta: bool):
    from transformers import CLIPVisionModel

    hf_config = config.to_transformers(config.num_layers - 1)
    if meta:
        with torch.device("meta"):
            return CLIPVisionModel(hf_config)
    return CLIPVisionModel(hf_config)


def load_clip_vision(source: str | Path, dtype: torch.dtype = torch.float16,
                     device: torch.device | str = "cpu") -> ClipVisionEncoder:
    """Load from a weight file (ComfyUI or official layout) or `preset:tiny-clip`."""
    if isinstance(source, str) and source.startswith("preset:"):
        if source != PRESET_TINY:
            raise invalid("image encoder preset", source, f"'{PRESET_TINY}'")
        model = _build(TINY_CLIP, meta=False)
        state = {k[len("vision_model."):]: v for k, v in tiny_clip_state_dict().items() if k.startswith("vision_model.")}
        last = f"encoder.layers.{TINY_CLIP.num_layers - 1}."
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(last)}, strict=True)
        return ClipVisionEncoder(model.to(device=device, dtype=dtype), TINY_CLIP, PRESET_TINY)

    path = Path(source)
    view = clip_view(Checkpoint.open(path))
    config = infer_clip_config(view)
    model = _build(config, meta=True)
    load_into_module(model, view, dtype=dtype, device=device, strict=True)  # the last block's keys stay unused
    st = path.stat()
    return ClipVisionEncoder(model, config, f"{path.name}:{st.st_size}:{st.st_mtime_ns}")


def tiny_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tiny CLIP vision weights in ComfyUI layout (`vision_model.*`, float32), deterministic per seed."""
    c = TINY_CLIP
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return torch.randn(*shape, generator=g) * std

    d, f = c.hidden_size, c.intermediate_size
    p = "vision_model."
    sd = {
        p + "embeddings.class_embedding": rnd(d, std=d ** -0.5),
        p + "embeddings.patch_embedding.weight": rnd(d, 3, c.patch_size, c.patch_size, std=(3 * c.patch_size ** 2) ** -0.5),
        p + "embeddings.position_embedding.weight": rnd(c.num_tokens, d, std=d ** -0.5),
        p + "pre_layrnorm.weight": 1.0 + rnd(d, std=0.1), p + "pre_layrnorm.bias": rnd(d, std=0.1),
        p + "post_layernorm.weight": 1.0 + rnd(d, std=0.1), p + "post_layernorm.bias": rnd(d, std=0.1),
    }
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
    sd["visual_projection.weight"] = rnd(16, d, std=d ** -0.5)
    return sd


__all__ = ["ClipVisionConfig", "VIT_H_14", "TINY_CLIP", "ClipVisionEncoder", "load_clip_vision", "preprocess",
           "clip_view", "infer_clip_config", "tiny_clip_state_dict", "CLIP_MEAN", "CLIP_STD"]
