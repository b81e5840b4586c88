"""Infer a `HunyuanConfig` from a DiT checkpoint's key names and shapes (no tensor is read), and refuse other files.

Layouts users have, all read through `engine.checkpoint.Checkpoint` (which also dequantizes ComfyUI's scaled fp8):

* the official `mp_rank_00_model_states.pt` (the state dict under "module", sometimes "ema"; weights_only unpickling)
  and bare-key safetensors in bf16 / fp16 / fp8 e4m3 (kohya's `mp_rank_00_model_states_fp8.safetensors`);
* ComfyUI's repackaged files (`hunyuan_video_t2v_720p_bf16.safetensors`, scaled fp8), official names, optionally
  under `model.diffusion_model.` / `diffusion_model.`;
* a model saved by ComfyUI itself: ComfyUI's internal (Flux-style) names, `img_attn.qkv`, `img_mod.lin`,
  `img_attn.norm.query_norm.scale`, `time_in.in_layer` ..., renamed here to the official ones;
* SkyReels V1 T2V / I2V (I2V: `img_in.proj.weight` takes 32 channels: noisy + first-frame latents).

Every refusal names the file, what it looks like and what a HunyuanVideo DiT file is, before anything is loaded.
"""

from __future__ import annotations

import math
import re

from ...checkpoint import Checkpoint
from ...errors import MusubiInputError, invalid
from ..identify import count_blocks, identify_file
from .dit import HunyuanConfig

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")
MARKER_KEY = "txt_in.individual_token_refiner.blocks.0.norm1.weight"   # the same in official and ComfyUI names
EXPECTED = f"a HunyuanVideo DiT (diffusion model) file with keys like {MARKER_KEY!r}"
_IDENTIFY_KIND = "HunyuanVideo or Flux DiT"      # our own kind in the generic table (engine/families/identify.py)

# (key test, what the file is, what to do): what only this family knows of other files, checked before the table
# (FramePack before diffusers-layout HunyuanVideo: it has the same refiner keys)
_OTHER_FILES = (
    (lambda ks: _any(ks, "clean_x_embedder.", "image_projection."),
     "a FramePack DiT (HunyuanVideo-based, diffusers layout)", "use the FramePack loader"),
    (lambda ks: _any(ks, "context_embedder.token_refiner."),
     "a diffusers-layout HunyuanVideo DiT (keys like 'transformer_blocks.0.attn.to_q')",
     "the official single-file layout (mp_rank_00_model_states.pt, or ComfyUI's hunyuan_video_t2v_720p_bf16)"),
    (lambda ks: _any(ks, "byt5_in.", "cond_type_embedding.", "vision_in."),
     "a HunyuanVideo 1.5 DiT", "a HunyuanVideo (1.0) or SkyReels V1 DiT (HunyuanVideo 1.5 is not supported)"),
    (lambda ks: _any(ks, "double_blocks.") and not _any(ks, "txt_in.individual_token_refiner."),
     "a Flux DiT (double_blocks without HunyuanVideo's text token refiner)", "use a Flux loader"),
    (lambda ks: _any(ks, "blocks.0.self_attn.q.", "patch_embedding.") and _any(ks, "blocks.0.cross_attn."),
     "a Wan 2.1 DiT (keys like 'blocks.0.self_attn.q')", "use the Wan DiT loader"),
)


