"""Wan 2.1 / 2.2 diffusion transformer (DiT), written from the published architecture.

Wan 2.2 A14B experts have the 2.1 14B layout (I2V: in_dim 36 without the CLIP branch); TI2V-5B is a smaller 2.1
layout with 48 latent channels. What 2.2 adds is per-token timesteps (t [B, L]: TI2V keeps the image frame's tokens
at t = 0), hence a per-token modulation [B, L, 6, D]. The modulation runs as [B, T, 6, D] broadcast over groups of
L/T tokens: T = 1 for one t per sample (the 2.1 form), T = f when t is constant over each latent frame (TI2V: the
official per-token t is of that kind), T = L only for a t that varies inside a frame.

Module names are exactly the official ones (`blocks.N.self_attn.q`, `head.modulation`, ...), which ComfyUI's native
Wan also uses, so checkpoints load without renaming and a LoRA key maps one to one onto a module.

Precision follows the official code: the residual stream, all modulation math (time embedding, the 6-vector block
modulation, the 2-vector head modulation), the LayerNorms and the output head run in float32; the Linear layers of
attention / FFN / text and image embeddings run in the weights' dtype (the "compute dtype": bf16, fp16 or fp32).

Shapes used in comments: B batch, C channels, F/H/W latent frames/height/width, f/h/w the patch grid
(F/pt, H/ph, W/pw), L = f*h*w video tokens, D model dim, N heads, d = D/N head dim (128 for every official model),
Lt = text_len (512), Li = image tokens (257, 514 for FLF2V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attention import attention, set_backend
from ...errors import invalid
from ...memory.recompute import recomputable
from ...memory.lean_ops import gated_residual, layer_norm_to, rms_norm, rope

CLIP_TOKENS = 257          # CLIP ViT-H/14 penultimate tokens per image (256 patches + class token)
ROPE_THETA = 10000.0


@dataclass
class WanConfig:
    model_type: str                      # "t2v" | "i2v" | "flf2v" | "ti2v" (t2i = t2v weights on one frame;
                                         # Fun-Control: in_dim 48; ti2v: Wan 2.2 5B, 48 latent channels)
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16                     # 16 noisy + conditioning channels (I2V: +4 mask +16 image; Fun-Control: +16 +16)
    out_dim: int = 16
    freq_dim: int = 256                  # sinusoidal timestep features
    text_dim: int = 4096                 # umT5-XXL hidden size
    text_len: int = 512                  # text context is zero-padded to this many tokens
    clip_dim: int = 1280                 # CLIP ViT-H hidden size (input of img_emb)
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    has_image_input: bool = False        # k_img/v_img/norm_k_img in every cross-attention + img_emb
    has_flf_pos_emb: bool = False        # FLF2V: img_emb.emb_pos [1, 2*257, clip_dim]
    variant: str = "custom"              # human name, e.g. "t2v-1.3B", "i2v-14B", "ti2v-5B", "tiny-t2v"
    expert: str | None = None            # Wan 2.2 A14B: "high" | "low" noise expert when the file name says so

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads:
            raise invalid("WanConfig.num_heads", self.num_heads, f"a divisor of dim={self.dim}")
        if self.head_dim % 2:
            raise invalid("WanConfig head dim", self.head_dim, "an even number (RoPE pairs channels)")
        if self.expert not in (None, "high", "low"):
            raise invalid("WanConfig.expert", self.expert, "'high', 'low' or None")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def image_tokens(self) -> int:
        return 2 * CLIP_TOKENS if self.has_flf_pos_emb else CLIP_TOKENS

    @property
    def vae_stride(self) -> tuple[int, int, int]:
        """(time, height, width) pixels per latent of the VAE this DiT is trained with: the 48-channel Wan 2.2 VAE
        of TI2V-5B compresses 16x spatially, the 16-channel Wan 2.1 VAE (used by every other model) 8x."""
        return (4, 16, 16) if self.out_dim == 48 else (4, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: timestep features, RoPE, unpatchify
# ---------------------------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps (0..1000) -> [B, dim] float64 features [cos(t·ω_i), sin(t·ω_i)] (cos half first),
    ω_i = 10000^(-i/half). float64 because t·ω reaches 1000 rad and float32 would lose the phase."""
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), omega)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the frame/height/width axes: 44/42/42 for d=128 (official split)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, axis_dim: int) -> torch.Tensor:
    """[n] positions -> [n, axis_dim/2] float64 angles pos·θ^(-2j/axis_dim) (each axis uses its own size)."""
    omega = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, axis_dim, 2, dtype=torch.float64,
                                                     device=positions.device) / axis_dim)
    return torch.outer(positions.to(torch.float64), omega)


