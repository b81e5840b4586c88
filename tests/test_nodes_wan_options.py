"""Wan node options a demanding user sets (#19 item 4) in a real ComfyUI: fp8 umT5 storage, sampler batch size,
aspect-preserving resize of conditioning images."""

import pytest
import torch

pytestmark = pytest.mark.comfy


def test_umt5_loader_fp8_storage_encodes_close_to_bf16(comfy):
    p = {}
    for i, dtype in ((1, "bf16"), (2, "fp8_e4m3fn")):
        p[f"{i}"] = {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": dtype}}
        p[f"{i}0"] = {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": [f"{i}", 0], "prompt": "a cat",
                                                                     "negative_prompt": "", "offload_after": True}}
        p[f"{i}1"] = {"class_type": "PreviewAny", "inputs": {"source": [f"{i}0", 0]}}
    comfy.run(p)
    Fp8Linear = comfy.pack_module("engine.memory.fp8").Fp8Linear   # the class the pack's loader used
    enc = comfy.module("2")
    assert any(isinstance(m, Fp8Linear) for m in enc.model.modules())
    assert not any(isinstance(m, Fp8Linear) for m in comfy.module("1").model.modules())
    a, b = comfy.output("20")["context"], comfy.output("10")["context"]
    assert a.shape == b.shape and not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def _t2v(seed, batch_size=None):
    p = {
        "1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32",
                                                             "attention": "sdpa"}},
        "2": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
        "3": {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a cat",
                                                              "negative_prompt": "", "offload_after": True}},
        "4": {"class_type": "MusubiWanSampler", "inputs": {
            "model": ["1", 0], "embeds": ["3", 0], "width": 32, "height": 32, "frames": 5, "steps": 3,
            "guidance_scale": 3.0, "shift": 0.0, "solver": "euler", "seed": seed, "noise_device": "cpu"}},
        "5": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                             "cache_on_cpu": False}},
        "6": {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["5", 0], "latents": ["4", 0], "tile_size": 0,
                                                             "tile_overlap": 64}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if batch_size is not None:
        p["4"]["inputs"]["batch_size"] = batch_size
    return p


def test_sampler_batch_size_gives_the_videos_of_consecutive_seeds(comfy):
    comfy.run(_t2v(seed=7, batch_size=2))
    batch, frames = comfy.output("4")["samples"], comfy.output("6")
    assert batch.shape[0] == 2 and frames.shape[0] == 2 * 5          # two videos, decoded one after another
    comfy.run(_t2v(seed=8))
    single = comfy.output("4")["samples"]
    torch.testing.assert_close(batch[1:], single, rtol=1e-5, atol=1e-5)   # video 1 of the batch = seed + 1
    assert not torch.allclose(batch[0], batch[1])


def test_image_encode_resize_mode_crop_equals_a_centre_cropped_image(comfy):
    """A 2:1 start image fitted to a square: crop = the centre square as given; pad and stretch differ from it."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[8:24, 24:40] = 255                                   # a white square in the middle
    wide[:, :8] = (200, 30, 30)                               # a red band on the far left (cropped away)
    inputs = Path(comfy.b.folder_paths.get_input_directory())
    inputs.mkdir(parents=True, exist_ok=True)
    Image.fromarray(wide).save(inputs / "wide.png")
    Image.fromarray(wide[:, 16:48]).save(inputs / "centre.png")
    p = {"1": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                             "cache_on_cpu": False}},
         "2": {"class_type": "MusubiClipVisionLoader", "inputs": {"clip_name": "preset:tiny-clip", "dtype": "fp32"}}}
    for node, image, mode in (("3", "wide.png", "crop"), ("4", "centre.png", "stretch"), ("5", "wide.png", "pad"),
                              ("6", "wide.png", "stretch")):
        p[f"{node}0"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        p[node] = {"class_type": "MusubiWanImageEncode", "inputs": {
            "vae": ["1", 0], "clip_vision": ["2", 0], "start_image": [f"{node}0", 0], "width": 32, "height": 32,
            "frames": 5, "resize_mode": mode}}
        p[f"{node}1"] = {"class_type": "PreviewAny", "inputs": {"source": [node, 0]}}
    comfy.run(p)
    y = {n: comfy.output(n)["conditioning"].y for n in "3456"}
    torch.testing.assert_close(y["3"], y["4"], rtol=0, atol=1e-6)
    torch.testing.assert_close(comfy.output("3")["clip_fea"], comfy.output("4")["clip_fea"], rtol=0, atol=1e-5)
    assert not torch.allclose(y["5"], y["3"], atol=1e-3) and not torch.allclose(y["6"], y["3"], atol=1e-3)


def test_dit_loader_fp8_scale_dtype_bf16_halves_the_scales_and_needs_fp8(comfy):
    p = {"1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32",
                                                              "attention": "sdpa", "fp8": "scaled",
                                                              "fp8_scale_dtype": "bf16"}},
         "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    comfy.run(p)
    Fp8Linear = comfy.pack_module("engine.memory.fp8").Fp8Linear
    scales = {m.scale_weight.dtype for m in comfy.module("1").modules() if isinstance(m, Fp8Linear)}
    assert scales == {torch.bfloat16}
    p["1"]["inputs"]["fp8"] = "none"
    comfy.run(p, expect_success=False)
    assert "fp8_scale_dtype" in comfy.error_message()
