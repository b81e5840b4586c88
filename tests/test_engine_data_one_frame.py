"""Wan one-frame training data (Musubi's "one frame" mode): caching with the tiny encoders, invalidation, the
documented errors, and training on the tiny I2V DiT with the loss on the target frame only."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import CachedBatchLoader, build_cache, check_cache_for_model, load_dataset_config
from engine.families.wan.cache import WanCacheAdapter
from engine.families.wan.cache import cache_requirements as wan_cache_requirements
from engine.data.cache import load_cache_file
from engine.encoders import load_clip_vision, load_umt5
from engine.errors import MusubiInputError
from engine.families.wan.loader import load_wan_dit
from engine.families.wan.vae import load_wan_vae
from engine.families.wan.pipeline import prepare_one_frame
from engine.training import NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig, TrainingSession
from engine.training import trainer as trainer_mod

SIZE = 32
N_ITEMS = 3


@pytest.fixture(scope="module")
def encoders():
    vae = load_wan_vae("preset:tiny-vae", dtype=torch.float32)
    vae.identity = "preset:tiny-vae"  # the node loader sets this; the cache manifest records it
    te = load_umt5("preset:tiny-umt5", dtype=torch.float32)
    clip = load_clip_vision("preset:tiny-clip", dtype=torch.float32)
    return vae, te, clip


def _image(seed: int, size=(SIZE, SIZE)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    img = (base + 60 * np.sin(xx[..., None] / (3 + seed % 4) + yy[..., None] / 5 + np.arange(3))) % 256
    return img.astype(np.uint8)


def _write_dataset(root: Path, n_controls: int, control_size=(SIZE, SIZE)) -> dict[str, list[np.ndarray]]:
    (root / "images").mkdir(parents=True)
    (root / "controls").mkdir()
    arrays = {}
    for i in range(N_ITEMS):
        stem = f"item{i}"
        target = _image(100 + i)
        Image.fromarray(target).save(root / "images" / f"{stem}.png")
        (root / "images" / f"{stem}.txt").write_text(f"a picture number {i}")
        ctrls = []
        for k in range(n_controls):
            c = _image(10 * i + k, control_size)
            name = f"{stem}.png" if n_controls == 1 else f"{stem}_{k}.png"
            Image.fromarray(c).save(root / "controls" / name)
            ctrls.append(c)
        arrays[stem] = [target] + ctrls
    return arrays


def _config(root: Path, extra: str):
    return load_dataset_config(f"""
