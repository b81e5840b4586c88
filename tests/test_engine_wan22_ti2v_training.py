"""Wan 2.2 TI2V-5B caching and LoRA training on the tiny presets: 48-channel caches under their own arch (`wan22_5b`)
next to a 2.1 cache of the same dataset, captions in the shared `wan` text cache; T2V and I2V training (frame 0 the
clean image latent at t = 0 per token, the loss on frames 1..) learns, resumes exactly and samples its validation
prompt through the pipeline; the I2V forward matches diffusers' transformer fed the official TI2V timestep mask;
refusals of mixed-up caches and inputs before any step."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import MusubiInputError
from engine.data import CachedBatchLoader, build_cache, check_cache_for_model, dataset_from_tensors, load_cache_file
from engine.data.encoding import CacheRequirements, Clip
from engine.data.cache import manifest_path
from engine.families import family_for_cache_arch
from engine.families.wan import cache22
from engine.families.wan.dit import WanModel
from engine.families.wan.family import FAMILY
from engine.families.wan.loader import load_wan_dit
from engine.families.wan.pipeline import prepare_ti2v
from engine.families.wan.presets import build_preset_state_dict, preset_config, write_preset_checkpoint
from engine.training import (NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig, TrainingSession,
                             ValidationConfig, ValidationPrompt)
from engine.training.loss import flow_matching_loss

SIZE, FRAMES = 64, 5          # 64 px / 16 = 4 latent pixels (2x2 tokens), 5 frames = 2 latent frames


def _clip(seed: int) -> torch.Tensor:
    """[F, H, W, 3] in 0..1: a square sliding over a plain background (frames differ, so frames 1.. carry motion)."""
    rng = np.random.default_rng(seed)
    out = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.float32)
    out[:] = rng.random(3)
    color, (x, y) = rng.random(3), rng.integers(0, SIZE - 24, 2)
    for f in range(FRAMES):
        out[f, y:y + 20, x + 4 * f:x + 4 * f + 20] = color
    return torch.from_numpy(out)


def _dataset(folder, n=2):
    return dataset_from_tensors([_clip(k) for k in range(n)], [f"a square moving, {k}" for k in range(n)], folder,
                                resolution=(SIZE, SIZE))


@pytest.fixture(scope="module")
def caches(tiny_wan_encoders, tmp_path_factory):
    """The clips cached with the 2.2 VAE for t2v and for i2v (two folders: one arch has one manifest per folder),
    captions in each folder's `wan` text cache; the t2v folder also holds the 2.1 VAE cache of the same clips."""
    enc, root = tiny_wan_encoders, tmp_path_factory.mktemp("ti2v_caches")
    out = {}
    for task in ("t2v", "i2v"):
        cfg = _dataset(root / task)
        build_cache(cfg, cache22.Wan22CacheAdapter(enc["vae22"], i2v=task == "i2v", dtype=torch.float32))
        build_cache(cfg, FAMILY.cache_adapter(text_encoder=enc["umt5"], text_dtype=torch.float32))
        out[task] = cfg
    build_cache(out["t2v"], FAMILY.cache_adapter(vae=enc["vae"], dtype=torch.float32))   # 2.1, same folder
    return out


@pytest.fixture(scope="module")
def dit_file(tmp_path_factory):
    return write_preset_checkpoint("tiny-ti2v-5b", tmp_path_factory.mktemp("ti2v_dit") / "ti2v.safetensors",
                                   torch.float32, seed=2)


def _model(dit_file):
    return load_wan_dit(dit_file, dtype=torch.float32)


def _loader(cfg, model, seed=0):
    return CachedBatchLoader(check_cache_for_model(cfg, FAMILY.cache_requirements(model)), seed=seed)


def _session(dit_file, cfg, out, steps, resume=None, validation=None, lr=3e-3):
    model = _model(dit_file)
    tc = TrainingConfig(output_dir=str(out), max_train_steps=steps, mixed_precision="no", seed=1,
                        gradient_checkpointing=True, timesteps=TimestepConfig("shift", discrete_flow_shift=2.0))
    return TrainingSession(model, NetworkConfig(rank=8, alpha=8), OptimizerConfig(learning_rate=lr),
                           _loader(cfg, model), tc, validation=validation, resume_from=resume)


def _batch(cfg, model):
    return next(iter(_loader(cfg, model)))


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------

