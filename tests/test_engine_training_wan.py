"""Training the tiny Wan DiT preset end to end: loss falls, the adapter covers Musubi's Wan targets, resume is exact,
and the trained adapter stays attached for sampling through the Wan pipeline."""

import pytest
import torch

from engine.models.wan.loader import load_wan_dit
from engine.pipelines.wan import WanGenerateRequest, generate
from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig,
                             TrainingSession, ValidationConfig, ValidationPrompt)
from lora_fixtures import _one_thread  # noqa: F401  (autouse: one thread for tiny matmuls)


def batches(text_dim, n=2):
    g = torch.Generator().manual_seed(0)
    return [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g) * 0.3 + 0.7,
             "context": [torch.randn(6, text_dim, generator=g)]} for _ in range(n)]


def make(tmp_path, steps, resume=None, validation=None, network=None):
    model = load_wan_dit("preset:tiny-t2v", dtype=torch.float32)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_train_steps=steps, mixed_precision="no", seed=1,
                         gradient_checkpointing=True, timesteps=TimestepConfig("shift", discrete_flow_shift=2.0))
    return TrainingSession(model, network or NetworkConfig(rank=8, alpha=8), OptimizerConfig(learning_rate=2e-3),
                           InMemoryBatchLoader(batches(model.config.text_dim), seed=0), cfg,
                           validation=validation, resume_from=resume)


def test_tiny_wan_learns_and_resumes_exactly(tmp_path):
    s = make(tmp_path / "a", 30)
    adapted = set(s.network.adapters())
    assert "blocks.0.self_attn.q" in adapted and "blocks.1.ffn.2" in adapted and "blocks.0.cross_attn.k" in adapted
    assert not any("norm" in n or "modulation" in n for n in adapted)
    losses = s.train_steps(30)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses

    part = make(tmp_path / "b", 30)
    part.train_steps(20)
    resumed = make(tmp_path / "b", 30, resume=part.save_state())
    assert resumed.train_steps(10) == losses[20:]


def test_sampling_during_training_through_the_wan_pipeline(tmp_path):
    prompt = ValidationPrompt(context=torch.randn(5, 32), width=32, height=32, frames=1, steps=2, seed=3)
    s = make(tmp_path, 2, validation=ValidationConfig(prompts=[prompt], every_n_steps=2))
    s.train_steps(2)
    (latents,) = s.last_samples
    assert latents.shape == (1, 16, 1, 4, 4) and torch.isfinite(latents).all()
    assert s.network.is_attached and s.model.training is False


def test_same_seed_samples_after_training_with_dropout_are_identical(tmp_path):
    """Dropout is a training-step thing: once train_steps returns, the trained adapter must sample deterministically
    (it used to stay in train mode, so two same-seed samples differed by up to 0.14)."""
    net = NetworkConfig(rank=8, alpha=8, dropout=0.5, rank_dropout=0.25, module_dropout=0.25)
    s = make(tmp_path, 4, network=net)
    s.train_steps(4)
    g = torch.Generator().manual_seed(4)
    request = WanGenerateRequest(task="t2i", context=torch.randn(5, 32, generator=g),
                                 negative_context=torch.randn(3, 32, generator=g), width=32, height=32, steps=3,
                                 guidance_scale=3.0, seed=11)
    first, second = generate(s.model, request), generate(s.model, request)
    assert torch.equal(first, second), (first - second).abs().max()
    assert s.network.training is False and s.model.training is False
    s.network.multiplier = 0.0
    assert not torch.allclose(generate(s.model, request), first)  # the trained adapter does shape the sample
    s.network.multiplier = 1.0

    # the sampler itself never runs an adapter in train mode (a script may leave it there), and restores the flag
    s.network.train()
    assert torch.equal(generate(s.model, request), first)
    assert s.network.training is True and all(a.training for a in s.network.adapters().values())
