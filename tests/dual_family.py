"""A second model family defined entirely in the tests: the acceptance test of the Family interface
(docs/ARCHITECTURE.md). Its DiT has two block lists like HunyuanVideo (dual-stream `double_blocks`, then
single-stream `single_blocks`), its own cache layout (`ds`), text key and LoRA names; nothing generic knows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from engine.data.encoding import CacheRequirements, Clip, latent_key, pixels_to_video
from engine.errors import invalid
from engine.families import Fp8Spec, LoRASpec
from engine.sampling import make_noise, make_solver, run_sampler

LATENT, TEXT, DIM = 4, 8, 32


class DoubleBlock(nn.Module):
    """Image and text tokens, each with its own weights, attending jointly (a mean over both streams)."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.imgqkv, self.txtqkv = nn.Linear(d, d), nn.Linear(d, d)
        self.imgmlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.txtmlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, img, txt, vec):                      # img [B, L, D], txt [B, T, D], vec [B, D]
        img_h, txt_h = self.imgqkv(self.norm(img)), self.txtqkv(self.norm(txt))
        joint = torch.cat([img_h, txt_h], 1).mean(1, keepdim=True) + vec[:, None]
        img = img + torch.tanh(img_h + joint)
        txt = txt + torch.tanh(txt_h + joint)
        return img + self.imgmlp(self.norm(img)), txt + self.txtmlp(self.norm(txt))


class SingleBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.linear1, self.linear2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, vec):                             # x [B, L+T, D]
        return x + self.linear2(torch.nn.functional.gelu(self.linear1(self.norm(x) + vec[:, None])))


