"""Infer a `WanConfig` from a DiT checkpoint's key names and shapes (no tensor is read), and refuse other files.

Users pick files from a folder that also holds VAEs, text encoders, CLIP and other model families; every refusal
names the file, what it looks like and what a Wan 2.1 / 2.2 DiT file is, before anything is loaded.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ...checkpoint import Checkpoint
from ...errors import MusubiInputError, invalid
from .dit import CLIP_TOKENS, WanConfig
from ..identify import count_blocks, identify_file

WAN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
MARKER_KEY = "blocks.0.self_attn.q.weight"
EXPECTED = f"a Wan 2.1 / 2.2 DiT (diffusion model) file with keys like {MARKER_KEY!r}"
_OFFICIAL_HEAD_DIM = 128
TI2V_CHANNELS = 48         # Wan 2.2 TI2V-5B: 48 latent channels in and out (the 2.2 VAE)

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


_SIZES = {(1536, 30): "1.3B", (3072, 30): "5B", (5120, 40): "14B"}
_EXPERT_NAME = re.compile(r"(high|low)[ _.-]?noise", re.IGNORECASE)
_WAN22_NAME = re.compile(r"wan[ _.-]?2[ _.-]?2|a14b", re.IGNORECASE)


def expert_from_name(path) -> str | None:
    """"high" / "low" when the file name (or, for official shards, its folder `high_noise_model/`) names a Wan 2.2
    A14B expert, as ComfyUI's `wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors` does; None otherwise."""
    p = Path(str(path))
    for part in (p.name, p.parent.name):
        m = _EXPERT_NAME.search(part)
        if m:
            return m[1].lower()
    return None


def _named_wan22(path) -> bool:
    p = Path(str(path))
    return any(_WAN22_NAME.search(part) for part in (p.name, p.parent.name)) or expert_from_name(p) is not None


def _variant(dim: int, layers: int, in_dim: int, out_dim: int, image: bool, flf: bool, wan22: bool) -> str:
    """Official name of a layout. T2V A14B experts have exactly the 2.1 T2V-14B layout: only the file name
    (`wan22`) tells them apart; I2V A14B (no CLIP branch) and TI2V-5B (48 channels) have their own layouts."""
    size = _SIZES.get((dim, layers))
    if size is None:
        return f"custom (dim={dim}, layers={layers})"
    if size == "5B":
        return "ti2v-5B" if (in_dim, out_dim, image, flf) == (48, 48, False, False) else \
            f"custom (dim={dim}, layers={layers}, in_dim={in_dim})"
    if in_dim == 48 and image:
        return f"fun-control-{size}"
    if flf:
        return f"flf2v-{size}"
    if in_dim == 36 and image:
        return f"i2v-{size}"
    if in_dim == 16 and not image:
        return "t2v-A14B" if wan22 and size == "14B" else f"t2v-{size}"
    if in_dim == 36 and not image and size == "14B":
        return "i2v-A14B"
    return f"custom (dim={dim}, layers={layers}, in_dim={in_dim})"


def detect_wan_config(ckpt: Checkpoint) -> WanConfig:
    """Config of the Wan DiT in `ckpt` (prefixes are stripped here if present). The file name may add the Wan 2.2
    A14B expert role (`expert_from_name`); it is never required."""
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
    layers = _num_layers(ckpt)
    if out_dim == TI2V_CHANNELS:
        model_type = "ti2v"
    else:
        model_type = "flf2v" if flf else ("i2v" if in_dim > out_dim else "t2v")
    variant = _variant(dim, layers, in_dim, out_dim, image, flf, _named_wan22(ckpt.source))
    # an expert is a T2V / I2V DiT without CLIP branch (the A14B layouts; any size, so tiny test files too)
    expert = expert_from_name(ckpt.source) if (in_dim, out_dim, image, flf) in ((16, 16, False, False),
                                                                                (36, 16, False, False)) else None
    return WanConfig(
        model_type=model_type, dim=dim, ffn_dim=ffn_dim, num_heads=dim // _OFFICIAL_HEAD_DIM, num_layers=layers,
        in_dim=in_dim, out_dim=out_dim, freq_dim=freq_dim, text_dim=text_dim,
        clip_dim=clip_dim, patch_size=tuple(patch), qk_norm="blocks.0.self_attn.norm_q.weight" in ckpt,
        cross_attn_norm="blocks.0.norm3.weight" in ckpt, has_image_input=image, has_flf_pos_emb=flf,
        variant=variant, expert=expert,
    )


