"""HunyuanVideo VAE: numerics against diffusers' AutoencoderKLHunyuanVideo, tiling, chunked convs, validation,
the three key layouts (official / diffusers / ComfyUI), refusals, tiny preset."""

import pytest
import torch

from engine.errors import MusubiInputError
from engine.families.hunyuan.vae import (
    SCALING_FACTOR, TINY_VAE_PRESET, HunyuanVAE, HunyuanVAEConfig, build_vae_preset_state_dict, from_latent,
    from_raw_latents, infer_vae_config, load_hunyuan_vae, tiny_vae_config, to_latent,
    to_raw_latents, write_vae_preset,
)
from engine.tiling import temporal_tiled_apply

# float32 end to end. Encode matches diffusers bit for bit (same ops in the same order); decode differs by ~4e-6 of
# the output's magnitude (the frame-causal attention is computed frame by frame instead of under a mask). 1e-4
# relative leaves headroom yet catches any real mismatch (a wrong padding, upsampling or weight changes outputs by
# O(0.1)).
RTOL = 1e-4
UNTILED = dict(tile_size=0, temporal_tile=0)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1.0)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute deviation relative to the reference's mean magnitude."""
    return ((a - b).abs().mean() / b.abs().mean()).item()


@pytest.fixture(scope="module")
def weights():
    return build_vae_preset_state_dict(seed=1)


@pytest.fixture(scope="module")
def vae(weights):
    model = HunyuanVAE(tiny_vae_config())
    model.load_state_dict(weights)
    return model.eval()


@pytest.fixture(scope="module")
def reference(weights):
    """diffusers' implementation loaded strictly with the same (official-named) weights: the names are identical."""
    from diffusers import AutoencoderKLHunyuanVideo

    cfg = tiny_vae_config()
    ref = AutoencoderKLHunyuanVideo(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                                    norm_num_groups=cfg.norm_num_groups, latent_channels=cfg.latent_channels)
    ref.load_state_dict(weights, strict=True)
    ref.use_framewise_encoding = ref.use_framewise_decoding = False   # its untiled path
    return ref.eval()


def _clip(b=1, f=9, h=32, w=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


# --- numerics vs diffusers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,batch", [(9, 2), (1, 1)])
def test_encode_decode_match_diffusers(vae, reference, frames, batch):
    video = _clip(batch, frames)
    with torch.no_grad():
        posterior = reference.encode(video).latent_dist
    moments = vae.encode_moments(video)
    assert moments.shape == (batch, 32, (frames - 1) // 4 + 1, 4, 6)
    assert _close(moments[:, :16], posterior.mean)
    assert _close(moments[:, 16:].clamp(-30, 20), posterior.logvar)
    assert torch.equal(vae.encode_mean(video), moments[:, :16])

    z = vae.encode(video, **UNTILED)
    assert _close(z, posterior.mean * SCALING_FACTOR)
    with torch.no_grad():
        out_ref = reference.decode(posterior.mean).sample               # diffusers: raw latents, unclamped
    out = vae.decode_raw(z)
    assert out.shape == video.shape
    assert _close(out, out_ref)
    clamped = vae.decode(z, **UNTILED)
    assert torch.equal(clamped, out_ref.clamp(-1, 1)) or _close(clamped, out_ref.clamp(-1, 1))
    assert clamped.min() >= -1 and clamped.max() <= 1 and (out.abs() > 1).any()   # the clamp did something


def test_sampling_matches_diffusers_posterior(vae, reference):
    video = _clip(f=5)
    with torch.no_grad():
        ref = reference.encode(video).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    z = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(7), **UNTILED)
    assert _close(z, ref * SCALING_FACTOR)
    again = vae.encode(video, sample=True, generator=torch.Generator().manual_seed(7), **UNTILED)
    assert torch.equal(z, again)
    mean = vae.encode(video, **UNTILED)
    assert (z - mean).abs().mean() > 1e-3 * mean.abs().mean()   # the draw moved away from the mean


def test_scaling_helpers(reference):
    assert SCALING_FACTOR == reference.config.scaling_factor == 0.476986
    raw = torch.randn(1, 16, 2, 3, 3)
    assert torch.allclose(to_latent(raw), raw * 0.476986)
    assert torch.allclose(from_latent(to_latent(raw)), raw, atol=1e-6)
    # ComfyUI-facing names: a LATENT holds the VAE's own latents.
    assert to_raw_latents is from_latent and from_raw_latents is to_latent


def test_outputs_follow_input_dtype_and_device(vae):
    video = _clip(f=1, h=16, w=16).double()
    z = vae.encode(video)
    assert z.dtype == torch.float64 and vae.decode(z).dtype == torch.float64


def test_chunked_convs_are_exact(weights):
    video = _clip(f=9, h=16, w=16, seed=4)
    vae = HunyuanVAE(tiny_vae_config())
    vae.load_state_dict(weights)
    vae.conv_chunk = 0
    z, y = vae.encode(video, **UNTILED), vae.decode_raw(vae.encode(video, **UNTILED))
    for chunk in (1, 2):
        vae.conv_chunk = chunk
        assert all(m.chunk == chunk for m in vae.modules() if type(m).__name__ == "CausalConv3d")
        # Same arithmetic per output element; only the conv kernels' summation order may change (~2e-5 observed).
        assert _close(vae.encode(video, **UNTILED), z) and _close(vae.decode_raw(z), y)
    with pytest.raises(MusubiInputError, match="conv_chunk"):
        vae.conv_chunk = -1


def test_half_precision_runs_close_to_float32():
    video = _clip(f=5, h=16, w=16)
    ref = load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32)
    z32, y32 = ref.encode(video), ref.decode(ref.encode(video))
    vae = load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.bfloat16)
    assert vae.quant_conv.weight.dtype == torch.bfloat16
    z = vae.encode(video)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    # bf16 keeps 8 mantissa bits: a few % of the signal after ~40 layers is expected.
    assert _rel(z, z32) < 0.05 and _rel(vae.decode(z32), y32) < 0.05


