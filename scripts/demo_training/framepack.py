"""The FramePack demo models: a tiny FramePack DiT and SigLIP image encoder, on the HunyuanVideo demo VAE and text
encoders (FramePack's are HunyuanVideo's), in the key layouts of the official and ComfyUI files.

The demo clip (17 frames) is FramePack's start latent plus one section of latent window 4. The DiT keeps the
guidance embedder, since the pipeline embeds a guidance scale as the distilled release wants. It is trained on random
scales from 1 to 10, so it learns to ignore the scale (a model trained from scratch in minutes cannot be
guidance-distilled); the demo samples with real CFG, guidance 5. The text encoders stay frozen: FramePack shares
them with the HunyuanVideo demo, so train that family's models first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import hunyuan
from .common import (CLIP, UNCOND_PROB, FlowTraining, dit_clips, dit_data, flow_batch, log, pack, save,
                     score_generation, shapes, to_clip, to_video)

fp_dit = pack("engine.families.framepack.dit")
fp_sections = pack("engine.families.framepack.sections")
pipeline = pack("engine.families.framepack.pipeline")
siglip = pack("engine.encoders.siglip")

DIT_FILE, SIGLIP_FILE = "framepack_demo_i2v.safetensors", "siglip_demo.safetensors"
LATENT_WINDOW = 4                  # one section of 4 latent frames after the start latent: 17 frames
DIT_CONFIG = fp_dit.FramePackConfig(hidden_size=128, num_heads=2, double_blocks=2, single_blocks=2,
                                    text_dim=hunyuan.DIT_CONFIG.text_dim,
                                    text_pool_dim=hunyuan.DIT_CONFIG.text_pool_dim,
                                    image_dim=siglip.TINY_SIGLIP.hidden_size, variant="demo-i2v")
GUIDANCE_RANGE = (1.0, 10.0)       # embedded guidance scales drawn in training (ignored by the trained model)
# The demo workflow's sampler settings
SAMPLE = dict(sections=1, latent_window_size=LATENT_WINDOW, steps=20, guidance_scale=5.0, shift=3.0,
              solver="unipc")


def stage_vae(out: Path, seed: int, steps: int) -> None:
    """FramePack has no VAE of its own: it is the HunyuanVideo demo VAE."""
    if not (out / hunyuan.VAE_FILE).is_file():
        raise SystemExit(f"{out / hunyuan.VAE_FILE} is missing: run --family hunyuan first (FramePack shares its "
                         "VAE and text encoders)")
    log(f"FramePack uses the HunyuanVideo demo VAE {hunyuan.VAE_FILE}")


# ----------------------------------------------------------------------------------------------------------------
# Data: each clip as one section after its start latent, in the layout of FramePack's section caches
# ----------------------------------------------------------------------------------------------------------------

def section_data(latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip latents [N, 16, 1 + window, h, w] -> the section to learn `x0` [N, 16, window, h, w] and the DiT's
    history inputs (start latent, and the history slots a one-section video fills with zeros), as
    `engine.families.framepack.cache.video_section_entries` stores them; indices [n] (the same for every clip)."""
    plan = fp_sections.schedule(1, LATENT_WINDOW)[0]
    zero = torch.zeros_like(latents[:, :, :1])

    def gather(sources) -> torch.Tensor:
        return torch.cat([latents[:, :, s:s + 1] if isinstance(s, int) else zero for s in sources], dim=2)

    def idx(v) -> torch.Tensor:
        return torch.tensor(list(v), dtype=torch.int64)
    return {"x0": latents[:, :, 1:],
            "latent_indices": idx(plan.latent_indices),
            "clean_latents": torch.cat([latents[:, :, :1], gather(plan.clean_sources[1:])], dim=2),
            "clean_latent_indices": idx(plan.clean_latent_indices),
            "clean_latents_2x": gather(plan.sources_2x), "clean_latent_2x_indices": idx(plan.clean_latent_2x_indices),
            "clean_latents_4x": gather(plan.sources_4x), "clean_latent_4x_indices": idx(plan.clean_latent_4x_indices)}


class FrozenText:
    """The HunyuanVideo demo text encoders, frozen: every caption (and the empty negative prompt) encoded once."""

    def __init__(self, out: Path, captions: list[str]):
        encoders = hunyuan.load_text_encoders(out)
        real_tokens = pack("engine.families.hunyuan.text").real_tokens
        self.table = {}
        with torch.no_grad():
            for prompt in sorted(set(captions) | {hunyuan.NEGATIVE_PROMPT}):
                e = encoders.encode([prompt])
                self.table[prompt] = (real_tokens(e["states"][0], e["mask"][0]).float(), e["pooled"][0].float())

    def batch(self, prompts: list[str]):
        """-> states [B, L, D] (padded to the longest), mask [B, L], pooled [B, D2]."""
        states = [self.table[p][0] for p in prompts]
        n = max(s.shape[0] for s in states)
        padded = torch.stack([F.pad(s, (0, 0, 0, n - s.shape[0])) for s in states])
        mask = torch.stack([torch.arange(n) < s.shape[0] for s in states])
        return padded, mask, torch.stack([self.table[p][1] for p in prompts])


