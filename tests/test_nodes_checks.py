"""Bad widget values are refused when the prompt is queued (VALIDATE_INPUTS), before any upstream node runs, and
widget minimums are what the nodes accept (issue 23 item 6)."""

from __future__ import annotations

import pytest

from test_nodes_wan import _base, _sampler
from training_graphs import train_prompt

pytestmark = pytest.mark.comfy


def _errors(comfy, prompt) -> dict[str, str]:
    ok, err, outputs, node_errors = comfy.validate(prompt)
    assert not ok, "the prompt was accepted"
    return {nid: " | ".join(f"{e.get('message')}: {e.get('details')}" for e in ne["errors"])
            for nid, ne in node_errors.items()}


@pytest.mark.parametrize("field, value, needle", [
    ("width", 72, "width: 72 is not a multiple of 16"),
    ("height", 40, "height: 40 is not a multiple of 16"),
    ("frames", 8, "frames: 8 frames is not of the form 4k+1"),
    ("width", 8, "width: 8 is smaller than the minimum 16"),     # ComfyUI's own min check is replaced: still done
])
def test_sampler_size_refused_when_queued(comfy, field, value, needle):
    p = _base("preset:tiny-t2v")
    p["8"] = _sampler(9)
    p["8"]["inputs"][field] = value
    p["9"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models", "passthrough": ["8", 0]}}
    errors = _errors(comfy, p)
    assert needle in errors.get("8", ""), errors


def test_good_sizes_still_validate(comfy):
    p = _base("preset:tiny-t2v")
    p["8"] = _sampler(9)
    p["9"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models", "passthrough": ["8", 0]}}
    ok, err, _, node_errors = comfy.validate(p)
    assert ok, node_errors


@pytest.mark.parametrize("prefix, needle", [
    ("../escape", "'..'"),
    ("/tmp/abs", "absolute path"),
    ("", "empty"),
    ("bad|name", "not allowed"),
])
def test_save_video_prefix_refused_when_queued(comfy, prefix, needle):
    p = _base("preset:tiny-t2v")
    p["8"] = _sampler(9)
    p["9"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["3", 0], "latents": ["8", 0], "tile_size": 0,
                                                             "tile_overlap": 64}}
    p["10"] = {"class_type": "MusubiSaveVideo", "inputs": {"images": ["9", 0], "fps": 16.0, "filename_prefix": prefix,
                                                           "crf": 19}}
    errors = _errors(comfy, p)
    assert "filename_prefix" in errors.get("10", "") and needle in errors["10"], errors


def test_training_names_refused_when_queued(comfy, data, tmp_path):
    p = train_prompt(tmp_path, train_node=False)
    p["7"]["inputs"]["filename_prefix"] = "../../outside"
    p["5"]["inputs"]["output_name"] = "sub/lora"
    errors = _errors(comfy, p)
    assert "filename_prefix" in errors.get("7", ""), errors
    assert "output_name" in errors.get("5", "") and "folder" in errors["5"], errors


@pytest.mark.parametrize("node, field, value", [
    ("3", "rank", 0),
    ("4", "learning_rate", 0.0),
])
def test_widget_minimums_refuse_what_the_node_refuses(comfy, data, tmp_path, node, field, value):
    p = train_prompt(tmp_path)
    p[node]["inputs"][field] = value
    errors = _errors(comfy, p)
    assert field in errors.get(node, ""), errors


def test_widget_minimums_are_accepted_by_the_engine(comfy):
    from engine.training import NetworkConfig, OptimizerConfig

    types = comfy.input_types()
    for node in ("MusubiLoRAConfig", "MusubiTrainLoRA"):
        rank_min = types[node]["required"]["rank"][1]["min"]
        assert rank_min >= 1
        NetworkConfig(rank=rank_min).validate()
    for node in ("MusubiOptimizerConfig", "MusubiTrainLoRA"):
        lr_min = types[node]["required"]["learning_rate"][1]["min"]
        assert lr_min > 0
        OptimizerConfig(learning_rate=lr_min).validate()


def test_validation_prompt_size_refused_when_queued(comfy, data, tmp_path):
    from test_nodes_training_validation import add_validation

    p = train_prompt(tmp_path / "out", steps=2)
    add_validation(p)
    p["31"]["inputs"]["frames"] = 3
    errors = _errors(comfy, p)
    assert "frames: 3 frames is not of the form 4k+1" in errors.get("31", ""), errors


def test_dataset_resolution_refused_when_queued(comfy, tmp_path):
    from test_nodes_data import cache_prompt, folder_node

    p = cache_prompt(folder_node(tmp_path, width=100), text=False)
    errors = _errors(comfy, p)
    assert "width: 100 is not a multiple of 16" in errors.get("1", ""), errors
