"""Training the tiny Wan DiT preset end to end: loss falls, the adapter covers Musubi's Wan targets, resume is exact,
the trained adapter stays attached for sampling through the Wan pipeline and samples deterministically (dropout off);
resume/cancel/accumulation/bad inputs with LoRA, rank and module dropout on."""

import pytest
import torch

from engine.errors import MusubiInputError
from engine.families.wan.pipeline import WanGenerateRequest, generate
from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig,
                             TrainingSession, ValidationConfig, ValidationPrompt, read_state)
from lora_fixtures import tiny_model


def batches(text_dim, n=2):
    g = torch.Generator().manual_seed(0)
    return [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g) * 0.3 + 0.7,
             "context": [torch.randn(6, text_dim, generator=g)]} for _ in range(n)]


def make(tmp_path, steps, resume=None, validation=None, network=None):
    model = tiny_model()
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


# --- resume / cancel / accumulation / bad input on the tiny preset, with every kind of dropout on ---------------
# Dropout masks come from the global torch RNG, so these runs only repeat when a resume restores that stream too.

DROPOUT = NetworkConfig(rank=4, alpha=2, dropout=0.3, rank_dropout=0.2, module_dropout=0.1)


class Cancel(BaseException):  # ComfyUI 0.38's interrupt derives from BaseException
    pass


def tiny_session(out, steps=6, resume=None, network=DROPOUT, optimizer=None, loader_batches=None, shuffle=True,
                 model=None, mixed_precision="no", **train_kw):
    model = model or tiny_model()
    train_kw.setdefault("gradient_accumulation_steps", 2)
    cfg = TrainingConfig(output_dir=str(out), max_train_steps=steps, mixed_precision=mixed_precision, seed=5,
                         timesteps=TimestepConfig("shift", discrete_flow_shift=2.0), **train_kw)
    return TrainingSession(model, network, optimizer or OptimizerConfig(learning_rate=3e-3),
                           InMemoryBatchLoader(loader_batches or batches(32, n=3), seed=2, shuffle=shuffle), cfg,
                           resume_from=resume)


def weights(session):
    return {k: v.clone() for k, v in session.network.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_cancel_mid_run_with_dropout_resumes_bit_exact(tmp_path):
    ref = tiny_session(tmp_path / "full")
    full = ref.train_steps(6)

    def progress(step, total, info):
        if step == 3:
            raise Cancel()
    s = tiny_session(tmp_path / "run")
    with pytest.raises(Cancel):
        s.train_steps(6, progress=progress)
    state = tmp_path / "run" / "lora-state"
    assert read_state(state)["step"] == 3
    torch.manual_seed(1234)  # whatever ran in between (other sessions, sampling) must not matter
    resumed = tiny_session(tmp_path / "run", resume=state)
    assert resumed.step == 3 and resumed.history.losses == full[:3]
    assert resumed.train_steps(6) == full[3:]
    assert_same_weights(weights(resumed), weights(ref))


def test_tiny_cancel_inside_a_micro_batch_saves_the_previous_step(tmp_path):
    full = tiny_session(tmp_path / "full").train_steps(6)
    model = tiny_model()
    s = tiny_session(tmp_path / "run", model=model)
    s.train_steps(2)
    calls = []

    def second_micro_batch_cancels(module, args):
        calls.append(1)
        if len(calls) == 2:  # the first micro-batch of step 3 ran its forward and backward; the second cancels
            raise Cancel()
    handle = model.register_forward_pre_hook(second_micro_batch_cancels)
    with pytest.raises(Cancel):
        s.train_steps(2)
    handle.remove()
    assert s.step == 2 and read_state(tmp_path / "run" / "lora-state")["step"] == 2
    resumed = tiny_session(tmp_path / "run", resume=tmp_path / "run" / "lora-state")
    assert resumed.step == 2 and resumed.train_steps(4) == full[2:]


def test_tiny_grad_accumulation_matches_bigger_batch(tmp_path):
    """accumulate 2 × batch 1 == batch 2 (per-sample t and ε drawn in the same order). Dropout stays off here: one
    [2, …] mask and two [1, …] masks are different draws, so the equivalence only holds without it."""
    opt = OptimizerConfig(learning_rate=1e-2, optimizer_type="SGD", max_grad_norm=0)
    net = NetworkConfig(rank=4, alpha=2)
    singles = batches(32, n=2)
    pair = [{"latents": torch.cat([b["latents"] for b in singles]),
             "context": [c for b in singles for c in b["context"]]}]
    a = tiny_session(tmp_path / "a", steps=1, network=net, optimizer=opt, loader_batches=pair, shuffle=False,
                     gradient_accumulation_steps=1)
    b = tiny_session(tmp_path / "b", steps=1, network=net, optimizer=opt, loader_batches=singles, shuffle=False,
                     gradient_accumulation_steps=2)
    before = weights(a)
    assert a.train_steps(1)[0] == pytest.approx(b.train_steps(1)[0], rel=1e-5)
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(wa[k], before[k]) for k in wa if "lora_up" in k)  # the step did move the adapter