[general]
resolution = [{SIZE}, {SIZE}]
caption_extension = ".txt"
[[datasets]]
image_directory = "images"
control_directory = "controls"
cache_directory = "cache"
batch_size = 1
{extra}
""", base_dir=root)


def _adapter(encoders, **kw):
    vae, te, clip = encoders
    return WanCacheAdapter(vae=vae, text_encoder=te, clip=clip, dtype=torch.float32, text_dtype=torch.float32, **kw)


def _pixels(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0      # [3, H, W] in [-1, 1]


def _cache_file(root: Path, stem: str) -> dict:
    (path,) = (root / "cache").glob(f"{stem}_*_wan.safetensors")
    return load_cache_file(path)


@pytest.mark.parametrize("clean, target, order", [([0], 9, [0, 9]), ([0, 10], 1, [0, 1, 10])])
def test_cached_tensors_equal_prepare_one_frame(tmp_path, encoders, clean, target, order):
    vae, _, clip = encoders
    arrays = _write_dataset(tmp_path, len(clean))
    cfg = _config(tmp_path, f"fp_1f_clean_indices = {clean}\nfp_1f_target_index = {target}")
    report = build_cache(cfg, _adapter(encoders))
    assert sorted(report.latents_encoded) == sorted(arrays)
    n, slot = len(order), order.index(target)
    for stem, (tgt, *ctrls) in arrays.items():
        t = _cache_file(tmp_path, stem)
        assert t["latents"].shape == (16, n, SIZE // 8, SIZE // 8)
        assert t["latents_image"].shape == (20, n, SIZE // 8, SIZE // 8)
        assert t["f_indices"].tolist() == order and t["f_target_slot"].tolist() == [slot]

        ref = prepare_one_frame(vae, [_pixels(c) for c in ctrls], clean, target)
        assert list(ref.frame_indices) == order and ref.target_slot == slot
        torch.testing.assert_close(t["latents_image"], ref.y.float())
        # training latent: control latents (from the conditioning) in control slots, the target latent in its slot
        with torch.no_grad():
            target_latent = vae.encode(_pixels(tgt)[None, :, None])[0, :, 0]
            # every control image's CLIP tokens, in control order (an FLF2V model takes both, an I2V model the first)
            clip_ref = torch.cat([clip.encode(_pixels(c)[None])[0] for c in ctrls])
        torch.testing.assert_close(t["latents"][:, slot], target_latent)
        ctrl_slots = [i for i in range(n) if i != slot]
        torch.testing.assert_close(t["latents"][:, ctrl_slots], ref.y[4:, ctrl_slots].float())
        assert (t["latents_image"][:4, ctrl_slots] == 1).all() and (t["latents_image"][:4, slot] == 0).all()
        assert t["clip"].shape == (257 * len(clean), clip_ref.shape[-1])
        torch.testing.assert_close(t["clip"], clip_ref)

    cached = check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, i2v=True, clip=True, one_frame=True))
    batch = next(iter(CachedBatchLoader(cached, seed=0)))
    assert batch["latents"].shape == (1, 16, n, 4, 4) and batch["y"].shape == (1, 20, n, 4, 4)
    assert batch["clip_fea"].shape == (1, 257 * len(clean), 32)
    assert batch["frame_indices"].tolist() == [order] and batch["target_slot"].tolist() == [slot]


def test_changing_the_target_index_invalidates_the_latent_cache(tmp_path, encoders):
    _write_dataset(tmp_path, 1)
    build_cache(_config(tmp_path, "fp_1f_clean_indices = [0]\nfp_1f_target_index = 9"), _adapter(encoders))
    again = build_cache(_config(tmp_path, "fp_1f_clean_indices = [0]\nfp_1f_target_index = 9"), _adapter(encoders))
    assert again.latents_encoded == [] and again.texts_encoded == []

    changed = _config(tmp_path, "fp_1f_clean_indices = [0]\nfp_1f_target_index = 5")
    with pytest.raises(MusubiInputError, match="re-run caching"):
        check_cache_for_model(changed, wan_cache_requirements(text_dim=32, i2v=True, clip=True))
    report = build_cache(changed, _adapter(encoders))
    assert len(report.latents_encoded) == N_ITEMS and report.texts_encoded == []  # captions unchanged
    assert _cache_file(tmp_path, "item0")["f_indices"].tolist() == [0, 5]
    # the control indices are part of the key too
    report = build_cache(_config(tmp_path, "fp_1f_clean_indices = [2]\nfp_1f_target_index = 5"), _adapter(encoders))
    assert len(report.latents_encoded) == N_ITEMS
    assert _cache_file(tmp_path, "item0")["f_indices"].tolist() == [2, 5]


def test_missing_target_index_is_refused_naming_the_key(tmp_path, encoders):
    _write_dataset(tmp_path, 1)
    # control indices without a target index: Musubi's one-frame caching fails (no default)
    with pytest.raises(MusubiInputError, match="fp_1f_target_index"):
        build_cache(_config(tmp_path, "fp_1f_clean_indices = [0]"), _adapter(encoders))
    # one-frame caching requested (Musubi's --one_frame) for a control dataset without any one-frame keys
    with pytest.raises(MusubiInputError, match="fp_1f_target_index"):
        build_cache(_config(tmp_path, ""), _adapter(encoders, one_frame=True))
    # a target index without control indices: Wan one-frame caching requires them (only FramePack falls back)
    with pytest.raises(MusubiInputError, match="fp_1f_clean_indices"):
        build_cache(_config(tmp_path, "fp_1f_target_index = 9"), _adapter(encoders))
    # one control image but two control indices
    with pytest.raises(MusubiInputError, match="fp_1f_clean_indices"):
        build_cache(_config(tmp_path, "fp_1f_clean_indices = [0, 1]\nfp_1f_target_index = 9"), _adapter(encoders))
    assert not list((tmp_path / "cache").glob("*.safetensors")) if (tmp_path / "cache").exists() else True


def test_control_size_rules(tmp_path, encoders):
    arrays = _write_dataset(tmp_path, 1, control_size=(48, 40))
    keys = "fp_1f_clean_indices = [0]\nfp_1f_target_index = 9\n"
    # default: the control is resized into the target's bucket
    build_cache(_config(tmp_path, keys), _adapter(encoders))
    assert _cache_file(tmp_path, "item0")["latents"].shape == (16, 2, 4, 4)
    # no_resize_control keeps the control's own size, which Wan cannot stack with the target: refused, key named
    with pytest.raises(MusubiInputError, match="no_resize_control"):
        build_cache(_config(tmp_path, keys + "no_resize_control = true"), _adapter(encoders))
    # control_resolution equal to the target's size is fine, and it is part of the cache key
    report = build_cache(_config(tmp_path, keys + f"control_resolution = [{SIZE}, {SIZE}]"), _adapter(encoders))
    assert len(report.latents_encoded) == len(arrays)


def test_one_frame_training_loss_on_target_frame_only_and_falls(tmp_path, encoders, monkeypatch):
    _write_dataset(tmp_path / "data", 1)
    cfg = _config(tmp_path / "data", "fp_1f_clean_indices = [0]\nfp_1f_target_index = 9")
    build_cache(cfg, _adapter(encoders))
    cached = check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, i2v=True, clip=True, one_frame=True))

    model = load_wan_dit("preset:tiny-i2v", dtype=torch.float32)
    seen = {"kwargs": [], "out": [], "loss_in": []}

    def hook(mod, args, kwargs, out):
        seen["kwargs"].append({k: v for k, v in kwargs.items() if k in ("frame_indices", "y", "clip_fea")})
        seen["out"].append(out.detach().clone())

    model.register_forward_hook(hook, with_kwargs=True)
    real_loss = trainer_mod.flow_matching_loss

    def spy(pred, target, weight=None):
        seen["loss_in"].append((pred.detach().clone(), target.detach().clone()))
        return real_loss(pred, target, weight)

    monkeypatch.setattr(trainer_mod, "flow_matching_loss", spy)
    tcfg = TrainingConfig(output_dir=str(tmp_path / "out"), max_train_steps=30, mixed_precision="no", seed=1,
                          timesteps=TimestepConfig("shift", discrete_flow_shift=2.0))
    s = TrainingSession(model, NetworkConfig(rank=8, alpha=8), OptimizerConfig(learning_rate=2e-3),
                        CachedBatchLoader(cached, seed=0), tcfg)
    losses = s.train_steps(30)

    assert len(losses) == 30 and all(np.isfinite(losses))
    kw = seen["kwargs"][0]
    assert kw["frame_indices"].tolist() == [0, 9]                       # RoPE positions reach the DiT
    assert kw["y"].shape == (1, 20, 2, 4, 4) and kw["clip_fea"].shape == (1, 257, 32)
    assert seen["out"][0].shape == (1, 16, 2, 4, 4)                    # the DiT sees both slots ...
    for out, (pred, target) in zip(seen["out"], seen["loss_in"]):
        assert pred.shape == target.shape == (1, 16, 1, 4, 4)          # ... the loss only the target slot
        torch.testing.assert_close(pred, out[:, :, 1:2])
    assert losses[0] == pytest.approx(float(real_loss(*seen["loss_in"][0])), rel=1e-5)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses


def test_two_control_caches_made_before_both_clip_images_are_re_encoded(tmp_path, encoders, monkeypatch):
    """Two-control one-frame caches used to hold the first control's CLIP tokens only (an FLF2V model needs both):
    their cache key changes, so the next caching run re-encodes them; one-control datasets keep their caches."""
    _write_dataset(tmp_path, 2)
    cfg = _config(tmp_path, "fp_1f_clean_indices = [0, 2]\nfp_1f_target_index = 1")
    with monkeypatch.context() as m:   # a cache written before the change: no per-dataset description
        m.setattr(WanCacheAdapter, "dataset_latent_description", lambda self, ds: {}, raising=False)
        build_cache(cfg, _adapter(encoders))
    report = build_cache(cfg, _adapter(encoders))
    assert len(report.latents_encoded) == N_ITEMS and report.texts_encoded == []
    assert _cache_file(tmp_path, "item0")["clip"].shape == (514, 32)

    one = tmp_path / "one"
    _write_dataset(one, 1)
    cfg1 = _config(one, "fp_1f_clean_indices = [0]\nfp_1f_target_index = 9")
    with monkeypatch.context() as m:
        m.setattr(WanCacheAdapter, "dataset_latent_description", lambda self, ds: {}, raising=False)
        build_cache(cfg1, _adapter(encoders))
    assert build_cache(cfg1, _adapter(encoders)).latents_encoded == []


@pytest.mark.parametrize("preset, tokens", [("tiny-i2v", 257), ("tiny-flf2v", 514)])
def test_two_control_one_frame_batch_gives_each_model_its_clip_tokens(preset, tokens):
    """A two-control one-frame batch holds both images' CLIP tokens (514): the FLF2V model trains on both, an I2V
    model on the first image's 257 — what `pipeline.one_frame_clip` gives them at inference."""
    from engine.families.wan.family import FAMILY

    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 514, 32, generator=g)
    batch = {"latents": torch.randn(1, 16, 3, 4, 4, generator=g), "context": [torch.randn(5, 32, generator=g)],
             "y": torch.randn(1, 20, 3, 4, 4, generator=g), "clip_fea": clip,
             "frame_indices": torch.tensor([[0, 1, 2]]), "target_slot": torch.tensor([1])}
    model = load_wan_dit(f"preset:{preset}", dtype=torch.float32)
    FAMILY.check_batch(model, batch)
    seen = []
    model.register_forward_hook(lambda mod, args, kwargs, out: seen.append(kwargs["clip_fea"]), with_kwargs=True)
    noisy = torch.randn(1, 16, 3, 4, 4, generator=g)
    pred, target = FAMILY.training_forward(model, batch, noisy, torch.tensor([500.0]), noisy)
    assert pred.shape == target.shape == (1, 16, 1, 4, 4)
    torch.testing.assert_close(seen[0], clip[:, :tokens])

    if preset == "tiny-flf2v":   # one control image's tokens: refused naming what the FLF2V model needs
        with pytest.raises(MusubiInputError, match="two control images"):
            FAMILY.check_batch(model, {**batch, "clip_fea": clip[:, :257]})
