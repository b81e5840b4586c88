"""Dataset nodes in a real ComfyUI: TOML / folder / IMAGE sources, latent + text caching (incremental, resumable
after a cancel, under 0.3.75 and emulated 0.38 behaviour), the debug preview, and named errors for bad inputs."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

from comfy_harness import REPO_ROOT

pytestmark = pytest.mark.comfy
SIZE = (64, 48)


def _sample_module():
    spec = importlib.util.spec_from_file_location("make_sample_media", REPO_ROOT / "scripts" / "make_sample_media.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_sample_dataset(folder, **kw):
    return _sample_module().make_sample_dataset(folder, size=SIZE, **kw)


def folder_node(folder, cache="", **kw):
    inputs = {"folder": str(folder), "kind": "auto", "caption_extension": ".txt", "width": SIZE[0], "height": SIZE[1],
              "batch_size": 1, "num_repeats": 1, "enable_bucket": True, "bucket_no_upscale": False,
              "target_frames": "1,5", "frame_extraction": "head", "frame_stride": 1, "frame_sample": 1,
              "max_frames": 129, "source_fps": 0.0, "cache_directory": str(cache)}
    inputs.update(kw)
    return {"class_type": "MusubiDatasetFromFolder", "inputs": inputs}


def cache_prompt(source: dict, *, text=True, preview=False, workers=2, task="t2v") -> dict:
    """1 = dataset source, 3 = VAE, 4 = umT5, 5 = Cache Latents, 6 = Cache Text, 7 = Preview, 8 = PreviewImage."""
    p = {
        "1": source,
        "3": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                             "cache_on_cpu": False}},
        "5": {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["1", 0], "vae": ["3", 0], "task": task,
                                                             "keep_cache": False, "workers": workers}},
    }
    last = "5"
    if text:
        p["4"] = {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5",
                                                               "dtype": "fp32", "tokenizer_path": ""}}
        p["6"] = {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["5", 0], "text_encoder": ["4", 0],
                                                                       "keep_cache": False}}
        last = "6"
    if preview:
        p["7"] = {"class_type": "MusubiDatasetPreview", "inputs": {"dataset": [last, 0], "max_items": 8,
                                                                   "frames_per_clip": 3, "tile_size": 64}}
        p["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}
    return p


def run(comfy, prompt: dict, **kw):
    """Queue a fresh copy, as the frontend does: ComfyUI stores each node's IS_CHANGED value into the prompt dict it
    executes, so re-running the same dict would never re-evaluate IS_CHANGED."""
    return comfy.run(copy.deepcopy(prompt), **kw)


def text_of(result, node_id: str) -> str:
    return result["outputs"][node_id]["text"][0]


def counts(summary: str) -> tuple[int, int, int]:
    m = re.match(r"\w+: (\d+) encoded, (\d+) reused, (\d+) removed", summary)
    assert m, summary
    return tuple(int(x) for x in m.groups())


def manifest(cache_dir) -> dict:
    return json.loads((Path(cache_dir) / "musubi_cache_wan.json").read_text())


# --- TOML: cache, reuse, edit one caption ------------------------------------------------------------------------------
def test_toml_cache_then_reuse_then_one_caption_edit(comfy, tmp_path):
    data = make_sample_dataset(tmp_path / "media", num_images=3, num_videos=0, num_frame_folders=0)
    toml = tmp_path / "dataset.toml"
    # No cache_directory: the cache goes into the media folder (Musubi's default), which must not count as a media
    # change for IS_CHANGED.
    toml.write_text(f'[general]\nresolution = [{SIZE[0]}, {SIZE[1]}]\nenable_bucket = true\n\n'
                    '[[datasets]]\nimage_directory = "media/images"\n')
    prompt = cache_prompt({"class_type": "MusubiDatasetFromTOML", "inputs": {"toml_path": str(toml)}})

    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (3, 0, 0)
    assert counts(text_of(r, "6")) == (3, 0, 0)
    images = Path(data["images"])
    assert len(list(images.glob("*_wan.safetensors"))) == 3 and len(list(images.glob("*_wan_te.safetensors"))) == 3

    # Same graph, same files: ComfyUI serves every node from its cache (the fingerprint ignores the cache files).
    run(comfy, prompt)
    cached = {n for e in comfy.events_of("execution_cached") for n in e["nodes"]}
    assert {"1", "5", "6"} <= cached, comfy.server.events

    # Fresh ComfyUI caches (as after a restart): the nodes run again and the on-disk cache is reused entirely.
    comfy.executor.reset()
    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (0, 3, 0)
    assert counts(text_of(r, "6")) == (0, 3, 0)

    # Edit one caption: IS_CHANGED re-runs the source, only that caption is encoded again.
    (images / "image_001.txt").write_text("a completely different caption for this picture")
    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (0, 3, 0)
    assert counts(text_of(r, "6")) == (1, 2, 0)
    assert "image_001" in text_of(r, "6")

    # What the trainer gets from the DATASET socket.
    dataset = comfy.output("6")
    assert dataset.latent["vae"] == "preset:tiny-vae" and dataset.latent["task"] == "t2v"
    assert dataset.text["text_encoder"].startswith("preset:tiny-umt5")
    cached_sets = dataset.cached_datasets()
    assert len(cached_sets) == 1 and len(cached_sets[0].samples) == 3
    batches = list(dataset.batch_loader(seed=1))
    assert len(batches) == 3 and batches[0]["latents"].shape[:2] == (1, 16) and len(batches[0]["context"]) == 1


# --- folder -----------------------------------------------------------------------------------------------------------
def test_dataset_from_folder_videos_cache_and_preview(comfy, tmp_path):
    data = make_sample_dataset(tmp_path / "media", num_images=0, num_videos=1, num_frame_folders=1, frames=9)
    r = run(comfy, cache_prompt(folder_node(data["videos"]), preview=True))
    assert "2 video item(s)" in text_of(r, "1")
    lat = text_of(r, "5")
    assert counts(lat) == (2, 0, 0) and "4 clip(s) written" in lat  # target_frames 1,5 -> 2 clips per video
    assert counts(text_of(r, "6")) == (2, 0, 0)
    # Empty cache_directory: a folder under ComfyUI's output directory derived from the dataset path.
    dataset = comfy.output("6")
    cache_dir = Path(dataset.cache_directories[0])
    assert cache_dir.parent == Path(comfy.b.folder_paths.get_output_directory()) / "musubi_cache"
    assert cache_dir.name.startswith("videos-") and len(manifest(cache_dir)["items"]) == 2

    grid, summary = comfy.output("7", 0), comfy.output("7", 1)
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.std() > 0.01
    assert grid.shape[1] > 2 * 64  # one row per clip (4 clips)
    assert "64x48x1f: 2" in summary and "64x48x5f: 2" in summary, summary
    assert "latents for 2/2" in summary and "text for 2/2" in summary
    assert r["outputs"]["8"]["images"], "PreviewImage got the grid"


def test_folder_is_changed_picks_up_a_new_image(comfy, tmp_path):
    data = make_sample_dataset(tmp_path / "media", num_images=2, num_videos=0, num_frame_folders=0)
    prompt = cache_prompt(folder_node(data["images"], tmp_path / "cache"), text=False)
    assert counts(text_of(run(comfy, prompt), "5")) == (2, 0, 0)
    extra = make_sample_dataset(tmp_path / "more", num_images=3, num_videos=0, num_frame_folders=0)
    for suffix in (".png", ".txt"):
        src = Path(extra["images"]) / f"image_002{suffix}"
        (Path(data["images"]) / f"image_002{suffix}").write_bytes(src.read_bytes())
    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (1, 2, 0) and "image_002" in text_of(r, "5")


# --- in-graph images --------------------------------------------------------------------------------------------------
def images_node(captions: str, as_video=False, batch=3, cache=""):
    return {
        "0": {"class_type": "EmptyImage", "inputs": {"width": SIZE[0], "height": SIZE[1], "batch_size": batch,
                                                     "color": 0x33AA55}},
        "1": {"class_type": "MusubiDatasetFromImages", "inputs": {
            "images": ["0", 0], "captions": captions, "width": SIZE[0], "height": SIZE[1], "num_repeats": 2,
            "as_video": as_video, "cache_directory": str(cache)}},
    }


def test_dataset_from_images_batch(comfy, tmp_path):
    nodes = images_node("a green picture\nanother green picture\na third one", cache=tmp_path / "c")
    prompt = {**cache_prompt(nodes.pop("1"), preview=True), **nodes}
    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (3, 0, 0) and counts(text_of(r, "6")) == (3, 0, 0)
    dataset = comfy.output("6")
    (cached,) = dataset.cached_datasets()
    assert len(cached.samples) == 3 and cached.num_repeats == 2
    assert comfy.output("7", 0).shape[0] == 1

    # As one video clip: 5 frames -> one 5-frame clip; a single caption line applies.
    nodes = images_node("a green clip", as_video=True, batch=5, cache=tmp_path / "v")
    prompt = {**cache_prompt(nodes.pop("1"), text=False), **nodes}
    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (1, 0, 0) and "1 clip(s) written" in text_of(r, "5")
    (clip,) = manifest(tmp_path / "v")["items"].values()
    assert clip["latents"]["clips"][0]["frames"] == 5
    assert comfy.output("5").datasets[0].fp_latent_window_size == 9

    # FramePack's section length reaches the dataset (its section caches read it)
    nodes = images_node("a green clip", as_video=True, batch=5, cache=tmp_path / "w")
    nodes["1"]["inputs"]["fp_latent_window_size"] = 4
    run(comfy, {**cache_prompt(nodes.pop("1"), text=False), **nodes})
    assert comfy.output("5").datasets[0].fp_latent_window_size == 4


def test_dataset_from_images_caption_count_mismatch_is_named(comfy):
    nodes = images_node("one\ntwo")
    prompt = {**cache_prompt(nodes.pop("1"), text=False), **nodes}
    run(comfy, prompt, expect_success=False)
    msg = comfy.error_message()
    assert "captions" in msg and "3 image" in msg, msg


def test_demo_shape_clips_become_one_item_per_clip(comfy, tmp_path):
    """Musubi Demo Shape Clips -> Dataset from Images with frames_per_clip: one captioned 9-frame clip per
    combination, cached as video items; the frames are the engine's clips."""
    shapes = comfy.pack_module("engine.demo.shapes")
    source = {"class_type": "MusubiDatasetFromImages", "inputs": {
        "images": ["0", 0], "captions": ["0", 1], "frames_per_clip": ["0", 2], "width": 64, "height": 64,
        "num_repeats": 1, "as_video": False, "cache_directory": str(tmp_path / "c")}}
    prompt = {**cache_prompt(source), "0": {"class_type": "MusubiDemoShapeClips", "inputs": {
        "colours": "magenta, cyan", "shapes": "circle", "motions": "up; left", "clips_per_combination": 1,
        "variation": 3, "frames": 9, "width": 64, "height": 64}}}
    r = run(comfy, prompt)
    frames, captions, per_clip = (comfy.output("0", i) for i in range(3))
    assert per_clip == 9 and frames.shape == (4 * 9, 64, 64, 3)
    assert captions.splitlines() == ["a magenta circle moving up", "a magenta circle moving to the left",
                                     "a cyan circle moving up", "a cyan circle moving to the left"]
    expected = shapes.render_clip(shapes.ClipSpec("cyan", "circle", "left"), 3 * 100003 + 3 * 1009, frames=9)
    assert (frames[27:36] * 255).round().byte().numpy().tolist() == expected.tolist()
    assert counts(text_of(r, "5")) == (4, 0, 0) and counts(text_of(r, "6")) == (4, 0, 0)
    clips = manifest(tmp_path / "c")["items"].values()
    assert sorted(c["latents"]["clips"][0]["frames"] for c in clips) == [9] * 4

    for field, value, said in (("colours", "purple", "purple"), ("frames", 8, "4k+1")):
        bad = copy.deepcopy(prompt)
        bad["0"]["inputs"][field] = value
        run(comfy, bad, expect_success=False)
        assert field in comfy.error_message() and said in comfy.error_message(), comfy.error_message()
    bad = copy.deepcopy(prompt)
    bad["1"]["inputs"]["frames_per_clip"] = 5
    run(comfy, bad, expect_success=False)
    assert "frames_per_clip" in comfy.error_message() and "36 images" in comfy.error_message()


