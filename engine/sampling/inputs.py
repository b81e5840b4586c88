"""A pipeline's image/video inputs: shape checks, frame counts and the VAE encode every family's `prepare_*` uses.

Every family here has a 4×8×8 causal video VAE and a DiT patch of 2×2, so sizes are multiples of 16 and frame
counts are 4k+1."""

from __future__ import annotations

import torch

from ..errors import invalid

TEMPORAL_STRIDE = 4
SIZE_MULTIPLE = 16     # VAE 8× and DiT patch 2×


def as_video(x: torch.Tensor, name: str, frames_axis: bool) -> torch.Tensor:
    """[3, H, W] image / [3, F, H, W] video (optionally with a batch of 1) -> [1, 3, F, H, W]."""
    dims = 4 if frames_axis else 3
    if isinstance(x, torch.Tensor) and x.ndim == dims + 1 and x.shape[0] == 1:
        x = x[0]
    if not isinstance(x, torch.Tensor) or x.ndim != dims or x.shape[0] != 3:
        shape = "[3, F, H, W]" if frames_axis else "[3, H, W]"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise invalid(name, got, f"an RGB {'video' if frames_axis else 'image'} {shape} in [-1, 1]")
    if x.shape[-1] % SIZE_MULTIPLE or x.shape[-2] % SIZE_MULTIPLE:
        raise invalid(f"{name} size", (x.shape[-1], x.shape[-2]), f"width and height divisible by {SIZE_MULTIPLE}")
    return (x if frames_axis else x[:, None])[None]


def check_frames(frames, name: str = "frames", longest: int = 81) -> None:
    """A frame count of the form 4k+1 (`longest`: the family's usual maximum, for the message)."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
        raise invalid(name, frames, f"a frame count of the form 4k+1 (1, 5, 9, ..., {longest})")


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL_STRIDE + 1


def encode(vae, video: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] -> [16, F_lat, H/8, W/8] float32 on CPU (conditioning is small; the pipeline moves it)."""
    with torch.no_grad():
        return vae.encode(video).float()[0].cpu()
