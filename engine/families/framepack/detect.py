"""Infer a `FramePackConfig` from a DiT checkpoint's key names and shapes (no tensor is read), and refuse other files.

Layouts users have, all read through `engine.checkpoint.Checkpoint` (shards, index files and model folders, plain
fp8 and ComfyUI's scaled fp8 included):

* lllyasviel's `FramePackI2V_HY` / `FramePack_F1_I2V_HY_20250503`: `diffusion_pytorch_model-0000N-of-00003
  .safetensors` + `diffusion_pytorch_model.safetensors.index.json` (bf16), given by a shard, the index or the folder;
* Kijai's single files (`FramePackI2V_HY_bf16.safetensors`, `..._fp8_e4m3fn.safetensors`), the same names;
* the same names under a `model.diffusion_model.` / `diffusion_model.` prefix, or quantized by ComfyUI (scaled fp8).

The file does not say whether it is the I2V or the F1 model (same modules): that is the sampler's choice.
Every refusal names the file, what it looks like and what a FramePack DiT file is, before anything is loaded.
"""

from __future__ import annotations

import math

from ...checkpoint import Checkpoint
from ...errors import MusubiInputError, invalid
from ..identify import count_blocks, identify_file
from .dit import FramePackConfig

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")
MARKER_KEY = "clean_x_embedder.proj.weight"          # the history embedder: only FramePack has it
EXPECTED = (f"a FramePack DiT (FramePackI2V_HY or FramePack_F1_I2V_HY: lllyasviel's sharded "
            f"diffusion_pytorch_model-0000N-of-0000M.safetensors or Kijai's single file) with keys like {MARKER_KEY!r}")
_IDENTIFY_KIND = "diffusers-layout DiT"            # our own kind in the generic table (engine/families/identify.py)


def _any(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


# (key test, what the file is, what to do): what only this family knows of other files, checked before the table
_OTHER_FILES = (
    (lambda ks: _any(ks, "txt_in.individual_token_refiner.", "double_blocks.", "single_blocks."),
     "a HunyuanVideo DiT (official layout, keys like 'double_blocks.0.img_attn_qkv')",
     "use the HunyuanVideo DiT loader for it"),
    (lambda ks: _any(ks, "context_embedder.token_refiner.") and not _any(ks, "clean_x_embedder."),
     "a diffusers-layout HunyuanVideo DiT (no 'clean_x_embedder' history embedder, no 'image_projection')",
     "FramePack's own weights (HunyuanVideo's cannot run sections with history)"),
    (lambda ks: _any(ks, "blocks.0.self_attn.q.", "patch_embedding.") and _any(ks, "blocks.0.cross_attn."),
     "a Wan DiT (keys like 'blocks.0.self_attn.q')", "use the Wan DiT loader for it"),
)


def open_view(ckpt: Checkpoint) -> Checkpoint:
    """A view with the checkpoint's own names (a ComfyUI-style prefix stripped)."""
    return ckpt.strip_prefix(PREFIXES)


def refuse_other_files(ckpt: Checkpoint) -> None:
    if MARKER_KEY in ckpt and "x_embedder.proj.weight" in ckpt:
        return
    keys = ckpt.weight_keys()
    source = f"DiT file {ckpt.source}"
    for test, what, hint in _OTHER_FILES:
        if test(keys):
            raise invalid(source, what, f"{EXPECTED}; {hint}")
    found = identify_file(keys, _IDENTIFY_KIND)
    if found is not None:
        raise invalid(source, found[1], f"{EXPECTED}; {found[2]}")
    raise invalid(source, f"no {MARKER_KEY!r} among {len(keys)} keys (first: {keys[:3]})", EXPECTED)


def _count(ckpt: Checkpoint, prefix: str) -> int:
    return count_blocks(ckpt.keys(), prefix, f"DiT file {ckpt.source}", "FramePack DiT")


def detect_framepack_config(ckpt: Checkpoint) -> FramePackConfig:
    """Config of the FramePack DiT in `ckpt` (a prefix is handled here)."""
    ckpt = open_view(ckpt)
    refuse_other_files(ckpt)
    source = f"DiT file {ckpt.source}"
    try:
        embed = ckpt.shape("x_embedder.proj.weight")                              # Conv3d [D, in, pt, ph, pw]
        head_dim = ckpt.shape("transformer_blocks.0.attn.norm_q.weight")[0]
        mlp_hidden = ckpt.shape("transformer_blocks.0.ff.net.0.proj.weight")[0]
        text_dim = ckpt.shape("context_embedder.proj_in.weight")[1]
        pool_dim = ckpt.shape("time_text_embed.text_embedder.linear_1.weight")[1]
        image_dim = ckpt.shape("image_projection.up.weight")[1]
        out = ckpt.shape("proj_out.weight")[0]
    except MusubiInputError as e:
        raise invalid(source, f"an incomplete FramePack DiT ({e})", EXPECTED) from None
    if len(embed) != 5:
        raise invalid(f"{source} tensor 'x_embedder.proj.weight'", embed, "a Conv3d weight [hidden, 16, 1, 2, 2]")
    hidden, in_channels, *patch = embed
    if hidden % head_dim:
        raise invalid(f"{source} tensor 'transformer_blocks.0.attn.norm_q.weight'", head_dim,
                      f"a head dim dividing the hidden size {hidden}")
    doubles = _count(ckpt, "transformer_blocks.")
    singles = _count(ckpt, "single_transformer_blocks.")
    official = (hidden, doubles, singles, in_channels) == (3072, 20, 40, 16)
    return FramePackConfig(
        hidden_size=hidden, num_heads=hidden // head_dim, double_blocks=doubles, single_blocks=singles,
        mlp_ratio=mlp_hidden / hidden, in_channels=in_channels, out_channels=out // math.prod(patch),
        patch_size=tuple(patch), text_dim=text_dim, text_pool_dim=pool_dim, image_dim=image_dim,
        refiner_blocks=_count(ckpt, "context_embedder.token_refiner.refiner_blocks."),
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in ckpt,
        variant="13B (I2V / F1)" if official else
        f"custom (hidden={hidden}, blocks={doubles}+{singles}, in_channels={in_channels})",
    )
