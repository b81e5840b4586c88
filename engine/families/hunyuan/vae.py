"""HunyuanVideo causal 3D VAE ("884-16c-hy", the official AutoencoderKLCausal3D): 8x spatial and 4x temporal
compression to 16 latent channels. FramePack uses the same VAE.

Module names are the official ones (`hunyuan-video-t2v-720p/vae/pytorch_model.pt`). diffusers'
`AutoencoderKLHunyuanVideo` uses the very same names (its converter renames nothing), and so does the
`hunyuan_video_vae_bf16.safetensors` that the HunyuanVideoWrapper ships:

    encoder.conv_in.conv, encoder.down_blocks.N.resnets.M.{norm1, conv1.conv, norm2, conv2.conv, conv_shortcut.conv},
    encoder.down_blocks.N.downsamplers.0.conv.conv, encoder.mid_block.resnets.{0,1},
    encoder.mid_block.attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}, encoder.conv_norm_out,
    encoder.conv_out.conv,
    quant_conv, post_quant_conv, decoder.conv_in.conv, decoder.mid_block.*, decoder.up_blocks.N.resnets.M.*,
    decoder.up_blocks.N.upsamplers.0.conv.conv, decoder.conv_norm_out, decoder.conv_out.conv

ComfyUI's repackaged `split_files/vae/hunyuan_video_vae_bf16.safetensors` is in ComfyUI's own (ldm) layout instead
(`encoder.down.N.block.M`, `decoder.up.<reversed N>.block.M`, `mid.block_1`, `mid.attn_1.{norm,q,k,v,proj_out}` as
1x1x1 convs, `nin_shortcut`, `norm_out`); it is renamed to the official names on load.

Every 3D conv is causal in time: replicate padding of k-1 copies of the first frame in front (none behind) and k//2
replicated pixels on each spatial side. Unlike Wan's VAE the network is *not* streamed chunk by chunk: its GroupNorms
take statistics over all frames and the mid-block attention spans all frames (frame-causal: pixels of frame t attend
to frames <= t), so a clip goes through in one pass. The first frame is special: a stride-2 temporal downsample of
4k+1 frames keeps 2k+1 (frame 0 plus pairs), and the decoder's temporal upsample never doubles frame 0, so
F = 4k+1 frames map to k+1 latent frames and back.

Memory: optional spatial tiling (overlapping pixel tiles, blended) and temporal tiling (overlapping windows of latent
frames, blended), as the official and diffusers VAEs do, plus exact time-chunked causal convs. With the defaults
(256 px tiles / 64 px overlap, 64-frame windows / 16-frame overlap, 16-frame conv chunks) a 720p x 129-frame bf16
decode peaks at an estimated ~9.5 GB: ~6.7 GB inside one 256 px x 65-frame tile (input, GroupNorm output and conv
output of the first full-resolution resnet, 256 -> 128 channels), ~2.2 GB of float32 blending buffers, 0.5 GB of
weights. (An estimate from tensor sizes, not a GPU measurement.)

Latents: the DiT consumes (and Musubi caches) the posterior mean times 0.476986 (`to_latent` / `from_latent`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...checkpoint import Checkpoint, load_into_module
from ...errors import invalid
from ...tiling import temporal_tiled_apply, tiled_apply

SCALING_FACTOR = 0.476986
SPATIAL_FACTOR = 8
TEMPORAL_FACTOR = 4
TINY_VAE_PRESET = "preset:tiny-vae"


@dataclass
class HunyuanVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 512, 512)   # encoder stage widths; the decoder runs them in reverse
    layers_per_block: int = 2                          # encoder resnets per stage (decoder: one more)
    norm_num_groups: int = 32

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if len(self.block_out_channels) != 4:
            raise invalid("block_out_channels", self.block_out_channels,
                          "4 stages (the 884 layout: 3 spatial and 2 temporal 2x steps)")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise invalid("norm_num_groups", self.norm_num_groups,
                          f"a divisor of every stage width {self.block_out_channels}")

    # Stage i halves space for i < 3 (8x) and halves time for the two stages before the last (4x).
    def spatial_step(self, i: int) -> bool:
        return i < 3

    def temporal_step(self, i: int) -> bool:
        return len(self.block_out_channels) - 3 <= i < len(self.block_out_channels) - 1


def tiny_vae_config() -> HunyuanVAEConfig:
    """Same architecture and key names as the real VAE, 16x narrower. latent_channels stays 16 (the DiT's input)."""
    return HunyuanVAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=4)


