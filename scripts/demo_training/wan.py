"""The Wan 2.1 demo models: a tiny VAE, umT5 and T2V DiT (files with Wan's and ComfyUI's key names)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .common import (CLIP, UNCOND_PROB, FlowTraining, calibrate_latents, dit_data, flow_batch, log, pack, save,
                     score_generation, score_vae_round_trip, to_clip, to_video, train_autoencoder, vae_data)

wan_vae = pack("engine.families.wan.vae")
wan_dit = pack("engine.families.wan.dit")
umt5 = pack("engine.encoders.umt5")
pipeline = pack("engine.families.wan.pipeline")

VAE_FILE, TEXT_FILE, DIT_FILE = "wan2.1_demo_vae.safetensors", "umt5_demo.safetensors", "wan2.1_demo_t2v.safetensors"
VAE_CONFIG = wan_vae.WanVAEConfig(dim=8, num_res_blocks=1)
DIT_CONFIG = wan_dit.WanConfig(model_type="t2v", in_dim=16, dim=128, ffn_dim=512, num_heads=1, num_layers=4,
                               text_dim=umt5.TINY_UMT5.d_model, variant="demo-t2v")
# The demo workflow's sampler settings
SAMPLE = dict(width=CLIP["width"], height=CLIP["height"], frames=CLIP["frames"], steps=20, guidance_scale=5.0,
              shift=3.0, solver="unipc")


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------

def vae_forward(vae, video: torch.Tensor, noise: float = 0.0):
    """Autograd version of the VAE's chunked encode/decode (frame 0 alone, then groups of 4, through the caches).
    -> reconstruction, raw latent mean. `noise`: std of the noise added to the latents (relative to their std),
    so the decoder also maps latents near the data's to clean clips (the DiT's samples are never exact)."""
    enc = wan_vae.FeatureCache()
    chunks = [video[:, :, :1]] + [video[:, :, s:s + 4] for s in range(1, video.shape[2], 4)]
    mu = torch.cat([vae.conv1(vae._encode_chunk(c, enc)) for c in chunks], dim=2).chunk(2, dim=1)[0]
    z = mu + noise * mu.detach().std() * torch.randn_like(mu) if noise else mu
    dec = wan_vae.FeatureCache()
    frames = [vae._decode_chunk(vae.conv2(z[:, :, i:i + 1]), dec) for i in range(z.shape[2])]
    return torch.cat(frames, dim=2), mu


def train_vae(seed: int, steps: int, batch: int = 16, on_progress=None) -> dict[str, torch.Tensor]:
    """-> the calibrated VAE state dict. `on_progress(state)` runs every 250 steps (uncalibrated partial files)."""
    rng, pool = vae_data(seed)
    vae = wan_vae.WanVAE(VAE_CONFIG).float()
    train_autoencoder(vae, vae_forward, pool, rng, steps, batch, on_progress)
    with torch.no_grad():
        mus = torch.cat([vae.encode_mean(to_video(pool[i:i + 16])) for i in range(0, len(pool), 16)])   # raw
    # Wan 2.1's per-channel latent mean and std: the pipeline's unchanged normalisation then applies
    was = calibrate_latents(mus, wan_vae.LATENT_MEAN, wan_vae.LATENT_STD, vae.conv1, vae.conv2)
    log(f"VAE latents calibrated: per-channel std was {was.min():.3f}..{was.max():.3f}")
    return vae.state_dict()


# ----------------------------------------------------------------------------------------------------------------
# umT5 + DiT
# ----------------------------------------------------------------------------------------------------------------

def encode_text(text_encoder, prompts: list[str]) -> list[torch.Tensor]:
    """umT5 with autograd (`UMT5TextEncoder.encode` is inference-only): one [L_i, d] per prompt. Prompts of up to
    64 tokens run as one batch cut to the longest, longer ones (the negative prompt) alone; the padding is masked,
    so the tokens' outputs are the same as at 512."""
    ids, mask = text_encoder.tokenizer(prompts, text_encoder.text_len)
    lengths = mask.sum(dim=1).tolist()
    out = [None] * len(prompts)
    short = [i for i, n in enumerate(lengths) if n <= 64]
    for group in [short] + [[i] for i, n in enumerate(lengths) if n > 64]:
        if not group:
            continue
        n = max(lengths[i] for i in group)
        hidden = text_encoder.model(input_ids=ids[group, :n], attention_mask=mask[group, :n]).last_hidden_state
        for row, i in enumerate(group):
            out[i] = hidden[row, :lengths[i]]
    return out


