"""The HunyuanVideo demo models: a tiny VAE, LLaVA-LLaMA-3 and CLIP-L text encoders (with their tokenizers next to
them) and a T2V DiT, in the key layouts of the official and ComfyUI files.

The DiT has no guidance embedder: HunyuanVideo's T2V release is guidance-distilled, which a model trained from
scratch in minutes cannot be, so the demo samples with real CFG (guidance 5, an empty negative prompt) instead of
the embedded guidance scale."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import (CLIP, UNCOND_PROB, FlowTraining, calibrate_latents, dit_data, flow_batch, log, pack, save,
                     score_generation, score_vae_round_trip, to_clip, to_video, train_autoencoder, vae_data)

shapes = pack("engine.demo.shapes")
hv_vae = pack("engine.families.hunyuan.vae")
hv_dit = pack("engine.families.hunyuan.dit")
pipeline = pack("engine.families.hunyuan.pipeline")
llava = pack("engine.encoders.llava_llama")
clip_text = pack("engine.encoders.clip_text")

VAE_FILE, DIT_FILE = "hunyuan_video_demo_vae.safetensors", "hunyuan_video_demo_t2v.safetensors"
LLM_FILE, CLIP_FILE = "llava_llama3_demo.safetensors", "clip_l_demo.safetensors"
VAE_CONFIG = hv_vae.HunyuanVAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4)
DIT_CONFIG = hv_dit.HunyuanConfig(hidden_size=128, num_heads=2, double_blocks=2, single_blocks=2,
                                  text_dim=llava.TINY_LLAVA_LLAMA.hidden_size,
                                  text_pool_dim=clip_text.TINY_CLIP_L.hidden_size, guidance_embed=False,
                                  variant="demo-t2v")
# The demo workflow's sampler settings
SAMPLE = dict(width=CLIP["width"], height=CLIP["height"], frames=CLIP["frames"], steps=20, guidance_scale=5.0,
              shift=3.0, solver="unipc")
NEGATIVE_PROMPT = ""
# The text encoders train along with the DiT, and the causal LLaMA learns to carry colour and motion to its later
# tokens but not the shape (docs/demo.md). With a weight > 0, linear probes on the prompt's mean LLaMA state and on
# CLIP's pooled vector must name the caption's colour, shape and motion, which makes both vectors carry all three
# (the probes are not shipped). 0: the shipped models' recipe; 0.1 was tried and did worse (docs/demo.md).
TEXT_PROBE_WEIGHT = 0.0


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

def vae_forward(vae, video: torch.Tensor, noise: float = 0.0):
    """Autograd encode/decode of the causal VAE -> reconstruction, raw latent mean (see the Wan part)."""
    mu = vae.quant_conv(vae.encoder(video))[:, :VAE_CONFIG.latent_channels]
    z = mu + noise * mu.detach().std() * torch.randn_like(mu) if noise else mu
    return vae.decoder(vae.post_quant_conv(z)), mu


def train_vae(seed: int, steps: int, batch: int = 16, on_progress=None) -> dict[str, torch.Tensor]:
    """-> the calibrated VAE state dict. `on_progress(state)` runs every 250 steps (uncalibrated partial files)."""
    rng, pool = vae_data(seed)
    vae = hv_vae.HunyuanVAE(VAE_CONFIG).float()
    vae.conv_chunk = 0                                                                 # whole clips per conv
    train_autoencoder(vae, vae_forward, pool, rng, steps, batch, on_progress)
    with torch.no_grad():
        mus = torch.cat([vae.encode_mean(to_video(pool[i:i + 16])) for i in range(0, len(pool), 16)])
    # raw latents x 0.476986 (the pipeline's scaling) then have mean 0 and std 1 per channel
    was = calibrate_latents(mus, 0.0, 1.0 / hv_vae.SCALING_FACTOR, vae.quant_conv, vae.post_quant_conv)
    log(f"VAE latents calibrated: per-channel std was {was.min():.3f}..{was.max():.3f}")
    return vae.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# Text encoders + DiT
# ----------------------------------------------------------------------------------------------------------------

class TextEncoders:
    """The tiny LLaVA-LLaMA-3 and CLIP-L presets made trainable: `encode` with autograd (the loaders' `encode` is
    inference-only) -> LLM states [B, L, D] cut to the batch's longest prompt, their mask, CLIP pooled [B, D2]."""

    def __init__(self):
        self.llm = llava.load_llava_llama(llava.PRESET_TINY, dtype=torch.float32)
        self.clip = clip_text.load_clip_text(clip_text.PRESET_TINY, dtype=torch.float32)
        self.modules = (self.llm.model, self.clip.model)
        for m in self.modules:
            m.train().requires_grad_(True)

    def encode(self, prompts: list[str]):
        ids, mask = self.llm.tokenizer(prompts, "video", self.llm.text_len)
        crop, n = self.llm.tokenizer.crop_start["video"], int(mask.sum(dim=1).max())   # right-padded
        states = self.llm.model(input_ids=ids[:, :n], attention_mask=mask[:, :n]).last_hidden_state[:, crop:]
        cids, cmask = self.clip.tokenizer(prompts, self.clip.config.max_positions)
        pooled = self.clip.model(input_ids=cids, attention_mask=cmask).pooler_output
        return states, mask[:, crop:n].bool(), pooled