# --- tiling ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile,overlap", [(2, 1), (3, 1), (2, 0), (4, 2)])
def test_temporal_windows_are_exact_for_causal_local_functions(tile, overlap):
    # Functions whose output frame depends only on its own input step (a first frame alone, then groups of 4) must
    # come out exactly: this checks window placement, the dropped first frame and weight normalization.
    x = torch.randn(1, 2, 1 + 4 * 7, 3, 3)
    encode_like = lambda v: v[:, :, ::4] * 3 - 1  # noqa: E731   frame 4j -> latent j
    got = temporal_tiled_apply(encode_like, x, tile, overlap, in_step=4, out_step=1)
    assert got.shape == (1, 2, 8, 3, 3) and torch.allclose(got, encode_like(x), atol=1e-6)

    z = torch.randn(1, 2, 8, 3, 3)
    decode_like = lambda v: torch.cat([v[:, :, :1], v[:, :, 1:].repeat_interleave(4, 2)], 2).tanh()  # noqa: E731
    got = temporal_tiled_apply(decode_like, z, tile, overlap, in_step=1, out_step=4)
    assert got.shape == (1, 2, 29, 3, 3) and torch.allclose(got, decode_like(z), atol=1e-6)


def test_temporal_windows_blend_with_linear_ramps():
    # Each window outputs a constant: the value of its own first input frame (x[t] = t). 6 steps, windows of 4 with
    # 2 of overlap -> windows at steps 0 and 2; the second drops its first output (latent 2), so latents 3 and 4 are
    # shared and weighted 2/3 : 1/3 and 1/3 : 2/3 (ramps from 1/(r+1)), the rest belongs to one window.
    x = torch.arange(25.0).view(1, 1, 25, 1, 1)
    window_id = lambda v: v[:, :, :1].expand(-1, -1, (v.shape[2] - 1) // 4 + 1, -1, -1)  # noqa: E731
    got = temporal_tiled_apply(window_id, x, 4, 2, in_step=4, out_step=1).flatten()
    assert torch.allclose(got, torch.tensor([0, 0, 0, 8 / 3, 16 / 3, 8, 8]))


def test_tiles_larger_than_clip_equal_untiled(vae):
    video = _clip(f=9, h=32, w=32)
    z = vae.encode(video, **UNTILED)
    assert torch.equal(vae.encode(video, tile_size=32, tile_overlap=16, temporal_tile=8, temporal_overlap=4), z)
    assert torch.equal(vae.decode(z, tile_size=32, tile_overlap=16, temporal_tile=8, temporal_overlap=4),
                       vae.decode(z, **UNTILED))
    # The built-in defaults (256 px, 64 frames) leave small clips untiled.
    assert torch.equal(vae.encode(video), z)


def test_spatial_tiling_close_to_untiled_and_overlap_helps(vae):
    # Tiling is an approximation: each tile sees only its own pixels (replicate-padded at its borders) and its own
    # GroupNorm statistics, and the mid-block attention is global. With the tiny random preset (4 norm groups of a
    # few channels, random weights that amplify border effects far more than a trained VAE), 128 px tiles with 64 px
    # overlap over a 192 px frame deviate by ~9 % (encode) / ~19 % (decode) of the signal on average, ~17 % / ~27 %
    # with no overlap, ~6 % / ~13 % with 160 px tiles. The bounds below have ~1.5x headroom.
    video = _clip(f=1, h=192, w=192, seed=3)
    z = vae.encode(video, **UNTILED)
    y = vae.decode(z, **UNTILED)
    enc_hard, enc_soft = (_rel(vae.encode(video, tile_size=128, tile_overlap=o), z) for o in (0, 64))
    dec_hard, dec_soft = (_rel(vae.decode(z, tile_size=128, tile_overlap=o), y) for o in (0, 64))
    assert 0 < enc_soft < enc_hard and enc_soft < 0.15
    assert 0 < dec_soft < dec_hard and dec_soft < 0.3
    assert _rel(vae.decode(z, tile_size=160, tile_overlap=64), y) < dec_soft    # bigger tiles, closer
    # Instance defaults are used when no per-call value is given.
    vae.tile_size, vae.tile_overlap = 128, 64
    try:
        assert torch.equal(vae.encode(video), vae.encode(video, tile_size=128, tile_overlap=64))
    finally:
        vae.tile_size, vae.tile_overlap = 256, 64


def test_temporal_tiling_decodes_every_frame(vae):
    # Later windows start from a lone first frame (the official scheme), which a random tiny network remembers for
    # its whole receptive field, so only the frames that the first window alone covers are close to the untiled
    # decode: their difference is GroupNorm statistics over 17 frames instead of 33, ~22 % here (it grows to ~100 %
    # at 24 px, where a norm group holds a few dozen values). Over all 33 frames: ~58 %. The window mechanics are
    # checked exactly above; a trained VAE is far less sensitive (the official pipeline tiles this way by default).
    z = vae.encode(_clip(f=33, h=32, w=32, seed=5), **UNTILED)
    y = vae.decode(z, **UNTILED)
    tiled = vae.decode(z, tile_size=0, temporal_tile=16, temporal_overlap=4)
    assert tiled.shape == y.shape and torch.isfinite(tiled).all()
    assert _rel(tiled[:, :, :13], y[:, :, :13]) < 0.35
    assert 0 < _rel(tiled, y) < 0.9
    vae.temporal_tile, vae.temporal_overlap = 16, 4
    try:
        assert torch.equal(vae.decode(z, tile_size=0), tiled)
    finally:
        vae.temporal_tile, vae.temporal_overlap = 64, 16


# --- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,needle", [
    ((1, 3, 4, 16, 16), "4k+1"),
    ((1, 3, 6, 16, 16), "4k+1"),
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
        vae.decode(torch.zeros(1, 32, 2, 4, 4))
    with pytest.raises(MusubiInputError, match="tile_size"):
        vae.encode(_clip(f=1, h=16, w=16), tile_size=60)
    with pytest.raises(MusubiInputError, match="tile_overlap"):
        vae.decode(torch.zeros(1, 16, 1, 4, 4), tile_size=64, tile_overlap=64)
    with pytest.raises(MusubiInputError, match="temporal_tile"):
        vae.decode(torch.zeros(1, 16, 1, 4, 4), temporal_tile=10)
    with pytest.raises(MusubiInputError, match="temporal_overlap"):
        vae.encode(_clip(f=1, h=16, w=16), temporal_tile=16, temporal_overlap=6)
    with pytest.raises(MusubiInputError, match="preset"):
        load_hunyuan_vae("preset:huge-vae")
    with pytest.raises(MusubiInputError, match="norm_num_groups"):
        HunyuanVAEConfig(block_out_channels=(8, 16, 32, 32), norm_num_groups=32)


# --- loading: layouts, refusals, config inference ----------------------------------------------------------------

def _comfy_converter(comfyui_dir):
    """ComfyUI's own diffusers -> ldm VAE converter, loaded from its file (comfy/diffusers_convert.py needs only
    torch)."""
    import importlib.util

    path = comfyui_dir / "comfy" / "diffusers_convert.py"
    spec = importlib.util.spec_from_file_location("comfy_diffusers_convert", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert_vae_state_dict


def test_official_diffusers_and_comfy_layouts_load_identical_weights(tmp_path, weights, reference, comfyui_dir):
    from safetensors.torch import save_file

    # Official `pytorch_model.pt`: a pickle, nested under "state_dict" with a "vae." prefix in some exports.
    official = tmp_path / "pytorch_model.pt"
    torch.save({"state_dict": {f"vae.{k}": v for k, v in weights.items()}}, official)
    # diffusers `vae/diffusion_pytorch_model.safetensors`, written from diffusers' own module.
    diffusers = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(diffusers))
    # ComfyUI's repackaged layout (encoder.down.N.block.M, reversed decoder.up.N, mid.attn_1 as 1x1x1 convs).
    comfy_sd = _comfy_converter(comfyui_dir)(dict(weights))
    assert "decoder.up.3.block.0.conv1.conv.weight" in comfy_sd and comfy_sd["encoder.mid.attn_1.q.weight"].ndim == 5
    comfy_file = tmp_path / "hunyuan_video_vae_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in comfy_sd.items()}, str(comfy_file))

    for path in (official, diffusers, comfy_file):
        loaded = load_hunyuan_vae(path, dtype=torch.float32)
        assert loaded.config == tiny_vae_config(), path
        sd = loaded.state_dict()
        assert set(sd) == set(weights), path
        assert all(torch.equal(sd[k], v) for k, v in weights.items()), path
        assert not any(p.requires_grad for p in loaded.parameters())

    # The bf16 file loads as bf16, equal to the rounded weights; the loaded model computes what the preset does.
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in comfy_sd.items()}, str(comfy_file))
    half = load_hunyuan_vae(comfy_file, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(half[k], v.to(torch.bfloat16)) for k, v in weights.items())


