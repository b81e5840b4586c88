"""FramePack module names in other tools' spellings. Canonical names are the checkpoint's, which are diffusers'
(`transformer_blocks.0.attn.to_q`); Musubi's kohya underscore names (`lora_unet_transformer_blocks_0_attn_to_q`)
resolve without a model through the table below (the leaves have underscores of their own: `to_q`, `add_q_proj`).

Diffusers-spelled names are not claimed: without a model they are HunyuanVideo's (its diffusers LoRAs use the very
same names, with q/k/v as pieces of its fused layers), so a FramePack LoRA in diffusers / ComfyUI spelling reads as a
HunyuanVideo one. Converting those (and real HunyuanVideo LoRAs) for a FramePack model, as Musubi does on load, is
still to be written; Musubi-format FramePack LoRAs (what the pack's trainer and Musubi save) resolve directly."""

from __future__ import annotations

import re

# Musubi (networks/lora_framepack.py): Linear layers inside HunyuanVideoTransformerBlock /
# HunyuanVideoSingleTransformerBlock, minus anything named `norm` (the AdaLayerNorm modulations).
DEFAULT_EXCLUDE = r".*(norm).*"
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")

_DOUBLE_LEAVES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                  "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                  "ff_context.net.2", "norm1.linear", "norm1_context.linear")
_SINGLE_LEAVES = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
_LEAVES = {"transformer_blocks": {leaf.replace(".", "_"): leaf for leaf in _DOUBLE_LEAVES},
           "single_transformer_blocks": {leaf.replace(".", "_"): leaf for leaf in _SINGLE_LEAVES}}
_UNDERSCORE = re.compile(r"^(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)$")
BLOCK_RE = re.compile(r"^(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$")


def underscore_to_name(name: str) -> str | None:
    m = _UNDERSCORE.match(name)
    if m is None:
        return None
    leaf = _LEAVES[m[1]].get(m[3])
    return None if leaf is None else f"{m[1]}.{m[2]}.{leaf}"


def name_to_diffusers(name: str) -> str | None:
    """A canonical name inside the blocks is the diffusers name (saving in the diffusers / ComfyUI dialects)."""
    m = BLOCK_RE.match(name)
    return name if m and m[3] in (_DOUBLE_LEAVES if m[1] == "transformer_blocks" else _SINGLE_LEAVES) else None
