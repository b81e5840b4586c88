"""Wan generation pipeline end to end on the tiny presets (CPU, float32, 32x32 px, few steps)."""

import ast

import pytest
import torch

from engine.errors import MusubiInputError
from engine.families.wan.loader import load_wan_dit
from engine.families.wan.vae import load_wan_vae
from engine.families.wan.pipeline import (WanGenerateRequest, generate, latent_to_rgb_preview,
                                  prepare_flf2v, prepare_fun_control, prepare_i2v, prepare_one_frame,
                                  WAN21_RGB_BIAS, WAN21_RGB_FACTORS)

TEXT_DIM = CLIP_DIM = 32     # tiny presets


@pytest.fixture(scope="module")
def models():
    return {name: load_wan_dit(f"preset:tiny-{name}", dtype=torch.float32)
            for name in ("t2v", "i2v", "flf2v", "fun-control")}


@pytest.fixture(scope="module")
def vae():
    return load_wan_vae("preset:tiny-vae", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return {"pos": torch.randn(7, TEXT_DIM, generator=g), "neg": torch.randn(5, TEXT_DIM, generator=g),
            "neg2": torch.randn(6, TEXT_DIM, generator=g)}


def _image(seed, h=32, w=32):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _req(prompts, task="t2v", **kw):
    base = dict(width=32, height=32, frames=5, steps=2, seed=1)
    base.update(kw)
    return WanGenerateRequest(task, prompts["pos"], prompts["neg"], **base)


def _hand_euler(m, prompts, latent_frames, y=None, clip=None, steps=2, shift=2.0, g=4.0, seed=1):
    """The whole Euler + CFG loop written out independently of the pipeline; y and the CLIP features go to both the
    conditional and the negative pass (official Wan)."""
    x = torch.randn(1, 16, latent_frames, 4, 4, generator=torch.Generator().manual_seed(seed))
    line = [1 - k / steps for k in range(steps + 1)]
    sig = [shift * s / (1 + (shift - 1) * s) for s in line]
    kw = {"y": None if y is None else y[None], "clip_fea": None if clip is None else clip[None]}
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([sig[i] * 1000.0])
            vc, vu = m(x, t, [prompts["pos"]], **kw), m(x, t, [prompts["neg"]], **kw)
            x = x + (vu + g * (vc - vu)) * (sig[i + 1] - sig[i])
    return x


EULER = dict(solver="euler", steps=2, shift=2.0, guidance_scale=4.0)


class Spy:
    """Records the DiT calls (instance-level forward override; nn.Module.__call__ dispatches to it)."""

    def __init__(self, model):
        self.model, self.calls, self._orig = model, [], type(model).forward

    def __enter__(self):
        def forward(x, t, context, clip_fea=None, y=None, skip_blocks=None, frame_indices=None):
            self.calls.append(dict(batch=x.shape[0], t=t.clone(), skip=skip_blocks, frame_indices=frame_indices,
                                   y=None if y is None else y.shape, contexts=[c.shape[0] for c in context],
                                   clip_fea=clip_fea))
            return self._orig(self.model, x, t, context, clip_fea, y, skip_blocks, frame_indices)
        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        del self.model.forward


# --- defaults -----------------------------------------------------------------------------------------------------

def test_per_task_defaults(prompts):
    t2v = _req(prompts, frames=None, steps=None).resolve()
    assert (t2v.frames, t2v.steps, t2v.shift, t2v.guidance_scale) == (81, 50, 5.0, 5.0)
    assert _req(prompts, "t2i", frames=None).resolve().frames == 1
    i2v = _req(prompts, "i2v", steps=None, width=832, height=480).resolve()
    assert (i2v.steps, i2v.shift) == (40, 3.0)
    assert _req(prompts, "i2v", width=480, height=832).resolve().shift == 3.0
    assert _req(prompts, "i2v", width=1280, height=720).resolve().shift == 5.0
    flf = _req(prompts, "flf2v", steps=None, width=832, height=480).resolve()
    assert (flf.steps, flf.shift) == (40, 5.0)
    assert _req(prompts, "t2v", width=832, height=480).resolve().shift == 5.0
    assert _req(prompts, shift=7.0).resolve().shift == 7.0


# --- T2V / T2I ----------------------------------------------------------------------------------------------------

def test_t2v_shape_determinism_and_seed(models, prompts):
    m = models["t2v"]
    a = generate(m, _req(prompts))
    assert a.shape == (1, 16, 2, 4, 4) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, generate(m, _req(prompts)))
    b = generate(m, _req(prompts, seed=2))
    assert not torch.allclose(a, b)
    two = generate(m, _req(prompts, batch_size=2))
    assert two.shape == (2, 16, 2, 4, 4)
    assert torch.allclose(two[0], a[0], atol=1e-5)                    # sample 0 = seed 1
    assert torch.allclose(two[1], b[0], atol=1e-5)                    # sample 1 = seed 2


