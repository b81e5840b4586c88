"""HunyuanVideo generation on the tiny presets: V2V and SkyReels I2V conditioning against hand computations, V2V's
start at the matching timestep, T2I, real CFG against a hand-combined step and no negative pass at scale 1, embedded
guidance, batches, cancel from the progress callback, and bad requests refused before any model call."""

import ast
import dataclasses

import pytest
import torch

from engine.errors import MusubiInputError
from engine.families import family_of, get_family
from engine.families.hunyuan.dit import HunyuanVideoModel
from engine.families.hunyuan.pipeline import (HUNYUAN_RGB_BIAS, HUNYUAN_RGB_FACTORS, HunyuanConditioning,
                                              HunyuanGenerateRequest, generate, latent_to_rgb_preview, prepare_v2v,
                                              prepare_skyreels_i2v)
from engine.families.hunyuan.presets import build_preset_state_dict, preset_config
from engine.families.hunyuan.vae import TINY_VAE_PRESET, load_hunyuan_vae
from engine.sampling import euler_schedule, make_noise
from engine.sampling.magcache import MagCacheConfig

W = H = 32                      # latents 4 x 4


def _model(name="tiny"):
    model = HunyuanVideoModel(preset_config(name))
    model.load_state_dict(build_preset_state_dict(name))
    return model.eval()


@pytest.fixture(scope="module")
def t2v():
    return _model("tiny")


@pytest.fixture(scope="module")
def i2v():
    return _model("tiny-i2v")


@pytest.fixture(scope="module")
def vae():
    return load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32)


