"""Dataset TOML schema: every key, lookup order, refusals naming file / dataset index / key, builders."""

import warnings

import pytest
import torch

from engine.data.config import (DatasetConfig, ImageDatasetConfig, VideoDatasetConfig, dataset_from_folder,
                                dataset_from_tensors, load_dataset_config)
from engine.errors import MusubiInputError


def _load(text, tmp_path):
    return load_dataset_config(text, base_dir=tmp_path)


def test_full_schema_and_lookup_order(tmp_path):
    toml = """
[general]
resolution = [960, 544]
caption_extension = ".caption"
batch_size = 2
num_repeats = 3
enable_bucket = true
bucket_no_upscale = true

[[datasets]]
image_directory = "imgs"
cache_directory = "cache_img"
control_directory = "ctrl"
resolution = 512
fp_latent_window_size = 5
fp_1f_clean_indices = [0, 10]
fp_1f_target_index = 1
fp_1f_no_post = true
no_resize_control = true
control_resolution = [256, 128]
multiple_target = false

[[datasets]]
video_directory = "vids"
batch_size = 1
target_frames = [1, 25, 45]
frame_extraction = "slide"
frame_stride = 10
frame_sample = 4
max_frames = 81
source_fps = 30.0

[[datasets]]
video_jsonl_file = "v.jsonl"
cache_directory = "cache_jsonl"
enable_bucket = false
"""
    cfg = _load(toml, tmp_path)
    assert isinstance(cfg, DatasetConfig) and cfg.general.batch_size == 2
    img, vid, jsonl = cfg.datasets
    assert isinstance(img, ImageDatasetConfig) and isinstance(vid, VideoDatasetConfig)
    # dataset value wins over general; general over default
    assert img.resolution == (512, 512) and vid.resolution == (960, 544)
    assert img.batch_size == 2 and vid.batch_size == 1
    assert img.caption_extension == vid.caption_extension == ".caption"
    assert img.num_repeats == vid.num_repeats == 3
    assert img.enable_bucket and vid.bucket_no_upscale and jsonl.enable_bucket is False
    assert img.image_directory == str((tmp_path / "imgs").resolve())
    assert img.cache_directory == str((tmp_path / "cache_img").resolve())
    assert img.control_directory == str((tmp_path / "ctrl").resolve())
    assert (img.fp_latent_window_size, img.fp_1f_clean_indices, img.fp_1f_target_index) == (5, [0, 10], 1)
    assert img.fp_1f_no_post and img.no_resize_control and img.control_resolution == (256, 128)
    assert img.multiple_target is False
    assert vid.target_frames == [1, 25, 45] and vid.frame_extraction == "slide"
    assert (vid.frame_stride, vid.frame_sample, vid.max_frames, vid.source_fps) == (10, 4, 81, 30.0)
    # cache_directory defaults to the media folder
    assert vid.cache_directory == vid.video_directory
    assert jsonl.video_jsonl_file == str((tmp_path / "v.jsonl").resolve())
    # defaults
    assert jsonl.frame_extraction == "head" and jsonl.target_frames == [1] and jsonl.max_frames == 129
    assert jsonl.source_fps is None and jsonl.fp_latent_window_size == 9


def test_defaults_without_general(tmp_path):
    cfg = _load('[[datasets]]\nimage_directory = "a"\n', tmp_path)
    ds = cfg.datasets[0]
    assert ds.resolution == (960, 544) and ds.batch_size == 1 and ds.num_repeats == 1
    assert not ds.enable_bucket and not ds.bucket_no_upscale and ds.caption_extension is None


def test_target_frames_rounded_dedup_sorted(tmp_path):
    with pytest.warns(UserWarning, match="not 4k\\+1"):
        cfg = _load('[[datasets]]\nvideo_directory = "v"\ntarget_frames = [48, 1, 45, 46, 17]\n', tmp_path)
    assert cfg.datasets[0].target_frames == [1, 17, 45]


def test_source_fps_int_accepted(tmp_path):
    cfg = _load('[[datasets]]\nvideo_directory = "v"\nsource_fps = 30\n', tmp_path)
    assert cfg.datasets[0].source_fps == 30.0


def test_deprecated_aliases(tmp_path):
    with pytest.warns(UserWarning, match="deprecated"):
        cfg = _load('[[datasets]]\nimage_directory = "a"\nflux_kontext_no_resize_control = true\n'
                    'qwen_image_edit_control_resolution = 512\n', tmp_path)
    assert cfg.datasets[0].no_resize_control is True and cfg.datasets[0].control_resolution == (512, 512)


