"""The HunyuanVideo node file (nodes/hunyuan.py) in a real ComfyUI on the tiny presets: T2V, T2I, V2V and SkyReels
I2V generation, refusals before heavy work, and a LoRA trained from the generic data/training nodes that ComfyUI's
own LoRA loader reads."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.comfy
W, H, F = 48, 32, 5
PROBE = Path(__file__).with_name("comfy_lora_probe.py")
# what ComfyUI's HunyuanVideo detection fixes instead of reading it from the weights (13B: 24 heads of 128, RoPE
# axes 16/56/56, CLIP-L 768): the tiny preset's values (2 heads of 32, axes 4/14/14, pooled width 24)
TINY_COMFY_CONFIG = {"num_heads": 2, "axes_dim": [4, 14, 14], "vec_in_dim": 24}


def _base(dit_preset="preset:tiny"):
    return {
        "1": {"class_type": "MusubiHunyuanDiTLoader",
              "inputs": {"model_name": dit_preset, "dtype": "fp32", "attention": "sdpa"}},
        "2": {"class_type": "MusubiHunyuanTextEncoderLoader",
              "inputs": {"llm_name": "preset:tiny-llava-llama", "clip_name": "preset:tiny-clip-l", "dtype": "fp32",
                         "fp8_llm": False}},
        "3": {"class_type": "MusubiHunyuanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32"}},
        "5": {"class_type": "MusubiHunyuanTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a cat walks",
                                                                  "negative_prompt": "blurry",
                                                                  "offload_after": True}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": F, "color": 0x3366AA}},
    }


def _sampler(frames, image_embeds=None, **changes):
    inputs = {"model": ["1", 0], "embeds": ["5", 0], "width": W, "height": H, "frames": frames, "steps": 3,
              "embedded_guidance": 6.0, "guidance_scale": 1.0, "shift": 7.0, "solver": "euler", "seed": 1,
              "noise_device": "cpu", **changes}
    if image_embeds:
        inputs["image_embeds"] = [image_embeds, 0]
    return {"class_type": "MusubiHunyuanSampler", "inputs": inputs}


def _decode(src="8", **tiling):
    return {"class_type": "MusubiHunyuanVAEDecode", "inputs": {
        "vae": ["3", 0], "latents": [src, 0], "tile_size": 0, "tile_overlap": 64, "temporal_tile": 0,
        "temporal_overlap": 16, **tiling}}


def _engine_request(embeds, **fields):
    from engine.families.hunyuan.pipeline import HunyuanGenerateRequest

    return HunyuanGenerateRequest(**{"context": embeds["context"], "pooled": embeds["pooled"],
                                     "negative_context": embeds["negative_context"],
                                     "negative_pooled": embeds["negative_pooled"], "width": W, "height": H,
                                     "steps": 3, "seed": 1, **fields})


def test_t2v_generation_cfg_latent_format_and_decode(comfy):
    from engine.families.hunyuan.pipeline import generate

    p = _base()
    p["8"] = _sampler(F)
    p["9"] = _decode(tile_size=32, tile_overlap=16, temporal_tile=8, temporal_overlap=4)   # both tilings on
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    p["11"] = _sampler(F, guidance_scale=3.0)                                          # real CFG, negative prompt
    p["12"] = {"class_type": "LatentBatch", "inputs": {"samples1": ["8", 1], "samples2": ["8", 1]}}   # a core node
    p["13"] = {"class_type": "MusubiHunyuanVAEDecode", "inputs": {
        "vae": ["3", 0], "latent": ["12", 0], "tile_size": 0, "tile_overlap": 64, "temporal_tile": 0,
        "temporal_overlap": 16}}
    p["14"] = {"class_type": "PreviewImage", "inputs": {"images": ["13", 0]}}
    p["15"] = {"class_type": "PreviewAny", "inputs": {"source": ["11", 1]}}
    comfy.run(p)

    embeds = comfy.output("5")
    assert embeds["family"] == "hunyuan" and embeds["pooled"].shape == (24,)
    assert embeds["context"].ndim == 2 and embeds["context"].shape[1] == 32 and 1 <= embeds["context"].shape[0] < 256
    out = comfy.output("8")
    assert out["task"] == "t2v" and out["fps"] == 24.0
    lat = out["samples"]
    assert lat.shape == (1, 16, (F - 1) // 4 + 1, H // 8, W // 8) and torch.isfinite(lat).all()

    # the node is the engine's pipeline with the node's inputs (embedded guidance 6, no negative pass at cfg 1)
    model = comfy.module("1")
    expected = generate(model, _engine_request(embeds, task="t2v", frames=F, shift=7.0))
    torch.testing.assert_close(lat, expected.float().cpu(), rtol=1e-5, atol=1e-5)
    with_cfg = comfy.output("11")["samples"]
    torch.testing.assert_close(with_cfg, generate(model, _engine_request(embeds, task="t2v", frames=F,
                                                                           shift=7.0, guidance_scale=3.0)).cpu(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_cfg, lat, atol=1e-3)

    # LATENT: what ComfyUI's HunyuanVideo latent format turns into the sampler's latents
    core = comfy.output("8", 1)["samples"]
    hv = importlib.import_module("comfy.latent_formats").HunyuanVideo()
    torch.testing.assert_close(hv.process_in(core), lat, rtol=1e-5, atol=1e-5)

    images, fps = comfy.output("9"), comfy.output("9", 1)
    assert images.shape == (F, H, W, 3) and fps == 24.0 and images.std() > 0.01
    vae = comfy.module("3")
    with torch.no_grad():
        video = vae.decode(lat, tile_size=32, tile_overlap=16, temporal_tile=8, temporal_overlap=4)
    torch.testing.assert_close(images, ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1),
                               rtol=1e-4, atol=1e-4)
    untiled = comfy.output("13")   # the core LATENT (batched by a core node) back through the pack's decode, no tiling
    with torch.no_grad():
        video = vae.decode(lat, tile_size=0, temporal_tile=0)
    frames = ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1)
    torch.testing.assert_close(untiled, torch.cat([frames, frames]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untiled[:F], images, atol=1e-3)   # the tiling inputs reach the VAE


def test_magcache_node_reaches_the_sampler(comfy):
    from engine.families.hunyuan.pipeline import generate
    from engine.sampling.magcache import MagCacheConfig

    p = _base()
    p["20"] = {"class_type": "MusubiMagCache", "inputs": {"mag_ratios": "1.0, 1.0, 1.0", "retention_ratio": 0.2,
                                                          "threshold": 0.24, "max_skips": 2, "calibrate": False}}
    p["8"] = {**_sampler(F, steps=8), "inputs": {**_sampler(F, steps=8)["inputs"], "magcache": ["20", 0]}}
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    p["21"] = {"class_type": "MusubiMagCache", "inputs": {"mag_ratios": "", "retention_ratio": 0.2,
                                                          "threshold": 0.24, "max_skips": 6, "calibrate": True}}
    p["10"] = {**_sampler(F, steps=4), "inputs": {**_sampler(F, steps=4)["inputs"], "magcache": ["21", 0]}}
    p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    comfy.run(p)
    lat = comfy.output("8")["samples"]
    embeds, model = comfy.output("5"), comfy.module("1")
    expected = generate(model, _engine_request(embeds, task="t2v", frames=F, shift=7.0, steps=8,
                                               magcache=MagCacheConfig([1.0] * 3, max_skips=2)))
    torch.testing.assert_close(lat, expected.float().cpu(), rtol=1e-5, atol=1e-5)
    plain = generate(model, _engine_request(embeds, task="t2v", frames=F, shift=7.0, steps=8))
    assert not torch.allclose(lat, plain.float().cpu(), atol=1e-4)      # steps were skipped
    # flat table, max 2 in a row, steps 1..6 skippable (retention 0.2 of 8, never the last): 1, 2, 4, 5 skipped
    assert ("8", "MagCache skipped 4 of 8 block passes") in comfy.server.texts
    calibration = [t for n, t in comfy.server.texts if n == "10" and "MagCache calibration" in t]
    assert len(calibration) == 1, comfy.server.texts
    table = [float(v) for v in calibration[0].splitlines()[-1].split(",")]
    assert len(table) == 4 and table[0] == 1.0 and all(v > 0 for v in table)   # 4 steps: paste-able table


def test_magcache_node_refuses_a_bad_table(comfy):
    p = {"1": {"class_type": "MusubiMagCache", "inputs": {"mag_ratios": "1.0, x", "retention_ratio": 0.2,
                                                         "threshold": 0.24, "max_skips": 6, "calibrate": False}},
         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    comfy.run(p, expect_success=False)
    assert "mag_ratios" in comfy.error_message() and "comma-separated numbers" in comfy.error_message()


def test_t2i_single_frame(comfy):
    p = _base()
    p["8"] = _sampler(1, seed=4)
    p["9"] = _decode()
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    assert comfy.output("8")["task"] == "t2i"
    assert comfy.output("8")["samples"].shape == (1, 16, 1, H // 8, W // 8)
    assert comfy.output("9").shape == (1, H, W, 3)


def test_v2v_runs_steps_times_strength_from_the_source_video(comfy):
    from engine.families.hunyuan.pipeline import generate

    p = _base()
    p["7"] = {"class_type": "MusubiHunyuanVideoEncode", "inputs": {"vae": ["3", 0], "video": ["6", 0], "width": W,
                                                                   "height": H, "frames": F, "strength": 0.5}}
    p["8"] = _sampler(F, "7", steps=4)
    p["9"] = _decode()
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    cond = comfy.output("7")
    assert cond["task"] == "v2v" and cond["strength"] == 0.5
    assert cond["conditioning"].latents.shape == (16, (F - 1) // 4 + 1, H // 8, W // 8)
    assert [c for c in comfy.progress_calls if c[0] == "8"][-1][1:] == (2, 2)    # ⌊4 · 0.5⌋ steps ran
    expected = generate(comfy.module("1"), _engine_request(comfy.output("5"), task="v2v", frames=F, steps=4,
                                                           strength=0.5, conditioning=cond["conditioning"]))
    torch.testing.assert_close(comfy.output("8")["samples"], expected.cpu(), rtol=1e-5, atol=1e-5)
    assert comfy.output("9").shape == (F, H, W, 3)

    p["7"]["inputs"]["frames"] = 9            # more frames than the video has: refused naming the input
    p["8"]["inputs"]["frames"] = 9
    comfy.run(p, expect_success=False)
    assert "video" in comfy.error_message() and "9 frames" in comfy.error_message(), comfy.error_message()


def test_skyreels_i2v_generation_and_its_refusals(comfy):
    p = _base("preset:tiny-i2v")
    p["7"] = {"class_type": "MusubiHunyuanImageEncode", "inputs": {"vae": ["3", 0], "start_image": ["6", 0],
                                                                   "width": W, "height": H, "frames": F}}
    p["8"] = _sampler(F, "7", guidance_scale=2.0)   # SkyReels: real CFG; embedded guidance ignored (no embedder)
    p["9"] = _decode()
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    y = comfy.output("7")["conditioning"].latents
    assert y.shape == (16, (F - 1) // 4 + 1, H // 8, W // 8)
    assert y[:, 0].abs().sum() > 0 and torch.count_nonzero(y[:, 1:]) == 0   # the image in latent frame 0 only
    assert comfy.output("8")["task"] == "i2v"
    assert comfy.output("9").shape == (F, H, W, 3)

    del p["8"]["inputs"]["image_embeds"]            # an I2V model without a start image
    comfy.run(p, expect_success=False)
    assert "image_embeds" in comfy.error_message() and "SkyReels" in comfy.error_message(), comfy.error_message()

    q = _base("preset:tiny")                        # a start image for the T2V model
    q["7"] = p["7"]
    q["8"] = _sampler(F, "7")
    q["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    comfy.run(q, expect_success=False)
    assert "text-to-video" in comfy.error_message(), comfy.error_message()


def test_frames_not_4k1_refused_when_queued(comfy):
    p = _base()
    p["7"] = {"class_type": "MusubiHunyuanImageEncode", "inputs": {"vae": ["3", 0], "start_image": ["6", 0],
                                                                   "width": W, "height": H, "frames": 8}}
    p["8"] = _sampler(8)
    p["9"] = _decode()
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}
    ok, err, outputs, node_errors = comfy.validate(p)
    assert not ok
    for nid in ("7", "8"):
        text = " | ".join(f"{e.get('message')}: {e.get('details')}" for e in node_errors[nid]["errors"])
        assert "frames: 8 frames is not of the form 4k+1" in text, text


def _in_folder(comfy, key, folder):
    comfy.b.folder_paths.add_model_folder_path(key, str(folder))


def _out_of_folder(comfy, key, folder):
    comfy.b.folder_paths.folder_names_and_paths[key][0].remove(str(folder))


def test_wan_file_in_the_hunyuan_dit_loader_is_refused(comfy, tmp_path):
    from engine.families.wan.presets import write_preset_checkpoint

    write_preset_checkpoint("tiny-t2v", tmp_path / "wan2.1_t2v_tiny.safetensors")
    _in_folder(comfy, "diffusion_models", tmp_path)
    try:
        p = _base()
        p["1"]["inputs"]["model_name"] = "wan2.1_t2v_tiny.safetensors"
        p["9"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                 "passthrough": ["1", 0]}}
        comfy.run(p, expect_success=False)
        msg = comfy.error_message()
        assert "wan2.1_t2v_tiny.safetensors" in msg and "Wan" in msg, msg
    finally:
        _out_of_folder(comfy, "diffusion_models", tmp_path)


def test_llama_file_without_a_usable_tokenizer_is_refused(comfy, tmp_path, monkeypatch):
    """A LLaMA file with no tokenizer that fits: ComfyUI's LLaMA-3 tokenizer (the default for a file) has more
    tokens than the tiny model's embeddings; a tokenizer folder without tokenizer.json names the input. Both are
    refused before the LLM's weights are built."""
    from safetensors.torch import save_file

    from engine.encoders import llava_llama
    from engine.encoders.llava_llama import tiny_llava_llama_state_dict

    save_file(tiny_llava_llama_state_dict(), str(tmp_path / "llava_llama3_tiny.safetensors"))
    (tmp_path / "empty").mkdir()
    _in_folder(comfy, "text_encoders", tmp_path)
    built = []
    monkeypatch.setattr(llava_llama, "_build", lambda *a, **k: built.append(1) or pytest.fail("model built"))
    try:
        p = _base()
        p["2"]["inputs"]["llm_name"] = "llava_llama3_tiny.safetensors"
        p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}}
        comfy.run(p, expect_success=False)
        msg = comfy.error_message()
        assert "tokenizer" in msg and "llava_llama3_tiny.safetensors" in msg and "wrong tokenizer" in msg, msg

        p["2"]["inputs"]["llm_tokenizer_path"] = str(tmp_path / "empty")
        comfy.run(p, expect_success=False)
        msg = comfy.error_message()
        assert "tokenizer_path" in msg and "no tokenizer.json" in msg, msg
        assert built == []
    finally:
        _out_of_folder(comfy, "text_encoders", tmp_path)