def _silu(x: torch.Tensor) -> torch.Tensor:
    # In place when no graph is recorded: the norm output it overwrites is a fresh temporary.
    return F.silu(x, inplace=not torch.is_grad_enabled())


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """Conv3d (no padding of its own) behind causal replicate padding: k-1 copies of frame 0 in front, k//2 replicated
    pixels on each spatial side. Weights live in `.conv` (official keys `*.conv.weight`).

    `chunk` > 0 computes at most that many output frames per conv call, gathering each piece's padded input
    (k-1 frames of history) on the fly: exact, and it never materializes a padded copy of the whole input."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride=1):
        super().__init__()
        self.conv = nn.Conv3d(in_ch, out_ch, kernel_size, stride=stride)
        k = kernel_size
        self.spatial_pad = (k // 2, k // 2, k // 2, k // 2, 0, 0)     # (W, W, H, H, T, T); replicate needs all 3
        self.chunk = 0

    def forward(self, x: torch.Tensor, frames=None, num_frames: int | None = None) -> torch.Tensor:
        """x: [B, C, T, H, W] -> [B, C_out, T_out, H_out, W_out], T_out = (T - 1) // stride_t + 1.

        `frames(idx)`, when given, produces the input frames at indices `idx` (a LongTensor) of a virtual input of
        `num_frames` frames (the temporal upsampler's output, never materialized as a whole)."""
        kt, st = self.conv.kernel_size[0], self.conv.stride[0]
        t_in = x.shape[2] if frames is None else num_frames
        t_out = (t_in - 1) // st + 1                       # after k-1 frames of front padding
        if frames is None and (self.chunk <= 0 or t_out <= self.chunk):
            pad = self.spatial_pad[:4] + (kt - 1, 0)
            return self.conv(F.pad(x, pad, mode="replicate") if any(pad) else x)
        if frames is None:
            frames = lambda idx: x.index_select(2, idx)  # noqa: E731
        step = self.chunk if self.chunk > 0 else t_out
        out = None
        for o0 in range(0, t_out, step):
            o1 = min(o0 + step, t_out)
            # Padded positions [o0*st, (o1-1)*st + kt) are input frames shifted by the kt-1 front copies of frame 0.
            idx = (torch.arange(o0 * st, (o1 - 1) * st + kt, device=x.device) - (kt - 1)).clamp_(min=0)
            piece = frames(idx)
            if any(self.spatial_pad):
                piece = F.pad(piece, self.spatial_pad, mode="replicate")
            y = self.conv(piece)                           # [B, C_out, o1-o0, H_out, W_out]
            if out is None:
                out = y.new_empty(*y.shape[:2], t_out, *y.shape[3:])
            out[:, :, o0:o1] = y
            del piece, y
        return out


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = CausalConv3d(in_ch, out_ch, 3)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = CausalConv3d(out_ch, out_ch, 3)
        self.conv_shortcut = CausalConv3d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, T, H, W] -> [B, C_out, T, H, W]
        h = self.conv1(_silu(self.norm1(x)))
        h = self.conv2(_silu(self.norm2(h)))
        return h.add_(self.conv_shortcut(x) if self.conv_shortcut is not None else x)


