"""FramePack generation on the tiny presets: every DiT call of 1- and 2-section videos (original and F1) against
hand-written index tables and hand-placed history tensors, the final latent layout, end image, per-section prompts and
start images, one-frame inference (default and kisekaeichi), MagCache per section, real CFG (+ rescale) against a
hand-combined step, dynamic shift, progress totals and cancel, per-section decoding with soft blending, and bad
requests refused before any model call."""

import dataclasses
import math

import pytest
import torch

from engine.encoders.siglip import PRESET_TINY as SIGLIP_PRESET, load_siglip
from engine.errors import MusubiInputError
from engine.families.framepack import sections as S
from engine.families.framepack.dit import FramePackModel
from engine.families.framepack.pipeline import (FramePackGenerateRequest, FramePackImage, FramePackPrompt,
                                                decode_sections, dynamic_shift, generate, prepare_image,
                                                section_chunks, soft_append, validate_request)
from engine.families.framepack.presets import build_preset_state_dict, preset_config, random_state_dict
from engine.families.hunyuan.pipeline import MAGCACHE_RATIOS
from engine.families.hunyuan.vae import TINY_VAE_PRESET, load_hunyuan_vae
from engine.sampling import euler_schedule, make_noise, shift_sigmas
from engine.sampling.magcache import MagCacheConfig

W = H = 32                     # latents 4 x 4
LWS = 2                        # small windows keep the tiny runs fast; the index tables are written for 2
Z = torch.zeros(1, 16, 1, 4, 4)


@pytest.fixture(scope="module")
def dit():
    model = FramePackModel(preset_config("tiny"))
    model.load_state_dict(build_preset_state_dict("tiny"))
    return model.eval()


@pytest.fixture(scope="module")
def vae():
    return load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32)


class Calls:
    """Records every DiT forward's inputs through a pre-hook."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        c = {"x": args[0].clone(), "t": args[1].clone(), "text": args[2].clone(), "pooled": args[4].clone()}
        c.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        self.calls.append(c)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _prompt(seed, tokens=5):
    return FramePackPrompt(_rand(seed, tokens, 32), _rand(seed + 100, 24))


def _image(seed, dim=48):
    return FramePackImage(_rand(seed, 16, 1, 4, 4), _rand(seed + 100, 6, dim))


def _request(**kw) -> FramePackGenerateRequest:
    base = dict(prompt=_prompt(1), image=_image(2), sections=1, latent_window_size=LWS, steps=2, seed=7)
    return FramePackGenerateRequest(**{**base, **kw})


def _idx(*values):
    return torch.tensor([list(values)])


def _check(call, latent, clean, clean_2x, clean_4x):
    """One call's indices (tuples) and history tensors against the hand-written values (None = absent)."""
    for key, want in (("latent_indices", latent), ("clean_latent_indices", clean[0]),
                      ("clean_latent_2x_indices", clean_2x[0]), ("clean_latent_4x_indices", clean_4x[0])):
        got = call[key]
        assert (got is None) == (want is None), key
        if want is not None:
            assert got.tolist() == [list(want)] * got.shape[0], (key, got.tolist())
    for key, want in (("clean_latents", clean[1]), ("clean_latents_2x", clean_2x[1]),
                      ("clean_latents_4x", clean_4x[1])):
        got = call[key]
        assert (got is None) == (want is None), key
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=key)


def _zeros(n):
    return torch.zeros(1, 16, n, 4, 4)


# --- the original schedule --------------------------------------------------------------------------------------------

def test_original_one_section_indices_history_and_layout(dit):
    r = _request()
    with Calls(dit) as rec:
        out = generate(dit, r)
    assert out.shape == (1, 16, 3, 4, 4) and len(rec.calls) == 2
    for c in rec.calls:   # [start 0 | target 1, 2 | post 3 | 2x 4, 5 | 4x 6..21]; no end image: zeros
        _check(c, (1, 2), ((0, 3), torch.cat([r.image.latent[None], Z], 2)), ((4, 5), _zeros(2)),
               (tuple(range(6, 22)), _zeros(16)))
        torch.testing.assert_close(c["image_embeddings"], r.image.embeddings[None])
        assert c["guidance"].tolist() == [10000.0] and c["rope_scaling"] is None
    torch.testing.assert_close(rec.calls[0]["x"], make_noise((16, 2, 4, 4), 7))
    assert torch.equal(out[:, :, :1], r.image.latent[None])                     # the start latent first