# --- cancel + resume --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("emulate", [False, True], ids=["0.3.75", "0.38-emulated"])
def test_cancel_during_cache_latents_stops_within_one_item_and_resumes(comfy, tmp_path, emulate):
    data = make_sample_dataset(tmp_path / "media", num_images=5, num_videos=0, num_frame_folders=0)
    cache = tmp_path / "cache"
    prompt = cache_prompt(folder_node(data["images"], cache), text=False, workers=1)
    comfy.cancel_after = ("5", 3)  # progress call 1 is the start (0/total), then one per item: cancel after item 2
    try:
        if emulate:
            with comfy.emulate_038():
                run(comfy, prompt, expect_success=False)
        else:
            run(comfy, prompt, expect_success=False)
    finally:
        comfy.cancel_after = None
    assert not comfy.executor.success and comfy.events_of("execution_interrupted"), comfy.server.events[-3:]
    done = [k for k, v in manifest(cache)["items"].items() if "latents" in v]
    # Cancel requested after item 2; the throttled (0.38) hook drops that update, the next item's check stops it.
    assert 2 <= len(done) <= 3, done
    assert len(list(cache.glob("*_wan.safetensors"))) == len(done)

    r = run(comfy, prompt)
    assert counts(text_of(r, "5")) == (5 - len(done), len(done), 0)