class Attention(nn.Module):
    """Single-head self-attention over every pixel of every frame, frame-causal, with a residual connection.

    GroupNorm statistics span all frames (the official block normalizes the flattened [B, C, T*H*W] sequence)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, H, W]; tokens [B, 1, T*H*W, C] ordered frame by frame
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        del tokens
        n = h * w
        out = torch.empty_like(q)
        # Frame-causal mask, applied by slicing: frame i's queries see keys of frames 0..i. No [N, N] mask tensor,
        # and every call can use a fused kernel.
        for i in range(t):
            out[:, :, i * n:(i + 1) * n] = F.scaled_dot_product_attention(
                q[:, :, i * n:(i + 1) * n], k[:, :, :(i + 1) * n], v[:, :, :(i + 1) * n])
        del q, k, v
        y = self.to_out[0](out.squeeze(1))                 # [B, T*H*W, C]
        return x + y.transpose(1, 2).reshape(b, c, t, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Causal conv with stride (2 or 1 in time, 2 in space): T -> (T-1)//2 + 1 keeps frame 0 as its own step."""

    def __init__(self, ch: int, stride: tuple):
        super().__init__()
        self.conv = CausalConv3d(ch, ch, 3, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling (space; time too if `temporal`, frame 0 excepted) followed by a causal conv.

    [B, C, T, H, W] -> [B, C, 1 + 2(T-1) or T, 2H, 2W]. The upsampled tensor is produced piece by piece inside the
    conv (see `CausalConv3d.forward`), so only the conv's output is ever full size."""

    def __init__(self, ch: int, temporal: bool):
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(ch, ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        t_up = 1 + 2 * (t - 1) if self.temporal else t
        # Upsampled frame u comes from source frame 0 (u = 0) or 1 + (u-1)//2: frame 0 is not doubled.
        src = torch.arange(t_up, device=x.device)
        if self.temporal:
            src = (src + 1) // 2

        def frames(idx: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x.index_select(2, src[idx]), scale_factor=(1, 2, 2), mode="nearest")

        return self.conv(x, frames, t_up)


class DownBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, stride: tuple | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch, stride)]) if stride else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool, temporal: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch, temporal)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3)
        blocks = []
        for i, out_ch in enumerate(ch):
            stride = (2 if cfg.temporal_step(i) else 1, 2, 2) if cfg.spatial_step(i) else None
            blocks.append(DownBlock(ch[max(i - 1, 0)], out_ch, cfg.layers_per_block, g, stride))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3)   # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, 4k+1, H, W] -> [B, 2z, k+1, H/8, W/8]
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(_silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: HunyuanVAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.latent_channels, ch[0], 3)
        self.mid_block = MidBlock(ch[0], g)
        blocks = []
        for i, out_ch in enumerate(ch):
            last = i == len(ch) - 1
            blocks.append(UpBlock(ch[max(i - 1, 0)], out_ch, cfg.layers_per_block + 1, g,
                                  upsample=not last and cfg.spatial_step(i), temporal=cfg.temporal_step(i)))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, z, T, h, w] -> [B, 3, 1 + 4(T-1), 8h, 8w]
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------------------------------------------
# Latent scaling and temporal tiling
# ----------------------------------------------------------------------------------------------------------------

def to_latent(raw: torch.Tensor) -> torch.Tensor:
    """VAE latents (posterior mean or sample) -> the DiT's latents (what Musubi caches): x 0.476986, float32."""
    return raw.float() * SCALING_FACTOR


def from_latent(latents: torch.Tensor) -> torch.Tensor:
    """The DiT's latents -> VAE latents: / 0.476986, float32."""
    return latents.float() / SCALING_FACTOR


# ComfyUI's LATENT holds the VAE's own latents (its HunyuanVideo latent format applies the same factor); names
# parallel to the Wan VAE module's.
to_raw_latents = from_latent
from_raw_latents = to_latent


