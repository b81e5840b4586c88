"""Training the Wan image-conditioned tasks from the nodes, end to end in a real ComfyUI (tiny presets): cache with
CLIP vision / control videos -> train -> validation samples with the task's conditioning -> save, for I2V, FLF2V
(one-frame intermediate frames, as Musubi Tuner), Fun-Control and I2V Fun-Control; FLF2V video training is refused
with what to do instead."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training_graphs import SIZE, conditioned_train_prompt, sessions

pytestmark = pytest.mark.comfy
F = 5   # frames of the training clips and of the validation videos


@pytest.fixture(scope="module", autouse=True)
def _release_sessions(comfy):
    yield
    comfy.pack_module("nodes.registry").SESSIONS.release()


def _frame(seed: int) -> np.ndarray:
    """A colored square on a plain background, moved and recolored by `seed`."""
    rng = np.random.default_rng(seed)
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    img[:] = rng.integers(0, 256, 3)
    x, y = rng.integers(0, SIZE - 12, 2)
    img[y:y + 12, x:x + 12] = rng.integers(0, 256, 3)
    return img


def _save_frames(folder: Path, seed: int, n: int) -> None:
    folder.mkdir(parents=True)
    for f in range(n):
        Image.fromarray(_frame(seed + f)).save(folder / f"{f:03d}.png")


def video_dataset(root: Path, controls: bool) -> Path:
    """Two 5-frame clips (folders of frames) with captions, and a control clip of the same name for each."""
    for k, name in enumerate(("red", "blue")):
        _save_frames(root / "videos" / name, 10 * k, F)
        (root / "videos" / f"{name}.txt").write_text(f"a {name} square moving")
        if controls:
            _save_frames(root / "controls" / name, 100 + 10 * k, F)
    toml = root / "dataset.toml"
    toml.write_text(f"""