# --- training from the generic nodes ---------------------------------------------------------------------------
SIZE = 32


def _train_graph(out_dir, steps=60):
    """Dataset from an image -> Cache Latents / Cache Text (HunyuanVideo VAE and text pair) -> Init Training (with a
    HunyuanVideo validation prompt) -> Train Steps -> Save Trained LoRA; the trained model and the loader's model
    sample the caption."""
    p = _base()
    p["5"]["inputs"].update({"prompt": "a red square", "negative_prompt": ""})
    p.update({
        "20": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1,
                                                      "color": 0xCC2222}},
        "21": {"class_type": "MusubiDatasetFromImages", "inputs": {
            "images": ["20", 0], "captions": "a red square", "width": SIZE, "height": SIZE, "num_repeats": 1,
            "as_video": False, "cache_directory": str(out_dir / "cache"), "batch_size": 1}},
        "22": {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["21", 0], "vae": ["3", 0], "task": "t2v",
                                                              "keep_cache": False, "workers": 0}},
        "23": {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["22", 0], "text_encoder": ["2", 0],
                                                                     "keep_cache": False}},
        "24": {"class_type": "MusubiLoRAConfig", "inputs": {"network_kind": "lora", "rank": 8, "alpha": 8.0,
                                                            "dropout": 0.0, "rank_dropout": 0.0,
                                                            "module_dropout": 0.0}},
        "25": {"class_type": "MusubiOptimizerConfig", "inputs": {"optimizer_type": "AdamW", "learning_rate": 3e-3,
                                                                 "max_grad_norm": 1.0, "lr_scheduler": "constant",
                                                                 "lr_warmup_steps": "0"}},
        "26": {"class_type": "MusubiValidationPrompt", "inputs": {
            "embeds": ["5", 0], "width": SIZE, "height": SIZE, "frames": 1, "seed": 3, "steps": 2,
            "guidance_scale": 0.0, "shift": 0.0, "embedded_guidance": 4.0}},
        "27": {"class_type": "MusubiInitTraining", "inputs": {
            "model": ["1", 0], "dataset": ["23", 0], "lora_config": ["24", 0], "optimizer_config": ["25", 0],
            "seed": 1, "max_train_steps": 200, "mixed_precision": "no", "gradient_checkpointing": True,
            "gradient_accumulation_steps": 1, "timestep_sampling": "shift", "discrete_flow_shift": 2.0,
            "sigmoid_scale": 1.0, "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
            "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": str(out_dir), "output_name": "hv_lora",
            "save_state": False, "attention_backend": "model", "validation_prompts": ["26", 0],
            "validation_vae": ["3", 0], "validate_every_n_steps": steps}},
        "28": {"class_type": "MusubiTrainSteps", "inputs": {"session": ["27", 0], "steps": steps}},
        "29": {"class_type": "PreviewImage", "inputs": {"images": ["28", 5]}},
        "30": {"class_type": "MusubiSaveTrainedLoRA", "inputs": {"session": ["28", 0], "format": "comfyui",
                                                                 "filename_prefix": "loras/hunyuan_nodes",
                                                                 "dtype": "fp32", "save_to": "output"}},
        "31": _sampler(1, width=SIZE, height=SIZE, steps=12, shift=2.0, seed=5, offload_after=False),
        "32": _sampler(1, width=SIZE, height=SIZE, steps=12, shift=2.0, seed=5, offload_after=False),
        "33": {"class_type": "PreviewAny", "inputs": {"source": ["30", 1]}},
        "34": {"class_type": "PreviewAny", "inputs": {"source": ["31", 1]}},
        "35": {"class_type": "PreviewAny", "inputs": {"source": ["32", 1]}},
    })
    p["32"]["inputs"]["model"] = ["28", 4]
    return p