def _check_tiling(tile_size: int, tile_overlap: int, temporal_tile: int, temporal_overlap: int) -> None:
    if tile_size:
        if tile_size < 2 * SPATIAL_FACTOR or tile_size % SPATIAL_FACTOR:
            raise invalid("tile_size", tile_size,
                          f"0 (no spatial tiling) or a multiple of {SPATIAL_FACTOR} pixels >= 16")
        if tile_overlap < 0 or tile_overlap % SPATIAL_FACTOR or tile_overlap >= tile_size:
            raise invalid("tile_overlap", tile_overlap,
                          f"a multiple of {SPATIAL_FACTOR} pixels, >= 0 and smaller than tile_size ({tile_size})")
    if temporal_tile:
        if temporal_tile < 2 * TEMPORAL_FACTOR or temporal_tile % TEMPORAL_FACTOR:
            raise invalid("temporal_tile", temporal_tile,
                          f"0 (no temporal tiling) or a multiple of {TEMPORAL_FACTOR} frames >= 8")
        if temporal_overlap < 0 or temporal_overlap % TEMPORAL_FACTOR or temporal_overlap >= temporal_tile:
            raise invalid("temporal_overlap", temporal_overlap,
                          f"a multiple of {TEMPORAL_FACTOR} frames, >= 0 and smaller than temporal_tile "
                          f"({temporal_tile})")


# ----------------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------------