def test_preset_file_round_trip(tmp_path):
    path = write_vae_preset(tmp_path / "tiny_vae.safetensors")
    pt = write_vae_preset(tmp_path / "tiny_vae.pt")
    video = _clip(f=5, h=16, w=16)
    expected = load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32).encode(video)
    for p in (path, pt):
        assert torch.equal(load_hunyuan_vae(p, dtype=torch.float32).encode(video), expected)


def test_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    from engine.families.wan.vae import write_vae_preset as write_wan_vae

    wan = write_wan_vae(tmp_path / "wan_2.1_vae.safetensors")
    with pytest.raises(MusubiInputError) as e:
        load_hunyuan_vae(wan)
    assert str(wan) in str(e.value) and "Wan VAE" in str(e.value)

    dit = tmp_path / "hunyuan_video_t2v_720p_bf16.safetensors"
    save_file({"double_blocks.0.img_attn_qkv.weight": torch.zeros(6, 2),
               "img_in.proj.weight": torch.zeros(2, 16, 1, 2, 2)}, str(dit))
    with pytest.raises(MusubiInputError) as e:
        load_hunyuan_vae(dit)
    assert str(dit) in str(e.value) and "DiT" in str(e.value)

    # A VAE of the same family but another latent width (HunyuanVideo 1.5 style) is refused by shape.
    sd = build_vae_preset_state_dict()
    sd["post_quant_conv.weight"] = torch.zeros(32, 32, 1, 1, 1)
    wide = tmp_path / "hunyuanvideo15_vae.safetensors"
    save_file(sd, str(wide))
    with pytest.raises(MusubiInputError, match="32 latent channels"):
        load_hunyuan_vae(wide)

    # A truncated VAE is refused by the strict loader, naming the file.
    sd = build_vae_preset_state_dict()
    del sd["decoder.up_blocks.2.upsamplers.0.conv.conv.bias"]
    broken = tmp_path / "broken_vae.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(MusubiInputError, match="broken_vae"):
        load_hunyuan_vae(broken)


