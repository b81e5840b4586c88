"""The Wan node file (nodes/wan.py) in a real ComfyUI: every Wan task, the workflow embedded in saved videos, clear
errors."""

import importlib
import json
from pathlib import Path

import pytest
import torch

from comfy_harness import REPO_ROOT, ui_to_api

pytestmark = pytest.mark.comfy
W, H, F = 64, 48, 9


def _base(dit_preset):
    return {
        "1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": dit_preset, "dtype": "fp32", "attention": "sdpa"}},
        "2": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
        "3": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}},
        "4": {"class_type": "MusubiClipVisionLoader", "inputs": {"clip_name": "preset:tiny-clip", "dtype": "fp32"}},
        "5": {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a cat", "negative_prompt": "",
                                                              "offload_after": True}},
        "6": {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": F, "color": 0x3366AA}},
    }


def _sampler(frames, embeds_node=None):
    inputs = {"model": ["1", 0], "embeds": ["5", 0], "width": W, "height": H, "frames": frames, "steps": 3,
              "guidance_scale": 5.0, "shift": 0.0, "solver": "euler", "seed": 1, "noise_device": "cpu"}
    if embeds_node:
        inputs["image_embeds"] = [embeds_node, 0]
    return {"class_type": "MusubiWanSampler", "inputs": inputs}


def test_fun_control_generation(comfy):
    p = _base("preset:tiny-fun-control")
    p["7"] = {"class_type": "MusubiWanFunControlEncode", "inputs": {"vae": ["3", 0], "control_video": ["6", 0],
              "width": W, "height": H, "frames": F, "start_image": ["6", 0], "clip_vision": ["4", 0]}}
    p["8"] = _sampler(F, "7")
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0, "tile_overlap": 64}}
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    assert comfy.output("9").shape == (F, H, W, 3)
    assert comfy.output("8")["task"] == "fun_control"


