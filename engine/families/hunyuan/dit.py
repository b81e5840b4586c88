"""HunyuanVideo DiT (HYVideo-T/2-cfgdistill, 13B), written from the published architecture.

Module names are exactly the official ones (`double_blocks.N.img_attn_qkv`, `single_blocks.N.linear1`,
`txt_in.individual_token_refiner.blocks.N.self_attn_qkv`, `final_layer.adaLN_modulation.1`, ...), which are also the
names of ComfyUI's repackaged files and of Musubi Tuner's LoRA keys, so a checkpoint loads without renaming and a LoRA
key maps one to one onto a module.

Layout: 20 double-stream blocks (image and text tokens keep their own weights and meet in one joint attention), then
40 single-stream blocks over the concatenated [image; text] sequence (one fused Linear for qkv + MLP input). Text
arrives as LLaVA-LLaMA-3 hidden states [B, L, 4096] refined by a 2-block token refiner, plus a CLIP-L pooled vector
[B, 768] added to the time embedding; the cfg-distilled model also embeds the guidance scale (x1000) like a timestep.

Precision follows the official code: everything runs in the weights' dtype (the "compute dtype": bf16, fp16 or fp32),
except RoPE and the q/k RMSNorm, which are computed in float32 and cast back, and the sinusoidal features.

The text mask: padded text tokens are never keys (official: flash-attn varlen sequences [image + valid text]), so
they cannot change an image token; keys are selected per sample by index, which every attention kernel accepts.

Shapes used in comments: B batch, C channels, F/H/W latent frames/height/width, f/h/w the patch grid (F/pt, H/ph,
W/pw), Li = f*h*w image tokens, Lt text tokens (padded), D hidden size, N heads, d = D/N head dim (128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...attention import attention, set_backend
from ...errors import invalid
from ...memory.chunked import chunked
from ...memory.lean_ops import rms_norm, rope

FREQ_DIM = 256             # sinusoidal timestep features (time_in, guidance_in, the refiner's t_embedder)


def official_rope_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the frame/height/width axes: 16/56/56 for d=128 (official), the same 1/8 : 7/16
    : 7/16 proportions for other head dims that are multiples of 32 (tiny presets)."""
    if head_dim % 32:
        raise invalid("HunyuanVideo head dim", head_dim, "a multiple of 32 (RoPE splits it 1/8, 7/16, 7/16)")
    t = head_dim // 8
    return t, (head_dim - t) // 2, (head_dim - t) // 2