@pytest.mark.parametrize("kw,field", [
    ({"network": NetworkConfig(rank=0, dropout=0.3)}, "rank"),
    ({"network": NetworkConfig(rank=4, alpha=-1.0, dropout=0.3)}, "alpha"),
    ({"network": NetworkConfig(rank=4, dropout=1.0)}, "dropout"),
    ({"optimizer": OptimizerConfig(learning_rate=0.0)}, "learning_rate"),
    ({"attention_backend": "sage"}, "attention_backend"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"loader_batches": [{"latents": torch.randn(1, 16, 1, 4, 4), "context": [torch.randn(5, 4096)]}]},
     "text embeddings"),
])
def test_tiny_bad_inputs_raise_before_the_model_runs(tmp_path, kw, field):
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(MusubiInputError, match=field):
        tiny_session(tmp_path, model=model, **kw)
    assert calls == []


def test_tiny_cancel_between_micro_batches_keeps_the_session_at_the_last_step(tmp_path):
    """With many micro-batches per optimizer step, `interrupt` is a cancel point before each further micro-batch.
    The saved state is the last completed step, and the session in memory goes back to it too: continuing it (as a
    re-queue does) gives exactly the uninterrupted run, with every kind of dropout on."""
    ref = tiny_session(tmp_path / "full", gradient_accumulation_steps=3)
    full = ref.train_steps(6)
    s = tiny_session(tmp_path / "run", gradient_accumulation_steps=3)
    s.train_steps(2)
    calls = []

    def interrupt():
        calls.append(s.step)
        if len(calls) == 2:   # step 3: micro-batches 1 and 2 ran (their gradients accumulated), 3 is cancelled
            raise Cancel()
    with pytest.raises(Cancel):
        s.train_steps(4, interrupt=interrupt)
    assert calls == [2, 2] and s.step == 2
    assert read_state(tmp_path / "run" / "lora-state")["step"] == 2
    assert all(p.grad is None for p in s.network.trainable_parameters())   # the partial step's gradients are gone
    torch.manual_seed(99)   # whatever ran in between must not matter
    assert s.train_steps(4, interrupt=lambda: None) == full[2:]
    assert_same_weights(weights(s), weights(ref))


def test_held_out_eval_loss_is_deterministic_equals_a_hand_computation_and_leaves_training_alone(tmp_path):
    from engine.training import EvalConfig

    g = torch.Generator().manual_seed(11)   # held-out clips the run never trains on
    held_out = [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g) * 0.3 + 0.5,
                 "context": [torch.randn(4, 32, generator=g)]} for _ in range(2)]
    config = EvalConfig(batches=held_out, every_n_steps=2, sigmas=(0.25, 0.75), seed=7)
    plain = tiny_session(tmp_path / "plain", steps=4).train_steps(4)
    runs = []
    for name in ("a", "b"):
        s = tiny_session(tmp_path / name, steps=4)
        s.evaluation = config
        assert s.train_steps(4) == plain          # evaluating draws none of the training's random numbers
        runs.append(s)
    a, b = runs
    assert a.history.eval_steps == [2, 4] and a.history.eval_losses == b.history.eval_losses
    assert a.history.eval_losses[0] != a.history.eval_losses[1]   # the adapter changed between them
    assert a.loss_map()["eval_loss"] == a.history.eval_losses
    assert a.model.training is False and a.network.training is False

    errors = []   # by hand: sample k gets the noise of Generator(seed + k), every sigma, unweighted MSE, no dropout
    with torch.no_grad():
        for k, batch in enumerate(held_out):
            x0 = batch["latents"]
            noise = torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(7 + k))[None]
            for sigma in (0.25, 0.75):
                pred = a.model((1 - sigma) * x0 + sigma * noise, torch.tensor([1000.0 * sigma]), batch["context"])
                errors.append(((pred - (noise - x0)) ** 2).mean().item())
    assert abs(sum(errors) / len(errors) - a.history.eval_losses[-1]) < 1e-6
    assert a.evaluate() == a.history.eval_losses[-1]     # the same numbers whenever it runs


def test_i2v_fun_control_training_conditioning_equals_inference():
    """An I2V Fun-Control cache (control latents + I2V image latents + CLIP) gives the DiT the `y` of inference's
    `prepare_fun_control`: the start image's latent in latent frame 0 only (VideoX-Fun), zeros elsewhere. Training
    used to feed the cached I2V latents of every frame (VAE of the gray padding frames)."""
    import numpy as np

    from engine.data.encoding import Clip, strip_key
    from engine.encoders import load_clip_vision
    from engine.families.wan.cache import WanCacheAdapter
    from engine.families.wan.family import build_y
    from engine.families.wan.pipeline import prepare_fun_control
    from engine.families.wan.vae import load_wan_vae

    vae = load_wan_vae("preset:tiny-vae", dtype=torch.float32)
    vae.identity = "preset:tiny-vae"
    clip = load_clip_vision("preset:tiny-clip", dtype=torch.float32)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    control = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    stored = WanCacheAdapter(vae=vae, clip=clip, control=True, dtype=torch.float32).encode_clip(Clip(frames, control))
    batch = WanCacheAdapter.collate([{strip_key(k): v for k, v in stored.items()}])
    assert batch["y"].shape == (1, 20, 3, 4, 4) and batch["clip_fea"].shape == (1, 257, 32)

    def pixels(a):
        return torch.from_numpy(a).float().permute(3, 0, 1, 2) / 127.5 - 1.0     # [3, F, H, W] in [-1, 1]

    ref = prepare_fun_control(vae, pixels(control), 9, image=pixels(frames)[:, 0])
    y = build_y(batch, 32)
    assert y.shape == (1, 32, 3, 4, 4)
    torch.testing.assert_close(y[0], ref.y, rtol=1e-4, atol=1e-4)
    assert (y[0, 16:, 1:] == 0).all() and y[0, 16:, 0].abs().sum() > 0