def test_t2v_matches_hand_written_cfg_euler_loop(models, prompts):
    """Independent re-statement of the whole loop: noise from the CPU generator, Euler on the shifted schedule,
    uncond + g·(cond − uncond) with the negative prompt."""
    m, g, steps, shift = models["t2v"], 4.0, 3, 2.0
    out = generate(m, _req(prompts, solver="euler", steps=steps, shift=shift, guidance_scale=g))
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    sig = [shift * s / (1 + (shift - 1) * s) for s in (1.0, 2 / 3, 1 / 3, 0.0)]
    with torch.no_grad():
        for i in range(steps):
            t = torch.tensor([sig[i] * 1000.0])
            vc = m(x, t, [prompts["pos"]])
            vu = m(x, t, [prompts["neg"]])
            x = x + (vu + g * (vc - vu)) * (sig[i + 1] - sig[i])
    assert torch.allclose(out, x, atol=1e-4), (out - x).abs().max()


def test_guidance_and_negative_prompt_change_result(models, prompts):
    m = models["t2v"]
    base = generate(m, _req(prompts, guidance_scale=5.0))
    other_neg = WanGenerateRequest("t2v", prompts["pos"], prompts["neg2"], width=32, height=32, frames=5, steps=2,
                                   seed=1, guidance_scale=5.0)
    assert not torch.allclose(base, generate(m, other_neg), atol=1e-3)
    # at g = 1 the negative prompt cancels out exactly (but its pass still runs)
    g1 = generate(m, _req(prompts, guidance_scale=1.0, batch_cfg=False))
    g1_other = generate(m, WanGenerateRequest("t2v", prompts["pos"], prompts["neg2"], width=32, height=32, frames=5,
                                              steps=2, seed=1, guidance_scale=1.0, batch_cfg=False))
    assert torch.allclose(g1, g1_other, atol=1e-5)
    assert not torch.allclose(g1, base, atol=1e-3)
    with Spy(m) as spy:
        generate(m, _req(prompts, guidance_scale=1.0, batch_cfg=False))
    assert [c["contexts"] for c in spy.calls] == [[7], [5]] * 2


def test_batched_cfg_equals_sequential_and_uses_one_forward(models, prompts):
    m = models["t2v"]
    with Spy(m) as spy:
        batched = generate(m, _req(prompts, batch_cfg=True))
    assert [c["batch"] for c in spy.calls] == [2, 2]
    assert spy.calls[0]["contexts"] == [7, 5]
    sequential = generate(m, _req(prompts, batch_cfg=False))
    assert torch.allclose(batched, sequential, atol=1e-4)


def test_cfg_skip_and_slg_in_pipeline(models, prompts):
    m = models["t2v"]
    with Spy(m) as spy:
        generate(m, _req(prompts, steps=4, batch_cfg=False, cfg_skip_mode="late", cfg_apply_ratio=0.5))
    assert len(spy.calls) == 2 * 2 + 2                      # CFG on steps 0-1, cond only on 2-3
    base = generate(m, _req(prompts))
    with Spy(m) as spy:
        slg = generate(m, _req(prompts, slg_layers=(1,), slg_start=0.0, slg_end=0.5))
    assert [c["skip"] for c in spy.calls] == [None, {1}, None]   # step 0: batched CFG + skip pass; step 1: CFG
    assert not torch.allclose(base, slg, atol=1e-4)
    with pytest.raises(MusubiInputError, match="slg_layers"):
        generate(m, _req(prompts, slg_layers=(2,)))          # tiny model has blocks 0, 1


