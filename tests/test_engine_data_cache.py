"""Caches: build, invalidation, resume, stale cleanup, model checks, and the trainer loader (with fake encoders)."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import (CachedBatchLoader, build_cache, check_cache_for_model, dataset_from_tensors,
                         load_dataset_config, manifest_path)
from engine.families.wan.cache import WanCacheAdapter
from engine.families.wan.cache import cache_requirements as wan_cache_requirements
from engine.data.cache import prepare_item
from engine.data.items import list_items
from engine.errors import MusubiInputError

REPO = Path(__file__).resolve().parent.parent


class FakeVAE:
    """[B,3,F,H,W] -> [B,16,(F-1)/4+1,H/8,W/8]: 8x8 mean pooling, first frame + groups of 4, 16 channels."""

    def __init__(self, identity="fake-vae", fail_on_call=None):
        self.identity, self.calls, self.fail_on_call = identity, 0, fail_on_call

    def encode(self, video):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("injected VAE failure")
        B, C, F, H, W = video.shape
        assert C == 3 and (F - 1) % 4 == 0 and H % 8 == 0 and W % 8 == 0 and video.abs().max() <= 1
        x = video.reshape(B, 3, F, H // 8, 8, W // 8, 8).mean((4, 6))
        x = torch.cat([x[:, :, :1], x[:, :, 1:].reshape(B, 3, (F - 1) // 4, 4, H // 8, W // 8).mean(3)], 2)
        scale = torch.arange(1, 17, dtype=x.dtype).view(1, 16, 1, 1, 1)
        return x.repeat(1, 6, 1, 1, 1)[:, :16] * scale


class FakeText:
    def __init__(self, identity="fake-t5", dim=32):
        self.identity, self.dim, self.prompts = identity, dim, []

    def encode(self, prompts):
        self.prompts.extend(prompts)
        out = []
        for p in prompts:
            codes = torch.tensor([float(ord(c)) for c in p[: 3 + len(p) % 5]])
            out.append(codes[:, None] * torch.linspace(0, 1, self.dim)[None])  # [L, dim]
        return out


class FakeClip:
    identity = "fake-clip"

    def encode(self, images):
        assert images.ndim == 4 and images.shape[1] == 3
        return images.mean((1, 2, 3))[:, None, None].expand(-1, 257, 8).clone()


def _sample_module():
    spec = importlib.util.spec_from_file_location("make_sample_media", REPO / "scripts" / "make_sample_media.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def media_src(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    _sample_module().make_sample_dataset(root, num_images=4, num_videos=2, num_frame_folders=1, size=(64, 48),
                                         frames=13)
    return root


@pytest.fixture
def data(tmp_path, media_src):
    shutil.copytree(media_src, tmp_path / "data")
    return tmp_path / "data"


def _config(data, resolution="[64, 48]", extra=""):
    return load_dataset_config(f"""
