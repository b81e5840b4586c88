"""Tiny HunyuanVideo DiT presets: real key names and code paths, random weights, small enough for CPU tests.

Hidden 64 = 2 heads x 32, so the RoPE split keeps the official 1/8 : 7/16 : 7/16 proportions (4/14/14; 16/56/56 at
d=128) and the multi-head split is still exercised. Two double-stream and two single-stream blocks, the real 2-block
token refiner, text states 32 wide and CLIP pooled vectors 24 wide (two widths, so a swapped input fails loudly).

Weights are deterministic from a seed (a CPU `torch.Generator`, parameters drawn in name order) and scaled so a
random model gives a non-degenerate output: Linear/Conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02²), norm
weights ~ 1 + N(0, 0.1²), norm biases ~ N(0, 0.1²).

The official full-size configs live here too (`OFFICIAL`), used by detection names and the benchmark.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from ...atomic import save_safetensors_atomic
from ...errors import invalid
from .dit import HunyuanConfig, build_hunyuan_model

_TINY = dict(hidden_size=64, num_heads=2, double_blocks=2, single_blocks=2, text_dim=32, text_pool_dim=24)

PRESETS: dict[str, HunyuanConfig] = {
    "tiny": HunyuanConfig(variant="tiny", **_TINY),                                  # cfg-distilled T2V layout
    "tiny-i2v": HunyuanConfig(in_channels=32, guidance_embed=False, variant="tiny-i2v", **_TINY),  # SkyReels I2V
}

_13B = dict(hidden_size=3072, num_heads=24, double_blocks=20, single_blocks=40)
OFFICIAL: dict[str, HunyuanConfig] = {
    "t2v-13B": HunyuanConfig(variant="t2v-13B", **_13B),                             # HYVideo-T/2-cfgdistill
    "skyreels-i2v-13B": HunyuanConfig(in_channels=32, variant="skyreels-i2v-13B", **_13B),
}


def preset_config(name: str) -> HunyuanConfig:
    if name not in PRESETS:
        raise invalid("HunyuanVideo DiT preset", name, f"one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])  # a copy: callers may edit theirs


def _is_norm(name: str) -> bool:
    # q/k RMSNorms (`*_q_norm`, `q_norm`) and the token refiner's affine LayerNorms (`norm1`, `norm2`)
    return "norm" in name.rsplit(".", 2)[-2]


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One random tensor, scaled by its role (see the module docstring)."""
    noise = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if _is_norm(name):
        t = 1 + 0.1 * noise if leaf == "weight" else 0.1 * noise
    elif leaf == "bias":
        t = 0.02 * noise
    else:                                              # Linear [out, in] / Conv3d [out, in, kt, kh, kw]
        t = noise / math.sqrt(math.prod(shape[1:]))
    return t.to(dtype)


def random_state_dict(config: HunyuanConfig, seed: int = 0, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, build=build_hunyuan_model) -> dict[str, torch.Tensor]:
    """A full official-layout state dict with random weights for any config (shapes from a meta-built model;
    `build(config, device)` builds it: FramePack passes its own model)."""
    shapes = {k: tuple(v.shape) for k, v in build(config, "meta").state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    return {k: _init_tensor(k, shapes[k], gen, device, dtype) for k in sorted(shapes)}


def build_preset_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 CPU weights of a tiny preset, identical for the same (name, seed) on every machine."""
    return random_state_dict(preset_config(name), seed)


def write_preset_checkpoint(name: str, path: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a preset as an official-layout `.safetensors` DiT file (what a user would download)."""
    sd = {k: v.to(dtype) for k, v in build_preset_state_dict(name, seed).items()}
    path = Path(path)
    save_safetensors_atomic(sd, path, metadata={"musubi_preset": name, "seed": str(seed)})
    return path
