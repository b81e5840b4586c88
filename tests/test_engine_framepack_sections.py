"""FramePack section schedules, section SPECs and one-frame indices against hand-written tables (from Musubi Tuner's
`fpack_generate_video.py` / `fpack_cache_latents.py` and the reference doc §6.3, §3.7), not computed by the code."""

import numpy as np
import pytest
import torch

from engine.errors import MusubiInputError
from engine.families.framepack import sections as S
from engine.families.framepack.sections import END, START

N = None  # zeros in a history slot


# --- lengths --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds,lws,expected", [
    (5.0, 9, 4),      # 150 / 36 = 4.17
    (1.0, 9, 1),      # 0.83
    (0.5, 9, 1),      # 0.42 -> 0 -> at least 1
    (60.0, 9, 50),    # 1800 / 36
    (3.0, 9, 2),      # 2.5: Python rounds halves to even
    (5.0, 5, 8),      # 150 / 20 = 7.5 -> 8 (even)
    (10.0, 9, 8),     # 8.33
])
def test_section_count(seconds, lws, expected):
    assert S.section_count(seconds, lws) == expected


def test_lengths():
    assert S.frames_per_section(9) == 33
    assert S.total_latent_frames(4, 9) == 37
    assert S.total_pixel_frames(4, 9) == 145
    assert S.seconds_for_sections(4, 9) == pytest.approx(145 / 30)
    assert S.section_count(S.seconds_for_sections(7, 9), 9) == 7
    # Musubi passes its --fps to the sections->seconds step but counts at 30: 4 sections at 24 fps become 5
    assert S.section_count(S.seconds_for_sections(4, 9, fps=24), 9) == 5
    for bad in (0, -1.0, "5"):
        with pytest.raises(MusubiInputError, match="video_seconds"):
            S.section_count(bad, 9)
    with pytest.raises(MusubiInputError, match="latent_window_size"):
        S.section_count(5.0, 0)


# --- paddings -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,expected", [(1, [0]), (2, [1, 0]), (3, [2, 1, 0]), (4, [3, 2, 1, 0]),
                                        (5, [3, 2, 2, 1, 0]), (6, [3, 2, 2, 2, 1, 0])])
def test_default_paddings(n, expected):
    assert S.default_latent_paddings(n) == expected
    assert S.latent_paddings(n) == expected


def test_custom_paddings():
    assert S.latent_paddings(5, [1, 1]) == [1, 1, 2, 1, 0]        # shorter: the rest stay default
    assert S.latent_paddings(3, "1") == [1, 1, 0]                  # (Musubi crashes here for <= 4 sections)
    assert S.latent_paddings(2, "0,0,0") == [0, 0]                 # longer: cut
    assert S.latent_paddings(4, "2, 2, 1, 0") == [2, 2, 1, 0]
    for bad in ("a,1", [-1], [], [1.5], "1,,2"):
        with pytest.raises(MusubiInputError, match="latent_paddings"):
            S.latent_paddings(4, bad)


# --- original schedule ----------------------------------------------------------------------------------------------

def _plan_row(p):
    return (p.index, p.latent_padding, p.latent_indices, p.clean_latent_indices, p.clean_latent_2x_indices,
            p.clean_latent_4x_indices, p.clean_sources, p.sources_2x, p.sources_4x, p.output_frames, p.is_last)


R = lambda a, b: tuple(range(a, b))  # noqa: E731  (hand-written spans)