class Calls:
    """Records every DiT forward (x, t, guidance, y, batch) through a pre-hook."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({"x": args[0].clone(), "t": args[1].clone(), "text": args[2], "guidance": kwargs["guidance"],
                           "y": kwargs["y"]})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _text(seed, tokens=5, dim=32, pool=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, dim, generator=g), torch.randn(pool, generator=g)


def _request(**kw) -> HunyuanGenerateRequest:
    ctx, pooled = _text(1)
    base = dict(task="t2v", context=ctx, pooled=pooled, width=W, height=H, frames=5, steps=3, seed=7)
    return HunyuanGenerateRequest(**{**base, **kw})


def _negative(**kw):
    neg, neg_pooled = _text(2, tokens=3)
    return {"negative_context": neg, "negative_pooled": neg_pooled, **kw}


# --- conditioning ---------------------------------------------------------------------------------------------------

def test_skyreels_i2v_conditioning_is_the_image_latent_in_frame_zero(vae):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, H, W, generator=g) * 2 - 1
    cond = prepare_skyreels_i2v(vae, image, frames=9)
    with torch.no_grad():
        alone = vae.encode(image[None, :, None])[0]                     # [16, 1, 4, 4]: a 1-frame encode
    assert cond.kind == "i2v" and cond.latents.shape == (16, 3, 4, 4)
    torch.testing.assert_close(cond.latents[:, :1], alone)
    assert torch.equal(cond.latents[:, 1:], torch.zeros(16, 2, 4, 4))


def test_i2v_feeds_y_to_every_forward_and_needs_the_i2v_model(i2v, t2v, vae):
    image = torch.zeros(3, H, W)
    cond = prepare_skyreels_i2v(vae, image, frames=5)
    with Calls(i2v) as rec:
        out = generate(i2v, _request(task="i2v", conditioning=cond, batch_size=2))
    assert out.shape == (2, 16, 2, 4, 4) and torch.isfinite(out).all()
    assert len(rec.calls) == 3 and all(c["guidance"] is None for c in rec.calls)     # no guidance embedder
    assert all(torch.equal(c["y"], cond.latents[None].expand(2, -1, -1, -1, -1)) for c in rec.calls)
    with Calls(t2v) as rec, pytest.raises(MusubiInputError, match="takes no start image"):
        generate(t2v, _request(task="i2v", conditioning=cond))
    assert rec.calls == []


def test_v2v_latents_and_start_at_the_matching_timestep(t2v, vae):
    g = torch.Generator().manual_seed(3)
    video = torch.rand(3, 7, H, W, generator=g) * 2 - 1                   # longer than needed: first 5 frames
    cond = prepare_v2v(vae, video, frames=5)
    with torch.no_grad():
        assert torch.equal(cond.latents, vae.encode(video[None, :, :5]).float()[0])
    steps, strength, shift = 10, 0.45, 7.0
    with Calls(t2v) as rec:
        out = generate(t2v, _request(task="v2v", conditioning=cond, steps=steps, strength=strength))
    run = int(steps * strength)                                           # Musubi: 4 of 10 steps
    sched = euler_schedule(steps, shift)
    sigma = float(sched.sigmas[steps - run])
    noise = make_noise((16, 2, 4, 4), 7)
    assert len(rec.calls) == run
    torch.testing.assert_close(rec.calls[0]["x"], noise * sigma + cond.latents[None] * (1 - sigma))
    torch.testing.assert_close(torch.stack([c["t"][0] for c in rec.calls]), sched.timesteps[steps - run:])
    assert out.shape == (1, 16, 2, 4, 4)
    # strength 1 is plain T2V from pure noise
    full = generate(t2v, _request(task="v2v", conditioning=cond, strength=1.0))
    torch.testing.assert_close(full, generate(t2v, _request()))


# --- text-only tasks, guidance, batches -----------------------------------------------------------------------------

def test_t2i_is_one_latent_frame_with_embedded_guidance(t2v):
    with Calls(t2v) as rec:
        out = generate(t2v, _request(task="t2i", frames=None, steps=2))
        custom = generate(t2v, _request(task="t2i", frames=None, steps=1, embedded_guidance=3.5))
    assert out.shape == (1, 16, 1, 4, 4)
    assert [float(c["guidance"][0]) for c in rec.calls] == [6000.0, 6000.0, 3500.0]
    assert not torch.equal(custom, generate(t2v, _request(task="t2i", frames=None, steps=1)))


def test_real_cfg_is_one_hand_combined_euler_step_and_scale_one_runs_no_negative_pass(t2v):
    neg = _negative()
    with Calls(t2v) as rec:
        plain = generate(t2v, _request(steps=1, **neg))                    # scale 1: negative ignored
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 1

    g = 4.0
    with Calls(t2v) as rec:
        guided = generate(t2v, _request(steps=1, guidance_scale=g, **neg))
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 2       # cond + uncond in one batch
    assert torch.equal(rec.calls[0]["guidance"], torch.full((2,), 6000.0))  # the negative pass gets it too

    noise = make_noise((16, 2, 4, 4), 7)
    r = _request()
    t = torch.full((1,), 1000.0)
    with torch.no_grad():
        v_c = t2v(noise, t, r.context[None], None, r.pooled[None], guidance=torch.tensor([6000.0]))
        v_u = t2v(noise, t, neg["negative_context"][None], None, neg["negative_pooled"][None],
                  guidance=torch.tensor([6000.0]))
    torch.testing.assert_close(guided, noise - (v_u + g * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, noise - v_c, rtol=1e-5, atol=1e-5)

    with Calls(t2v) as rec:
        split = generate(t2v, _request(steps=1, guidance_scale=g, batch_cfg=False, **neg))
    assert len(rec.calls) == 2
    torch.testing.assert_close(split, guided, rtol=1e-5, atol=1e-5)


def test_batch_sample_b_is_seed_plus_b(t2v):
    both = generate(t2v, _request(batch_size=2, steps=2))
    torch.testing.assert_close(both[1:], generate(t2v, _request(seed=8, steps=2)))
    assert not torch.allclose(both[0], both[1])


def test_progress_sees_every_step_and_can_cancel(t2v):
    seen = []
    generate(t2v, _request(), lambda step, total, x0: seen.append((step, total, tuple(x0.shape))))
    assert seen == [(i, 3, (1, 16, 2, 4, 4)) for i in (1, 2, 3)]

    class Cancelled(BaseException):
        pass

    def cancel(step, total, x0):
        if step == 2:
            raise Cancelled

    with Calls(t2v) as rec, pytest.raises(Cancelled):
        generate(t2v, _request(), cancel)
    assert len(rec.calls) == 2


def test_magcache_skips_the_blocks_on_the_hand_computed_steps(t2v):
    """10 steps, ratios all 1.0 (no error accumulates), at most 3 skips in a row: steps 0-1 run (20 %), 2-4 skip,
    5 runs (a 4th skip), 6-8 skip, 9 (the last) runs. Every step still calls the DiT (embeddings, final layer)."""
    from engine.memory import FakeTransfer, swap_blocks
    from engine.sampling.magcache import MagCacheConfig

    runs = []
    hook = t2v.double_blocks[0].register_forward_pre_hook(lambda m, a: runs.append(1))
    try:
        plain = generate(t2v, _request(steps=10))
        runs.clear()
        never = generate(t2v, _request(steps=10, magcache=MagCacheConfig([2.0] * 10, max_skips=3)))
        assert len(runs) == 10
        torch.testing.assert_close(never, plain, rtol=0, atol=0)      # nothing skipped: the same latents
        runs.clear()
        with Calls(t2v) as rec:
            cached = generate(t2v, _request(steps=10, magcache=MagCacheConfig([1.0] * 10, max_skips=3)))
        assert len(rec.calls) == 10 and len(runs) == 4
        assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
        swapper = swap_blocks(t2v, 3, "cpu", transfer=FakeTransfer())   # block swap sees whole forwards skipped
        try:
            swapped = generate(t2v, _request(steps=10, magcache=MagCacheConfig([1.0] * 10, max_skips=3)))
        finally:
            swapper.detach("cpu")
        torch.testing.assert_close(swapped, cached)
    finally:
        hook.remove()
    from engine.families.hunyuan.pipeline import MAGCACHE_RATIOS
    assert _request(magcache=MagCacheConfig()).resolve().magcache.mag_ratios == MAGCACHE_RATIOS   # the model's table
    got = []
    calibrating = MagCacheConfig(calibrate=True, on_done=lambda cache: got.append(cache.calibration))
    generate(t2v, _request(steps=4, magcache=calibrating))
    assert len(got) == 1 and len(got[0].mag_ratios()) == 4 and got[0].mag_ratios()[0] == 1.0


def test_the_family_runs_the_pipeline(t2v):
    fam = family_of(t2v)
    assert fam is get_family("hunyuan")
    from engine.training import ValidationPrompt

    ctx, pooled = _text(1)
    prompt = ValidationPrompt(context=ctx, pooled=pooled, width=W, height=H, frames=1, steps=2, seed=7,
                              guidance_scale=1.0)
    request = fam.sampling_request(prompt)
    assert request.task == "t2i"
    fam.check_sampling(t2v, request)
    torch.testing.assert_close(fam.sample(t2v, request), generate(t2v, _request(task="t2i", frames=1, steps=2)))
    # the Validation Prompt's default guidance (5.0, real CFG) without a negative prompt is refused up front
    with pytest.raises(MusubiInputError, match="negative prompt"):
        fam.check_sampling(t2v, fam.sampling_request(dataclasses.replace(prompt, guidance_scale=5.0)))


# --- refusals before any model call ---------------------------------------------------------------------------------

def _cond(kind, frames=5):
    return HunyuanConditioning(kind, torch.zeros(16, (frames - 1) // 4 + 1, 4, 4))


BAD = [
    (dict(frames=6), "frames"),
    (dict(frames=0), "frames"),
    (dict(task="t2i", frames=5), "frames"),
    (dict(width=40), "width"),
    (dict(height=8), "height"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(shift=0.0), "shift"),
    (dict(solver="ddim"), "solver"),
    (dict(seed=-1), "seed"),
    (dict(noise_device="tpu"), "noise_device"),
    (dict(task="x2v"), "task"),
    (dict(guidance_scale=3.0), "negative prompt"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(context=torch.zeros(5, 31)), "prompt embeddings"),
    (dict(pooled=torch.zeros(23)), "pooled"),
    (dict(context_mask=torch.zeros(5, dtype=torch.bool)), "mask"),
    (dict(context_mask=torch.ones(4, dtype=torch.bool)), "mask"),
    (dict(guidance_scale=3.0, negative_context=torch.zeros(2, 32), negative_pooled=torch.zeros(7)),
     "negative prompt pooled"),
    (dict(task="v2v"), "source video"),
    (dict(task="v2v", conditioning=_cond("v2v"), strength=0.0), "strength"),
    (dict(task="v2v", conditioning=_cond("v2v"), strength=1.5), "strength"),
    (dict(task="v2v", conditioning=_cond("v2v"), steps=3, strength=0.2), "strength"),
    (dict(task="v2v", conditioning=_cond("v2v", frames=9)), "v2v latents"),
    (dict(task="v2v", conditioning=_cond("i2v")), "conditioning"),
    (dict(strength=0.5), "strength"),
    (dict(conditioning=_cond("v2v")), "conditioning"),
    (dict(task="i2v", conditioning=_cond("i2v")), "takes no start image"),
    (dict(magcache=MagCacheConfig([])), "mag_ratios"),
    (dict(magcache=MagCacheConfig([1.0]), guidance_scale=3.0, batch_cfg=False, negative_context=torch.zeros(2, 32),
          negative_pooled=torch.zeros(24)), "batch_cfg"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_requests_are_refused_before_any_model_call(t2v, kw, needle):
    with Calls(t2v) as rec, pytest.raises(MusubiInputError, match=needle):
        generate(t2v, _request(**kw))
    assert rec.calls == []


@pytest.mark.parametrize("kw,needle", [
    (dict(task="t2v"), "needs a start image"),
    (dict(task="i2v"), "start image"),
    (dict(task="i2v", conditioning=_cond("i2v"), embedded_guidance=6.0), "no guidance embedder"),
])
def test_skyreels_i2v_refusals(i2v, kw, needle):
    with Calls(i2v) as rec, pytest.raises(MusubiInputError, match=needle):
        generate(i2v, _request(**kw))
    assert rec.calls == []


def test_bad_conditioning_inputs(vae):
    with pytest.raises(MusubiInputError, match="video frames"):
        prepare_v2v(vae, torch.zeros(3, 3, H, W), frames=5)
    with pytest.raises(MusubiInputError, match="image size"):
        prepare_skyreels_i2v(vae, torch.zeros(3, 20, W), frames=5)
    with pytest.raises(MusubiInputError, match="image"):
        prepare_skyreels_i2v(vae, torch.zeros(4, H, W), frames=5)


# --- preview --------------------------------------------------------------------------------------------------------

def test_preview_is_comfyuis_linear_map(comfyui_dir):
    lat = torch.zeros(1, 16, 2, 3, 5)
    lat[0, 10, 1] = 1.0                                                  # channel 10 in frame 1 only
    rgb = latent_to_rgb_preview(lat, frame=1)
    assert rgb.shape == (3, 5, 3)
    expected = (torch.tensor(HUNYUAN_RGB_FACTORS[10]) + torch.tensor(HUNYUAN_RGB_BIAS) + 1) / 2
    torch.testing.assert_close(rgb[0, 0], expected)
    tree = ast.parse((comfyui_dir / "comfy" / "latent_formats.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HunyuanVideo")
    values = {t.targets[0].id: ast.literal_eval(t.value) for t in cls.body
              if isinstance(t, ast.Assign) and isinstance(t.targets[0], ast.Name)
              and t.targets[0].id in ("latent_rgb_factors", "latent_rgb_factors_bias")}
    assert [tuple(r) for r in values["latent_rgb_factors"]] == list(HUNYUAN_RGB_FACTORS)
    assert tuple(values["latent_rgb_factors_bias"]) == HUNYUAN_RGB_BIAS
    assert torch.equal(get_family("hunyuan").latent_preview(lat), latent_to_rgb_preview(lat))


def test_encoded_prompts_padded_with_a_mask_sample_as_the_trimmed_tokens(t2v):
    """The tiny LLaVA-LLaMA-3 / CLIP-L presets' outputs drive the pipeline; padding behind the mask changes nothing."""
    from engine.encoders.clip_text import PRESET_TINY as CLIP_PRESET, load_clip_text
    from engine.encoders.llava_llama import PRESET_TINY as LLM_PRESET, load_llava_llama

    llm, clip = load_llava_llama(LLM_PRESET, dtype=torch.float32), load_clip_text(CLIP_PRESET, dtype=torch.float32)
    states, mask = llm.encode(["a red fox", "snow"])                    # [2, 256, 32], [2, 256]
    pooled = clip.encode(["a red fox", "snow"])                         # [2, 24]
    padded = _request(context=states[0], context_mask=mask[0], pooled=pooled[0], guidance_scale=3.0,
                      negative_context=states[1], negative_context_mask=mask[1], negative_pooled=pooled[1], steps=2)
    trimmed = dataclasses.replace(padded, context=states[0][mask[0]], context_mask=None,
                                  negative_context=states[1][mask[1]], negative_context_mask=None)
    assert trimmed.context.shape[0] < 256
    torch.testing.assert_close(generate(t2v, padded), generate(t2v, trimmed), rtol=1e-4, atol=1e-5)
