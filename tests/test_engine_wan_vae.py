"""Wan 2.1 VAE: numerics against diffusers' AutoencoderKLWan, caching, tiling, validation, loading, tiny preset."""

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError
from engine.families.wan.vae import (
    LATENT_MEAN, LATENT_STD, TINY_VAE_PRESET, WanVAE, WanVAEConfig, build_vae_preset_state_dict, infer_vae_config,
    load_wan_vae, tiny_vae_config, write_vae_preset,
)
from engine.tiling import ramp_weights, tile_starts, tiled_apply

# float32 end to end; the two implementations run the same math in a different op order, so differences are
# round-off (~1e-6 observed). 1e-4 relative to the output's magnitude leaves headroom yet catches any real mismatch
# (a wrong cache frame or swapped weight changes outputs by O(0.1)).
RTOL = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1.0)


@pytest.fixture(scope="module")
def weights():
    return build_vae_preset_state_dict(seed=1)


@pytest.fixture(scope="module")
def vae(weights):
    model = WanVAE(tiny_vae_config())
    model.load_state_dict(weights)
    return model.eval()


@pytest.fixture(scope="module")
def reference(weights):
    """diffusers' implementation with the same weights, converted by diffusers' own official->diffusers converter."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = tiny_vae_config()
    ref = AutoencoderKLWan(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=cfg.dim_mult, num_res_blocks=cfg.num_res_blocks,
                           temperal_downsample=cfg.temporal_downsample)
    ref.load_state_dict(convert_wan_vae_to_diffusers(dict(weights)), strict=True)
    return ref.eval()


def _clip(b=1, f=9, h=48, w=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def _stats():
    return torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


# --- numerics vs diffusers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,batch", [(9, 2), (1, 1)])
def test_encode_decode_match_diffusers(vae, reference, frames, batch):
    video = _clip(batch, frames)
    with torch.no_grad():
        mu_ref = reference.encode(video).latent_dist.mean      # diffusers: raw posterior mean, no normalization
        mu = vae.encode_mean(video)
    assert mu.shape == (batch, 16, (frames - 1) // 4 + 1, 6, 8)
    assert _close(mu, mu_ref)

    mean, std = _stats()
    z = vae.encode(video)
    with torch.no_grad():
        out_ref = reference.decode(z * std + mean).sample       # diffusers decodes raw latents and clamps
    out = vae.decode(z)
    assert out.shape == video.shape
    assert _close(out, out_ref)
    assert out.min() >= -1 and out.max() <= 1


def test_normalization_uses_wan_constants(vae, reference):
    # The constants must equal the ones diffusers ships for Wan 2.1 (an independent copy).
    assert list(LATENT_MEAN) == pytest.approx(reference.config.latents_mean)
    assert list(LATENT_STD) == pytest.approx(reference.config.latents_std)
    video = _clip(f=5)
    mean, std = _stats()
    assert torch.allclose(vae.encode(video), (vae.encode_mean(video) - mean) / std, atol=1e-6)


def test_outputs_follow_input_dtype_and_device(vae):
    video = _clip(f=1, h=16, w=16).double()
    z = vae.encode(video)
    assert z.dtype == torch.float64 and vae.decode(z).dtype == torch.float64


def test_causal_first_frame_independent_of_later_frames(vae):
    # Time-causal: latent frame 0 only sees video frame 0, whatever follows.
    a, b = _clip(f=5, seed=1), _clip(f=5, seed=2)
    b[:, :, :1] = a[:, :, :1]
    za, zb = vae.encode(a), vae.encode(b)
    assert torch.allclose(za[:, :, 0], zb[:, :, 0], atol=1e-6)
    assert not torch.allclose(za[:, :, 1], zb[:, :, 1], atol=1e-3)
    single = vae.encode(a[:, :, :1])
    assert torch.allclose(single[:, :, 0], za[:, :, 0], atol=1e-6)


def test_cache_on_cpu_gives_identical_results(vae):
    video = _clip(f=9, h=32, w=32)
    z = vae.encode(video)
    assert torch.equal(vae.encode(video, cache_device="cpu"), z)
    assert torch.equal(vae.decode(z, cache_device="cpu"), vae.decode(z))


def test_half_precision_runs_close_to_float32(weights):
    video = _clip(f=5, h=32, w=32)
    ref = load_wan_vae(TINY_VAE_PRESET, dtype=torch.float32)
    z32, y32 = ref.encode(video), ref.decode(ref.encode(video))
    for dtype in (torch.bfloat16, torch.float16):
        vae = load_wan_vae(TINY_VAE_PRESET, dtype=dtype)
        assert vae.conv1.weight.dtype == dtype
        z = vae.encode(video)
        assert z.dtype == torch.float32 and torch.isfinite(z).all()
        # bf16 keeps 8 mantissa bits: errors of a few % of the signal after ~30 layers are expected.
        assert (z - z32).abs().mean() < 0.05 * z32.abs().mean()
        assert (vae.decode(z32) - y32).abs().mean() < 0.05 * y32.abs().mean()


# --- tiling ------------------------------------------------------------------------------------------------------

def test_tile_starts_and_ramps():
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(128, 64, 16) == [0, 48, 64]
    starts = tile_starts(200, 64, 24)
    assert starts[0] == 0 and starts[-1] == 200 - 64 and all(b - a <= 64 - 24 for a, b in zip(starts, starts[1:]))
    w = ramp_weights(10, 3, lead=True, trail=False)
    assert torch.allclose(w, torch.tensor([0.25, 0.5, 0.75] + [1.0] * 7))
    assert torch.equal(ramp_weights(6, 3, False, False), torch.ones(6))


@pytest.mark.parametrize("scale", [1 / 8, 8])
def test_tiled_apply_is_exact_for_local_functions(scale):
    # Functions whose output pixel depends only on the aligned input block it came from must be reproduced exactly:
    # this checks tile placement, output offsets and weight normalization independently of the VAE.
    x = torch.randn(1, 2, 3, 80, 112) if scale < 1 else torch.randn(1, 2, 3, 10, 14)
    if scale < 1:
        fn = lambda t: torch.nn.functional.avg_pool3d(t, (1, 8, 8)) * 3 - 1  # noqa: E731
        tile, overlap = 32, 16
    else:
        fn = lambda t: t.repeat_interleave(8, -1).repeat_interleave(8, -2).tanh()  # noqa: E731
        tile, overlap = 4, 2
    out = tiled_apply(fn, x, tile, overlap, scale, int(overlap * scale))
    assert torch.allclose(out, fn(x), atol=1e-5)


def test_tile_larger_than_frame_equals_untiled(vae):
    video = _clip(f=5, h=48, w=64)
    z = vae.encode(video)
    assert torch.equal(vae.encode(video, tile_size=64, tile_overlap=16), z)
    assert torch.equal(vae.decode(z, tile_size=64, tile_overlap=16), vae.decode(z))


def test_tiled_close_to_untiled_and_overlap_helps(vae):
    # Tiling is an approximation, not an identity: each tile sees only its own pixels, zero-padded at its borders
    # (the mid-block attention is global per frame, and the decoder's receptive field at latent resolution is wider
    # than the 8-latent-pixel tiles used here). With the tiny random preset (random weights amplify border effects far
    # more than a trained VAE) the mean deviation is ~9 % of the signal for encode and ~44 % for decode; it falls
    # with bigger tiles (~4 % / ~24 % at 96 px). So the error is bounded loosely and the *behaviour* that matters is
    # asserted: overlapping tiles blended with linear ramps deviate less than hard-edged tiles with no overlap.
    video = _clip(f=1, h=128, w=128, seed=3)   # one frame: tiling is purely spatial, time adds only cost
    z, y = vae.encode(video), vae.decode(vae.encode(video))

    def err(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    enc_hard, enc_soft = (err(vae.encode(video, tile_size=64, tile_overlap=o), z) for o in (0, 32))
    dec_hard, dec_soft = (err(vae.decode(z, tile_size=64, tile_overlap=o), y) for o in (0, 32))
    assert 0 < enc_soft < enc_hard and enc_soft < 0.25
    assert 0 < dec_soft < dec_hard and dec_soft < 0.6
    assert err(vae.decode(z, tile_size=96, tile_overlap=32), y) < dec_soft   # bigger tiles, closer to untiled
    # Instance defaults are used when no per-call value is given.
    vae.tile_size, vae.tile_overlap = 64, 32
    try:
        assert torch.equal(vae.encode(video), vae.encode(video, tile_size=64, tile_overlap=32))
    finally:
        vae.tile_size, vae.tile_overlap = 0, 64


# --- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,needle", [
    ((1, 3, 4, 16, 16), "frames"),
    ((1, 3, 6, 16, 16), "frames"),
    ((1, 3, 5, 20, 16), "divisible by 8"),
    ((1, 3, 5, 16, 12), "divisible by 8"),
    ((1, 4, 5, 16, 16), "channels"),
    ((3, 5, 16, 16), "[B, 3, F, H, W]"),
])
def test_bad_video_raises(vae, shape, needle):
    with pytest.raises(MusubiInputError, match="video") as e:
        vae.encode(torch.zeros(shape))
    assert needle in str(e.value)


def test_bad_latents_and_tiling_raise(vae):
    with pytest.raises(MusubiInputError, match="latent channels.*16"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))
    with pytest.raises(MusubiInputError, match="tile_size"):
        vae.encode(_clip(f=1, h=16, w=16), tile_size=60)
    with pytest.raises(MusubiInputError, match="tile_overlap"):
        vae.decode(torch.zeros(1, 16, 1, 4, 4), tile_size=64, tile_overlap=64)
    with pytest.raises(MusubiInputError, match="preset"):
        load_wan_vae("preset:huge-vae")


def test_refuses_non_vae_files(tmp_path):
    from safetensors.torch import save_file

    dit = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4), "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)},
              str(dit))
    with pytest.raises(MusubiInputError) as e:
        load_wan_vae(dit)
    assert str(dit) in str(e.value) and "DiT" in str(e.value)

    # A Wan 2.2-style VAE (48 latent channels) is refused by shape, before any module is built.
    sd = build_vae_preset_state_dict()
    sd["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
    wan22 = tmp_path / "wan2.2_vae.safetensors"
    save_file(sd, str(wan22))
    with pytest.raises(MusubiInputError, match="48 latent channels"):
        load_wan_vae(wan22)

    # A truncated VAE (missing tensors) is refused by the strict loader naming the file.
    sd = build_vae_preset_state_dict()
    del sd["decoder.head.2.bias"]
    broken = tmp_path / "broken_vae.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(MusubiInputError, match="broken_vae"):
        load_wan_vae(broken)


# --- loading, config inference, preset ---------------------------------------------------------------------------

class _ShapeOnly:
    """Checkpoint stand-in exposing keys and shapes of a meta-built module (full-size configs without memory)."""

    def __init__(self, module):
        self._shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        self.source = "meta"

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]


@pytest.mark.parametrize("cfg", [
    WanVAEConfig(),
    tiny_vae_config(),
    WanVAEConfig(dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[0.5], temporal_downsample=[True, False]),
])
def test_infer_config_from_shapes(cfg):
    with torch.device("meta"):
        model = WanVAE(cfg)
    assert infer_vae_config(_ShapeOnly(model)) == cfg


def test_real_config_size():
    # Wan2.1_VAE.pth is a ~508 MB float32 file, i.e. ~127 M parameters.
    with torch.device("meta"):
        model = WanVAE(WanVAEConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 126e6 < n < 128e6


def test_preset_is_deterministic_and_not_degenerate():
    a, b, c = (build_vae_preset_state_dict(s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])
    vae = load_wan_vae(TINY_VAE_PRESET, dtype=torch.float32)
    assert vae.config == tiny_vae_config() and vae.config.z_dim == 16
    video = _clip(f=5, h=32, w=32)
    z = vae.encode(video)
    y = vae.decode(z)
    assert 0.1 < z.std() < 5
    assert 0.1 < y.std() and (y.abs() == 1).float().mean() < 0.2
    # Different clips give different latents (the encoder is not collapsing its input).
    assert (vae.encode(_clip(f=5, h=32, w=32, seed=9)) - z).abs().mean() > 0.05


def test_file_formats_load_identical_weights(tmp_path):
    reference = build_vae_preset_state_dict(seed=0)
    files = {
        "pth32": write_vae_preset(tmp_path / "Wan2.1_VAE.pth"),
        "st32": write_vae_preset(tmp_path / "vae_fp32.safetensors"),
        "pth_bf16": write_vae_preset(tmp_path / "vae_bf16.pth", dtype=torch.bfloat16),
        "st_bf16": write_vae_preset(tmp_path / "vae_bf16.safetensors", dtype=torch.bfloat16),
        "st_fp16": write_vae_preset(tmp_path / "vae_fp16.safetensors", dtype=torch.float16),
    }
    loaded = {name: load_wan_vae(p, dtype=torch.float32).state_dict() for name, p in files.items()}
    for name, sd in loaded.items():
        assert set(sd) == set(reference), name
    stored = {"pth32": torch.float32, "st32": torch.float32, "pth_bf16": torch.bfloat16,
              "st_bf16": torch.bfloat16, "st_fp16": torch.float16}
    for name, sd in loaded.items():
        for k, v in reference.items():
            assert torch.equal(sd[k], v.to(stored[name]).float()), (name, k)
    assert infer_vae_config(Checkpoint.open(files["st_bf16"])) == tiny_vae_config()

    # The preset loaded from disk computes exactly what the in-memory preset computes.
    video = _clip(f=5, h=16, w=16)
    assert torch.equal(load_wan_vae(files["pth32"], dtype=torch.float32).encode(video),
                       load_wan_vae(TINY_VAE_PRESET, dtype=torch.float32).encode(video))
    # dtype / device / cache options are applied.
    vae = load_wan_vae(files["st_bf16"], dtype=torch.bfloat16, cache_device="cpu")
    assert vae.conv1.weight.dtype == torch.bfloat16 and vae.cache_device == "cpu"
    assert not any(p.requires_grad for p in vae.parameters())


def test_loads_diffusers_layout(tmp_path, weights, reference):
    # A diffusers `vae/diffusion_pytorch_model.safetensors`: written from diffusers' own model (whose weights came
    # through diffusers' official->diffusers converter), read back under the official names.
    from safetensors.torch import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    vae = load_wan_vae(path, dtype=torch.float32)
    assert vae.config == tiny_vae_config()
    loaded = vae.state_dict()
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())
