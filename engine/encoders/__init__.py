"""Frozen conditioning encoders: umT5-XXL text encoder and CLIP ViT-H/14 image encoder (transformers models)."""

from .clip_vision import ClipVisionEncoder, load_clip_vision
from .umt5 import UMT5TextEncoder, load_umt5

__all__ = ["UMT5TextEncoder", "load_umt5", "ClipVisionEncoder", "load_clip_vision"]