# --- bad inputs -------------------------------------------------------------------------------------------------------
def test_missing_folder_is_named(comfy, tmp_path):
    missing = tmp_path / "no_such_folder"
    run(comfy, cache_prompt(folder_node(missing), text=False), expect_success=False)
    msg = comfy.error_message()
    assert "folder" in msg and str(missing) in msg, msg


def test_toml_unknown_key_is_named(comfy, tmp_path):
    make_sample_dataset(tmp_path / "media", num_images=1, num_videos=0, num_frame_folders=0)
    toml = tmp_path / "bad.toml"
    toml.write_text('[[datasets]]\nimage_directory = "media/images"\nresoluton = [64, 48]\n')
    run(comfy, cache_prompt({"class_type": "MusubiDatasetFromTOML", "inputs": {"toml_path": str(toml)}}, text=False),
              expect_success=False)
    msg = comfy.error_message()
    assert "bad.toml" in msg and "#0" in msg and "resoluton" in msg, msg


def test_missing_toml_is_named_and_i2v_caches_without_clip(comfy, tmp_path):
    run(comfy, cache_prompt({"class_type": "MusubiDatasetFromTOML",
                            "inputs": {"toml_path": str(tmp_path / "nope.toml")}}, text=False), expect_success=False)
    assert "toml_path" in comfy.error_message() and "nope.toml" in comfy.error_message()

    # i2v without CLIP vision: the Wan 2.2 A14B I2V experts' cache (image latents, no CLIP features; a Wan 2.1
    # I2V model refuses it when training starts)
    data = make_sample_dataset(tmp_path / "media", num_images=1, num_videos=0, num_frame_folders=0)
    run(comfy, cache_prompt(folder_node(data["images"], tmp_path / "c"), text=False, task="i2v"))
    latent = comfy.output("5").latent
    assert latent["i2v"] and "clip" not in latent, latent


