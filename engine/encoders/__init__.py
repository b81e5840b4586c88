"""Frozen conditioning encoders (transformers models): umT5-XXL text encoder and CLIP ViT-H/14 image encoder (Wan),
LLaVA-LLaMA-3 and CLIP-L text encoders (HunyuanVideo), SigLIP image encoder (FramePack)."""

from .clip_text import ClipTextEncoder, load_clip_text
from .clip_vision import ClipVisionEncoder, load_clip_vision
from .llava_llama import LlavaLlamaTextEncoder, load_llava_llama
from .siglip import SiglipImageEncoder, load_siglip
from .umt5 import UMT5TextEncoder, load_umt5

__all__ = ["UMT5TextEncoder", "load_umt5", "ClipVisionEncoder", "load_clip_vision", "LlavaLlamaTextEncoder",
           "load_llava_llama", "ClipTextEncoder", "load_clip_text", "SiglipImageEncoder", "load_siglip"]
