"""FramePack DiT (HunyuanVideoTransformer3DModelPacked, 13B; FramePack I2V and FramePack-F1 share it), written from
the published architecture.

Module names are the checkpoint's (diffusers style: `x_embedder.proj`, `clean_x_embedder.proj_2x`,
`image_projection.up`, `context_embedder.token_refiner.refiner_blocks.N.attn.to_q`, `transformer_blocks.N.attn.to_q`,
`transformer_blocks.N.ff.net.0.proj`, `single_transformer_blocks.N.proj_mlp`, `norm_out.linear`, `proj_out`, ...), so
lllyasviel's shards and Kijai's single files load without renaming and a Musubi FramePack LoRA key
(`lora_unet_transformer_blocks_0_attn_to_q`) maps one to one onto a module.

It is HunyuanVideo's DiT (20 double-stream + 40 single-stream blocks, 2-block text token refiner, CLIP-L pooled
vector and embedded guidance added to the time embedding; its helpers are imported from the HunyuanVideo family)
with q/k/v as separate Linears, plus:

* RoPE from explicit frame indices (a section's frames sit at chosen positions of the video), one set per sample;
* clean history latents embedded by `clean_x_embedder` and prepended to the video tokens: 1x at the patch size,
  2x / 4x compressed by Conv3d kernels (2,4,4) / (4,8,8) on a replicate-padded input, their RoPE tables averaged over
  the same (2,2,2) / (4,4,4) patch-grid windows (the reference's "center down-sampling");
* SigLIP image tokens [B, 729, 1152] projected (`image_projection`: up, SiLU, down) and prepended to the text;
* only the generated tokens (the last video tokens) go through the output head; `proj_out` runs in float32 (the
  reference's "high quality fp32 output", on by default, also in training); the loader keeps its weights float32.

Precision as HunyuanVideo: the weights' dtype everywhere, except RoPE and the q/k RMSNorm (float32) and the output
projection (float32). Padded text tokens are never keys (`masked_attention`), so they cannot change a video token.

Shapes: B batch, F/H/W latent frames/height/width, f/h/w the patch grid, Lx = f*h*w generated tokens, Lv video tokens
(history + generated), Lc context tokens (image + text), D hidden, N heads, d = D/N (128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attention import set_backend
from ...errors import invalid
from ...memory.chunked import chunked
from ..hunyuan.dit import (HunyuanConfig, Modulation, PatchEmbed, RMSNorm, TextProjection, apply_rope, key_selection,
                           layer_norm, masked_attention, modulate, rope_cos_sin_at, timestep_features, unpatchify)

HISTORY_FACTORS = (1, 2, 4)     # clean_x_embedder.proj / proj_2x / proj_4x: compression of the history latents


@dataclass
class FramePackConfig(HunyuanConfig):
    """HunyuanVideo's config (hidden, heads, block counts, text widths, RoPE) plus the SigLIP width. `double_blocks`
    / `single_blocks` count `transformer_blocks` / `single_transformer_blocks`."""
    image_dim: int = 1152               # SigLIP hidden size: image_projection input


# ---------------------------------------------------------------------------------------------------------------
# RoPE from frame indices, history padding
# ---------------------------------------------------------------------------------------------------------------

def pad_to_multiple(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, T, H, W] replicate-padded at the end of T, H, W to multiples of `kernel` (a partial window of the
    compressed history repeats its last frame/row/column)."""
    pads = [(-n) % k for n, k in zip(x.shape[2:], kernel)]
    if not any(pads):
        return x
    return F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]), mode="replicate")


def _pooled_table(table: torch.Tensor, grid: tuple[int, int, int], factor: int) -> torch.Tensor:
    """[f*h*w, 1, d/2] -> the average over (factor,)*3 windows of the padded grid [f'*h'*w', 1, d/2] (cos and sin are
    averaged separately, as the reference does: the result is not a pure rotation)."""
    t = table.reshape(*grid, -1).permute(3, 0, 1, 2)[None]                     # [1, d/2, f, h, w]
    t = F.avg_pool3d(pad_to_multiple(t, (factor,) * 3), factor, stride=factor)
    return t[0].flatten(1).transpose(0, 1)[:, None]


