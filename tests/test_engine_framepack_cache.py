"""FramePack section caches: entries' keys / shapes / dtypes / indices / clean latents against hand tables written
from Musubi Tuner's `fpack_cache_latents.py` (reference doc §3.6, §3.7), names, files both ways, stand-in encoders."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.data.encoding import strip_key
from engine.errors import MusubiInputError
from engine.families.framepack import cache as C

H, W = 2, 3                     # latent size of the hand tables
SHAPE9 = f"9x{H}x{W}"
R = lambda a, b: list(range(a, b))  # noqa: E731  (hand-written spans)

VIDEO_KEYS = {f"latents_{SHAPE9}_float16", "latent_indices_int64", f"latents_clean_{SHAPE9}_float16",
              "clean_latent_indices_int64", f"latents_clean_2x_{SHAPE9}_float16", "clean_latent_2x_indices_int64",
              f"latents_clean_4x_{SHAPE9}_float16", "clean_latent_4x_indices_int64", "image_embeddings_float16"}


def _video_latents(frames: int) -> torch.Tensor:
    """[16, frames, H, W]: latent frame f holds the value f + 1 (0 = a zero slot)."""
    return (torch.arange(frames, dtype=torch.float32) + 1).view(1, -1, 1, 1).expand(16, frames, H, W).clone()


def _values(t: torch.Tensor) -> list[int]:
    assert (t == t[:1, :, :1, :1]).all()            # constant per frame
    return [int(v) for v in t[0, :, 0, 0]]


def _check_video_entry(e, latent_idx, clean_idx, idx2, idx4, target_vals, clean_vals, vals2, vals4):
    assert set(e) == VIDEO_KEYS
    shapes = {f"latents_{SHAPE9}_float16": (16, 9, H, W), "latent_indices_int64": (9,),
              f"latents_clean_{SHAPE9}_float16": (16, 2, H, W), "clean_latent_indices_int64": (2,),
              f"latents_clean_2x_{SHAPE9}_float16": (16, 2, H, W), "clean_latent_2x_indices_int64": (2,),
              f"latents_clean_4x_{SHAPE9}_float16": (16, 16, H, W), "clean_latent_4x_indices_int64": (16,),
              "image_embeddings_float16": (729, 1152)}
    assert {k: tuple(v.shape) for k, v in e.items()} == shapes
    assert {k: v.dtype for k, v in e.items()} == {
        k: torch.int64 if k.endswith("int64") else torch.float16 for k in VIDEO_KEYS}
    assert e["latent_indices_int64"].tolist() == latent_idx
    assert e["clean_latent_indices_int64"].tolist() == clean_idx
    assert e["clean_latent_2x_indices_int64"].tolist() == idx2
    assert e["clean_latent_4x_indices_int64"].tolist() == idx4
    assert _values(e[f"latents_{SHAPE9}_float16"]) == target_vals
    assert _values(e[f"latents_clean_{SHAPE9}_float16"]) == clean_vals
    assert _values(e[f"latents_clean_2x_{SHAPE9}_float16"]) == vals2
    assert _values(e[f"latents_clean_4x_{SHAPE9}_float16"]) == vals4


EMB = torch.linspace(-1, 1, 729 * 1152).view(729, 1152)


# --- lengths and names ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,lws,expected", [(37, 9, (1, 37)), (50, 9, (1, 37)), (73, 9, (2, 73)),
                                                 (108, 9, (2, 73)), (109, 9, (3, 109)), (181, 9, (5, 181)),
                                                 (21, 5, (1, 21)), (45, 5, (2, 41))])
def test_aligned_frames(frames, lws, expected):
    assert C.aligned_frames(frames, lws) == expected


def test_aligned_frames_too_short():
    with pytest.raises(MusubiInputError, match="at least 37 frames"):
        C.aligned_frames(36, 9)


def test_section_file_names():
    assert C.section_file_name("clip_00000-073_0640x0480_fp.safetensors", 1) == \
        "clip_00000-073-0001_0640x0480_fp.safetensors"
    assert C.section_file_name("my_clip_v2_00012-109_1280x0720_fp.safetensors", 12) == \
        "my_clip_v2_00012-109-0012_1280x0720_fp.safetensors"
    assert C.parse_section_file_name("/c/my_clip_v2_00012-109-0012_1280x0720_fp.safetensors") == {
        "stem": "my_clip_v2", "start": 12, "frames": 109, "section": 12, "width": 1280, "height": 720}
    assert C.parse_section_file_name("a_00000-037_0640x0480_fp.safetensors")["section"] is None
    for bad in ("clip_0640x0480_fp.safetensors", "clip_00000-073_0640x0480_hv.safetensors",
                "clip_00000-073-0001_0640x0480_fp.safetensors"):
        with pytest.raises(MusubiInputError, match="clip cache name"):
            C.section_file_name(bad, 0)


# --- video entries vs hand tables -----------------------------------------------------------------------------------

def test_original_two_sections():
    e = C.video_section_entries(_video_latents(19), EMB, 9)
    assert list(e) == [0, 1]
    # section 1 (time), generated first: padding 1, empty history
    _check_video_entry(e[1], R(10, 19), [0, 19], [20, 21], R(22, 38), R(11, 20), [1, 0], [0, 0], [0] * 16)
    # section 0: padding 0, history = the frames 10.. after it
    _check_video_entry(e[0], R(1, 10), [0, 10], [11, 12], R(13, 29), R(2, 11), [1, 11], [12, 13],
                       R(14, 20) + [0] * 10)
    assert torch.equal(e[0]["image_embeddings_float16"], EMB.half())


def test_original_one_and_five_sections():
    e = C.video_section_entries(_video_latents(10), EMB, 9)
    _check_video_entry(e[0], R(1, 10), [0, 10], [11, 12], R(13, 29), R(2, 11), [1, 0], [0, 0], [0] * 16)
    e = C.video_section_entries(_video_latents(46), EMB, 9)        # paddings 3, 2, 2, 1, 0
    assert list(e) == [0, 1, 2, 3, 4]
    _check_video_entry(e[4], R(28, 37), [0, 37], [38, 39], R(40, 56), R(38, 47), [1, 0], [0, 0], [0] * 16)
    _check_video_entry(e[3], R(19, 28), [0, 28], [29, 30], R(31, 47), R(29, 38), [1, 38], [39, 40],
                       R(41, 47) + [0] * 10)
    _check_video_entry(e[2], R(19, 28), [0, 28], [29, 30], R(31, 47), R(20, 29), [1, 29], [30, 31],
                       R(32, 47) + [0])
    _check_video_entry(e[1], R(10, 19), [0, 19], [20, 21], R(22, 38), R(11, 20), [1, 20], [21, 22], R(23, 39))
    _check_video_entry(e[0], R(1, 10), [0, 10], [11, 12], R(13, 29), R(2, 11), [1, 11], [12, 13], R(14, 30))


def test_f1_sections():
    e = C.video_section_entries(_video_latents(19), EMB, 9, f1=True)
    f1_idx = (R(20, 29), [0, 19], [17, 18], R(1, 17))
    _check_video_entry(e[0], *f1_idx, R(2, 11), [1, 1], [0, 0], [0] * 16)
    _check_video_entry(e[1], *f1_idx, R(11, 20), [1, 10], [8, 9], [0] * 9 + R(1, 8))
    e = C.video_section_entries(_video_latents(46), EMB, 9, f1=True)
    _check_video_entry(e[2], *f1_idx, R(20, 29), [1, 19], [17, 18], R(1, 17))
    _check_video_entry(e[4], *f1_idx, R(38, 47), [1, 37], [35, 36], R(19, 35))


def test_video_entries_refused():
    with pytest.raises(MusubiInputError, match="trim the clip"):
        C.video_section_entries(_video_latents(20), EMB, 9)
    with pytest.raises(MusubiInputError, match="trim the clip"):
        C.video_section_entries(_video_latents(9), EMB, 9)
    with pytest.raises(MusubiInputError, match="FramePack latents"):
        C.video_section_entries(torch.zeros(4, 10, H, W), EMB, 9)
    with pytest.raises(MusubiInputError, match="image embeddings"):
        C.video_section_entries(_video_latents(10), torch.zeros(729), 9)
    with pytest.raises(MusubiInputError, match="cache dtype"):
        C.video_section_entries(_video_latents(10), EMB, 9, dtype=torch.int64)


def test_bfloat16_entries_name_their_dtype():
    e = C.video_section_entries(_video_latents(10), EMB[None], 9, dtype=torch.bfloat16)[0]
    assert f"latents_{SHAPE9}_bfloat16" in e and e["image_embeddings_bfloat16"].dtype == torch.bfloat16


# --- one-frame entries ----------------------------------------------------------------------------------------------

S1 = f"1x{H}x{W}"


def _one_frame(controls: int, **kw):
    ctrl = (torch.arange(controls, dtype=torch.float32) + 1).view(1, -1, 1, 1).expand(16, controls, H, W)
    return C.one_frame_entry(ctrl, torch.full((16, 1, H, W), 7.0), EMB, **kw)


def test_one_frame_default():
    e = _one_frame(1, clean_indices=[0], target_index=9)
    assert {k: (tuple(v.shape), v.dtype) for k, v in e.items()} == {
        f"latents_{S1}_float16": ((16, 1, H, W), torch.float16),
        "latent_indices_int64": ((1,), torch.int64),
        f"latents_clean_{S1}_float16": ((16, 2, H, W), torch.float16),
        "clean_latent_indices_int64": ((2,), torch.int64),
        "clean_latent_2x_indices_int64": ((2,), torch.int64),
        "clean_latent_4x_indices_int64": ((16,), torch.int64),
        "image_embeddings_float16": ((729, 1152), torch.float16)}
    assert e["latent_indices_int64"].tolist() == [9]
    assert e["clean_latent_indices_int64"].tolist() == [0, 10]
    assert e["clean_latent_2x_indices_int64"].tolist() == [11, 12]
    assert e["clean_latent_4x_indices_int64"].tolist() == R(13, 29)
    assert _values(e[f"latents_clean_{S1}_float16"]) == [1, 0] and _values(e[f"latents_{S1}_float16"]) == [7]
    # unset fp_1f_clean_indices: Musubi's fallback [0]
    assert _one_frame(1, clean_indices=None, target_index=9)["clean_latent_indices_int64"].tolist() == [0, 10]


def test_one_frame_kisekaeichi():
    e = _one_frame(2, clean_indices=[0, 10], target_index=1, no_post=True, no_2x=True, no_4x=True)
    assert set(e) == {f"latents_{S1}_float16", "latent_indices_int64", f"latents_clean_{S1}_float16",
                      "clean_latent_indices_int64", "image_embeddings_float16"}
    assert e["latent_indices_int64"].tolist() == [1]
    assert e["clean_latent_indices_int64"].tolist() == [0, 10]
    assert _values(e[f"latents_clean_{S1}_float16"]) == [1, 2]
    # no_post alone keeps 2x / 4x after the (unused) post position
    e = _one_frame(2, clean_indices=[0, 10], target_index=1, no_post=True)
    assert e["clean_latent_2x_indices_int64"].tolist() == [11, 12]
    assert e["clean_latent_4x_indices_int64"].tolist() == R(13, 29)


def test_one_frame_multi_control():
    e = _one_frame(2, clean_indices=[0, 1], target_index=9)
    assert e["latent_indices_int64"].tolist() == [9]
    assert e["clean_latent_indices_int64"].tolist() == [0, 1, 10]
    assert _values(e[f"latents_clean_{S1}_float16"]) == [1, 2, 0]
    assert e[f"latents_clean_{S1}_float16"].shape == (16, 3, H, W)


def test_one_frame_refused():
    with pytest.raises(MusubiInputError, match="fp_1f_target_index"):
        _one_frame(1, clean_indices=[0], target_index=None)
    with pytest.raises(MusubiInputError, match="fp_1f_clean_indices"):
        _one_frame(2, clean_indices=[0], target_index=9)


# --- stand-in encoders ----------------------------------------------------------------------------------------------

class FakeVae:
    """[1, 3, F, H, W] -> [1, 16, (F-1)//4+1, H/8, W/8]: latent frame k = mean of pixel frame 4k (red channel)."""

    def __init__(self):
        self.calls = []

    def __call__(self, pixels):
        self.calls.append(tuple(pixels.shape))
        _, _, f, h, w = pixels.shape
        picked = pixels[0, 0, ::4]                                           # [F_lat, H, W]
        lat = torch.nn.functional.avg_pool2d(picked[:, None], 8)[:, 0]       # [F_lat, h, w]
        return lat[None, None].expand(1, 16, -1, -1, -1).clone()


def _image_encode(calls):
    def encode(img):
        calls.append(img.copy())
        return torch.full((1, 729, 1152), float(img[..., 0].mean()) / 255.0)
    return encode


def test_encode_video_sections_trims_and_encodes():
    frames = np.zeros((80, 16, 24, 3), np.uint8)
    for i in range(80):
        frames[i, ..., 0] = i * 3                                            # red = 3 * frame
    vae, seen = FakeVae(), []
    e = C.encode_video_sections(frames, vae, _image_encode(seen), 9)
    assert vae.calls == [(1, 3, 73, 16, 24)]                                # trimmed to 2 sections, one pass
    assert len(seen) == 1 and (seen[0] == frames[0]).all()                 # SigLIP sees the first frame
    assert list(e) == [0, 1]
    lat = e[1]["latents_9x2x3_float16"]
    # latent frame k = pixel frame 4k -> value 12k / 127.5 - 1; section 1 = latent frames 10..18
    want = torch.tensor([12 * k / 127.5 - 1 for k in range(10, 19)]).half()
    assert torch.equal(lat[0, :, 0, 0], want)
    assert torch.equal(e[0]["image_embeddings_float16"], torch.zeros(729, 1152).half())


def test_encode_one_frame_alpha_masks():
    target = np.full((16, 24, 4), 255, np.uint8)
    target[..., 3] = 255                                                    # opaque: latent unchanged
    ctrl0 = np.full((16, 24, 4), 255, np.uint8)
    ctrl0[..., 3] = 128                                                     # half transparent control
    ctrl1 = np.full((16, 24, 3), 0, np.uint8)                               # RGB: no mask
    vae, seen = FakeVae(), []
    e = C.encode_one_frame(target, [ctrl0, ctrl1], vae, _image_encode(seen), clean_indices=[0, 1], target_index=9)
    assert vae.calls == [(1, 3, 1, 16, 24)] * 3                             # each image alone
    assert seen[0].shape == (16, 24, 3)                                     # first control, alpha dropped
    clean = e["latents_clean_1x2x3_float16"].float()
    assert torch.allclose(clean[:, 0], torch.full((16, 2, 3), 128 / 255.0), atol=1e-3)   # 1.0 x alpha
    assert (clean[:, 1] == -1).all() and (clean[:, 2] == 0).all()          # black control, zero post
    assert (e["latents_1x2x3_float16"] == 1).all()
    assert e["clean_latent_indices_int64"].tolist() == [0, 1, 10]
    with pytest.raises(MusubiInputError, match="sizes"):
        C.encode_one_frame(target, [ctrl1[:8]], vae, _image_encode([]), clean_indices=[0], target_index=9)


# --- files ----------------------------------------------------------------------------------------------------------

def test_written_files_read_back(tmp_path):
    entries = C.video_section_entries(_video_latents(19), EMB, 9)
    names = C.write_video_sections(tmp_path, "clip_00000-080_0640x0480_fp.safetensors", entries, width=640,
                                   height=480, frame_count=80)
    assert names == ["clip_00000-080-0000_0640x0480_fp.safetensors", "clip_00000-080-0001_0640x0480_fp.safetensors"]
    for section, name in zip((0, 1), names):
        with safe_open(str(tmp_path / name), framework="pt") as f:
            assert f.metadata() == {"architecture": "framepack", "width": "640", "height": "480",
                                    "format_version": "1.0.1", "frame_count": "80"}
            assert set(f.keys()) == VIDEO_KEYS
            for k in f.keys():
                t = f.get_tensor(k)
                assert t.dtype == entries[section][k].dtype and torch.equal(t, entries[section][k])
        loaded = C.read_cache_file(tmp_path / name)
        assert set(loaded) == {"latents", "latent_indices", "latents_clean", "clean_latent_indices",
                               "latents_clean_2x", "clean_latent_2x_indices", "latents_clean_4x",
                               "clean_latent_4x_indices", "image_embeddings"}
        assert torch.equal(loaded["latents_clean"], entries[section][f"latents_clean_{SHAPE9}_float16"])
    one = _one_frame(1, clean_indices=[0], target_index=9)
    C.write_cache_file(tmp_path / "img_0512x0512_fp.safetensors", one, width=512, height=512)
    with safe_open(str(tmp_path / "img_0512x0512_fp.safetensors"), framework="pt") as f:
        assert "frame_count" not in f.metadata() and set(f.keys()) == set(one)
    bad = dict(one)
    bad[f"latents_{S1}_float16"] = torch.full((16, 1, H, W), float("nan")).half()
    with pytest.raises(MusubiInputError, match="non-finite"):
        C.write_cache_file(tmp_path / "nan_0512x0512_fp.safetensors", bad, width=512, height=512)


def test_musubi_laid_out_files_read(tmp_path):
    """Files built by hand from the reference's key table, as Musubi's `save_latent_cache_framepack` writes them."""
    h, w = 4, 6
    sd = {"latents_9x4x6_float16": torch.full((16, 9, h, w), 0.5).half(),
          "image_embeddings_float16": torch.full((729, 1152), 0.25).half(),
          "latent_indices_int64": torch.arange(1, 10),
          "clean_latent_indices_int64": torch.tensor([0, 10]),
          "latents_clean_9x4x6_float16": torch.full((16, 2, h, w), 1.5).half(),
          "clean_latent_2x_indices_int64": torch.tensor([11, 12]),
          "latents_clean_2x_9x4x6_float16": torch.full((16, 2, h, w), 2.5).half(),
          "clean_latent_4x_indices_int64": torch.arange(13, 29),
          "latents_clean_4x_9x4x6_float16": torch.full((16, 16, h, w), 3.5).half()}
    name = "vid_00000-037-0000_0640x0480_fp.safetensors"
    save_file(sd, str(tmp_path / name), metadata={"architecture": "framepack", "width": "640", "height": "480",
                                                  "format_version": "1.0.1", "frame_count": "37"})
    assert C.parse_section_file_name(name)["section"] == 0
    s = C.read_cache_file(tmp_path / name)
    assert s["latents"].shape == (16, 9, h, w) and s["latent_indices"].tolist() == R(1, 10)
    x = C.section_inputs(s)
    assert x["clean_latents"].shape == (16, 2, h, w) and (x["clean_latents_4x"] == 3.5).all()
    assert x["clean_latent_4x_indices"].tolist() == R(13, 29)

    # one-frame, Musubi-style: 2x / 4x indices without latents (zeros at training time)
    one = {"latents_1x4x6_float16": torch.ones(16, 1, h, w).half(),
           "image_embeddings_float16": torch.zeros(729, 1152).half(),
           "latent_indices_int64": torch.tensor([9]),
           "clean_latent_indices_int64": torch.tensor([0, 10]),
           "latents_clean_1x4x6_float16": torch.ones(16, 2, h, w).half(),
           "clean_latent_2x_indices_int64": torch.tensor([11, 12]),
           "clean_latent_4x_indices_int64": torch.arange(13, 29)}
    save_file(one, str(tmp_path / "img_0512x0512_fp.safetensors"),
              metadata={"architecture": "framepack", "width": "512", "height": "512", "format_version": "1.0.1"})
    x = C.section_inputs(C.read_cache_file(tmp_path / "img_0512x0512_fp.safetensors"))
    assert x["clean_latents_2x"].shape == (16, 2, h, w) and not x["clean_latents_2x"].any()
    assert x["clean_latents_4x"].shape == (16, 16, h, w) and x["clean_latents_4x"].dtype == torch.float16
    # kisekaeichi (no_2x / no_4x): no indices -> None
    kis = {k: v for k, v in one.items() if not k.startswith(("clean_latent_2x", "clean_latent_4x"))}
    save_file(kis, str(tmp_path / "kis_0512x0512_fp.safetensors"))
    x = C.section_inputs(C.read_cache_file(tmp_path / "kis_0512x0512_fp.safetensors"))
    assert x["clean_latents_2x"] is None and x["clean_latent_2x_indices"] is None and x["clean_latents_4x"] is None

    # the pack writes what Musubi wrote (same keys, shapes and dtypes for the same inputs)
    pack = C.video_section_entries(torch.zeros(16, 10, h, w), torch.zeros(729, 1152), 9)[0]
    assert {k: (tuple(v.shape), v.dtype) for k, v in pack.items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}

    (tmp_path / "junk_fp.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MusubiInputError, match="unreadable"):
        C.read_cache_file(tmp_path / "junk_fp.safetensors")
    save_file({"latents_1x4x6_float16": torch.ones(16, 1, h, w).half()}, str(tmp_path / "hv_fp.safetensors"))
    with pytest.raises(MusubiInputError, match="latent_indices"):
        C.read_cache_file(tmp_path / "hv_fp.safetensors")


def test_collate():
    e = C.video_section_entries(_video_latents(19), EMB, 9)
    samples = [{strip_key(k): v for k, v in e[i].items()} for i in (0, 1)]
    for s in samples:
        s.update(llama_vec=torch.zeros(512, 4096).half(), llama_attention_mask=torch.ones(512, dtype=torch.bool),
                 clip_l_pooler=torch.zeros(768).half())
    b = C.collate(samples)
    assert b["latents"].shape == (2, 16, 9, H, W)
    assert b["latent_indices"].tolist() == [R(1, 10), R(10, 19)]
    assert b["clean_latent_indices"].tolist() == [[0, 10], [0, 19]]
    assert b["clean_latents_4x"].shape == (2, 16, 16, H, W) and b["image_embeddings"].shape == (2, 729, 1152)
    assert b["llama_vec"].shape == (2, 512, 4096) and b["llama_attention_mask"].dtype == torch.bool
    one = {strip_key(k): v for k, v in _one_frame(1, clean_indices=[0], target_index=9, no_2x=True).items()}
    with pytest.raises(MusubiInputError, match="one cache layout"):
        C.collate([one, {strip_key(k): v for k, v in _one_frame(1, clean_indices=[0], target_index=9).items()}])
