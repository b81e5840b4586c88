"""One rule for every path the pack writes to from a graph input: inside ComfyUI's output/input/models folders
(real path: '..', absolute paths and symlinks resolved), unless MUSUBI_ALLOW_ANY_PATH=1 (issue 23 item 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from training_graphs import train_prompt

pytestmark = pytest.mark.comfy


@pytest.fixture
def strict(monkeypatch):
    """The rule as users get it (the suite runs with the escape hatch on: see conftest.py)."""
    monkeypatch.delenv("MUSUBI_ALLOW_ANY_PATH", raising=False)


def _output(comfy) -> Path:
    return Path(comfy.b.folder_paths.get_output_directory())


def test_the_rule(comfy, strict, tmp_path, monkeypatch):
    paths = comfy.pack_module("nodes.paths")
    out = _output(comfy)
    assert paths.outside_problem(out / "a" / "b") is None
    assert paths.outside_problem(Path(comfy.b.folder_paths.models_dir) / "loras" / "x") is None
    assert paths.outside_problem(Path(comfy.b.folder_paths.get_input_directory()) / "x") is None
    assert "outside ComfyUI" in paths.outside_problem(out / ".." / ".." / "escaped")
    assert "outside ComfyUI" in paths.outside_problem(tmp_path / "elsewhere")
    link = out / "t23_link_out"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        assert "outside ComfyUI" in paths.outside_problem(link / "lora.safetensors")
    finally:
        link.unlink()
    custom_nodes = comfy.b.folder_paths.get_folder_paths("custom_nodes")[0]
    assert paths.outside_problem(Path(custom_nodes) / "evil") is not None   # code there would run at startup
    monkeypatch.setenv("MUSUBI_ALLOW_ANY_PATH", "1")
    assert paths.outside_problem(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("value", ["../../escape", "/tmp/t23_abs_escape"])
def test_output_dir_outside_is_refused_when_queued_and_when_run(comfy, data, strict, tmp_path, value):
    p = train_prompt(value, train_node=False)
    ok, _, _, node_errors = comfy.validate(p)
    assert not ok and "output_dir" in json.dumps(node_errors) and "MUSUBI_ALLOW_ANY_PATH" in json.dumps(node_errors)
    training = comfy.pack_module("nodes.training")
    with pytest.raises(ValueError, match="output_dir"):
        training.resolve_output_dir(value)
    assert not (_output(comfy) / ".." / ".." / "escape").exists()


def test_output_dir_inside_is_accepted(comfy, data, strict):
    p = train_prompt("t23_runs/a", train_node=False)
    ok, _, _, node_errors = comfy.validate(p)
    assert ok, node_errors
    training = comfy.pack_module("nodes.training")
    assert Path(training.resolve_output_dir("t23_runs/a")) == _output(comfy) / "t23_runs" / "a"


def test_cache_directory_outside_is_refused(comfy, strict, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    node = {"class_type": "MusubiDatasetFromFolder", "inputs": {
        "folder": str(images), "kind": "image", "caption_extension": ".txt", "width": 32, "height": 32,
        "batch_size": 1, "num_repeats": 1, "enable_bucket": False, "bucket_no_upscale": False,
        "target_frames": "1", "frame_extraction": "head", "frame_stride": 1, "frame_sample": 1, "max_frames": 129,
        "source_fps": 0.0, "cache_directory": str(tmp_path / "cache")}}
    p = {"1": node, "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    ok, _, _, node_errors = comfy.validate(p)
    assert not ok and "cache_directory" in json.dumps(node_errors)
    data_nodes = comfy.pack_module("nodes.data")
    with pytest.raises(ValueError, match="cache_directory"):
        data_nodes.MusubiDatasetFromFolder._config(**node["inputs"])
    assert not (tmp_path / "cache").exists()


def test_lora_save_through_a_symlink_out_of_output_is_refused(comfy, strict, tmp_path):
    lora = comfy.pack_module("nodes.lora")
    link = _output(comfy) / "t23_escape"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(ValueError, match="filename_prefix"):
            lora.numbered_file("output", "loras", "t23_escape/x", "filename_prefix")
        assert lora.numbered_file("output", "loras", "t23_ok/x", "filename_prefix").parent == _output(comfy) / "t23_ok"
    finally:
        link.unlink()


def test_save_video_through_a_symlink_out_of_output_is_refused(comfy, strict, tmp_path):
    import torch

    gen = comfy.pack_module("nodes.video")
    link = _output(comfy) / "t23_vid_escape"
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        with pytest.raises(ValueError, match="filename_prefix"):
            gen.MusubiSaveVideo().save(torch.zeros(1, 16, 16, 3), 16.0, "t23_vid_escape/v", 19)
        assert not list(tmp_path.iterdir())
    finally:
        link.unlink()