def llm_file_state(trained) -> dict:
    """ComfyUI's llava_llama3 layout: the trained LLaMA module's layers over a whole tiny file (the layers after
    them, the final norm and lm_head are never used for HunyuanVideo's states, as in the real file)."""
    trained = {f"model.{k}": v for k, v in trained.state_dict().items()}
    return {k: trained.get(k, v) for k, v in llava.tiny_llava_llama_state_dict().items()}


def clip_file_state(trained) -> dict:
    """ComfyUI's clip_l layout (`text_model.*`) of the trained CLIP module."""
    inner = {f"text_model.{k}": v for k, v in clip_text.text_transformer(trained).state_dict().items()}
    return {k: inner.get(k, v) for k, v in clip_text.tiny_clip_l_state_dict().items()}


class TextProbe(nn.Module):
    """Linear heads naming a caption's colour, shape and motion from one text vector [B, dim]."""

    ATTRIBUTES = {"colour": tuple(shapes.PALETTE), "shape": shapes.SHAPES, "motion": tuple(shapes.MOTIONS)}

    def __init__(self, dim: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(dim, len(v)) for k, v in self.ATTRIBUTES.items()})

    def loss(self, x: torch.Tensor, captions: list[str]) -> torch.Tensor:
        specs = [shapes.parse_caption(c) for c in captions]
        return sum(F.cross_entropy(head(x), torch.tensor([self.ATTRIBUTES[k].index(getattr(s, k)) for s in specs]))
                   for k, head in self.heads.items())


def text_probe_loss(probes, prompts: list[str], states, mask, pooled) -> torch.Tensor:
    """The probes' loss on the captioned prompts of a batch (the dropped ones are the empty negative prompt)."""
    keep = [i for i, p in enumerate(prompts) if p != NEGATIVE_PROMPT]
    if not keep:
        return torch.zeros(())
    captions = [prompts[i] for i in keep]
    mean = (states * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)                     # [B, D]
    return probes[0].loss(mean[keep], captions) + probes[1].loss(pooled[keep], captions)


