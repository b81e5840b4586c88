"""Wan module names in other tools' spellings: kohya underscore names without a model, and diffusers
(`WanTransformer3DModel`) names. Canonical names are the official Wan ones (`blocks.0.self_attn.q`), which are also
ComfyUI's native names.
"""

from __future__ import annotations

import re

# Musubi (networks/lora_wan.py): Linear layers inside WanAttentionBlock, minus this exclusion.
DEFAULT_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"
BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")

# Without a model, the known Wan 2.1 layout resolves underscore names (order matters: k_img before k).
_UNDERSCORE = [
    (re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(k_img|v_img|norm_k_img|norm_q|norm_k|q|k|v|o)$"),
     lambda m: f"blocks.{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(r"^blocks_(\d+)_ffn_(\d+)$"), lambda m: f"blocks.{m[1]}.ffn.{m[2]}"),
    (re.compile(r"^blocks_(\d+)_(norm\d|modulation)$"), lambda m: f"blocks.{m[1]}.{m[2]}"),
    (re.compile(r"^(text_embedding|time_embedding|time_projection)_(\d+)$"), lambda m: f"{m[1]}.{m[2]}"),
    (re.compile(r"^head_(head|modulation|norm)$"), lambda m: f"head.{m[1]}"),
    (re.compile(r"^img_emb_proj_(\d+)$"), lambda m: f"img_emb.proj.{m[1]}"),
]


def underscore_to_name(name: str) -> str | None:
    for pattern, build in _UNDERSCORE:
        m = pattern.match(name)
        if m:
            return build(m)
    return None


# Checked against diffusers 0.42 transformer_wan.py: WanTransformerBlock.attn1/attn2 (WanAttention: to_q, to_k, to_v,
# to_out.0, add_k_proj, add_v_proj), ffn = FeedForward (net.0 = GELU with .proj, net.2 = Linear); the condition
# embedder uses TimestepEmbedding / PixArtAlphaTextProjection (linear_1, linear_2) and time_proj; proj_out = head.head.
_BLOCK_FROM_DIFFUSERS = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o", "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_GLOBAL_FROM_DIFFUSERS = {
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "proj_out": "head.head",
}
_BLOCK_TO_DIFFUSERS = {v: k for k, v in _BLOCK_FROM_DIFFUSERS.items()}
_GLOBAL_TO_DIFFUSERS = {v: k for k, v in _GLOBAL_FROM_DIFFUSERS.items()}
DIFFUSERS_MARKER = r"(^|\.)(attn1|attn2|ffn\.net|condition_embedder|proj_out)(\.|$)"


def diffusers_to_name(name: str) -> str | None:
    m = BLOCK_RE.match(name)
    if m:
        rest = _BLOCK_FROM_DIFFUSERS.get(name[m.end():])
        return f"blocks.{m[1]}.{rest}" if rest else None
    return _GLOBAL_FROM_DIFFUSERS.get(name)


def name_to_diffusers(name: str) -> str | None:
    m = BLOCK_RE.match(name)
    if m:
        rest = _BLOCK_TO_DIFFUSERS.get(name[m.end():])
        return f"blocks.{m[1]}.{rest}" if rest else None
    return _GLOBAL_TO_DIFFUSERS.get(name)