def test_original_two_sections_end_image_and_per_section_inputs(dit):
    prompts, images, end = [_prompt(10), _prompt(11, tokens=3)], [_image(20), _image(21)], _image(30)
    r = _request(sections=2, prompt=prompts, image=images, end_image=FramePackImage(end.latent))
    with Calls(dit) as rec:
        out = generate(dit, r)
    assert out.shape == (1, 16, 5, 4, 4) and len(rec.calls) == 4
    first, second = rec.calls[:2], rec.calls[2:]
    gen_last = out[:, :, 3:5]                            # sampled first: time section 1 (frames 3, 4)
    for c in first:       # paddings [1, 0]: [start 0 | blank 1, 2 | target 3, 4 | post 5 | 2x 6, 7 | 4x 8..23]
        _check(c, (3, 4), ((0, 5), torch.cat([images[1].latent[None], end.latent[None]], 2)),
               ((6, 7), _zeros(2)), (tuple(range(8, 24)), _zeros(16)))
        torch.testing.assert_close(c["text"], prompts[1].context[None])
        torch.testing.assert_close(c["image_embeddings"], images[1].embeddings[None])
    for c in second:      # history [section 1's two latents, end, zeros]: post = its first, 2x = (its second, end)
        _check(c, (1, 2), ((0, 3), torch.cat([images[0].latent[None], gen_last[:, :, :1]], 2)),
               ((4, 5), torch.cat([gen_last[:, :, 1:], end.latent[None]], 2)), (tuple(range(6, 22)), _zeros(16)))
        torch.testing.assert_close(c["text"], prompts[0].context[None])
        torch.testing.assert_close(c["image_embeddings"], images[0].embeddings[None])
    assert torch.equal(out[:, :, :1], images[0].latent[None])
    # noise: one generator per sample, drawn once per section in generation order
    g = torch.Generator().manual_seed(7)
    n1, n2 = torch.randn(16, 2, 4, 4, generator=g), torch.randn(16, 2, 4, 4, generator=g)
    torch.testing.assert_close(first[0]["x"], n1[None])
    torch.testing.assert_close(second[0]["x"], n2[None])
    assert torch.isfinite(out).all()


def test_latent_paddings_override_moves_only_the_target(dit):
    with Calls(dit) as rec:
        generate(dit, _request(sections=2, latent_paddings=[3], steps=1))
    assert rec.calls[0]["latent_indices"].tolist() == [[7, 8]]        # 1 + 3·2
    assert rec.calls[0]["clean_latent_indices"].tolist() == [[0, 9]]
    assert rec.calls[1]["latent_indices"].tolist() == [[1, 2]]        # the default's last padding (0)


# --- F1 ---------------------------------------------------------------------------------------------------------------

def test_f1_one_and_two_sections(dit):
    r = _request(f1=True)
    with Calls(dit) as rec:
        out = generate(dit, r)
    start = r.image.latent[None]
    for c in rec.calls:   # [start 0 | 4x 1..16 | 2x 17, 18 | 1x 19 | target 20, 21]; the history: start alone
        _check(c, (20, 21), ((0, 19), torch.cat([start, start], 2)), ((17, 18), _zeros(2)),
               (tuple(range(1, 17)), _zeros(16)))
    assert out.shape == (1, 16, 3, 4, 4) and torch.equal(out[:, :, :1], start)

    images = [_image(40), _image(41)]
    r = _request(f1=True, sections=2, image=images, prompt=[_prompt(50), _prompt(51)])
    with Calls(dit) as rec:
        out = generate(dit, r)
    assert out.shape == (1, 16, 5, 4, 4) and len(rec.calls) == 4
    s0 = out[:, :, 1:3]                                   # sampled first (time order)
    for c in rec.calls[:2]:
        _check(c, (20, 21), ((0, 19), torch.cat([images[0].latent[None]] * 2, 2)), ((17, 18), _zeros(2)),
               (tuple(range(1, 17)), _zeros(16)))
        torch.testing.assert_close(c["text"], r.prompt[0].context[None])
    for c in rec.calls[2:]:   # history [..zeros, start, s0_0, s0_1]: 1x = s0_1, 2x = (start, s0_0), 4x zeros
        _check(c, (20, 21), ((0, 19), torch.cat([images[1].latent[None], s0[:, :, 1:]], 2)),
               ((17, 18), torch.cat([images[0].latent[None], s0[:, :, :1]], 2)), (tuple(range(1, 17)), _zeros(16)))
        torch.testing.assert_close(c["text"], r.prompt[1].context[None])
        torch.testing.assert_close(c["image_embeddings"], images[1].embeddings[None])
    assert torch.equal(out[:, :, :1], images[0].latent[None])