def _any(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


# ComfyUI's internal names -> official (the inverse of the renaming ComfyUI applies when it loads an official file).
# Applied to whole keys, so quantization bookkeeping (`<layer>.scale_weight`, `<layer>.comfy_quant`) follows its layer.
_FROM_COMFY = [
    (re.compile(r"mlp\.0\."), "mlp.fc1."),                 # before the embedders below gain their `mlp.0`
    (re.compile(r"mlp\.2\."), "mlp.fc2."),
    (re.compile(r"^(time_in|guidance_in|txt_in\.t_embedder)\.in_layer\."), r"\1.mlp.0."),
    (re.compile(r"^(time_in|guidance_in|txt_in\.t_embedder)\.out_layer\."), r"\1.mlp.2."),
    (re.compile(r"^txt_in\.c_embedder\.in_layer\."), "txt_in.c_embedder.linear_1."),
    (re.compile(r"^txt_in\.c_embedder\.out_layer\."), "txt_in.c_embedder.linear_2."),
    (re.compile(r"_mod\.lin\."), "_mod.linear."),
    (re.compile(r"\.modulation\.lin\."), ".modulation.linear."),
    (re.compile(r"_attn\.qkv\."), "_attn_qkv."),
    (re.compile(r"_attn\.proj\."), "_attn_proj."),
    (re.compile(r"_attn\.norm\.query_norm\.scale$"), "_attn_q_norm.weight"),
    (re.compile(r"_attn\.norm\.key_norm\.scale$"), "_attn_k_norm.weight"),
    (re.compile(r"\.norm\.query_norm\.scale$"), ".q_norm.weight"),
    (re.compile(r"\.norm\.key_norm\.scale$"), ".k_norm.weight"),
]
COMFY_NATIVE_MARKER = "double_blocks.0.img_attn.qkv.weight"


def official_name(key: str) -> str:
    """A ComfyUI-internal HunyuanVideo key in the official spelling (official keys are returned unchanged)."""
    if key.startswith(("time_in.mlp.", "guidance_in.mlp.", "txt_in.t_embedder.mlp.")):
        return key                                             # official already (`mlp.0` is not an MLP fc here)
    for pattern, repl in _FROM_COMFY:
        key = pattern.sub(repl, key)
    return key


def open_view(ckpt: Checkpoint) -> Checkpoint:
    """A view with official key names: prefix stripped, ComfyUI-internal names renamed."""
    ckpt = ckpt.strip_prefix(PREFIXES)
    if COMFY_NATIVE_MARKER in ckpt:
        ckpt = ckpt.renamed(official_name)
    return ckpt


def refuse_other_files(ckpt: Checkpoint) -> None:
    if MARKER_KEY in ckpt and "img_in.proj.weight" in ckpt:
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
    return count_blocks(ckpt.keys(), prefix, f"DiT file {ckpt.source}", "HunyuanVideo DiT")


def _variant(hidden: int, doubles: int, singles: int, in_channels: int, guidance: bool) -> str:
    if (hidden, doubles, singles) != (3072, 20, 40):
        return f"custom (hidden={hidden}, blocks={doubles}+{singles}, in_channels={in_channels})"
    if in_channels == 32:
        return "skyreels-i2v-13B"
    return "t2v-13B" if guidance else "t2v-13B (no guidance embedder)"


def detect_hunyuan_config(ckpt: Checkpoint) -> HunyuanConfig:
    """Config of the HunyuanVideo DiT in `ckpt` (prefixes and ComfyUI-internal names are handled here)."""
    ckpt = open_view(ckpt)
    refuse_other_files(ckpt)
    source = f"DiT file {ckpt.source}"
    try:
        img_in = ckpt.shape("img_in.proj.weight")                      # Conv3d [D, in, pt, ph, pw]
        head_dim = ckpt.shape("double_blocks.0.img_attn_q_norm.weight")[0]
        mlp_hidden = ckpt.shape("double_blocks.0.img_mlp.fc1.weight")[0]
        text_dim = ckpt.shape("txt_in.input_embedder.weight")[1]
        pool_dim = ckpt.shape("vector_in.in_layer.weight")[1]
        final_out = ckpt.shape("final_layer.linear.weight")[0]
    except MusubiInputError as e:
        raise invalid(source, f"an incomplete HunyuanVideo DiT ({e})", EXPECTED) from None
    if len(img_in) != 5:
        raise invalid(f"{source} tensor 'img_in.proj.weight'", img_in,
                      "a Conv3d weight [hidden, channels, 1, 2, 2] (a 2-D patch embedding is another model)")
    hidden, in_channels, *patch = img_in
    if in_channels not in (16, 32):
        what = ("a HunyuanVideo-I2V DiT (33 input channels: latents + image latents + mask)" if in_channels == 33
                else f"a DiT with {in_channels} input channels")
        raise invalid(source, what, f"{EXPECTED}: 16 input channels (T2V) or 32 (SkyReels V1 I2V)")
    if hidden % head_dim:
        raise invalid(f"{source} tensor 'double_blocks.0.img_attn_q_norm.weight'", head_dim,
                      f"a head dim dividing the hidden size {hidden}")
    doubles, singles = _count(ckpt, "double_blocks."), _count(ckpt, "single_blocks.")
    guidance = "guidance_in.mlp.0.weight" in ckpt
    return HunyuanConfig(
        hidden_size=hidden, num_heads=hidden // head_dim, double_blocks=doubles, single_blocks=singles,
        mlp_ratio=mlp_hidden / hidden, in_channels=in_channels, out_channels=final_out // math.prod(patch),
        patch_size=tuple(patch), text_dim=text_dim, text_pool_dim=pool_dim,
        refiner_blocks=_count(ckpt, "txt_in.individual_token_refiner.blocks."), guidance_embed=guidance,
        variant=_variant(hidden, doubles, singles, in_channels, guidance),
    )