class HunyuanVAE(nn.Module):
    """HunyuanVideo VAE. `encode`/`decode` run without autograd on the module's device and dtype.

    Instance defaults (overridable per call; 0 turns a tiling off): `tile_size`/`tile_overlap` (pixels, spatial),
    `temporal_tile`/`temporal_overlap` (video frames). `conv_chunk` (output frames per causal-conv call, 0 = all)
    is exact and only trades speed for memory."""

    family = "hunyuan"

    def __init__(self, cfg: HunyuanVAEConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or HunyuanVAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)
        # Defaults of the official model / Musubi (sample tile 256 px with 1/4 overlap, 64-frame windows with 1/4).
        self.tile_size = 256
        self.tile_overlap = 64
        self.temporal_tile = 64
        self.temporal_overlap = 16
        self.conv_chunk = 16

    @property
    def conv_chunk(self) -> int:
        return self._conv_chunk

    @conv_chunk.setter
    def conv_chunk(self, frames: int) -> None:
        if not isinstance(frames, int) or frames < 0:
            raise invalid("conv_chunk", frames, "0 (whole clip per conv) or a positive number of frames")
        self._conv_chunk = frames
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.chunk = frames

    @property
    def _param(self) -> torch.Tensor:
        return self.post_quant_conv.weight

    def _options(self, tile_size, tile_overlap, temporal_tile, temporal_overlap):
        opts = tuple(default if value is None else value for value, default in (
            (tile_size, self.tile_size), (tile_overlap, self.tile_overlap),
            (temporal_tile, self.temporal_tile), (temporal_overlap, self.temporal_overlap)))
        _check_tiling(*opts)
        return opts

    # --- encode -----------------------------------------------------------------------------------------------
    def validate_video(self, video) -> None:
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or not video.is_floating_point():
            got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise invalid("video", got, "a float tensor [B, 3, F, H, W] in [-1, 1]")
        _, c, f, h, w = video.shape
        if c != self.config.in_channels:
            raise invalid("video channels", c, "3 (RGB) in [B, 3, F, H, W]")
        if f < 1 or (f - 1) % TEMPORAL_FACTOR:
            raise invalid("video frames", f, "4k+1 frames (1, 5, 9, ..., 129)")
        if h < SPATIAL_FACTOR or w < SPATIAL_FACTOR or h % SPATIAL_FACTOR or w % SPATIAL_FACTOR:
            raise invalid("video size (H, W)", (h, w), f"height and width divisible by {SPATIAL_FACTOR}")

    @torch.no_grad()
    def encode_moments(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior [B, 2z, 1+(F-1)/4, H/8, W/8] (mean, then log-variance; float32, compute device), no tiling."""
        self.validate_video(video)
        h = self.encoder(video.to(self._param.device, self._param.dtype))
        return self.quant_conv(h).float()

    def encode_mean(self, video: torch.Tensor) -> torch.Tensor:
        """Posterior mean [B, z, 1+(F-1)/4, H/8, W/8] (float32, compute device), no tiling, no scaling."""
        return self.encode_moments(video)[:, :self.config.latent_channels]

    def encode(self, video: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None,
               temporal_tile: int | None = None, temporal_overlap: int | None = None, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """video [B, 3, F, H, W] in [-1, 1] -> DiT latents [B, 16, (F-1)/4+1, H/8, W/8] (x 0.476986), video's
        dtype/device. The posterior mean, or with `sample` a draw mean + std * noise (noise from `generator`)."""
        self.validate_video(video)
        ts, to, tt, tto = self._options(tile_size, tile_overlap, temporal_tile, temporal_overlap)

        def spatial(v: torch.Tensor) -> torch.Tensor:
            if ts and max(v.shape[-2:]) > ts:
                return tiled_apply(self.encode_moments, v, ts, to, 1 / SPATIAL_FACTOR, to // SPATIAL_FACTOR)
            return self.encode_moments(v)

        if tt and video.shape[2] > tt + 1:
            moments = temporal_tiled_apply(spatial, video, tt // TEMPORAL_FACTOR, tto // TEMPORAL_FACTOR,
                                           TEMPORAL_FACTOR, 1)
        else:
            moments = spatial(video)
        mean, log_var = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
            device = generator.device if generator is not None else mean.device
            z = mean + std * torch.randn(mean.shape, generator=generator, device=device).to(mean.device)
        return to_latent(z).to(video.device, video.dtype)

    # --- decode -----------------------------------------------------------------------------------------------
    def validate_latents(self, latents) -> None:
        z = self.config.latent_channels
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or not latents.is_floating_point():
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise invalid("latents", got, f"a float tensor [B, {z}, F, H, W]")
        if latents.shape[1] != z:
            raise invalid("latent channels", latents.shape[1], f"{z} (HunyuanVideo VAE latents)")
        if latents.shape[2] < 1 or min(latents.shape[-2:]) < 1:
            raise invalid("latents shape", tuple(latents.shape), "at least one latent frame and pixel")

    @torch.no_grad()
    def _decode_vae_latents(self, raw: torch.Tensor) -> torch.Tensor:
        # raw VAE latents [B, z, T, h, w] -> unclamped video [B, 3, 1 + 4(T-1), 8h, 8w] (float32, compute device)
        x = self.post_quant_conv(raw.to(self._param.device, self._param.dtype))
        return self.decoder(x).float()

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents [B, 16, T, h, w] -> unclamped video [B, 3, 1+4(T-1), 8h, 8w] (float32, compute device),
        no tiling."""
        self.validate_latents(latents)
        return self._decode_vae_latents(from_latent(latents))

    def decode(self, latents: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int | None = None,
               temporal_tile: int | None = None, temporal_overlap: int | None = None) -> torch.Tensor:
        """DiT latents [B, 16, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] clamped to [-1, 1], latents' dtype/device.

        Tile sizes are in pixels / video frames (divided by 8 / 4 in latent space)."""
        self.validate_latents(latents)
        ts, to, tt, tto = self._options(tile_size, tile_overlap, temporal_tile, temporal_overlap)
        raw = from_latent(latents)
        lt, lo = ts // SPATIAL_FACTOR, to // SPATIAL_FACTOR

        def spatial(z: torch.Tensor) -> torch.Tensor:
            if ts and max(z.shape[-2:]) > lt:
                return tiled_apply(self._decode_vae_latents, z, lt, lo, SPATIAL_FACTOR, to)
            return self._decode_vae_latents(z)

        if tt and raw.shape[2] > tt // TEMPORAL_FACTOR + 1:
            video = temporal_tiled_apply(spatial, raw, tt // TEMPORAL_FACTOR, tto // TEMPORAL_FACTOR,
                                         1, TEMPORAL_FACTOR)
        else:
            video = spatial(raw)
        return video.clamp_(-1.0, 1.0).to(latents.device, latents.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: layouts, config inference, loading, tiny preset
# ----------------------------------------------------------------------------------------------------------------

_VAE_PREFIXES = ("vae.", "first_stage_model.", "model.")

# ComfyUI (ldm) names -> official names. Decoder stages are numbered in reverse there (`up.3` is `up_blocks.0`).
_COMFY_RULES = [
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\."), lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\."),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}."),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\."),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_(\d)\."), lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.norm\."), lambda m, n: f"{m[1]}.mid_block.attentions.0.group_norm."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\."),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.to_{m[2]}."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.proj_out\."),
     lambda m, n: f"{m[1]}.mid_block.attentions.0.to_out.0."),
    (re.compile(r"^(encoder|decoder)\.norm_out\."), lambda m, n: f"{m[1]}.conv_norm_out."),
]
_ATTN_PROJ = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _is_comfy_layout(keys) -> bool:
    return "decoder.norm_out.weight" in keys or any(k.startswith("encoder.down.0.block.") for k in keys)


