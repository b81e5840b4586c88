"""The demo's procedural clips and the detector that scores a clip against its caption (engine/demo)."""

import numpy as np
import pytest
import torch

from engine import demo, errors
from engine.demo import score, shapes


def test_clips_are_deterministic_and_vary_with_the_seed():
    spec = shapes.ClipSpec("red", "square", "right")
    a, b, c = shapes.render_clip(spec, 3), shapes.render_clip(spec, 3), shapes.render_clip(spec, 4)
    assert a.shape == (17, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert spec.caption == "a red square moving to the right"
    assert shapes.parse_caption("A Green circle, moving up") == shapes.ClipSpec("green", "circle", "up")
    assert shapes.parse_caption("a cat on a beach") is None
    # standing still: a concept for a LoRA, not in the base models' data
    still = shapes.ClipSpec("magenta", "circle", "still")
    assert still.caption == "a magenta circle staying still" and shapes.parse_caption(still.caption) == still
    assert all(s.motion != "still" for s in shapes.all_specs()) and len(shapes.all_specs()) == 48
    clip = shapes.render_clip(still, 3)
    assert (clip == clip[:1]).all() and clip.max() > 0
    # moving diagonally (down and to the right), the other LoRA concept: as far along both axes, inside the frame
    diagonal = shapes.ClipSpec("red", "square", "diagonally")
    assert shapes.parse_caption("a red square moving diagonally") == diagonal
    assert all(s.motion != "diagonally" for s in shapes.all_specs())
    for seed in range(20):
        clip = shapes.render_clip(diagonal, seed)
        (y0, x0), (y1, x1) = (np.argwhere(clip[f].max(axis=-1)).mean(axis=0) for f in (0, -1))
        assert x1 - x0 > 15 and abs((x1 - x0) - (y1 - y0)) <= 1
        assert all(clip[f, [0, -1]].max() == 0 and clip[f, :, [0, -1]].max() == 0 for f in (0, 16))


def test_a_clip_shows_one_shape_of_its_colour_moving_its_way():
    clip = shapes.render_clip(shapes.ClipSpec("blue", "circle", "down"), 0, frames=9, height=64, width=96)
    assert clip.shape == (9, 64, 96, 3)
    lit = clip.max(axis=-1) > 0
    weight = clip.max(axis=-1).astype(np.float64)                              # coverage-weighted centroids
    ys = [(w.sum(axis=1) * np.arange(64)).sum() / w.sum() for w in weight]
    xs = [(w.sum(axis=0) * np.arange(96)).sum() / w.sum() for w in weight]
    assert all(b > a + 1 for a, b in zip(ys, ys[1:])) and np.ptp(xs) < 0.1    # straight down
    colours = {tuple(int(v) for v in px) for px in clip[lit]}
    full = clip[clip.max(axis=-1) == 235]                                      # fully covered pixels
    assert len(full) and (full == np.array(shapes.PALETTE["blue"])).all()
    assert len(colours) > 1                                                    # edges are anti-aliased


@pytest.mark.parametrize("colour", list(shapes.PALETTE))
def test_the_detector_reads_every_ground_truth_clip(colour):
    for spec in shapes.all_specs(colours=(colour,), motions=tuple(shapes.MOTIONS)):
        for seed in (0, 1):
            clip = shapes.render_clip(spec, seed)
            assert score.score_clip(clip) == score.ClipScore(spec.colour, spec.shape, spec.motion), spec
            assert score.clip_matches(clip, spec.caption)["all"]


def _blurred(clip: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of each frame: how a tiny VAE's decoder softens edges and rounds corners."""
    x = torch.from_numpy(clip).float().permute(0, 3, 1, 2)                    # [F, 3, H, W]
    t = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = (g / g.sum()).repeat(3, 1)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (4, 4, 4, 4), mode="replicate"),
                                   g.view(3, 1, 1, 9), groups=3)
    x = torch.nn.functional.conv2d(x, g.view(3, 1, 9, 1), groups=3)
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def test_the_detector_reads_blurred_clips():
    """Generated clips are soft: the shape must be read from where the mass is, not from sharp corners (a
    bounding-box fill ratio misreads a blurred square as a circle)."""
    for spec in shapes.all_specs(colours=("red", "magenta"), motions=tuple(shapes.MOTIONS)):
        clip = _blurred(shapes.render_clip(spec, 2), sigma=2.5)
        assert score.score_clip(clip) == score.ClipScore(spec.colour, spec.shape, spec.motion), spec