def test_history_reaches_the_4x_slots_after_enough_sections(dit):
    r = _request(f1=True, sections=4, latent_window_size=1, steps=1)
    with Calls(dit) as rec:
        out = generate(dit, r)                              # [start, s0, s1, s2, s3]
    # last run: history [zeros x 19, start, s0, s1, s2]: 1x = s2, 2x = (s0, s1), 4x = (zeros x 15, start)
    _check(rec.calls[3], (20,), ((0, 19), torch.cat([r.image.latent[None], out[:, :, 3:4]], 2)),
           ((17, 18), out[:, :, 1:3]), (tuple(range(1, 17)), torch.cat([_zeros(15), r.image.latent[None]], 2)))
    end = _image(90)
    r = _request(sections=4, latent_window_size=1, steps=1, end_image=end)
    with Calls(dit) as rec:
        out = generate(dit, r)                              # [start, s0, s1, s2, s3]
    # last run (time section 0): history [s1, s2, s3, end, zeros]: post = s1, 2x = (s2, s3), 4x = (end, zeros x 15)
    _check(rec.calls[3], (1,), ((0, 2), torch.cat([r.image.latent[None], out[:, :, 2:3]], 2)),
           ((3, 4), out[:, :, 3:5]), (tuple(range(5, 21)), torch.cat([end.latent[None], _zeros(15)], 2)))
    assert [c["latent_indices"].tolist() for c in rec.calls] == [[[4]], [[3]], [[2]], [[1]]]   # paddings 3, 2, 1, 0


# --- one-frame -------------------------------------------------------------------------------------------------------

def test_one_frame_default_and_kisekaeichi(dit):
    with Calls(dit) as rec:
        out = generate(dit, _request(one_frame=S.OneFrameOptions()))
    assert out.shape == (1, 16, 1, 4, 4) and len(rec.calls) == 2
    for c in rec.calls:   # target at lws; a zero control at 0 and the zero post at 1 + lws; 2x/4x zeros after it
        _check(c, (2,), ((0, 3), _zeros(2)), ((4, 5), _zeros(2)), (tuple(range(6, 22)), _zeros(16)))
        assert c["x"].shape == (1, 16, 1, 4, 4)

    c0, c1 = _rand(60, 16, 1, 4, 4), _rand(61, 16, 1, 4, 4)
    mask = torch.zeros(4, 4)
    mask[:2] = 1.0
    mask[2, 1] = 0.5
    opts = S.parse_one_frame_options("target_index=1,control_index=0;10,no_post,no_2x,no_4x")
    with Calls(dit) as rec:
        generate(dit, _request(one_frame=opts, control_latents=[c0, c1], control_masks=[mask], steps=1))
    _check(rec.calls[0], (1,), ((0, 10), torch.cat([c0[None] * mask, c1[None]], 2)), (None, None), (None, None))


# --- guidance, shift, MagCache, RoPE scaling, batches ------------------------------------------------------------

