"""FramePack module names in other tools' spellings, and HunyuanVideo LoRAs on a FramePack DiT.

Canonical names are the checkpoint's, which are diffusers' (`transformer_blocks.0.attn.to_q`); Musubi's kohya
underscore names (`lora_unet_transformer_blocks_0_attn_to_q`) resolve without a model through the table below (the
leaves have underscores of their own: `to_q`, `add_q_proj`).

Diffusers-spelled names are not claimed: without a model they read as HunyuanVideo's (its diffusers LoRAs use the
very same names, with q/k/v as pieces of its fused layers, which the reader joins). On a FramePack DiT,
`adopt_hunyuan` (the family's `LoRASpec.adopt`) turns HunyuanVideo modules into FramePack ones, as Musubi's
`convert_hunyuan_to_framepack` does: so a HunyuanVideo LoRA in any dialect, and a FramePack LoRA in the diffusers or
ComfyUI spelling, both apply to FramePack with their exact weights."""

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


# --- HunyuanVideo LoRAs on a FramePack DiT (Musubi's `convert_hunyuan_to_framepack`) --------------------------------

_HV_DOUBLE = {"img_mod.linear": "norm1.linear", "img_attn_proj": "attn.to_out.0", "img_mlp.fc1": "ff.net.0.proj",
              "img_mlp.fc2": "ff.net.2", "txt_mod.linear": "norm1_context.linear", "txt_attn_proj": "attn.to_add_out",
              "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"}
_HV_DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_HV_SINGLE = {"linear2": "proj_out", "modulation.linear": "norm.linear"}
_HV_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_HV_NAME = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def _split_rows(mw, pieces: int, hidden: int) -> list:
    """A LoRA on a fused Linear -> one per piece: the same down, the up's rows of the piece (q, k, v: `hidden`
    rows each, the last piece the rest). ΔW of each piece is exactly its rows of the fused ΔW."""
    import dataclasses

    if mw.kind != "lora" or "mid" in mw.tensors or mw.dora_scale is not None or mw.weight_patch is not None \
            or mw.bias_diff is not None:
        return None
    up = mw.tensors["up"]
    bounds = [i * hidden for i in range(pieces)] + [up.shape[0]]
    return [dataclasses.replace(mw, tensors={"down": mw.tensors["down"], "up": up[lo:hi]})
            for lo, hi in zip(bounds, bounds[1:])]


def adopt_hunyuan(modules: dict) -> dict | None:
    """HunyuanVideo (official names, any dialect the reader resolved) -> FramePack modules; fused qkv / linear1
    LoRAs are split by rows (only plain LoRA: a LoHa/LoKr product does not split). None when the modules are not
    all HunyuanVideo block layers."""
    out = {}
    for name, mw in modules.items():
        m = _HV_NAME.match(name)
        if m is None:
            return None
        double = m[1] == "double_blocks"
        prefix = f"{'transformer_blocks' if double else 'single_transformer_blocks'}.{m[2]}"
        plain, fused = (_HV_DOUBLE, _HV_DOUBLE_FUSED) if double else (_HV_SINGLE, _HV_SINGLE_FUSED)
        if m[3] in plain:
            out[f"{prefix}.{plain[m[3]]}"] = mw
        elif m[3] in fused:
            hidden = mw.tensors["down"].shape[1] if "down" in mw.tensors else 0
            pieces = _split_rows(mw, len(fused[m[3]]), hidden)
            if pieces is None:
                return None
            out.update({f"{prefix}.{leaf}": p for leaf, p in zip(fused[m[3]], pieces)})
        else:
            return None
    return out