def rope_cos_sin(grid: tuple[int, int, int], head_dim: int, device, frame_indices: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [L, 1, d/2] (float32, computed in float64) for a (f, h, w) patch grid, tokens in f,h,w order.

    Positions are patch-grid indices; `frame_indices` ([f] ints) replaces 0..f-1 on the frame axis (one-frame
    inference puts the target and control frames at chosen temporal positions)."""
    f, h, w = grid
    dt, dh, dw = rope_axis_dims(head_dim)
    if frame_indices is None:
        frames = torch.arange(f, device=device)
    else:
        frames = torch.as_tensor(frame_indices, device=device).reshape(-1)
        if frames.numel() != f:
            raise invalid("frame_indices", frames.tolist(), f"{f} frame positions (one per latent frame)")
    at = _axis_angles(frames, dt)[:, None, None, :].expand(f, h, w, -1)
    ah = _axis_angles(torch.arange(h, device=device), dh)[None, :, None, :].expand(f, h, w, -1)
    aw = _axis_angles(torch.arange(w, device=device), dw)[None, None, :, :].expand(f, h, w, -1)
    angles = torch.cat([at, ah, aw], dim=-1).reshape(f * h * w, 1, head_dim // 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, L, N, d] by the tables; adjacent channels (2i, 2i+1) form one complex number (official layout):
    (re·cos − im·sin, re·sin + im·cos), computed in float32 (`ops.rope`)."""
    return rope(x, cos, sin)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], out_dim: int) -> torch.Tensor:
    """[B, L, pt*ph*pw*C] (C innermost, then pw, ph, pt) -> [B, C, f*pt, h*ph, w*pw]."""
    f, h, w = grid
    pt, ph, pw = patch
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, out_dim)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)                 # B, C, f, pt, h, ph, w, pw
    return x.reshape(x.shape[0], out_dim, f * pt, h * ph, w * pw)


# ---------------------------------------------------------------------------------------------------------------
# Norms (computed in float32 like the official WanLayerNorm / WanRMSNorm)
# ---------------------------------------------------------------------------------------------------------------

