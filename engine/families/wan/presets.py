"""Tiny Wan DiT presets: real key names and code paths, random weights, small enough for CPU tests.

Head dim stays 128 (dim 256 = 2 heads x 128) so the RoPE split is exactly the official 44/42/42 and the multi-head
split is still exercised. Text embeddings are 32-wide (the tiny umT5 preset outputs [L, 32]) and CLIP tokens are
[257, 32] (the tiny CLIP preset), with the real token counts (512 text, 257 / 514 image). Two blocks.

Weights are deterministic from a seed (a CPU `torch.Generator`, parameters drawn in name order) and scaled so a
random model gives a non-degenerate output: Linear/Conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02²), norm
weights ~ 1 + N(0, 0.1²), modulations ~ N(0, 1/dim) (as the official init), FLF2V `emb_pos` ~ N(0, 0.1²).

The official full-size configs live here too (`OFFICIAL`), used by detection names and the benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ...atomic import save_safetensors_atomic
from ...errors import invalid
from .dit import WanConfig, build_wan_model

_TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, clip_dim=32)

PRESETS: dict[str, WanConfig] = {
    "tiny-t2v": WanConfig(model_type="t2v", in_dim=16, variant="tiny-t2v", **_TINY),
    "tiny-i2v": WanConfig(model_type="i2v", in_dim=36, has_image_input=True, variant="tiny-i2v", **_TINY),
    "tiny-flf2v": WanConfig(model_type="flf2v", in_dim=36, has_image_input=True, has_flf_pos_emb=True,
                            variant="tiny-flf2v", **_TINY),
    "tiny-fun-control": WanConfig(model_type="i2v", in_dim=48, has_image_input=True, variant="tiny-fun-control",
                                  **_TINY),
    # Wan 2.2: an A14B T2V expert is tiny-t2v; the I2V expert has the mask + image channels but no CLIP branch
    "tiny-i2v-a14b": WanConfig(model_type="i2v", in_dim=36, variant="tiny-i2v-a14b", **_TINY),
    "tiny-ti2v-5b": WanConfig(model_type="ti2v", in_dim=48, out_dim=48, variant="tiny-ti2v-5b", **_TINY),
    # A14B expert pairs (the name says which expert, as ComfyUI's file names do); each expert its own weights
    "tiny-t2v-a14b-high-noise": WanConfig(model_type="t2v", variant="tiny-t2v-a14b-high-noise", **_TINY),
    "tiny-t2v-a14b-low-noise": WanConfig(model_type="t2v", variant="tiny-t2v-a14b-low-noise", **_TINY),
    "tiny-i2v-a14b-high-noise": WanConfig(model_type="i2v", in_dim=36, variant="tiny-i2v-a14b-high-noise", **_TINY),
    "tiny-i2v-a14b-low-noise": WanConfig(model_type="i2v", in_dim=36, variant="tiny-i2v-a14b-low-noise", **_TINY),
}
# weights seed of a preset (added to the caller's): the two experts of a pair differ
_PRESET_SEEDS = {name: 1 for name in PRESETS if name.endswith("-high-noise")}

_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
OFFICIAL: dict[str, WanConfig] = {
    "t2v-1.3B": WanConfig(model_type="t2v", variant="t2v-1.3B", **_1_3B),
    "t2v-14B": WanConfig(model_type="t2v", variant="t2v-14B", **_14B),
    "i2v-14B": WanConfig(model_type="i2v", in_dim=36, has_image_input=True, variant="i2v-14B", **_14B),
    "flf2v-14B": WanConfig(model_type="flf2v", in_dim=36, has_image_input=True, has_flf_pos_emb=True,
                           variant="flf2v-14B", **_14B),
    "fun-control-1.3B": WanConfig(model_type="i2v", in_dim=48, has_image_input=True, variant="fun-control-1.3B",
                                  **_1_3B),
    "fun-control-14B": WanConfig(model_type="i2v", in_dim=48, has_image_input=True, variant="fun-control-14B",
                                 **_14B),
    # Wan 2.2 (wan/configs/wan_t2v_A14B.py, wan_i2v_A14B.py, wan_ti2v_5B.py); each A14B expert is one such DiT
    "t2v-A14B": WanConfig(model_type="t2v", variant="t2v-A14B", **_14B),
    "i2v-A14B": WanConfig(model_type="i2v", in_dim=36, variant="i2v-A14B", **_14B),
    "ti2v-5B": WanConfig(model_type="ti2v", in_dim=48, out_dim=48, variant="ti2v-5B", dim=3072, ffn_dim=14336,
                         num_heads=24, num_layers=30),
}


def preset_config(name: str) -> WanConfig:
    if name not in PRESETS:
        raise invalid("Wan DiT preset", name, f"one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])  # a copy: callers may edit theirs


def _is_norm(name: str) -> bool:
    # norm3 / norm_q / norm_k / norm_k_img, and the two LayerNorms of img_emb.proj (indices 0 and 4)
    return ".norm" in f".{name}" or name.startswith(("img_emb.proj.0.", "img_emb.proj.4."))


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dim: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One random tensor, scaled by its role (see the module docstring)."""
    noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "modulation":
        t = noise / math.sqrt(dim)
    elif leaf == "emb_pos":
        t = noise * 0.1
    elif _is_norm(name):
        t = 1 + 0.1 * noise if leaf == "weight" else 0.1 * noise          # norm weight / norm bias
    elif leaf == "bias":
        t = 0.02 * noise
    else:                                                                  # Linear [out, in] / Conv3d [out, in, kt, kh, kw]
        t = noise / math.sqrt(math.prod(shape[1:]))
    return t.to(dtype)


def random_state_dict(config: WanConfig, seed: int = 0, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full official-layout state dict with random weights for any config (shapes from a meta-built model)."""
    shapes = {k: tuple(v.shape) for k, v in build_wan_model(config, "meta").state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    return {k: _init_tensor(k, shapes[k], gen, config.dim, device, dtype) for k in sorted(shapes)}


def build_preset_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 CPU weights of a tiny preset, identical for the same (name, seed) on every machine."""
    return random_state_dict(preset_config(name), seed + _PRESET_SEEDS.get(name, 0))


def write_preset_checkpoint(name: str, path: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a preset as an official-layout `.safetensors` DiT file (what a user would download)."""
    sd = {k: v.to(dtype) for k, v in build_preset_state_dict(name, seed).items()}
    path = Path(path)
    save_safetensors_atomic(sd, path, metadata={"musubi_preset": name, "seed": str(seed)})
    return path


def write_preset_files(folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, Path]:
    """Every tiny DiT preset as `<folder>/wan_<name>.safetensors`; returns name -> path."""
    folder = Path(folder)
    return {name: write_preset_checkpoint(name, folder / f"wan_{name}.safetensors", dtype) for name in PRESETS}