@dataclass
class HunyuanConfig:
    hidden_size: int = 3072
    num_heads: int = 24
    double_blocks: int = 20             # MMDoubleStreamBlock count
    single_blocks: int = 40             # MMSingleStreamBlock count
    mlp_ratio: float = 4.0
    in_channels: int = 16               # SkyReels V1 I2V: 32 = noisy latents + first-frame latent on channels
    out_channels: int = 16
    patch_size: tuple = (1, 2, 2)
    text_dim: int = 4096                # LLaVA-LLaMA-3 hidden states
    text_pool_dim: int = 768            # CLIP-L pooled output (vector_in)
    refiner_blocks: int = 2             # txt_in.individual_token_refiner depth
    guidance_embed: bool = True         # guidance_in: the cfg-distilled model embeds the guidance scale
    rope_dims: tuple | None = None      # per-axis RoPE channels (t, h, w); None: official_rope_dims(head_dim)
    rope_theta: float = 256.0
    eps: float = 1e-6
    variant: str = "custom"             # human name, e.g. "t2v-13B", "skyreels-i2v-13B", "tiny"

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.hidden_size % self.num_heads:
            raise invalid("HunyuanConfig.num_heads", self.num_heads, f"a divisor of hidden_size={self.hidden_size}")
        if self.rope_dims is None:
            self.rope_dims = official_rope_dims(self.head_dim)
        self.rope_dims = tuple(int(r) for r in self.rope_dims)
        if sum(self.rope_dims) != self.head_dim or any(r % 2 for r in self.rope_dims):
            raise invalid("HunyuanConfig.rope_dims", self.rope_dims,
                          f"three even numbers summing to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: timestep features, RoPE, unpatchify, attention with text padding
# ---------------------------------------------------------------------------------------------------------------

def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """[B] values (timesteps 0..1000, or guidance x1000) -> [B, dim] float32 [cos(t·ω_i), sin(t·ω_i)],
    ω_i = 10000^(-i/half) (cos half first, as the official TimestepEmbedder)."""
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * omega[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_cos_sin(grid: tuple[int, int, int], rope_dims: tuple[int, int, int], theta: float, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [Li, 1, d/2] (float32, computed in float64) for a (f, h, w) patch grid, tokens in f,h,w order,
    positions 0..n-1 on every axis."""
    return rope_cos_sin_at(tuple(torch.arange(n, dtype=torch.float64, device=device) for n in grid), rope_dims, theta)


def rope_cos_sin_at(positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rope_dims: tuple[int, int, int],
                    theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [f*h*w, 1, d/2] (float32, computed in float64) for explicit per-axis positions (1-D tensors of
    lengths f, h, w; e.g. FramePack's frame indices), tokens in f,h,w order. Each axis uses its own channel count:
    angle = pos·θ^(-2j/axis_dim)."""
    axes = []
    for pos, dim in zip(positions, rope_dims):
        omega = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        axes.append(torch.outer(pos.to(torch.float64), omega))                                   # [n, dim/2]
    f, h, w = (len(p) for p in positions)
    angles = torch.cat([axes[0][:, None, None].expand(f, h, w, -1), axes[1][None, :, None].expand(f, h, w, -1),
                        axes[2][None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, -1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, Li, N, d] by the tables; adjacent channels (2i, 2i+1) form one complex number (official layout)."""
    return rope(x, cos, sin)   # (re·cos − im·sin, re·sin + im·cos) in float32, without its float32 temporaries


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], out_channels: int
               ) -> torch.Tensor:
    """[B, Li, C*pt*ph*pw] (C outermost, then pt, ph, pw: official order) -> [B, C, f*pt, h*ph, w*pw]."""
    f, h, w = grid
    pt, ph, pw = patch
    x = x.reshape(x.shape[0], f, h, w, out_channels, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)                 # B, C, f, pt, h, ph, w, pw
    return x.reshape(x.shape[0], out_channels, f * pt, h * ph, w * pw)


# Which tokens may be keys: None (all of them), an index tensor [B, K] (same count in every sample: one kernel call)
# or a list of B index tensors [K_b] (one call per sample). Built once per forward by `key_selection`.


def key_selection(keep: torch.Tensor | None) -> torch.Tensor | list[torch.Tensor] | None:
    """keep [B, L] bool (False: a padded text token) -> the KeySelection above (one host sync per forward)."""
    if keep is None or bool(keep.all()):
        return None
    counts = keep.sum(dim=1).tolist()
    index = [row.nonzero().squeeze(1) for row in keep]
    return torch.stack(index) if len(set(counts)) == 1 else index


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys, backend: str) -> torch.Tensor:
    """q/k/v [B, L, N, d] -> [B, L, N, d]; every query attends only to the selected keys (padding excluded)."""
    if keys is None:
        return attention(q, k, v, backend=backend)
    if isinstance(keys, torch.Tensor):                                   # [B, K]
        idx = keys[:, :, None, None].expand(-1, -1, k.shape[2], k.shape[3])
        return attention(q, k.gather(1, idx), v.gather(1, idx), backend=backend)
    return torch.cat([attention(q[b:b + 1], k[b:b + 1, i], v[b:b + 1, i], backend=backend)
                      for b, i in enumerate(keys)])


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], shift/scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine parameters (img_norm1/2, txt_norm1/2, pre_norm, norm_final)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """Per-head q/k RMSNorm (weight [d]): normalized in float32, cast back, then scaled (official order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = (x.float() * rsqrt(mean(x.float()²) + eps)).to(x.dtype) * weight.to(x.dtype), without keeping x.float()
        return rms_norm(x, self.weight.to(x.dtype), self.eps)


# ---------------------------------------------------------------------------------------------------------------
# Embedders (official module names: `mlp.0`/`mlp.2`, `in_layer`/`out_layer`, `linear_1`/`linear_2`)
# ---------------------------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """time_in / guidance_in / txt_in.t_embedder: [B] -> sinusoidal [B, 256] -> Linear, SiLU, Linear -> [B, D]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    """vector_in: CLIP-L pooled [B, 768] -> [B, D]."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class TextProjection(nn.Module):
    """txt_in.c_embedder: masked mean of the text states [B, text_dim] -> [B, D]."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class PatchEmbed(nn.Module):
    """img_in: [B, C, F, H, W] -> Conv3d(kernel = stride = patch) -> [B, Li, D]."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLP(nn.Module):
    """fc1, activation, fc2 (GELU-tanh in the DiT blocks, SiLU in the token refiner)."""

    def __init__(self, dim: int, hidden: int, act: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Modulation(nn.Module):
    """`*_mod` / `modulation` (ModulateDiT): vec [B, D] -> SiLU, Linear -> `factor` vectors [B, D] each."""

    def __init__(self, hidden: int, factor: int):
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden, factor * hidden)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(vec)).chunk(self.factor, dim=-1)


def _split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L, 3*D] laid out (3, N, d) -> q, k, v [B, L, N, d]."""
    return qkv.unflatten(-1, (3, heads, -1)).unbind(2)


# ---------------------------------------------------------------------------------------------------------------
# Text: the individual token refiner (txt_in)
# ---------------------------------------------------------------------------------------------------------------

class RefinerBlock(nn.Module):
    """Self-attention over the text tokens (no RoPE, no q/k norm) + SiLU MLP, gated by the time+text vector."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.self_attn_qkv = nn.Linear(d, 3 * d)
        self.self_attn_proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.mlp = MLP(d, cfg.mlp_hidden, nn.SiLU())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor, c: torch.Tensor, keys) -> torch.Tensor:
        """x [B, Lt, D], c [B, D]."""
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=-1)      # [B, D] each
        q, k, v = _split_heads(self.self_attn_qkv(self.norm1(x)), self.heads)
        attn = masked_attention(q, k, v, keys, self.attention_backend).flatten(2)
        x = x + self.self_attn_proj(attn) * gate_msa[:, None]
        return x + self.mlp(self.norm2(x)) * gate_mlp[:, None]


class IndividualTokenRefiner(nn.Module):
    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        self.blocks = nn.ModuleList([RefinerBlock(cfg) for _ in range(cfg.refiner_blocks)])


class TokenRefiner(nn.Module):
    """txt_in (SingleTokenRefiner): text states [B, Lt, text_dim] -> refined text tokens [B, Lt, D]."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        self.input_embedder = nn.Linear(cfg.text_dim, cfg.hidden_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.c_embedder = TextProjection(cfg.text_dim, cfg.hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, Lt, text_dim] compute dtype, t [B], mask [B, Lt] bool (at least one True per row)."""
        m = mask.float()[..., None]                                         # [B, Lt, 1]
        pooled = ((x.float() * m).sum(dim=1) / m.sum(dim=1)).to(x.dtype)  # mean of the real tokens [B, text_dim]
        c = self.t_embedder(t) + self.c_embedder(pooled)                    # [B, D]
        x = self.input_embedder(x)
        keys = key_selection(mask)
        for block in self.individual_token_refiner.blocks:
            x = block(x, c, keys)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------------------------

class MMDoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights; one joint attention over [image; text] (RoPE on image)."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.eps = cfg.num_heads, cfg.eps
        self.img_mod = Modulation(d, 6)
        self.img_attn_qkv = nn.Linear(d, 3 * d)
        self.img_attn_q_norm = RMSNorm(hd, cfg.eps)
        self.img_attn_k_norm = RMSNorm(hd, cfg.eps)
        self.img_attn_proj = nn.Linear(d, d)
        self.img_mlp = MLP(d, cfg.mlp_hidden, nn.GELU(approximate="tanh"))
        self.txt_mod = Modulation(d, 6)
        self.txt_attn_qkv = nn.Linear(d, 3 * d)
        self.txt_attn_q_norm = RMSNorm(hd, cfg.eps)
        self.txt_attn_k_norm = RMSNorm(hd, cfg.eps)
        self.txt_attn_proj = nn.Linear(d, d)
        self.txt_mlp = MLP(d, cfg.mlp_hidden, nn.GELU(approximate="tanh"))
        self.attention_backend = "sdpa"
        self.train_chunk_tokens = 16384

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor], keys) -> tuple[torch.Tensor, torch.Tensor]:
        """img [B, Li, D], txt [B, Lt, D], vec [B, D] -> (img, txt)."""
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)      # [B, D] each
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)

        iq, ik, iv = _split_heads(self.img_attn_qkv(modulate(layer_norm(img, self.eps), i_shift1, i_scale1)),
                                  self.heads)
        iq = apply_rope(self.img_attn_q_norm(iq), *rope)
        ik = apply_rope(self.img_attn_k_norm(ik), *rope)
        tq, tk, tv = _split_heads(self.txt_attn_qkv(modulate(layer_norm(txt, self.eps), t_shift1, t_scale1)),
                                  self.heads)
        tq, tk = self.txt_attn_q_norm(tq), self.txt_attn_k_norm(tk)

        attn = masked_attention(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), keys,
                                self.attention_backend).flatten(2)                  # [B, Li+Lt, D]
        img_attn, txt_attn = attn[:, : img.shape[1]], attn[:, img.shape[1]:]

        img = img + self.img_attn_proj(img_attn) * i_gate1[:, None]
        # token-wise: in training chunked over image tokens (the [Li, mlp] activations and their gradients are the
        # block's largest tensors)
        img = chunked(self._img_mlp, (img,), (i_shift2, i_scale2, i_gate2), (self.img_mlp,),
                      chunk=self.train_chunk_tokens)
        txt = txt + self.txt_attn_proj(txt_attn) * t_gate1[:, None]
        txt = txt + self.txt_mlp(modulate(layer_norm(txt, self.eps), t_shift2, t_scale2)) * t_gate2[:, None]
        return img, txt

    def _img_mlp(self, img: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor
                 ) -> torch.Tensor:
        return img + self.img_mlp(modulate(layer_norm(img, self.eps), shift, scale)) * gate[:, None]


