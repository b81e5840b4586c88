"""HunyuanVideo module names in other tools' spellings: kohya underscore names without a model (Musubi's
`lora_unet_double_blocks_0_img_attn_qkv`), and diffusers (`HunyuanVideoTransformer3DModel`) names. Canonical names
are the official ones (`double_blocks.0.img_attn_qkv`), which ComfyUI's repackaged files also use.

diffusers splits the fused Linears (`img_attn_qkv` -> attn.to_q/to_k/to_v, `txt_attn_qkv` -> attn.add_q/k/v_proj,
`single_blocks.N.linear1` -> attn.to_q/to_k/to_v + proj_mlp), so those pieces have no one-to-one name:
`diffusers_to_name` returns None for them (a diffusers LoRA on them needs its pieces fused, see `FUSED_PIECES`).
Nor is `norm_out.linear` mapped: its rows are (scale, shift) where `final_layer.adaLN_modulation.1` has (shift, scale).
"""

from __future__ import annotations

import re

# Musubi (networks/lora.py, HUNYUAN_TARGET_REPLACE_MODULES): Linear layers inside MMDoubleStreamBlock /
# MMSingleStreamBlock; its architecture auto-detection excludes the modulation layers.
DEFAULT_EXCLUDE = r".*(img_mod|txt_mod|modulation).*"
BLOCK_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.")

# Without a model, the known layout resolves underscore names (order matters: the most specific first).
_UNDERSCORE = [
    (re.compile(r"^double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj)$"),
     lambda m: f"double_blocks.{m[1]}.{m[2]}_{m[3]}"),
    (re.compile(r"^double_blocks_(\d+)_(img|txt)_mod_linear$"), lambda m: f"double_blocks.{m[1]}.{m[2]}_mod.linear"),
    (re.compile(r"^double_blocks_(\d+)_(img|txt)_mlp_(fc1|fc2)$"),
     lambda m: f"double_blocks.{m[1]}.{m[2]}_mlp.{m[3]}"),
    (re.compile(r"^single_blocks_(\d+)_(linear1|linear2)$"), lambda m: f"single_blocks.{m[1]}.{m[2]}"),
    (re.compile(r"^single_blocks_(\d+)_modulation_linear$"), lambda m: f"single_blocks.{m[1]}.modulation.linear"),
    (re.compile(r"^txt_in_individual_token_refiner_blocks_(\d+)_(self_attn_qkv|self_attn_proj)$"),
     lambda m: f"txt_in.individual_token_refiner.blocks.{m[1]}.{m[2]}"),
    (re.compile(r"^txt_in_individual_token_refiner_blocks_(\d+)_mlp_(fc1|fc2)$"),
     lambda m: f"txt_in.individual_token_refiner.blocks.{m[1]}.mlp.{m[2]}"),
    (re.compile(r"^txt_in_individual_token_refiner_blocks_(\d+)_adaLN_modulation_1$"),
     lambda m: f"txt_in.individual_token_refiner.blocks.{m[1]}.adaLN_modulation.1"),
    (re.compile(r"^txt_in_t_embedder_mlp_(0|2)$"), lambda m: f"txt_in.t_embedder.mlp.{m[1]}"),
    (re.compile(r"^txt_in_c_embedder_linear_(1|2)$"), lambda m: f"txt_in.c_embedder.linear_{m[1]}"),
    (re.compile(r"^txt_in_input_embedder$"), lambda m: "txt_in.input_embedder"),
    (re.compile(r"^(time_in|guidance_in)_mlp_(0|2)$"), lambda m: f"{m[1]}.mlp.{m[2]}"),
    (re.compile(r"^vector_in_(in_layer|out_layer)$"), lambda m: f"vector_in.{m[1]}"),
    (re.compile(r"^img_in_proj$"), lambda m: "img_in.proj"),
    (re.compile(r"^final_layer_(linear|adaLN_modulation_1)$"),
     lambda m: "final_layer." + ("linear" if m[1] == "linear" else "adaLN_modulation.1")),
]


def underscore_to_name(name: str) -> str | None:
    for pattern, build in _UNDERSCORE:
        m = pattern.match(name)
        if m:
            return build(m)
    return None