def model_kind(config) -> str:
    """What a Wan DiT runs: "t2v" (in_dim 16), "i2v" (36: 2.1 with CLIP or 2.2 A14B without), "flf2v",
    "fun_control" (48 in, 16 out), "ti2v" (Wan 2.2 5B: 48 in and out; T2V and I2V in one model), "custom"."""
    if config.out_dim == TI2V_CHANNELS:
        return "ti2v" if config.in_dim == TI2V_CHANNELS and not config.has_image_input else "custom"
    if config.has_flf_pos_emb:
        return "flf2v" if config.in_dim == 36 and config.has_image_input else "custom"
    return {16: "t2v", 36: "i2v", 48: "fun_control" if config.has_image_input else "custom"}.get(config.in_dim,
                                                                                                "custom")


# task -> (model kinds that run it, what the user should load instead)
_TASKS = {
    "t2v": (("t2v", "ti2v"), "a T2V (or T2I) model, e.g. wan2.1_t2v_1.3B / wan2.1_t2v_14B / "
                             "wan2.2_t2v_low_noise_14B / wan2.2_ti2v_5B"),
    "t2i": (("t2v", "ti2v"), "a T2V (or T2I) model, e.g. wan2.1_t2v_14B / wan2.2_t2v_low_noise_14B"),
    "i2v": (("i2v", "ti2v"), "an I2V model, e.g. wan2.1_i2v_480p_14B / wan2.1_i2v_720p_14B / "
                             "wan2.2_i2v_low_noise_14B / wan2.2_ti2v_5B"),
    "flf2v": (("flf2v",), "the FLF2V model, e.g. wan2.1_flf2v_720p_14B"),
    "fun_control": (("fun_control",), "a Wan2.1-Fun Control model (48 input channels)"),
    "ti2v": (("ti2v",), "the Wan 2.2 TI2V-5B model, e.g. wan2.2_ti2v_5B"),
    "one_frame": (("i2v", "flf2v"), "an I2V model (or FLF2V for intermediate frames) with mask channels"),
}


def normalize_task(task: str) -> str:
    """'i2v-14B' -> 'i2v', 't2v-1.3B-FC' -> 'fun_control', 't2i-14B' -> 't2i', 'one-frame' -> 'one_frame',
    'ti2v-5B' -> 'ti2v'."""
    t = task.strip().lower()
    if t.endswith("-fc") or t.startswith(("fun-control", "fun_control", "control")):
        return "fun_control"
    if t.startswith(("one-frame", "one_frame")):
        return "one_frame"
    base = t.split("-", 1)[0]
    if base not in _TASKS:
        raise invalid("task", task, f"one of {sorted(_TASKS)} (optionally with a size, e.g. 'i2v-14B')")
    return base


def require_task(config: WanConfig, task: str, source: str | None = None) -> None:
    """Raise a clear MusubiInputError when the model cannot run `task` (e.g. an I2V task on a T2V file)."""
    kinds, hint = _TASKS[normalize_task(task)]
    if model_kind(config) not in kinds:
        where = f"DiT file {source}" if source else "DiT model"
        raise invalid(where, f"a {config.variant} model (in_dim={config.in_dim}, out_dim={config.out_dim}, "
                             f"image branch={config.has_image_input}, FLF2V={config.has_flf_pos_emb})",
                      f"{hint} for task {task!r}")