# (time index, padding, latent, clean, 2x, 4x, clean sources, 2x sources, 4x sources, output frames, is_last)
ORIGINAL_1 = [
    (0, 0, R(1, 10), (0, 10), (11, 12), R(13, 29), (START, END), (N, N), (N,) * 16, (0, 10), True),
]
ORIGINAL_2 = [
    (1, 1, R(10, 19), (0, 19), (20, 21), R(22, 38), (START, END), (N, N), (N,) * 16, (10, 19), False),
    (0, 0, R(1, 10), (0, 10), (11, 12), R(13, 29), (START, 10), (11, 12), R(13, 19) + (END,) + (N,) * 9, (0, 10),
     True),
]
ORIGINAL_5 = [  # paddings 3, 2, 2, 1, 0; 46 latent frames
    (4, 3, R(28, 37), (0, 37), (38, 39), R(40, 56), (START, END), (N, N), (N,) * 16, (37, 46), False),
    (3, 2, R(19, 28), (0, 28), (29, 30), R(31, 47), (START, 37), (38, 39), R(40, 46) + (END,) + (N,) * 9, (28, 37),
     False),
    (2, 2, R(19, 28), (0, 28), (29, 30), R(31, 47), (START, 28), (29, 30), R(31, 46) + (END,), (19, 28), False),
    (1, 1, R(10, 19), (0, 19), (20, 21), R(22, 38), (START, 19), (20, 21), R(22, 38), (10, 19), False),
    (0, 0, R(1, 10), (0, 10), (11, 12), R(13, 29), (START, 10), (11, 12), R(13, 29), (0, 10), True),
]


@pytest.mark.parametrize("n,table", [(1, ORIGINAL_1), (2, ORIGINAL_2), (5, ORIGINAL_5)])
def test_original_schedule(n, table):
    plans = S.original_schedule(n, 9)
    assert [_plan_row(p) for p in plans] == table
    assert [p.order for p in plans] == list(range(n))
    assert [p.index_from_last for p in plans] == [p.index - n for p in plans]
    assert not any(p.f1 for p in plans)


def test_original_schedule_custom_paddings():
    # two sections, both padding 0: the first run's target sits right after the start, like the last run's
    rows = [_plan_row(p) for p in S.original_schedule(2, 9, [0, 0])]
    assert rows == [
        (1, 0, R(1, 10), (0, 10), (11, 12), R(13, 29), (START, END), (N, N), (N,) * 16, (10, 19), False),
        ORIGINAL_2[1]]
    # five sections "1,1": paddings 1, 1, 2, 1, 0 (indices move, history slots do not)
    rows = [_plan_row(p) for p in S.original_schedule(5, 9, "1,1")]
    assert rows[0] == (4, 1, R(10, 19), (0, 19), (20, 21), R(22, 38), (START, END), (N, N), (N,) * 16, (37, 46),
                       False)
    assert rows[1] == (3, 1, R(10, 19), (0, 19), (20, 21), R(22, 38), (START, 37), (38, 39),
                       R(40, 46) + (END,) + (N,) * 9, (28, 37), False)
    assert rows[2:] == ORIGINAL_5[2:]
    # window 5, 2 sections: total 11
    rows = [_plan_row(p) for p in S.original_schedule(2, 5)]
    assert rows == [
        (1, 1, R(6, 11), (0, 11), (12, 13), R(14, 30), (START, END), (N, N), (N,) * 16, (6, 11), False),
        (0, 0, R(1, 6), (0, 6), (7, 8), R(9, 25), (START, 6), (7, 8), R(9, 11) + (END,) + (N,) * 13, (0, 6), True)]


# --- F1 schedule ----------------------------------------------------------------------------------------------------

F1_1 = [(0, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 0), (N, N), (N,) * 16, (1, 10), True)]
F1_2 = [
    (0, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 0), (N, N), (N,) * 16, (1, 10), False),
    (1, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 9), (7, 8), (N,) * 9 + R(0, 7), (10, 19), True),
]
F1_5 = F1_2[:1] + [
    (1, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 9), (7, 8), (N,) * 9 + R(0, 7), (10, 19), False),
    (2, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 18), (16, 17), R(0, 16), (19, 28), False),
    (3, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 27), (25, 26), R(9, 25), (28, 37), False),
    (4, 0, R(20, 29), (0, 19), (17, 18), R(1, 17), (START, 36), (34, 35), R(18, 34), (37, 46), True),
]


