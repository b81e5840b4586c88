"""Wan 2.1 causal video VAE: 8x spatial and 4x temporal compression to 16 latent channels.

Module names match the official `Wan2.1_VAE.pth` (ComfyUI's `wan_2.1_vae.safetensors` uses the same ones), so both
files load without renaming (diffusers-layout files are renamed to these on load):

    encoder.conv1, encoder.downsamples.N.{residual.{0,2,3,6}, shortcut, resample.1, time_conv}, encoder.middle.{0,1,2},
    encoder.head.{0,2}, conv1 (posterior 1x1), conv2 (post-quant 1x1), decoder.conv1, decoder.middle.{0,1,2},
    decoder.upsamples.N.{...}, decoder.head.{0,2}

Time is causal: every 3D conv pads only on the past side, so frame t sees frames <= t. The encoder is fed the first
frame alone, then chunks of 4 frames; the decoder one latent frame at a time. A `FeatureCache` carries, for every
temporal conv, the last input frames of the previous chunk (the "feature cache" of the official code), so chunked
processing equals running the causal network on the whole clip while only ever holding one chunk of activations.
Two layers are *not* plain streaming convs, and the chunking is part of the model's definition there:
  * temporal downsample (encoder): the first chunk (frame 0) passes through untouched; later chunks are prefixed with
    the previous chunk's last frame and convolved with stride 2 (4 frames -> 2, then 2 -> 1);
  * temporal upsample (decoder): the first latent frame passes through untouched (1 frame out); later frames are
    convolved causally from an empty history (frame 0 is never context) into 2x channels, split into 2 frames.
So F frames map to 1 + (F-1)/4 latent frames and back.

Latents are normalized per channel, z = (mu - mean) / std (posterior mean, never sampled), with Wan's constants.
Also here: spatial tiling, the checkpoint loader, config inference from shapes and the tiny test preset. The chunked
encode/decode flow is `CausalVideoVAE`, shared with the Wan 2.2 VAE (`vae22.py`, 48 channels, 16x); `load_wan_vae` and
`infer_vae_config` recognize both files.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...checkpoint import Checkpoint, load_into_module
from ...errors import invalid
from ...tiling import tiled_apply

# Per-channel statistics of Wan 2.1 posterior means (official constants).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
TINY_VAE_PRESET = "preset:tiny-vae"


@dataclass
class WanVAEConfig:
    z_dim: int = 16
    dim: int = 96                       # base channel count; stage i has dim * dim_mult[i] channels
    dim_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_scales: list = field(default_factory=list)   # spatial scales (1.0, 0.5, ...) that get an attention block
    temporal_downsample: list = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    version: ClassVar[str] = "2.1"      # which Wan VAE a config describes (`WanVAE22Config.version` is "2.2")

    @property
    def temporal_upsample(self) -> list:
        return list(self.temporal_downsample)[::-1]


def tiny_vae_config() -> WanVAEConfig:
    """Same architecture and key names as the real VAE, base dim 8 (12x fewer channels). z_dim stays 16: the DiT
    consumes 16 latent channels."""
    return WanVAEConfig(dim=8)


# ----------------------------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------------------------

class FeatureCache:
    """Per-call temporal state of every causal layer, keyed by the layer module itself.

    Stored tensors live on `device` (None = wherever they were computed). `device="cpu"` is Musubi's
    `--vae_cache_cpu`: a few frames per conv stay off the GPU and are copied back when the next chunk needs them.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self._state: dict[int, object] = {}

    def __contains__(self, layer: nn.Module) -> bool:
        return id(layer) in self._state

    def get(self, layer: nn.Module, like: torch.Tensor):
        value = self._state.get(id(layer))
        if isinstance(value, torch.Tensor):
            value = value.to(like.device, like.dtype)
        return value

    def put(self, layer: nn.Module, value) -> None:
        if isinstance(value, torch.Tensor):
            # Always copy: a slice would keep the whole chunk's activation alive.
            value = value.to(self.device, copy=True) if self.device is not None else value.clone()
        self._state[id(layer)] = value


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d padded spatially on both sides and temporally only on the past side (2 * padding_t frames).

    With a cache, the previous chunk's last input frames replace (part of) the zero padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.history = 2 * pt          # past frames this conv needs
        self.spatial_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        if self.history == 0:
            return super().forward(F.pad(x, self.spatial_pad))
        past = cache.get(self, x) if cache is not None else None
        if past is not None:
            x = torch.cat([past, x], dim=2)
        if cache is not None:
            cache.put(self, x[:, :, -self.history:])
        missing = self.history - (past.shape[2] if past is not None else 0)
        return super().forward(F.pad(x, self.spatial_pad + (missing, 0)))