def test_one_frame_generation(comfy):
    p = _base("preset:tiny-i2v")
    p["7"] = {"class_type": "MusubiWanOneFrameEncode", "inputs": {"vae": ["3", 0], "clip_vision": ["4", 0],
              "control_image": ["6", 0], "control_indices": "0", "target_index": 5, "width": W, "height": H}}
    p["8"] = _sampler(1, "7")
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0, "tile_overlap": 64}}
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    assert comfy.output("8")["samples"].shape == (1, 16, 1, H // 8, W // 8)
    assert comfy.output("9").shape == (1, H, W, 3)


def test_one_frame_intermediate_frame_generation_on_flf2v(comfy):
    """FLF2V one-frame inference (control 0;2 -> target 1): the encoder carries both control images' CLIP tokens
    (514, what the FLF2V model takes; it used to carry the first image's 257 and the sampler refused)."""
    p = _base("preset:tiny-flf2v")
    p["6b"] = {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0xAA3322}}
    p["7"] = {"class_type": "MusubiWanOneFrameEncode", "inputs": {"vae": ["3", 0], "clip_vision": ["4", 0],
              "control_image": ["6", 0], "control_image_2": ["6b", 0], "control_indices": "0;2", "target_index": 1,
              "width": W, "height": H}}
    p["8"] = _sampler(1, "7")
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0, "tile_overlap": 64}}
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    embeds = comfy.output("7")
    assert embeds["clip_fea"].shape == (514, 32)
    assert not torch.equal(embeds["clip_fea"][:257], embeds["clip_fea"][257:])   # two different images
    assert comfy.output("8")["samples"].shape == (1, 16, 1, H // 8, W // 8)
    assert comfy.output("9").shape == (1, H, W, 3)

    # one control image: refused naming what the FLF2V model needs
    p["7"]["inputs"].pop("control_image_2")
    p["7"]["inputs"]["control_indices"] = "0"
    comfy.run(p, expect_success=False)
    assert "two control images" in comfy.error_message(), comfy.error_message()


def test_i2v_end_image_extra_frame_and_trim_tail_frames(comfy):
    """Musubi's unofficial end image on a plain I2V model (one extra latent frame: 4 more frames) and
    --trim_tail_frames (dropped after decoding); the FLF2V mode on an I2V model is refused naming the option."""
    p = _base("preset:tiny-i2v")
    p["6b"] = {"class_type": "EmptyImage", "inputs": {"width": W, "height": H, "batch_size": 1, "color": 0xAA3322}}
    p["7"] = {"class_type": "MusubiWanImageEncode", "inputs": {"vae": ["3", 0], "clip_vision": ["4", 0],
              "start_image": ["6", 0], "end_image": ["6b", 0], "end_image_mode": "i2v_extra_frame", "width": W,
              "height": H, "frames": F}}
    p["8"] = _sampler(F, "7")
    p["8"]["inputs"]["trim_tail_frames"] = 3
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0, "tile_overlap": 64}}
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    comfy.run(p)
    embeds = comfy.output("7")
    assert embeds["task"] == "i2v" and embeds["clip_fea"].shape == (257, 32)
    assert embeds["conditioning"].y.shape == (20, (F - 1) // 4 + 2, H // 8, W // 8)
    assert comfy.output("8")["samples"].shape == (1, 16, (F - 1) // 4 + 2, H // 8, W // 8)
    assert comfy.output("9").shape == (F + 4 - 3, H, W, 3)

    p["8"]["inputs"]["trim_tail_frames"] = F + 4          # as many as the video has: refused, input named
    comfy.run(p, expect_success=False)
    assert "trim_tail_frames" in comfy.error_message(), comfy.error_message()

    p["8"]["inputs"]["trim_tail_frames"] = 0
    p["7"]["inputs"]["end_image_mode"] = "flf2v"           # FLF2V conditioning on an I2V model
    comfy.run(p, expect_success=False)
    assert "end_image_mode" in comfy.error_message(), comfy.error_message()


def test_saved_video_embeds_the_workflow(comfy):
    from engine.video_io import read_mp4_metadata

    wf = json.loads((REPO_ROOT / "workflows" / "wan_t2v_generate.json").read_text())
    result = comfy.run_workflow(wf)
    save_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "MusubiSaveVideo")
    item = result["outputs"][save_id]["images"][0]
    path = Path(comfy.b.folder_paths.get_output_directory()) / item["subfolder"] / item["filename"]
    meta = read_mp4_metadata(path)
    assert json.loads(meta["workflow"])["nodes"] == wf["nodes"]   # dropping the video restores the graph
    assert json.loads(meta["prompt"])[save_id]["class_type"] == "MusubiSaveVideo"


@pytest.mark.parametrize("change, needle", [
    (lambda p: p.update({"1": {**p["1"], "inputs": {**p["1"]["inputs"], "model_name": "preset:tiny-i2v"}}}), "image"),
])
def test_bad_input_gives_a_clear_error(comfy, change, needle):
    p = _base("preset:tiny-t2v")
    p["8"] = _sampler(F)
    p["9"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models", "passthrough": ["8", 0]}}
    change(p)
    comfy.run(p, expect_success=False)
    assert not comfy.executor.success
    assert needle in comfy.error_message(), comfy.error_message()


def test_vae_file_in_the_dit_loader_is_refused(comfy, tmp_path):
    """A VAE file put in models/diffusion_models is listed by the loader, then refused with a clear message."""
    from engine.families.wan.vae import write_vae_preset

    write_vae_preset(tmp_path / "wan_2.1_vae.safetensors")
    comfy.b.folder_paths.add_model_folder_path("diffusion_models", str(tmp_path))
    try:
        p = _base("preset:tiny-t2v")
        p["1"]["inputs"]["model_name"] = "wan_2.1_vae.safetensors"
        p["9"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                 "passthrough": ["1", 0]}}
        comfy.run(p, expect_success=False)
        msg = comfy.error_message()
        assert "wan_2.1_vae.safetensors" in msg and "VAE" in msg, msg
    finally:
        comfy.b.folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(tmp_path))