def test_cache_latents_refuses_a_task_hunyuan_does_not_cache(comfy, tmp_path):
    p = _train_graph(tmp_path)
    p["22"]["inputs"]["task"] = "i2v"
    p = {k: v for k, v in p.items() if k in ("3", "20", "21", "22")}
    p["40"] = {"class_type": "MusubiDatasetPreview", "inputs": {"dataset": ["22", 0], "max_items": 1,
                                                                "frames_per_clip": 1, "tile_size": 64}}
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert "task" in msg and "t2v for HunyuanVideo" in msg, msg


def test_train_then_generate_from_the_nodes_and_comfyui_reads_the_lora(comfy, tmp_path, comfyui_dir):
    from safetensors.torch import load_file, save_file

    from engine.families.hunyuan.presets import build_preset_state_dict
    from engine.lora import merge_into_model, read_lora
    from engine.families.hunyuan.loader import load_hunyuan_dit

    p = _train_graph(tmp_path)
    comfy.run(p)

    prompt = comfy.output("26")[0]
    assert prompt.pooled.shape == (24,) and prompt.negative_pooled.shape == (24,) and prompt.embedded_guidance == 4.0
    # guidance_scale 0 = the family's default: no real CFG on the distilled HunyuanVideo (Wan's would be 5.0)
    from engine.families import get_family
    request = get_family("hunyuan").sampling_request(prompt).resolve()
    assert prompt.guidance_scale is None and request.guidance_scale == 1.0 and not request.uses_cfg
    assert get_family("wan").sampling_request(prompt).resolve().guidance_scale == 5.0
    losses = comfy.output("28", 2)["loss"]
    assert len(losses) == 60
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.75 * first, (first, last)
    samples = comfy.output("28", 5)
    assert samples.shape == (1, SIZE, SIZE, 3)                       # the validation sample, decoded

    # the LoRA pulls a same-seed sample of the caption toward the cached training latents
    from engine.data import check_cache_for_model

    dataset = comfy.output("23")
    cached = check_cache_for_model(dataset.config, dataset.requirements(text_dim=32))
    red = cached[0].samples[0].load()["latents"].float() * 0.476986
    without, with_lora = comfy.output("31")["samples"][0], comfy.output("32")["samples"][0]
    trained_sample = comfy.output("32")["samples"]
    mse_without, mse_with = float(((without - red) ** 2).mean()), float(((with_lora - red) ** 2).mean())
    assert mse_with < 0.7 * mse_without, (mse_with, mse_without)

    # the saved file: Load LoRA + Apply LoRA on the loader's model gives the trained model's sample
    lora_path = Path(comfy.output("30", 1))
    assert lora_path.is_file()
    loras = Path(comfy.b.folder_paths.get_folder_paths("loras")[0])
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "hunyuan_test").mkdir(exist_ok=True)
    (loras / "hunyuan_test" / "trained.safetensors").write_bytes(lora_path.read_bytes())
    q = _base()
    q["5"] = p["5"]
    q["40"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": "hunyuan_test/trained.safetensors"}}
    q["41"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["40", 0], "strength": 1.0,
                                                           "mode": "adapter", "block_filter": "", "strength_2": 1.0}}
    q["42"] = {**p["32"], "inputs": {**p["32"]["inputs"], "model": ["41", 0]}}
    q["43"] = {"class_type": "PreviewAny", "inputs": {"source": ["41", 1]}}
    q["44"] = {"class_type": "PreviewAny", "inputs": {"source": ["42", 1]}}
    comfy.run(q)
    torch.testing.assert_close(comfy.output("42")["samples"], trained_sample, rtol=1e-4, atol=1e-4)

    # ComfyUI's own LoRA loader on the tiny base: every key mapped, the weights patched to W + s·ΔW
    base = build_preset_state_dict("tiny")
    save_file(base, str(tmp_path / "base.safetensors"))
    job = {"base": str(tmp_path / "base.safetensors"), "lora": str(lora_path), "strength": 0.75,
           "out": str(tmp_path / "patched.safetensors"), "unet_config": TINY_COMFY_CONFIG}
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COMFYUI_DIR": str(comfyui_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout.strip().splitlines()[-1])
    lora = read_lora(lora_path)
    assert result["model_class"] == "HunyuanVideo" and result["not_loaded"] == []
    assert len(result["patched_keys"]) == len(lora.modules) == 20
    ours = load_hunyuan_dit("preset:tiny", dtype=torch.float32)
    merge_into_model(ours, lora, 0.75)
    mods = dict(ours.named_modules())
    patched = load_file(job["out"])
    for name in lora.modules:
        key = _comfy_name(name) + ".weight"
        assert not torch.equal(patched[key], base[name + ".weight"])
        torch.testing.assert_close(patched[key], mods[name].weight.detach(), rtol=1e-6, atol=1e-6)


def _comfy_name(name: str) -> str:
    """ComfyUI's native spelling of an official HunyuanVideo block Linear (its process_unet_state_dict renames)."""
    for old, new in (("_attn_qkv", "_attn.qkv"), ("_attn_proj", "_attn.proj"), ("_mlp.fc1", "_mlp.0"),
                     ("_mlp.fc2", "_mlp.2"), ("_mod.linear", "_mod.lin"), ("modulation.linear", "modulation.lin")):
        name = name.replace(old, new)
    return name
