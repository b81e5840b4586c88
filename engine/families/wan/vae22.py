"""Wan 2.2 VAE (TI2V-5B's `Wan2.2_VAE.pth`): 16x spatial and 4x temporal compression to 48 latent channels.

What differs from the 2.1 VAE (`vae.py`, whose layers, feature cache and encode/decode flow this module reuses):
  * the RGB frame is patchified 2x2 into 12 channels before the encoder, and the decoder's 12 output channels are
    un-patchified back, so the conv network itself only downsamples 8x;
  * each encoder stage is one residual "down block": its residual blocks and resample, plus a parameter-free
    shortcut that folds the stage's (2x)2x2 neighbourhood into channels and averages channel groups down to the
    stage's width (official `AvgDown3D`); decoder stages mirror it with a shortcut that repeats channels and
    unfolds them into the (2x)2x2 neighbourhood (`DupUp3D`). On the first chunk that unfold yields 2 frames where
    the main path yields 1 (its temporal upsample passes frame 0 through), so the shortcut keeps only the later one;
  * the decoder has its own base width (256 vs the encoder's 160) and its upsample convs keep the channel count;
  * latents are normalized with 48 per-channel statistics (official constants).

Official / ComfyUI (`wan2.2_vae.safetensors`) key names, loaded without renaming (diffusers files are renamed):

    encoder.conv1, encoder.downsamples.I.downsamples.J.{residual.{0,2,3,6}, shortcut, resample.1, time_conv},
    encoder.middle.{0,1,2}, encoder.head.{0,2}, conv1, conv2, decoder.conv1, decoder.middle.{0,1,2},
    decoder.upsamples.I.upsamples.J.{...}, decoder.head.{0,2}

Also here: config inference, the diffusers key map, the tiny test preset and the latent->RGB preview factors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import invalid
from .vae import (
    TEMPORAL_FACTOR, CausalConv3d, CausalVideoVAE, FeatureCache, Resample, ResidualBlock, _DIFFUSERS_PART,
    _DIFFUSERS_RESNET, _DIFFUSERS_TOP, _head, _middle, _run, random_vae_weights,
)

# Per-channel statistics of Wan 2.2 posterior means (official constants, Wan2_2_VAE in wan/modules/vae2_2.py).
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

PATCH = 2                        # RGB 2x2 patchify in front of the encoder: 3 -> 12 channels
SPATIAL_FACTOR = 16              # PATCH x the network's 8x
TINY_VAE22_PRESET = "preset:tiny-vae22"


@dataclass
class WanVAE22Config:
    z_dim: int = 48
    dim: int = 160                      # encoder base width; stage i has dim * dim_mult[i] channels
    dec_dim: int = 256                  # decoder base width
    dim_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temporal_downsample: list = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    version: ClassVar[str] = "2.2"      # which Wan VAE a config describes (`WanVAEConfig.version` is "2.1")

    @property
    def temporal_upsample(self) -> list:
        return list(self.temporal_downsample)[::-1]


def tiny_vae22_config() -> WanVAE22Config:
    """Same architecture and key names as the real 2.2 VAE with 10x narrower stages. z_dim stays 48 (what the
    TI2V DiT consumes); the decoder width differs from the encoder's, as in the real file."""
    return WanVAE22Config(dim=16, dec_dim=24)


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, 4C, T, H/2, W/2]; channel c*4 + 2*dw + dh holds pixel (2y + dh, 2x + dw) (the
    official order: the column offset is the slower index)."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // PATCH, PATCH, w // PATCH, PATCH)          # [B, C, T, h, dh, w, dw]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`: [B, 4C, T, h, w] -> [B, C, T, 2h, 2w]."""
    b, c4, t, h, w = x.shape
    x = x.view(b, c4 // (PATCH * PATCH), PATCH, PATCH, t, h, w)          # [B, C, dw, dh, T, h, w]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), t, h * PATCH, w * PATCH)


class AvgDown(nn.Module):
    """Down-block shortcut (official `AvgDown3D`, no weights): every (ft, fs, fs) neighbourhood becomes
    ft*fs*fs channels per input channel, then consecutive groups of those channels are averaged to `out_ch`."""

    def __init__(self, in_ch: int, out_ch: int, ft: int, fs: int):
        super().__init__()
        self.out_ch, self.ft, self.fs = out_ch, ft, fs
        if (in_ch * ft * fs * fs) % out_ch:
            raise ValueError(f"AvgDown: {in_ch}*{ft * fs * fs} channels do not group into {out_ch}")
        self.group = in_ch * ft * fs * fs // out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, out, ceil(T/ft), H/fs, W/fs]; a lone first frame is completed by a zero frame
        # in front (the chunk before frame 0 is "nothing").
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(b, self.out_ch, self.group, t // ft, h // fs, w // fs)
        return x.mean(dim=2)


class DupUp(nn.Module):
    """Up-block shortcut (official `DupUp3D`, no weights): each channel repeated, the copies unfolded into the
    (ft, fs, fs) neighbourhood of `out_ch` channels. The first chunk keeps only the last of its ft frames."""

    def __init__(self, in_ch: int, out_ch: int, ft: int, fs: int):
        super().__init__()
        self.out_ch, self.ft, self.fs = out_ch, ft, fs
        if (out_ch * ft * fs * fs) % in_ch:
            raise ValueError(f"DupUp: {in_ch} channels do not spread over {out_ch}*{ft * fs * fs}")
        self.repeats = out_ch * ft * fs * fs // in_ch

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, C, T, H, W] -> [B, out, ft*T (first chunk: ft*T - ft + 1), fs*H, fs*W]
        first = self not in cache
        if first:
            cache.put(self, True)
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_ch, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_ch, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1:] if first else x