class DualDiT(nn.Module):
    family = "dual"

    def __init__(self, double: int = 2, single: int = 3, d: int = DIM, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = {"double": double, "single": single, "dim": d}
        self.img_in, self.txt_in = nn.Linear(LATENT, d), nn.Linear(TEXT, d)
        self.time_in = nn.Linear(1, d)
        self.double_blocks = nn.ModuleList(DoubleBlock(d) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleBlock(d) for _ in range(single))
        self.final = nn.Linear(d, LATENT)

    def forward(self, x, t, context):                      # x [B, C, F, H, W], t [B] 0..1000, context list of [T, 8]
        b, c, f, h, w = x.shape
        img = self.img_in(x.flatten(2).transpose(1, 2))                          # [B, FHW, D]
        txt = self.txt_in(torch.stack([ctx.mean(0, keepdim=True) for ctx in context]))   # [B, 1, D]
        vec = self.time_in(t.reshape(-1, 1).float() / 1000)                      # [B, D]
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x2 = torch.cat([img, txt], 1)
        for block in self.single_blocks:
            x2 = block(x2, vec)
        return self.final(x2[:, :img.shape[1]]).transpose(1, 2).reshape(b, c, f, h, w)


# --- encoders of the family's cache (deterministic stand-ins) ------------------------------------------------------
class PoolVAE:
    identity = "pool-vae"

    def encode(self, video):                               # [1, 3, F, H, W] in [-1, 1] -> [1, 4, F, H/8, W/8]
        pooled = torch.nn.functional.avg_pool3d(video.float(), (1, 8, 8))
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


class HashText:
    identity = "hash-text"

    def encode(self, captions):                            # one [words, 8] tensor per caption
        out = []
        for c in captions:
            g = torch.Generator().manual_seed(sum(map(ord, c)))
            out.append(torch.randn(max(1, len(c.split())), TEXT, generator=g))
        return out


class DualCacheAdapter:
    arch = "ds"
    target_fps = 24.0

    def __init__(self, vae=None, text_encoder=None):
        self.vae, self.text_encoder = vae, text_encoder

    def latent_description(self):
        return None if self.vae is None else {"vae": self.vae.identity}

    def text_description(self):
        return None if self.text_encoder is None else {"text_encoder": self.text_encoder.identity}

    def encode_clip(self, clip: Clip):
        lat = self.vae.encode(pixels_to_video(clip.frames, "cpu", torch.float32))[0]
        return {latent_key("latents", lat): lat}

    def encode_texts(self, captions):
        return [{"varlen_llm_float32": e} for e in self.text_encoder.encode(captions)]


# --- the family ------------------------------------------------------------------------------------------------------
@dataclass
class DualRequest:
    context: torch.Tensor
    width: int
    height: int
    frames: int
    steps: int
    seed: int
    shift: float


def _underscore(name: str) -> str | None:
    m = re.match(r"^(double_blocks|single_blocks)_(\d+)_([a-z0-9]+)(?:_(\d+))?$", name)
    if not m:
        return None
    return f"{m[1]}.{m[2]}.{m[3]}" + (f".{m[4]}" if m[4] else "")


class DualFamily:
    name = "dual"
    display_name = "Dual-stream (test family)"
    cache_arch = "ds"
    lora = LoRASpec(block_lists=("double_blocks", "single_blocks"), default_exclude=r".*norm.*",
                    base_model_version="dual", architecture="dual/lora", implementation="tests/dual_family.py",
                    network_module="networks.lora_dual", underscore_to_name=_underscore)
    fp8 = Fp8Spec(include=("double_blocks.", "single_blocks."), exclude=("norm",))

    @staticmethod
    def block_lists(model):
        return [model.double_blocks, model.single_blocks]

    @staticmethod
    def cache_adapter(**kw):
        return DualCacheAdapter(**kw)

    @staticmethod
    def latent_cache_adapter(vae, task, clip_vision=None, **options):
        if task != "t2v" or clip_vision is not None:
            raise invalid("task", task, "t2v without clip_vision")
        return DualCacheAdapter(vae=vae, **options)

    @staticmethod
    def cache_requirements(model, **identities):
        return CacheRequirements("ds", LATENT, TEXT, ("latents", "llm"), None, identities or None, text_key="llm")

    @staticmethod
    def described_cache_requirements(latent, text, text_dim=None):
        ids = {k: v for k, v in (("vae", (latent or {}).get("vae")), ("text_encoder", (text or {}).get("text_encoder")))
               if v}
        return CacheRequirements("ds", LATENT, text_dim, ("latents", "llm"), None, ids or None, text_key="llm")

    @staticmethod
    def collate(samples):
        return {"latents": torch.stack([s["latents"] for s in samples]), "context": [s["llm"] for s in samples]}

    @staticmethod
    def check_batch(model, batch):
        lat = batch.get("latents")
        if not isinstance(lat, torch.Tensor) or lat.ndim != 5 or lat.shape[1] != LATENT:
            raise invalid("dataset latents", getattr(lat, "shape", None), f"[B, {LATENT}, F, H, W] latents")

    @staticmethod
    def training_forward(model, batch, noisy, t, target):
        return model(noisy, t, [c.to(noisy.device) for c in batch["context"]]), target

    @staticmethod
    def sampling_request(prompt):
        return DualRequest(prompt.context, prompt.width, prompt.height, prompt.frames, prompt.steps, prompt.seed,
                           prompt.shift or 3.0)

    @staticmethod
    def check_sampling(model, r: DualRequest):
        if r.width % 8 or r.height % 8:
            raise invalid("width/height", (r.width, r.height), "multiples of 8")

    @staticmethod
    def sample(model, r: DualRequest, progress=None):
        noise = make_noise((LATENT, (r.frames - 1) // 4 + 1, r.height // 8, r.width // 8), r.seed, 1, "cpu", "cpu")
        solver = make_solver("euler", r.steps, r.shift)
        return run_sampler(solver, noise, lambda x, t, i: model(x, t, [r.context]), progress)

    @staticmethod
    def latent_preview(latents):
        return torch.sigmoid(latents[0, :3, 0].float()).permute(1, 2, 0)


FAMILY = DualFamily()