def test_cache_files_arch_and_tensors(caches, tiny_wan_encoders):
    folder = caches["i2v"].datasets[0].cache_directory
    names = sorted(p.name for p in Path(folder).iterdir())
    assert sum(n.endswith("_wan22_5b.safetensors") for n in names) == 2, names
    assert sum(n.endswith("_wan_te.safetensors") for n in names) == 2, names     # captions: the shared wan cache
    assert "musubi_cache_wan22_5b.json" in names and "musubi_cache_wan.json" in names
    assert family_for_cache_arch("wan22_5b") is FAMILY
    t = load_cache_file(Path(folder) / "item00000_00000-005_0064x0064_wan22_5b.safetensors")
    assert t["latents"].shape == (48, 2, 4, 4) and t["latents_image"].shape == (48, 1, 4, 4)
    # the I2V image latent is the clip's first frame encoded alone (as inference), = latent frame 0 (causal VAE)
    pixels = (_clip(0)[0] * 255).round()                                   # what the cache stored: uint8 frames
    image = pixels.permute(2, 0, 1) / 127.5 - 1                            # [3, H, W] in [-1, 1]
    expected = prepare_ti2v(tiny_wan_encoders["vae22"], image).first_frame
    torch.testing.assert_close(t["latents_image"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(t["latents_image"], t["latents"][:, :1], rtol=0, atol=1e-4)

    t2v = load_cache_file(next(Path(caches["t2v"].datasets[0].cache_directory).glob("*_wan22_5b.safetensors")))
    assert set(t2v) == {"latents"}


def test_2_1_and_2_2_caches_of_one_folder_stay_apart(caches, dit_file):
    cfg = caches["t2v"]
    ti2v = _model(dit_file)
    t2v = load_wan_dit(write_preset_checkpoint("tiny-t2v", dit_file.parent / "t2v.safetensors", torch.float32),
                       dtype=torch.float32)
    b22, b21 = _batch(cfg, ti2v), _batch(cfg, t2v)
    assert b22["latents"].shape[1:] == (48, 2, 4, 4) and b21["latents"].shape[1:] == (16, 2, 8, 8)
    assert "first_frame" not in b22
    FAMILY.check_batch(ti2v, b22)
    FAMILY.check_batch(t2v, b21)
    # a cache key (manifest) names what made each: the VAE identity and the 48 channels
    m22 = json.loads(manifest_path(cfg.datasets[0].cache_directory, "wan22_5b").read_text())["latent"]
    m21 = json.loads(manifest_path(cfg.datasets[0].cache_directory, "wan").read_text())["latent"]
    assert (m22["vae"], m22["channels"], m22["i2v"]) == ("preset:tiny-vae22", 48, False)
    assert m21["vae"] == "preset:tiny-vae" and "channels" not in m21


# ---------------------------------------------------------------------------------------------------------------
# The training forward
# ---------------------------------------------------------------------------------------------------------------

class _Spy(torch.nn.Module):
    """Records the DiT's inputs; `frame0` (when set) overwrites frame 0 of its prediction."""

    family = "wan"

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls, self.frame0 = model, model.config, [], None

    def forward(self, x, t, context, **kw):
        self.calls.append((x.clone(), t.clone(), kw))
        out = self.model(x, t, context, **kw)
        if self.frame0 is not None:
            out = torch.cat([torch.full_like(out[:, :, :1], self.frame0), out[:, :, 1:]], dim=2)
        return out


def _noised(batch, t01, seed=0):
    x0 = batch["latents"].float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    return (1 - t01) * x0 + t01 * noise, noise - x0


def test_i2v_forward_frame0_clean_at_t0_and_out_of_the_loss(caches, dit_file):
    spy = _Spy(_model(dit_file))
    batch = _batch(caches["i2v"], spy.model)
    assert batch["first_frame"].shape == (1, 48, 1, 4, 4)
    noisy, target = _noised(batch, 0.7)
    t = torch.tensor([700.0])
    with torch.no_grad():
        pred, tgt = FAMILY.training_forward(spy, batch, noisy, t, target)
        x, t_in, kw = spy.calls[-1]
        # frame 0 of the DiT input is the clean image latent; the other frames are x_t unchanged
        assert torch.equal(x[:, :, :1], batch["first_frame"].float()) and torch.equal(x[:, :, 1:], noisy[:, :, 1:])
        # per-token t: grid (2, 2, 2) -> 8 tokens, frame 0's 4 at 0, the rest at t
        assert t_in.shape == (1, 8) and torch.equal(t_in, torch.tensor([[0.0] * 4 + [700.0] * 4]))
        assert kw.get("y") is None and kw.get("clip_fea") is None
        assert pred.shape == tgt.shape == (1, 48, 1, 4, 4) and torch.equal(tgt, target[:, :, 1:])
        loss = flow_matching_loss(pred, tgt)
        # any frame-0 prediction: the same loss (frame 0 is given, never learned)
        for junk in (1e3, -5.0):
            spy.frame0 = junk
            assert torch.equal(flow_matching_loss(*FAMILY.training_forward(spy, batch, noisy, t, target)), loss)
        # ... while the frames after it do count
        spy.frame0 = None
        moved = flow_matching_loss(*FAMILY.training_forward(spy, batch, noisy + 0.5, t, target))
        assert not torch.equal(moved, loss)


def test_t2v_forward_one_t_per_sample_whole_target(caches, dit_file):
    spy = _Spy(_model(dit_file))
    batch = _batch(caches["t2v"], spy.model)
    noisy, target = _noised(batch, 0.4)
    with torch.no_grad():
        pred, tgt = FAMILY.training_forward(spy, batch, noisy, torch.tensor([400.0]), target)
    x, t_in, _ = spy.calls[-1]
    assert torch.equal(x, noisy) and torch.equal(t_in, torch.tensor([400.0]))
    assert pred.shape == tgt.shape == (1, 48, 2, 4, 4) and torch.equal(tgt, target)


def test_i2v_forward_matches_diffusers_with_the_official_timestep_mask(caches, diffusers_wan):
    """Independent reference: diffusers' WanTransformer3DModel fed as diffusers' Wan 2.2 TI2V pipeline feeds it
    (latents with the image latent on frame 0, timestep = (frame mask [F, H/2, W/2] * t).flatten())."""
    cfg, sd = preset_config("tiny-ti2v-5b"), build_preset_state_dict("tiny-ti2v-5b", seed=4)
    ours = WanModel(cfg)
    ours.load_state_dict(sd)
    ref = diffusers_wan(cfg, sd)
    batch = _batch(caches["i2v"], ours)
    noisy, target = _noised(batch, 0.55, seed=3)
    with torch.no_grad():
        pred, _ = FAMILY.training_forward(ours.eval(), batch, noisy, torch.tensor([550.0]), target)
        x = noisy.clone()
        x[:, :, :1] = batch["first_frame"].float()
        mask = torch.ones(x.shape[2:])
        mask[0] = 0
        ts = (mask[:, ::2, ::2] * 550.0).flatten()[None]
        ctx = batch["context"][0].float()
        ctx = torch.cat([ctx, ctx.new_zeros(cfg.text_len - ctx.shape[0], ctx.shape[1])])[None]
        expected = ref(x, ts, ctx, return_dict=False)[0][:, :, 1:]
    err = (pred - expected).abs().max().item()
    assert err < 1e-4 * max(1.0, expected.abs().max().item()), err


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_ti2v_learns_and_resumes_exactly(caches, dit_file, tmp_path, task):
    s = _session(dit_file, caches[task], tmp_path / "a", 24)
    losses = s.train_steps(24)
    assert all(np.isfinite(losses))
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses

    part = _session(dit_file, caches[task], tmp_path / "b", 24)
    part.train_steps(16)
    resumed = _session(dit_file, caches[task], tmp_path / "b", 24, resume=part.save_state())
    assert resumed.train_steps(8) == losses[16:]


def test_i2v_validation_samples_from_the_image_latent(caches, dit_file, tiny_wan_encoders, tmp_path):
    image = _clip(7)[0].permute(2, 0, 1) * 2 - 1                          # [3, H, W] in [-1, 1]
    cond = prepare_ti2v(tiny_wan_encoders["vae22"], image)
    prompt = ValidationPrompt(context=torch.randn(5, 32), width=SIZE, height=SIZE, frames=FRAMES, steps=2, seed=3,
                              task="i2v", conditioning=cond)
    s = _session(dit_file, caches["i2v"], tmp_path, 2, validation=ValidationConfig(prompts=[prompt], every_n_steps=2))
    s.train_steps(2)
    (latents,) = s.last_samples
    assert latents.shape == (1, 48, 2, 4, 4) and torch.isfinite(latents).all()
    assert torch.equal(latents[:, :, :1], cond.first_frame[None].to(latents))   # frame 0: the image, exactly


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------

def test_caches_of_the_other_vae_are_refused(caches, dit_file, tmp_path, tiny_wan_encoders, raises_input):
    ti2v = _model(dit_file)
    t2v = load_wan_dit(write_preset_checkpoint("tiny-t2v", tmp_path / "t2v.safetensors", torch.float32),
                       dtype=torch.float32)
    # the engine's requirements: a folder holding only the 2.2 cache has no cache for the 2.1 model, and says so
    with pytest.raises(MusubiInputError, match=r"'no latent cache'; expected a wan cache.*holds wan22_5b caches"):
        check_cache_for_model(caches["i2v"], FAMILY.cache_requirements(t2v))
    # batches (what the trainer checks, whatever made the loader): the channels name both VAEs
    b22 = _batch(caches["i2v"], ti2v)
    b21 = next(iter(CachedBatchLoader(check_cache_for_model(caches["t2v"], FAMILY.cache_requirements(t2v)))))
    with raises_input("dataset latents", "(1, 48, 2, 4, 4) (the Wan 2.2 VAE)",
                      "16-channel latents cached with the Wan 2.1 VAE for tiny-t2v"):
        FAMILY.check_batch(t2v, b22)
    with raises_input("dataset latents", "(1, 16, 2, 8, 8) (the Wan 2.1 VAE)",
                      "48-channel latents cached with the Wan 2.2 VAE for tiny-ti2v-5b"):
        FAMILY.check_batch(ti2v, b21)
    tc = TrainingConfig(output_dir=str(tmp_path / "o"), max_train_steps=2, mixed_precision="no")
    with raises_input("dataset latents", "(1, 16, 2, 8, 8) (the Wan 2.1 VAE)", "48-channel"):
        TrainingSession(ti2v, NetworkConfig(rank=4, alpha=4), OptimizerConfig(), CachedBatchLoader(
            check_cache_for_model(caches["t2v"], FAMILY.cache_requirements(t2v))), tc)
    # a one-frame I2V batch (nothing after the given frame) and a first frame of the wrong size
    bad = {**b22, "latents": b22["latents"][:, :, :1]}
    with raises_input("dataset latents", (1, 48, 1, 4, 4), "clips of 2+ latent frames"):
        FAMILY.check_batch(ti2v, bad)
    with raises_input("dataset first-frame latents", (1, 48, 1, 2, 2), "[1, 48, 1, 4, 4] (re-cache"):
        FAMILY.check_batch(ti2v, {**b22, "first_frame": b22["first_frame"][..., :2, :2]})


def test_cache_latents_rules_for_the_2_2_vae(tiny_wan_encoders, tmp_path, raises_input):
    vae22, clip = tiny_wan_encoders["vae22"], object()
    assert isinstance(FAMILY.latent_cache_adapter(vae22, "t2v"), cache22.Wan22CacheAdapter)
    assert FAMILY.latent_cache_adapter(vae22, "i2v").i2v
    with raises_input("clip_vision", "connected", "no CLIP vision with the Wan 2.2 VAE (TI2V-5B takes the start "
                      "image through its latent only): disconnect it"):
        FAMILY.latent_cache_adapter(vae22, "i2v", clip)
    with raises_input("task", "fun_control", "one of ['t2v', 'i2v'] with the Wan 2.2 VAE (TI2V-5B: text-to-video, "
                      "or i2v to train image-to-video from each clip's first frame)"):
        FAMILY.latent_cache_adapter(vae22, "fun_control")
    with raises_input("one_frame_history", ["one_frame_no_2x"], "2x and 4x (the default) for Wan caches"):
        FAMILY.latent_cache_adapter(vae22, "t2v", one_frame_no_2x=True)
    # 2.1 latents never come from the 2.2 adapter, and the 2.1 rules still apply to the 2.1 VAE
    with raises_input("vae", "16-channel latents", "the 48-channel Wan 2.2 VAE"):
        cache22.Wan22CacheAdapter(tiny_wan_encoders["vae"])
    assert FAMILY.latent_cache_adapter(tiny_wan_encoders["vae"], "t2v").arch == "wan"
    # task i2v on images: refused before any encoding (frame 0 is the image: nothing left to learn)
    images = dataset_from_tensors(torch.rand(2, SIZE, SIZE, 3), ["a", "b"], tmp_path / "img", resolution=(SIZE, SIZE))
    with pytest.raises(MusubiInputError, match=r"image_directory: got 'an image dataset'; expected video clips .*"
                                               r"use task t2v for images"):
        build_cache(images, FAMILY.latent_cache_adapter(vae22, "i2v"))
    assert not list((tmp_path / "img").glob("*.safetensors"))
    build_cache(images, FAMILY.latent_cache_adapter(vae22, "t2v"))          # text-to-image is fine
    assert len(list((tmp_path / "img").glob("*_wan22_5b.safetensors"))) == 2


def test_the_5b_cache_requirements_and_description(tiny_wan_encoders, raises_input):
    """What a TI2V model asks of a cache, and what its adapter writes into the manifest: the 48-channel latents
    (and for I2V the image latent) under `wan22_5b`, the umT5 states from the shared `wan` text cache."""
    assert cache22.cache_requirements(text_dim=4096, i2v=True, vae_identity="vae.st", text_identity="t5.st") == \
        CacheRequirements("wan22_5b", 48, 4096, ("latents", "t5", "latents_image"), {"latents_image": 48},
                          {"vae": "vae.st", "text_encoder": "t5.st"}, text_key="t5", text_arch="wan")
    assert cache22.cache_requirements(text_dim=32) == CacheRequirements(
        "wan22_5b", 48, 32, ("latents", "t5"), {"latents_image": 48}, {}, text_key="t5", text_arch="wan")
    vae22 = tiny_wan_encoders["vae22"]
    assert cache22.Wan22CacheAdapter(vae22, i2v=True).latent_description() == {
        "vae": vae22.identity, "dtype": "bfloat16", "channels": 48, "i2v": True}
    assert cache22.Wan22CacheAdapter(vae22, dtype=torch.float32).latent_description()["dtype"] == "float32"
    planning = cache22.Wan22CacheAdapter(None)                              # Dataset Preview: no VAE needed
    assert planning.text_description() is None
    with raises_input("VAE", "NoneType", "an encoder with an `identity` string"):
        planning.latent_description()


def test_the_5b_adapter_refuses_what_it_cannot_cache(tiny_wan_encoders, tmp_path, raises_input):
    vae22 = tiny_wan_encoders["vae22"]
    with raises_input("cache dtype", torch.int8, "float16, bfloat16 or float32"):
        cache22.Wan22CacheAdapter(vae22, dtype=torch.int8)
    with raises_input("VAE", "NoIdentity", "an encoder with an `identity` string"):
        cache22.Wan22CacheAdapter(type("NoIdentity", (), {"latent_channels": 48})())
    with raises_input("vae", "None-channel latents", "the 48-channel Wan 2.2 VAE"):
        cache22.Wan22CacheAdapter(object())
    adapter = cache22.Wan22CacheAdapter(vae22, i2v=True)
    with raises_input("Wan 2.2 VAE cache", "text", "captions cached by the Cache Text Embeddings node (umT5)"):
        adapter.encode_texts(["a"])
    frames = np.zeros((5, SIZE, SIZE, 3), np.uint8)
    with raises_input("dataset control images", "given", "no control files with the Wan 2.2 VAE"):
        adapter.encode_clip(Clip(frames, control=frames))
    clips = _dataset(tmp_path).datasets[0]                                  # in-memory clips, each whole
    with raises_input("dataset #0 (in-memory) control_directory", "set", "no control images with the Wan 2.2 VAE"):
        adapter.one_frame_spec(clips)
    # I2V needs frames after the given one: clips cut to 1 frame are refused, by the key that asks for them
    assert adapter.dataset_latent_description(dataclasses.replace(clips, target_frames=[1])) == {}   # whole clips
    cut = dataclasses.replace(clips, frame_extraction="head", target_frames=[1, 5], video_directory="/clips")
    with raises_input("dataset #0 (/clips) target_frames", [1, 5], "video clips of 5 frames or more for task i2v "
                      "on the Wan 2.2 VAE (the first frame is the given image; the loss is on the frames after it)"):
        adapter.dataset_latent_description(cut)
    assert adapter.dataset_latent_description(dataclasses.replace(cut, target_frames=[5, 9])) == {}
    with raises_input("dataset #0 (in-memory) target_frames", [5, 1], "video clips of 5 frames or more"):
        adapter.dataset_latent_description(dataclasses.replace(clips, frame_extraction="uniform", target_frames=[5, 1]))
    assert cache22.Wan22CacheAdapter(vae22).dataset_latent_description(cut) == {}             # t2v: any clip


def test_buckets_are_multiples_of_32(tiny_wan_encoders, tmp_path):
    """VAE stride 16 x patch 2: a 48x80 frame lands in a 32-multiple bucket (a 16-step bucket such as 48x80 would
    give an odd latent size the DiT's patches cannot cover)."""
    clip = torch.rand(5, 80, 48, 3)
    cfg = dataset_from_tensors([clip], ["tall"], tmp_path, resolution=(64, 64))
    build_cache(cfg, FAMILY.latent_cache_adapter(tiny_wan_encoders["vae22"], "t2v"))
    (f,) = tmp_path.glob("*_wan22_5b.safetensors")
    h, w = load_cache_file(f)["latents"].shape[2:]
    assert h % 2 == 0 and w % 2 == 0, (h, w)