@pytest.mark.parametrize("n,table", [(1, F1_1), (2, F1_2), (5, F1_5)])
def test_f1_schedule(n, table):
    plans = S.f1_schedule(n, 9)
    assert [_plan_row(p) for p in plans] == table
    assert [p.order for p in plans] == list(range(n)) and all(p.f1 for p in plans)
    assert S.schedule(n, 9, f1=True, paddings=[7] * n) == plans            # F1 ignores paddings


def test_f1_window_5():
    p = S.f1_schedule(1, 5)[0]
    assert p.latent_indices == (20, 21, 22, 23, 24) and p.output_frames == (1, 6)


# --- history mechanics vs the plans ---------------------------------------------------------------------------------

def _frames(t):  # history values: frame f is stored as f + 1, zeros as 0, the end latent as -1
    return [int(v) for v in t[0, 0, :, 0, 0]]


def test_history_buffer_original_with_end_image():
    n, lws = 2, 9
    start = torch.full((1, 16, 1, 1, 1), 1.0)         # frame 0
    end = torch.full((1, 16, 1, 1, 1), -1.0)
    hist = S.initial_history(start, end)
    assert hist.shape == (1, 16, 19, 1, 1)
    seen = []
    for plan in S.original_schedule(n, lws):
        post, h2, h4 = S.split_history(hist)
        seen.append((_frames(post), _frames(h2), _frames(h4)))
        lo, hi = plan.output_frames
        gen = torch.arange(max(lo, 1) + 1, hi + 1, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 16, -1, 1, 1)
        hist = S.update_history(hist, gen, plan, start)
    assert seen == [([-1], [0, 0], [0] * 16),
                    ([11], [12, 13], [14, 15, 16, 17, 18, 19, -1] + [0] * 9)]
    assert _frames(hist)[:20] == list(range(1, 20)) + [-1]    # start + both sections, then the end latent


def test_history_buffer_f1():
    start = torch.full((1, 16, 1, 1, 1), 1.0)
    hist = S.initial_history(start, f1=True, start_latent=start)
    assert hist.shape[2] == 20
    seen = []
    for plan in S.f1_schedule(2, 9):
        h1, h2, h4 = S.split_history(hist, f1=True)
        seen.append((_frames(h1), _frames(h2), _frames(h4)))
        lo, hi = plan.output_frames
        gen = torch.arange(lo + 1, hi + 1, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 16, -1, 1, 1)
        hist = S.update_history(hist, gen, plan)
    assert seen == [([1], [0, 0], [0] * 16), ([10], [8, 9], [0] * 9 + [1, 2, 3, 4, 5, 6, 7])]


def test_index_tensor():
    t = S.index_tensor((0, 10), batch=2)
    assert t.dtype == torch.int64 and t.tolist() == [[0, 10], [0, 10]]
    assert S.index_tensor(None) is None


# --- section SPECs --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("specs,n,expected", [
    ({"0": "a"}, 4, ["a", "a", "a", "a"]),
    ({"0": "a", "-1": "b"}, 4, ["a", "a", "a", "b"]),
    ({"1-2": "x"}, 4, ["x", "x", "x", "x"]),                     # no 0: smallest non-negative index (1)
    ({"2": "p", "1": "q"}, 3, ["q", "q", "p"]),
    ({"-1": "z", "-2": "y"}, 4, ["y", "y", "y", "z"]),             # all negative: the smallest (-2) for 0
    ([("3", "pos"), ("-1", "neg")], 4, ["pos", "pos", "pos", "neg"]),   # -1 first: before 3, whatever the order
    ([("-1", "neg"), ("3", "pos")], 4, ["pos", "pos", "pos", "neg"]),   # (0 falls back to index 3's "pos")
    ([("0", "a"), ("0-1", "b")], 3, ["b", "b", "b"]),              # later entries overwrite
    ({0: "a", -1: "b", 1: "c"}, 3, ["a", "c", "b"]),               # int keys
    ({"0": "a", "-3": "c"}, 3, ["c", "a", "a"]),                   # -3 = section 0 of 3, looked up first
    ({"0-4": "all"}, 5, ["all"] * 5),
    ({"0": "only"}, 1, ["only"]),
])
def test_resolve_section_values(specs, n, expected):
    assert S.resolve_section_values(specs, n) == expected