def _from_comfy_key(key: str, stages: int) -> str:
    for pattern, repl in _COMFY_RULES:
        m = pattern.match(key)
        if m:
            key = repl(m, stages) + key[m.end():]
            break
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


class _OfficialView:
    """A checkpoint read under the official names. ComfyUI files are renamed, and their attention projections,
    stored as 1x1x1 convs [C, C, 1, 1, 1], read as the module's Linear weights [C, C] (same numbers)."""

    def __init__(self, ckpt: Checkpoint):
        keys = set(ckpt.keys())
        if _is_comfy_layout(keys):
            stages = len({k.split(".")[2] for k in keys if k.startswith("decoder.up.")})
            ckpt = ckpt.renamed(lambda k: _from_comfy_key(k, stages))
        self._ckpt = ckpt
        self.source = ckpt.source

    def _flat(self, key: str, shape: tuple) -> bool:
        return len(shape) > 2 and _ATTN_PROJ.search(key) is not None and all(d == 1 for d in shape[2:])

    def keys(self) -> list[str]:
        return self._ckpt.keys()

    def weight_keys(self) -> list[str]:
        return self._ckpt.weight_keys()

    def __contains__(self, key: str) -> bool:
        return key in self._ckpt

    def shape(self, key: str) -> tuple:
        shape = tuple(self._ckpt.shape(key))
        return shape[:2] if self._flat(key, shape) else shape

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._ckpt.get(key, dtype)
        return t.flatten(1) if self._flat(key, tuple(t.shape)) else t


def _describe_foreign(keys: set[str]) -> str | None:
    """A human description when the file is clearly some other model, else None."""
    if any(k.endswith(".gamma") for k in keys) or "encoder.conv1.weight" in keys:
        return "a Wan VAE (RMS-norm 'gamma' / 'encoder.conv1' keys)"
    if any(k.startswith(("double_blocks.", "single_blocks.", "img_in.", "txt_in.")) for k in keys):
        return "a HunyuanVideo DiT (diffusion model) checkpoint (found 'double_blocks.*' / 'img_in.*')"
    if any(k.startswith(("blocks.0.self_attn.", "transformer_blocks.", "patch_embedding.", "x_embedder."))
           for k in keys):
        return "a DiT (diffusion model) checkpoint (found transformer block keys)"
    if any(k.startswith(("encoder.block.", "shared.", "token_embedding.", "text_model.", "layers.0.self_attn."))
           for k in keys):
        return "a text encoder checkpoint"
    if "encoder.conv_in.weight" in keys:
        return "an image VAE (2D convs, 'encoder.conv_in.weight' without the causal '.conv' wrapper)"
    return None


