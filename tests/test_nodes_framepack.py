"""The FramePack node file (nodes/framepack.py) in a real ComfyUI on the tiny presets: section sampling (per-section
prompts and start images, end image), one-frame inference with a masked control (kisekaeichi), the per-section
decode, refusals before heavy work, and a LoRA trained from the generic data/training nodes on FramePack caches with
a FramePack validation sample."""

import pytest
import torch

pytestmark = pytest.mark.comfy
W, H = 32, 32
LWS = 2          # 2 latent frames per section: a 2-section video is 5 latents, 17 frames


def _base():
    return {
        "1": {"class_type": "MusubiFramePackDiTLoader",
              "inputs": {"model_name": "preset:tiny", "dtype": "fp32", "attention": "sdpa"}},
        "2": {"class_type": "MusubiFramePackTextEncoderLoader",
              "inputs": {"llm_name": "preset:tiny-llava-llama", "clip_name": "preset:tiny-clip-l", "dtype": "fp32",
                         "fp8_llm": False}},
        "3": {"class_type": "MusubiFramePackVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32"}},
        "4": {"class_type": "MusubiFramePackImageEncoderLoader",
              "inputs": {"image_encoder_name": "preset:tiny-siglip", "dtype": "fp32"}},
        "5": {"class_type": "MusubiFramePackTextEncode", "inputs": {
            "text_encoder": ["2", 0], "prompt": "0:a cat sits;;;-1:a cat jumps", "negative_prompt": "blurry",
            "offload_after": True}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1, "color": 0x3366AA}},
        "7": {"class_type": "MusubiFramePackImageEncode", "inputs": {
            "vae": ["3", 0], "clip_vision": ["4", 0], "start_image": ["6", 0], "width": W, "height": H}},
    }


def _sampler(**changes):
    return {"class_type": "MusubiFramePackSampler", "inputs": {
        "model": ["1", 0], "embeds": ["5", 0], "image_embeds": ["7", 0], "video_seconds": 5.0, "sections": 2,
        "latent_window_size": LWS, "steps": 2, "embedded_guidance": 10.0, "guidance_scale": 1.0,
        "guidance_rescale": 0.0, "shift": 0.0, "solver": "euler", "f1": False, "seed": 3, "noise_device": "cpu",
        **changes}}


def _decode(src, mode="sections", **tiling):
    return {"class_type": "MusubiFramePackVAEDecode", "inputs": {
        "vae": ["3", 0], "latents": [src, 0], "mode": mode, "tile_size": 0, "tile_overlap": 64, "temporal_tile": 0,
        "temporal_overlap": 16, **tiling}}


def _pixels(color: int, width=48, height=40) -> torch.Tensor:
    """What EmptyImage makes of `color`, as the engine takes images: [3, H, W] in [-1, 1]."""
    rgb = torch.tensor([(color >> 16) & 0xFF, (color >> 8) & 0xFF, color & 0xFF]) / 255.0
    return (rgb.view(3, 1, 1).expand(3, height, width) * 2 - 1).float()


def _engine(comfy, sub):
    """An engine module as the pack imported it (its classes are the ones the nodes' values are made of)."""
    return comfy.pack_module("engine." + sub)


def _prompt(comfy, embeds_section):
    FramePackPrompt = _engine(comfy, "families.framepack.pipeline").FramePackPrompt
    return FramePackPrompt(embeds_section["context"], embeds_section["pooled"])