def test_real_cfg_and_rescale_are_the_hand_combined_euler_step(dit):
    neg = _prompt(70, tokens=3)
    g, phi = 3.0, 0.7
    r = _request(steps=1, solver="euler", guidance_scale=g, negative_prompt=neg)
    with Calls(dit) as rec:
        guided = generate(dit, r)
        rescaled = generate(dit, dataclasses.replace(r, guidance_rescale=phi))
    c = rec.calls[0]
    assert c["x"].shape[0] == 2 and c["guidance"].tolist() == [10000.0, 10000.0]    # cond + uncond batched
    noise = make_noise((16, 2, 4, 4), 7)
    kw = {k: c[k][:1] for k in ("latent_indices", "image_embeddings", "clean_latents", "clean_latent_indices",
                                "clean_latents_2x", "clean_latent_2x_indices", "clean_latents_4x",
                                "clean_latent_4x_indices", "guidance")}
    t = torch.full((1,), 1000.0)
    with torch.no_grad():
        pos = dit(noise, t, r.prompt.context[None], None, r.prompt.pooled[None], **kw)
        nv = dit(noise, t, neg.context[None], None, neg.pooled[None], **kw)
    v = nv + g * (pos - nv)
    torch.testing.assert_close(guided[:, :, 1:], noise - v, rtol=1e-5, atol=1e-5)     # after the start latent
    v_r = phi * v * (pos.std() / v.std()) + (1 - phi) * v
    torch.testing.assert_close(rescaled[:, :, 1:], noise - v_r, rtol=1e-5, atol=1e-5)
    with Calls(dit) as rec:                        # scale 1: no negative pass and no negative prompt needed
        plain = generate(dit, dataclasses.replace(r, guidance_scale=1.0, negative_prompt=None))
    assert len(rec.calls) == 1 and rec.calls[0]["x"].shape[0] == 1
    torch.testing.assert_close(plain[:, :, 1:], noise - pos, rtol=1e-5, atol=1e-5)


