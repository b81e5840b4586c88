"""Name what a weight file or a LoRA holds, from its key names, for refusal messages ("this looks like a VAE",
"a Flux LoRA"): one place, shared by every loader and the LoRA reader, so a wrong file is described the same way.
"""

from __future__ import annotations

import re
from typing import Iterable

# (kind, substrings of which any one marks it); checked in this order
_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CLIP vision model", ("vision_model.", "visual.transformer")),
    ("T5 text encoder", ("SelfAttention", "token_embedding", "shared.weight")),
    ("diffusion model (DiT)", ("cross_attn",)),
    ("VAE", ("decoder.conv", "encoder.conv1")),
    ("CLIP text encoder", ("text_model.",)),
)


def foreign_hint(keys: list[str], expected: str, otherwise: str | None = None) -> str:
    """'this looks like a <kind>' for the first kind (other than `expected`) whose markers occur in `keys`;
    `otherwise` (default 'not a <expected>') when none does."""
    joined = " ".join(keys[:2000])
    for kind, markers in _MARKERS:
        if kind != expected and any(m in joined for m in markers):
            return f"this looks like a {kind}"
    return otherwise or f"not a {expected}"


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