def frame_rope(indices: torch.Tensor, hw: tuple[int, int], hw_scale: torch.Tensor, rope_dims: tuple[int, int, int],
               theta: float, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """indices [B, T] frame positions, hw = (h, w) patch grid, hw_scale [B] multiplier of the h/w positions (RoPE
    scaling; 1 otherwise) -> cos/sin [B or 1, L, 1, d/2] float32 (1 when every sample has the same positions: the
    usual case, one section layout per batch). factor 2/4: tables of the compressed history (see `_pooled_table`)."""
    h, w = hw
    rows = range(1) if all(torch.equal(indices[0], indices[b]) and bool(hw_scale[0] == hw_scale[b])
                           for b in range(1, indices.shape[0])) else range(indices.shape[0])
    cos, sin = [], []
    for b in rows:
        s = hw_scale[b].double()
        positions = (indices[b].double(), torch.arange(h, dtype=torch.float64, device=indices.device) * s,
                     torch.arange(w, dtype=torch.float64, device=indices.device) * s)
        c, si = rope_cos_sin_at(positions, rope_dims, theta)                     # [T*h*w, 1, d/2]
        if factor > 1:
            grid = (indices.shape[1], h, w)
            c, si = _pooled_table(c, grid, factor), _pooled_table(si, grid, factor)
        cos.append(c)
        sin.append(si)
    return torch.stack(cos), torch.stack(sin)


# ---------------------------------------------------------------------------------------------------------------
# Embedders (diffusers names: `linear_1`/`linear_2`, `proj_in`, `up`/`down`)
# ---------------------------------------------------------------------------------------------------------------

class TimestepEmbedding(TextProjection):
    """`timestep_embedder` / `guidance_embedder`: [B] -> sinusoidal [B, 256] -> linear_1, SiLU, linear_2 -> [B, D]."""

    def __init__(self, hidden: int):
        super().__init__(256, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return super().forward(timestep_features(t).to(self.linear_1.weight.dtype))


class ConditionEmbedding(nn.Module):
    """`time_text_embed`: time + CLIP-L pooled text (+ embedded guidance) -> the conditioning vector [B, D]."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        d = cfg.hidden_size
        self.timestep_embedder = TimestepEmbedding(d)
        self.text_embedder = TextProjection(cfg.text_pool_dim, d)
        if cfg.guidance_embed:
            self.guidance_embedder = TimestepEmbedding(d)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        vec = self.timestep_embedder(t)
        if guidance is not None:
            vec = vec + self.guidance_embedder(guidance)
        return vec + self.text_embedder(pooled)


class ImageProjection(nn.Module):
    """`image_projection`: SigLIP tokens [B, Li, image_dim] -> up (3D), SiLU, down -> [B, Li, D]."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        self.up = nn.Linear(cfg.image_dim, 3 * cfg.hidden_size)
        self.down = nn.Linear(3 * cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class HistoryEmbedder(nn.Module):
    """`clean_x_embedder`: history latents [B, C, T, H, W] -> tokens [B, L, D], at the patch size (`proj`) or
    compressed 2x / 4x in every axis (`proj_2x`, `proj_4x`; the input replicate-padded to whole windows)."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
        self.proj = nn.Conv3d(c, d, kernel_size=p, stride=p)
        self.proj_2x = nn.Conv3d(c, d, kernel_size=tuple(2 * k for k in p), stride=tuple(2 * k for k in p))
        self.proj_4x = nn.Conv3d(c, d, kernel_size=tuple(4 * k for k in p), stride=tuple(4 * k for k in p))

    def forward(self, latents: torch.Tensor, factor: int) -> torch.Tensor:
        conv = {1: self.proj, 2: self.proj_2x, 4: self.proj_4x}[factor]
        return conv(pad_to_multiple(latents, conv.kernel_size)).flatten(2).transpose(1, 2)


class GeluProjection(nn.Module):
    """`ff.net.0`: proj then activation (diffusers' GELU / LinearActivation)."""

    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x))


class FeedForward(nn.Module):
    """`ff` / `ff_context`: net.0 (proj + activation), net.1 (dropout in the reference: identity), net.2."""

    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.net = nn.ModuleList([GeluProjection(dim, hidden, act), nn.Identity(), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Attention(nn.Module):
    """`attn`: separate q/k/v Linears, per-head q/k RMSNorm (not in the token refiner), the text stream's
    projections in the double-stream blocks (`add_*_proj`, `norm_added_*`, `to_add_out`), `to_out.0` except in the
    single-stream blocks (their output goes through the block's `proj_out` with the MLP)."""

    def __init__(self, cfg: FramePackConfig, qk_norm: bool = True, context: bool = False, out: bool = True):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads = cfg.num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        if qk_norm:
            self.norm_q, self.norm_k = RMSNorm(hd, cfg.eps), RMSNorm(hd, cfg.eps)
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.norm_added_q, self.norm_added_k = RMSNorm(hd, cfg.eps), RMSNorm(hd, cfg.eps)
            self.to_add_out = nn.Linear(d, d)
        if out:
            self.to_out = nn.ModuleList([nn.Linear(d, d)])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))                                  # [B, L, D] -> [B, L, N, d]

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, D] -> q, k, v [B, L, N, d] (q/k normalized when the block has the norms)."""
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if hasattr(self, "norm_q"):
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def added_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._heads(self.add_q_proj(x)), self._heads(self.add_k_proj(x)), self._heads(self.add_v_proj(x))
        return self.norm_added_q(q), self.norm_added_k(k), v


# ---------------------------------------------------------------------------------------------------------------
# Text: the token refiner (context_embedder)
# ---------------------------------------------------------------------------------------------------------------

class RefinerBlock(nn.Module):
    """Self-attention over the text tokens (no RoPE, no q/k norm) + SiLU MLP, gated by the time+text vector."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.attn = Attention(cfg, qk_norm=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.ff = FeedForward(d, cfg.mlp_hidden, nn.SiLU())
        self.norm_out = Modulation(d, 2)                                           # gate_msa, gate_mlp
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor, c: torch.Tensor, keys) -> torch.Tensor:
        """x [B, Lt, D], c [B, D]."""
        gate_msa, gate_mlp = self.norm_out(c)
        q, k, v = self.attn.qkv(self.norm1(x))
        x = x + self.attn.to_out[0](masked_attention(q, k, v, keys, self.attention_backend).flatten(2)) \
            * gate_msa[:, None]
        return x + self.ff(self.norm2(x)) * gate_mlp[:, None]