def train_dit(seed: int, steps: int, vae_state: dict, batch: int = 16, on_progress=None) -> tuple[dict, dict, dict]:
    """-> the file states of the averaged DiT, LLaVA-LLaMA-3 and CLIP-L. `on_progress(dit, llm, clip)` runs every 500
    steps (partial files)."""
    def frozen_vae():
        vae = hv_vae.HunyuanVAE(VAE_CONFIG).float()
        vae.load_state_dict(vae_state)
        return vae.eval()
    rng, latents, captions = dit_data(seed, frozen_vae)

    text = TextEncoders()
    model = hv_dit.build_hunyuan_model(DIT_CONFIG, "cpu").float()
    model.load_state_dict(pack("engine.families.hunyuan.presets").random_state_dict(DIT_CONFIG, seed))
    model.train()
    probes = (TextProbe(DIT_CONFIG.text_dim), TextProbe(DIT_CONFIG.text_pool_dim)) if TEXT_PROBE_WEIGHT else ()
    training = FlowTraining(model, text.modules + probes, steps)
    for step in range(steps):
        idx = [rng.randrange(len(captions)) for _ in range(batch)]
        prompts = [captions[i] if rng.random() >= UNCOND_PROB else NEGATIVE_PROMPT for i in idx]
        xt, sigma, target = flow_batch(latents, idx)
        states, mask, pooled = text.encode(prompts)
        loss = F.mse_loss(model(xt, sigma * 1000, states, mask, pooled), target)
        if probes:
            loss = loss + TEXT_PROBE_WEIGHT * text_probe_loss(probes, prompts, states, mask.float(), pooled)
        training.step(step, loss)
        if on_progress is not None and step % 500 == 499 and step < steps - 1:
            on_progress(*_file_states(training))
    return _file_states(training)


def _file_states(training: FlowTraining) -> tuple[dict, dict, dict]:
    dit, llm, clip = training.averaged()[:3]                                          # (not the probes)
    return dit.state_dict(), llm_file_state(llm), clip_file_state(clip)


# ----------------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------------

def stage_vae(out: Path, seed: int, steps: int) -> None:
    partial = lambda state: save(state, out / ("partial_" + VAE_FILE), "hunyuan-video-vae (partial)", seed)  # noqa: E731
    save(train_vae(seed, steps, on_progress=partial), out / VAE_FILE, "hunyuan-video-vae", seed)


def stage_dit(out: Path, seed: int, steps: int) -> None:
    vae_state = {k: v.float() for k, v in
                 hv_vae.load_hunyuan_vae(out / VAE_FILE, dtype=torch.float32).state_dict().items()}
    # the tokenizers next to the weights, where the loaders look for them (LLaMA: tokenizer.json; CLIP: vocab.json,
    # merges.txt); the umT5 demo file carries its own
    shutil.copy(llava.TINY_TOKENIZER, out / llava.TOKENIZER_FILE)
    for name in clip_text.TOKENIZER_FILES:
        shutil.copy(clip_text.TINY_TOKENIZER / name, out / name)

    def save_all(dit_state: dict, llm_state: dict, clip_state: dict):
        save(dit_state, out / DIT_FILE, "hunyuan-video-t2v", seed)
        save(llm_state, out / LLM_FILE, "llava-llama3", seed)
        save(clip_state, out / CLIP_FILE, "clip-l", seed)
    save_all(*train_dit(seed, steps, vae_state, on_progress=save_all))


def load_text_encoders(out: Path):
    encoders = pack("engine.families.hunyuan.text").HunyuanTextEncoders
    return encoders(llava.load_llava_llama(out / LLM_FILE, dtype=torch.float32),
                    clip_text.load_clip_text(out / CLIP_FILE, dtype=torch.float32))


@torch.no_grad()
def stage_eval(out: Path, seed: int) -> None:
    vae = hv_vae.load_hunyuan_vae(out / VAE_FILE, dtype=torch.float32)
    score_vae_round_trip(lambda video: vae.decode(vae.encode(video)), seed)
    if not (out / DIT_FILE).is_file():
        return
    model = pack("engine.families.hunyuan.loader").load_hunyuan_dit(out / DIT_FILE, dtype=torch.float32).eval()
    encoders = load_text_encoders(out)
    real_tokens = pack("engine.families.hunyuan.text").real_tokens

    def embed(prompt: str):
        e = encoders.encode([prompt])
        return real_tokens(e["states"][0], e["mask"][0]), e["pooled"][0]
    negative, negative_pooled = embed(NEGATIVE_PROMPT)

    def generate_clip(prompt: str, seed: int):
        context, pooled = embed(prompt)
        request = pipeline.HunyuanGenerateRequest(task="t2v", context=context, pooled=pooled,
                                                  negative_context=negative, negative_pooled=negative_pooled,
                                                  seed=seed, **SAMPLE)
        return to_clip(vae.decode(pipeline.generate(model, request))[0])
    score_generation(generate_clip)