# Checked against diffusers 0.42 transformer_hunyuan_video.py: HunyuanVideoTransformerBlock (norm1 / norm1_context =
# AdaLayerNormZero with .linear, attn.to_out.0 / attn.to_add_out, ff / ff_context = FeedForward net.0.proj, net.2)
# and HunyuanVideoSingleTransformerBlock (norm.linear, proj_out). One-to-one modules only.
_DOUBLE_FROM_DIFFUSERS = {
    "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
    "attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj",
    "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2",
    "ff_context.net.0.proj": "txt_mlp.fc1", "ff_context.net.2": "txt_mlp.fc2",
}
_SINGLE_FROM_DIFFUSERS = {"norm.linear": "modulation.linear", "proj_out": "linear2"}
_GLOBAL_FROM_DIFFUSERS = {
    "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "context_embedder.proj_in": "txt_in.input_embedder",
    "proj_out": "final_layer.linear",
}
# fused official module -> its diffusers pieces, in row order (q, k, v [, MLP input])
FUSED_PIECES = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}
MLP_RATIO = 4   # rows of linear1's MLP part per input feature (q, k and v have one each)
_LISTS = {"transformer_blocks": ("double_blocks", _DOUBLE_FROM_DIFFUSERS),
          "single_transformer_blocks": ("single_blocks", _SINGLE_FROM_DIFFUSERS)}
_DIFFUSERS_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
DIFFUSERS_MARKER = r"(^|\.)(transformer_blocks|single_transformer_blocks|x_embedder|time_text_embed|context_embedder)\."


def diffusers_to_name(name: str) -> str | None:
    m = _DIFFUSERS_BLOCK_RE.match(name)
    if m:
        official, table = _LISTS[m[1]]
        rest = table.get(m[3])
        return f"{official}.{m[2]}.{rest}" if rest else None
    return _GLOBAL_FROM_DIFFUSERS.get(name)


_DOUBLE_TO = {v: k for k, v in _DOUBLE_FROM_DIFFUSERS.items()}
_SINGLE_TO = {v: k for k, v in _SINGLE_FROM_DIFFUSERS.items()}
_GLOBAL_TO = {v: k for k, v in _GLOBAL_FROM_DIFFUSERS.items()}


def name_to_diffusers(name: str) -> str | None:
    """None for the fused modules (no single diffusers module) and for modules diffusers does not have."""
    m = BLOCK_RE.match(name)
    if m:
        table = _DOUBLE_TO if m[1] == "double_blocks" else _SINGLE_TO
        rest = table.get(name[m.end():])
        return f"{'transformer_blocks' if m[1] == 'double_blocks' else 'single_transformer_blocks'}.{m[2]}.{rest}" \
            if rest else None
    return _GLOBAL_TO.get(name)


def fused_to_diffusers(name: str) -> tuple[tuple[str, int], ...] | None:
    """`single_blocks.3.linear1` -> ((`single_transformer_blocks.3.attn.to_q`, 1), ..., (`….proj_mlp`, 4)): the
    diffusers pieces of a fused layer in row order, each with its rows per input feature; None if not fused."""
    m = BLOCK_RE.match(name)
    pieces = FUSED_PIECES.get(name[m.end():]) if m else None
    if pieces is None or (m[1] == "double_blocks") != (name[m.end():] != "linear1"):
        return None
    stem = f"{'transformer_blocks' if m[1] == 'double_blocks' else 'single_transformer_blocks'}.{m[2]}."
    return tuple((stem + piece, MLP_RATIO if piece == "proj_mlp" else 1) for piece in pieces)


def diffusers_to_fused(name: str) -> tuple[str, int] | None:
    """`transformer_blocks.3.attn.add_k_proj` -> (`double_blocks.3.txt_attn_qkv`, 1); None for other names."""
    m = _DIFFUSERS_BLOCK_RE.match(name)
    if not m:
        return None
    fused = ("img_attn_qkv", "txt_attn_qkv") if m[1] == "transformer_blocks" else ("linear1",)
    official = "double_blocks" if m[1] == "transformer_blocks" else "single_blocks"
    return next(((f"{official}.{m[2]}.{f}", FUSED_PIECES[f].index(m[3])) for f in fused if m[3] in FUSED_PIECES[f]),
                None)
