"""Initial noise: float32 standard normal, one seed per sample.

noise_device "cpu": drawn by a CPU torch.Generator and moved to the model device — the same numbers on every
machine and GPU (what ComfyUI does). "gpu": drawn by a generator on the model device (Musubi's default; faster for
big latents, but the numbers depend on the device type).
Sample b of a batch uses seed + b, so any sample can be regenerated alone.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import invalid

NOISE_DEVICES = ("cpu", "gpu")
MAX_SEED = 2**64 - 1


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed <= MAX_SEED):
        raise invalid("seed", seed, f"an integer between 0 and {MAX_SEED}")
    return seed


def make_noise(shape: Sequence[int], seed: int, batch: int = 1, noise_device: str = "cpu",
               device: torch.device | str = "cpu") -> torch.Tensor:
    """shape: one sample's shape, e.g. [16, F_lat, H/8, W/8] -> float32 [batch, *shape] on `device`."""
    check_seed(seed)
    if noise_device not in NOISE_DEVICES:
        raise invalid("noise_device", noise_device, f"one of {NOISE_DEVICES}")
    device = torch.device(device)
    gen_device = torch.device("cpu") if noise_device == "cpu" else device
    samples = []
    for b in range(batch):
        g = torch.Generator(device=gen_device)
        g.manual_seed((seed + b) % (MAX_SEED + 1))
        samples.append(torch.randn(tuple(shape), generator=g, device=gen_device, dtype=torch.float32))
    return torch.stack(samples).to(device)