def test_t2i_single_frame(models, prompts):
    out = generate(models["t2v"], _req(prompts, "t2i", frames=None))
    assert out.shape == (1, 16, 1, 4, 4)
    with pytest.raises(MusubiInputError, match="frames"):
        generate(models["t2v"], _req(prompts, "t2i", frames=5))


@pytest.mark.parametrize("solver", ["unipc", "dpm++", "euler"])
def test_each_solver_runs_and_progress_reports(models, prompts, solver):
    seen = []
    out = generate(models["t2v"], _req(prompts, solver=solver),
                   progress=lambda s, n, x0: seen.append((s, n, tuple(x0.shape))))
    assert seen == [(i, 2, (1, 16, 2, 4, 4)) for i in (1, 2)]
    assert torch.isfinite(out).all()


def test_progress_can_cancel_with_base_exception(models, prompts):
    class Interrupted(BaseException):
        pass

    def cancel(step, total, x0):
        raise Interrupted()
    m = models["t2v"]
    with Spy(m) as spy, pytest.raises(Interrupted):
        generate(m, _req(prompts, steps=5), progress=cancel)
    assert len(spy.calls) == 1


# --- I2V / FLF2V / Fun-Control / one-frame ------------------------------------------------------------------------

def test_i2v_conditioning_layout_and_run(models, prompts, vae):
    img = _image(3)
    c = prepare_i2v(vae, img, frames=5)
    assert c.y.shape == (20, 2, 4, 4)
    assert (c.y[:4, 0] == 1).all() and (c.y[:4, 1:] == 0).all()
    video = torch.cat([img[:, None], torch.zeros(3, 4, 32, 32)], dim=1)[None]
    assert torch.allclose(c.y[4:], vae.encode(video)[0], atol=1e-5)
    clip = torch.randn(257, CLIP_DIM, generator=torch.Generator().manual_seed(4))
    m = models["i2v"]
    a = generate(m, _req(prompts, "i2v", conditioning=c, clip_fea=clip))
    assert a.shape == (1, 16, 2, 4, 4)
    hand = _hand_euler(m, prompts, 2, y=c.y, clip=clip)
    assert torch.allclose(generate(m, _req(prompts, "i2v", conditioning=c, clip_fea=clip, **EULER)), hand, atol=1e-4)
    assert torch.equal(a, generate(m, _req(prompts, "i2v", conditioning=c, clip_fea=clip)))
    other = prepare_i2v(vae, _image(5), frames=5)
    assert not torch.allclose(a, generate(m, _req(prompts, "i2v", conditioning=other, clip_fea=clip)), atol=1e-4)


def test_i2v_with_end_image_appends_a_latent_frame(models, prompts, vae):
    img, end = _image(3), _image(14)
    c = prepare_i2v(vae, img, frames=5, end_image=end)
    assert c.y.shape == (20, 3, 4, 4) and c.extra_latent_frames == 1
    assert (c.y[:4, 0] == 1).all() and (c.y[:4, 1] == 0).all() and (c.y[:4, 2] == 1).all()
    assert torch.allclose(c.y[4:, 2], vae.encode(end[:, None][None])[0, :, 0], atol=1e-5)
    out = generate(models["i2v"], _req(prompts, "i2v", steps=1, conditioning=c, clip_fea=torch.zeros(257, CLIP_DIM)))
    assert out.shape == (1, 16, 3, 4, 4)
    with pytest.raises(MusubiInputError, match="end_image size"):
        prepare_i2v(vae, img, frames=5, end_image=_image(1, h=48))


def test_flf2v_conditioning_layout_and_run(models, prompts, vae):
    first, last = _image(6), _image(7)
    c = prepare_flf2v(vae, first, last, frames=9)
    assert c.y.shape == (20, 3, 4, 4)
    mask = c.y[:4]
    assert (mask[:, 0] == 1).all() and (mask[:, 1] == 0).all()
    assert mask[:, 2].flatten(1).amax(1).tolist() == [0, 0, 0, 1] and (mask[3, 2] == 1).all()
    video = torch.cat([first[:, None], torch.zeros(3, 7, 32, 32), last[:, None]], dim=1)[None]
    assert torch.allclose(c.y[4:], vae.encode(video)[0], atol=1e-5)
    clip = torch.randn(514, CLIP_DIM, generator=torch.Generator().manual_seed(8))
    out = generate(models["flf2v"], _req(prompts, "flf2v", frames=9, conditioning=c, clip_fea=clip, **EULER))
    assert out.shape == (1, 16, 3, 4, 4)
    assert torch.allclose(out, _hand_euler(models["flf2v"], prompts, 3, y=c.y, clip=clip), atol=1e-4)


