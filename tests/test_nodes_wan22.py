"""Wan 2.2 through the Wan nodes in a real ComfyUI on the tiny presets: an A14B expert pair (Musubi Wan 2.2 Experts)
sampled as the engine samples it, in both memory modes; I2V experts without CLIP; TI2V-5B text- and image-to-video
with the Wan 2.2 VAE (48 channels, 16x) and its LATENT / fps; refusals before any model call."""

import pytest
import torch

pytestmark = pytest.mark.comfy
W, H, F = 64, 64, 5     # TI2V-5B needs multiples of 32 (patch 2 x VAE stride 16)


def _loaders(dits: dict, vae="preset:tiny-vae"):
    p = {nid: {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": name, "dtype": "fp32",
                                                              "attention": "sdpa"}} for nid, name in dits.items()}
    p.update({
        "2": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
        "3": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": vae, "dtype": "fp32", "cache_on_cpu": False}},
        "5": {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a cat",
                                                              "negative_prompt": "blurry", "offload_after": True}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0x3366AA}},
    })
    return p


def _experts(mode="both", boundary=0.0, high="1", low="11"):
    return {"class_type": "MusubiWan22Experts", "inputs": {"high_noise_model": [high, 0], "low_noise_model": [low, 0],
                                                           "boundary": boundary, "memory_mode": mode}}


def _sampler(model, image_embeds=None, **changes):
    inputs = {"model": [model, 0], "embeds": ["5", 0], "width": W, "height": H, "frames": F, "steps": 4,
              "guidance_scale": 3.0, "shift": 0.0, "solver": "euler", "seed": 1, "noise_device": "cpu", **changes}
    if image_embeds:
        inputs["image_embeds"] = [image_embeds, 0]
    return {"class_type": "MusubiWanSampler", "inputs": inputs}


def _decode(src, key="latents"):
    return {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], key: [src, int(key == "latent")],
                                                           "tile_size": 0,
                                                           "tile_overlap": 64}}


def _request(comfy, **fields):
    pipeline = comfy.pack_module("engine.families.wan.pipeline")
    embeds = comfy.output("5")
    return pipeline.WanGenerateRequest(context=embeds["context"], negative_context=embeds["negative_context"],
                                       width=W, height=H, frames=F, steps=4, solver="euler", seed=1, **fields)


def test_a14b_expert_pair_samples_as_the_engine_in_both_memory_modes(comfy):
    experts = comfy.pack_module("engine.families.wan.experts")
    generate = comfy.pack_module("engine.families.wan.pipeline").generate

    p = _loaders({"1": "preset:tiny-t2v-a14b-high-noise", "11": "preset:tiny-t2v-a14b-low-noise"})
    p["12"] = _experts()
    p["8"] = _sampler("12", guidance_scale_high=4.5)
    p["9"] = _decode("8")
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    p["13"] = _experts("offload", boundary=0.7)
    p["14"] = _sampler("13")
    p["15"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 1]}}
    comfy.run(p)

    high, low = comfy.module("1"), comfy.module("11")
    assert (high.config.expert, low.config.expert) == ("high", "low")
    lat = comfy.output("8")["samples"]
    expected = generate(experts.WanExperts(low=low, high=high),
                        _request(comfy, task="t2v", guidance_scale=3.0, guidance_scale_high=4.5))
    torch.testing.assert_close(lat, expected.float().cpu(), rtol=1e-5, atol=1e-5)
    single = generate(low, _request(comfy, task="t2v", guidance_scale=3.0))
    assert not torch.allclose(lat, single.float().cpu(), atol=1e-4)        # the high expert ran some steps
    assert comfy.output("8")["fps"] == 16.0 and comfy.output("9").shape == (F, H, W, 3)

    # offload mode, boundary 0.7, the high-noise scale left at the T2V default (4.0): the same as the engine's
    offloaded = generate(experts.WanExperts(low=low, high=high, boundary=0.7, mode="offload"),
                         _request(comfy, task="t2v", guidance_scale=3.0))
    torch.testing.assert_close(comfy.output("14")["samples"], offloaded.float().cpu(), rtol=1e-5, atol=1e-5)
    steps = [c for c in comfy.progress_calls if c[0] == "14"]
    assert steps[-1][1:] == (4, 4)


