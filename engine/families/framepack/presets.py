"""Tiny FramePack DiT presets: real key names and code paths, random weights, small enough for CPU tests.

As HunyuanVideo's tiny presets (hidden 64 = 2 heads x 32, RoPE split 4/14/14, 2 double + 2 single blocks, the real
2-block token refiner, text states 32 wide, CLIP pooled 24 wide) plus SigLIP image embeddings 48 wide (a third
width, so a swapped input fails loudly). Weights are drawn as HunyuanVideo's presets draw them (deterministic per
seed, scaled by role).

The official full-size config (`OFFICIAL`): lllyasviel's FramePackI2V_HY and FramePack_F1_I2V_HY_20250503 have the
same architecture (F1 differs in its weights and its sampling, not its modules).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ...atomic import save_safetensors_atomic
from ...errors import invalid
from ..hunyuan.presets import random_state_dict as _random_state_dict
from .dit import FramePackConfig, build_framepack_model

_TINY = dict(hidden_size=64, num_heads=2, double_blocks=2, single_blocks=2, text_dim=32, text_pool_dim=24,
             image_dim=48)

PRESETS: dict[str, FramePackConfig] = {
    "tiny": FramePackConfig(variant="tiny", **_TINY),
}

_13B = dict(hidden_size=3072, num_heads=24, double_blocks=20, single_blocks=40, image_dim=1152)
OFFICIAL: dict[str, FramePackConfig] = {
    "i2v-13B": FramePackConfig(variant="i2v-13B", **_13B),     # lllyasviel/FramePackI2V_HY
    "f1-13B": FramePackConfig(variant="f1-13B", **_13B),       # lllyasviel/FramePack_F1_I2V_HY_20250503
}


def preset_config(name: str) -> FramePackConfig:
    if name not in PRESETS:
        raise invalid("FramePack DiT preset", name, f"one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name])  # a copy: callers may edit theirs


def random_state_dict(config: FramePackConfig, seed: int = 0, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full checkpoint-layout state dict with random weights for any config."""
    return _random_state_dict(config, seed, device, dtype, build=build_framepack_model)


def build_preset_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 CPU weights of a tiny preset, identical for the same (name, seed) on every machine."""
    return random_state_dict(preset_config(name), seed)


def write_preset_checkpoint(name: str, path: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a preset as a single-file `.safetensors` DiT (Kijai's layout: the checkpoint's names, no prefix)."""
    sd = {k: v.to(dtype) for k, v in build_preset_state_dict(name, seed).items()}
    path = Path(path)
    save_safetensors_atomic(sd, path, metadata={"musubi_preset": name, "seed": str(seed)})
    return path