def train_dit(seed: int, steps: int, vae_state: dict, batch: int = 16, on_progress=None) -> tuple[dict, dict]:
    """-> DiT and umT5 state dicts. `on_progress(dit_state, text_state)` runs every 500 steps (partial files)."""
    def frozen_vae():
        vae = wan_vae.WanVAE(VAE_CONFIG).float()
        vae.load_state_dict(vae_state)
        return vae.eval()
    rng, latents, captions = dit_data(seed, frozen_vae)

    text_encoder = umt5.load_umt5(umt5.PRESET_TINY, dtype=torch.float32)
    text_encoder.model.train().requires_grad_(True)
    model = wan_dit.build_wan_model(DIT_CONFIG, "cpu").float()
    presets = pack("engine.families.wan.presets")
    model.load_state_dict(presets.random_state_dict(DIT_CONFIG, seed))
    model.train()
    training = FlowTraining(model, [text_encoder.model], steps)
    uncond = [pipeline.NEGATIVE_PROMPT, ""]
    for step in range(steps):
        idx = [rng.randrange(len(captions)) for _ in range(batch)]
        prompts = [captions[i] if rng.random() >= UNCOND_PROB else rng.choice(uncond) for i in idx]
        xt, sigma, target = flow_batch(latents, idx)
        unique = sorted(set(prompts))
        embedded = dict(zip(unique, encode_text(text_encoder, unique)))
        training.step(step, F.mse_loss(model(xt, sigma * 1000, [embedded[p] for p in prompts]), target))
        if on_progress is not None and step % 500 == 499 and step < steps - 1:
            dit, text = training.averaged()
            on_progress(dit.state_dict(), text_state_dict(text))
    dit, text = training.averaged()
    return dit.state_dict(), text_state_dict(text)


def text_state_dict(umt5_model) -> dict:
    # the file layout: `shared` once (the encoder's embed_tokens is the same tensor)
    return {k: v for k, v in umt5_model.state_dict().items() if k != "encoder.embed_tokens.weight"}


# ----------------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------------

def stage_vae(out: Path, seed: int, steps: int) -> None:
    partial = lambda state: save(state, out / ("partial_" + VAE_FILE), "wan2.1-vae (partial)", seed)  # noqa: E731
    save(train_vae(seed, steps, on_progress=partial), out / VAE_FILE, "wan2.1-vae", seed)


def stage_dit(out: Path, seed: int, steps: int) -> None:
    vae_state = {k: v.float() for k, v in wan_vae.load_wan_vae(out / VAE_FILE, dtype=torch.float32).state_dict().items()}
    spiece = torch.frombuffer(bytearray(umt5.TINY_SPIECE.read_bytes()), dtype=torch.uint8)

    def save_dit(dit_state, text_state):
        save(dit_state, out / DIT_FILE, "wan2.1-t2v", seed)
        save(text_state, out / TEXT_FILE, "umt5", seed, {umt5.EMBEDDED_SPIECE_KEY: spiece})
    save_dit(*train_dit(seed, steps, vae_state, on_progress=save_dit))


@torch.no_grad()
def stage_eval(out: Path, seed: int) -> None:
    vae = wan_vae.load_wan_vae(out / VAE_FILE, dtype=torch.float32)
    score_vae_round_trip(lambda video: vae.decode(vae.encode(video)), seed)
    if not (out / DIT_FILE).is_file():
        return
    model = pack("engine.families.wan.family").WanFamily.load_dit(out / DIT_FILE, dtype=torch.float32).eval()
    text_encoder = umt5.load_umt5(out / TEXT_FILE, dtype=torch.float32)
    negative = text_encoder.encode([pipeline.NEGATIVE_PROMPT])[0]

    def generate_clip(prompt: str, seed: int):
        request = pipeline.WanGenerateRequest(task="t2v", context=text_encoder.encode([prompt])[0],
                                              negative_context=negative, seed=seed, **SAMPLE)
        return to_clip(vae.decode(pipeline.generate(model, request))[0])
    score_generation(generate_clip)