class DownBlock(nn.Module):
    """One encoder stage: residual blocks (+ resample) plus the averaging shortcut (official `Down_ResidualBlock`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool,
                 dropout: float):
        super().__init__()
        self.avg_shortcut = AvgDown(in_dim, out_dim, 2 if temporal else 1, 2 if spatial else 1)
        layers = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return _run(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder stage: residual blocks (+ resample keeping the width) plus the duplicating shortcut on stages
    that upsample (official `Up_ResidualBlock`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, spatial: bool,
                 dropout: float):
        super().__init__()
        self.avg_shortcut = DupUp(in_dim, out_dim, 2 if temporal else 1, 2) if spatial else None
        layers = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if spatial:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", up_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        y = _run(self.upsamples, x, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, cache)


class Encoder3d22(nn.Module):
    def __init__(self, cfg: WanVAE22Config):
        super().__init__()
        dims = [cfg.dim * m for m in [1] + list(cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownBlock(dims[i], dims[i + 1], cfg.num_res_blocks, temporal=i < last and cfg.temporal_downsample[i],
                      spatial=i < last, dropout=cfg.dropout)
            for i in range(len(cfg.dim_mult))])
        self.middle = _middle(dims[-1], cfg.dropout)
        self.head = _head(dims[-1], cfg.z_dim * 2)   # mean and log-variance

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, 12, T, H/2, W/2] (T = 1 or 4) -> [B, 2z, 1, H/16, W/16]
        x = self.conv1(x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        return _run(self.head, _run(self.middle, x, cache), cache)


class Decoder3d22(nn.Module):
    def __init__(self, cfg: WanVAE22Config):
        super().__init__()
        mult = list(cfg.dim_mult)
        dims = [cfg.dec_dim * m for m in [mult[-1]] + mult[::-1]]
        last = len(mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], cfg.dropout)
        self.upsamples = nn.Sequential(*[
            UpBlock(dims[i], dims[i + 1], cfg.num_res_blocks + 1, temporal=i < last and cfg.temporal_upsample[i],
                    spatial=i < last, dropout=cfg.dropout)
            for i in range(len(mult))])
        self.head = _head(dims[-1], 3 * PATCH * PATCH)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        # x: [B, z, 1, h, w] -> [B, 12, 1 (first latent frame) or 4, 8h, 8w]
        x = _run(self.middle, self.conv1(x, cache), cache)
        for block in self.upsamples:
            x = block(x, cache)
        return _run(self.head, x, cache)


# ----------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------

class WanVAE22(CausalVideoVAE):
    """Wan 2.2 VAE: the same API as `WanVAE` (encode / encode_mean / decode / decode_raw, tiling, cache device),
    with `latent_channels` 48 and `stride` (4, 16, 16)."""

    display_name = "Wan 2.2 VAE"
    stride = (TEMPORAL_FACTOR, SPATIAL_FACTOR, SPATIAL_FACTOR)
    latent_mean = LATENT_MEAN
    latent_std = LATENT_STD

    def __init__(self, cfg: WanVAE22Config | None = None):
        cfg = cfg or WanVAE22Config()
        super().__init__(cfg)
        self.encoder = Encoder3d22(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d22(cfg)

    def _encode_chunk(self, video: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return self.encoder(patchify(video), cache)

    def _decode_chunk(self, z: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        return unpatchify(self.decoder(z, cache))


def to_raw_latents(latents: torch.Tensor) -> torch.Tensor:
    """Normalized 2.2 latents (DiT space) -> raw VAE latents (what ComfyUI's LATENT holds for Wan 2.2), float32."""
    mean, std = WanVAE22._stats(latents.device)
    return latents.float() * std + mean


def from_raw_latents(raw: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Wan 2.2 LATENT (raw) -> normalized latents, float32."""
    mean, std = WanVAE22._stats(raw.device)
    return (raw.float() - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: layout detection, config inference, diffusers names, tiny preset
# ----------------------------------------------------------------------------------------------------------------

# A key only the 2.2 layout has (stages nest their blocks), official and diffusers spellings.
OFFICIAL_MARKER = "encoder.downsamples.0.downsamples.0.residual.2.weight"
DIFFUSERS_MARKER = "encoder.down_blocks.0.resnets.0.conv1.weight"


def is_vae22_keys(keys) -> bool:
    """True when official/ComfyUI-named keys have the 2.2 layout (nested down/up blocks)."""
    return OFFICIAL_MARKER in keys


def from_diffusers_key(key: str, num_res_blocks: int) -> str:
    """One diffusers `AutoencoderKLWan(is_residual=True)` key -> official key.

    diffusers keeps a stage's resnets and its down/upsampler apart (`down_blocks.I.resnets.J`,
    `down_blocks.I.downsampler`); the official stage is one list: the resampler follows the residual blocks
    (index num_res_blocks in the encoder, num_res_blocks + 1 in the decoder)."""
    for a, b in _DIFFUSERS_TOP.items():
        if key.startswith(a):
            return b + key[len(a):]
    side, rest = key.split(".", 1)                         # "encoder" | "decoder", the rest
    for a, b in _DIFFUSERS_PART.items():
        if rest.startswith(a):
            rest = b + rest[len(a):]
            break
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        outer = "downsamples" if parts[0] == "down_blocks" else "upsamples"
        if parts[2] == "resnets":                          # <blocks>.I.resnets.J.<name>.<param>
            parts = [outer, parts[1], outer, parts[3]] + parts[4:]
        else:                                              # <blocks>.I.{down,up}sampler.<rest>
            j = num_res_blocks + (0 if outer == "downsamples" else 1)
            parts = [outer, parts[1], outer, str(j)] + parts[3:]
    # Residual block internals: <...>.<N>.<name>.<param>
    if len(parts) >= 3 and parts[-2] in _DIFFUSERS_RESNET:
        parts[-2] = _DIFFUSERS_RESNET[parts[-2]]
    return ".".join([side] + parts)


def diffusers_num_res_blocks(keys) -> int:
    return len({k.split(".")[4] for k in keys if k.startswith("encoder.down_blocks.0.resnets.")})


def infer_vae22_config(ckpt) -> WanVAE22Config:
    """Architecture of a 2.2-layout checkpoint (official names) from tensor shapes and key names."""
    keys = set(ckpt.keys())
    dim, in_ch = ckpt.shape("encoder.conv1.weight")[:2]
    z_dim = ckpt.shape("conv2.weight")[0]
    if in_ch != 3 * PATCH * PATCH:
        raise invalid(f"VAE file {ckpt.source}", f"{in_ch} encoder input channels",
                      f"the Wan 2.2 VAE's {3 * PATCH * PATCH} (2x2-patchified RGB)")
    stages = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.downsamples.")})
    widths, temporal, res_counts = [], [], set()
    for i in stages:
        p = f"encoder.downsamples.{i}.downsamples."
        blocks = sorted({int(k[len(p):].split(".")[0]) for k in keys if k.startswith(p)})
        resnets = [j for j in blocks if f"{p}{j}.residual.2.weight" in keys]
        res_counts.add(len(resnets))
        widths.append(ckpt.shape(f"{p}{resnets[0]}.residual.2.weight")[0] if resnets else 0)
        if i != stages[-1]:
            temporal.append(f"{p}{len(resnets)}.time_conv.weight" in keys)
    if len(res_counts) != 1 or 0 in res_counts or any(w % dim for w in widths) or not widths:
        raise invalid(f"VAE file {ckpt.source}", f"encoder stage widths {widths}, residual blocks {sorted(res_counts)}",
                      "the Wan 2.2 VAE layout (equal residual blocks per stage, widths multiple of the base dim)")
    mult = [w // dim for w in widths]
    dec_top = ckpt.shape("decoder.conv1.weight")[0]        # dec_dim * mult[-1]
    if dec_top % mult[-1]:
        raise invalid(f"VAE file {ckpt.source}", f"decoder width {dec_top}", f"a multiple of {mult[-1]}")
    return WanVAE22Config(z_dim=z_dim, dim=dim, dec_dim=dec_top // mult[-1], dim_mult=mult,
                          num_res_blocks=res_counts.pop(), temporal_downsample=temporal)


def build_vae22_preset_state_dict(seed: int = 0, cfg: WanVAE22Config | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights (official key names) for `cfg` (default: the tiny preset), scaled like
    the 2.1 preset (`random_vae_weights`)."""
    cfg = cfg or tiny_vae22_config()
    with torch.device("meta"):
        model = WanVAE22(cfg)
    return random_vae_weights(model, seed)


def write_vae22_preset(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny 2.2 preset with official names (`.safetensors` like ComfyUI's repackage, `.pth` like the
    official file); returns the path."""
    from ...atomic import save_weights_atomic

    path = Path(path)
    sd = {k: v.to(dtype) for k, v in build_vae22_preset_state_dict(seed).items()}
    save_weights_atomic(sd, path, metadata={"musubi_preset": "tiny-vae22"})
    return path


# ----------------------------------------------------------------------------------------------------------------
# Live preview
# ----------------------------------------------------------------------------------------------------------------

# ComfyUI's Wan 2.2 latent->RGB linear map (comfy/latent_formats.py, Wan22.latent_rgb_factors / _bias), applied to
# normalized latents; [48 channels][R, G, B].
WAN22_RGB_FACTORS = (
    (0.0119, 0.0103, 0.0046), (-0.1062, -0.0504, 0.0165), (0.0140, 0.0409, 0.0491), (-0.0813, -0.0677, 0.0607),
    (0.0656, 0.0851, 0.0808), (0.0264, 0.0463, 0.0912), (0.0295, 0.0326, 0.0590), (-0.0244, -0.0270, 0.0025),
    (0.0443, -0.0102, 0.0288), (-0.0465, -0.0090, -0.0205), (0.0359, 0.0236, 0.0082), (-0.0776, 0.0854, 0.1048),
    (0.0564, 0.0264, 0.0561), (0.0006, 0.0594, 0.0418), (-0.0319, -0.0542, -0.0637), (-0.0268, 0.0024, 0.0260),
    (0.0539, 0.0265, 0.0358), (-0.0359, -0.0312, -0.0287), (-0.0285, -0.1032, -0.1237), (0.1041, 0.0537, 0.0622),
    (-0.0086, -0.0374, -0.0051), (0.0390, 0.0670, 0.2863), (0.0069, 0.0144, 0.0082), (0.0006, -0.0167, 0.0079),
    (0.0313, -0.0574, -0.0232), (-0.1454, -0.0902, -0.0481), (0.0714, 0.0827, 0.0447), (-0.0304, -0.0574, -0.0196),
    (0.0401, 0.0384, 0.0204), (-0.0758, -0.0297, -0.0014), (0.0568, 0.1307, 0.1372), (-0.0055, -0.0310, -0.0380),
    (0.0239, -0.0305, 0.0325), (-0.0663, -0.0673, -0.0140), (-0.0416, -0.0047, -0.0023), (0.0166, 0.0112, -0.0093),
    (-0.0211, 0.0011, 0.0331), (0.1833, 0.1466, 0.2250), (-0.0368, 0.0370, 0.0295), (-0.3441, -0.3543, -0.2008),
    (-0.0479, -0.0489, -0.0420), (-0.0660, -0.0153, 0.0800), (-0.0101, 0.0068, 0.0156), (-0.0690, -0.0452, -0.0927),
    (-0.0145, 0.0041, 0.0015), (0.0421, 0.0451, 0.0373), (0.0504, -0.0483, -0.0356), (-0.0837, 0.0168, 0.0055),
)
WAN22_RGB_BIAS = (0.0317, -0.0878, -0.1388)


def latent_to_rgb_preview22(latents: torch.Tensor, frame: int = 0) -> torch.Tensor:
    """latents [B, 48, F, h, w] or [48, F, h, w] -> float32 RGB [h, w, 3] in [0, 1] of sample 0, latent `frame`
    (a cheap approximation at 1/16 resolution; no VAE). The 2.2 twin of `pipeline.latent_to_rgb_preview`."""
    given = tuple(latents.shape)
    if latents.ndim == 5:
        latents = latents[0]
    if latents.ndim != 4 or latents.shape[0] != len(WAN22_RGB_FACTORS):
        raise invalid("latents", given, "[B, 48, F, h, w] or [48, F, h, w] Wan 2.2 latents")
    x = latents[:, frame].float().movedim(0, -1)                               # [h, w, 48]
    w = torch.tensor(WAN22_RGB_FACTORS, device=x.device)                        # [48, 3]
    rgb = x @ w + torch.tensor(WAN22_RGB_BIAS, device=x.device)                 # [h, w, 3] in ~[-1, 1]
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


__all__ = [
    "LATENT_MEAN", "LATENT_STD", "TINY_VAE22_PRESET", "WanVAE22Config", "WanVAE22", "tiny_vae22_config",
    "patchify", "unpatchify", "to_raw_latents", "from_raw_latents", "infer_vae22_config", "is_vae22_keys",
    "build_vae22_preset_state_dict", "write_vae22_preset", "WAN22_RGB_FACTORS", "WAN22_RGB_BIAS",
    "latent_to_rgb_preview22",
]