def test_dynamic_and_fixed_shift_timesteps_and_embedded_guidance(dit):
    k = 0.65 / 3840
    assert dynamic_shift(9, 80, 80) == pytest.approx(7.0)                       # 14400 tokens: capped at ln 7
    assert dynamic_shift(9, 40, 40) == pytest.approx(math.exp(k * 3600 + 0.5 - k * 256))
    with Calls(dit) as rec:
        generate(dit, _request(steps=3, solver="euler", embedded_guidance=3.5))
        generate(dit, _request(steps=3, solver="euler", shift=5.0, rope_scaling=(800, 0.5)))
    lin = torch.linspace(1, 0, 4, dtype=torch.float64)
    s_dyn = math.exp(k * (2 * 16 // 4) + 0.5 - k * 256)                          # 8 tokens
    want = [(shift_sigmas(lin, s_dyn)[:3] * 1000).float(), (shift_sigmas(lin, 5.0)[:3] * 1000).float()]
    got = torch.stack([c["t"][0] for c in rec.calls]).reshape(2, 3)
    torch.testing.assert_close(got, torch.stack(want))
    torch.testing.assert_close(got[1], euler_schedule(3, 5.0).timesteps)
    assert [c["guidance"].item() for c in rec.calls] == [3500.0] * 3 + [10000.0] * 3
    assert [c["rope_scaling"] for c in rec.calls] == [None] * 3 + [(800.0, 0.5)] * 3


def test_magcache_runs_per_section_and_skips_on_the_table(dit):
    """10 steps per section, ratios 1.0, at most 3 skips in a row: per section steps 0-1 run, 2-4 skip, 5 runs,
    6-8 skip, 9 runs (the HunyuanVideo test's table) -> 4 block runs per section, 8 for two sections."""
    runs = []
    hook = dit.transformer_blocks[0].register_forward_pre_hook(lambda m, a: runs.append(1))
    try:
        with Calls(dit) as rec:
            out = generate(dit, _request(sections=2, steps=10, magcache=MagCacheConfig([1.0] * 10, max_skips=3)))
        assert len(rec.calls) == 20 and len(runs) == 8 and torch.isfinite(out).all()
        runs.clear()
        generate(dit, _request(steps=10, magcache=MagCacheConfig([2.0] * 10, max_skips=3)))
        assert len(runs) == 10
    finally:
        hook.remove()
    assert _request(magcache=MagCacheConfig()).resolve().magcache.mag_ratios == MAGCACHE_RATIOS


def test_batch_sample_b_is_seed_plus_b_across_sections(dit):
    both = generate(dit, _request(sections=2, batch_size=2, steps=1))
    torch.testing.assert_close(both[1:], generate(dit, _request(sections=2, seed=8, steps=1)))
    assert not torch.allclose(both[0, :, 1:], both[1, :, 1:])


def test_progress_counts_every_step_of_every_section_and_can_cancel(dit):
    seen = []
    generate(dit, _request(sections=2), lambda step, total, x0: seen.append((step, total, tuple(x0.shape))))
    assert seen == [(i, 4, (1, 16, 2, 4, 4)) for i in (1, 2, 3, 4)]

    class Cancelled(BaseException):
        pass

    def cancel(step, total, x0):
        if step == 3:
            raise Cancelled

    with Calls(dit) as rec, pytest.raises(Cancelled):
        generate(dit, _request(sections=2), cancel)
    assert len(rec.calls) == 3


def test_video_seconds_and_defaults():
    r = FramePackGenerateRequest(prompt=_prompt(1), image=_image(2)).resolve()
    assert (r.sections, r.steps, r.embedded_guidance, r.latent_window_size, r.solver) == (4, 25, 10.0, 9, "unipc")
    assert (r.width, r.height) == (W, H) and len(r.prompt) == len(r.image) == 4
    assert FramePackGenerateRequest(prompt=_prompt(1), video_seconds=60.0).resolve().sections == 50
    assert FramePackGenerateRequest(prompt=_prompt(1), video_seconds=60.0, sections=3).resolve().sections == 3
    assert _request(one_frame=S.OneFrameOptions(), sections=None).resolve().sections == 1
    assert _request(sections=3).resolve().output_shape() == (1, 16, 7, 4, 4)


# --- conditioning and decoding -------------------------------------------------------------------------------------

def test_prepare_image_and_an_end_to_end_run_with_the_tiny_encoders(vae):
    siglip = load_siglip(SIGLIP_PRESET, dtype=torch.float32)
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(3)) * 2 - 1
    cond = prepare_image(vae, siglip, image)
    with torch.no_grad():
        torch.testing.assert_close(cond.latent, vae.encode(image[None, :, None]).float()[0])
        torch.testing.assert_close(cond.embeddings, siglip.encode(image[None])[0].float())
    assert prepare_image(vae, None, image).embeddings is None
    wide = prepare_image(vae, siglip, torch.zeros(3, 32, 64), width=W, height=H)   # bucket resize: cover + crop
    assert wide.latent.shape == (16, 1, 4, 4) and wide.embeddings.shape == (16, 48)
    with pytest.raises(MusubiInputError, match="image size"):
        prepare_image(vae, siglip, torch.zeros(3, 20, W))

    cfg = preset_config("tiny")
    assert cfg.image_dim == siglip.config.hidden_size                        # the tiny presets fit together
    model = FramePackModel(cfg)
    model.load_state_dict(random_state_dict(cfg))
    out = generate(model.eval(), _request(image=cond, sections=2, steps=1, end_image=prepare_image(vae, None, image)))
    frames = decode_sections(vae, out, LWS)
    assert frames.shape == (1, 3, 17, H, W) and torch.isfinite(frames).all()


def test_decode_sections_blends_the_shared_section(vae):
    lat = _rand(80, 1, 16, 5, 4, 4)                                   # 2 sections of 2 latents + start
    assert section_chunks(5, 2) == [(0, 5), (3, 5)]
    assert section_chunks(28, 9) == [(0, 19), (10, 28), (19, 28)]
    assert section_chunks(10, 9) == [(0, 10)]
    a, b = vae.decode(lat[:, :, 0:5]), vae.decode(lat[:, :, 3:5])     # 17 and 5 frames; they share the last 5
    w = torch.linspace(1, 0, 5).view(1, 1, -1, 1, 1)
    want = torch.cat([a[:, :, :12], w * a[:, :, 12:] + (1 - w) * b], dim=2)
    torch.testing.assert_close(decode_sections(vae, lat, 2), want)
    torch.testing.assert_close(decode_sections(vae, lat[0], 2, bulk=True), a)
    single = decode_sections(vae, lat[:, :, :2], one_frame=True)
    assert single.shape == (1, 3, 2, H, W)
    torch.testing.assert_close(single[:, :, 1:], vae.decode(lat[:, :, 1:2]))
    x, y = torch.ones(1, 1, 4, 1, 1), torch.zeros(1, 1, 3, 1, 1)
    assert soft_append(x, y, 2).flatten().tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(MusubiInputError, match="latents frames"):
        decode_sections(vae, lat[:, :, :4], 2)


# --- refusals before any model call ---------------------------------------------------------------------------------

BAD = [
    (dict(image=None), "start image"),
    (dict(f1=True, end_image=_image(3)), "end_image"),
    (dict(f1=True, latent_paddings=[1]), "latent_paddings"),
    (dict(latent_paddings=[-1]), "latent_paddings"),
    (dict(sections=2, prompt=[_prompt(1)] * 3), "section prompts"),
    (dict(sections=2, image=[_image(2)]), "section start images"),
    (dict(sections=2, prompt=[_prompt(1), "text"]), "section 1 prompt"),
    (dict(sections=0), "sections"),
    (dict(sections=None, video_seconds=-1.0), "video_seconds"),
    (dict(image=FramePackImage(torch.zeros(16, 1, 4, 4))), "embeddings"),
    (dict(image=FramePackImage(torch.zeros(16, 1, 4, 4), torch.zeros(6, 47))), "embeddings"),
    (dict(image=FramePackImage(torch.zeros(16, 2, 4, 4), torch.zeros(6, 48))), "start image latent"),
    (dict(width=64), "start image latent"),
    (dict(width=40), "width"),
    (dict(end_image=FramePackImage(torch.zeros(16, 1, 8, 4))), "end image latent"),
    (dict(steps=0), "steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(shift=0.0), "shift"),
    (dict(solver="ddim"), "solver"),
    (dict(seed=-1), "seed"),
    (dict(noise_device="tpu"), "noise_device"),
    (dict(guidance_scale=3.0), "negative prompt"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
    (dict(embedded_guidance="x"), "embedded_guidance"),
    (dict(rope_scaling=(800, 0)), "rope_scaling"),
    (dict(prompt=FramePackPrompt(torch.zeros(5, 31), torch.zeros(24))), "prompt embeddings"),
    (dict(prompt=FramePackPrompt(torch.zeros(5, 32), torch.zeros(23))), "pooled"),
    (dict(latent_window_size=0), "latent_window_size"),
    (dict(magcache=MagCacheConfig([])), "mag_ratios"),
    (dict(control_latents=[torch.zeros(16, 1, 4, 4)]), "control images"),
    (dict(one_frame=S.OneFrameOptions(), f1=True), "f1"),
    (dict(one_frame=S.OneFrameOptions(), sections=2), "sections"),
    (dict(one_frame=S.OneFrameOptions(), end_image=_image(3)), "end_image"),
    (dict(one_frame=S.OneFrameOptions(), control_latents=[torch.zeros(16, 1, 4, 8)]), "control image 0 latent"),
    (dict(one_frame=S.OneFrameOptions(), control_latents=[torch.zeros(16, 1, 4, 4)],
          control_masks=[torch.ones(8, 8)]), "control mask 0"),
    (dict(one_frame=S.OneFrameOptions(), control_latents=[torch.zeros(16, 1, 4, 4)],
          control_masks=[None, torch.ones(4, 4)]), "control masks"),
    (dict(one_frame=S.OneFrameOptions(control_indices=(0, 1, 2))), "control_index"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[f"{i}-{n}" for i, (_, n) in enumerate(BAD)])
def test_bad_requests_are_refused_before_any_model_call(dit, kw, needle):
    with Calls(dit) as rec, pytest.raises(MusubiInputError, match=needle):
        generate(dit, _request(**kw))
    assert rec.calls == []


def test_validate_request_alone_accepts_a_good_request(dit):
    validate_request(dit, _request(sections=2).resolve())


def test_embedded_guidance_is_rounded_through_the_models_dtype_as_musubi(dit):
    """Musubi / official FramePack build the guidance tensor in bf16: 10.0 x 1000 reaches the embedder as 9984."""
    half = FramePackModel(preset_config("tiny"))
    half.load_state_dict(build_preset_state_dict("tiny"))
    half = half.to(torch.bfloat16).eval()
    with Calls(half) as rec:
        out = generate(half, _request(steps=1))
    assert rec.calls[0]["guidance"].tolist() == [9984.0] and out.dtype == torch.float32
