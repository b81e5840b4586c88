"""Wan node options a demanding user sets (#19 item 4) in a real ComfyUI: fp8 storage of the umT5 encoder."""

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
