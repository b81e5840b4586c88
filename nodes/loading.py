"""What every family's loader nodes share: model file choices, file identity, and the pack's model registry.

Files are listed from ComfyUI's own model folders; tiny random-weight presets (real architectures and key names)
follow, so graphs also run without any download. Loaded models go through the pack registry (nodes/registry.py): a
re-run (or an evicted cache entry) never loads a second copy.
"""

from __future__ import annotations

import os

import torch

from . import comfy_compat as compat
from .registry import MODELS
from ..engine import demo
from ..engine.errors import invalid

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_choices(presets: list[str], folder: str) -> list[str]:
    """Files of ComfyUI's model folder first (a combo's first entry is a new node's default: a user's real model,
    not a test preset), then the built-in ones: trained demo models ("demo:…", those shipped), then the tiny random
    presets."""
    shipped = [p for p in presets if not p.startswith(demo.PREFIX) or demo.is_shipped(p)]
    return compat.list_model_files(folder) + shipped


def resolve_source(name: str, folder: str, field: str) -> str:
    """A preset name stays as it is; a demo model or a file name becomes its full path (a model folder's file)."""
    if name.startswith("preset:"):
        return name
    if name.startswith(demo.PREFIX):
        return str(demo.model_path(name))
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


# --- what every family's DiT loader shares: the attention kernel, the memory options, the registry key -------------
ATTENTION = ["sdpa", "flash", "sage", "xformers", "sdpa_split"]
DIT_DTYPE_INPUT = (["bf16", "fp16", "fp32", "keep"], {"default": "bf16",
                   "tooltip": "Compute precision of the weights; 'keep' keeps the file's precision (fp8 files are "
                              "upcast to bf16)."})
ATTENTION_INPUT = (ATTENTION, {"default": "sdpa",
                   "tooltip": "Attention kernel. Missing backends fall back to sdpa with a warning; 'sage' "
                              "is for sampling only (it has no backward pass)."})


def dit_memory_inputs(max_blocks_to_swap: int, blocks_hint: str, non_block_hint: str) -> dict:
    """The optional memory inputs of a DiT loader node (fp8, block swap, offloads, compile, fp8 matmul).
    `blocks_hint`: the most blocks one may swap per model size; `non_block_hint`: what non-block offload saves."""
    return {
        "fp8": (["none", "scaled", "e4m3"], {"default": "none",
                "tooltip": "Store the transformer blocks' linear weights in fp8 (half the memory of bf16): "
                           "'scaled' keeps block-wise scales (more accurate), 'e4m3' is a plain cast. fp8 files "
                           "are used as they are. LoRAs train on top in full precision."}),
        "blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": max_blocks_to_swap,
                           "tooltip": "Keep this many transformer blocks in CPU memory and stream them to the "
                                      f"GPU just before use (at most blocks-1: {blocks_hint}). Saves "
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
                                                 f"forward pass ({non_block_hint})."}),
        "compile_blocks": ("BOOLEAN", {"default": False,
                           "tooltip": "torch.compile each transformer block (Musubi --compile): faster steps "
                                      "after a first slow one; needs triton on the GPU. A block that fails to "
                                      "compile runs as usual, with a warning."}),
        "fp8_matmul": ("BOOLEAN", {"default": False,
                       "tooltip": "With fp8 weights: multiply in fp8 (Musubi --fp8_fast) when sampling on GPUs "
                                  "that support it (RTX 40xx, H100 and newer); faster, slightly less exact. "
                                  "Block-wise scales become per-row scales. Training is unaffected."}),
        "fp8_scale_dtype": (["float32", "bf16"], {"default": "float32",
                            "tooltip": "With fp8 weights: precision of their scales. bf16 halves the scales' memory "
                                       "(about 0.44 GB for Wan 14B) for a rounding of each scale (≤ 0.4 %)."}),
    }


def load_dit(node, unique_id, prompt, kind: str, source: str, dtype: str, fp8: str, fp8_matmul: bool, loader,
             fp8_scale_dtype: str = "float32"):
    """A DiT through the pack registry: `loader(source, dtype=torch dtype or None, device="cpu", fp8=None|mode)` runs
    once per (kind, file, dtype, fp8, fp8_matmul, scale dtype); fp8_matmul or bf16 scales without fp8 weights are
    refused naming the input."""
    from ..engine.memory import enable_fp8_matmul
    from ..engine.memory.fp8 import set_fp8_scale_dtype

    if fp8_scale_dtype not in ("float32", "bf16"):
        raise invalid("fp8_scale_dtype", fp8_scale_dtype, "float32 or bf16")

    dt = None if dtype == "keep" else DTYPES[dtype]
    fp8_mode = None if fp8 == "none" else fp8

    def load():
        model = loader(source, dtype=dt, device="cpu", fp8=fp8_mode)
        if fp8_matmul and not enable_fp8_matmul(model) and not _has_fp8_layers(model):
            raise invalid("fp8_matmul", True, "fp8 weights: fp8 'scaled' or 'e4m3', or an fp8 file")
        if fp8_scale_dtype == "bf16" and not set_fp8_scale_dtype(model, torch.bfloat16) \
                and not _has_fp8_layers(model):
            raise invalid("fp8_scale_dtype", "bf16", "fp8 weights: fp8 'scaled' or 'e4m3', or an fp8 file")
        return model

    # fp8 matmul requantizes block-wise scales, bf16 scales round them: a copy of its own, never the plain one's
    key = (kind, source_identity(source), dtype, fp8) + (("fp8_matmul",) if fp8_matmul else ()) \
        + (("bf16_scales",) if fp8_scale_dtype == "bf16" else ())
    return MODELS.get_or_create(key, room_for(source, prompt, load), owner=owner_of(node, unique_id))


def dit_handle(model, attention: str, blocks_to_swap: int, activation_offload: bool, offload_after_use: bool,
               offload_non_block_weights: bool, compile_blocks: bool):
    """The DiT socket value: the shared module with this loader node's run options (blocks_to_swap checked against
    every block list of the model)."""
    from ..engine.families import blocks_of
    from ..engine.handle import ModelHandle
    from ..engine.memory import validate_blocks_to_swap

    validate_blocks_to_swap(blocks_to_swap, len(blocks_of(model)), model.config.variant)
    return ModelHandle.of(model, attention=attention, blocks_to_swap=blocks_to_swap,
                          activation_offload=activation_offload, offload_after_use=offload_after_use,
                          offload_non_blocks=offload_non_block_weights, compile=bool(compile_blocks))


def _has_fp8_layers(model) -> bool:
    from ..engine.memory.fp8 import Fp8Linear

    return any(isinstance(m, Fp8Linear) for m in model.modules())