def _t2v_save(seed):
    """A fresh seed per run: ComfyUI would otherwise serve the cached sampler and saver outputs."""
    p = _base("preset:tiny-t2v")
    p["8"] = _sampler(F)
    p["8"]["inputs"]["seed"] = seed
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0, "tile_overlap": 64}}
    p["10"] = {"class_type": "MusubiSaveVideo", "inputs": {"images": ["9", 0], "fps": 16.0,
                                                          "filename_prefix": "musubi/test_settings", "crf": 30}}
    return p


@pytest.mark.parametrize("method", ["none", "latent2rgb", "taesd"])
def test_sampler_previews_follow_the_users_preview_settings(comfy, monkeypatch, method):
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args

    # as ComfyUI started with --preview-method METHOD --preview-size 96 (the module reads the size at import)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod(method))
    monkeypatch.setattr(args, "preview_size", 96)
    monkeypatch.setattr(latent_preview, "MAX_PREVIEW_RESOLUTION", 96)
    comfy.run(_t2v_save(100 + ["none", "latent2rgb", "taesd"].index(method)))
    previews = [p for node, p in comfy.previews if node == "8"]
    if method == "none":
        assert previews == []
        return
    # taesd without a TAEHV file in models/vae_approx falls back to latent2rgb, as in core samplers
    assert len(previews) == 3 and all(p[0] == "JPEG" and p[2] == 96 for p in previews)
    assert previews[-1][1].size == (W // 8, H // 8)


@pytest.mark.parametrize("disabled", [False, True])
def test_save_video_honours_disable_metadata(comfy, monkeypatch, disabled):
    from comfy.cli_args import args
    from engine.video_io import read_mp4_metadata

    monkeypatch.setattr(args, "disable_metadata", disabled)
    result = comfy.run(_t2v_save(200 + disabled), extra_pnginfo={"workflow": {"nodes": []}})
    item = result["outputs"]["10"]["images"][0]
    meta = read_mp4_metadata(Path(comfy.b.folder_paths.get_output_directory()) / item["subfolder"] / item["filename"])
    assert ("workflow" in meta and "prompt" in meta) is not disabled
    if disabled:
        assert not {"workflow", "prompt"} & set(meta)


def test_image_previews_use_the_preview_size(comfy, monkeypatch):
    """Non-latent previews (loss curve, validation frames) are sent at --preview-size too."""
    from PIL import Image
    from comfy.cli_args import args

    compat = comfy.pack_module("nodes.comfy_compat")
    monkeypatch.setattr(args, "preview_size", 77)
    comfy.previews.clear()
    compat.Progress(4, "42").update(1, preview=Image.new("RGB", (300, 200)))
    ((node, (fmt, img, size)),) = comfy.previews
    assert (node, fmt, img.size, size) == ("42", "JPEG", (300, 200), 77)


def test_sampler_latent_is_core_wan21_format_and_decode_takes_a_core_latent(comfy):
    """The sampler's LATENT output is what ComfyUI's own Wan 2.1 latent format turns into the model's latents
    (comfy.latent_formats.Wan21.process_in), core latent nodes can work on it, and the pack's decode takes it back."""
    p = _base("preset:tiny-t2v")
    p["8"] = _sampler(F)
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0,
                                                            "tile_overlap": 64}}
    p["10"] = {"class_type": "LatentBatch", "inputs": {"samples1": ["8", 1], "samples2": ["8", 1]}}   # a core node
    p["11"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latent": ["10", 0], "tile_size": 0,
                                                             "tile_overlap": 64}}
    p["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    p["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    comfy.run(p)
    ours, core = comfy.output("8")["samples"], comfy.output("8", 1)["samples"]
    wan21 = importlib.import_module("comfy.latent_formats").Wan21()   # ComfyUI's own constants
    torch.testing.assert_close(wan21.process_in(core), ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(core, ours, atol=1e-2)   # really another space (raw VAE latents)
    images = comfy.output("9")
    torch.testing.assert_close(comfy.output("11"), torch.cat([images, images]), rtol=1e-4, atol=1e-4)

    p["11"]["inputs"]["latents"] = ["8", 0]   # both connected: refused naming them
    comfy.run(p, expect_success=False)
    assert "latents / latent" in comfy.error_message(), comfy.error_message()