class MMSingleStreamBlock(nn.Module):
    """One stream over [image; text]: linear1 = qkv + MLP input, linear2 = attention output + MLP output."""

    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.eps, self.hidden = cfg.num_heads, cfg.eps, d
        self.linear1 = nn.Linear(d, 3 * d + cfg.mlp_hidden)
        self.linear2 = nn.Linear(d + cfg.mlp_hidden, d)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.eps)
        self.modulation = Modulation(d, 3)
        self.attention_backend = "sdpa"
        self.train_chunk_tokens = 16384

    def forward(self, x: torch.Tensor, vec: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], keys
                ) -> torch.Tensor:
        """x [B, Li+Lt, D] (image tokens first), vec [B, D]."""
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(layer_norm(x, self.eps), shift, scale)).split(
            [3 * self.hidden, self.linear1.out_features - 3 * self.hidden], dim=-1)
        q, k, v = _split_heads(qkv, self.heads)
        q, k = self.q_norm(q), self.k_norm(k)
        li = rope[0].shape[0]                                                # image tokens get RoPE, text does not
        q = torch.cat([apply_rope(q[:, :li], *rope), q[:, li:]], dim=1)
        k = torch.cat([apply_rope(k[:, :li], *rope), k[:, li:]], dim=1)
        attn = masked_attention(q, k, v, keys, self.attention_backend).flatten(2)
        # token-wise from here: in training, chunked over tokens (the [L, D + mlp] linear2 input and its gradients
        # are the block's largest tensors)
        return chunked(self._output, (x, attn, mlp), (gate,), (self.linear2,), chunk=self.train_chunk_tokens)

    def _output(self, x: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.linear2(torch.cat([attn, F.gelu(mlp, approximate="tanh")], dim=-1))
        return x + out * gate[:, None]


class FinalLayer(nn.Module):
    def __init__(self, cfg: HunyuanConfig):
        super().__init__()
        d = cfg.hidden_size
        self.eps = cfg.eps
        self.linear = nn.Linear(d, math.prod(cfg.patch_size) * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """x [B, Li, D], vec [B, D] -> [B, Li, C*pt*ph*pw]."""
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x, self.eps), shift, scale))


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