class WanLayerNorm(nn.Module):
    """LayerNorm computed in float32, result cast back to the input dtype. `affine=False` has no parameters."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).to(x.dtype)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full model dim (before the head split), normalized in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = (normalize(x.float()).to(x.dtype) * weight).to(x.dtype); in training saves x, not its float32 copy
        return rms_norm(x, self.weight, self.eps)


def _qk_norm(dim: int, eps: float, enabled: bool) -> nn.Module:
    return WanRMSNorm(dim, eps) if enabled else nn.Identity()


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 whatever dtype its weights are stored in (the time embedding/projection and
    the output head: the official code runs them in float32). Stored in bf16 (a bf16 file), the float32 result is
    the same as from float32 copies of the same values; under autocast it runs like any Linear (autocast casts its
    operands to the autocast dtype, which is what a float32-stored weight gets too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


# ---------------------------------------------------------------------------------------------------------------
# Attention layers
# ---------------------------------------------------------------------------------------------------------------

class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = _qk_norm(dim, eps, qk_norm)
        self.norm_k = _qk_norm(dim, eps, qk_norm)
        self.attention_backend = "sdpa"

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, -1))      # [B, L, D] -> [B, L, N, d]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, D] in compute dtype -> [B, L, D]."""
        cos, sin = rope
        # the RoPE'd q/k that attention keeps are recomputed in backward from the q/k the RMSNorms keep anyway
        q = _cheap(_norm_heads_rope, self.q(x), *_rms_args(self.norm_q), self.num_heads, cos, sin)
        k = _cheap(_norm_heads_rope, self.k(x), *_rms_args(self.norm_k), self.num_heads, cos, sin)
        v = self._heads(self.v(x))
        out = attention(q, k, v, backend=self.attention_backend)
        return self.o(_cheap(_merge_heads, out))


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention; with `has_image_input` a second attention over the CLIP tokens shares q, and the two
    results are summed before `o` (official I2V layout: k_img / v_img / norm_k_img)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6,
                 has_image_input: bool = False):
        super().__init__(dim, num_heads, qk_norm, eps)
        if has_image_input:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = _qk_norm(dim, eps, qk_norm)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x [B, L, D]; context [B, Lt, D] (embedded text); context_img [B, Li, D] (embedded CLIP) or None."""
        q = _cheap(_norm_heads_rope, self.q(x), *_rms_args(self.norm_q), self.num_heads)
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        out = attention(q, k, v, backend=self.attention_backend)
        if context_img is not None and hasattr(self, "k_img"):
            k_img = self._heads(self.norm_k_img(self.k_img(context_img)))
            v_img = self._heads(self.v_img(context_img))
            out = out + attention(q, k_img, v_img, backend=self.attention_backend)
        return self.o(_cheap(_merge_heads, out))


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(2)   # [B, L, N, d] -> [B, L, D]


def _rms_args(norm: nn.Module) -> tuple:
    """(weight, eps) of a q/k WanRMSNorm, (None, 0) for nn.Identity: the tensors a recomputation needs."""
    return (norm.weight, norm.eps) if isinstance(norm, WanRMSNorm) else (None, 0.0)


def _norm_heads_rope(t: torch.Tensor, weight: torch.Tensor | None, eps: float, num_heads: int,
                     cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """q/k [B, L, D] -> RMSNorm (when weight is given) -> [B, L, N, d] -> RoPE (when the tables are given)."""
    if weight is not None:
        t = rms_norm(t, weight, eps)
    t = t.unflatten(-1, (num_heads, -1))
    return t if cos is None else apply_rope(t, cos, sin)


def _cheap(fn, *args):
    """fn(*args), declared recomputable: in a checkpointed block's recompute, what autograd keeps of the result is
    (fn, args) and backward recomputes it (elementwise; args are kept anyway). Same values either way."""
    return recomputable(fn(*args), fn, *args)


# ---------------------------------------------------------------------------------------------------------------
# Block, head, image embedding
# ---------------------------------------------------------------------------------------------------------------

class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        d = cfg.dim
        self.norm1 = WanLayerNorm(d, cfg.eps)
        self.self_attn = WanSelfAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = WanLayerNorm(d, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(d, cfg.num_heads, cfg.qk_norm, cfg.eps, cfg.has_image_input)
        self.norm2 = WanLayerNorm(d, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        # shift/scale/gate for self-attn, then shift/scale/gate for the FFN, added to the time projection
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, L, D] float32 residual stream; e0 [B, T, 6, D] float32 with T = 1 (one t per sample), f (one t per
        latent frame) or L (per token); context/context_img in the compute dtype (their dtype is the dtype the Linear
        layers run in)."""
        dtype = context.dtype
        # the L tokens as T groups of L/T sharing one modulation: [B, T, L/T, D] views, modulations [B, T, 1, D]
        # broadcast over their group (never repeated to [B, L, D])
        group = lambda a: a.unflatten(1, (e0.shape[1], -1))  # noqa: E731
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(3)
        # = x + self_attn((norm1(x) * (1 + scale1) + shift1).to(dtype)).float() * gate1, and so on; `norm_to` and
        # `gated_residual` compute exactly that with fewer float32 [L, D] intermediates alive at once
        # (`_cheap`: the Linear inputs are recomputed in backward from the residual stream the norms keep anyway)
        n1, n2, n3 = self.norm1, self.norm2, self.norm3
        h = _cheap(layer_norm_to, group(x), n1.weight, n1.bias, n1.eps, dtype, shift1, scale1).flatten(1, 2)
        x = gated_residual(group(x), group(self.self_attn(h, rope)), gate1).flatten(1, 2)
        h = x.to(dtype) if isinstance(n3, nn.Identity) else _cheap(layer_norm_to, x, n3.weight, n3.bias, n3.eps, dtype)
        x = gated_residual(x, self.cross_attn(h, context, context_img))
        del h
        h = self.ffn[0](_cheap(layer_norm_to, group(x), n2.weight, n2.bias, n2.eps, dtype, shift2, scale2))
        x = gated_residual(group(x), self.ffn[2](_cheap(self.ffn[1], h)), gate2)   # ffn = Linear, GELU, Linear
        return x.flatten(1, 2)


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = WanLayerNorm(cfg.dim, cfg.eps)
        self.head = Float32Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] float32, e [B, T, D] float32 (time embedding before the projection; T as in the blocks)
        -> [B, L, pt*ph*pw*C]."""
        shift, scale = (self.modulation.float() + e.unsqueeze(2)).unsqueeze(2).unbind(3)   # [B, T, 1, D] each
        h = self.norm(x.unflatten(1, (e.shape[1], -1))) * (1 + scale) + shift              # [B, T, L/T, D]
        return self.head(h).float().flatten(1, 2)   # the official head runs in float32


class WanImageEmbedding(nn.Module):
    """`img_emb`: CLIP tokens [B, Li, clip_dim] -> [B, Li, D]. proj = LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        c = cfg.clip_dim
        # nn.LayerNorm default eps (1e-5) like the official MLPProj
        self.proj = nn.Sequential(WanLayerNorm(c, 1e-5, affine=True), nn.Linear(c, c), nn.GELU(),
                                  nn.Linear(c, cfg.dim), WanLayerNorm(cfg.dim, 1e-5, affine=True))
        if cfg.has_flf_pos_emb:
            self.emb_pos = nn.Parameter(torch.zeros(1, cfg.image_tokens, c))

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()
        x = self.proj[0](x).to(dtype)
        x = self.proj[3](self.proj[2](self.proj[1](x)))
        return self.proj[4](x).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

