"""Name what a weight file or a LoRA holds, from its key names, for refusal messages ("this looks like a VAE",
"a Flux LoRA"): one place, shared by every loader and the LoRA reader, so a wrong file is described the same way.
"""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import invalid

def _has(keys: list[str], *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def _prefix(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


# What a weight file holds, from its key names: (kind, test, description, where it belongs). Checked in this order;
# a loader skips its own kind. A family's detection adds what only it knows (e.g. its own diffusers layout) first.
_FILE_KINDS = (
    ("CLIP vision model", lambda ks: _has(ks, "vision_model.", "visual.transformer") or _prefix(ks, "log_scale",
                                                                                               "textual."),
     "a CLIP vision model (keys like 'visual.' / 'vision_model.')", "load it with a CLIP vision loader"),
    # before T5: CLIP text embeddings are named `token_embedding` too
    ("CLIP text encoder", lambda ks: _has(ks, "text_model."),
     "a CLIP text encoder (keys like 'text_model.')", "load it with a text encoder loader"),
    ("LLaMA text encoder", lambda ks: _has(ks, "mlp.gate_proj.", "mlp.up_proj."),
     "a LLaMA-style language model (keys like 'model.layers.0.mlp.gate_proj')", "load it with a text encoder loader"),
    ("T5 text encoder", lambda ks: _has(ks, "SelfAttention", "token_embedding") or _prefix(ks, "shared.weight")
     or any(re.match(r"(encoder\.)?blocks\.0\.attn\.q\.weight", k) for k in ks),
     "a T5 text encoder (keys like 'token_embedding' / 'encoder.block.')", "load it with a text encoder loader"),
    ("VAE", lambda ks: _has(ks, "decoder.conv", "encoder.conv1") or (_prefix(ks, "decoder.") and
                                                                     _prefix(ks, "encoder.")),
     "a VAE (keys like 'encoder.conv1', 'decoder.')", "load it with a VAE loader"),
    ("HunyuanVideo or Flux DiT", lambda ks: _prefix(ks, "double_blocks.", "single_blocks.",
                                                    "txt_in.individual_token_refiner"),
     "a HunyuanVideo or Flux DiT (keys like 'double_blocks.')",
     "load a HunyuanVideo / SkyReels V1 DiT with the HunyuanVideo DiT loader (Flux DiTs are not supported)"),
    ("diffusers-layout DiT", lambda ks: _prefix(ks, "transformer_blocks.", "single_transformer_blocks.", "x_embedder."),
     "a diffusers-layout DiT (FramePack, HunyuanVideo, Flux, SD3; keys like 'transformer_blocks.')",
     "use the loader of that model family"),
    ("Stable Diffusion model", lambda ks: _prefix(ks, "input_blocks.", "joint_blocks.", "down_blocks.",
                                                  "first_stage_model."),
     "a Stable Diffusion model (keys like 'input_blocks.' / 'joint_blocks.')", "a file of a family this pack loads"),
    ("diffusion model (DiT)", lambda ks: _has(ks, "cross_attn"),
     "a diffusion model (DiT; keys like 'blocks.0.cross_attn')", "load it with a DiT loader"),
)


def identify_file(keys: list[str], expected: str) -> tuple[str, str, str] | None:
    """(kind, description, where it belongs) of the first kind other than `expected` whose keys these are."""
    keys = keys[:2000]
    for kind, test, description, hint in _FILE_KINDS:
        if kind != expected and test(keys):
            return kind, description, hint
    return None


def foreign_hint(keys: list[str], expected: str, otherwise: str | None = None) -> str:
    """'this looks like a <kind>' for a file that is not the `expected` kind; `otherwise` (default 'not a
    <expected>') when no kind matches."""
    found = identify_file(keys, expected)
    return f"this looks like a {found[0]}" if found else (otherwise or f"not a {expected}")


# LoRA module-name layouts of models that are not the one a LoRA is applied to (checked in this order).
_LORA_LAYOUTS = [
    ("HunyuanVideo or Flux", re.compile(r"(double_blocks|single_blocks|txt_in|img_in)")),
    ("FramePack/HunyuanVideo (diffusers names)", re.compile(r"(transformer_blocks|single_transformer_blocks)")),
    ("Stable Diffusion / SDXL", re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|mid_block|^te\d?_|"
                                           r"lora_te\d?_|text_model)")),
]


def foreign_lora_layout(names: Iterable[str]) -> tuple[str, str] | None:
    """(model family, example name) when a LoRA module name has another family's layout."""
    for name in names:
        for family, pattern in _LORA_LAYOUTS:
            if pattern.search(name):
                return family, name
    return None


def count_blocks(keys: Iterable[str], prefix: str, source: str, expected: str) -> int:
    """Number of `<prefix>N.` blocks among a checkpoint's keys (0 when none); a gap means a missing shard or a
    truncated conversion and is refused, naming `source` and the `expected` model."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if not indices:
        return 0
    n = max(indices) + 1
    missing = sorted(set(range(n)) - indices)
    if missing:
        raise invalid(source, f"{prefix}{missing[:5]} missing out of {n}", f"a complete {expected} (is a shard "
                                                                            "missing?)")
    return n