class HunyuanVideoModel(nn.Module):
    """HunyuanVideo DiT. Build it on the meta device and fill it with `engine.checkpoint.load_into_module`
    (see `engine.families.hunyuan.loader.load_hunyuan_dit`)."""

    family = "hunyuan"   # engine.families registry key: the generic engine finds this family's rules through it

    def __init__(self, config: HunyuanConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.img_in = PatchEmbed(config)
        self.txt_in = TokenRefiner(config)
        self.time_in = TimestepEmbedder(d)
        self.vector_in = MLPEmbedder(config.text_pool_dim, d)
        if config.guidance_embed:
            self.guidance_in = TimestepEmbedder(d)
        self.double_blocks = nn.ModuleList([MMDoubleStreamBlock(config) for _ in range(config.double_blocks)])
        self.single_blocks = nn.ModuleList([MMSingleStreamBlock(config) for _ in range(config.single_blocks)])
        self.final_layer = FinalLayer(config)
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
        dt = self.img_in.proj.weight.dtype
        return dt if dt in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16

    # --- input checks -----------------------------------------------------------------------------------------------
    def _per_sample(self, name: str, value, batch: int, device, what: str) -> torch.Tensor:
        value = torch.as_tensor(value, device=device).reshape(-1)
        if value.numel() == 1:
            value = value.expand(batch)
        if value.shape[0] != batch:
            raise invalid(name, tuple(value.shape), f"[{batch}] {what} (one per latent)")
        return value

    def _text(self, text_states, text_mask, text_states_2, batch: int, device):
        cfg = self.config
        if text_states.ndim != 3 or text_states.shape[-1] != cfg.text_dim:
            raise invalid("text_states", tuple(text_states.shape),
                          f"[B, tokens, {cfg.text_dim}] LLM hidden states for {cfg.variant}")
        if text_states.shape[0] == 1 and batch > 1:
            text_states = text_states.expand(batch, -1, -1)
        if text_states.shape[0] != batch:
            raise invalid("text_states", tuple(text_states.shape), f"batch {batch} (one prompt per latent)")
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=device)
        text_mask = text_mask.to(device).bool()
        if text_mask.shape[0] == 1 and batch > 1:
            text_mask = text_mask.expand(batch, -1)
        if tuple(text_mask.shape) != tuple(text_states.shape[:2]):
            raise invalid("text_mask", tuple(text_mask.shape), f"{tuple(text_states.shape[:2])} (one flag per token)")
        if not bool(text_mask.any(dim=1).all()):
            raise invalid("text_mask", "a prompt with no real token", "at least one True (unpadded) token per prompt")
        if text_states_2 is None or text_states_2.shape[-1] != cfg.text_pool_dim:
            shape = None if text_states_2 is None else tuple(text_states_2.shape)
            raise invalid("text_states_2", shape, f"[B, {cfg.text_pool_dim}] CLIP-L pooled embeddings")
        text_states_2 = text_states_2.reshape(-1, cfg.text_pool_dim)
        if text_states_2.shape[0] == 1 and batch > 1:
            text_states_2 = text_states_2.expand(batch, -1)
        if text_states_2.shape[0] != batch:
            raise invalid("text_states_2", tuple(text_states_2.shape), f"[{batch}, {cfg.text_pool_dim}]")
        return text_states, text_mask, text_states_2

    # --- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, text_states: torch.Tensor,
                text_mask: torch.Tensor | None = None, text_states_2: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, y: torch.Tensor | None = None, block_cache=None
                ) -> torch.Tensor:
        """x [B, 16, F, H, W] noisy latents, t [B] timesteps (0..1000), text_states [B, Lt, text_dim], text_mask
        [B, Lt] (True: a real token; None: all real), text_states_2 [B, 768] CLIP-L pooled, guidance [B] the
        embedded guidance scale x 1000 (official convention; None skips the guidance embedding, as for an
        unconditional CFG pass), y [B, in_channels-16, F, H, W] channels concatenated to x (SkyReels I2V: the
        first-frame latent), block_cache: a sampler's `engine.sampling.magcache.MagCache` (may reuse the blocks'
        residual on the image tokens instead of running them) -> velocity [B, out_channels, F, H, W] float32."""
        cfg = self.config
        dtype = self.compute_dtype
        device = self.img_in.proj.weight.device
        if y is not None:
            x = torch.cat([x, y.to(x.device, x.dtype)], dim=1)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            what = "noisy latents + y" if y is not None else "noisy latents (no y given)"
            raise invalid("x", f"{what} with shape {tuple(x.shape)}",
                          f"[B, {cfg.in_channels}, F, H, W] for {cfg.variant} (in_channels={cfg.in_channels})")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise invalid("x", tuple(x.shape), f"F, H, W divisible by the patch size {cfg.patch_size}")
        grid = (frames // pt, height // ph, width // pw)
        t = self._per_sample("t", t, batch, device, "timesteps")
        text_states, text_mask, text_states_2 = self._text(text_states, text_mask, text_states_2, batch, device)

        # Conditioning vector [B, D]: time + CLIP pooled text (+ embedded guidance)
        vec = self.time_in(t) + self.vector_in(text_states_2.to(device, dtype))
        if guidance is not None:
            if not cfg.guidance_embed:
                raise invalid("guidance", "a guidance value", f"None: {cfg.variant} has no guidance embedder "
                                                              "(not a guidance-distilled model; use real CFG)")
            vec = vec + self.guidance_in(self._per_sample("guidance", guidance, batch, device, "guidance values"))

        img = self.img_in(x.to(device, dtype))                                      # [B, Li, D]
        txt = self.txt_in(text_states.to(device, dtype), t, text_mask)              # [B, Lt, D]
        rope = rope_cos_sin(grid, cfg.rope_dims, cfg.rope_theta, device)            # [Li, 1, d/2] each
        keep = torch.cat([torch.ones(batch, img.shape[1], dtype=torch.bool, device=device), text_mask], dim=1)
        keys = key_selection(keep)                                                  # padded text: never a key

        def blocks(box: list) -> torch.Tensor:
            img, txt_ = box.pop(), txt    # the only reference: each block's input is freed once it ran
            for block in self.double_blocks:     # checkpointing/offload/swap wrap the blocks from outside
                img, txt_ = block(img, txt_, vec, rope, keys)
            x = torch.cat([img, txt_], dim=1)                                       # [B, Li+Lt, D]
            for block in self.single_blocks:
                x = block(x, vec, rope, keys)
            return x[:, : img.shape[1]]

        box = [img]
        del img
        img = blocks(box) if block_cache is None else block_cache.run(box[0], lambda x: blocks([x]))
        out = self.final_layer(img, vec)                                            # [B, Li, C*pt*ph*pw]
        return unpatchify(out.float(), grid, cfg.patch_size, cfg.out_channels)


def build_hunyuan_model(config: HunyuanConfig, device: torch.device | str = "meta") -> HunyuanVideoModel:
    """Construct without allocating weights when device is "meta" (the loader fills them in)."""
    with torch.device(device):
        return HunyuanVideoModel(config)


# fp8 storage targets, as Musubi Tuner's HunyuanVideo `fp8_optimization`: Linear layers inside the blocks, minus the
# norms and the single blocks' `modulation` (the double blocks' `img_mod`/`txt_mod` are quantized there too).
FP8_INCLUDE = ("double_blocks.", "single_blocks.")
FP8_EXCLUDE = ("norm", "modulation")