class WanModel(nn.Module):
    """Wan 2.1 / 2.2 DiT. Build it on the meta device and fill it with `engine.checkpoint.load_into_module`
    (see `engine.families.wan.loader.load_wan_dit`)."""

    family = "wan"   # engine.families registry key: the generic engine finds this family's rules through it

    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(Float32Linear(config.freq_dim, d), nn.SiLU(), Float32Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Float32Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanAttentionBlock(config) for _ in range(config.num_layers)])
        self.head = WanHead(config)
        if config.has_image_input:
            self.img_emb = WanImageEmbedding(config)
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
        """The dtype the big Linear layers run in: the patch embedding's dtype (fp8 storage computes in bf16)."""
        dt = self.patch_embedding.weight.dtype
        return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    # --- input preparation ----------------------------------------------------------------------------------------
    def _pad_context(self, context, batch: int, device) -> torch.Tensor:
        """[B, L<=Lt, text_dim] or a list of [L_i, text_dim] -> [B, Lt, text_dim], zero-padded like the official."""
        cfg = self.config
        items = list(context) if isinstance(context, (list, tuple)) else list(context.unbind(0))
        if len(items) == 1 and batch > 1:
            items = items * batch
        if len(items) != batch:
            raise invalid("context", f"{len(items)} prompts", f"{batch} (one per latent in the batch)")
        out = torch.zeros(batch, cfg.text_len, cfg.text_dim, device=device, dtype=items[0].dtype)
        for i, c in enumerate(items):
            if c.ndim != 2 or c.shape[-1] != cfg.text_dim or c.shape[0] > cfg.text_len:
                raise invalid("context", tuple(c.shape),
                              f"[tokens <= {cfg.text_len}, {cfg.text_dim}] text embeddings for {cfg.variant}")
            out[i, : c.shape[0]] = c.to(device)
        return out

    def _image_context(self, clip_fea: torch.Tensor | None, batch: int, device, dtype) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.has_image_input:
            return None
        if clip_fea is None:
            # Fun-Control T2V has no CLIP image: VideoX-Fun feeds zero CLIP features (the model's authors).
            clip_fea = torch.zeros(batch, cfg.image_tokens, cfg.clip_dim, device=device)
        if clip_fea.ndim != 3 or clip_fea.shape[1:] != (cfg.image_tokens, cfg.clip_dim):
            raise invalid("clip_fea", tuple(clip_fea.shape),
                          f"[B, {cfg.image_tokens}, {cfg.clip_dim}] CLIP vision tokens for {cfg.variant}")
        if clip_fea.shape[0] == 1 and batch > 1:
            clip_fea = clip_fea.expand(batch, -1, -1)
        return self.img_emb(clip_fea.to(device), dtype)

    @staticmethod
    def _timesteps(t, batch: int, grid: tuple[int, int, int], device) -> torch.Tensor:
        """t as [B, 1] (a scalar, [1] or [B]), [B, f] (per latent frame) or [B, L] (per token; [1, ...] is shared by
        the batch). Per-token t that is constant over each frame's tokens (TI2V: frame 0 at 0, the rest at t) is
        taken per frame: the same values, with f time embeddings instead of L."""
        frames, tokens = grid[0], math.prod(grid)
        t = torch.as_tensor(t, device=device)
        if t.ndim <= 1:
            t = t.reshape(-1, 1)
        if t.ndim == 2 and t.shape[0] == 1:
            t = t.expand(batch, -1)
        if t.ndim != 2 or t.shape[0] != batch or t.shape[1] not in (1, frames, tokens):
            raise invalid("t", tuple(t.shape), f"[{batch}] timesteps (one per latent), [{batch}, {tokens}] per-token "
                                               f"timesteps (one per video token) or [{batch}, {frames}] (per frame)")
        if t.shape[1] == tokens != frames:
            per_frame = t.unflatten(1, (frames, -1))
            if bool((per_frame == per_frame[:, :, :1]).all()):
                t = per_frame[:, :, 0]
        return t

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, context, clip_fea: torch.Tensor | None = None,
                y: torch.Tensor | None = None, skip_blocks: set[int] | None = None,
                frame_indices: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, out_dim, F, H, W] noisy latents, t [B] timesteps (0..1000), [B, L] per-token timesteps (Wan 2.2,
        tokens in f, h, w order) or [B, f] per latent frame, context [B, L<=512, text_dim] (or a list of [L_i, text_dim]), clip_fea
        [B, Li, clip_dim], y [B, in_dim-out_dim, F, H, W] -> velocity [B, out_dim, F, H, W]."""
        cfg = self.config
        dtype = self.compute_dtype
        device = self.patch_embedding.weight.device
        if y is not None:
            x = torch.cat([x, y.to(x.device, x.dtype)], dim=1)
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            what = "noisy latents + y" if y is not None else "noisy latents (no y given)"
            raise invalid("x", f"{what} with shape {tuple(x.shape)}",
                          f"[B, {cfg.in_dim}, F, H, W] channels for {cfg.variant} (in_dim={cfg.in_dim})")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise invalid("x", tuple(x.shape), f"F, H, W divisible by the patch size {cfg.patch_size}")
        grid = (frames // pt, height // ph, width // pw)

        # Tokens: [B, D, f, h, w] -> [B, L, D], float32 residual stream
        x = self.patch_embedding(x.to(device, dtype)).flatten(2).transpose(1, 2).float()
        rope = rope_cos_sin(grid, cfg.head_dim, device, frame_indices)

        # Time: t [B, T] (T = 1, f or L) -> e [B, T, D] and e0 [B, T, 6, D], all float32
        t = self._timesteps(t, batch, grid, device)
        e = self.time_embedding(sinusoidal_embedding(t.flatten(), cfg.freq_dim).float()).float()
        e = e.unflatten(0, t.shape)
        e0 = self.time_projection(e).float().unflatten(2, (6, cfg.dim))

        context = self.text_embedding(self._pad_context(context, batch, device).to(dtype))  # [B, Lt, D]
        context_img = self._image_context(clip_fea, batch, device, dtype)                  # [B, Li, D] | None

        skip = set(skip_blocks or ())
        for i, block in enumerate(self.blocks):   # checkpointing/offload/swap wrap the blocks from outside
            if i not in skip:
                x = block(x, e0, context, context_img, rope)

        out = self.head(x, e)                                  # [B, L, pt*ph*pw*C] float32
        return unpatchify(out, grid, cfg.patch_size, cfg.out_dim)


def build_wan_model(config: WanConfig, device: torch.device | str = "meta") -> WanModel:
    """Construct without allocating weights when device is "meta" (the loader fills them in)."""
    with torch.device(device):
        return WanModel(config)


def keep_fp32(name: str) -> bool:
    """Parameters the official code runs in float32 (time embedding/projection, every modulation, the output head).
    They compute in float32 whatever they are stored in; the loader stores them in float32 unless the file already
    has them in the model's dtype (a bf16 file: the same values either way, 0.37 GB less for 14B)."""
    return name.startswith(("time_embedding.", "time_projection.", "head.")) or name.endswith("modulation")
