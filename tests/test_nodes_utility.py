"""Utility behaviour on the tested ComfyUI: Unload Models links to typed inputs; loader dropdowns order."""

import json
from pathlib import Path

import pytest


def _chain(passthrough_from):
    """EmptyImage -> (Unload Models) -> ImageInvert (typed IMAGE input) -> PreviewImage."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                             "passthrough": ["1", 0]}},
        "3": {"class_type": "ImageInvert", "inputs": {"image": passthrough_from}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def test_passthrough_connects_to_a_typed_input(comfy):
    ok, err, _, node_errors = comfy.validate(_chain(["2", 0]))
    assert ok, (err, node_errors)
    comfy.run(_chain(["2", 0]))
    assert float(comfy.output("3").min()) == 1.0  # the image went through the unload node unchanged, then inverted


def test_passthrough_still_reads_as_the_wildcard_for_the_frontend(comfy):
    cls = comfy.b.nodes.NODE_CLASS_MAPPINGS["MusubiUnloadModels"]
    spec = cls.INPUT_TYPES()["optional"]["passthrough"]
    assert json.loads(json.dumps([cls.RETURN_TYPES[0], spec[0]])) == ["*", "*"]
    assert cls.RETURN_TYPES[0] == "*" and hash(cls.RETURN_TYPES[0]) == hash("*")


@pytest.mark.parametrize("node, field, folder", [("MusubiWanDiTLoader", "model_name", "diffusion_models"),
                                                  ("MusubiWanVAELoader", "vae_name", "vae"),
                                                  ("MusubiUMT5Loader", "text_encoder_name", "text_encoders"),
                                                  ("MusubiClipVisionLoader", "clip_name", "clip_vision")])
def test_loader_dropdowns_list_real_model_files_before_the_presets(comfy, node, field, folder):
    # a combo's first entry is what a new node shows: the user's own model, not a tiny test preset
    path = Path(comfy.b.folder_paths.get_folder_paths(folder)[0]) / f"aaa_user_model_{folder}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    try:
        choices = comfy.b.nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"][field][0]
        files = [c for c in choices if not c.startswith("preset:")]
        assert path.name in files and choices[:len(files)] == files and choices[len(files):]
    finally:
        path.unlink()