def test_a_lora_on_one_expert_only(comfy, lora_files):
    """Apply LoRA on the high-noise DiT before pairing: the pair samples with that view, the low expert and the
    shared high model stay as they were."""
    experts = comfy.pack_module("engine.families.wan.experts")
    generate = comfy.pack_module("engine.families.wan.pipeline").generate

    p = _loaders({"1": "preset:tiny-t2v-a14b-high-noise", "11": "preset:tiny-t2v-a14b-low-noise"})
    p["20"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": lora_files["a"]}}
    p["21"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["20", 0], "strength": 0.8,
                                                           "mode": "adapter", "block_filter": ""}}
    p["12"] = _experts(high="21")
    p["8"] = _sampler("12")
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    comfy.run(p)
    high, view, low = comfy.module("1"), comfy.module("21"), comfy.module("11")
    assert view is not high
    request = _request(comfy, task="t2v", guidance_scale=3.0)
    with_lora = generate(experts.WanExperts(low=low, high=view), request)
    torch.testing.assert_close(comfy.output("8")["samples"], with_lora.float().cpu(), rtol=1e-5, atol=1e-5)
    plain = generate(experts.WanExperts(low=low, high=high), request)
    assert not torch.allclose(with_lora, plain, atol=1e-4)


def test_i2v_experts_take_no_clip(comfy):
    experts = comfy.pack_module("engine.families.wan.experts")
    pipeline = comfy.pack_module("engine.families.wan.pipeline")

    p = _loaders({"1": "preset:tiny-i2v-a14b-high-noise", "11": "preset:tiny-i2v-a14b-low-noise"})
    p["7"] = {"class_type": "MusubiWanImageEncode", "inputs": {"vae": ["3", 0], "start_image": ["6", 0],
                                                               "width": W, "height": H, "frames": F}}
    p["12"] = _experts()
    p["8"] = _sampler("12", "7")
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    comfy.run(p)
    embeds = comfy.output("7")
    assert embeds["clip_fea"] is None and embeds["conditioning"].y.shape == (20, 2, H // 8, W // 8)
    pair = experts.WanExperts(low=comfy.module("11"), high=comfy.module("1"))
    expected = pipeline.generate(pair, _request(comfy, task="i2v", guidance_scale=3.0,
                                                conditioning=embeds["conditioning"]))
    torch.testing.assert_close(comfy.output("8")["samples"], expected.float().cpu(), rtol=1e-5, atol=1e-5)


def test_ti2v_5b_text_and_image_to_video_with_the_wan22_vae(comfy):
    pipeline = comfy.pack_module("engine.families.wan.pipeline")
    vae22 = comfy.pack_module("engine.families.wan.vae22")

    p = _loaders({"1": "preset:tiny-ti2v-5b"}, vae="preset:tiny-vae22")
    p["7"] = {"class_type": "MusubiWanImageEncode", "inputs": {"vae": ["3", 0], "start_image": ["6", 0],
                                                               "width": W, "height": H, "frames": F}}
    p["8"] = _sampler("1", guidance_scale=5.0)                                   # T2V
    p["9"] = _decode("8")
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    p["18"] = _sampler("1", "7", guidance_scale=5.0)                             # I2V
    p["19"] = _decode("18", key="latent")                                        # through ComfyUI's LATENT
    p["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["19", 0]}}
    comfy.run(p)

    model, vae = comfy.module("1"), comfy.module("3")
    t2v = comfy.output("8")
    assert t2v["samples"].shape == (1, 48, 2, H // 16, W // 16) and t2v["fps"] == 24.0
    expected = pipeline.generate(model, _request(comfy, task="t2v", guidance_scale=5.0))
    torch.testing.assert_close(t2v["samples"], expected.float().cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(comfy.output("8", 1)["samples"], vae22.to_raw_latents(t2v["samples"]))
    assert comfy.output("9").shape == (F, H, W, 3) and comfy.output("9", 1) == 24.0

    cond = comfy.output("7")["conditioning"]
    assert cond.kind == "ti2v" and comfy.output("7")["clip_fea"] is None
    i2v = comfy.output("18")["samples"]
    torch.testing.assert_close(i2v[:, :, :1], cond.first_frame[None])           # the start image kept clean
    expected = pipeline.generate(model, _request(comfy, task="i2v", guidance_scale=5.0, conditioning=cond))
    torch.testing.assert_close(i2v, expected.float().cpu(), rtol=1e-5, atol=1e-5)
    video = vae.decode(i2v, tile_size=None, tile_overlap=None)
    torch.testing.assert_close(comfy.output("19"), ((video + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)
                               .flatten(0, 1), rtol=1e-4, atol=1e-4)
    assert comfy.output("19", 1) == 24.0


def test_refusals_before_any_model_call(comfy):
    # the two experts in each other's slots: their names say so
    p = _loaders({"1": "preset:tiny-t2v-a14b-high-noise", "11": "preset:tiny-t2v-a14b-low-noise"})
    p["12"] = _experts(high="11", low="1")
    p["13"] = {"class_type": "PreviewAny", "inputs": {"source": ["12", 0]}}
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("low-noise expert: got 'tiny-t2v-a14b-high-noise"), comfy.error_message()
    assert "swap the two inputs" in comfy.error_message()

    # a Wan 2.1 I2V model (with its CLIP branch) paired with an A14B I2V expert
    p = _loaders({"1": "preset:tiny-i2v-a14b-high-noise", "11": "preset:tiny-i2v"})
    p["12"] = _experts()
    p["13"] = {"class_type": "PreviewAny", "inputs": {"source": ["12", 0]}}
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("high-noise expert: got 'tiny-i2v-a14b-high-noise"), comfy.error_message()
    assert "has_image_input" in comfy.error_message()

    # the high-noise scale on a single model
    p = _loaders({"1": "preset:tiny-t2v"})
    p["8"] = _sampler("1", guidance_scale_high=4.0)
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("guidance_scale_high: got 4.0"), comfy.error_message()

    # 48-channel TI2V latents given to the Wan 2.1 VAE
    p = _loaders({"1": "preset:tiny-ti2v-5b"}, vae="preset:tiny-vae22")
    p["8"] = _sampler("1", steps=1)
    p["30"] = {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                              "cache_on_cpu": False}}
    p["9"] = {**_decode("8"), "inputs": {**_decode("8")["inputs"], "vae": ["30", 0]}}
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("latents: got '48-channel latents'"), comfy.error_message()


def test_lazy_experts_load_at_their_first_step_and_leave_nothing_loaded(comfy):
    """Musubi Wan 2.2 Experts Loader (lazy): nothing loads at the node; the sampler reads each expert from its file
    when its steps come and frees it after; the latents are those of the same pair loaded up front."""
    import gc
    import weakref

    experts = comfy.pack_module("engine.families.wan.experts")
    pipeline = comfy.pack_module("engine.families.wan.pipeline")
    loader = comfy.pack_module("engine.families.wan.loader")

    p = _loaders({})
    p["12"] = {"class_type": "MusubiWan22LazyExperts", "inputs": {
        "high_noise_name": "preset:tiny-t2v-a14b-high-noise", "low_noise_name": "preset:tiny-t2v-a14b-low-noise",
        "dtype": "fp32", "attention": "sdpa", "fp8": "none", "blocks_to_swap": 0, "boundary": 0.0}}
    p["8"] = _sampler("12")
    p["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["8", 1]}}
    loaded = []
    real = loader.load_wan_dit

    def spy(source, *args, **kwargs):
        model = real(source, *args, **kwargs)
        loaded.append((source, weakref.ref(model)))
        return model

    loader.load_wan_dit = spy
    try:
        comfy.run(p)
    finally:
        loader.load_wan_dit = real
    pair = comfy.output("12")
    assert pair.mode == "lazy" and [s for s, _ in loaded] == ["preset:tiny-t2v-a14b-high-noise",
                                                               "preset:tiny-t2v-a14b-low-noise"]
    gc.collect()
    assert all(ref() is None for _, ref in loaded)                  # both freed after their last step
    f32 = dict(dtype=torch.float32)
    eager = experts.WanExperts(low=real("preset:tiny-t2v-a14b-low-noise", **f32),
                               high=real("preset:tiny-t2v-a14b-high-noise", **f32))
    expected = pipeline.generate(eager, _request(comfy, task="t2v", guidance_scale=3.0))
    torch.testing.assert_close(comfy.output("8")["samples"], expected.float().cpu(), rtol=1e-5, atol=1e-5)

    # swapped files: refused at the node, before anything loads
    p["12"]["inputs"].update({"high_noise_name": "preset:tiny-t2v-a14b-low-noise",
                              "low_noise_name": "preset:tiny-t2v-a14b-high-noise"})
    comfy.run(p, expect_success=False)
    assert comfy.error_message().startswith("low-noise expert: got 'tiny-t2v-a14b-high-noise"), comfy.error_message()
