"""SigLIP so400m/14 @ 384 px image encoder (FramePack's image conditioning) through transformers'
`SiglipVisionModel`.

FramePack conditions on `last_hidden_state`: all 729 patch tokens (27x27, no class token) after the post-layernorm,
[B, 729, 1152]. The attention-pooling head (`head.*`) only makes the pooled output, so it is built without one and
its weights in a file are skipped.

Accepted weights (layout from key names, sizes from shapes):

* ComfyUI `sigclip_vision_patch14_384.safetensors` (also FLUX Redux's image encoder): transformers names under
  `vision_model.` (`embeddings.patch_embedding`, `embeddings.position_embedding`, `encoder.layers.N.{layer_norm1,
  self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}`, `post_layernorm`, `head.*`);
* a Hugging Face folder: `config.json` + `model.safetensors` (FLUX.1-Redux-dev `image_encoder`, given as that folder
  or its parent), the heads, epsilon and activation read from the config.

Preprocessing (Musubi: transformers' SiglipImageProcessor on the uint8 frame): the whole frame, aspect not kept,
resized to 384x384 with PIL's antialiased bicubic filter (emulated: the same result for all but a few pixels, those one
uint8 step off), normalized with mean = std = 0.5.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import Checkpoint, load_into_module
from ..errors import invalid
from ..families.identify import foreign_hint

PRESET_TINY = "preset:tiny-siglip"
EXPECTED_FILES = ("a SigLIP vision model: ComfyUI sigclip_vision_patch14_384.safetensors or a FLUX.1-Redux "
                  "image_encoder folder (config.json + model.safetensors)")
_PROBE = "embeddings.patch_embedding.weight"


@dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_transformers(self):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, patch_size=self.patch_size,
            image_size=self.image_size, num_channels=3, layer_norm_eps=self.eps, hidden_act=self.hidden_act,
            attention_dropout=0.0, vision_use_head=False)


SIGLIP_384 = SiglipConfig()
# 56 px / patch 14: 16 tokens; 2 heads of 16 channels.
TINY_SIGLIP = SiglipConfig(hidden_size=48, intermediate_size=64, num_layers=2, num_heads=3, image_size=56)
_TINY_MAX_WIDTH = 256  # widths below this are test models: 16-dim heads (head count is not stored in the weights)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------
def preprocess(images: torch.Tensor, size: int = 384) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, size, size] SigLIP pixel values (float32).

    As Musubi's processor sees the frame: uint8 levels, resized the way PIL's bicubic filter does it (antialiased,
    width first then height, rounded and clipped to uint8 after each pass), then (x/255 - 0.5) / 0.5."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shown = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise invalid("images", shown, "a [B, 3, H, W] tensor in [-1, 1]")
    v = ((images.float() + 1) * 127.5).round().clamp(0, 255)
    for target in ((v.shape[-2], size), (size, size)):
        if tuple(v.shape[-2:]) != target:
            v = F.interpolate(v, size=target, mode="bicubic", align_corners=False, antialias=True)
            v = v.round().clamp(0, 255)
    return v / 127.5 - 1


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------
def siglip_view(ckpt: Checkpoint) -> Checkpoint:
    """transformers-5 `SiglipVisionModel` names (no `vision_model.` prefix, no pooling head); refuses other files."""
    keys = ckpt.weight_keys()
    probes = [k for k in keys if k == _PROBE or k.endswith("." + _PROBE)]
    if not probes:
        hint = foreign_hint(keys, "CLIP vision model", "not a vision model")
        raise invalid(f"image encoder {ckpt.source}", f"keys like {keys[:3]} ({hint})", EXPECTED_FILES)
    prefix = probes[0][: -len(_PROBE)]
    if prefix + "embeddings.class_embedding" in ckpt or prefix + "pre_layrnorm.weight" in ckpt:
        raise invalid(f"image encoder {ckpt.source}", "a CLIP vision model (class token, pre-layernorm)",
                      f"{EXPECTED_FILES} (CLIP vision files such as clip_vision_h are for Wan)")
    skip = prefix + "head."
    return ckpt.renamed(lambda k: k[len(prefix):] if k.startswith(prefix) and not k.startswith(skip) else None)


def infer_siglip_config(view: Checkpoint, hf_config: dict | None = None) -> SiglipConfig:
    """Sizes from the weights' shapes; heads / epsilon / activation from a Hugging Face config when there is one."""
    src = f"image encoder {view.source}"
    need = (_PROBE, "embeddings.position_embedding.weight", "post_layernorm.weight",
            "encoder.layers.0.mlp.fc1.weight", "encoder.layers.0.self_attn.q_proj.weight")
    missing = [k for k in need if k not in view]
    if missing:
        raise invalid(src, f"missing {missing}", EXPECTED_FILES)
    width, _, patch, _ = view.shape(_PROBE)
    positions = view.shape("embeddings.position_embedding.weight")[0]
    grid = round(positions ** 0.5)
    if grid * grid != positions:
        raise invalid(src, f"{positions} position embeddings", "a square patch grid (729 = 27x27 at 384 px)")
    layers = 1 + max(int(k.split(".")[2]) for k in view.keys() if k.startswith("encoder.layers."))
    config = SiglipConfig(hidden_size=width, intermediate_size=view.shape("encoder.layers.0.mlp.fc1.weight")[0],
                          num_layers=layers, patch_size=patch, image_size=grid * patch)
    if hf_config:
        return replace(config, num_heads=int(hf_config.get("num_attention_heads", config.num_heads)),
                       eps=float(hf_config.get("layer_norm_eps", config.eps)),
                       hidden_act=str(hf_config.get("hidden_act", config.hidden_act)))
    if width == SIGLIP_384.hidden_size:
        return config
    if width < _TINY_MAX_WIDTH and width % 16 == 0:
        return replace(config, num_heads=width // 16)
    raise invalid(src, f"width {width}", "SigLIP so400m (width 1152), the image encoder FramePack uses")


def _hf_folder(path: Path) -> tuple[Path, dict]:
    """(weights folder, its config) for a FLUX Redux `image_encoder` folder or its parent."""
    folder = path / "image_encoder" if (path / "image_encoder" / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise invalid("image encoder folder", str(path), f"{EXPECTED_FILES}; no config.json in it or in image_encoder/")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise invalid(f"image encoder config {config_file}", "unreadable", "a JSON SiglipVisionConfig") from e
    config = config.get("vision_config", config)      # a full SiglipModel config nests the vision part
    if config.get("model_type", "siglip_vision_model") not in ("siglip_vision_model", "siglip"):
        raise invalid(f"image encoder config {config_file}", config.get("model_type"), EXPECTED_FILES)
    return folder, config


# --------------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------------
class SiglipImageEncoder:
    """SigLIP last hidden state. `identity` names the weights (for embedding caches)."""

    def __init__(self, model, config: SiglipConfig, identity: str):
        self.model = model.eval().requires_grad_(False)
        self.config = config
        self.identity = identity

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    def to(self, device) -> "SiglipImageEncoder":
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixel values [B, 3, S, S] -> [B, tokens, hidden] (model dtype)."""
        return self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> [B, 729, 1152] (model dtype)."""
        return self.encode_pixels(preprocess(images.to(self.device), self.config.image_size))


def _build(config: SiglipConfig, meta: bool):
    from transformers import SiglipVisionModel

    if meta:
        with torch.device("meta"):
            return SiglipVisionModel(config.to_transformers())
    return SiglipVisionModel(config.to_transformers())


def load_siglip(source: str | Path, dtype: torch.dtype = torch.float16,
                device: torch.device | str = "cpu") -> SiglipImageEncoder:
    """Load from a weight file (ComfyUI layout), a Hugging Face folder, or `preset:tiny-siglip`."""
    if isinstance(source, str) and source.startswith("preset:"):
        if source != PRESET_TINY:
            raise invalid("image encoder preset", source, f"'{PRESET_TINY}'")
        view = siglip_view(Checkpoint.from_state_dict(tiny_siglip_state_dict(), PRESET_TINY))
        config, identity = TINY_SIGLIP, PRESET_TINY
    else:
        path = Path(source)
        hf_config = None
        if path.is_dir():
            path, hf_config = _hf_folder(path)
        view = siglip_view(Checkpoint.open(path))
        config = infer_siglip_config(view, hf_config)
        st = path.stat()
        identity = f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
    model = _build(config, meta=True)
    load_into_module(model, view, dtype=dtype, device=device, strict=True)
    # transformers' non-persistent position ids buffer: in no file
    model.embeddings.register_buffer("position_ids", torch.arange(config.num_tokens, device=device)[None],
                                     persistent=False)
    return SiglipImageEncoder(model, config, identity)


def tiny_siglip_state_dict(seed: int = 0, head: bool = True) -> dict[str, torch.Tensor]:
    """Random tiny SigLIP vision weights in ComfyUI layout (`vision_model.*`, float32, with the pooling head unless
    `head` is False), deterministic per seed."""
    from transformers import SiglipVisionModel

    c = TINY_SIGLIP
    hf = c.to_transformers()
    hf.vision_use_head = head
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SiglipVisionModel(hf).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in sorted(shapes):
        noise = torch.randn(shapes[k], generator=g)
        if "norm" in k:
            t = 1 + 0.1 * noise if k.endswith("weight") else 0.1 * noise
        elif k.endswith("bias"):
            t = 0.02 * noise
        elif len(shapes[k]) >= 2:                       # Linear / Conv / embedding tables: ~ N(0, 1/fan_in)
            t = noise / math.prod(shapes[k][1:]) ** 0.5
        else:
            t = noise * c.hidden_size ** -0.5
        sd[f"vision_model.{k}"] = t
    return sd


__all__ = ["SiglipConfig", "SIGLIP_384", "TINY_SIGLIP", "SiglipImageEncoder", "load_siglip", "preprocess",
           "siglip_view", "infer_siglip_config", "tiny_siglip_state_dict"]
