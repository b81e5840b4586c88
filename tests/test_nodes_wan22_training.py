"""Wan 2.2 TI2V-5B training from the nodes, end to end in a real ComfyUI (tiny presets): Cache Latents with the Wan 2.2
VAE (t2v, or i2v: the first frame's latent too) -> Cache Text -> train 3 steps -> validation sample (I2V: the start
image's latent from Musubi Wan Image Encode on the 2.2 VAE) -> save; CLIP vision with the 2.2 VAE and a 2.2 cache on a
Wan 2.1 model are refused naming what to do."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from test_nodes_wan_training import F, video_dataset
from training_graphs import SIZE, conditioned_train_prompt, sessions

pytestmark = pytest.mark.comfy
STEPS = 3
_ENCODE = {"class_type": "MusubiWanImageEncode", "inputs": {"vae": ["3", 0], "start_image": ["12", 0],
                                                            "width": SIZE, "height": SIZE, "frames": F}}


@pytest.fixture(scope="module", autouse=True)
def _release_sessions(comfy):
    yield
    comfy.pack_module("nodes.registry").SESSIONS.release()


def ti2v_prompt(tmp_path: Path, task: str, dit: str = "preset:tiny-ti2v-5b", clip: bool = False) -> dict:
    """`conditioned_train_prompt` on the Wan 2.2 VAE: i2v validates from a start image, t2v from text alone."""
    p = conditioned_train_prompt(tmp_path / "out", video_dataset(tmp_path / "data", controls=False), dit=dit,
                                 task=task, clip=clip, encode=_ENCODE, frames=F, steps=STEPS)
    p["3"]["inputs"]["vae_name"] = "preset:tiny-vae22"
    if task == "t2v":
        del p["13"], p["14"]["inputs"]["image_embeds"], p["19"]["inputs"]["image_embeds"]
    return p


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_ti2v_training_from_the_nodes_caches_trains_validates_and_saves(comfy, tmp_path, task):
    comfy.run(ti2v_prompt(tmp_path, task))

    # 48-channel latents under their own arch; the captions in the shared Wan text cache
    cache = tmp_path / "data" / "cache"
    load = comfy.pack_module("engine.data.cache").load_cache_file
    files = sorted(cache.glob("*_wan22_5b.safetensors"))
    assert len(files) == 2 and len(list(cache.glob("*_wan_te.safetensors"))) == 2, sorted(cache.iterdir())
    assert not list(cache.glob("*_wan.safetensors"))
    tensors = load(files[0])
    assert tuple(tensors["latents"].shape) == (48, 2, 2, 2)
    assert ("latents_image" in tensors) == (task == "i2v")
    if task == "i2v":
        assert tuple(tensors["latents_image"].shape) == (48, 1, 2, 2)

    (run,) = sessions(comfy, "15")
    assert run.session.step == STEPS
    losses = comfy.output("16", 2)["loss"]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    samples = comfy.output("16", 5)
    assert samples.shape == (F, SIZE, SIZE, 3), samples.shape
    assert samples.isfinite().all() and samples.std() > 0
    torch.testing.assert_close(comfy.output("19", 0), samples, rtol=1e-4, atol=1e-4)   # Musubi Validate: the same
    saved = Path(comfy.output("17", 1))
    assert saved.is_file() and saved.name.startswith("conditioned_")

    # the training data's identity covers the captions, which live in the shared "wan" text manifest
    training, data = comfy.pack_module("nodes.training"), comfy.pack_module("engine.data")
    identity = lambda: training.dataset_loader(comfy.output("7"), comfy.module("1"), 0)[1]  # noqa: E731
    before, text = identity(), data.manifest_path(cache, "wan")
    text.write_bytes(text.read_bytes() + b" ")
    assert identity() != before
    names = set(comfy.output("17", 0).modules)
    assert "blocks.0.self_attn.q" in names and not any("k_img" in n for n in names), sorted(names)[:8]


def test_clip_vision_with_the_2_2_vae_is_refused(comfy, tmp_path):
    p = ti2v_prompt(tmp_path, "i2v", clip=True)
    comfy.pack_module("nodes.registry").SESSIONS.release()
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert "clip_vision" in msg and "no CLIP vision with the Wan 2.2 VAE" in msg, msg
    assert sessions(comfy, "15") == []


def test_a_2_2_cache_on_a_wan_2_1_model_is_refused(comfy, tmp_path):
    p = ti2v_prompt(tmp_path, "t2v", dit="preset:tiny-t2v")
    for node in ("14", "19", "20"):        # no validation: the refusal comes from the cache, not the VAE
        del p[node]
    for name in ("validation_prompts", "validation_vae", "validate_every_n_steps"):
        del p["15"]["inputs"][name]
    comfy.pack_module("nodes.registry").SESSIONS.release()
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert "(the Wan 2.2 VAE)" in msg and "16-channel latents cached with the Wan 2.1 VAE" in msg, msg
    assert sessions(comfy, "15") == []


def test_dataset_preview_shows_a_2_2_cache_as_it_was_made(comfy, tmp_path):
    """Dataset Preview on a dataset cached with the Wan 2.2 VAE plans its clips as the 2.2 cache did (buckets of
    32 pixels, where the 2.1 planning gives 48x48 at resolution 48) and finds its latents (their own manifest) and
    captions (the shared Wan text manifest)."""
    p = ti2v_prompt(tmp_path, "t2v")
    toml = Path(p["2"]["inputs"]["toml_path"])
    toml.write_text(toml.read_text().replace(f"resolution = [{SIZE}, {SIZE}]", "resolution = [48, 48]"))
    preview = {"max_items": 8, "frames_per_clip": 1, "tile_size": 64}
    # Two prompts: in one, ComfyUI may run the caching branch before the first preview (the order is not fixed).
    comfy.run({"2": p["2"], "30": {"class_type": "MusubiDatasetPreview", "inputs": {"dataset": ["2", 0], **preview}}})
    before = comfy.output("30", 1)
    graph = {k: p[k] for k in ("2", "3", "5", "6", "7")}
    graph["31"] = {"class_type": "MusubiDatasetPreview", "inputs": {"dataset": ["7", 0], **preview}}
    comfy.run(graph)
    after = comfy.output("31", 1)
    assert "48x48x5f: 2" in before and "cache " in before and "none yet" in before, before
    buckets = [line for line in after.splitlines() if line.strip().startswith("buckets")]
    sizes = [tuple(int(v) for v in b.split("f:")[0].split("x")[:2]) for b in buckets[0].split(": ", 1)[1].split(", ")]
    assert sizes and all(w % 32 == 0 and h % 32 == 0 for w, h in sizes), after
    assert "latents for 2/2 item(s), text for 2/2" in after, after
