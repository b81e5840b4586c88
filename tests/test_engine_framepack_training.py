"""FramePack through the generic engine: the family's cache adapter writes Musubi's section / one-frame / text files
with real tiny encoders (HunyuanVideo VAE and text encoders, SigLIP), the batch carries every section input, a LoRA on
Musubi's FramePack targets learns and resumes exactly, and saves in Musubi's names."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from engine.data import CachedBatchLoader, build_cache, check_cache_for_model, dataset_from_tensors
from engine.data.cache import load_cache_file
from engine.encoders.clip_text import PRESET_TINY as CLIP_PRESET, load_clip_text
from engine.encoders.llava_llama import PRESET_TINY as LLM_PRESET, load_llava_llama
from engine.encoders.siglip import load_siglip
from engine.errors import MusubiInputError
from engine.families import family_for_cache_arch, family_for_lora_names, family_of, get_family
from engine.families.framepack.dit import FramePackModel
from engine.families.framepack.presets import build_preset_state_dict, preset_config
from engine.families.hunyuan.text import HunyuanTextEncoders
from engine.families.hunyuan.vae import TINY_VAE_PRESET, load_hunyuan_vae
from engine.lora import read_lora
from engine.training import (InMemoryBatchLoader, NetworkConfig, OptimizerConfig, TimestepConfig, TrainingConfig,
                             TrainingSession)

FAMILY = get_family("framepack")
LWS = 2                                   # latent window size of the tests: one section = 9 pixel frames


@pytest.fixture(scope="module")
def encoders():
    vae = load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32)
    vae.identity = "tiny-hv-vae"
    siglip = load_siglip("preset:tiny-siglip", dtype=torch.float32)
    text = HunyuanTextEncoders(load_llava_llama(LLM_PRESET, dtype=torch.float32),
                               load_clip_text(CLIP_PRESET, dtype=torch.float32))
    return vae, siglip, text


def tiny():
    model = FramePackModel(preset_config("tiny"))
    model.load_state_dict(build_preset_state_dict("tiny"))
    return model.eval().requires_grad_(False)


def _video_dataset(tmp_path, frames=17):
    g = torch.Generator().manual_seed(0)
    clips = [torch.rand(frames, 32, 32, 3, generator=g) for _ in range(2)]
    cfg = dataset_from_tensors(clips, ["a red cat walks", "two blue dogs run"], tmp_path / "cache",
                               resolution=(32, 32))
    cfg.datasets[0] = dataclasses.replace(cfg.datasets[0], fp_latent_window_size=LWS)
    return cfg


def test_section_caches_are_musubis_files_and_batch_every_section_input(tmp_path, encoders):
    vae, siglip, text = encoders
    cfg = _video_dataset(tmp_path)                      # 17 frames = 5 latents = 2 sections of 2 + the start
    adapter = FAMILY.latent_cache_adapter(vae, "i2v", siglip)
    assert family_for_cache_arch(adapter.arch) is FAMILY and adapter.target_fps == 30.0
    build_cache(cfg, adapter)
    build_cache(cfg, FAMILY.cache_adapter(text_encoder=text))
    files = sorted(p.name for p in (tmp_path / "cache").glob("*_fp.safetensors"))
    assert len(files) == 4 and all("-0000_" in f or "-0001_" in f for f in files)    # one file per section
    stored = load_cache_file(tmp_path / "cache" / files[1])
    assert stored["latents"].shape == (16, LWS, 4, 4) and stored["latents"].dtype == torch.float16
    assert stored["latents_clean"].shape == (16, 2, 4, 4) and stored["latents_clean_4x"].shape == (16, 16, 4, 4)
    assert stored["image_embeddings"].shape[-1] == siglip.config.hidden_size
    te = load_cache_file(next((tmp_path / "cache").glob("*_fp_te.safetensors")))
    assert te["llama_vec"].shape == (512, 32) and te["llama_attention_mask"].dtype == torch.bool
    n = int(te["llama_attention_mask"].sum())
    assert 0 < n <= 256 and not te["llama_attention_mask"][n:].any() and not te["llama_vec"][n:].any()
    assert te["clip_l_pooler"].shape == (24,)

    model = tiny()
    cached = check_cache_for_model(cfg, FAMILY.cache_requirements(model))
    batch = next(iter(CachedBatchLoader(cached, seed=0)))
    FAMILY.check_batch(model, batch)
    assert batch["latent_indices"].shape == (1, LWS) and batch["clean_latent_4x_indices"].shape == (1, 16)
    assert batch["text_states"].shape == (1, 512, 32) and batch["pooled"].shape == (1, 24)
    x = batch["latents"].float()
    pred, _ = FAMILY.training_forward(model, batch, x, torch.tensor([500.0]), x)
    assert pred.shape == x.shape and torch.isfinite(pred).all()


def test_f1_layout_and_task_refusals(tmp_path, encoders):
    vae, siglip, _ = encoders
    cfg = _video_dataset(tmp_path)
    build_cache(cfg, FAMILY.latent_cache_adapter(vae, "f1", siglip))
    first = load_cache_file(sorted((tmp_path / "cache").glob("*-0000_*_fp.safetensors"))[0])
    assert first["clean_latent_indices"].tolist() == [0, 19]           # F1: start, then the 1x frame at 19
    with pytest.raises(MusubiInputError, match="clip_vision"):
        FAMILY.latent_cache_adapter(vae, "i2v", None)
    with pytest.raises(MusubiInputError, match="i2v .*FramePack"):
        FAMILY.latent_cache_adapter(vae, "t2v", siglip)


def test_one_frame_cache_with_a_masked_control(tmp_path, encoders):
    vae, siglip, _ = encoders
    (tmp_path / "img").mkdir()
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("a cat")
    (tmp_path / "ctrl").mkdir()
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], axis=2)
    rgba[:, 16:, 3] = 0                                                  # right half masked out
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ctrl" / "a.png")
    from engine.data import load_dataset_config

    cfg = load_dataset_config(f"""