def trainable_siglip():
    """The tiny SigLIP preset with autograd (the loader's encoder is inference-only)."""
    return siglip.load_siglip(siglip.PRESET_TINY, dtype=torch.float32).model.train().requires_grad_(True)


def encode_images(model, frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> SigLIP last hidden state [B, tokens, dim], with autograd."""
    return model(pixel_values=siglip.preprocess(frames, siglip.TINY_SIGLIP.image_size)).last_hidden_state


def train_dit(out: Path, seed: int, steps: int, batch: int = 16, on_progress=None) -> tuple[dict, dict]:
    """-> the file states of the averaged DiT and SigLIP. `on_progress(dit, siglip)` runs every 500 steps."""
    rng, latents, captions = dit_data(seed, lambda: hunyuan.hv_vae.load_hunyuan_vae(out / hunyuan.VAE_FILE,
                                                                                    dtype=torch.float32).eval())
    first = to_video(np.stack([c[:1] for c, _ in dit_clips(seed)]))[:, :, 0]          # [N, 3, H, W] start images
    data = section_data(latents)
    log(f"DiT sections: {tuple(data['x0'].shape[1:])}")
    text = FrozenText(out, captions)
    image_model = trainable_siglip()

    model = fp_dit.build_framepack_model(DIT_CONFIG, "cpu").float()
    model.load_state_dict(pack("engine.families.framepack.presets").random_state_dict(DIT_CONFIG, seed))
    model.train()
    training = FlowTraining(model, (image_model,), steps)
    low, high = GUIDANCE_RANGE
    for step in range(steps):
        idx = [rng.randrange(len(captions)) for _ in range(batch)]
        prompts = [captions[i] if rng.random() >= UNCOND_PROB else hunyuan.NEGATIVE_PROMPT for i in idx]
        xt, sigma, target = flow_batch(data["x0"], idx)
        states, mask, pooled = text.batch(prompts)
        guidance = (low + (high - low) * torch.rand(batch)) * pipeline.GUIDANCE_EMBED_SCALE
        history = {k: (v[idx] if v.ndim == 5 else v) for k, v in data.items() if k != "x0"}
        pred = model(xt, sigma * 1000, states, mask, pooled, guidance=guidance,
                     image_embeddings=encode_images(image_model, first[idx]), **history)
        training.step(step, F.mse_loss(pred, target))
        if on_progress is not None and step % 500 == 499 and step < steps - 1:
            on_progress(*_file_states(training))
    return _file_states(training)


def _file_states(training: FlowTraining) -> tuple[dict, dict]:
    dit, image_model = training.averaged()
    return dit.state_dict(), image_model.state_dict()


def stage_dit(out: Path, seed: int, steps: int) -> None:
    stage_vae(out, seed, steps)

    def save_all(dit_state: dict, siglip_state: dict):
        save(dit_state, out / DIT_FILE, "framepack-i2v", seed)
        save(siglip_state, out / SIGLIP_FILE, "siglip", seed)
    save_all(*train_dit(out, seed, steps, on_progress=save_all))


@torch.no_grad()
def stage_eval(out: Path, seed: int) -> None:
    """The DiT on the fixed prompts, each from the first frame of a clip of its spec (the seed's), and the diagonal
    prompts of the LoRA concept (which the base model should not know)."""
    vae = hunyuan.hv_vae.load_hunyuan_vae(out / hunyuan.VAE_FILE, dtype=torch.float32)
    model = pack("engine.families.framepack.loader").load_framepack_dit(out / DIT_FILE, dtype=torch.float32).eval()
    image_encoder = siglip.load_siglip(out / SIGLIP_FILE, dtype=torch.float32)
    encoders = hunyuan.load_text_encoders(out)
    real_tokens = pack("engine.families.hunyuan.text").real_tokens

    def prompt_of(text: str):
        e = encoders.encode([text])
        return pipeline.FramePackPrompt(real_tokens(e["states"][0], e["mask"][0]), e["pooled"][0])
    negative = prompt_of(hunyuan.NEGATIVE_PROMPT)

    def generate_clip(prompt: str, seed: int):
        start = shapes.render_clip(shapes.parse_caption(prompt), seed, **CLIP)[:1]          # [1, H, W, 3]
        image = pipeline.prepare_image(vae, image_encoder, to_video(start[None])[0, :, 0])
        request = pipeline.FramePackGenerateRequest(prompt=prompt_of(prompt), image=image, negative_prompt=negative,
                                                    seed=seed, **SAMPLE)
        return to_clip(vae.decode(pipeline.generate(model, request))[0])
    score_generation(generate_clip)
    diagonal = [shapes.ClipSpec(s.colour, s.shape, "diagonally").caption for s in shapes.eval_specs()[:4]]
    score_generation(generate_clip, prompts=diagonal, seeds_per_prompt=3)