[general]
resolution = {resolution}
caption_extension = ".txt"
enable_bucket = true
[[datasets]]
image_directory = "images"
cache_directory = "cache_images"
batch_size = 2
{extra}
[[datasets]]
video_directory = "videos"
cache_directory = "cache_videos"
target_frames = [1, 5, 9]
frame_extraction = "head"
""", base_dir=data)


def _adapter(**kw):
    kw.setdefault("vae", FakeVAE())
    kw.setdefault("text_encoder", FakeText())
    return WanCacheAdapter(dtype=torch.float32, text_dtype=torch.float32, **kw)


def test_build_and_read_back_exact(data):
    cfg = _config(data)
    adapter = _adapter()
    calls = []
    report = build_cache(cfg, adapter, progress=lambda i, n: calls.append((i, n)))
    assert sorted(report.latents_encoded) == sorted(["image_000", "image_001", "image_002", "image_003",
                                                     "video_000", "video_001", "frames_000"])
    # 7 latent items + 7 captions (text ticks per batch of captions): ends at (14, 14), strictly increasing
    assert calls[-1] == (14, 14) and all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    # video clips: 13 frames, targets 1/5/9 -> 3 clips per video, 3 videos; images: 4
    assert report.clips_written == 4 + 9
    names = sorted(p.name for p in (data / "cache_videos").iterdir())
    assert "video_000_00000-009_0064x0048_wan.safetensors" in names and "video_000_wan_te.safetensors" in names
    assert "image_000_0064x0048_wan.safetensors" in sorted(p.name for p in (data / "cache_images").iterdir())

    cached = check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, vae_identity="fake-vae"))
    loader = CachedBatchLoader(cached, seed=3)
    seen = {}
    for batch in loader:
        B = batch["latents"].shape[0]
        assert len(batch["context"]) == B == len(batch["keys"])
        for b in range(B):
            seen.setdefault(batch["keys"][b], []).append((batch["latents"][b], batch["context"][b]))
    # exact tensors: recompute with a fresh fake VAE from the prepared clips
    ds_video = cfg.datasets[1]
    item = next(it for it in list_items(ds_video) if it.key == "video_001")
    expected = [FakeVAE().encode(torch.from_numpy(pc.clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1)[0]
                for pc in prepare_item(item, ds_video, 16.0, "wan")]
    got = sorted(seen["video_001"], key=lambda t: t[0].shape[1])
    assert [tuple(g[0].shape) for g in got] == [(16, 1, 6, 8), (16, 2, 6, 8), (16, 3, 6, 8)]
    for g, e in zip(got, sorted(expected, key=lambda t: t.shape[1])):
        assert torch.equal(g[0], e)
    assert torch.equal(got[0][1], FakeText().encode([item.caption])[0])


def test_an_adapter_may_store_a_clip_as_several_files(data):
    """`encode_clip_files`: each file is its own training sample, listed in the manifest and kept by cleanup."""

    class Split(WanCacheAdapter):
        def encode_clip_files(self, file, clip, ds):
            whole = self.encode_clip(clip)
            stem = file[: -len("_wan.safetensors")]
            return {f"{stem}-{i:04d}_wan.safetensors": {k: v[:, i:i + 1] if k.startswith("latents") else v
                                                         for k, v in whole.items()}
                    for i in range(whole[next(k for k in whole if k.startswith("latents"))].shape[1])}

    cfg = _config(data)
    adapter = Split(vae=FakeVAE(), text_encoder=FakeText(), dtype=torch.float32, text_dtype=torch.float32)
    report = build_cache(cfg, adapter)
    assert report.clips_written == 4 + 3 * (1 + 2 + 3)           # one file per latent frame
    names = {p.name for p in (data / "cache_videos").iterdir()}
    assert {f"video_000_00000-009_0064x0048-{i:04d}_wan.safetensors" for i in range(3)} <= names
    cached = check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, vae_identity="fake-vae"))
    assert sum(len(d.samples) for d in cached) == 4 + 18
    assert build_cache(cfg, adapter).clips_written == 0            # up to date: nothing re-encoded, nothing removed
    assert names <= {p.name for p in (data / "cache_videos").iterdir()}


def test_changed_caption_recomputes_only_its_text(data):
    cfg = _config(data)
    build_cache(cfg, _adapter())
    (data / "images" / "image_002.txt").write_text("a brand new caption")
    vae, te = FakeVAE(), FakeText()
    report = build_cache(cfg, _adapter(vae=vae, text_encoder=te))
    assert te.prompts == ["a brand new caption"] and vae.calls == 0
    assert report.texts_encoded == ["image_002"] and report.latents_encoded == []
    check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))


def test_changed_setting_or_file_recomputes_latents(data):
    build_cache(_config(data), _adapter())
    vae, te = FakeVAE(), FakeText()
    report = build_cache(_config(data, resolution="[32, 32]"), _adapter(vae=vae, text_encoder=te))
    assert len(report.latents_encoded) == 7 and te.prompts == []
    assert vae.calls == 4 + 9
    # touching one media file recomputes only that item's latents
    img = data / "images" / "image_001.png"
    img.write_bytes(img.read_bytes())
    import os
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    report = build_cache(_config(data, resolution="[32, 32]"), _adapter())
    assert report.latents_encoded == ["image_001"] and report.texts_encoded == []


def test_interrupted_run_resumes(data):
    cfg = _config(data)
    with pytest.raises(RuntimeError, match="injected"):
        build_cache(cfg, _adapter(vae=FakeVAE(fail_on_call=3)), num_workers=2)
    m = json.loads(manifest_path(data / "cache_images", "wan").read_text())
    assert sorted(k for k, e in m["items"].items() if "latents" in e) == ["image_000", "image_001"]
    vae = FakeVAE()
    report = build_cache(cfg, _adapter(vae=vae))
    assert sorted(report.latents_encoded) == ["frames_000", "image_002", "image_003", "video_000", "video_001"]
    assert vae.calls == 2 + 9
    check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))


def test_progress_may_cancel(data):
    cfg = _config(data)

    class Cancel(BaseException):
        pass

    def progress(i, n):
        if i == 2:
            raise Cancel()
    with pytest.raises(Cancel):
        build_cache(cfg, _adapter(), progress=progress)
    vae = FakeVAE()
    report = build_cache(cfg, _adapter(vae=vae))
    assert len(report.latents_encoded) == 5  # the two finished items were kept


def test_stale_files_removed_unless_keep_cache(data):
    cfg = _config(data)
    build_cache(cfg, _adapter())
    (data / "images" / "image_003.png").unlink()
    (data / "images" / "image_003.txt").unlink()
    (data / "cache_images" / "notes_wan.txt").write_text("user file")  # not ours: never deleted
    report = build_cache(cfg, _adapter(), keep_cache=True)
    assert report.removed_files == [] and (data / "cache_images" / "image_003_wan_te.safetensors").exists()
    report = build_cache(cfg, _adapter())
    assert sorted(report.removed_files) == ["image_003_0064x0048_wan.safetensors", "image_003_wan_te.safetensors"]
    assert (data / "cache_images" / "notes_wan.txt").exists()
    m = json.loads(manifest_path(data / "cache_images", "wan").read_text())
    assert "image_003" not in m["items"]


def test_check_cache_refusals(data):
    cfg = _config(data)
    with pytest.raises(MusubiInputError, match="no latent cache"):
        check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))
    build_cache(cfg, _adapter())
    with pytest.raises(MusubiInputError, match="encoder 'vae'.*other-vae"):
        check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, vae_identity="other-vae"))
    with pytest.raises(MusubiInputError, match="4096"):
        check_cache_for_model(cfg, wan_cache_requirements(text_dim=4096))
    with pytest.raises(MusubiInputError, match="latents_image"):
        check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, i2v=True))
    (data / "videos" / "video_000.txt").write_text("changed")
    with pytest.raises(MusubiInputError, match="out of date.*video_000"):
        check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))
    with pytest.raises(MusubiInputError, match="current settings"):
        check_cache_for_model(_config(data, resolution="[32, 32]"), wan_cache_requirements(text_dim=32))


def test_text_only_and_latent_only_runs(data):
    cfg = _config(data)
    build_cache(cfg, WanCacheAdapter(vae=FakeVAE(), dtype=torch.float32))
    with pytest.raises(MusubiInputError, match="text"):
        check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))
    report = build_cache(cfg, WanCacheAdapter(text_encoder=FakeText(), text_dtype=torch.float32))
    assert report.latents_encoded == [] and len(report.texts_encoded) == 7
    assert len(check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))) == 2


def test_corrupt_video_fails_before_encoding(data):
    (data / "videos" / "zz_broken.mp4").write_bytes(b"\x00garbage" * 50)
    (data / "videos" / "zz_broken.txt").write_text("broken")
    vae = FakeVAE()
    with pytest.raises(MusubiInputError, match="zz_broken.mp4"):
        build_cache(_config(data), _adapter(vae=vae))
    assert vae.calls == 0


def test_i2v_tensors(data):
    cfg = _config(data)
    build_cache(cfg, _adapter(clip=FakeClip()))
    cached = check_cache_for_model(cfg, wan_cache_requirements(text_dim=32, i2v=True, clip=True))
    batch = CachedBatchLoader(cached[1:], seed=0, shuffle=False).load_batch(cached[1], [
        s for s in cached[1].samples if s.bucket[2] == 9][:1])
    y = batch["y"]
    assert y.shape == (1, 20, 3, 6, 8) and batch["clip_fea"].shape == (1, 257, 8)
    assert (y[0, :4, 0] == 1).all() and (y[0, :4, 1:] == 0).all()
    # conditioning latents = VAE of [first frame, mid-gray...]: later latent frames encode zeros
    assert torch.equal(y[0, 4:, 1:], torch.zeros_like(y[0, 4:, 1:]))
    # the first latent frame sees only pixel frame 0 in both encodes (fp reduction order may differ)
    torch.testing.assert_close(y[0, 4:, 0], batch["latents"][0, :, 0], rtol=1e-5, atol=1e-5)


def test_in_memory_dataset(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 32, 48, 3, generator=g)
    cfg = dataset_from_tensors(images, ["one", "two", "three"], tmp_path / "cache", resolution=(48, 32))
    report = build_cache(cfg, _adapter())
    assert len(report.latents_encoded) == 3
    assert build_cache(cfg, _adapter()).latents_encoded == []  # same pixels -> cached
    images[1, 0, 0] = 0.5 if images[1, 0, 0, 0] != 0.5 else 0.25
    cfg2 = dataset_from_tensors(images, ["one", "two", "three"], tmp_path / "cache", resolution=(48, 32))
    assert build_cache(cfg2, _adapter()).latents_encoded == ["item00001"]
    cached = check_cache_for_model(cfg2, wan_cache_requirements(text_dim=32))
    assert len(cached[0].samples) == 3


def test_loader_buckets_repeats_and_resume(data):
    cfg = _config(data, extra="num_repeats = 3")
    build_cache(cfg, _adapter())
    cached = check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))
    loader = CachedBatchLoader(cached, seed=7)
    epoch0 = [(tuple(b["keys"]), b["bucket"]) for b in loader]
    # images: 4 items x 3 repeats in batches of 2 -> 6 batches; videos: 9 clips, 3 buckets of 3 in batches of 1
    assert len(epoch0) == 6 + 9 and loader.epoch == 1
    assert sum(len(k) for k, _ in epoch0) == 12 + 9
    for b in CachedBatchLoader(cached, seed=7):
        assert b["latents"].shape[0] == len(b["keys"])  # stacked: one bucket per batch
    # resume mid-epoch 1 from a saved position -> identical remaining order
    ref = CachedBatchLoader(cached, seed=7)
    list(ref)
    full_epoch1 = [tuple(b["keys"]) for b in ref]
    run = CachedBatchLoader(cached, seed=7)
    list(run)
    it = iter(run)
    first = [tuple(next(it)["keys"]) for _ in range(5)]
    state = run.state_dict()
    assert state == {"seed": 7, "epoch": 1, "index": 5}
    resumed = CachedBatchLoader(cached, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert first + [tuple(b["keys"]) for b in resumed] == full_epoch1
    assert full_epoch1 != [k for k, _ in epoch0]  # a different shuffle per epoch
    assert [tuple(b["keys"]) for b in CachedBatchLoader(cached, seed=8)] != [k for k, _ in epoch0]
    with pytest.raises(MusubiInputError, match="seed"):
        resumed.load_state_dict({"seed": 1, "epoch": 0, "index": 0})


def test_tiny_image_named_while_planning_before_any_encode(data):
    from PIL import Image

    Image.new("RGB", (12, 40), (9, 9, 9)).save(data / "images" / "zz_tiny.png")
    (data / "images" / "zz_tiny.txt").write_text("tiny")
    vae = FakeVAE()
    with pytest.raises(MusubiInputError, match=r"zz_tiny\.png.*12x40.*at least 16x16"):
        build_cache(_config(data), _adapter(vae=vae))
    assert vae.calls == 0


def test_caption_not_utf8_names_the_file_and_bom_is_dropped(data):
    images = sorted((data / "images").glob("*.txt"))
    images[0].write_bytes("caf\u00e9 au lait".encode("cp1252"))
    with pytest.raises(MusubiInputError, match=rf"{images[0].name}.*offset 3.*UTF-8"):
        build_cache(_config(data), _adapter())
    images[0].write_bytes(b"\xef\xbb\xbf" + "caf\u00e9".encode("utf-8"))
    items = list_items(_config(data).datasets[0])
    assert next(it for it in items if it.path.stem == images[0].stem).caption == "caf\u00e9"


def test_dataset_config_with_bom_and_bad_encoding(tmp_path):
    toml = '[general]\nresolution = [64, 48]\n[[datasets]]\nimage_directory = "images"\n'
    (tmp_path / "images").mkdir()
    (tmp_path / "d.toml").write_bytes(b"\xef\xbb\xbf" + toml.encode())
    assert load_dataset_config(tmp_path / "d.toml").datasets[0].resolution == (64, 48)
    (tmp_path / "d.toml").write_bytes(toml.encode() + b"# \xe9\n")
    with pytest.raises(MusubiInputError, match=r"d\.toml.*not UTF-8"):
        load_dataset_config(tmp_path / "d.toml")


# --- warnings the nodes show (issue 23 item 8) --------------------------------------------------------------------

def test_bom_and_empty_captions_warn(data):
    from engine.data.items import DatasetWarning

    caps = sorted((data / "images").glob("*.txt"))
    caps[0].write_bytes(b"\xef\xbb\xbfa red square")
    caps[1].write_text("   ")
    with pytest.warns(DatasetWarning) as record:
        items = list_items(_config(data).datasets[0])
    text = " | ".join(str(w.message) for w in record)
    assert "byte-order mark" in text and caps[0].name in text, text
    assert "1 item(s) with an empty caption" in text and caps[1].stem in text, text
    assert next(it for it in items if it.path.stem == caps[0].stem).caption == "a red square"


def test_in_memory_clip_not_4k1_warns_when_built_and_when_cached(tmp_path):
    from engine.data import dataset_from_tensors

    clip = torch.rand(10, 32, 32, 3)
    with pytest.warns(UserWarning, match="10 frames is not 4k\\+1; using the first 9"):
        cfg = dataset_from_tensors([clip], ["a clip"], tmp_path / "c", resolution=(32, 32))
    (item,) = list_items(cfg.datasets[0])
    with pytest.warns(UserWarning, match="10 frames is not 4k\\+1; using the first 9"):
        (pc,) = prepare_item(item, cfg.datasets[0], 16.0, "wan")
    assert pc.frames == 9


def test_caption_over_512_tokens_warns_that_it_is_truncated():
    from engine.encoders.umt5 import TINY_SPIECE, PromptTokenizer, PromptTruncatedWarning

    tok = PromptTokenizer.from_spiece_bytes(TINY_SPIECE.read_bytes(), "tiny")
    short = "a red square"
    tok([short])  # no warning
    long = " ".join(["a red square moving to the right"] * 200)
    with pytest.warns(PromptTruncatedWarning, match="truncated to 512"):
        ids, mask = tok([long])
    assert int(mask.sum()) == 512