def test_fun_control_conditioning_and_run(models, prompts, vae):
    control = torch.rand(3, 6, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    c = prepare_fun_control(vae, control, frames=5)
    assert c.y.shape == (32, 2, 4, 4) and not c.has_image
    assert torch.allclose(c.y[:16], vae.encode(control[None, :, :5])[0], atol=1e-5)
    assert (c.y[16:] == 0).all()
    with_img = prepare_fun_control(vae, control, frames=5, image=_image(10))
    assert (with_img.y[16:, 1:] == 0).all() and with_img.y[16:, 0].abs().sum() > 0
    out = generate(models["fun-control"], _req(prompts, "fun_control", conditioning=c, **EULER))
    assert out.shape == (1, 16, 2, 4, 4)
    assert torch.allclose(out, _hand_euler(models["fun-control"], prompts, 2, y=c.y), atol=1e-4)
    clip = torch.randn(257, CLIP_DIM, generator=torch.Generator().manual_seed(15))
    out_img = generate(models["fun-control"], _req(prompts, "fun_control", conditioning=with_img, clip_fea=clip,
                                                   **EULER))
    assert torch.allclose(out_img, _hand_euler(models["fun-control"], prompts, 2, y=with_img.y, clip=clip), atol=1e-4)
    assert not torch.allclose(out_img, out, atol=1e-4)   # the start image reaches the DiT


def test_one_frame_layout_and_frame_indices(models, prompts, vae):
    ctrl = _image(11)
    c = prepare_one_frame(vae, [ctrl], control_indices=[0], target_index=5)
    assert c.frame_indices == (0, 5) and c.target_slot == 1
    assert (c.y[:4, 0] == 1).all() and (c.y[:4, 1] == 0).all()
    assert torch.allclose(c.y[4:, 0], vae.encode(ctrl[:, None][None])[0, :, 0], atol=1e-5)
    assert torch.allclose(c.y[4:, 1], vae.encode(torch.zeros(1, 3, 1, 32, 32))[0, :, 0], atol=1e-5)
    clip = torch.randn(257, CLIP_DIM, generator=torch.Generator().manual_seed(12))
    m = models["i2v"]
    with Spy(m) as spy:
        out = generate(m, _req(prompts, "one_frame", frames=None, conditioning=c, clip_fea=clip))
    assert out.shape == (1, 16, 1, 4, 4)
    assert spy.calls[0]["frame_indices"].tolist() == [0, 5]
    # intermediate frame: controls 0 and 2, target 1 sits between them
    c2 = prepare_one_frame(vae, [ctrl, _image(13)], control_indices=[2, 0], target_index=1)
    assert c2.frame_indices == (0, 1, 2) and c2.target_slot == 1
    assert c2.y[0].flatten(1).amax(1).tolist() == [1, 0, 1]
    # two controls carry both images' CLIP tokens: the FLF2V model gets all 514, the I2V model the first image's 257
    both = torch.randn(514, CLIP_DIM, generator=torch.Generator().manual_seed(14))
    for name, tokens in (("flf2v", 514), ("i2v", 257)):
        with Spy(models[name]) as spy:
            generate(models[name], _req(prompts, "one_frame", frames=None, conditioning=c2, clip_fea=both))
        torch.testing.assert_close(spy.calls[0]["clip_fea"][0], both[:tokens])
    with pytest.raises(MusubiInputError, match="two control images"):   # FLF2V with one control image's tokens
        generate(models["flf2v"], _req(prompts, "one_frame", frames=None, conditioning=c, clip_fea=clip))


# --- validation (all before the first model call) -----------------------------------------------------------------

@pytest.fixture(scope="module")
def i2v_cond(vae):
    return prepare_i2v(vae, _image(1), frames=5)


def _bad_cases(i2v_c):
    clip = torch.zeros(257, CLIP_DIM)
    return [
        ("t2v", dict(frames=6), "frames"),
        ("t2v", dict(width=40), "width"),
        ("t2v", dict(height=0), "height"),
        ("t2v", dict(steps=0), "steps"),
        ("t2v", dict(solver="ddim"), "solver"),
        ("t2v", dict(seed=-1), "seed"),
        ("t2v", dict(noise_device="tpu"), "noise_device"),
        ("t2v", dict(cfg_skip_mode="sometimes"), "cfg_skip_mode"),
        ("t2v", dict(task_override="i2v", conditioning=i2v_c, clip_fea=clip), "task"),   # I2V on a T2V model
        ("i2v", dict(task_override="t2v"), "task"),                                    # T2V on an I2V model
        ("i2v", dict(task_override="i2v"), "conditioning"),                            # no image
        ("i2v", dict(task_override="i2v", conditioning=i2v_c), "clip_fea"),            # no CLIP
        ("i2v", dict(task_override="i2v", conditioning=i2v_c, clip_fea=torch.zeros(256, CLIP_DIM)), "clip_fea"),
        ("i2v", dict(task_override="i2v", conditioning=i2v_c, clip_fea=clip, frames=9), "conditioning y"),
        ("flf2v", dict(task_override="flf2v", conditioning=i2v_c, clip_fea=torch.zeros(514, CLIP_DIM)),
         "end image"),
        ("t2v", dict(context=torch.zeros(3, 16)), "prompt embeddings"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_validation_errors_before_model_calls(models, prompts, i2v_cond, case):
    model_name, kw, match = _bad_cases(i2v_cond)[case]
    kw = dict(kw)
    task = kw.pop("task_override", model_name)
    ctx = kw.pop("context", prompts["pos"])
    base = dict(width=32, height=32, frames=5, steps=2, seed=1)
    base.update(kw)
    m = models[model_name]
    with Spy(m) as spy, pytest.raises(MusubiInputError, match=match):
        generate(m, WanGenerateRequest(task, ctx, prompts["neg"], **base))
    assert spy.calls == []


def test_helper_validation(vae):
    with pytest.raises(MusubiInputError, match="frames"):
        prepare_i2v(vae, _image(1), frames=4)
    with pytest.raises(MusubiInputError, match="image"):
        prepare_i2v(vae, torch.zeros(4, 32, 32), frames=5)
    with pytest.raises(MusubiInputError, match="size"):
        prepare_i2v(vae, torch.zeros(3, 24, 32), frames=5)
    with pytest.raises(MusubiInputError, match="control_video frames"):
        prepare_fun_control(vae, torch.zeros(3, 3, 32, 32), frames=5)
    with pytest.raises(MusubiInputError, match="indices"):
        prepare_one_frame(vae, [_image(1)], control_indices=[1], target_index=1)
    with pytest.raises(MusubiInputError, match="control images"):
        prepare_one_frame(vae, [_image(1)], control_indices=[0, 2], target_index=1)


# --- preview ------------------------------------------------------------------------------------------------------

def test_latent_preview_projection():
    lat = torch.zeros(1, 16, 2, 3, 5)
    lat[0, 2, 1] = 1.0                                      # only channel 2, frame 1
    rgb = latent_to_rgb_preview(lat, frame=1)
    assert rgb.shape == (3, 5, 3)
    expect = [(WAN21_RGB_FACTORS[2][k] + WAN21_RGB_BIAS[k] + 1) / 2 for k in range(3)]
    assert torch.allclose(rgb[0, 0], torch.tensor(expect), atol=1e-6)
    assert torch.allclose(latent_to_rgb_preview(lat, 0)[0, 0], torch.tensor([(b + 1) / 2 for b in WAN21_RGB_BIAS]))
    big = latent_to_rgb_preview(torch.full((16, 1, 2, 2), 100.0))
    assert big.min() >= 0 and big.max() <= 1


def test_preview_factors_equal_comfyui_tree(comfyui_dir):
    src = comfyui_dir / "comfy" / "latent_formats.py"
    tree = ast.parse(src.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Wan21")
    values = {t.targets[0].id: ast.literal_eval(t.value) for t in cls.body
              if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
              and t.targets[0].id in ("latent_rgb_factors", "latent_rgb_factors_bias")}
    assert [tuple(r) for r in values["latent_rgb_factors"]] == list(WAN21_RGB_FACTORS)
    assert tuple(values["latent_rgb_factors_bias"]) == WAN21_RGB_BIAS
