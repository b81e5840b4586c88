"""Wan 2.2 DiT variants: I2V A14B (no CLIP branch), TI2V-5B (48 channels, per-token timesteps), T2V A14B (the 2.1
T2V-14B layout, told by its file name); numerics against diffusers, the per-token t, TI2V generation with a clean
first frame, detection and request validation.

Tiny models (dim 256 = 2 heads x 128, 2 blocks, text width 32) on CPU in float32. The 48-channel 16x VAE of the 5B
is another module's work; generation tests here use a stand-in with its shapes (`_Vae22Shapes`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.errors import MusubiInputError
from engine.families.wan.detect import detect_wan_config, expert_from_name, model_kind, require_task
from engine.families.wan.dit import WanModel, build_wan_model
from engine.families.wan.family import FAMILY, needs_clip
from engine.families.wan.loader import load_wan_dit
from engine.families.wan.pipeline import (WanGenerateRequest, first_frame_timesteps, generate, prepare_i2v,
                                          prepare_ti2v, validate_request)
from engine.families.wan.presets import OFFICIAL, build_preset_state_dict, preset_config, write_preset_checkpoint
from engine.families.wan.vae import load_wan_vae
from engine.memory.checkpointing import set_block_checkpointing

# float32 end to end, as the 2.1 parity test (observed there 0.6-3.2e-6)
PARITY_RTOL = 2e-5
TEXT_DIM = 32


def _model(name, seed=0) -> WanModel:
    model = WanModel(preset_config(name))
    model.load_state_dict(build_preset_state_dict(name, seed))
    return model.eval()


def _latents(channels, batch=1, frames=3, h=4, w=6, seed=1):
    return torch.randn(batch, channels, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _context(batch=1, tokens=7, seed=2):
    return torch.randn(batch, tokens, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def _padded(context):
    out = torch.zeros(context.shape[0], 512, TEXT_DIM)
    out[:, : context.shape[1]] = context
    return out


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------------------------------------------
# (a) numerics vs diffusers' WanTransformer3DModel (2.2 configs; per-token t through its `timestep.ndim == 2` path)
# --------------------------------------------------------------------------------------------------------------

def test_i2v_a14b_matches_diffusers(diffusers_wan):
    cfg = preset_config("tiny-i2v-a14b")
    assert not cfg.has_image_input and cfg.in_dim == 36
    sd = build_preset_state_dict("tiny-i2v-a14b", seed=3)
    assert not any("img" in k for k in sd)       # no k_img / v_img / img_emb: the 2.2 expert has no CLIP branch
    ours = WanModel(cfg)
    ours.load_state_dict(sd)
    ref = diffusers_wan(cfg, sd)
    x, y, context = _latents(16, batch=2), _latents(20, batch=2, seed=4), _context(batch=2)
    t = torch.tensor([937.0, 312.5])
    with torch.no_grad():
        out = ours(x, t, context, y=y)
        expected = ref(torch.cat([x, y], dim=1), t, _padded(context), return_dict=False)[0]
    assert out.shape == expected.shape == (2, 16, 3, 4, 6)
    rel = _rel(out, expected)
    print(f"i2v-A14B vs diffusers: max abs {(out - expected).abs().max():.2e}, rel {rel:.2e}")
    assert rel < PARITY_RTOL


@pytest.mark.parametrize("timesteps", ["first_frame", "per_token", "per_sample"])
def test_ti2v_5b_matches_diffusers(diffusers_wan, timesteps):
    cfg = preset_config("tiny-ti2v-5b")
    assert (cfg.in_dim, cfg.out_dim, cfg.model_type) == (48, 48, "ti2v")
    sd = build_preset_state_dict("tiny-ti2v-5b", seed=3)
    ours = WanModel(cfg)
    ours.load_state_dict(sd)
    ref = diffusers_wan(cfg, sd)
    x, context = _latents(48, batch=2), _context(batch=2)
    t = torch.tensor([880.0, 41.0])
    if timesteps == "first_frame":   # frame-0 tokens (the first 2*3 of 3*2*3) at t = 0, as TI2V I2V runs
        t = first_frame_timesteps(t, (3, 2, 3))
        assert t.shape == (2, 18) and (t[:, :6] == 0).all() and (t[:, 6:] > 0).all()
    elif timesteps == "per_token":   # a t that varies inside frames: the [B, L, 6, D] modulation path
        t = torch.rand(2, 18, generator=torch.Generator().manual_seed(6)) * 1000
    shapes, hooks = _block_e0_shapes(ours)
    with torch.no_grad():
        out = ours(x, t, context)
        expected = ref(x, t, _padded(context), return_dict=False)[0]
    for h in hooks:
        h.remove()
    # T of the [B, T, 6, D] modulation: per frame for the TI2V t (same values as per token, 6x fewer here)
    assert shapes[0] == (2, {"first_frame": 3, "per_token": 18, "per_sample": 1}[timesteps], 6, cfg.dim)
    assert out.shape == expected.shape == (2, 48, 3, 4, 6)
    rel = _rel(out, expected)
    print(f"ti2v-5B ({timesteps} t) vs diffusers: max abs {(out - expected).abs().max():.2e}, rel {rel:.2e}")
    assert rel < PARITY_RTOL
    # backward through the grouped modulation: the input gradient of a fixed projection equals diffusers'
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    grads = []
    for fn in (lambda v: ours(v, t, context), lambda v: ref(v, t, _padded(context), return_dict=False)[0]):
        v = x.clone().requires_grad_(True)
        (fn(v) * w).sum().backward()
        grads.append(v.grad)
    assert _rel(grads[0], grads[1]) < PARITY_RTOL
    if timesteps == "first_frame":   # frame 0's t changes the whole output (attention mixes frames), not only frame 0
        with torch.no_grad():
            flat = ours(x, t.amax(dim=1), context)
        assert (flat - out)[:, :, 1:].abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# (b) one t per sample and the same t on every token: the 2.1 and 2.2 time embeddings agree
# --------------------------------------------------------------------------------------------------------------

def _block_e0_shapes(model):
    shapes = []
    hooks = [b.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[1].shape))) for b in model.blocks]
    return shapes, hooks


@pytest.mark.parametrize("name", ["tiny-ti2v-5b", "tiny-t2v"])
def test_per_sample_t_equals_constant_per_token_t(name):
    model = _model(name)
    cfg = model.config
    x = _latents(cfg.out_dim, batch=2)
    context = _context(batch=2)
    t = torch.tensor([700.0, 15.0])
    tokens = 3 * 2 * 3
    shapes, hooks = _block_e0_shapes(model)
    with torch.no_grad():
        per_sample = model(x, t, context)
        per_token = model(x, t[:, None].expand(2, tokens), context)
        per_frame = model(x, t[:, None].expand(2, 3), context)
    for h in hooks:
        h.remove()
    # [B] t keeps the 2.1 memory: a [B, 1, 6, D] modulation broadcast over the tokens, never [B, L, 6, D]; a
    # per-token t that is constant over each frame runs per frame
    assert shapes == [(2, 1, 6, cfg.dim)] * 2 + [(2, 3, 6, cfg.dim)] * 4
    assert torch.equal(per_frame, per_token)
    # the same values up to float32 summation order (a Linear over B rows or B*L rows blocks its sums differently)
    rel = _rel(per_token, per_sample)
    print(f"{name}: [B] t vs constant [B, L] t: max abs {(per_token - per_sample).abs().max():.2e}, rel {rel:.2e}")
    assert rel < 2e-6
    # a scalar and a [1, L] row are shared by the batch
    with torch.no_grad():
        assert _rel(model(x, torch.tensor(700.0), context), model(x, torch.full((1, tokens), 700.0), context)) < 2e-6


def test_bad_per_token_t():
    model = _model("tiny-ti2v-5b")
    x, context = _latents(48), _context()
    with torch.no_grad(), pytest.raises(MusubiInputError, match=r"\[1, 18\] per-token timesteps.*\[1, 3\] \(per frame"):
        model(x, torch.zeros(1, 17), context)
    with torch.no_grad(), pytest.raises(MusubiInputError, match="^t: "):
        model(x, torch.zeros(1, 3, 6), context)


@pytest.mark.parametrize("per_token", [False, True])
def test_per_token_t_gradient_checkpointing_same_grads(per_token):
    """Per-frame / per-token modulation in training: gradients through the grouped views and the lean ops' reduction
    of [B, T, 1, D] shift/scale/gate gradients, with and without block checkpointing."""
    model = _model("tiny-ti2v-5b").train()
    x, context = _latents(48, batch=2, frames=2), _context(batch=2)
    t = first_frame_timesteps(torch.tensor([600.0, 300.0]), (2, 2, 3))
    if per_token:
        t[:, -1] = 5.0    # not constant per frame: the per-token [B, L, 6, D] path

    def grads(flag):
        model.zero_grad(set_to_none=True)
        set_block_checkpointing(model, flag)
        model(x, t, context).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    set_block_checkpointing(model, False)
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    assert plain["blocks.0.modulation"].abs().max() > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


# --------------------------------------------------------------------------------------------------------------
# (c) per-token t construction and TI2V generation with a clean first frame
# --------------------------------------------------------------------------------------------------------------

def test_first_frame_timesteps_vs_hand_and_official_mask():
    t = torch.tensor([999.0, 250.0])
    got = first_frame_timesteps(t, (3, 2, 4))                      # f, h, w patch grid: 8 tokens per frame
    hand = torch.tensor([[0.0] * 8 + [999.0] * 16, [0.0] * 8 + [250.0] * 16])
    assert torch.equal(got, hand)
    # the official construction: a latent-sized mask, 0 on frame 0, sub-sampled by the 2x2 patch, times t
    for b in range(2):
        mask = torch.ones(48, 3, 4, 8)
        mask[:, 0] = 0
        assert torch.equal(got[b], (mask[0][:, ::2, ::2] * t[b]).flatten())


class _Vae22Shapes:
    """Encodes with the shapes of the 48-channel Wan 2.2 VAE (causal 4x time, 16x space): frame 0 alone, then each
    4-frame group, average-pooled and mixed to 48 channels by a fixed matrix. Deterministic, not the real VAE."""

    def __init__(self, channels=48):
        self.mix = torch.randn(channels, 3, generator=torch.Generator().manual_seed(9))

    def encode(self, video):                   # [1, 3, F, H, W] -> [1, C, 1 + (F-1)/4, H/16, W/16]
        pooled = F.avg_pool3d(video.float(), (1, 16, 16))
        groups = [pooled[:, :, :1]] + [pooled[:, :, i:i + 4].mean(2, keepdim=True)
                                       for i in range(1, pooled.shape[2], 4)]
        return torch.einsum("oc,bcfhw->bofhw", self.mix, torch.cat(groups, dim=2))


def _image(seed=0, h=64, w=96):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _prompts():
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, TEXT_DIM, generator=g), torch.randn(4, TEXT_DIM, generator=g)


def _ti2v_request(cond=None, task="i2v", **kw):
    pos, neg = _prompts()
    base = dict(width=96, height=64, frames=9, steps=3, seed=3, solver="euler", shift=3.0, guidance_scale=4.0,
                conditioning=cond)
    base.update(kw)
    return WanGenerateRequest(task, pos, neg, **base)


@pytest.fixture(scope="module")
def ti2v():
    return load_wan_dit("preset:tiny-ti2v-5b", dtype=torch.float32)


def _record_calls(model):
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append((a[0].clone(), torch.as_tensor(a[1]).clone())))
    return calls, hook


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++"])
def test_ti2v_keeps_first_frame_clean(ti2v, solver):
    cond = prepare_ti2v(_Vae22Shapes(), _image())
    z = cond.first_frame
    assert z.shape == (48, 1, 4, 6)
    calls, hook = _record_calls(ti2v)
    try:
        out = generate(ti2v, _ti2v_request(cond, solver=solver, batch_size=2))
    finally:
        hook.remove()
    assert out.shape == (2, 48, 3, 4, 6)
    assert torch.equal(out[:, :, :1], z[None].expand(2, -1, -1, -1, -1))     # exactly the image latent
    assert out[:, :, 1:].std() > 0.1
    assert len(calls) == 3                                                   # batched CFG: one call per step
    for x, t in calls:
        assert t.shape == (4, 3 * 2 * 3)                                     # cond + uncond, per-token
        assert (t[:, :6] == 0).all() and (t[:, 6:] == t[:, 6:7]).all() and (t[:, 6:] > 0).all()
        assert torch.equal(x[:, :, :1], z[None].expand(4, -1, -1, -1, -1))   # the DiT always sees the clean frame


def test_ti2v_generation_equals_a_hand_written_loop(ti2v):
    """Euler + CFG with the official TI2V rules written out: noise with frame 0 replaced by the image latent,
    frame-0 tokens at t = 0, frame 0 put back after every step."""
    cond = prepare_ti2v(_Vae22Shapes(), _image())
    r = _ti2v_request(cond)
    pos, neg = _prompts()
    z = cond.first_frame[None]
    x = torch.randn(48, 3, 4, 6, generator=torch.Generator().manual_seed(3))[None]
    x = torch.cat([z, x[:, :, 1:]], dim=2)
    line = [1 - k / r.steps for k in range(r.steps + 1)]
    sig = [r.shift * s / (1 + (r.shift - 1) * s) for s in line]
    mask = torch.ones(3, 2, 3)
    mask[0] = 0
    with torch.no_grad():
        for i in range(r.steps):
            t = (mask * sig[i] * 1000.0).flatten()[None]
            vc, vu = ti2v(x, t, [pos]), ti2v(x, t, [neg])
            x = x + (vu + r.guidance_scale * (vc - vu)) * (sig[i + 1] - sig[i])
            x[:, :, :1] = z
    out = generate(ti2v, r)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_ti2v_t2v_runs_one_t_per_sample(ti2v):
    calls, hook = _record_calls(ti2v)
    try:
        out = generate(ti2v, _ti2v_request(task="t2v"))
    finally:
        hook.remove()
    assert out.shape == (1, 48, 3, 4, 6)
    assert all(t.shape == (2,) for _, t in calls)                 # the 2.1 path: no per-token modulation


def test_ti2v_request_defaults(ti2v):
    """wan/configs/wan_ti2v_5B.py: 121 frames, 50 steps, shift 5.0, guidance 5.0; 1280x704 (SUPPORTED_SIZES)."""
    pos, neg = _prompts()
    r = WanGenerateRequest("t2v", pos, neg).resolve(ti2v.config)
    assert (r.width, r.height, r.frames, r.steps, r.shift, r.guidance_scale) == (1280, 704, 121, 50, 5.0, 5.0)
    validate_request(ti2v, r)
    i2v = WanGenerateRequest("i2v", pos, neg, width=704, height=1280).resolve(ti2v.config)
    assert (i2v.frames, i2v.steps, i2v.shift) == (121, 50, 5.0)
    # a 2.1 model keeps its own defaults
    t2v21 = WanGenerateRequest("t2v", pos, neg).resolve(preset_config("tiny-t2v"))
    assert (t2v21.width, t2v21.height, t2v21.frames, t2v21.steps) == (832, 480, 81, 50)
    assert WanGenerateRequest("i2v", pos, neg).resolve().shift == 3.0


# --------------------------------------------------------------------------------------------------------------
# (d) I2V A14B: 2.1 I2V conditioning without CLIP
# --------------------------------------------------------------------------------------------------------------

def test_i2v_a14b_generation_without_clip():
    model = load_wan_dit("preset:tiny-i2v-a14b", dtype=torch.float32, expected_task="i2v")
    vae = load_wan_vae("preset:tiny-vae", dtype=torch.float32)
    cond = prepare_i2v(vae, _image(h=32, w=32), frames=5)
    pos, neg = _prompts()
    r = WanGenerateRequest("i2v", pos, neg, width=32, height=32, frames=5, steps=2, seed=1, solver="euler",
                           shift=2.0, guidance_scale=4.0, conditioning=cond)
    out = generate(model, r)
    assert out.shape == (1, 16, 2, 4, 4) and torch.isfinite(out).all()
    # the same as the DiT run by hand on y = mask + image latents, no CLIP
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    sig = [2.0 * s / (1 + s) for s in (1.0, 0.5, 0.0)]
    with torch.no_grad():
        for i in range(2):
            t = torch.tensor([sig[i] * 1000.0])
            vc, vu = model(x, t, [pos], y=cond.y[None]), model(x, t, [neg], y=cond.y[None])
            x = x + (vu + 4.0 * (vc - vu)) * (sig[i + 1] - sig[i])
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert not needs_clip(model.config) and needs_clip(preset_config("tiny-i2v"))


# --------------------------------------------------------------------------------------------------------------
# (e) validation before any model call
# --------------------------------------------------------------------------------------------------------------

class _NoCall(torch.nn.Module):
    """A model that fails if called: validation must refuse first."""

    def __init__(self, name):
        super().__init__()
        self.config = preset_config(name)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, *a, **k):
        raise AssertionError("the DiT was called")


def test_validation_refusals(raises_input):
    ti2v, a14b = _NoCall("tiny-ti2v-5b"), _NoCall("tiny-i2v-a14b")
    vae16 = load_wan_vae("preset:tiny-vae", dtype=torch.float32)
    clip = torch.zeros(257, 32)
    good = prepare_ti2v(_Vae22Shapes(), _image())
    # CLIP on a model without an image branch: refused (not silently ignored)
    with pytest.raises(MusubiInputError, match="no image cross-attention"):
        generate(ti2v, _ti2v_request(good, clip_fea=clip))
    i2v_cond = prepare_i2v(vae16, _image(h=32, w=32), frames=5)
    a14b_req = dict(width=32, height=32, frames=5, steps=2, conditioning=i2v_cond)
    with pytest.raises(MusubiInputError, match="^clip_fea: .*i2v-a14b.*disconnect"):
        generate(a14b, _ti2v_request(clip_fea=clip, **a14b_req))
    # sizes: TI2V-5B takes multiples of 32 (VAE 16x, patch 2); 48 is fine on a 2.1-VAE model
    with raises_input("width", 48, "a positive multiple of 32 pixels (VAE stride 16 x patch 2 of tiny-ti2v-5b)"):
        generate(ti2v, _ti2v_request(good, width=48))
    with raises_input("height", 80, "a positive multiple of 32"):
        generate(ti2v, _ti2v_request(task="t2v", height=80))
    validate_request(a14b, _ti2v_request(**{**a14b_req, "width": 48,
                                            "conditioning": prepare_i2v(vae16, _image(h=32, w=48), frames=5)}))
    # latent channels: a 16-channel (2.1 VAE) image latent for the 48-channel model, and the reverse
    with pytest.raises(MusubiInputError, match=r"^conditioning first_frame: got \(16, 1, 4, 6\).*48-channel Wan 2.2"):
        generate(ti2v, _ti2v_request(prepare_ti2v(_Vae22Shapes(16), _image())))
    with pytest.raises(MusubiInputError, match=r"^conditioning y: got \(52, 2, 2, 2\).*20 channels.*16-channel"):
        wrong = prepare_i2v(_Vae22Shapes(), _image(h=32, w=32), frames=5)
        generate(a14b, _ti2v_request(**{**a14b_req, "conditioning": wrong}))
    # the conditioning kind follows the model: 2.1-style y on the 5B, a TI2V latent on an A14B expert
    with pytest.raises(MusubiInputError, match="^conditioning: got 'i2v'; expected ti2v conditioning for task i2v "
                                               "on the tiny-ti2v-5b model"):
        generate(ti2v, _ti2v_request(i2v_cond))
    with pytest.raises(MusubiInputError, match="^conditioning: got 'ti2v'; expected i2v conditioning"):
        generate(a14b, _ti2v_request(**{**a14b_req, "conditioning": good}))
    with pytest.raises(MusubiInputError, match="a start image for task i2v.*prepare_ti2v"):
        generate(ti2v, _ti2v_request(None))
    with pytest.raises(MusubiInputError, match=r"first_frame: got \(48, 1, 4, 6\); expected \[48, 1, 2, 4\]"):
        generate(ti2v, _ti2v_request(good, width=64, height=32))
    with raises_input("frames", 8, "a frame count of the form 4k+1 (1, 5, 9, ..., 121)"):
        generate(ti2v, _ti2v_request(good, frames=8))
    for task in ("flf2v", "fun_control", "one_frame"):
        with pytest.raises(MusubiInputError, match=f"^task: got '{task}'"):
            generate(ti2v, _ti2v_request(good, task=task))
    # the family's check goes through the same rules with the model's defaults
    with pytest.raises(MusubiInputError, match="no image cross-attention"):
        FAMILY.check_sampling(ti2v, _ti2v_request(good, clip_fea=clip))


# --------------------------------------------------------------------------------------------------------------
# (f) detection: real key layouts, file-name hints, task tables
# --------------------------------------------------------------------------------------------------------------

def _meta_state(name, prefix=""):
    return {prefix + k: v for k, v in build_wan_model(OFFICIAL[name], "meta").state_dict().items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_detect_wan22_layouts(meta_checkpoint, prefix):
    ti2v = detect_wan_config(meta_checkpoint(_meta_state("ti2v-5B", prefix), "wan2.2_ti2v_5B_fp16.safetensors"))
    assert (ti2v.variant, ti2v.model_type, ti2v.dim, ti2v.num_heads, ti2v.num_layers, ti2v.ffn_dim) == \
        ("ti2v-5B", "ti2v", 3072, 24, 30, 14336)
    assert (ti2v.in_dim, ti2v.out_dim, ti2v.has_image_input, ti2v.expert, ti2v.vae_stride) == \
        (48, 48, False, None, (4, 16, 16))
    i2v = detect_wan_config(meta_checkpoint(_meta_state("i2v-A14B", prefix)))
    assert (i2v.variant, i2v.model_type, i2v.in_dim, i2v.has_image_input, i2v.expert) == \
        ("i2v-A14B", "i2v", 36, False, None)
    i2v21 = detect_wan_config(meta_checkpoint(_meta_state("i2v-14B", prefix)))
    assert (i2v21.variant, i2v21.has_image_input, i2v21.vae_stride) == ("i2v-14B", True, (4, 8, 8))
    assert needs_clip(i2v21) and not needs_clip(i2v) and not needs_clip(ti2v)
    # the T2V A14B layout is T2V-14B's: only the name can tell
    t2v = _meta_state("t2v-A14B", prefix)
    assert detect_wan_config(meta_checkpoint(t2v, "wan2.1_t2v_14B_bf16.safetensors")).variant == "t2v-14B"
    for file, expert in [("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "high"),
                         ("wan2.2_t2v_low_noise_14B_fp16.safetensors", "low"),
                         ("Wan2.2-T2V-A14B/high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors",
                          "high"),
                         ("Wan2.2-T2V-A14B/low_noise_model/diffusion_pytorch_model-00003-of-00006.safetensors",
                          "low"),
                         ("my_wan2.2_t2v_finetune.safetensors", None)]:
        cfg = detect_wan_config(meta_checkpoint(t2v, file))
        assert (cfg.variant, cfg.expert) == ("t2v-A14B", expert), file
    named = detect_wan_config(meta_checkpoint(_meta_state("i2v-A14B", prefix),
                                              "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"))
    assert (named.variant, named.expert) == ("i2v-A14B", "low")
    # a CLIP-branch (2.1) model or the 5B never gets an expert role from its name
    assert detect_wan_config(meta_checkpoint(_meta_state("i2v-14B", prefix), "x_high_noise.safetensors")).expert \
        is None
    assert detect_wan_config(meta_checkpoint(_meta_state("ti2v-5B", prefix), "ti2v_low_noise.pth")).expert is None


def test_expert_from_name():
    assert expert_from_name("/m/wan2.2_i2v_high_noise_14B_fp16.safetensors") == "high"
    assert expert_from_name("Wan2_2-I2V-A14B-LOW-NOISE.safetensors") == "low"
    assert expert_from_name("/m/high_noise_model/diffusion_pytorch_model-00001-of-00006.safetensors") == "high"
    assert expert_from_name("/m/wan2.1_t2v_14B_bf16.safetensors") is None
    assert expert_from_name("/noisy/highway.safetensors") is None


def test_task_tables():
    a14b, ti2v, i2v21 = preset_config("tiny-i2v-a14b"), preset_config("tiny-ti2v-5b"), preset_config("tiny-i2v")
    assert (model_kind(a14b), model_kind(ti2v), model_kind(i2v21)) == ("i2v", "ti2v", "i2v")
    require_task(a14b, "i2v-A14B")                                          # no CLIP needed
    for task in ("ti2v-5B", "t2v", "i2v", "t2i"):
        require_task(ti2v, task)
    for cfg, task in [(ti2v, "flf2v"), (ti2v, "fun_control"), (ti2v, "one-frame"), (a14b, "ti2v"), (a14b, "t2v"),
                      (i2v21, "ti2v"), (preset_config("tiny-t2v"), "ti2v-5B")]:
        with pytest.raises(MusubiInputError, match="for task"):
            require_task(cfg, task)


def test_loader_reads_new_variants_with_expert_hint(tmp_path):
    path = write_preset_checkpoint("tiny-i2v-a14b", tmp_path / "wan2.2_i2v_high_noise_14B_bf16.safetensors")
    model = load_wan_dit(path, dtype=None, expected_task="i2v")
    assert (model.config.variant, model.config.expert, model.compute_dtype) == \
        ("tiny-i2v-a14b", "high", torch.bfloat16)
    path = write_preset_checkpoint("tiny-ti2v-5b", tmp_path / "wan2.2_ti2v_5B_fp16.safetensors", torch.float16)
    model = load_wan_dit(path, dtype=None, expected_task="ti2v")
    assert (model.config.model_type, model.config.expert, model.compute_dtype) == ("ti2v", None, torch.float16)
    with pytest.raises(MusubiInputError, match="Wan2.1-Fun Control"):
        load_wan_dit(path, expected_task="fun_control")
    assert math.prod(model.config.vae_stride) == 4 * 16 * 16
