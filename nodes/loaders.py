"""Loader nodes for Wan 2.1: DiT, VAE, umT5 text encoder, CLIP vision. Files are listed from ComfyUI's own model
folders, first (a combo's first entry is a new node's default: a user's real model, not a test preset); tiny
random-weight presets (real architectures and key names) follow, so graphs also run without any download. Loaded models go through the pack registry: a re-run (or an evicted cache entry) never loads a second
copy."""

from __future__ import annotations

import os

import torch

from . import comfy_compat as compat
from . import types as T
from .registry import MODELS
from ..engine.errors import invalid
from ..engine.handle import ModelHandle

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DIT_PRESETS = ["preset:tiny-t2v", "preset:tiny-i2v", "preset:tiny-flf2v", "preset:tiny-fun-control"]
VAE_PRESETS = ["preset:tiny-vae"]
T5_PRESETS = ["preset:tiny-umt5"]
CLIP_PRESETS = ["preset:tiny-clip"]
ATTENTION = ["sdpa", "flash", "sage", "xformers", "sdpa_split"]


def _choices(presets: list[str], folder: str) -> list[str]:
    return compat.list_model_files(folder) + presets


def resolve_source(name: str, folder: str, field: str) -> str:
    """A preset name stays as it is; a file name becomes its full path in ComfyUI's model folder."""
    if name.startswith("preset:"):
        return name
    path = compat.model_file_path(folder, name)
    if path is None:
        if os.path.isfile(name):
            return name
        raise invalid(field, name, f"a file in ComfyUI's models/{folder} folder(s) {compat.model_folders(folder)} "
                                   "or a preset")
    return path


def owner_of(node, unique_id) -> tuple | None:
    """The registry owner of a loader node: its class and node id (None outside a prompt: no bound applies)."""
    return None if unique_id is None else (type(node).__name__, str(unique_id))


def room_for(source: str, prompt, load):
    """`load`, preceded under RAM pressure by releasing the models of loader nodes that are not in this prompt
    (another workflow's): ComfyUI's RAM-pressure cache cannot free what the registry holds."""
    def create():
        if isinstance(prompt, dict) and not source.startswith("preset:") and os.path.isfile(source):
            keep = {(node.get("class_type"), str(nid)) for nid, node in prompt.items() if isinstance(node, dict)}
            MODELS.make_room(os.path.getsize(source), keep)
        return load()
    return create


def source_identity(source: str) -> tuple:
    if source.startswith("preset:"):
        return (source,)
    st = os.stat(source)
    return (os.path.realpath(source), st.st_size, st.st_mtime_ns)


class MusubiWanDiTLoader:
    DESCRIPTION = ("Load a Wan 2.1 diffusion transformer (T2V 1.3B/14B, I2V, FLF2V, Fun-Control) from "
                   "models/diffusion_models: official or ComfyUI files, bf16/fp16/fp8/scaled fp8. The variant is "
                   "detected from the file. The model stays loaded between runs and serves training and sampling.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded Wan DiT (kept in the pack's memory; train it or sample with it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_choices(DIT_PRESETS, "diffusion_models"), {
                "tooltip": "A Wan 2.1 DiT file from models/diffusion_models, or a tiny built-in preset for tests."}),
            "dtype": (["bf16", "fp16", "fp32", "keep"], {"default": "bf16",
                      "tooltip": "Compute precision of the weights; 'keep' keeps the file's precision (fp8 files are "
                                 "upcast to bf16)."}),
            "attention": (ATTENTION, {"default": "sdpa",
                          "tooltip": "Attention kernel. Missing backends fall back to sdpa with a warning; 'sage' "
                                     "is for sampling only (it has no backward pass)."}),
        }, "optional": {
            "fp8": (["none", "scaled", "e4m3"], {"default": "none",
                    "tooltip": "Store the transformer blocks' linear weights in fp8 (half the memory of bf16): "
                               "'scaled' keeps block-wise scales (more accurate), 'e4m3' is a plain cast. fp8 files "
                               "are used as they are. LoRAs train on top in full precision."}),
            "blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": 39,
                               "tooltip": "Keep this many transformer blocks in CPU memory and stream them to the "
                                          "GPU just before use (at most blocks-1: 39 for 14B, 29 for 1.3B). Saves "
                                          "VRAM at some speed cost; ignored on CPU."}),
            "activation_offload": ("BOOLEAN", {"default": False,
                                   "tooltip": "With gradient checkpointing, keep the checkpointed activations in CPU "
                                              "memory during training (less VRAM, slower)."}),
            "offload_after_use": ("BOOLEAN", {"default": False,
                                  "tooltip": "Move the DiT back to CPU memory after every node that uses it (frees "
                                             "VRAM for other models; slower re-runs). Off: it stays on the GPU "
                                             "until Musubi Unload Models or a node's own offload option."}),
            "offload_non_block_weights": ("BOOLEAN", {"default": False,
                                          "tooltip": "With blocks_to_swap > 0: also keep the embeddings and the "
                                                     "output head in CPU memory, copied to the GPU for each "
                                                     "forward pass (about 0.85 GB less VRAM for 14B, which keeps "
                                                     "its time projection in fp32)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, model_name, dtype, attention, fp8="none", blocks_to_swap=0, activation_offload=False,
             offload_after_use=False, offload_non_block_weights=False, unique_id=None, prompt=None):
        from ..engine.memory import validate_blocks_to_swap
        from ..engine.families.wan.loader import load_wan_dit

        source = resolve_source(model_name, "diffusion_models", "model_name")
        dt = None if dtype == "keep" else DTYPES[dtype]
        fp8_mode = None if fp8 == "none" else fp8
        key = ("wan_dit", source_identity(source), dtype, fp8)
        create = room_for(source, prompt, lambda: load_wan_dit(source, dtype=dt, device="cpu", fp8=fp8_mode))
        model = MODELS.get_or_create(key, create, owner=owner_of(self, unique_id))
        validate_blocks_to_swap(blocks_to_swap, model.config.num_layers, model.config.variant)
        return (ModelHandle.of(model, attention=attention, blocks_to_swap=blocks_to_swap,
                               activation_offload=activation_offload, offload_after_use=offload_after_use,
                               offload_non_blocks=offload_non_block_weights),)


class MusubiWanVAELoader:
    DESCRIPTION = "Load the Wan 2.1 VAE (Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors) from models/vae."
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The loaded Wan VAE.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (_choices(VAE_PRESETS, "vae"), {"tooltip": "A Wan 2.1 VAE file from models/vae, or the tiny preset."}),
            "dtype": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "Precision of the VAE weights."}),
            "cache_on_cpu": ("BOOLEAN", {"default": False,
                             "tooltip": "Keep the VAE's temporal feature caches in CPU memory (less VRAM, slower)."}),
        }, "optional": {
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, vae_name, dtype, cache_on_cpu, keep_on_gpu=False, unique_id=None, prompt=None):
        from ..engine.families.wan.vae import load_wan_vae

        source = resolve_source(vae_name, "vae", "vae_name")
        key = ("wan_vae", source_identity(source), dtype)
        def load():
            vae = load_wan_vae(source, dtype=DTYPES[dtype], device="cpu")
            vae.identity = ":".join(map(str, key[1]))   # names the weights in latent caches
            return vae

        vae = MODELS.get_or_create(key, room_for(source, prompt, load), owner=owner_of(self, unique_id))
        return (ModelHandle.of(vae, keep_on_gpu=keep_on_gpu, cache_on_cpu=bool(cache_on_cpu)),)