def infer_vae_config(ckpt) -> HunyuanVAEConfig:
    """Derive the architecture from tensor shapes and key names (official names). Raises MusubiInputError for files
    that are not a HunyuanVideo VAE.

    GroupNorm's group count is not stored in a file: 32 (every released checkpoint) when all stage widths are
    multiples of 32, else 4 (the narrow test configs)."""
    keys = set(ckpt.keys())
    expected = "a HunyuanVideo VAE (hunyuan-video-t2v-720p/vae/pytorch_model.pt, hunyuan_video_vae_bf16.safetensors)"
    required = ("encoder.conv_in.conv.weight", "decoder.conv_in.conv.weight", "quant_conv.weight",
                "post_quant_conv.weight", "encoder.down_blocks.0.resnets.0.conv1.conv.weight")
    missing = [k for k in required if k not in keys]
    if missing:
        what = _describe_foreign(keys) or f"no {missing[0]!r} among {len(keys)} tensors, e.g. {sorted(keys)[:3]}"
        raise invalid(f"VAE file {ckpt.source}", what, expected)

    in_ch = ckpt.shape("encoder.conv_in.conv.weight")[1]
    z = ckpt.shape("post_quant_conv.weight")[0]
    if z != 16 or in_ch != 3:
        raise invalid(f"VAE file {ckpt.source}", f"{z} latent channels, {in_ch} input channels",
                      "the HunyuanVideo VAE (16 latent channels, RGB input); HunyuanVideo 1.5 / HunyuanImage VAEs "
                      "(32+ latent channels) are other models")
    stages = sorted({int(k.split(".")[2]) for k in keys if k.startswith("encoder.down_blocks.")})
    widths = tuple(ckpt.shape(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in stages)
    layers = len({k.split(".")[4] for k in keys if k.startswith("encoder.down_blocks.0.resnets.")})
    if stages != list(range(4)):
        raise invalid(f"VAE file {ckpt.source}", f"{len(stages)} encoder stages", "4 (the 884-16c-hy layout)")
    groups = 32 if all(w % 32 == 0 for w in widths) else 4
    if any(w % groups for w in widths):
        raise invalid(f"VAE file {ckpt.source}", f"stage widths {widths}", "widths divisible by 4 (GroupNorm groups)")
    return HunyuanVAEConfig(latent_channels=z, block_out_channels=widths, layers_per_block=layers,
                            norm_num_groups=groups)


def _open_vae_checkpoint(path) -> _OfficialView:
    """Official, diffusers, wrapper or ComfyUI files, as a view with official key names."""
    return _OfficialView(Checkpoint.open(path).strip_prefix(_VAE_PREFIXES))


def load_hunyuan_vae(source: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: torch.device | str = "cpu") -> HunyuanVAE:
    """Load the HunyuanVideo VAE from a `.pt`/`.safetensors` file or `"preset:tiny-vae"` (built in memory).

    Weights are streamed one tensor at a time into a module built on the meta device (pickles with weights_only)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise invalid("vae dtype", dtype, "torch.float32, torch.float16 or torch.bfloat16")
    if isinstance(source, str) and source.startswith("preset:"):
        if source != TINY_VAE_PRESET:
            raise invalid("VAE preset", source, f"{TINY_VAE_PRESET!r}")
        vae = HunyuanVAE(tiny_vae_config())
        vae.load_state_dict(build_vae_preset_state_dict())
        vae = vae.to(device=device, dtype=dtype)
    else:
        ckpt = _open_vae_checkpoint(source)
        cfg = infer_vae_config(ckpt)
        with torch.device("meta"):
            vae = HunyuanVAE(cfg)
        load_into_module(vae, ckpt, dtype=dtype, device=device, strict=True)
    return vae.eval().requires_grad_(False)


def build_vae_preset_state_dict(seed: int = 0, cfg: HunyuanVAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights (official names) for `cfg` (default: the tiny preset).

    Convs and linears ~ N(0, 1/fan_in), small biases, GroupNorm weights near 1 (not exactly, so a swapped norm shows
    in tests): activations stay O(1) through the network."""
    cfg = cfg or tiny_vae_config()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in HunyuanVAE(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        out[name] = t
    return out


def write_vae_preset(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write the tiny preset (official names) as safetensors, or as a `.pt`/`.pth` pickle; returns the path."""
    from ...atomic import save_weights_atomic

    path = Path(path)
    sd = {k: v.to(dtype) for k, v in build_vae_preset_state_dict(seed).items()}
    save_weights_atomic(sd, path, metadata={"musubi_preset": "tiny-vae"})
    return path


__all__ = [
    "SCALING_FACTOR", "TINY_VAE_PRESET", "HunyuanVAEConfig", "HunyuanVAE", "tiny_vae_config", "to_latent",
    "from_latent", "to_raw_latents", "from_raw_latents", "infer_vae_config",
    "load_hunyuan_vae", "build_vae_preset_state_dict", "write_vae_preset",
]