class _ShapeOnly:
    """Checkpoint stand-in exposing keys and shapes of a meta-built module (the full-size config without memory)."""

    def __init__(self, module):
        self._shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        self.source = "meta"

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]


@pytest.mark.parametrize("cfg", [HunyuanVAEConfig(), tiny_vae_config(),
                                 HunyuanVAEConfig(block_out_channels=(64, 128, 128, 256), layers_per_block=1)])
def test_infer_config_from_shapes(cfg):
    with torch.device("meta"):
        model = HunyuanVAE(cfg)
    assert infer_vae_config(_ShapeOnly(model)) == cfg


def test_real_config_size():
    # hunyuan_video_vae_bf16.safetensors is ~493 MB in bf16, i.e. ~246.5 M parameters.
    with torch.device("meta"):
        model = HunyuanVAE(HunyuanVAEConfig())
    assert sum(p.numel() for p in model.parameters()) == 246_478_803


def test_preset_is_deterministic_and_not_degenerate():
    a, b, c = (build_vae_preset_state_dict(s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv_in.conv.weight"], c["encoder.conv_in.conv.weight"])
    vae = load_hunyuan_vae(TINY_VAE_PRESET, dtype=torch.float32)
    assert vae.config == tiny_vae_config() and vae.family == "hunyuan"
    video = _clip(f=5, h=16, w=16)
    z = vae.encode(video)
    y = vae.decode(z)
    assert 0.05 < z.std() < 5 and z.shape == (1, 16, 2, 2, 2)
    assert 0.1 < y.std() and (y.abs() == 1).float().mean() < 0.2
    assert _rel(vae.encode(_clip(f=5, h=16, w=16, seed=9)), z) > 0.05   # different clips, different latents