class TextTimeEmbedding(nn.Module):
    """`context_embedder.time_text_embed`: time + the masked mean of the text states."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(cfg.hidden_size)
        self.text_embedder = TextProjection(cfg.text_dim, cfg.hidden_size)


class TokenRefinerBlocks(nn.Module):
    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        self.refiner_blocks = nn.ModuleList([RefinerBlock(cfg) for _ in range(cfg.refiner_blocks)])


class TokenRefiner(nn.Module):
    """`context_embedder`: text states [B, Lt, text_dim] -> refined text tokens [B, Lt, D]."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        self.time_text_embed = TextTimeEmbedding(cfg)
        self.proj_in = nn.Linear(cfg.text_dim, cfg.hidden_size)
        self.token_refiner = TokenRefinerBlocks(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, Lt, text_dim] compute dtype, t [B], mask [B, Lt] bool (at least one True per row)."""
        m = mask.float()[..., None]                                                # [B, Lt, 1]
        pooled = ((x.float() * m).sum(dim=1) / m.sum(dim=1)).to(x.dtype)         # mean of the real tokens
        embed = self.time_text_embed
        c = embed.timestep_embedder(t) + embed.text_embedder(pooled)              # [B, D]
        x = self.proj_in(x)
        keys = key_selection(mask)
        for block in self.token_refiner.refiner_blocks:
            x = block(x, c, keys)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------------------------

class DoubleStreamBlock(nn.Module):
    """`transformer_blocks.N`: video and context streams with their own weights, one joint attention over
    [video; context] (RoPE on the video tokens)."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.eps
        self.norm1 = Modulation(d, 6)               # shift, scale, gate (attention), shift, scale, gate (MLP)
        self.norm1_context = Modulation(d, 6)
        self.attn = Attention(cfg, context=True)
        self.ff = FeedForward(d, cfg.mlp_hidden, nn.GELU(approximate="tanh"))
        self.ff_context = FeedForward(d, cfg.mlp_hidden, nn.GELU(approximate="tanh"))
        self.attention_backend = "sdpa"
        self.train_chunk_tokens = 16384

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], keys) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, Lv, D], txt [B, Lc, D], vec [B, D], rope cos/sin [B or 1, Lv, 1, d/2] -> (img, txt)."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.norm1(vec)           # [B, D] each
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.norm1_context(vec)

        iq, ik, iv = self.attn.qkv(modulate(layer_norm(img, self.eps), i_shift1, i_scale1))
        iq, ik = apply_rope(iq, *rope), apply_rope(ik, *rope)
        tq, tk, tv = self.attn.added_qkv(modulate(layer_norm(txt, self.eps), t_shift1, t_scale1))
        attn = masked_attention(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), keys,
                                self.attention_backend).flatten(2)                   # [B, Lv+Lc, D]
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]

        img = img + self.attn.to_out[0](img_attn) * i_gate1[:, None]
        # token-wise: in training chunked over video tokens (the [Lv, mlp] activations are the largest tensors)
        img = chunked(self._ff, (img,), (i_shift2, i_scale2, i_gate2), (self.ff,), chunk=self.train_chunk_tokens)
        txt = txt + self.attn.to_add_out(txt_attn) * t_gate1[:, None]
        txt = txt + self.ff_context(modulate(layer_norm(txt, self.eps), t_shift2, t_scale2)) * t_gate2[:, None]
        return img, txt

    def _ff(self, img: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return img + self.ff(modulate(layer_norm(img, self.eps), shift, scale)) * gate[:, None]


class SingleStreamBlock(nn.Module):
    """`single_transformer_blocks.N`: one stream over [video; context]; the attention output and the MLP
    activations are concatenated into one `proj_out`."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.eps
        self.attn = Attention(cfg, out=False)
        self.norm = Modulation(d, 3)                                               # shift, scale, gate
        self.proj_mlp = nn.Linear(d, cfg.mlp_hidden)
        self.proj_out = nn.Linear(d + cfg.mlp_hidden, d)
        self.attention_backend = "sdpa"
        self.train_chunk_tokens = 16384

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys
                ) -> torch.Tensor:
        """x [B, Lv+Lc, D] (video tokens first), vec [B, D]."""
        shift, scale, gate = self.norm(vec)
        normed = modulate(layer_norm(x, self.eps), shift, scale)
        q, k, v = self.attn.qkv(normed)
        lv = rope[0].shape[-3]                                                     # video tokens get RoPE
        q = torch.cat([apply_rope(q[:, :lv], *rope), q[:, lv:]], dim=1)
        k = torch.cat([apply_rope(k[:, :lv], *rope), k[:, lv:]], dim=1)
        attn = masked_attention(q, k, v, keys, self.attention_backend).flatten(2)
        # token-wise from here: in training chunked over tokens (the [L, mlp] and [L, D + mlp] tensors and their
        # gradients are the block's largest)
        return chunked(self._output, (x, normed, attn), (gate,), (self.proj_mlp, self.proj_out),
                       chunk=self.train_chunk_tokens)

    def _output(self, x: torch.Tensor, normed: torch.Tensor, attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        mlp = F.gelu(self.proj_mlp(normed), approximate="tanh")
        return x + self.proj_out(torch.cat([attn, mlp], dim=-1)) * gate[:, None]


class OutputNorm(nn.Module):
    """`norm_out`: LayerNorm modulated by vec; `linear` gives (scale, shift), in this order (diffusers'
    AdaLayerNormContinuous; HunyuanVideo's official final layer stores shift first)."""

    def __init__(self, cfg: FramePackConfig):
        super().__init__()
        self.eps = cfg.eps
        self.linear = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(vec)).chunk(2, dim=-1)
        return modulate(layer_norm(x, self.eps), shift, scale)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

class FramePackModel(nn.Module):
    """FramePack DiT. Build it on the meta device and fill it with `engine.checkpoint.load_into_module`
    (see `engine.families.framepack.loader.load_framepack_dit`)."""

    family = "framepack"   # engine.families registry key: the generic engine finds this family's rules through it

    def __init__(self, config: FramePackConfig):
        super().__init__()
        self.config = config
        self.x_embedder = PatchEmbed(config)
        self.clean_x_embedder = HistoryEmbedder(config)
        self.context_embedder = TokenRefiner(config)
        self.image_projection = ImageProjection(config)
        self.time_text_embed = ConditionEmbedding(config)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(config) for _ in range(config.double_blocks)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(config)
                                                        for _ in range(config.single_blocks)])
        self.norm_out = OutputNorm(config)
        self.proj_out = nn.Linear(config.hidden_size, math.prod(config.patch_size) * config.out_channels)
        self.source_path = None
        self._attention_backend = "sdpa"

    # --- settings -------------------------------------------------------------------------------------------------
    @property
    def attention_backend(self) -> str:
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        self._attention_backend = set_backend(self, name)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model runs in: the patch embedding's dtype (fp8 storage computes in bf16)."""
        dt = self.x_embedder.proj.weight.dtype
        return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    # --- input checks -----------------------------------------------------------------------------------------------
    @staticmethod
    def _per_sample(name: str, value, batch: int, device, what: str) -> torch.Tensor:
        value = torch.as_tensor(value, device=device).reshape(-1)
        if value.numel() == 1:
            value = value.expand(batch)
        if value.shape[0] != batch:
            raise invalid(name, tuple(value.shape), f"[{batch}] {what} (one per latent)")
        return value

    @staticmethod
    def _batched(name: str, value: torch.Tensor | None, batch: int, shape: str, width: int | None = None,
                 ndim: int = 3) -> torch.Tensor | None:
        """value [B or 1, ...] -> [B, ...] (one conditioning broadcast to the batch), checked."""
        if value is None:
            return None
        if value.ndim != ndim or (width is not None and value.shape[-1] != width):
            raise invalid(name, tuple(value.shape), shape)
        if value.shape[0] == 1 and batch > 1:
            value = value.expand(batch, *value.shape[1:])
        if value.shape[0] != batch:
            raise invalid(name, tuple(value.shape), f"{shape} with batch {batch} (one per latent)")
        return value

    @staticmethod
    def _indices(name: str, value, batch: int, frames: int, device) -> torch.Tensor:
        """[T] or [B or 1, T] frame positions -> [B, T] (T = the latents' frame count)."""
        value = torch.as_tensor(value, device=device)
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2 or value.shape[1] != frames or value.shape[0] not in (1, batch):
            raise invalid(name, tuple(value.shape), f"[{batch}, {frames}] frame indices (one per latent frame)")
        return value.expand(batch, -1)

    def _text(self, text_states, text_mask, pooled, batch: int, device):
        cfg = self.config
        text_states = self._batched("text_states", text_states, batch,
                                    f"[B, tokens, {cfg.text_dim}] LLM hidden states for {cfg.variant}", cfg.text_dim)
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=device)
        text_mask = self._batched("text_mask", text_mask.to(device).bool(), batch, "[B, tokens] bool", ndim=2)
        if tuple(text_mask.shape) != tuple(text_states.shape[:2]):
            raise invalid("text_mask", tuple(text_mask.shape), f"{tuple(text_states.shape[:2])} (one flag per token)")
        if not bool(text_mask.any(dim=1).all()):
            raise invalid("text_mask", "a prompt with no real token", "at least one True (unpadded) token per prompt")
        if pooled is None:
            raise invalid("pooled", None, f"[B, {cfg.text_pool_dim}] CLIP-L pooled embeddings")
        pooled = self._batched("pooled", pooled.reshape(-1, pooled.shape[-1]), batch,
                               f"[B, {cfg.text_pool_dim}] CLIP-L pooled embeddings", cfg.text_pool_dim, ndim=2)
        return text_states, text_mask, pooled

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor,
                text_mask: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, latent_indices: torch.Tensor | None = None,
                image_embeddings: torch.Tensor | None = None,
                clean_latents: torch.Tensor | None = None, clean_latent_indices: torch.Tensor | None = None,
                clean_latents_2x: torch.Tensor | None = None, clean_latent_2x_indices: torch.Tensor | None = None,
                clean_latents_4x: torch.Tensor | None = None, clean_latent_4x_indices: torch.Tensor | None = None,
                rope_scaling: tuple[float, float] | None = None, block_cache=None) -> torch.Tensor:
        """x [B, 16, F, H, W] noisy latents of the section, t [B] timesteps (0..1000), text_states [B, Lt, text_dim],
        text_mask [B, Lt] (True: a real token; None: all real), pooled [B, 768] CLIP-L pooled, guidance [B] the
        embedded guidance scale x 1000 (None skips the guidance embedding), latent_indices [B, F] or [F] the
        section's frame positions (None: 0..F-1), image_embeddings [B, 729, 1152] SigLIP last hidden state (None: no
        image tokens), clean_latents* [B, 16, Fc, H, W] history latents (1x, 2x, 4x; each optional, each with its
        [B, Fc] or [Fc] indices), rope_scaling (timestep threshold, factor): h/w RoPE positions times factor for the
        samples whose t >= threshold (inference at a higher resolution than trained), block_cache a sampler's
        `engine.sampling.magcache.MagCache` (may reuse the blocks' residual on the video tokens instead of running
        them) -> velocity [B, out_channels, F, H, W] float32."""
        cfg = self.config
        dtype = self.compute_dtype
        device = self.x_embedder.proj.weight.device
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise invalid("x", tuple(x.shape), f"[B, {cfg.in_channels}, F, H, W] noisy latents for {cfg.variant}")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise invalid("x", tuple(x.shape), f"F, H, W divisible by the patch size {cfg.patch_size}")
        grid = (frames // pt, height // ph, width // pw)
        t = self._per_sample("t", t, batch, device, "timesteps")
        text_states, text_mask, pooled = self._text(text_states, text_mask, pooled, batch, device)
        hw_scale = torch.ones(batch, dtype=torch.float64, device=device)
        if rope_scaling is not None:
            threshold, factor = rope_scaling
            hw_scale = torch.where(t >= threshold, float(factor), hw_scale)

        # conditioning vector [B, D]: time (+ embedded guidance) + CLIP pooled text
        if guidance is not None:
            if not cfg.guidance_embed:
                raise invalid("guidance", "a guidance value", f"None: {cfg.variant} has no guidance embedder")
            guidance = self._per_sample("guidance", guidance, batch, device, "guidance values")
        vec = self.time_text_embed(t, pooled.to(device, dtype), guidance)

        # video tokens [B, Lv, D] = [4x history; 2x history; 1x history; generated], RoPE tables alike
        indices = self._indices("latent_indices", torch.arange(frames, device=device) if latent_indices is None
                                else latent_indices, batch, frames, device)
        tokens = [self.x_embedder(x.to(device, dtype))]
        tables = [frame_rope(indices, grid[1:], hw_scale, cfg.rope_dims, cfg.rope_theta)]
        history = ((1, clean_latents, clean_latent_indices, "clean_latents"),
                   (2, clean_latents_2x, clean_latent_2x_indices, "clean_latents_2x"),
                   (4, clean_latents_4x, clean_latent_4x_indices, "clean_latents_4x"))
        for factor, latents, idx, name in history:
            if latents is None:
                continue
            latents = self._batched(name, latents, batch, f"[B, {cfg.in_channels}, frames, {height}, {width}] "
                                                          "history latents (the section's height and width)",
                                    ndim=5)
            if latents.shape[1] != cfg.in_channels or latents.shape[3:] != x.shape[3:]:
                raise invalid(name, tuple(latents.shape),
                              f"[B, {cfg.in_channels}, frames, {height}, {width}] (the section's height and width)")
            if idx is None:
                raise invalid(f"{name.replace('latents', 'latent')}_indices", None,
                              f"the frame indices of {name} (one per frame)")
            idx = self._indices(f"{name.replace('latents', 'latent')}_indices", idx, batch, latents.shape[2], device)
            tokens.insert(0, self.clean_x_embedder(latents.to(device, dtype), factor))
            tables.insert(0, frame_rope(idx, grid[1:], hw_scale, cfg.rope_dims, cfg.rope_theta, factor))
        img = torch.cat(tokens, dim=1)
        rows = max(c.shape[0] for c, _ in tables)                                  # 1 (shared) or B
        rope = tuple(torch.cat([tb[i].expand(rows, -1, -1, -1) for tb in tables], dim=1) for i in range(2))

        # context tokens [B, Lc, D] = [image; text]
        txt = self.context_embedder(text_states.to(device, dtype), t, text_mask)
        keep = [torch.ones(batch, img.shape[1], dtype=torch.bool, device=device)]
        if image_embeddings is not None:
            image_embeddings = self._batched("image_embeddings", image_embeddings, batch,
                                             f"[B, tokens, {cfg.image_dim}] SigLIP image embeddings", cfg.image_dim)
            image = self.image_projection(image_embeddings.to(device, dtype))
            txt = torch.cat([image, txt], dim=1)
            keep.append(torch.ones(batch, image.shape[1], dtype=torch.bool, device=device))
        keys = key_selection(torch.cat([*keep, text_mask], dim=1))                 # padded text: never a key

        def blocks(box: list) -> torch.Tensor:
            img, txt_ = box.pop(), txt    # the only reference: each block's input is freed once it ran
            for block in self.transformer_blocks:     # checkpointing/offload/swap wrap the blocks from outside
                img, txt_ = block(img, txt_, vec, rope, keys)
            x = torch.cat([img, txt_], dim=1)                                      # [B, Lv+Lc, D]
            for block in self.single_transformer_blocks:
                x = block(x, vec, rope, keys)
            return x[:, : img.shape[1]]

        box = [img]
        del img
        img = blocks(box) if block_cache is None else block_cache.run(box[0], lambda x: blocks([x]))
        out = self.norm_out(img[:, img.shape[1] - math.prod(grid):], vec)          # generated tokens [B, Lx, D]
        w, b = self.proj_out.weight, self.proj_out.bias
        out = self.proj_out(out.float()) if w.dtype == torch.float32 else F.linear(out.float(), w.float(), b.float())
        return unpatchify(out, grid, cfg.patch_size, cfg.out_channels)


def build_framepack_model(config: FramePackConfig, device: torch.device | str = "meta") -> FramePackModel:
    """Construct without allocating weights when device is "meta" (the loader fills them in)."""
    with torch.device(device):
        return FramePackModel(config)


# fp8 storage targets, as Musubi Tuner's FramePack `fp8_optimization`: Linear layers inside the blocks, minus every
# module with "norm" in its name (the modulations `norm1.linear`, `norm1_context.linear`, `norm.linear` included).
FP8_INCLUDE = ("transformer_blocks.", "single_transformer_blocks.")
FP8_EXCLUDE = ("norm",)
# kept in float32 whatever the load dtype (the reference's fp32 output projection)
FP32_MODULES = ("proj_out.",)