@pytest.mark.parametrize("spec", ["4", "-5", "2-1", "x", "1-4", "-2-1", "", "1.5", True])
def test_section_spec_refused(spec):
    with pytest.raises(MusubiInputError, match="section SPEC"):
        S.resolve_section_values({spec: "v"}, 4)


def test_section_values_refused():
    with pytest.raises(MusubiInputError, match="at least one"):
        S.resolve_section_values({}, 2)
    with pytest.raises(MusubiInputError, match="pairs"):
        S.resolve_section_values(["0:a"], 2)
    with pytest.raises(MusubiInputError, match="sections"):
        S.resolve_section_values({"0": "a"}, 0)


def test_parse_section_string():
    assert S.parse_section_string("a photo: of a cat") == [("0", "a photo: of a cat")]   # no ;;; = section 0
    assert S.parse_section_string("0:a;;;-1:b") == [("0", "a"), ("-1", "b")]
    assert S.parse_section_string(" 0-2 : x ;;;plain") == [("0-2", "x"), ("0", "plain")]
    assert S.parse_section_string(r"C:\img.png;;;1:D:\b.png") == [("0", r"C:\img.png"), ("1", r"D:\b.png")]
    with pytest.raises(MusubiInputError, match="SPEC:value"):
        S.parse_section_string("foo:bar;;;0:x")
    pairs = S.parse_section_string("0:first;;;2-3:middle;;;-1:last")
    assert S.resolve_section_values(pairs, 5) == ["first", "first", "middle", "middle", "last"]


# --- one frame ------------------------------------------------------------------------------------------------------

def test_parse_one_frame_options():
    assert S.parse_one_frame_options("default") == S.OneFrameOptions()
    assert S.parse_one_frame_options("target_index=1,control_index=0;10,no_post,no_2x,no_4x") == S.OneFrameOptions(
        target_index=1, control_indices=(0, 10), no_post=True, no_2x=True, no_4x=True)
    assert S.parse_one_frame_options(" control_index=0;1 , target_index=9") == S.OneFrameOptions(9, (0, 1))
    for bad in ("foo", "target_index=x", "control_index=0;a"):
        with pytest.raises(MusubiInputError, match="one-frame option"):
            S.parse_one_frame_options(bad)


# (options, controls) -> (latent, clean, 2x, 4x, post slot); lws 9
@pytest.mark.parametrize("opts,controls,expected", [
    ("default", 1, ((9,), (0, 10), (11, 12), R(13, 29), 1)),
    ("default", 0, ((9,), (0, 10), (11, 12), R(13, 29), 1)),                     # a zero control stands in
    ("control_index=0;10,target_index=1,no_post,no_2x,no_4x", 2, ((1,), (0, 10), None, None, None)),  # kisekaeichi
    ("control_index=0;1,target_index=9", 2, ((9,), (0, 1, 10), (11, 12), R(13, 29), 2)),              # 1f-mc
    ("no_post", 1, ((9,), (0,), (11, 12), R(13, 29), None)),                       # 2x/4x stay after the post
    ("control_index=0;5", 1, ((9,), (0, 5), (11, 12), R(13, 29), 1)),              # extra index moves the post
    ("control_index=3", 2, ((9,), (3, 0, 10), (11, 12), R(13, 29), 2)),            # unset controls stay at 0
    ("target_index=40,no_4x", 1, ((40,), (0, 10), (11, 12), None, 1)),
])
def test_one_frame_indices(opts, controls, expected):
    i = S.one_frame_indices(S.parse_one_frame_options(opts), 9, controls)
    assert (i.latent_indices, i.clean_latent_indices, i.clean_latent_2x_indices, i.clean_latent_4x_indices,
            i.post_slot) == expected