[general]
resolution = [32, 32]
caption_extension = ".txt"
[[datasets]]
image_directory = "{tmp_path / 'img'}"
control_directory = "{tmp_path / 'ctrl'}"
cache_directory = "{tmp_path / 'cache'}"
fp_1f_clean_indices = [0]
fp_1f_target_index = 9
fp_1f_no_post = true
""")
    build_cache(cfg, FAMILY.latent_cache_adapter(vae, "i2v", siglip))
    stored = load_cache_file(next((tmp_path / "cache").glob("*_fp.safetensors")))
    assert stored["latent_indices"].tolist() == [9] and stored["clean_latent_indices"].tolist() == [0]
    assert stored["latents_clean"].shape == (16, 1, 4, 4)                # no post latent
    # the alpha, resized to the latent by LANCZOS (Musubi's), zeroes the masked side (the edge column is blended)
    assert not stored["latents_clean"][:, :, :, 3].any() and stored["latents_clean"][:, :, :, 0].abs().sum() > 0

    bad = cfg.datasets[0]
    cfg.datasets[0] = dataclasses.replace(bad, fp_1f_target_index=None)
    with pytest.raises(MusubiInputError, match="fp_1f_target_index"):
        build_cache(cfg, FAMILY.latent_cache_adapter(vae, "i2v", siglip))


def _section_batches(n=2):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        mask = torch.zeros(1, 6, dtype=torch.bool)
        mask[:, : 4 + i] = True
        out.append({"latents": torch.randn(1, 16, LWS, 4, 4, generator=g) * 0.3 + 0.5,
                    "latent_indices": torch.tensor([[3, 4]]),
                    "clean_latents": torch.randn(1, 16, 2, 4, 4, generator=g), "clean_latent_indices": torch.tensor([[0, 5]]),
                    "clean_latents_2x": torch.randn(1, 16, 2, 4, 4, generator=g),
                    "clean_latent_2x_indices": torch.tensor([[6, 7]]),
                    "clean_latents_4x": torch.randn(1, 16, 16, 4, 4, generator=g),
                    "clean_latent_4x_indices": torch.arange(8, 24)[None],
                    "image_embeddings": torch.randn(1, 5, 48, generator=g),
                    "text_states": torch.randn(1, 6, 32, generator=g), "text_mask": mask,
                    "pooled": torch.randn(1, 24, generator=g)})
    return out


def make(tmp_path, steps, resume=None, model=None):
    cfg = TrainingConfig(output_dir=str(tmp_path), output_name="fp", max_train_steps=steps, mixed_precision="no",
                         seed=1, gradient_checkpointing=True, timesteps=TimestepConfig("shift", discrete_flow_shift=3.0))
    return TrainingSession(model or tiny(), NetworkConfig(rank=8, alpha=8), OptimizerConfig(learning_rate=2e-3),
                           InMemoryBatchLoader(_section_batches(), seed=0), cfg, resume_from=resume)


def test_lora_on_musubis_targets_learns_resumes_and_saves_musubi_names(tmp_path):
    s = make(tmp_path / "a", 30)
    adapted = set(s.network.adapters())
    assert family_of(s.model) is FAMILY
    for block in ("transformer_blocks.0", "transformer_blocks.1"):
        assert {f"{block}.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                         "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                         "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")} <= adapted
    assert {"single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.1.proj_out"} <= adapted
    assert len(adapted) == 2 * 12 + 2 * 5                # no norm*.linear, nothing outside the blocks
    losses = s.train_steps(30)
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses

    part = make(tmp_path / "b", 30)
    part.train_steps(20)
    resumed = make(tmp_path / "b", 30, resume=part.save_state())
    assert resumed.train_steps(10) == losses[20:]

    path = s.save_lora()
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in keys
    assert "lora_unet_single_transformer_blocks_1_proj_out.lora_up.weight" in keys
    assert meta["ss_base_model_version"] == "framepack" and meta["ss_network_module"] == "networks.lora_framepack"
    lora = read_lora(path)                               # back to the model's module names, nothing unresolved
    assert set(lora.modules) == adapted and not lora.unresolved and lora.dialect.startswith("musubi")
    assert family_for_lora_names(["transformer_blocks_0_attn_add_q_proj"]) is FAMILY
    assert FAMILY.lora.underscore_to_name("transformer_blocks_3_ff_context_net_0_proj") == \
        "transformer_blocks.3.ff_context.net.0.proj"

    # the ComfyUI / diffusers spellings (HunyuanVideo's diffusers names) come back as the same weights
    from engine.lora import merge_into_model, save_lora

    trained = {n: a.delta_weight().detach() for n, a in s.network.adapters().items()}
    for fmt in ("comfyui", "diffusers"):
        model = tiny()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        merge_into_model(model, read_lora(save_lora(s.network, tmp_path / f"fp_{fmt}.safetensors", format=fmt),
                                          model=model))
        for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
                     "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.1.proj_mlp"):
            torch.testing.assert_close(model.get_parameter(f"{name}.weight") - before[f"{name}.weight"],
                                       trained[name], rtol=1e-4, atol=1e-6)


def test_validation_samples_with_the_section_sampler(encoders):
    """A validation prompt with a start image samples through the family: one section of the default window."""
    from engine.families.framepack.pipeline import prepare_image
    from engine.training import ValidationPrompt, run_validation

    vae, siglip, _ = encoders
    model = tiny()
    image = prepare_image(vae, siglip, torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    prompt = ValidationPrompt(context=torch.randn(5, 32), pooled=torch.randn(24), width=32, height=32, frames=1,
                              steps=2, conditioning=image)
    request = FAMILY.sampling_request(prompt)
    assert request.sections == 1 and request.guidance_scale == 1.0
    FAMILY.check_sampling(model, request)
    (latents,) = run_validation(model, [prompt])
    assert latents.shape == (1, 16, 1 + 9, 4, 4) and torch.isfinite(latents).all()
    with pytest.raises(MusubiInputError, match="image"):           # FramePack needs a start image
        FAMILY.check_sampling(model, FAMILY.sampling_request(dataclasses.replace(prompt, conditioning=None)))


def _hv_lora(tmp_path, fmt):
    """A LoRA trained (a few steps) on the tiny HunyuanVideo DiT, saved in `fmt`."""
    from engine.families.hunyuan.dit import HunyuanVideoModel
    from engine.families.hunyuan.presets import build_preset_state_dict as hv_state, preset_config as hv_config

    model = HunyuanVideoModel(hv_config("tiny"))
    model.load_state_dict(hv_state("tiny"))
    g = torch.Generator().manual_seed(0)
    batches = [{"latents": torch.randn(1, 16, 1, 4, 4, generator=g), "text_states": torch.randn(1, 6, 32, generator=g),
                "text_mask": torch.ones(1, 6, dtype=torch.bool), "pooled": torch.randn(1, 24, generator=g)}]
    cfg = TrainingConfig(output_dir=str(tmp_path), output_name=f"hv_{fmt}", max_train_steps=3, mixed_precision="no",
                         seed=1, save_format=fmt)
    s = TrainingSession(model.eval().requires_grad_(False), NetworkConfig(rank=4, alpha=4),
                        OptimizerConfig(learning_rate=5e-2), InMemoryBatchLoader(batches, seed=0), cfg)
    s.train_steps(3)
    return s.save_lora(), s.network


@pytest.mark.parametrize("fmt", ["musubi", "comfyui", "diffusers"])
def test_a_hunyuan_lora_applies_to_framepack_split_as_musubi_converts_it(tmp_path, fmt):
    """ΔW of FramePack's attn.to_q / proj_mlp = the rows of HunyuanVideo's fused img_attn_qkv / linear1 ΔW."""
    from engine.lora import merge_into_model

    path, net = _hv_lora(tmp_path, fmt)
    hv = {name: a.delta_weight().detach() for name, a in net.adapters().items()}
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = read_lora(path, model=model)
    merge_into_model(model, lora)
    # matched against FramePack: HunyuanVideo's modules are adopted under FramePack's names, all of them resolved
    from engine.families import family_of
    from engine.lora.dialects import adopted

    fp = adopted(lora, family_of(model))
    assert fp.unresolved == set() and fp.stems == {n: ("adopted", n) for n in fp.modules}
    assert "transformer_blocks.1.attn.to_k" in fp.modules and all(family_of(model).lora.owns(n) for n in fp.modules)
    assert adopted(fp, family_of(model)) is fp                      # FramePack's own names: nothing to adopt
    delta = lambda name: model.get_parameter(f"{name}.weight") - before[f"{name}.weight"]   # noqa: E731
    d = 64
    torch.testing.assert_close(delta("transformer_blocks.1.attn.to_k"), hv["double_blocks.1.img_attn_qkv"][d:2 * d],
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta("transformer_blocks.0.attn.add_v_proj"),
                               hv["double_blocks.0.txt_attn_qkv"][2 * d:], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta("single_transformer_blocks.0.proj_mlp"), hv["single_blocks.0.linear1"][3 * d:],
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta("single_transformer_blocks.1.proj_out"), hv["single_blocks.1.linear2"],
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta("transformer_blocks.0.ff_context.net.2"), hv["double_blocks.0.txt_mlp.fc2"],
                               rtol=1e-4, atol=1e-6)


def test_a_diffusers_format_framepack_lora_loads_the_way_framepack_wrappers_load_it(tmp_path, diffusers_framepack):
    """kijai's ComfyUI-FramePackWrapper loads LoRAs with diffusers' `_convert_hunyuan_video_lora_to_diffusers` and
    PEFT's `load_lora_adapter` on the diffusers-named packed model (ComfyUI itself has no FramePack model). Done
    here on diffusers' own `HunyuanVideoFramepackTransformer3DModel`: the pack's diffusers-format file sets every
    adapted weight to the trained ΔW."""
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers
    from safetensors.torch import load_file

    from engine.lora import save_lora

    s = make(tmp_path / "a", 3)
    s.train_steps(3)
    trained = {n: a.delta_weight().detach() for n, a in s.network.adapters().items()}
    ref = diffusers_framepack(preset_config("tiny"), build_preset_state_dict("tiny"))
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    path = save_lora(s.network, tmp_path / "fp_diffusers.safetensors", format="diffusers")
    ref.load_lora_adapter(_convert_hunyuan_video_lora_to_diffusers(load_file(str(path))), adapter_name="fp",
                          prefix="transformer")
    ref.fuse_lora(lora_scale=1.0)
    params = dict(ref.named_parameters())
    for name, delta in trained.items():
        weight = params.get(f"{name}.base_layer.weight", params.get(f"{name}.weight"))
        torch.testing.assert_close(weight.detach() - before[f"{name}.weight"], delta, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["f1", "one_frame"])
def test_training_runs_on_f1_and_one_frame_caches(tmp_path, encoders, layout):
    """The trainer takes every FramePack cache layout as it is: F1 sections, and one-frame items whose 2x/4x
    history is absent (no_post, zero 2x/4x made at batch time)."""
    vae, siglip, text = encoders
    if layout == "f1":
        cfg = _video_dataset(tmp_path)
        build_cache(cfg, FAMILY.latent_cache_adapter(vae, "f1", siglip))
    else:
        from engine.data import load_dataset_config

        for d in ("img", "ctrl"):
            (tmp_path / d).mkdir()
            Image.fromarray((np.random.default_rng(len(d)).random((32, 32, 3)) * 255).astype(np.uint8)).save(
                tmp_path / d / "a.png")
        (tmp_path / "img" / "a.txt").write_text("a cat")
        cfg = load_dataset_config(f"""
[general]
resolution = [32, 32]
caption_extension = ".txt"
[[datasets]]
image_directory = "{tmp_path / 'img'}"
control_directory = "{tmp_path / 'ctrl'}"
cache_directory = "{tmp_path / 'cache'}"
fp_1f_target_index = 1
fp_1f_no_post = true
""")
        build_cache(cfg, FAMILY.latent_cache_adapter(vae, "i2v", siglip, one_frame_no_2x=True))
    build_cache(cfg, FAMILY.cache_adapter(text_encoder=text))
    model = tiny()
    cached = check_cache_for_model(cfg, FAMILY.cache_requirements(model))
    batch = next(iter(CachedBatchLoader(cached, seed=0)))
    if layout == "one_frame":
        assert batch["clean_latents_2x"] is None and batch["clean_latents_4x"].shape[2] == 16
    train = TrainingConfig(output_dir=str(tmp_path / "out"), output_name=layout, max_train_steps=3,
                           mixed_precision="no", seed=1)
    s = TrainingSession(model, NetworkConfig(rank=4, alpha=4), OptimizerConfig(learning_rate=1e-3),
                        CachedBatchLoader(cached, seed=0), train)
    losses = s.train_steps(3)
    assert len(losses) == 3 and all(np.isfinite(losses))