class MusubiUMT5Loader:
    DESCRIPTION = ("Load the umT5-XXL text encoder from models/text_encoders: the official "
                   "models_t5_umt5-xxl-enc-bf16.pth or ComfyUI's umt5_xxl fp16 / fp8 scaled safetensors. The "
                   "tokenizer comes from the file itself or from the given path, never from the internet.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The loaded umT5 text encoder with its tokenizer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (_choices(T5_PRESETS, "text_encoders"), {
                "tooltip": "A umT5-XXL file from models/text_encoders, or the tiny preset."}),
            "dtype": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "Precision of the encoder weights."}),
        }, "optional": {
            "tokenizer_path": ("STRING", {"default": "",
                               "tooltip": "Optional: a folder with spiece.model/tokenizer.json, or a .model file. "
                                          "Empty: use the tokenizer embedded in the weight file."}),
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, text_encoder_name, dtype, tokenizer_path="", keep_on_gpu=False, unique_id=None,
             prompt=None):
        from ..engine.encoders.umt5 import load_umt5

        source = resolve_source(text_encoder_name, "text_encoders", "text_encoder_name")
        tok = tokenizer_path.strip() or None
        key = ("umt5", source_identity(source), dtype, tok)
        create = room_for(source, prompt, lambda: load_umt5(source, dtype=DTYPES[dtype], device="cpu",
                                                            tokenizer_path=tok))
        enc = MODELS.get_or_create(key, create, owner=owner_of(self, unique_id))
        return (ModelHandle.of(enc, keep_on_gpu=keep_on_gpu),)


class MusubiClipVisionLoader:
    DESCRIPTION = ("Load the CLIP ViT-H/14 image encoder used by Wan I2V/FLF2V from models/clip_vision "
                   "(ComfyUI's clip_vision_h.safetensors or the official open-clip .pth).")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The loaded CLIP vision encoder.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (_choices(CLIP_PRESETS, "clip_vision"), {
                "tooltip": "A CLIP ViT-H/14 file from models/clip_vision, or the tiny preset."}),
            "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16", "tooltip": "Precision (Wan runs CLIP in fp16)."}),
        }, "optional": {
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, clip_name, dtype, keep_on_gpu=False, unique_id=None, prompt=None):
        from ..engine.encoders.clip_vision import load_clip_vision

        source = resolve_source(clip_name, "clip_vision", "clip_name")
        key = ("clip_vision", source_identity(source), dtype)
        create = room_for(source, prompt, lambda: load_clip_vision(source, dtype=DTYPES[dtype], device="cpu"))
        clip = MODELS.get_or_create(key, create, owner=owner_of(self, unique_id))
        return (ModelHandle.of(clip, keep_on_gpu=keep_on_gpu),)


NODE_CLASS_MAPPINGS = {
    "MusubiWanDiTLoader": MusubiWanDiTLoader,
    "MusubiWanVAELoader": MusubiWanVAELoader,
    "MusubiUMT5Loader": MusubiUMT5Loader,
    "MusubiClipVisionLoader": MusubiClipVisionLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiWanDiTLoader": "Musubi Wan DiT Loader",
    "MusubiWanVAELoader": "Musubi Wan VAE Loader",
    "MusubiUMT5Loader": "Musubi umT5 Text Encoder Loader",
    "MusubiClipVisionLoader": "Musubi CLIP Vision Loader",
}
