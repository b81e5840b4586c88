"""SigLIP image encoder (FramePack): ComfyUI file and Hugging Face folder layouts against transformers'
SiglipVisionModel built with the same random weights, preprocessing against transformers' SiglipImageProcessor,
refusals.

float32 on CPU; outputs compared with atol 1e-5, loaded weights exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.encoders import load_siglip
from engine.encoders import siglip as sg
from engine.errors import MusubiInputError

ATOL = 1e-5
# not the tiny preset's shapes, so the config really comes from the file: width 48, 3 layers, 42 px (3x3 tokens)
HIDDEN, FFN, LAYERS, PATCH, SIZE = 48, 40, 3, 14, 42


def _hf_config(heads=3, eps=1e-6, **extra):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                              num_attention_heads=heads, patch_size=PATCH, image_size=SIZE,
                              hidden_act="gelu_pytorch_tanh", layer_norm_eps=eps, **extra)


def _reference(sd, heads=3, eps=1e-6):
    """transformers' SiglipVisionModel (with its pooling head) holding the file's weights."""
    from transformers import SiglipVisionModel

    ref = SiglipVisionModel(_hf_config(heads, eps)).eval()
    missing, unexpected = ref.load_state_dict({k[len("vision_model."):]: v for k, v in sd.items()}, strict=False)
    assert not unexpected and missing == [], (missing, unexpected)
    return ref


@pytest.fixture(scope="module")
def weights():
    from transformers import SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(_hf_config())
    with torch.no_grad():                       # larger than the default init, so every block changes the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {f"vision_model.{k}": v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory, weights):
    d = tmp_path_factory.mktemp("siglip")
    save_file(weights, str(d / "sigclip_vision_patch14_384.safetensors"))        # ComfyUI: vision_model.* + head
    redux = d / "FLUX.1-Redux-dev" / "image_encoder"                             # HF folder: config + weights
    redux.mkdir(parents=True)
    save_file(weights, str(redux / "model.safetensors"))
    cfg = _hf_config(eps=1e-5).to_dict()
    cfg["architectures"] = ["SiglipVisionModel"]
    (redux / "config.json").write_text(json.dumps(cfg))
    four = d / "four_heads"                                                      # heads come from the config
    four.mkdir()
    save_file(weights, str(four / "model.safetensors"))
    (four / "config.json").write_text(json.dumps(_hf_config(heads=4).to_dict()))
    return d


def _pixels(batch=2, seed=1):
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_comfy_file_and_hf_folder_match_transformers(files, weights):
    comfy = load_siglip(files / "sigclip_vision_patch14_384.safetensors", dtype=torch.float32)
    redux = load_siglip(files / "FLUX.1-Redux-dev", dtype=torch.float32)            # the parent folder
    assert load_siglip(files / "FLUX.1-Redux-dev" / "image_encoder", dtype=torch.float32).config == redux.config
    assert (comfy.config.num_heads, comfy.config.eps, redux.config.eps) == (3, 1e-6, 1e-5)
    assert comfy.config.num_tokens == 9 and comfy.config.num_layers == LAYERS
    a, b = comfy.model.state_dict(), redux.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("head.") for k in a)                                 # the pooling head is skipped
    pixels = _pixels()
    images = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        for enc, eps in ((comfy, 1e-6), (redux, 1e-5)):
            ref = _reference(weights, eps=eps)
            expected = ref(pixel_values=pixels).last_hidden_state
            out = enc.encode_pixels(pixels)
            assert out.shape == (2, 9, HIDDEN) and out.dtype == torch.float32
            torch.testing.assert_close(out, expected, rtol=ATOL, atol=ATOL)
            torch.testing.assert_close(enc.encode(images), ref(pixel_values=sg.preprocess(images, SIZE))
                                       .last_hidden_state, rtol=ATOL, atol=ATOL)
        four = load_siglip(files / "four_heads", dtype=torch.float32)
        assert four.config.num_heads == 4
        torch.testing.assert_close(four.encode_pixels(pixels), _reference(weights, heads=4)(
            pixel_values=pixels).last_hidden_state, rtol=ATOL, atol=ATOL)
        assert not torch.allclose(four.encode_pixels(pixels), comfy.encode_pixels(pixels), atol=1e-3)
    assert comfy.identity.startswith("sigclip_vision_patch14_384.safetensors:")


def test_preprocess_matches_musubi_siglip_image_processor():
    """Musubi: SiglipImageProcessor(resize 384 bicubic, rescale 1/255, mean = std = 0.5) on the uint8 frame (PIL's
    resize). Ours emulates PIL's two rounded passes: the same values but for a few pixels one uint8 step off."""
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(do_normalize=True, do_rescale=True, do_resize=True, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3, resample=3, rescale_factor=1 / 255,
                                     size={"height": 384, "width": 384})
    g = torch.Generator().manual_seed(3)
    for h, w in ((480, 640), (300, 200), (384, 500)):             # down- and up-sampling, one axis already 384
        frame = (torch.rand(h, w, 3, generator=g) * 255).round().to(torch.uint8).numpy()      # noise: the worst case
        expected = processor(images=frame, return_tensors="pt")["pixel_values"]
        ours = sg.preprocess(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1, 384)
        assert ours.shape == expected.shape == (1, 3, 384, 384)
        steps = ((ours - expected).abs() * 127.5).round()
        assert steps.max() <= 2 and (steps > 0).float().mean() < 0.01, (steps.max(), (steps > 0).float().mean())


def test_official_config_and_tiny_preset():
    c = sg.SIGLIP_384
    assert (c.num_tokens, c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (729, 1152, 27, 16, 4304)
    hf = c.to_transformers()
    assert (hf.patch_size, hf.image_size, hf.hidden_act, hf.layer_norm_eps) == (14, 384, "gelu_pytorch_tanh", 1e-6)
    enc = load_siglip(sg.PRESET_TINY, dtype=torch.float32)
    out = enc.encode(torch.zeros(1, 3, 64, 48))
    assert out.shape == (1, sg.TINY_SIGLIP.num_tokens, sg.TINY_SIGLIP.hidden_size) and torch.isfinite(out).all()
    assert load_siglip(sg.PRESET_TINY).encode(torch.zeros(1, 3, 56, 56)).dtype == torch.float16


def test_refuses_other_files_and_bad_images(tmp_path, raises_input):
    from engine.encoders.clip_vision import tiny_clip_state_dict

    clip = tmp_path / "clip_vision_h.safetensors"
    save_file(tiny_clip_state_dict(), str(clip))
    with raises_input(f"image encoder {clip}", "a CLIP vision model (class token, pre-layernorm)", "a SigLIP"):
        load_siglip(clip)
    t5 = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}, str(t5))
    with pytest.raises(MusubiInputError, match=f"image encoder {t5}.*T5 text encoder.*SigLIP") as e:
        load_siglip(t5)
    assert "sigclip_vision_patch14_384" in str(e.value)
    empty = tmp_path / "no_config"
    empty.mkdir()
    with raises_input("image encoder folder", str(empty), "a SigLIP vision model"):
        load_siglip(empty)
    with raises_input("image encoder preset", "preset:big", "'preset:tiny-siglip'"):
        load_siglip("preset:big")
    enc = load_siglip(sg.PRESET_TINY, dtype=torch.float32)
    with raises_input("images", (3, 56, 56), "a [B, 3, H, W] tensor"):
        enc.encode(torch.zeros(3, 56, 56))