def test_section_sampling_matches_the_engine_with_section_prompts_images_and_decode(comfy):
    fp = _engine(comfy, "families.framepack.pipeline")
    FramePackGenerateRequest, decode_sections, generate, prepare_image = (
        fp.FramePackGenerateRequest, fp.decode_sections, fp.generate, fp.prepare_image)
    from_latent = _engine(comfy, "families.hunyuan.vae").from_latent

    p = _base()
    p["10"] = {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1, "color": 0xCC2222}}
    p["11"] = {"class_type": "MusubiFramePackImageEncode", "inputs": {
        "vae": ["3", 0], "clip_vision": ["4", 0], "start_image": ["10", 0], "width": W, "height": H}}
    p["12"] = {"class_type": "MusubiFramePackSectionImage", "inputs": {"image_embeds": ["11", 0], "section": "1"}}
    p["8"] = _sampler(section_images=["12", 0])
    p["9"] = _decode("8")
    p["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    p["14"] = _decode("8", mode="bulk", tile_size=32, tile_overlap=16)
    p["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["14", 0]}}
    p["16"] = _sampler(guidance_scale=2.0, guidance_rescale=0.5, f1=True, seed=4, shift=3.0)   # CFG, F1
    p["17"] = {"class_type": "PreviewAny", "inputs": {"source": ["16", 1]}}
    comfy.run(p)

    vae, siglip, model = comfy.module("3"), comfy.module("4"), comfy.module("1")
    cond = comfy.output("7")
    assert cond["family"] == "framepack" and (cond["width"], cond["height"]) == (W, H)
    want = prepare_image(vae, siglip, _pixels(0x3366AA), W, H)      # the engine on the same image, same size
    torch.testing.assert_close(cond["conditioning"].latent, want.latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["conditioning"].embeddings, want.embeddings, rtol=1e-5, atol=1e-5)
    red = comfy.output("11")["conditioning"]

    embeds = comfy.output("5")
    sits, jumps = (_prompt(comfy, v) for _, v in embeds["sections"])
    assert [s for s, _ in embeds["sections"]] == ["0", "-1"]
    assert not torch.equal(sits.context, jumps.context)
    torch.testing.assert_close(embeds["context"], sits.context)          # section 0's: what Validation Prompt takes

    lat = comfy.output("8")["samples"]
    assert lat.shape == (1, 16, 2 * LWS + 1, H // 8, W // 8) and torch.isfinite(lat).all()
    request = dict(width=W, height=H, sections=2, latent_window_size=LWS, steps=2, solver="euler", seed=3)
    # section 0 (time order) has the first prompt and the blue start image, section 1 the last prompt and red
    expected = generate(model, FramePackGenerateRequest(prompt=[sits, jumps], image=[cond["conditioning"], red],
                                                        **request))
    torch.testing.assert_close(lat, expected.float().cpu(), rtol=1e-5, atol=1e-5)
    swapped = generate(model, FramePackGenerateRequest(prompt=[jumps, sits], image=[red, cond["conditioning"]],
                                                       **request))
    assert not torch.allclose(lat, swapped.float().cpu(), atol=1e-4)
    hv = __import__("importlib").import_module("comfy.latent_formats").HunyuanVideo()
    torch.testing.assert_close(comfy.output("8", 1)["samples"], from_latent(lat))
    torch.testing.assert_close(hv.process_in(comfy.output("8", 1)["samples"]), lat, rtol=1e-5, atol=1e-5)
    steps = [c for c in comfy.progress_calls if c[0] == "8"]
    assert steps[-1][1:] == (4, 4)                                      # 2 sections x 2 steps on one bar

    negative = _prompt(comfy, {"context": embeds["negative_context"], "pooled": embeds["negative_pooled"]})
    cfg = generate(model, FramePackGenerateRequest(
        prompt=[sits, jumps], image=cond["conditioning"], negative_prompt=negative, guidance_scale=2.0,
        guidance_rescale=0.5, f1=True, shift=3.0, **{**request, "seed": 4}))
    torch.testing.assert_close(comfy.output("16")["samples"], cfg.float().cpu(), rtol=1e-5, atol=1e-5)
    assert comfy.output("16")["task"] == "f1"

    images, fps = comfy.output("9"), comfy.output("9", 1)
    assert images.shape == (4 * 2 * LWS + 1, H, W, 3) and fps == 30.0
    video = decode_sections(vae, lat, LWS, tile_size=0, temporal_tile=0)
    torch.testing.assert_close(images, ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1).flatten(0, 1),
                               rtol=1e-4, atol=1e-4)
    bulk = decode_sections(vae, lat, LWS, bulk=True, tile_size=32, tile_overlap=16, temporal_tile=0)
    torch.testing.assert_close(comfy.output("14"), ((bulk + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
                               .flatten(0, 1), rtol=1e-4, atol=1e-4)


def test_end_image_reaches_the_original_schedule(comfy):
    fp = _engine(comfy, "families.framepack.pipeline")
    FramePackGenerateRequest, generate = fp.FramePackGenerateRequest, fp.generate

    p = _base()
    p["5"]["inputs"]["prompt"] = "a cat"
    p["10"] = {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0x22CC22}}
    p["7"]["inputs"]["end_image"] = ["10", 0]
    p["8"] = _sampler(sections=0, video_seconds=0.6, latent_paddings="1,0")    # 0.6 s at lws 2: 2 sections
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    p["20"] = {"class_type": "MusubiMagCache", "inputs": {"mag_ratios": "1.0", "retention_ratio": 0.2,
                                                          "threshold": 0.24, "max_skips": 3, "calibrate": False}}
    p["21"] = _sampler(sections=2, steps=6, magcache=["20", 0])
    p["22"] = {"class_type": "PreviewAny", "inputs": {"source": ["21", 1]}}
    comfy.run(p)
    cond, embeds = comfy.output("7"), comfy.output("5")
    assert cond["end_image"].latent.shape == (16, 1, H // 8, W // 8) and cond["end_image"].embeddings is None
    request = dict(prompt=_prompt(comfy, embeds), image=cond["conditioning"], end_image=cond["end_image"],
                   sections=2, latent_window_size=LWS, solver="euler", seed=3)
    expected = generate(comfy.module("1"), FramePackGenerateRequest(latent_paddings=[1, 0], steps=2, **request))
    torch.testing.assert_close(comfy.output("8")["samples"], expected.float().cpu(), rtol=1e-5, atol=1e-5)

    # MagCache, fresh every section: steps 1..4 of 6 skippable (retention 0.2, never the last), 3 in a row at most
    MagCacheConfig = _engine(comfy, "sampling.magcache").MagCacheConfig
    cached = generate(comfy.module("1"), FramePackGenerateRequest(
        steps=6, magcache=MagCacheConfig([1.0], max_skips=3), **request))
    torch.testing.assert_close(comfy.output("21")["samples"], cached.float().cpu(), rtol=1e-5, atol=1e-5)
    assert ("21", "MagCache skipped 6 of 12 block passes") in comfy.server.texts


def test_kisekaeichi_one_frame_with_a_mask(comfy):
    import numpy as np

    fp = _engine(comfy, "families.framepack.pipeline")
    FramePackGenerateRequest, decode_sections, generate, prepare_image = (
        fp.FramePackGenerateRequest, fp.decode_sections, fp.generate, fp.prepare_image)
    sections = _engine(comfy, "families.framepack.sections")
    latent_mask, parse_one_frame_options = sections.latent_mask, sections.parse_one_frame_options

    p = _base()
    p["5"]["inputs"]["prompt"] = "the woman wears the red dress"
    p["10"] = {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0xCC2222}}
    p["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": W, "height": H}}
    p["21"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": W // 2, "height": H}}
    p["22"] = {"class_type": "MaskComposite", "inputs": {"destination": ["20", 0], "source": ["21", 0], "x": 0,
                                                         "y": 0, "operation": "add"}}   # left half ignored
    p["23"] = {"class_type": "MusubiFramePackControlImage", "inputs": {"vae": ["3", 0], "image": ["6", 0],
                                                                       "width": W, "height": H, "mask": ["22", 0]}}
    p["24"] = {"class_type": "MusubiFramePackControlImage", "inputs": {"vae": ["3", 0], "image": ["10", 0],
                                                                       "width": W, "height": H,
                                                                       "previous": ["23", 0]}}
    p["8"] = {"class_type": "MusubiFramePackOneFrameSampler", "inputs": {
        "model": ["1", 0], "embeds": ["5", 0], "image_embeds": ["7", 0], "target_index": 1, "control_index": "0;10",
        "no_post": True, "no_2x": True, "no_4x": True, "latent_window_size": 9, "steps": 2, "embedded_guidance": 10.0,
        "guidance_scale": 1.0, "guidance_rescale": 0.0, "shift": 0.0, "solver": "unipc", "seed": 5,
        "noise_device": "cpu", "control_images": ["24", 0]}}
    p["9"] = _decode("8")
    p["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)

    vae, model = comfy.module("3"), comfy.module("1")
    controls = comfy.output("24")["controls"]
    assert len(controls) == 2 and controls[1][1] is None
    mask = np.zeros((H, W), np.uint8)
    mask[:, W // 2:] = 255                                         # Load Image's convention: 1 = ignored
    torch.testing.assert_close(controls[0][1], latent_mask(mask, (H // 8, W // 8)))
    c0 = prepare_image(vae, None, _pixels(0x3366AA), W, H).latent
    c1 = prepare_image(vae, None, _pixels(0xCC2222, W, H), W, H).latent
    torch.testing.assert_close(controls[0][0], c0, rtol=1e-5, atol=1e-5)
    expected = generate(model, FramePackGenerateRequest(
        prompt=_prompt(comfy, comfy.output("5")), image=comfy.output("7")["conditioning"], width=W, height=H, steps=2,
        seed=5, one_frame=parse_one_frame_options("target_index=1,control_index=0;10,no_post,no_2x,no_4x"),
        control_latents=[c0, c1], control_masks=[controls[0][1], None]))
    lat = comfy.output("8")["samples"]
    assert lat.shape == (1, 16, 1, H // 8, W // 8)
    torch.testing.assert_close(lat, expected.float().cpu(), rtol=1e-5, atol=1e-5)
    unmasked = generate(model, FramePackGenerateRequest(
        prompt=_prompt(comfy, comfy.output("5")), image=comfy.output("7")["conditioning"], width=W, height=H, steps=2,
        seed=5, one_frame=parse_one_frame_options("target_index=1,control_index=0;10,no_post,no_2x,no_4x"),
        control_latents=[c0, c1]))
    assert not torch.allclose(lat, unmasked.float().cpu(), atol=1e-4)     # the mask reached the control
    video = decode_sections(vae, lat, one_frame=True, tile_size=0, temporal_tile=0)
    torch.testing.assert_close(comfy.output("9"), ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
                               .flatten(0, 1), rtol=1e-4, atol=1e-4)


def test_spec_outside_the_video_is_refused_before_sampling(comfy):
    p = _base()
    p["5"]["inputs"]["prompt"] = "0:a cat;;;5:a dog"
    p["8"] = _sampler()
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert msg.startswith("section SPEC: got '5'") and "2 sections" in msg, msg
    assert not [c for c in comfy.progress_calls if c[0] == "8"]

    p["5"]["inputs"]["prompt"] = "0:a cat;;;dog:a dog"               # malformed: refused by the encode node
    comfy.run(p, expect_success=False)
    assert "section string part" in comfy.error_message(), comfy.error_message()


def _in_folder(comfy, key, folder):
    comfy.b.folder_paths.add_model_folder_path(key, str(folder))


def _out_of_folder(comfy, key, folder):
    comfy.b.folder_paths.folder_names_and_paths[key][0].remove(str(folder))


def test_hunyuan_dit_file_in_the_framepack_loader_is_refused(comfy, tmp_path):
    from engine.families.hunyuan.presets import write_preset_checkpoint

    write_preset_checkpoint("tiny", tmp_path / "hunyuan_video_tiny.safetensors")
    _in_folder(comfy, "diffusion_models", tmp_path)
    try:
        p = _base()
        p["1"]["inputs"]["model_name"] = "hunyuan_video_tiny.safetensors"
        p["9"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                 "passthrough": ["1", 0]}}
        comfy.run(p, expect_success=False)
        msg = comfy.error_message()
        assert "hunyuan_video_tiny.safetensors" in msg and "HunyuanVideo" in msg, msg
    finally:
        _out_of_folder(comfy, "diffusion_models", tmp_path)


def test_other_family_values_are_refused_naming_the_input(comfy):
    p = _base()
    p["30"] = {"class_type": "MusubiHunyuanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32"}}
    p["7"]["inputs"]["vae"] = ["30", 0]
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("vae: got \"a model of family 'hunyuan'\""), comfy.error_message()

    p["7"]["inputs"]["vae"] = ["3", 0]                              # Wan's CLIP vision is not FramePack's SigLIP
    p["31"] = {"class_type": "MusubiClipVisionLoader", "inputs": {"clip_name": "preset:tiny-clip", "dtype": "fp32"}}
    p["7"]["inputs"]["clip_vision"] = ["31", 0]
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("clip_vision: got \"a model of family 'wan'\""), comfy.error_message()


# --- training from the generic nodes ---------------------------------------------------------------------------
FRAMES = 37     # one section of the default window (9 latents) + the start frame: the dataset's smallest video


def test_train_on_framepack_caches_with_a_validation_sample_then_generate(comfy, tmp_path):
    get_family = _engine(comfy, "families").get_family

    p = _base()
    p["5"]["inputs"].update({"prompt": "a red square", "negative_prompt": ""})
    p["6"]["inputs"].update({"width": W, "height": H, "color": 0xCC2222})
    p.update({
        "20": {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": FRAMES,
                                                      "color": 0xCC2222}},
        "21": {"class_type": "MusubiDatasetFromImages", "inputs": {
            "images": ["20", 0], "captions": "a red square", "width": W, "height": H, "num_repeats": 1,
            "as_video": True, "cache_directory": str(tmp_path / "cache"), "batch_size": 1}},
        "22": {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["21", 0], "vae": ["3", 0], "task": "i2v",
                                                              "keep_cache": False, "workers": 0,
                                                              "clip_vision": ["4", 0]}},
        "23": {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["22", 0], "text_encoder": ["2", 0],
                                                                     "keep_cache": False}},
        "24": {"class_type": "MusubiLoRAConfig", "inputs": {"network_kind": "lora", "rank": 4, "alpha": 4.0,
                                                            "dropout": 0.0, "rank_dropout": 0.0,
                                                            "module_dropout": 0.0}},
        "25": {"class_type": "MusubiOptimizerConfig", "inputs": {"optimizer_type": "AdamW", "learning_rate": 3e-3,
                                                                 "max_grad_norm": 1.0, "lr_scheduler": "constant",
                                                                 "lr_warmup_steps": "0"}},
        "26": {"class_type": "MusubiValidationPrompt", "inputs": {
            "embeds": ["5", 0], "image_embeds": ["7", 0], "width": W, "height": H, "frames": 1, "seed": 3,
            "steps": 2, "guidance_scale": 0.0, "shift": 0.0, "embedded_guidance": 0.0}},
        "27": {"class_type": "MusubiInitTraining", "inputs": {
            "model": ["1", 0], "dataset": ["23", 0], "lora_config": ["24", 0], "optimizer_config": ["25", 0],
            "seed": 1, "max_train_steps": 20, "mixed_precision": "no", "gradient_checkpointing": True,
            "gradient_accumulation_steps": 1, "timestep_sampling": "shift", "discrete_flow_shift": 2.0,
            "sigmoid_scale": 1.0, "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
            "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": str(tmp_path), "output_name": "fp_lora",
            "save_state": False, "attention_backend": "model", "validation_prompts": ["26", 0],
            "validation_vae": ["3", 0], "validate_every_n_steps": 4}},
        "28": {"class_type": "MusubiTrainSteps", "inputs": {"session": ["27", 0], "steps": 4}},
        "29": {"class_type": "PreviewImage", "inputs": {"images": ["28", 5]}},
        "31": _sampler(model=["28", 4], sections=1, latent_window_size=9, offload_after=False),
        "32": {"class_type": "PreviewAny", "inputs": {"source": ["31", 1]}},
    })
    comfy.run(p)

    dataset = comfy.output("23")
    assert dataset.family == "framepack" and dataset.latent["image_encoder"] and not dataset.latent["f1"]
    losses = comfy.output("28", 2)["loss"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert comfy.output("28", 5).shape == (FRAMES, H, W, 3)          # the validation sample: one section, decoded
    prompt = comfy.output("26")[0]
    assert prompt.conditioning is comfy.output("7")["conditioning"]   # FramePack's start image passes through
    request = get_family("framepack").sampling_request(prompt).resolve()
    assert request.sections == 1 and request.image[0] is prompt.conditioning and not request.uses_cfg
    assert comfy.output("31")["samples"].shape == (1, 16, 10, H // 8, W // 8)

    q = {k: v for k, v in p.items() if k in ("1", "2", "3", "4", "5", "6", "7", "20", "21", "22")}
    q["22"] = {**q["22"], "inputs": {**q["22"]["inputs"]}}
    del q["22"]["inputs"]["clip_vision"]                             # FramePack caches need the image encoder
    q["40"] = {"class_type": "MusubiDatasetPreview", "inputs": {"dataset": ["22", 0], "max_items": 1,
                                                                "frames_per_clip": 1, "tile_size": 64}}
    comfy.run(q, expect_success=False)
    assert comfy.error_message().startswith("clip_vision: got None"), comfy.error_message()


def test_loaders_read_a_sharded_dit_and_siglip_files_from_comfyuis_folders(comfy, tmp_path):
    """A sharded DiT (any shard loads all of them) and SigLIP as ComfyUI's single file and as a FLUX Redux
    image_encoder folder: each loads the weights the engine loads from the same files."""
    import json

    from safetensors.torch import save_file

    presets = _engine(comfy, "families.framepack.presets")
    siglip = _engine(comfy, "encoders.siglip")
    sd = presets.build_preset_state_dict("tiny")
    keys = sorted(sd)
    shards = tmp_path / "dit" / "FramePackI2V_tiny"
    shards.mkdir(parents=True)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        save_file({k: sd[k] for k in part}, str(shards / f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"))
    vision = tmp_path / "clip_vision"
    (vision / "image_encoder").mkdir(parents=True)
    tiny = siglip.tiny_siglip_state_dict()
    save_file(tiny, str(vision / "sigclip_tiny.safetensors"))
    save_file({k.removeprefix("vision_model."): v for k, v in tiny.items() if not k.startswith("vision_model.head")},
              str(vision / "image_encoder" / "model.safetensors"))
    config = siglip.TINY_SIGLIP.to_transformers().to_dict()
    (vision / "image_encoder" / "config.json").write_text(json.dumps(config))
    _in_folder(comfy, "diffusion_models", tmp_path / "dit")
    _in_folder(comfy, "clip_vision", vision)
    try:
        choices = comfy.input_types()["MusubiFramePackDiTLoader"]["required"]["model_name"][0]
        shard2 = "FramePackI2V_tiny/diffusion_pytorch_model-00002-of-00002.safetensors"
        assert shard2 in choices and choices[-1] == "preset:tiny"            # the user's files before the preset
        p = {"1": {"class_type": "MusubiFramePackDiTLoader",
                   "inputs": {"model_name": shard2, "dtype": "fp32", "attention": "sdpa"}},
             "2": {"class_type": "MusubiFramePackImageEncoderLoader",
                   "inputs": {"image_encoder_name": "sigclip_tiny.safetensors", "dtype": "fp32"}},
             "3": {"class_type": "MusubiFramePackImageEncoderLoader",
                   "inputs": {"image_encoder_name": "image_encoder/model.safetensors", "dtype": "fp32"}}}
        for nid in ("1", "2", "3"):
            p["1" + nid] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                          "passthrough": [nid, 0]}}
        comfy.run(p)
        dit = comfy.module("1")
        assert comfy.output("1").family == "framepack" and dit.family == "framepack"
        for name, tensor in dit.state_dict().items():
            torch.testing.assert_close(tensor.float(), sd[name].float(), msg=name)
        pixels = torch.rand(1, 3, 56, 56) * 2 - 1
        want = siglip.load_siglip("preset:tiny-siglip", dtype=torch.float32).encode(pixels)
        for nid in ("2", "3"):
            assert comfy.output(nid).family == "framepack"
            torch.testing.assert_close(comfy.module(nid).encode(pixels), want)
    finally:
        _out_of_folder(comfy, "diffusion_models", tmp_path / "dit")
        _out_of_folder(comfy, "clip_vision", vision)


def _kisekaeichi_dataset(root):
    """One image item with two masked control images (Musubi's kisekaeichi training layout): the reference at RoPE
    index 0, the clothing at 10, the target at 1, no post latent."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "controls").mkdir()
    Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(root / "images" / "item.png")
    (root / "images" / "item.txt").write_text("the woman wears the red dress")
    for k in range(2):
        rgba = (rng.random((H, W, 4)) * 255).astype(np.uint8)
        rgba[..., 3] = 255
        rgba[:, : W // 2, 3] = 0                                         # left half masked out
        Image.fromarray(rgba, "RGBA").save(root / "controls" / f"item_{k}.png")
    toml = root / "dataset.toml"
    toml.write_text(f"""
[general]
resolution = [{W}, {H}]
caption_extension = ".txt"
batch_size = 1
[[datasets]]
image_directory = "{(root / 'images').as_posix()}"
control_directory = "{(root / 'controls').as_posix()}"
cache_directory = "{(root / 'cache').as_posix()}"
fp_1f_clean_indices = [0, 10]
fp_1f_target_index = 1
fp_1f_no_post = true
""")
    return toml


def test_f1_and_kisekaeichi_one_frame_training_from_the_nodes(comfy, tmp_path):
    """The two other FramePack cache layouts train from the generic nodes: F1 section caches (task f1) and one-frame
    caches without the 2x/4x history (Musubi --one_frame_no_2x --one_frame_no_4x); losses match the engine's
    session on the same caches."""
    import numpy as np

    data = _engine(comfy, "data")
    training = _engine(comfy, "training")
    get_family = _engine(comfy, "families").get_family

    p = _base()
    p.update({
        "20": {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": FRAMES,
                                                      "color": 0x22AA44}},
        "21": {"class_type": "MusubiDatasetFromImages", "inputs": {
            "images": ["20", 0], "captions": "a green square", "width": W, "height": H, "num_repeats": 1,
            "as_video": True, "cache_directory": str(tmp_path / "f1cache"), "batch_size": 1}},
        "22": {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["21", 0], "vae": ["3", 0], "task": "f1",
                                                              "keep_cache": False, "workers": 0,
                                                              "clip_vision": ["4", 0]}},
        "23": {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["22", 0], "text_encoder": ["2", 0],
                                                                     "keep_cache": False}},
        "30": {"class_type": "MusubiDatasetFromTOML",
               "inputs": {"toml_path": str(_kisekaeichi_dataset(tmp_path / "kise"))}},
        "31": {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["30", 0], "vae": ["3", 0], "task": "i2v",
                                                              "keep_cache": False, "workers": 0,
                                                              "clip_vision": ["4", 0], "one_frame_history": "none"}},
        "32": {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["31", 0], "text_encoder": ["2", 0],
                                                                     "keep_cache": False}},
        "24": {"class_type": "MusubiLoRAConfig", "inputs": {"network_kind": "lora", "rank": 4, "alpha": 4.0,
                                                            "dropout": 0.0, "rank_dropout": 0.0,
                                                            "module_dropout": 0.0}},
        "25": {"class_type": "MusubiOptimizerConfig", "inputs": {"optimizer_type": "AdamW", "learning_rate": 3e-3,
                                                                 "max_grad_norm": 1.0, "lr_scheduler": "constant",
                                                                 "lr_warmup_steps": "0"}},
    })
    init = {"model": ["1", 0], "lora_config": ["24", 0], "optimizer_config": ["25", 0], "seed": 1,
            "max_train_steps": 3, "mixed_precision": "no", "gradient_checkpointing": True,
            "gradient_accumulation_steps": 1, "timestep_sampling": "shift", "discrete_flow_shift": 2.0,
            "sigmoid_scale": 1.0, "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
            "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": str(tmp_path),
            "save_state": False, "attention_backend": "model"}
    for nid, dataset in (("26", "23"), ("33", "32")):
        p[nid] = {"class_type": "MusubiInitTraining",
                  "inputs": {**init, "dataset": [dataset, 0], "output_name": f"lora{nid}"}}
        p[str(int(nid) + 1)] = {"class_type": "MusubiTrainSteps", "inputs": {"session": [nid, 0], "steps": 3}}
        p[str(int(nid) + 100)] = {"class_type": "PreviewAny", "inputs": {"source": [str(int(nid) + 1), 2]}}
    comfy.run(p)

    f1, one = comfy.output("23"), comfy.output("32")
    assert f1.latent["f1"] and not f1.latent["no_2x"]
    assert not one.latent["f1"] and one.latent["no_2x"] and one.latent["no_4x"]
    family = get_family("framepack")
    for dataset, steps_node in ((f1, "27"), (one, "34")):
        losses = comfy.output(steps_node, 2)["loss"]
        assert len(losses) == 3 and np.isfinite(losses).all()
        # the engine's session on the same caches, same seed and settings: the same losses
        cached = data.check_cache_for_model(dataset.config, family.cache_requirements(comfy.module("1")))
        batch = next(iter(data.CachedBatchLoader(cached, seed=1)))
        if dataset is one:
            assert batch["clean_latents_2x"] is None and batch["clean_latents_4x"] is None
        session = training.TrainingSession(
            comfy.module("1"), training.NetworkConfig(rank=4, alpha=4),
            training.OptimizerConfig(learning_rate=3e-3, max_grad_norm=1.0),
            data.CachedBatchLoader(cached, seed=1),
            training.TrainingConfig(output_dir=str(tmp_path / "engine"), output_name="e", max_train_steps=3,
                                    mixed_precision="no", seed=1, gradient_checkpointing=True,
                                    timesteps=training.TimestepConfig(timestep_sampling="shift",
                                                                      discrete_flow_shift=2.0)))
        np.testing.assert_allclose(session.train_steps(3), losses, rtol=1e-5)

    q = {k: v for k, v in p.items() if k in ("1", "3", "4", "30")}
    q["40"] = {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                              "cache_on_cpu": False}}
    q["41"] = {**p["31"], "inputs": {**p["31"]["inputs"], "vae": ["40", 0]}}
    del q["41"]["inputs"]["clip_vision"]
    comfy.run(q, expect_success=False)
    assert comfy.error_message().startswith("one_frame_history"), comfy.error_message()
