"""Frame extraction, fps dropping, bucketing, resize/crop, media decoding and media errors."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.buckets import bucket_resolutions, fit_frames, resize_and_crop, select_bucket
from engine.data.config import dataset_from_folder
from engine.data.frames import extract_clips, kept_frame_indices, round_down_4k1
from engine.data.items import DatasetWarning, list_items
from engine.data.media import load_image, read_video
from engine.errors import MusubiInputError

REPO = Path(__file__).resolve().parent.parent


def _sample_module():
    spec = importlib.util.spec_from_file_location("make_sample_media", REPO / "scripts" / "make_sample_media.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- frame extraction (hand-computed indices) ------------------------------------------------------------------

def test_round_down_4k1():
    assert [round_down_4k1(n) for n in (1, 2, 4, 5, 8, 9, 48, 49)] == [1, 1, 1, 5, 5, 9, 45, 49]


def test_head():
    assert extract_clips(20, "head", [1, 5, 25]) == [(0, 1), (0, 5)]


def test_chunk():
    assert extract_clips(20, "chunk", [5, 9]) == [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (9, 9)]


def test_slide():
    assert extract_clips(20, "slide", [9], frame_stride=4) == [(0, 9), (4, 9), (8, 9)]
    assert extract_clips(9, "slide", [9], frame_stride=4) == [(0, 9)]


def test_uniform():
    # linspace(0, 11, 3) = 0, 5.5, 11 -> truncated
    assert extract_clips(20, "uniform", [9], frame_sample=3) == [(0, 9), (5, 9), (11, 9)]
    # frame_sample 1 behaves as head
    assert extract_clips(20, "uniform", [5, 9], frame_sample=1) == [(0, 5), (0, 9)]
    # duplicates possible when L - T is small: linspace(0, 1, 4) = 0, 1/3, 2/3, 1
    assert extract_clips(10, "uniform", [9], frame_sample=4) == [(0, 9), (0, 9), (0, 9), (1, 9)]


def test_full():
    assert extract_clips(20, "full", [1], max_frames=129) == [(0, 17)]
    assert extract_clips(20, "full", [1], max_frames=10) == [(0, 9)]
    assert extract_clips(0, "full", [1]) == []


def test_too_short_and_bad_mode():
    assert extract_clips(4, "head", [5, 9]) == []
    with pytest.raises(MusubiInputError, match="chain"):
        extract_clips(10, "chain", [5])


def test_source_fps_dropping():
    # 30 -> 16 fps: frame i maps to floor(i * 16 / 30); repeats dropped
    assert kept_frame_indices(16, 30.0, 16.0) == [0, 2, 4, 6, 8, 10, 12, 14, 15]
    # 24 -> 16: floor(2i/3) = 0,0,1,2,2,3,4,4
    assert kept_frame_indices(8, 24.0, 16.0) == [0, 2, 3, 5, 6]
    # never duplicates: a slower source keeps every frame; no source_fps: no dropping
    assert kept_frame_indices(5, 12.0, 16.0) == [0, 1, 2, 3, 4]
    assert kept_frame_indices(5, None, 16.0) == [0, 1, 2, 3, 4]


# --- buckets ---------------------------------------------------------------------------------------------------------

def test_bucket_list_960x544():
    buckets = bucket_resolutions((960, 544))
    area = 960 * 544
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= area for w, h in buckets)
    # sqrt(A) = 722: widths floor(361)->352, 368, ..., 736 (< 722 + 16), each with height floor(A / w) to 16
    for w in range(352, 737, 16):
        assert (w, area // w // 16 * 16) in buckets
    assert (336, area // 336 // 16 * 16) not in buckets and max(w for w, h in buckets) == 1472
    assert len(buckets) == 2 * 25 - 3  # 25 widths, both orientations, 3 pairs coincide
    assert (352, 1472) in buckets and (1472, 352) in buckets  # 522240 / 352 = 1483.6 -> 1472
    assert (736, 704) in buckets and (704, 736) in buckets
    assert (960, 544) in buckets and (544, 960) in buckets


def test_select_bucket():
    # 16:9 -> nearest aspect ratio: (960, 544) ar 1.765 beats (976, 528) 1.848 and (928, 560) 1.657
    assert select_bucket((1920, 1080), (960, 544), True) == (960, 544)
    assert select_bucket((1080, 1920), (960, 544), True) == (544, 960)
    # no bucketing: the resolution itself
    assert select_bucket((1080, 1920), (960, 544), False) == (960, 544)
    # no upscale: small images keep their size floored to 16; large ones bucket normally
    assert select_bucket((200, 100), (512, 512), True, bucket_no_upscale=True) == (192, 96)
    assert select_bucket((2000, 1000), (512, 512), True, bucket_no_upscale=True) == select_bucket(
        (2000, 1000), (512, 512), True)
    with pytest.raises(MusubiInputError, match="frame size"):
        select_bucket((8, 100), (512, 512), True)


def test_resize_and_crop():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = (255, 0, 0)
    img[:, 32:] = (0, 0, 255)
    out = resize_and_crop(img, (32, 32))  # cover scale 1 -> center crop columns 16..48
    assert out.shape == (32, 32, 3)
    assert (out[:, :16] == (255, 0, 0)).all() and (out[:, 16:] == (0, 0, 255)).all()
    # downscale: 128x64 -> cover (32, 32): scale 0.5 -> 64x32, crop columns 16..48
    big = np.repeat(np.repeat(img, 2, 0), 2, 1)
    assert (resize_and_crop(big, (32, 32)) == out).all()
    # upscale a flat frame stays flat; video input keeps its frame axis
    flat = np.full((3, 16, 16, 3), 77, np.uint8)
    up = resize_and_crop(flat, (32, 48))
    assert up.shape == (3, 48, 32, 3) and (up == 77).all()


# --- media -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return _sample_module().make_sample_dataset(root, num_images=2, num_videos=1, num_frame_folders=1,
                                                size=(64, 48), frames=17)


def test_sample_media_deterministic(tmp_path, media):
    again = _sample_module().make_sample_dataset(tmp_path, num_images=2, num_videos=1, num_frame_folders=1,
                                                 size=(64, 48), frames=17)
    name = "image_000.png"
    assert (Path(again["images"]) / name).read_bytes() == (Path(media["images"]) / name).read_bytes()
    # mp4 headers carry the creation time, so compare what a reader gets: the decoded frames
    name = "video_000.mp4"
    assert np.array_equal(read_video(Path(again["videos"]) / name), read_video(Path(media["videos"]) / name))


def test_read_video_and_drop(media):
    path = Path(media["videos"]) / "video_000.mp4"
    frames = read_video(path)
    assert frames.shape == (17, 48, 64, 3) and frames.dtype == np.uint8
    mod = _sample_module()
    expected, _ = mod.render_clip(64, 48, 17, 0)
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 4  # lossy codec, near-lossless settings
    assert (read_video(path, max_frames=5) == frames[:5]).all()
    halved = read_video(path, source_fps=32.0, target_fps=16.0)
    assert (halved == frames[::2]).all()


def test_image_folder_as_video_sorted_by_name(tmp_path):
    from PIL import Image
    folder = tmp_path / "clip"
    folder.mkdir()
    for name, value in (("b.png", 20), ("a.png", 10), ("c.jpg", 30)):
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(folder / name, quality=100)
    frames = read_video(folder)
    assert [int(round(f.mean())) for f in frames] == [10, 20, 30]


def test_corrupt_video_named(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(MusubiInputError, match="broken.mp4"):
        read_video(bad)


def test_unreadable_image_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(MusubiInputError, match="broken.png"):
        load_image(bad)


def test_missing_caption_image_warns_and_skips(tmp_path):
    from PIL import Image
    for n in ("a", "b"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / f"{n}.png")
    (tmp_path / "a.txt").write_text("caption a")
    with pytest.warns(DatasetWarning, match="b.png"):
        items = list_items(dataset_from_folder(tmp_path, kind="image").datasets[0])
    assert [it.key for it in items] == ["a"] and items[0].caption == "caption a"


def test_missing_caption_video_is_error(tmp_path, media):
    import shutil
    shutil.copy(Path(media["videos"]) / "video_000.mp4", tmp_path / "v.mp4")
    with pytest.raises(MusubiInputError, match="v.mp4"):
        list_items(dataset_from_folder(tmp_path, kind="video").datasets[0])


def test_jsonl_items(tmp_path, media):
    lines = [f'{{"video_path": "{media["videos"]}/video_000.mp4", "caption": "one"}}',
             f'{{"video_path": "{media["videos"]}/frames_000", "caption": "two"}}']
    (tmp_path / "v.jsonl").write_text("\n".join(lines) + "\n")
    from engine.data.config import load_dataset_config
    cfg = load_dataset_config(f'[[datasets]]\nvideo_jsonl_file = "v.jsonl"\ncache_directory = "c"\n', base_dir=tmp_path)
    items = list_items(cfg.datasets[0])
    assert [(it.key, it.caption) for it in items] == [("frames_000", "two"), ("video_000", "one")]
    (tmp_path / "bad.jsonl").write_text('{"video_path": 3}\n')
    cfg = load_dataset_config('[[datasets]]\nvideo_jsonl_file = "bad.jsonl"\ncache_directory = "c"\n', base_dir=tmp_path)
    with pytest.raises(MusubiInputError, match="bad.jsonl line 1"):
        list_items(cfg.datasets[0])


# --- every Pillow mode read as the picture it shows (issue 23 item 4) -------------------------------------------

def test_16bit_greyscale_png_scaled_not_whitened(tmp_path):
    from PIL import Image

    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = load_image(tmp_path / "g16.png")
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    expect = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(got[..., 0], expect) and np.array_equal(got[..., 2], expect)
    assert (got == 255).mean() < 0.01


def test_32bit_integer_mode_scaled_from_16bit_range():
    from PIL import Image
    from engine.data.media import to_rgb8

    # older Pillow opens 16-bit PNGs as mode "I"; the current one cannot write "I" to PNG, so build it in memory
    im = Image.fromarray(np.full((16, 16), 32896, dtype=np.int32))  # 128 * 257
    assert im.mode == "I"
    assert np.all(to_rgb8(im) == 128)


def test_rgba_composited_on_white(tmp_path):
    from PIL import Image
    from engine.data.media import ALPHA_BACKGROUND

    assert ALPHA_BACKGROUND == (255, 255, 255)
    a = np.zeros((16, 16, 4), dtype=np.uint8)
    a[..., 0] = 200          # red hidden under alpha 0 on the left half, half-transparent on the right
    a[:, 8:, 3] = 128
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png").astype(int)
    assert np.all(got[:, :8] == 255)                     # fully transparent -> background
    assert np.all(np.abs(got[:, 8:, 0] - 227) <= 1)      # 200*128/255 + 255*127/255
    assert np.all(np.abs(got[:, 8:, 1] - 127) <= 1)


def test_palette_with_transparency_and_greyscale_alpha(tmp_path):
    from PIL import Image

    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.paste(1, (0, 0, 4, 8))
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    got = load_image(tmp_path / "p.png")
    assert np.all(got[:, :4] == [10, 200, 30]) and np.all(got[:, 4:] == 255)
    la = Image.fromarray(np.stack([np.full((8, 8), 50, np.uint8), np.zeros((8, 8), np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.all(load_image(tmp_path / "la.png") == 255)


def test_cmyk_and_greyscale_converted(tmp_path):
    from PIL import Image

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    got = load_image(tmp_path / "c.jpg").astype(int)
    assert np.all(np.abs(got - [255, 0, 0]) <= 8)
    Image.new("L", (8, 8), 77).save(tmp_path / "l.png")
    assert np.all(load_image(tmp_path / "l.png") == 77)


# --- the dataset preview grid (engine/data/preview.py) ----------------------------------------------------------------
def test_preview_grid_shows_evenly_spaced_frames_label_and_wrapped_caption():
    from engine.data.preview import BACKGROUND, LINE_H, PAD, render_clip_grid

    tile = 40
    frames = np.zeros((9, 20, 30, 3), np.uint8)
    for i in range(9):
        frames[i] = (i * 25, 255 - i * 25, 7)          # every frame its own colour
    long_caption = " ".join(["word"] * 200)
    rows = [{"frames": frames, "label": "#0 clip  32x32  9 frame(s)", "caption": long_caption},
            {"frames": frames[:1], "label": "#0 still", "caption": ""}]
    grid = render_clip_grid(rows, frames_per_clip=3, tile=tile)
    width = PAD + 3 * (tile + PAD)
    row0 = PAD + tile + PAD + LINE_H * (1 + 3) + PAD   # label + caption cut to 3 lines
    row1 = PAD + tile + PAD + LINE_H * (1 + 1) + PAD   # label + "(empty caption)"
    assert grid.shape == (row0 + row1, width, 3) and grid.dtype == np.uint8
    for j, fi in enumerate((0, 4, 8)):                  # frames 0, 4, 8: evenly spaced, centred in their tiles
        x = PAD + j * (tile + PAD) + tile // 2
        assert tuple(grid[PAD + tile // 2, x]) == tuple(frames[fi, 0, 0]), (j, fi)
    assert tuple(grid[row0 + PAD + tile // 2, PAD + 1 * (tile + PAD) + tile // 2]) == BACKGROUND   # one frame only
    empty = render_clip_grid([], frames_per_clip=2, tile=tile)
    assert empty.shape[1] == PAD + 2 * (tile + PAD) and (empty != BACKGROUND).any()   # the "no clips" message


@pytest.mark.parametrize("mode", ["stretch", "crop", "pad"])
def test_fit_frames_keeps_or_ignores_the_aspect_ratio(mode):
    """A 2:1 image with a centred white square, fitted to a square: stretch squashes it, crop keeps the centre at
    the same aspect, pad letterboxes it with black bars above and below."""
    x = torch.zeros(1, 3, 32, 64)
    x[..., 8:24, 24:40] = 1.0                                   # a 16x16 white square in the middle
    y = fit_frames(x, 32, 32, mode)
    assert y.shape == (1, 3, 32, 32)
    white = (y[0, 0] > 0.5)
    rows, cols = white.any(1).nonzero().flatten(), white.any(0).nonzero().flatten()
    height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    if mode == "stretch":
        assert (height, width) == (16, 8)                      # squashed horizontally
    elif mode == "crop":
        assert (height, width) == (16, 16)                     # same scale, sides cut
        assert y.shape[-1] == 32 and white[:, :8].sum() == 0
    else:
        assert (height, width) == (8, 8)                       # scaled by 1/2, aspect kept
        assert y[..., :8, :].abs().max() == 0 and y[..., 24:, :].abs().max() == 0   # black bars
    with pytest.raises(MusubiInputError, match="resize_mode"):
        fit_frames(x, 32, 32, "squash")