def test_the_detector_tells_what_is_wrong():
    clip = shapes.render_clip(shapes.ClipSpec("red", "triangle", "left"), 5)
    assert score.clip_matches(clip, "a green circle moving to the right") == {
        "colour": False, "shape": False, "motion": False, "all": False}
    assert score.score_clip(clip[::-1]).motion == "right"                     # played backwards
    assert score.score_clip(np.repeat(clip[:1], 17, axis=0)).motion == "still"

    centre = np.argwhere(clip[0].max(axis=-1)).mean(axis=0).round().astype(int)

    def moved(dx: int, dy: int) -> np.ndarray:              # dx, dy pixels over the clip, centred in the frame
        return np.stack([np.roll(clip[0], (32 - centre[0] + round(dy * (f / 16 - 0.5)),
                                           32 - centre[1] + round(dx * (f / 16 - 0.5))), axis=(0, 1))
                         for f in range(17)])
    assert score.score_clip(moved(14, 14)).motion == "diagonally"               # down and to the right
    assert score.score_clip(moved(14, 8)).motion == "diagonally"
    assert score.score_clip(moved(14, 6)).motion == "right"                     # a drift is not a diagonal
    assert score.score_clip(moved(-14, 14)).motion is None                      # a diagonal the demo has no word for
    slow = np.stack([np.roll(clip[0], round(6 * f / 16), axis=1) for f in range(17)])   # 6 px of 64: no direction
    assert score.score_clip(slow).motion is None
    assert score.score_clip(np.stack([np.roll(clip[0], round(10 * f / 16), axis=1) for f in range(17)])).motion \
        == "right"
    assert score.score_clip(np.zeros_like(clip)) == score.ClipScore(None, None, None)
    floats = clip.astype(np.float32) / 255                                     # IMAGE-style floats work too
    assert score.score_clip(floats) == score.score_clip(clip)
    noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
    assert not score.clip_matches(noise, "a red triangle moving to the left")["all"]


def test_bad_input_is_refused_by_name():
    with pytest.raises(errors.MusubiInputError, match="colour.*purple"):
        shapes.render_clip(shapes.ClipSpec("purple", "square", "up"), 0)
    with pytest.raises(errors.MusubiInputError, match="frames"):
        shapes.render_clip(shapes.ClipSpec("red", "square", "up"), 0, frames=1)
    with pytest.raises(errors.MusubiInputError, match="caption"):
        score.clip_matches(np.zeros((5, 32, 32, 3), np.uint8), "a cat")
    with pytest.raises(errors.MusubiInputError, match="clip"):
        score.score_clip(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(errors.MusubiInputError, match="demo model.*nope"):
        demo.model_path("demo:nope.safetensors")
    with pytest.raises(errors.MusubiInputError, match="demo model"):
        demo.model_path("demo:../pyproject.toml")


@pytest.mark.comfy
def test_a_shipped_demo_model_is_listed_and_loads_like_a_file(comfy, tmp_path, monkeypatch):
    """Demo models appear in the loaders as "demo:<file>" only when their file ships, and load through the file
    loader (config detected from the weights), not a preset path."""
    pack_demo = comfy.pack_module("engine.demo")
    vae_mod = comfy.pack_module("engine.families.wan.vae")
    wan_nodes = comfy.pack_module("nodes.wan")
    monkeypatch.setattr(pack_demo, "MODELS_DIR", tmp_path)
    choices = lambda: comfy.input_types()["MusubiWanVAELoader"]["required"]["vae_name"][0]  # noqa: E731
    assert not [c for c in choices() if c.startswith("demo:")]

    name = next(p for p in wan_nodes.VAE_PRESETS if p.startswith("demo:"))
    vae_mod.write_vae_preset(tmp_path / name[len("demo:"):], seed=5)
    assert name in choices() and choices().index(name) < choices().index("preset:tiny-vae")
    comfy.run({"1": {"class_type": "MusubiWanVAELoader",
                     "inputs": {"vae_name": name, "dtype": "fp32", "cache_on_cpu": False}},
               "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}})
    loaded = comfy.module("1")
    expected = vae_mod.build_vae_preset_state_dict(seed=5)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
