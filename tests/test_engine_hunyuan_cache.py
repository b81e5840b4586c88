"""HunyuanVideo caches in Musubi Tuner's layout: the family's adapter writes `_hv.safetensors` / `_hv_te.safetensors`
with Musubi's tensor keys (raw, unscaled VAE latents; padded LLM states + int64 mask; CLIP-L pooled), a file written
with Musubi's keys reads into the same batch, the batch holds the DiT's latents (raw x 0.476986), and a cache made
with other encoders is refused before training."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.data import CachedBatchLoader, build_cache, check_cache_for_model, dataset_from_tensors
from engine.data.cache import load_cache_file
from engine.errors import MusubiInputError
from engine.encoders.clip_text import PRESET_TINY as CLIP_PRESET, load_clip_text
from engine.encoders.llava_llama import PRESET_TINY as LLM_PRESET, load_llava_llama
from engine.families import family_for_cache_arch, get_family
from engine.families.hunyuan.dit import HunyuanVideoModel
from engine.families.hunyuan.presets import build_preset_state_dict, preset_config
from engine.families.hunyuan.vae import SCALING_FACTOR, TINY_VAE_PRESET, load_hunyuan_vae
from engine.training import InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TrainingConfig, TrainingSession

FAMILY = get_family("hunyuan")
TOKENS = 256                                # the LLM's prompt tokens after the template crop


@pytest.fixture(scope="module")
def encoders():
    """The tiny LLaVA-LLaMA-3 and CLIP-L presets (32-wide states padded to 256 tokens, 24-wide pooled)."""
    return (load_llava_llama(LLM_PRESET, dtype=torch.float32), load_clip_text(CLIP_PRESET, dtype=torch.float32))


@pytest.fixture(scope="module")
def vae():
    vae = load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32)
    vae.identity = "tiny-hv-vae"
    return vae


def tiny():
    model = HunyuanVideoModel(preset_config("tiny"))
    model.load_state_dict(build_preset_state_dict("tiny"))
    return model.eval().requires_grad_(False)


def pixels_to(image):
    """[H, W, 3] in 0..1 -> [1, 3, 1, H, W] in [-1, 1] via uint8, as the cache builder sees it."""
    pixels = torch.from_numpy((image.numpy() * 255).round().astype(np.uint8))
    return pixels.permute(2, 0, 1)[None, :, None].float() / 127.5 - 1


def meta_caption(path):
    return _keys(path)[1]["caption1"]


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_cache_is_written_in_musubis_layout_and_trains(tmp_path, vae, encoders):
    images = torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    cfg = dataset_from_tensors(images, ["a red cat", "two blue dogs run"], tmp_path / "cache", resolution=(32, 32))
    llm, clip = encoders
    adapter = FAMILY.cache_adapter(vae=vae, text_encoder=llm, text_encoder_2=clip)
    assert family_for_cache_arch(adapter.arch) is FAMILY and adapter.target_fps == 24.0
    build_cache(cfg, adapter)
    latent_files = sorted((tmp_path / "cache").glob("*_hv.safetensors"))
    text_files = sorted((tmp_path / "cache").glob("*_hv_te.safetensors"))
    assert len(latent_files) == 2 and len(text_files) == 2

    tensors, meta = _keys(latent_files[0])
    assert list(tensors) == ["latents_1x4x4_float16"] and meta["architecture"] == "hv"
    with torch.no_grad():                                           # raw posterior mean, not scaled
        means = [vae.encode_mean(pixels_to(im))[0] for im in images]
    assert tensors["latents_1x4x4_float16"].dtype == torch.float16
    assert any(torch.allclose(tensors["latents_1x4x4_float16"].float(), m, rtol=2e-3, atol=2e-3) for m in means)

    text, _ = _keys(text_files[0])
    assert set(text) == {"llm_float16", "llm_mask", "clipL_float16"}
    assert text["llm_float16"].shape == (TOKENS, 32) and text["llm_mask"].dtype == torch.int64
    assert 2 < int(text["llm_mask"].sum()) < TOKENS and text["clipL_float16"].shape == (24,)
    states, mask = llm.encode([meta_caption(text_files[0])])
    torch.testing.assert_close(text["llm_float16"].float(), states[0], atol=2e-3, rtol=2e-3)
    assert torch.equal(text["llm_mask"].bool(), mask[0])
    torch.testing.assert_close(text["clipL_float16"].float(), clip.encode([meta_caption(text_files[0])])[0],
                               atol=2e-3, rtol=2e-3)

    model = tiny()
    cached = check_cache_for_model(cfg, FAMILY.cache_requirements(model, vae_identity="tiny-hv-vae",
                                                                  text_identity=llm.identity,
                                                                  text_2_identity=clip.identity))
    loader = CachedBatchLoader(cached, seed=1)
    (d, samples), _ = loader.epoch_batches(0)
    batch = loader.load_batch(cached[d], samples)
    FAMILY.check_batch(model, batch)
    assert batch["latents"].dtype == torch.float32 and batch["text_mask"].dtype == torch.bool
    with torch.no_grad():                                           # the batch holds the DiT's (scaled) latents
        assert any(torch.allclose(batch["latents"][0], vae.encode(pixels_to(im))[0].float(), atol=2e-3)
                   for im in images)

    with pytest.raises(MusubiInputError, match="text_encoder_2"):
        check_cache_for_model(cfg, FAMILY.cache_requirements(model, text_2_identity="another-clip"))

    session = TrainingSession(model, NetworkConfig(rank=4, alpha=4), OptimizerConfig(learning_rate=1e-3), loader,
                              TrainingConfig(output_dir=str(tmp_path / "out"), max_train_steps=2,
                                             mixed_precision="no", seed=0))
    assert all(np.isfinite(session.train_steps(2)))


def test_a_cache_written_by_musubi_reads_into_the_same_batch(tmp_path):
    """Keys, dtypes and metadata as Musubi Tuner's cache_io writes them for HunyuanVideo."""
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(16, 2, 4, 6, generator=g).half()
    llm = torch.randn(256, 32, generator=g).half()
    mask = torch.zeros(256, dtype=torch.int64)
    mask[:9] = 1
    clip = torch.randn(24, generator=g).half()
    save_file({"latents_2x4x6_float16": raw}, str(tmp_path / "clip_00000-005_0048x0032_hv.safetensors"),
              metadata={"architecture": "hunyuan_video", "width": "48", "height": "32", "format_version": "1.0.1",
                        "frame_count": "5"})
    save_file({"llm_float16": llm, "llm_mask": mask, "clipL_float16": clip,
               "clipL_mask": torch.ones(77, dtype=torch.int64)}, str(tmp_path / "clip_hv_te.safetensors"),
              metadata={"architecture": "hunyuan_video", "caption1": "a cat", "format_version": "1.0.1"})
    sample = {**load_cache_file(tmp_path / "clip_00000-005_0048x0032_hv.safetensors"),
              **load_cache_file(tmp_path / "clip_hv_te.safetensors")}
    assert set(sample) == {"latents", "llm", "llm_mask", "clipL", "clipL_mask"}
    batch = FAMILY.collate([sample, sample])
    torch.testing.assert_close(batch["latents"], (raw.float() * SCALING_FACTOR)[None].expand(2, -1, -1, -1, -1))
    assert torch.equal(batch["text_states"][1], llm) and torch.equal(batch["text_mask"][0], mask.bool())
    assert torch.equal(batch["pooled"], clip[None].expand(2, -1))

    # a Musubi cache trains the tiny model (padded tokens masked; text width checked first)
    model = tiny()
    FAMILY.check_batch(model, batch)
    session = TrainingSession(model, NetworkConfig(rank=4, alpha=4), OptimizerConfig(learning_rate=1e-3),
                              InMemoryBatchLoader([batch], seed=0),
                              TrainingConfig(output_dir=str(tmp_path / "out"), max_train_steps=1,
                                             mixed_precision="no", seed=0))
    assert np.isfinite(session.train_steps(1)[0])


def test_adapter_refusals(vae, encoders):
    with pytest.raises(MusubiInputError, match="both"):
        FAMILY.cache_adapter(text_encoder=encoders[0])
    with pytest.raises(MusubiInputError, match="cache dtype"):
        FAMILY.cache_adapter(vae=vae, dtype=torch.int8)
    with pytest.raises(MusubiInputError, match="no VAE"):
        FAMILY.cache_adapter(text_encoder=encoders[0], text_encoder_2=encoders[1]).encode_clip(None)
    req = FAMILY.described_cache_requirements({"vae": "v"}, {"text_encoder": "a", "text_encoder_2": "b"}, 32)
    assert req.arch == "hv" and req.text_key == "llm" and req.text_dim == 32
    assert req.identities == {"vae": "v", "text_encoder": "a", "text_encoder_2": "b"}