[general]
resolution = [{SIZE}, {SIZE}]
caption_extension = ".txt"
batch_size = 1
[[datasets]]
video_directory = "videos"
{'control_directory = "controls"' if controls else ''}
cache_directory = "cache"
target_frames = [{F}]
""")
    return toml


def one_frame_dataset(root: Path) -> Path:
    """Intermediate-frame items (Musubi's FLF2V one-frame training): control 0 and 2 given, target 1 learned."""
    (root / "images").mkdir(parents=True)
    (root / "controls").mkdir()
    for i in range(2):
        Image.fromarray(_frame(200 + i)).save(root / "images" / f"item{i}.png")
        (root / "images" / f"item{i}.txt").write_text(f"a square, picture {i}")
        for k in range(2):
            Image.fromarray(_frame(300 + 10 * i + k)).save(root / "controls" / f"item{i}_{k}.png")
    toml = root / "dataset.toml"
    toml.write_text(f"""
[general]
resolution = [{SIZE}, {SIZE}]
caption_extension = ".txt"
[[datasets]]
image_directory = "images"
control_directory = "controls"
cache_directory = "cache"
batch_size = 1
fp_1f_clean_indices = [0, 2]
fp_1f_target_index = 1
""")
    return toml


_WH = {"width": SIZE, "height": SIZE}
CASES = {
    # name: (DiT preset, Cache Latents task, CLIP vision, dataset, validation encode node, cached tensors)
    "i2v": ("preset:tiny-i2v", "i2v", True, "video",
            {"class_type": "MusubiWanImageEncode", "inputs": {
                "vae": ["3", 0], "clip_vision": ["4", 0], "start_image": ["12", 0], **_WH, "frames": F}},
            {"latents_image": (20, 2), "clip": (257, 32)}),
    "flf2v_intermediate_frame": ("preset:tiny-flf2v", "i2v", True, "one_frame",
                                 {"class_type": "MusubiWanOneFrameEncode", "inputs": {
                                     "vae": ["3", 0], "clip_vision": ["4", 0], "control_image": ["12", 0],
                                     "control_image_2": ["12", 0], "control_indices": "0;2", "target_index": 1,
                                     **_WH}},
                                 {"latents_image": (20, 3), "clip": (514, 32), "f_indices": (3,)}),
    "fun_control": ("preset:tiny-fun-control", "fun_control", False, "video_controls",
                    {"class_type": "MusubiWanFunControlEncode", "inputs": {
                        "vae": ["3", 0], "control_video": ["12", 0], **_WH, "frames": F}},
                    {"latents_control": (16, 2)}),
    "i2v_fun_control": ("preset:tiny-fun-control", "fun_control", True, "video_controls",
                        {"class_type": "MusubiWanFunControlEncode", "inputs": {
                            "vae": ["3", 0], "control_video": ["12", 0], **_WH, "frames": F,
                            "start_image": ["12", 0], "clip_vision": ["4", 0]}},
                        {"latents_control": (16, 2), "latents_image": (20, 2), "clip": (257, 32)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conditioned_training_from_the_nodes_caches_trains_validates_and_saves(comfy, tmp_path, case):
    dit, task, clip, kind, encode, cached = CASES[case]
    toml = (one_frame_dataset(tmp_path / "data") if kind == "one_frame"
            else video_dataset(tmp_path / "data", controls=kind == "video_controls"))
    frames = 1 if kind == "one_frame" else F
    p = conditioned_train_prompt(tmp_path / "out", toml, dit=dit, task=task, clip=clip, encode=encode, frames=frames)
    comfy.run(p)

    # the cache holds the task's conditioning (FLF2V one-frame: both control images' CLIP tokens)
    load = comfy.pack_module("engine.data.cache").load_cache_file
    files = sorted((tmp_path / "data" / "cache").glob("*_wan.safetensors"))
    assert len(files) == 2, files
    tensors = load(files[0])
    for name, shape in cached.items():
        assert tuple(tensors[name].shape[:len(shape)]) == shape, (name, tuple(tensors[name].shape))
    if not clip:
        assert "clip" not in tensors and "latents_image" not in tensors

    # trained: two finite losses, the validation sample with the task's conditioning at step 2, the LoRA saved
    (run,) = sessions(comfy, "15")
    assert run.session.step == 2
    losses = comfy.output("16", 2)["loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    samples = comfy.output("16", 5)
    assert samples.shape == (frames, SIZE, SIZE, 3), samples.shape
    assert samples.isfinite().all() and samples.std() > 0
    # Musubi Validate with the same conditioned prompt after the last step: the same sample
    torch.testing.assert_close(comfy.output("19", 0), samples, rtol=1e-4, atol=1e-4)
    saved = Path(comfy.output("17", 1))
    assert saved.is_file() and saved.name.startswith("conditioned_")
    names = set(comfy.output("17", 0).modules)
    assert any("k_img" in n for n in names), sorted(names)[:8]   # the image cross-attention is trained too


def test_flf2v_video_training_is_refused_naming_the_one_frame_dataset(comfy, tmp_path):
    """Musubi Tuner trains FLF2V only through one-frame intermediate-frame datasets (its caches hold the first
    frame's conditioning): a video cache on the FLF2V model is refused before training, saying what to use."""
    encode = {"class_type": "MusubiWanImageEncode", "inputs": {
        "vae": ["3", 0], "clip_vision": ["4", 0], "start_image": ["12", 0], "end_image": ["12", 0], **_WH,
        "frames": F}}
    p = conditioned_train_prompt(tmp_path / "out", video_dataset(tmp_path / "data", controls=False),
                                 dit="preset:tiny-flf2v", task="i2v", clip=True, encode=encode, frames=F)
    comfy.pack_module("nodes.registry").SESSIONS.release()   # the sessions of the tests above
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert "FLF2V" in msg and "fp_1f_clean_indices" in msg, msg
    assert sessions(comfy, "15") == []
