"""Infer a `WanConfig` from a DiT checkpoint's key names and shapes (no tensor is read), and refuse other files.

Users pick files from a folder that also holds VAEs, text encoders, CLIP and other model families; every refusal
names the file, what it looks like and what a Wan 2.1 DiT file is, before anything is loaded.
"""

from __future__ import annotations

import math

from ...checkpoint import Checkpoint
from ...errors import MusubiInputError, invalid
from .dit import CLIP_TOKENS, WanConfig
from ..identify import count_blocks, identify_file

WAN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
MARKER_KEY = "blocks.0.self_attn.q.weight"
EXPECTED = f"a Wan 2.1 DiT (diffusion model) file with keys like {MARKER_KEY!r}"
_OFFICIAL_HEAD_DIM = 128

# what only the Wan family knows of other files (the generic table is engine/families/identify.py)
_DIFFUSERS_WAN = ("blocks.0.attn1.", "condition_embedder.")


def _any(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def strip_wan_prefix(ckpt: Checkpoint) -> Checkpoint:
    """A view without the `model.diffusion_model.` / `diffusion_model.` / `model.` prefix every key carries."""
    return ckpt.strip_prefix(WAN_PREFIXES)


def _refuse_non_wan(ckpt: Checkpoint) -> None:
    if MARKER_KEY in ckpt:
        return
    keys = ckpt.weight_keys()
    if _any(keys, *_DIFFUSERS_WAN):
        raise invalid(f"DiT file {ckpt.source}", "a diffusers-layout Wan DiT (keys like 'blocks.0.attn1.to_q')",
                      f"{EXPECTED}; the official/ComfyUI single-file layout (e.g. Comfy-Org "
                      "'split_files/diffusion_models')")
    found = identify_file(keys, "diffusion model (DiT)")
    if found is not None:
        raise invalid(f"DiT file {ckpt.source}", found[1], f"{EXPECTED}; {found[2]}")
    raise invalid(f"DiT file {ckpt.source}", f"no {MARKER_KEY!r} among {len(keys)} keys (first: {keys[:3]})",
                  EXPECTED)


def _num_layers(ckpt: Checkpoint) -> int:
    return count_blocks(ckpt.keys(), "blocks.", f"DiT file {ckpt.source}", "Wan DiT")


def _variant(dim: int, layers: int, in_dim: int, image: bool, flf: bool) -> str:
    size = {(1536, 30): "1.3B", (5120, 40): "14B"}.get((dim, layers))
    if size is None:
        return f"custom (dim={dim}, layers={layers})"
    if in_dim == 48 and image:
        return f"fun-control-{size}"
    if flf:
        return f"flf2v-{size}"
    if in_dim == 36 and image:
        return f"i2v-{size}"
    if in_dim == 16 and not image:
        return f"t2v-{size}"
    if in_dim == 36 and not image and size == "14B":
        return "i2v-A14B (Wan 2.2)"
    return f"custom (dim={dim}, layers={layers}, in_dim={in_dim})"


def detect_wan_config(ckpt: Checkpoint) -> WanConfig:
    """Config of the Wan DiT in `ckpt` (prefixes are stripped here if present)."""
    ckpt = strip_wan_prefix(ckpt)
    _refuse_non_wan(ckpt)
    try:
        dim, in_dim, *patch = ckpt.shape("patch_embedding.weight")      # Conv3d [D, in_dim, pt, ph, pw]
        ffn_dim = ckpt.shape("blocks.0.ffn.0.weight")[0]
        freq_dim = ckpt.shape("time_embedding.0.weight")[1]
        text_dim = ckpt.shape("text_embedding.0.weight")[1]
        head_out = ckpt.shape("head.head.weight")[0]
    except MusubiInputError as e:
        raise invalid(f"DiT file {ckpt.source}", f"an incomplete Wan DiT ({e})", EXPECTED) from None
    if dim % _OFFICIAL_HEAD_DIM:
        raise invalid(f"DiT file {ckpt.source}", f"model dim {dim}", f"a multiple of {_OFFICIAL_HEAD_DIM} (head dim)")
    image = "blocks.0.cross_attn.k_img.weight" in ckpt
    flf = "img_emb.emb_pos" in ckpt
    clip_dim = ckpt.shape("img_emb.proj.1.weight")[1] if image else 1280
    if flf and ckpt.shape("img_emb.emb_pos")[1] != 2 * CLIP_TOKENS:
        raise invalid(f"DiT file {ckpt.source} tensor 'img_emb.emb_pos'", ckpt.shape("img_emb.emb_pos"),
                      f"[1, {2 * CLIP_TOKENS}, {clip_dim}] (FLF2V: two CLIP images)")
    out_dim = head_out // math.prod(patch)
    if in_dim == 48 and out_dim == 48 and not image:
        raise invalid(f"DiT file {ckpt.source}", "a Wan 2.2 TI2V-5B DiT (48 latent channels)",
                      f"{EXPECTED} (Wan 2.2 TI2V-5B is not supported)")
    layers = _num_layers(ckpt)
    model_type = "flf2v" if flf else ("i2v" if in_dim > 16 else "t2v")
    return WanConfig(
        model_type=model_type, dim=dim, ffn_dim=ffn_dim, num_heads=dim // _OFFICIAL_HEAD_DIM, num_layers=layers,
        in_dim=in_dim, out_dim=out_dim, freq_dim=freq_dim, text_dim=text_dim,
        clip_dim=clip_dim, patch_size=tuple(patch), qk_norm="blocks.0.self_attn.norm_q.weight" in ckpt,
        cross_attn_norm="blocks.0.norm3.weight" in ckpt, has_image_input=image, has_flf_pos_emb=flf,
        variant=_variant(dim, layers, in_dim, image, flf),
    )


# task -> (accepted in_dim, needs image branch, needs FLF pos emb, what the user should load instead)
_TASKS = {
    "t2v": (16, None, False, "a T2V (or T2I) model, e.g. wan2.1_t2v_1.3B / wan2.1_t2v_14B"),
    "t2i": (16, None, False, "a T2V (or T2I) model, e.g. wan2.1_t2v_14B"),
    "i2v": (36, True, False, "an I2V model, e.g. wan2.1_i2v_480p_14B / wan2.1_i2v_720p_14B"),
    "flf2v": (36, True, True, "the FLF2V model, e.g. wan2.1_flf2v_720p_14B"),
    "fun_control": (48, True, False, "a Wan2.1-Fun Control model (48 input channels)"),
}


def normalize_task(task: str) -> str:
    """'i2v-14B' -> 'i2v', 't2v-1.3B-FC' -> 'fun_control', 't2i-14B' -> 't2i', 'one-frame' -> 'i2v'."""
    t = task.strip().lower()
    if t.endswith("-fc") or t.startswith(("fun-control", "fun_control", "control")):
        return "fun_control"
    if t.startswith(("one-frame", "one_frame")):
        return "i2v"
    base = t.split("-", 1)[0]
    if base not in _TASKS:
        raise invalid("task", task, f"one of {sorted(_TASKS)} (optionally with a size, e.g. 'i2v-14B')")
    return base


def require_task(config: WanConfig, task: str, source: str | None = None) -> None:
    """Raise a clear MusubiInputError when the model cannot run `task` (e.g. an I2V task on a T2V file)."""
    name = normalize_task(task)
    in_dim, image, flf, hint = _TASKS[name]
    ok = config.in_dim == in_dim and config.has_flf_pos_emb == flf
    if image is not None:
        ok = ok and config.has_image_input == image
    if not ok:
        where = f"DiT file {source}" if source else "DiT model"
        raise invalid(where, f"a {config.variant} model (in_dim={config.in_dim}, "
                             f"image branch={config.has_image_input}, FLF2V={config.has_flf_pos_emb})",
                      f"{hint} for task {task!r}")