def test_one_frame_indices_window_5_and_refusals():
    i = S.one_frame_indices(S.OneFrameOptions(), 5, 1)
    assert (i.latent_indices, i.clean_latent_indices, i.clean_latent_2x_indices, i.clean_latent_4x_indices) == \
           ((5,), (0, 6), (7, 8), R(9, 25))
    with pytest.raises(MusubiInputError, match="control_index"):
        S.one_frame_indices(S.OneFrameOptions(control_indices=(0, 1), no_post=True), 9, 1)
    with pytest.raises(MusubiInputError, match="control_index"):
        S.one_frame_indices(S.OneFrameOptions(control_indices=(-1,)), 9, 1)
    with pytest.raises(MusubiInputError, match="target_index"):
        S.one_frame_indices(S.OneFrameOptions(target_index=-2), 9, 1)


def test_one_frame_inputs_masks_and_zeros():
    h, w = 2, 3
    c0 = torch.full((1, 16, 1, h, w), 2.0)
    c1 = torch.full((1, 16, 1, h, w), 3.0)
    m0 = torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 0.25]]).view(1, 1, 1, h, w)
    out = S.one_frame_inputs(S.parse_one_frame_options("control_index=0;1,target_index=9"), [c0, c1],
                             (1, 16, h, w), 9, masks=[m0, None])
    assert out.clean_latents.shape == (1, 16, 3, h, w)
    assert out.clean_latents[0, 5, 0].tolist() == [[0.0, 1.0, 2.0], [2.0, 2.0, 0.5]]   # control 0 x mask
    assert (out.clean_latents[:, :, 1] == 3.0).all() and (out.clean_latents[:, :, 2] == 0).all()  # control 1, post
    assert out.clean_latents_2x.shape == (1, 16, 2, h, w) and not out.clean_latents_2x.any()
    assert out.clean_latents_4x.shape == (1, 16, 16, h, w) and not out.clean_latents_4x.any()
    assert out.indices.clean_latent_indices == (0, 1, 10)

    kis = S.one_frame_inputs(S.parse_one_frame_options("control_index=0;10,target_index=1,no_post,no_2x,no_4x"),
                             [c0, c1], (1, 16, h, w), 9)
    assert kis.clean_latents.shape == (1, 16, 2, h, w) and kis.clean_latents_2x is None and kis.clean_latents_4x is None

    none = S.one_frame_inputs(S.OneFrameOptions(), [], (1, 16, h, w), 9)
    assert none.clean_latents.shape == (1, 16, 2, h, w) and not none.clean_latents.any()
    with pytest.raises(MusubiInputError, match="control latent 0"):
        S.one_frame_inputs(S.OneFrameOptions(), [torch.zeros(1, 16, 1, 4, 4)], (1, 16, h, w), 9)
    with pytest.raises(MusubiInputError, match="masks"):
        S.one_frame_inputs(S.OneFrameOptions(), [c0], (1, 16, h, w), 9, masks=[m0, m0])


def test_latent_mask():
    same = np.array([[0, 255, 128], [64, 255, 0]], dtype=np.uint8)          # already latent size: values / 255
    t = S.latent_mask(same, (2, 3))
    assert t.shape == (1, 1, 1, 2, 3) and t.dtype == torch.float32
    assert torch.allclose(t[0, 0, 0], torch.tensor([[0, 255, 128], [64, 255, 0]]) / 255.0)
    flat = np.full((64, 48), 128, dtype=np.uint8)                           # uniform mask: uniform after LANCZOS
    assert torch.allclose(S.latent_mask(flat[..., None], (8, 6)), torch.full((1, 1, 1, 8, 6), 128 / 255.0))
    with pytest.raises(MusubiInputError, match="control mask"):
        S.latent_mask(np.zeros((4, 4, 3), np.uint8), (1, 1))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 7
    assert (S.alpha_mask(rgba) == 7).all() and S.alpha_mask(rgba[..., :3]) is None