def test_failed_dataset_from_folder_leaves_no_empty_cache_folder(comfy, tmp_path):
    """Issue 23 item 7: the cache folder appears only when something is written into it."""
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")   # no caption next to it: the dataset has no usable items
    cache = tmp_path / "cache_never"
    run(comfy, cache_prompt(folder_node(folder, cache), text=False), expect_success=False)
    assert "no usable items" in comfy.error_message(), comfy.error_message()
    assert not cache.exists()
    nodes_data = comfy.pack_module("nodes.data")
    default = nodes_data._cache_root()
    before = set(default.iterdir()) if default.is_dir() else set()
    run(comfy, cache_prompt(folder_node(folder), text=False), expect_success=False)
    after = set(default.iterdir()) if default.is_dir() else set()
    assert after == before, after - before


def test_dataset_warnings_are_shown_on_the_nodes(comfy, tmp_path):
    """Issue 23 item 8: frame counts rounded to 4k+1, a UTF-8 BOM, empty captions and captions cut at 512 tokens are
    shown on the node (progress text), not only in the console."""
    data = make_sample_dataset(tmp_path / "media", num_images=0, num_videos=3, num_frame_folders=0)
    caps = sorted(Path(data["videos"]).glob("*.txt"))
    caps[0].write_bytes(b"\xef\xbb\xbfa moving square")
    caps[1].write_text("")
    caps[2].write_text(" ".join(["a red square moving to the right"] * 200))
    r = run(comfy, cache_prompt(folder_node(data["videos"], tmp_path / "cache", kind="video", target_frames="1,6")))
    shown = {}
    for node, text in comfy.server.texts:
        shown.setdefault(node, []).append(text)
    source, texts = "\n".join(shown.get("1", [])), "\n".join(shown.get("6", []))
    assert "6 frames is not 4k+1; using 5" in source, shown
    assert "byte-order mark" in source and caps[0].name in source, shown
    assert "empty caption" in source and caps[1].stem in source, shown
    assert "truncated to 512" in texts, shown
    assert "truncated to 512" in text_of(r, "6")


def test_text_encode_node_shows_a_truncated_prompt(comfy):
    p = {"1": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
         "2": {"class_type": "MusubiWanTextEncode", "inputs": {
             "text_encoder": ["1", 0], "prompt": " ".join(["a red square moving to the right"] * 200),
             "negative_prompt": "", "offload_after": True}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}}}
    run(comfy, p)
    assert any(n == "2" and "truncated to 512" in t for n, t in comfy.server.texts), comfy.server.texts
