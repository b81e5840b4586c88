"""Which Wan modules a LoRA targets, and how their names are spelled in each LoRA dialect.

The canonical name of a target is the official Wan module path (`blocks.0.self_attn.q`), which is also
ComfyUI's native name. Every dialect is translated to and from that name here, nowhere else.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

# Musubi (networks/lora_wan.py): Linear layers inside WanAttentionBlock, minus this exclusion (§5.1).
WAN_DEFAULT_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"
WAN_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")

MUSUBI_PREFIX = "lora_unet_"
COMFY_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."


def select_targets(model: nn.Module, include: Iterable[str] = (), exclude: Iterable[str] = (),
                   default_exclude: bool = True) -> list[str]:
    """Names of the Linear modules inside `model.blocks` that an adapter wraps, in model order.

    Musubi's semantics: regexes are full-matched against the dotted name; exclusion first (user patterns plus the
    architecture default), then `include` re-admits excluded modules (it does not restrict on its own)."""
    excludes = [re.compile(p) for p in exclude]
    if default_exclude:
        excludes.append(re.compile(WAN_DEFAULT_EXCLUDE))
    includes = [re.compile(p) for p in include]
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not WAN_BLOCK_RE.match(name):
            continue
        excluded = any(p.fullmatch(name) for p in excludes)
        if excluded and any(p.fullmatch(name) for p in includes):
            excluded = False
        if not excluded:
            names.append(name)
    return names


def block_index(module_name: str) -> int | None:
    m = WAN_BLOCK_RE.match(module_name)
    return int(m.group(1)) if m else None


# --- musubi / kohya underscore names -------------------------------------------------------------------------------

def musubi_stem(module_name: str) -> str:
    """`blocks.0.self_attn.q` -> `lora_unet_blocks_0_self_attn_q`."""
    return MUSUBI_PREFIX + module_name.replace(".", "_")


def underscore_map(module_names: Iterable[str]) -> dict[str, str]:
    """`blocks_0_self_attn_q` -> `blocks.0.self_attn.q` for the modules a model really has (no guessing)."""
    return {n.replace(".", "_"): n for n in module_names if n}


# Without a model, the known Wan 2.1 layout resolves underscore names (order matters: k_img before k).
_WAN_UNDERSCORE = [
    (re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(k_img|v_img|norm_k_img|norm_q|norm_k|q|k|v|o)$"),
     lambda m: f"blocks.{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(r"^blocks_(\d+)_ffn_(\d+)$"), lambda m: f"blocks.{m[1]}.ffn.{m[2]}"),
    (re.compile(r"^blocks_(\d+)_(norm\d|modulation)$"), lambda m: f"blocks.{m[1]}.{m[2]}"),
    (re.compile(r"^(text_embedding|time_embedding|time_projection)_(\d+)$"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^head_(head|modulation|norm)$"), lambda m: f"head.{m[1]}"),
    (re.compile(r"^img_emb_proj_(\d+)$"), lambda m: f"img_emb.proj.{m[1]}"),
]


def resolve_underscore(name: str, known: dict[str, str] | None) -> str | None:
    """An underscore module name (prefix removed) -> dotted official name, or None when unknown."""
    if known is not None:
        return known.get(name)
    for pattern, build in _WAN_UNDERSCORE:
        m = pattern.match(name)
        if m:
            return build(m)
    return None


# --- diffusers (WanTransformer3DModel) names -------------------------------------------------------------------------
# Checked against diffusers 0.42 transformer_wan.py: WanTransformerBlock.attn1/attn2 (WanAttention: to_q, to_k, to_v,
# to_out.0, add_k_proj, add_v_proj), ffn = FeedForward (net.0 = GELU with .proj, net.2 = Linear); the condition
# embedder uses TimestepEmbedding / PixArtAlphaTextProjection (linear_1, linear_2) and time_proj; proj_out = head.head.
_BLOCK_DIFFUSERS_TO_OFFICIAL = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_GLOBAL_DIFFUSERS_TO_OFFICIAL = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
_BLOCK_OFFICIAL_TO_DIFFUSERS = {v: k for k, v in _BLOCK_DIFFUSERS_TO_OFFICIAL.items()}
_GLOBAL_OFFICIAL_TO_DIFFUSERS = {v: k for k, v in _GLOBAL_DIFFUSERS_TO_OFFICIAL.items()}
_DIFFUSERS_MARKERS = re.compile(r"(^|\.)(attn1|attn2|ffn\.net|condition_embedder|proj_out)(\.|$)")


def looks_diffusers(name: str) -> bool:
    return bool(_DIFFUSERS_MARKERS.search(name))


def diffusers_to_official(name: str) -> str | None:
    m = WAN_BLOCK_RE.match(name)
    if m:
        rest = _BLOCK_DIFFUSERS_TO_OFFICIAL.get(name[m.end():])
        return f"blocks.{m[1]}.{rest}" if rest else None
    return _GLOBAL_DIFFUSERS_TO_OFFICIAL.get(name)


def official_to_diffusers(name: str) -> str | None:
    m = WAN_BLOCK_RE.match(name)
    if m:
        rest = _BLOCK_OFFICIAL_TO_DIFFUSERS.get(name[m.end():])
        return f"blocks.{m[1]}.{rest}" if rest else None
    return _GLOBAL_OFFICIAL_TO_DIFFUSERS.get(name)


# --- other families (refused with a clear message) ------------------------------------------------------------------
_FAMILY_MARKERS = [
    ("HunyuanVideo or Flux", re.compile(r"(double_blocks|single_blocks|txt_in|img_in)")),
    ("FramePack/HunyuanVideo (diffusers names)", re.compile(r"(transformer_blocks|single_transformer_blocks)")),
    ("Stable Diffusion / SDXL", re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|mid_block|^te\d?_|"
                                           r"lora_te\d?_|text_model)")),
]


def foreign_family(names: Iterable[str]) -> tuple[str, str] | None:
    """(family, example name) if a module name belongs to a non-Wan model family."""
    for name in names:
        for family, pattern in _FAMILY_MARKERS:
            if pattern.search(name):
                return family, name
    return None