@pytest.mark.parametrize("body, words", [
    ('[[datasets]]\nimage_directory = "a"\nfoo = 1\n', ["#0", "'foo'"]),
    ('[[datasets]]\nimage_directory = "a"\n[[datasets]]\nvideo_directory = "b"\nno_resize_control = true\n',
     ["#1", "no_resize_control", "not allowed in a video dataset"]),
    ('[[datasets]]\nimage_directory = "a"\ntarget_frames = [1]\n', ["#0", "target_frames", "not allowed in a image"]),
    ('[[datasets]]\nimage_directory = "a"\nbatch_size = "2"\n', ["#0", "batch_size", "'2'", "integer"]),
    ('[[datasets]]\nimage_directory = "a"\nenable_bucket = 1\n', ["enable_bucket", "true or false"]),
    ('[[datasets]]\nvideo_directory = "a"\nframe_extraction = "chain"\n', ["frame_extraction", "'chain'", "head"]),
    ('[[datasets]]\nimage_directory = "a"\nresolution = [1, 2, 3]\n', ["resolution", "[width, height]"]),
    ('[[datasets]]\nvideo_directory = "a"\nsource_fps = "30"\n', ["source_fps"]),
    ('[general]\nframe_stride = 2\n[[datasets]]\nimage_directory = "a"\n', ["[general]", "frame_stride"]),
    ('[general]\ncache_directory = "x"\n[[datasets]]\nimage_directory = "a"\n', ["[general]", "cache_directory"]),
    ('[[datasets]]\nimage_jsonl_file = "a.jsonl"\n', ["#0", "cache_directory", "JSONL"]),
    ('[[datasets]]\nimage_directory = "a"\nimage_jsonl_file = "b.jsonl"\ncache_directory = "c"\n', ["exactly one"]),
    ('[[datasets]]\nimage_directory = "a"\n[[datasets]]\nimage_directory = "a"\n', ["#1", "cache_directory"]),
    ('[other]\n', ["other"]),
    ('', ["[[datasets]]"]),
])
def test_refusals_name_the_key(tmp_path, body, words):
    f = tmp_path / "ds.toml"
    f.write_text(body)
    with pytest.raises(MusubiInputError) as e:
        load_dataset_config(f)
    msg = str(e.value)
    assert str(f) in msg
    for w in words:
        assert w in msg


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(MusubiInputError, match="invalid TOML"):
        _load("[[datasets]\n", tmp_path)
    with pytest.raises(MusubiInputError, match="existing"):
        load_dataset_config(tmp_path / "missing.toml")


def test_json_config_and_relative_to_file(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    f = sub / "ds.json"
    f.write_text('{"general": {"batch_size": 4}, "datasets": [{"image_directory": "../imgs"}]}')
    cfg = load_dataset_config(f)
    assert cfg.datasets[0].batch_size == 4
    assert cfg.datasets[0].image_directory == str((tmp_path / "imgs").resolve())


def test_dataset_from_folder(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    cfg = dataset_from_folder(tmp_path, resolution=256, target_frames=[17, 18], frame_extraction="chunk")
    ds = cfg.datasets[0]
    assert isinstance(ds, VideoDatasetConfig) and ds.resolution == (256, 256) and ds.target_frames == [17]
    assert ds.enable_bucket and ds.caption_extension == ".txt" and ds.frame_extraction == "chunk"
    with pytest.raises(MusubiInputError, match="frame_stride"):
        dataset_from_folder(tmp_path, frame_stride=0)
    img = tmp_path / "imgs"
    img.mkdir()
    assert isinstance(dataset_from_folder(img).datasets[0], ImageDatasetConfig)


def test_dataset_from_tensors(tmp_path):
    images = torch.rand(3, 32, 48, 3)
    cfg = dataset_from_tensors(images, ["a", "b", "c"], tmp_path / "cache", resolution=(48, 32))
    ds = cfg.datasets[0]
    assert isinstance(ds, ImageDatasetConfig) and len(ds.in_memory) == 3
    assert ds.in_memory[1].frames.shape == (1, 32, 48, 3) and ds.in_memory[1].caption == "b"
    expected = (images[2] * 255).round().to(torch.uint8).numpy()
    assert (ds.in_memory[2].frames[0] == expected).all()
    clips = [torch.rand(9, 32, 32, 3), torch.rand(6, 32, 32, 3)]
    vcfg = dataset_from_tensors(clips, ["x", "y"], tmp_path / "c2")
    assert isinstance(vcfg.datasets[0], VideoDatasetConfig) and vcfg.datasets[0].frame_extraction == "full"
    assert vcfg.datasets[0].fp_latent_window_size == 9                     # Musubi's default
    assert dataset_from_tensors(clips, ["x", "y"], tmp_path / "c2", fp_latent_window_size=4
                                ).datasets[0].fp_latent_window_size == 4
    with pytest.raises(MusubiInputError, match="fp_latent_window_size.*0.*integer >= 1"):
        dataset_from_tensors(clips, ["x", "y"], tmp_path / "c2", fp_latent_window_size=0)
    with pytest.raises(MusubiInputError, match="one caption each"):
        dataset_from_tensors(images, ["a"], tmp_path / "c3")
    with pytest.raises(MusubiInputError, match="N, H, W, 3"):
        dataset_from_tensors(torch.rand(3, 32, 32), ["a", "b", "c"], tmp_path / "c4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset_from_tensors(images, ["a", "b", "c"], tmp_path / "c5")