class RMSNorm(nn.Module):
    """Channel RMS norm: x / ||x||_channels * sqrt(C) * gamma. `gamma` is [C,1,1,1] for video, [C,1,1] for images."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm is taken in fp32: half-precision sums of squares lose too much over hundreds of channels.
        y = F.normalize(x.float(), dim=1).to(x.dtype)
        return y * self.scale * self.gamma.to(x.dtype)


class Upsample2x(nn.Module):
    """Nearest 2x spatial upsampling of [N, C, H, W] (equals torch's "nearest-exact" for a factor of 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D module to every frame: [B, C, T, H, W] -> [B*T, C, H, W] -> fn -> [B, C', T, H', W']."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """Spatial 2x down/up sampling, optionally with the temporal 2x step (see the module docstring)."""

    def __init__(self, dim: int, mode: str, up_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # 2.1: the conv halves the channels (the next stage's first residual block expects dim // 2); the 2.2
            # decoder keeps them (`up_dim=dim`).
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, up_dim or dim // 2, 3, padding=1))
        else:
            # Pad right/bottom only, then a stride-2 conv: H -> H/2 for even H.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cache)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cache)
        return x

    def _time_upsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C, 2T, H, W]; the very first chunk passes through (1 frame stays 1 frame).
        seen_key = self.resample  # a second key: "first chunk already seen", separate from the conv's history
        if seen_key not in cache:
            cache.put(seen_key, True)
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)                           # [B, 2C, T, H, W]
        # Channels [0:C] are the earlier output frame, [C:2C] the later one: interleave them in time.
        return y.unflatten(1, (2, c)).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)

    def _time_downsample(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, C, T/2, H, W] (T even), first chunk (T=1) passes through.
        last = cache.get(self.time_conv, x)
        cache.put(self.time_conv, x[:, :, -1:])
        if last is None:
            return x
        return self.time_conv(torch.cat([last, x], dim=2))    # kernel 3, stride 2, no padding


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        h = x
        for layer in self.residual:
            h = layer(h, cache) if isinstance(layer, CausalConv3d) else layer(h)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C, H, W] -> tokens [N, 1, H*W, C]
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        return x + _per_frame(self._attend, x)


def _run(layers, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample, AttentionBlock)) else layer(x)
    return x


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in [1] + list(cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers, scale = [], 1.0
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1], cfg.dropout)
        self.head = _head(dims[-1], cfg.z_dim * 2)   # mean and log-variance

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, 3, T, H, W] (T = 1 or 4) -> [B, 2*z, 1, H/8, W/8]
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.middle, _run(self.downsamples, x, cache), cache), cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = list(cfg.dim_mult)
        dims = [cfg.dim * m for m in [mult[-1]] + mult[::-1]]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], cfg.dropout)
        layers, scale = [], 1.0 / 2 ** (len(mult) - 2)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2   # the previous Resample's conv halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, z, 1, h, w] -> [B, 3, 1 (first latent frame) or 4, 8h, 8w]
        x = self.conv1(x, cache)
        return _run(self.head, _run(self.upsamples, _run(self.middle, x, cache), cache), cache)


# ----------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------

def to_raw_latents(latents: torch.Tensor) -> torch.Tensor:
    """The DiT's normalized latents -> the VAE's raw ones (what ComfyUI's LATENT holds for Wan 2.1), float32."""
    mean, std = WanVAE._stats(latents.device)
    return latents.float() * std + mean


def from_raw_latents(raw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's LATENT (raw VAE latents) -> the normalized latents the DiT and `WanVAE.decode` take, float32."""
    mean, std = WanVAE._stats(raw.device)
    return (raw.float() - mean) / std


def _check_tiling(tile_size: int, tile_overlap: int, factor: int = SPATIAL_FACTOR) -> None:
    """Tiles are cut in latent pixels, so both sizes must be whole multiples of the VAE's spatial stride."""
    if tile_size == 0:
        return
    if tile_size < 2 * factor or tile_size % factor:
        raise invalid("tile_size", tile_size, f"0 (no tiling) or a multiple of {factor} pixels >= {2 * factor}")
    if tile_overlap < 0 or tile_overlap % factor or tile_overlap >= tile_size:
        raise invalid("tile_overlap", tile_overlap,
                      f"a multiple of {factor} pixels, >= 0 and smaller than tile_size ({tile_size})")


class CausalVideoVAE(nn.Module):
    """What the Wan VAEs share: chunked causal encode/decode, normalization, tiling and input checks.

    A subclass builds `encoder`, `decoder`, `conv1` (posterior 1x1) and `conv2` (post-quant 1x1), sets the class
    attributes below and maps one chunk through its encoder / decoder (`_encode_chunk`, `_decode_chunk`).
    Callers read `latent_channels` (z) and `stride` (time, height, width) instead of asking which VAE this is.

    Instance defaults (overridable per call): `cache_device` (None = compute device; "cpu" = Musubi's
    vae_cache_cpu), `tile_size` (pixels, 0 = no tiling), `tile_overlap` (pixels)."""

    family = "wan"
    display_name = "Wan VAE"
    stride: tuple = (TEMPORAL_FACTOR, SPATIAL_FACTOR, SPATIAL_FACTOR)   # video pixels per latent (t, h, w)
    latent_mean: tuple = ()
    latent_std: tuple = ()

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.cache_device: str | None = None
        self.tile_size = 0
        self.tile_overlap = 64

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    def _encode_chunk(self, video: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """[B, 3, 1 or 4, H, W] -> encoder features [B, 2z, 1, h, w] (before `conv1`)."""
        raise NotImplementedError

    def _decode_chunk(self, z: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """One latent frame after `conv2` [B, z, 1, h, w] -> RGB [B, 3, 1 (first chunk) or 4, H, W]."""
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------------------------------
    @property
    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    @classmethod
    def _stats(cls, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # [1, z, 1, 1, 1] float32; kept out of the state dict so checkpoints need no extra tensors.
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(cls.latent_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(cls.latent_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def to_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (DiT / `decode` input) -> raw VAE latents (ComfyUI's LATENT), float32."""
        mean, std = self._stats(latents.device)
        return latents.float() * std + mean

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (ComfyUI's LATENT) -> normalized latents, float32."""
        mean, std = self._stats(raw.device)
        return (raw.float() - mean) / std

    def _options(self, tile_size, tile_overlap, cache_device):
        tile_size = self.tile_size if tile_size is None else tile_size
        tile_overlap = self.tile_overlap if tile_overlap is None else tile_overlap
        cache_device = self.cache_device if cache_device is None else cache_device
        _check_tiling(tile_size, tile_overlap, self.stride[1])
        return tile_size, tile_overlap, cache_device

    # --- encode -----------------------------------------------------------------------------------------------
    def validate_video(self, video) -> None:
        st, ss = self.stride[0], self.stride[1]
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or not video.is_floating_point():
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise invalid("video", got, "a float tensor [B, 3, F, H, W] in [-1, 1]")
        _, c, f, h, w = video.shape
        if c != 3:
            raise invalid("video channels", c, "3 (RGB) in [B, 3, F, H, W]")
        if f < 1 or (f - 1) % st:
            raise invalid("video frames", f, "4k+1 frames (1, 5, 9, ..., 81)")
        if h < ss or w < ss or h % ss or w % ss:
            raise invalid("video size (H, W)", (h, w), f"height and width divisible by {ss}")

    @torch.no_grad()
    def encode_mean(self, video: torch.Tensor, cache_device=None) -> torch.Tensor:
        """Raw posterior mean [B, z, 1+(F-1)/4, H/s, W/s] (float32, compute device), no tiling, no normalization."""
        self.validate_video(video)
        st = self.stride[0]
        cache = FeatureCache(cache_device)
        dev, dt = self._param.device, self._param.dtype
        # Frame 0 alone, then groups of 4 (F = 4k+1 is validated, so every group is full).
        chunks = [video[:, :, :1]] + [video[:, :, s:s + st] for s in range(1, video.shape[2], st)]
        means = []
        for chunk in chunks:
            h = self._encode_chunk(chunk.to(dev, dt), cache)        # [B, 2z, 1, H/s, W/s]
            mu, _log_var = self.conv1(h).chunk(2, dim=1)
            means.append(mu.float())
        return torch.cat(means, dim=2)

    def encode(self, video: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None,
               cache_device=None) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, z, (F-1)/4+1, H/s, W/s], video's dtype/device
        (s = stride[1]: 8 for 2.1, 16 for 2.2)."""
        self.validate_video(video)
        tile_size, tile_overlap, cache_device = self._options(tile_size, tile_overlap, cache_device)
        ss = self.stride[1]
        run = lambda v: self.encode_mean(v, cache_device)  # noqa: E731
        if tile_size and max(video.shape[-2:]) > tile_size:
            mu = tiled_apply(run, video, tile_size, tile_overlap, 1 / ss, tile_overlap // ss)
        else:
            mu = run(video)
        mean, std = self._stats(mu.device)
        return ((mu - mean) / std).to(video.device, video.dtype)

    # --- decode -----------------------------------------------------------------------------------------------
    def validate_latents(self, latents) -> None:
        z = self.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or not latents.is_floating_point():
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise invalid("latents", got, f"a float tensor [B, {z}, F, H, W]")
        if latents.shape[1] != z:
            raise invalid("latent channels", latents.shape[1], f"{z} ({self.display_name} latents)")
        if latents.shape[2] < 1 or min(latents.shape[-2:]) < 1:
            raise invalid("latents shape", tuple(latents.shape), "at least one latent frame and pixel")

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor, cache_device=None) -> torch.Tensor:
        """Normalized latents [B, z, T, h, w] -> unclamped video [B, 3, 1+4(T-1), s*h, s*w] (float32, compute
        device)."""
        self.validate_latents(latents)
        st, ss = self.stride[0], self.stride[1]
        cache = FeatureCache(cache_device)
        dev, dt = self._param.device, self._param.dtype
        mean, std = self._stats(dev)
        b, _, t, h, w = latents.shape
        out = torch.empty(b, 3, 1 + st * (t - 1), h * ss, w * ss, device=dev)
        start = 0
        for i in range(t):
            z = latents[:, :, i:i + 1].to(dev).float() * std + mean   # undo the normalization in fp32
            frames = self._decode_chunk(self.conv2(z.to(dt)), cache)  # [B, 3, 1 (i = 0) or 4, s*h, s*w]
            out[:, :, start:start + frames.shape[2]] = frames
            start += frames.shape[2]
        return out

    def decode(self, latents: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None,
               cache_device=None) -> torch.Tensor:
        """latents [B, z, T, h, w] -> video [B, 3, 1+4(T-1), s*h, s*w] clamped to [-1, 1], latents' dtype/device.

        `tile_size`/`tile_overlap` are in pixels (divided by the spatial stride s in latent space)."""
        self.validate_latents(latents)
        tile_size, tile_overlap, cache_device = self._options(tile_size, tile_overlap, cache_device)
        ss = self.stride[1]
        run = lambda z: self.decode_raw(z, cache_device)  # noqa: E731
        lt, lo = tile_size // ss, tile_overlap // ss
        if tile_size and max(latents.shape[-2:]) > lt:
            video = tiled_apply(run, latents, lt, lo, ss, tile_overlap)
        else:
            video = run(latents)
        return video.clamp_(-1.0, 1.0).to(latents.device, latents.dtype)


class WanVAE(CausalVideoVAE):
    """Wan 2.1 VAE. `encode`/`decode` run without autograd, chunk by chunk, on the module's device and dtype."""

    display_name = "Wan 2.1 VAE"
    stride = (TEMPORAL_FACTOR, SPATIAL_FACTOR, SPATIAL_FACTOR)
    latent_mean = LATENT_MEAN
    latent_std = LATENT_STD

    def __init__(self, cfg: WanVAEConfig | None = None):
        cfg = cfg or WanVAEConfig()
        super().__init__(cfg)
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    def _encode_chunk(self, video: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return self.encoder(video, cache)

    def _decode_chunk(self, z: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return self.decoder(z, cache)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: config inference, loading, tiny preset
# ----------------------------------------------------------------------------------------------------------------

_VAE_PREFIXES = ("first_stage_model.", "vae.", "model.")


def _describe_foreign(keys: set[str]) -> str | None:
    """A human description when the file is clearly some other model, else None."""
    if any(k.startswith("blocks.0.self_attn.") for k in keys) or "patch_embedding.weight" in keys:
        return "a Wan DiT (diffusion model) checkpoint (found 'blocks.0.self_attn.*' / 'patch_embedding.weight')"
    if any(k.startswith(("encoder.block.", "shared.", "token_embedding.")) for k in keys):
        return "a text encoder checkpoint (T5-style keys)"
    return None


# diffusers' AutoencoderKLWan names -> official names (diffusers `vae/diffusion_pytorch_model.safetensors`).
_DIFFUSERS_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                     "conv_shortcut": "shortcut"}
_DIFFUSERS_TOP = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
_DIFFUSERS_PART = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2.",
                   "mid_block.resnets.0.": "middle.0.", "mid_block.attentions.0.": "middle.1.",
                   "mid_block.resnets.1.": "middle.2."}


def _is_diffusers_layout(keys) -> bool:
    return "encoder.conv_in.weight" in keys and "quant_conv.weight" in keys


def _from_diffusers_key(key: str, up_stride: int) -> str:
    """One diffusers key -> official key. Decoder stage i holds `up_stride - 1` residual blocks then its upsampler,
    flattened into the official `decoder.upsamples.N` list (Wan 2.1 has no attention blocks there)."""
    for a, b in _DIFFUSERS_TOP.items():
        if key.startswith(a):
            return b + key[len(a):]
    side, rest = key.split(".", 1)                     # "encoder" | "decoder", the rest
    for a, b in _DIFFUSERS_PART.items():
        if rest.startswith(a):
            rest = b + rest[len(a):]
            break
    parts = rest.split(".")
    if parts[0] == "down_blocks":                      # same flat list as the official one
        parts[0] = "downsamples"
    elif parts[0] == "up_blocks":                      # up_blocks.i.resnets.j.* / up_blocks.i.upsamplers.0.*
        stage, kind, j = int(parts[1]), parts[2], int(parts[3])
        index = stage * up_stride + (j if kind == "resnets" else up_stride - 1)
        parts = ["upsamples", str(index)] + parts[4:]
    # Residual block internals: <list>.<N>.<name>.<param>
    if len(parts) == 4 and parts[2] in _DIFFUSERS_RESNET:
        parts[2] = _DIFFUSERS_RESNET[parts[2]]
    return ".".join([side] + parts)


def _official_view(ckpt: Checkpoint) -> Checkpoint:
    keys = set(ckpt.keys())
    if not _is_diffusers_layout(keys):
        return ckpt
    from . import vae22

    if vae22.DIFFUSERS_MARKER in keys:                 # the 2.2 layout (is_residual=True)
        n = vae22.diffusers_num_res_blocks(keys)
        return ckpt.renamed(lambda k: vae22.from_diffusers_key(k, n))
    resnets = {int(k.split(".")[4]) for k in ckpt.keys() if k.startswith("decoder.up_blocks.0.resnets.")}
    return ckpt.renamed(lambda k: _from_diffusers_key(k, len(resnets) + 1))


def infer_vae_config(ckpt: Checkpoint):
    """Derive the architecture from tensor shapes and key names (official names: see `_open_vae_checkpoint`).

    Returns a `WanVAEConfig` for a Wan 2.1 VAE or a `vae22.WanVAE22Config` for a Wan 2.2 one (`config.version` says
    which). Raises MusubiInputError for non-VAE files."""
    keys = set(ckpt.keys())
    required = ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight",
                "encoder.head.2.weight")
    missing = [k for k in required if k not in keys]
    if missing:
        what = _describe_foreign(keys) or f"no {missing[0]!r} among {len(keys)} tensors, e.g. {sorted(keys)[:3]}"
        raise invalid(f"VAE file {ckpt.source}", what, "a Wan VAE checkpoint (Wan2.1_VAE.pth / wan_2.1_vae.safetensors "
                      "or Wan2.2_VAE.pth / wan2.2_vae.safetensors)")
    from . import vae22

    if vae22.is_vae22_keys(keys):
        return vae22.infer_vae22_config(ckpt)

    dim, in_ch = ckpt.shape("encoder.conv1.weight")[:2]
    z_dim = ckpt.shape("conv2.weight")[0]
    if z_dim != 16 or in_ch != 3:
        raise invalid(f"VAE file {ckpt.source}", f"{z_dim} latent channels, {in_ch} input channels in the Wan 2.1 layout",
                      "a Wan 2.1 VAE (16 latent channels, RGB input) or a complete Wan 2.2 VAE (nested "
                      "'encoder.downsamples.N.downsamples.M' blocks)")

    # Walk encoder.downsamples.N: residual blocks (with output width), attention blocks, resamples (+time_conv).
    idx = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.downsamples.")})
    stages: list[list[int]] = [[]]          # residual-block output widths per stage
    temporal, attn_scales, scale = [], [], 1.0
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in keys:
            stages[-1].append(ckpt.shape(p + "residual.2.weight")[0])
        elif p + "to_qkv.weight" in keys:
            if scale not in attn_scales:
                attn_scales.append(scale)
        elif p + "resample.1.weight" in keys:
            temporal.append(p + "time_conv.weight" in keys)
            stages.append([])
            scale /= 2.0
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts or any(w % dim for s in stages for w in s):
        raise invalid(f"VAE file {ckpt.source}", f"encoder stage widths {stages}",
                      "the Wan VAE layout (equal residual blocks per stage, widths multiple of the base dim)")
    return WanVAEConfig(z_dim=z_dim, dim=dim, dim_mult=[s[0] // dim for s in stages], num_res_blocks=counts.pop(),
                        attn_scales=attn_scales, temporal_downsample=temporal)


def _open_vae_checkpoint(path) -> Checkpoint:
    """Official, ComfyUI or diffusers files, as a view with official key names."""
    return _official_view(Checkpoint.open(path).strip_prefix(_VAE_PREFIXES))


def load_wan_vae(source: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 cache_device: str | None = None) -> CausalVideoVAE:
    """Load a Wan VAE from a `.pth`/`.safetensors` file (official, ComfyUI or diffusers names) or a preset built
    in memory (`"preset:tiny-vae"`, `"preset:tiny-vae22"`): a `WanVAE` for a 2.1 file, a `vae22.WanVAE22` for a
    2.2 one (read `latent_channels` / `stride`; refusing the wrong one is the caller's job).

    Weights are streamed one tensor at a time into a module built on the meta device."""
    from . import vae22

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise invalid("vae dtype", dtype, "torch.float32, torch.float16 or torch.bfloat16")
    if isinstance(source, str) and source.startswith("preset:"):
        presets = {TINY_VAE_PRESET: (WanVAE, tiny_vae_config, build_vae_preset_state_dict),
                   vae22.TINY_VAE22_PRESET: (vae22.WanVAE22, vae22.tiny_vae22_config,
                                             vae22.build_vae22_preset_state_dict)}
        if source not in presets:
            raise invalid("VAE preset", source, " or ".join(map(repr, presets)))
        cls, config, weights = presets[source]
        vae = cls(config())
        vae.load_state_dict(weights())
        vae = vae.to(device=device, dtype=dtype)
    else:
        ckpt = _open_vae_checkpoint(source)
        cfg = infer_vae_config(ckpt)
        with torch.device("meta"):
            vae = (vae22.WanVAE22 if cfg.version == "2.2" else WanVAE)(cfg)
        load_into_module(vae, ckpt, dtype=dtype, device=device, strict=True)
    vae.cache_device = cache_device
    return vae.eval().requires_grad_(False)


def build_vae_preset_state_dict(seed: int = 0, cfg: WanVAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights (official key names) for `cfg` (default: the tiny preset).

    Scaled so activations stay O(1) through the network: convs ~ N(0, 1/fan_in), small biases, RMS-norm gains
    near 1 (not exactly 1, so a swapped gain would show up in tests). With the tiny config a random clip encodes to
    normalized latents of std ~0.4 and decodes to pixels of std ~0.4 (a few % at the clamp)."""
    cfg = cfg or tiny_vae_config()
    with torch.device("meta"):
        model = WanVAE(cfg)
    return random_vae_weights(model, seed)


def random_vae_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random float32 tensors for every entry of `model`'s state dict (meta-built is fine), in
    sorted key order: convs ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), RMS-norm gains ~ 1 + N(0, 0.1^2)."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".gamma"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = t
    return out


def write_vae_preset(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny preset as a ComfyUI-style safetensors file (or `.pth` by extension); returns the path."""
    from ...atomic import save_weights_atomic

    path = Path(path)
    sd = {k: v.to(dtype) for k, v in build_vae_preset_state_dict(seed).items()}
    save_weights_atomic(sd, path, metadata={"musubi_preset": "tiny-vae"})
    return path


__all__ = [
    "LATENT_MEAN", "LATENT_STD", "TINY_VAE_PRESET", "from_raw_latents", "to_raw_latents", "WanVAEConfig", "WanVAE", "FeatureCache", "tiny_vae_config",
    "CausalVideoVAE", "infer_vae_config", "load_wan_vae", "build_vae_preset_state_dict", "random_vae_weights",
    "write_vae_preset",
]
