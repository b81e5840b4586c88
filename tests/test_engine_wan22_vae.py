"""Wan 2.2 VAE (48 channels, 16x): numerics against diffusers' AutoencoderKLWan in its 2.2 shape, normalization,
caching, tiling, validation, loading (official / ComfyUI / diffusers names, bf16), config inference, preview."""

import json
import subprocess
import sys

import pytest
import torch

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError
from engine.families.wan.vae import WanVAE, infer_vae_config, load_wan_vae, write_vae_preset
from engine.families.wan.vae22 import (
    LATENT_MEAN, LATENT_STD, TINY_VAE22_PRESET, WAN22_RGB_BIAS, WAN22_RGB_FACTORS, AvgDown, DupUp, WanVAE22,
    WanVAE22Config, build_vae22_preset_state_dict, from_raw_latents, latent_to_rgb_preview22, patchify,
    tiny_vae22_config, to_raw_latents, unpatchify, write_vae22_preset,
)
from engine.tiling import tiled_apply

# float32 end to end; differences from diffusers are round-off (~3e-6 observed on outputs of magnitude ~1).
RTOL = 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1.0)


@pytest.fixture(scope="module")
def weights():
    return build_vae22_preset_state_dict(seed=1)


@pytest.fixture(scope="module")
def vae(weights):
    model = WanVAE22(tiny_vae22_config())
    model.load_state_dict(weights)
    return model.eval()


@pytest.fixture(scope="module")
def reference(weights, diffusers_wan22_vae):
    return diffusers_wan22_vae(tiny_vae22_config(), weights)


def _clip(b=1, f=9, h=32, w=48, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def _stats():
    return torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1), torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)


def _comfy_latent_format(comfyui_dir):
    """ComfyUI's comfy/latent_formats.py (it imports only torch), loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_comfy_latent_formats", comfyui_dir / "comfy/latent_formats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Wan22()


# --- numerics vs diffusers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames,batch", [(9, 2), (1, 1)])
def test_encode_decode_match_diffusers(vae, reference, frames, batch):
    video = _clip(batch, frames)
    with torch.no_grad():
        mu_ref = reference.encode(video).latent_dist.mean      # diffusers: raw posterior mean, no normalization
    mu = vae.encode_mean(video)
    assert mu.shape == (batch, 48, (frames - 1) // 4 + 1, 2, 3)
    assert _close(mu, mu_ref)

    mean, std = _stats()
    z = vae.encode(video)
    with torch.no_grad():
        out_ref = reference.decode(z * std + mean).sample       # diffusers decodes raw latents and clamps
    out = vae.decode(z)
    assert out.shape == video.shape
    assert _close(out, out_ref)
    assert out.min() >= -1 and out.max() <= 1


def test_patchify_and_shortcuts_match_diffusers():
    from diffusers.models.autoencoders import autoencoder_kl_wan as ref

    x = torch.randn(2, 3, 5, 8, 12)
    assert torch.equal(patchify(x), ref.patchify(x, 2))
    assert torch.equal(unpatchify(patchify(x)), x)
    y = torch.randn(1, 12, 5, 4, 6)
    assert torch.equal(unpatchify(y), ref.unpatchify(y, 2))

    from engine.families.wan.vae import FeatureCache

    for (cin, cout, ft, fs), t in [((8, 16, 2, 2), 1), ((8, 16, 2, 2), 4), ((16, 16, 1, 2), 4), ((16, 16, 1, 1), 2)]:
        x = torch.randn(2, cin, t, 4, 6)
        assert torch.allclose(AvgDown(cin, cout, ft, fs)(x), ref.AvgDown3D(cin, cout, ft, fs)(x), atol=1e-6)
    for (cin, cout, ft, fs) in [(16, 8, 2, 2), (16, 16, 2, 2), (16, 8, 1, 2)]:
        x = torch.randn(2, cin, 2, 3, 4)
        up, cache = DupUp(cin, cout, ft, fs), FeatureCache()
        # first chunk keeps only the last of its ft frames, later chunks all of them
        assert torch.equal(up(x, cache), ref.DupUp3D(cin, cout, ft, fs)(x, first_chunk=True))
        assert torch.equal(up(x, cache), ref.DupUp3D(cin, cout, ft, fs)(x, first_chunk=False))


def test_normalization_uses_wan22_constants(vae, comfyui_dir):
    # The 48 constants must equal ComfyUI's independent copy (comfy/latent_formats.py, Wan22).
    fmt = _comfy_latent_format(comfyui_dir)
    assert list(LATENT_MEAN) == pytest.approx(fmt.latents_mean.flatten().tolist())
    assert list(LATENT_STD) == pytest.approx(fmt.latents_std.flatten().tolist())
    assert len(LATENT_MEAN) == len(LATENT_STD) == 48
    video = _clip(f=5)
    mean, std = _stats()
    mu = vae.encode_mean(video)
    z = vae.encode(video)
    assert torch.allclose(z, (mu - mean) / std, atol=1e-6)
    # The raw <-> normalized converters (ComfyUI's LATENT holds raw latents) invert each other and agree with the
    # instance methods the pipeline can call without knowing which VAE it holds.
    assert torch.allclose(to_raw_latents(z), mu, atol=1e-5)
    assert torch.allclose(from_raw_latents(mu), z, atol=1e-5)
    assert torch.equal(vae.to_raw(z), to_raw_latents(z)) and torch.equal(vae.from_raw(mu), from_raw_latents(mu))


def test_shape_attributes_shared_with_wan21(vae):
    assert vae.latent_channels == 48 and vae.stride == (4, 16, 16)
    v21 = load_wan_vae("preset:tiny-vae", dtype=torch.float32)
    assert v21.latent_channels == 16 and v21.stride == (4, 8, 8)
    assert not isinstance(vae, WanVAE)   # a 2.2 VAE is never mistaken for a 2.1 one


def test_outputs_follow_input_dtype_and_device(vae):
    video = _clip(f=1, h=16, w=16).double()
    z = vae.encode(video)
    assert z.dtype == torch.float64 and z.shape == (1, 48, 1, 1, 1)
    assert vae.decode(z).dtype == torch.float64


def test_causal_first_frame_independent_of_later_frames(vae):
    a, b = _clip(f=5, seed=1), _clip(f=5, seed=2)
    b[:, :, :1] = a[:, :, :1]
    za, zb = vae.encode(a), vae.encode(b)
    assert torch.allclose(za[:, :, 0], zb[:, :, 0], atol=1e-6)
    assert not torch.allclose(za[:, :, 1], zb[:, :, 1], atol=1e-3)
    assert torch.allclose(vae.encode(a[:, :, :1])[:, :, 0], za[:, :, 0], atol=1e-6)
    # Decoding: the first video frame depends on the first latent frame only.
    ya, yb = vae.decode(za), vae.decode(zb)
    assert torch.allclose(ya[:, :, 0], yb[:, :, 0], atol=1e-6)
    assert torch.allclose(vae.decode(za[:, :, :1])[:, :, 0], ya[:, :, 0], atol=1e-6)


def test_cache_on_cpu_gives_identical_results(vae):
    video = _clip(f=9, h=32, w=32)
    z = vae.encode(video)
    assert torch.equal(vae.encode(video, cache_device="cpu"), z)
    assert torch.equal(vae.decode(z, cache_device="cpu"), vae.decode(z))


def test_half_precision_runs_close_to_float32():
    video = _clip(f=5, h=32, w=32)
    ref = load_wan_vae(TINY_VAE22_PRESET, dtype=torch.float32)
    z32, y32 = ref.encode(video), ref.decode(ref.encode(video))
    for dtype in (torch.bfloat16, torch.float16):
        vae = load_wan_vae(TINY_VAE22_PRESET, dtype=dtype)
        assert isinstance(vae, WanVAE22) and vae.conv1.weight.dtype == dtype
        z = vae.encode(video)
        assert z.dtype == torch.float32 and torch.isfinite(z).all()
        assert (z - z32).abs().mean() < 0.05 * z32.abs().mean()
        assert (vae.decode(z32) - y32).abs().mean() < 0.05 * y32.abs().mean()


# --- tiling ------------------------------------------------------------------------------------------------------

def test_tile_larger_than_frame_equals_untiled(vae):
    video = _clip(f=5, h=32, w=48)
    z = vae.encode(video)
    assert torch.equal(vae.encode(video, tile_size=48, tile_overlap=16), z)
    assert torch.equal(vae.decode(z, tile_size=48, tile_overlap=16), vae.decode(z))


def test_tiled_apply_at_16x_is_exact_for_local_functions():
    # Tile placement at the 2.2 stride, independent of the VAE: a function whose output pixel depends only on its
    # aligned 16x16 input block must come back exactly.
    x = torch.randn(1, 2, 1, 80, 112)
    fn = lambda t: torch.nn.functional.avg_pool3d(t, (1, 16, 16)) * 3 - 1  # noqa: E731
    assert torch.allclose(tiled_apply(fn, x, 48, 16, 1 / 16, 1), fn(x), atol=1e-5)


def test_tiled_close_to_untiled_and_overlap_helps(vae):
    # As for 2.1 (tests/test_engine_wan_vae.py): tiles see only their own pixels, so tiling approximates, and random
    # weights make border effects large. At 16x a 128-pixel tile is only 8 latent pixels wide. Observed mean
    # deviation with 64-pixel overlap: ~14 % (encode) / ~23 % (decode) of the signal, ~7 % / ~11 % with 192-pixel
    # tiles. Asserted: bounded, ramp-blended overlap beats hard edges, bigger tiles come closer.
    video = _clip(f=1, h=256, w=256, seed=3)
    z, y = vae.encode(video), vae.decode(vae.encode(video))

    def err(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    enc_hard, enc_soft = (err(vae.encode(video, tile_size=128, tile_overlap=o), z) for o in (0, 64))
    dec_hard, dec_soft = (err(vae.decode(z, tile_size=128, tile_overlap=o), y) for o in (0, 64))
    assert 0 < enc_soft < enc_hard and enc_soft < 0.25
    assert 0 < dec_soft < dec_hard and dec_soft < 0.4
    assert err(vae.decode(z, tile_size=192, tile_overlap=64), y) < dec_soft
    # Instance defaults are used when no per-call value is given.
    vae.tile_size, vae.tile_overlap = 128, 64
    try:
        assert torch.equal(vae.encode(video), vae.encode(video, tile_size=128, tile_overlap=64))
    finally:
        vae.tile_size, vae.tile_overlap = 0, 64


def test_tiling_refuses_sizes_off_the_16_pixel_grid(vae):
    with pytest.raises(MusubiInputError, match="tile_size.*multiple of 16"):
        vae.encode(_clip(f=1, h=32, w=32), tile_size=40)
    with pytest.raises(MusubiInputError, match="tile_overlap.*multiple of 16"):
        vae.decode(torch.zeros(1, 48, 1, 4, 4), tile_size=64, tile_overlap=8)


# --- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,needle", [
    ((1, 3, 4, 16, 16), "frames"),
    ((1, 3, 5, 24, 16), "divisible by 16"),    # fine for 2.1 (8x), not for 2.2
    ((1, 3, 5, 16, 8), "divisible by 16"),
    ((1, 12, 5, 16, 16), "channels"),
])
def test_bad_video_raises(vae, shape, needle):
    with pytest.raises(MusubiInputError, match="video") as e:
        vae.encode(torch.zeros(shape))
    assert needle in str(e.value)


def test_bad_latents_raise(vae, raises_input):
    with raises_input("latent channels", 16, "48 (Wan 2.2 VAE latents)"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(MusubiInputError, match="latent channels.*16 \\(Wan 2.1"):
        load_wan_vae("preset:tiny-vae", dtype=torch.float32).decode(torch.zeros(1, 48, 1, 2, 2))
    with pytest.raises(MusubiInputError, match="tiny-vae22"):
        load_wan_vae("preset:tiny-vae23")


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
    WanVAE22Config(),
    tiny_vae22_config(),
    WanVAE22Config(dim=8, dec_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, temporal_downsample=[True, False]),
    # every stage its own width (the real VAE repeats its last), the first one too, and 16 latent channels
    WanVAE22Config(z_dim=16, dim=8, dec_dim=4, dim_mult=[2, 8, 4], num_res_blocks=1,
                   temporal_downsample=[False, True]),
])
def test_infer_config_from_shapes(cfg):
    with torch.device("meta"):
        model = WanVAE22(cfg)
    got = infer_vae_config(_ShapeOnly(model))
    assert got == cfg and got.version == "2.2"


def test_infer_config_names_the_vae_version(tmp_path):
    v21 = infer_vae_config(Checkpoint.open(write_vae_preset(tmp_path / "wan_2.1_vae.safetensors")))
    v22 = infer_vae_config(Checkpoint.open(write_vae22_preset(tmp_path / "wan2.2_vae.safetensors")))
    assert (v21.version, v22.version) == ("2.1", "2.2")
    assert v22 == tiny_vae22_config()


def test_real_config_size():
    # ComfyUI's wan2.2_vae.safetensors is ~1.41 GB in 16-bit (the official Wan2.2_VAE.pth ~2.8 GB float32):
    # ~705 M parameters.
    with torch.device("meta"):
        model = WanVAE22(WanVAE22Config())
    n = sum(p.numel() for p in model.parameters())
    assert 704e6 < n < 705.5e6
    assert model.encoder.conv1.weight.shape == (160, 12, 3, 3, 3)
    assert model.decoder.head[2].weight.shape == (12, 256, 3, 3, 3)


def test_key_names_equal_comfyui_module(comfyui_dir):
    # ComfyUI's comfy/ldm/wan/vae2_2.py builds the module that loads wan2.2_vae.safetensors: its state dict names
    # and shapes must be ours. Built in a subprocess with comfy.ops stubbed to torch.nn (no ComfyUI boot).
    script = f"""
import importlib.util, json, sys, types, torch
root = {str(comfyui_dir)!r}
def stub(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
ops = stub("comfy.ops", disable_weight_init=torch.nn)
stub("comfy", ops=ops); stub("comfy.ldm"); stub("comfy.ldm.modules"); stub("comfy.ldm.modules.diffusionmodules")
stub("comfy.ldm.modules.diffusionmodules.model", vae_attention=lambda: None); stub("comfy.ldm.wan", __path__=[])
for name in ("vae", "vae2_2"):
    spec = importlib.util.spec_from_file_location("comfy.ldm.wan." + name, root + "/comfy/ldm/wan/" + name + ".py")
    mod = importlib.util.module_from_spec(spec); sys.modules[spec.name] = mod; spec.loader.exec_module(mod)
with torch.device("meta"):
    m = sys.modules["comfy.ldm.wan.vae2_2"].WanVAE(dim=16, dec_dim=24, z_dim=48, temperal_downsample=[False, True, True])
print(json.dumps({{k: list(v.shape) for k, v in m.state_dict().items()}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    comfy = {k: tuple(v) for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in WanVAE22(tiny_vae22_config()).state_dict().items()}
    assert comfy == ours


def test_preset_is_deterministic_and_not_degenerate():
    a, b, c = (build_vae22_preset_state_dict(s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.conv1.weight"], c["encoder.conv1.weight"])
    vae = load_wan_vae(TINY_VAE22_PRESET, dtype=torch.float32)
    assert isinstance(vae, WanVAE22) and vae.config == tiny_vae22_config()
    video = _clip(f=5, h=32, w=32)
    z = vae.encode(video)
    y = vae.decode(z)
    assert 0.1 < z.std() < 5
    assert 0.1 < y.std() and (y.abs() == 1).float().mean() < 0.2
    assert (vae.encode(_clip(f=5, h=32, w=32, seed=9)) - z).abs().mean() > 0.05


def test_file_formats_load_identical_weights(tmp_path):
    reference = build_vae22_preset_state_dict(seed=0)
    files = {   # official .pth (read with weights_only=True), ComfyUI-style safetensors, 16-bit copies
        "pth32": write_vae22_preset(tmp_path / "Wan2.2_VAE.pth"),
        "st32": write_vae22_preset(tmp_path / "wan2.2_vae_fp32.safetensors"),
        "st_bf16": write_vae22_preset(tmp_path / "wan2.2_vae.safetensors", dtype=torch.bfloat16),
        "st_fp16": write_vae22_preset(tmp_path / "wan2.2_vae_fp16.safetensors", dtype=torch.float16),
    }
    stored = {"pth32": torch.float32, "st32": torch.float32, "st_bf16": torch.bfloat16, "st_fp16": torch.float16}
    for name, path in files.items():
        vae = load_wan_vae(path, dtype=torch.float32)
        assert isinstance(vae, WanVAE22), name
        sd = vae.state_dict()
        assert set(sd) == set(reference), name
        assert all(torch.equal(sd[k], v.to(stored[name]).float()) for k, v in reference.items()), name

    video = _clip(f=5, h=32, w=32)
    assert torch.equal(load_wan_vae(files["pth32"], dtype=torch.float32).encode(video),
                       load_wan_vae(TINY_VAE22_PRESET, dtype=torch.float32).encode(video))
    vae = load_wan_vae(files["st_bf16"], dtype=torch.bfloat16, cache_device="cpu")
    assert vae.conv1.weight.dtype == torch.bfloat16 and vae.cache_device == "cpu"
    assert not any(p.requires_grad for p in vae.parameters())


def test_loads_diffusers_layout(tmp_path, weights, reference):
    # A diffusers `vae/diffusion_pytorch_model.safetensors` of the 2.2 VAE, written from diffusers' own model.
    from safetensors.torch import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    vae = load_wan_vae(path, dtype=torch.float32)
    assert isinstance(vae, WanVAE22) and vae.config == tiny_vae22_config()
    loaded = vae.state_dict()
    assert set(loaded) == set(weights)
    assert all(torch.equal(loaded[k], v) for k, v in weights.items())


def test_refuses_truncated_and_inconsistent_files(tmp_path):
    from safetensors.torch import save_file

    sd = build_vae22_preset_state_dict()
    del sd["decoder.upsamples.1.upsamples.3.time_conv.bias"]
    broken = tmp_path / "broken_vae22.safetensors"
    save_file(sd, str(broken))
    with pytest.raises(MusubiInputError, match="broken_vae22"):
        load_wan_vae(broken)

    sd = build_vae22_preset_state_dict()
    sd["encoder.conv1.weight"] = torch.zeros(16, 3, 3, 3, 3)       # RGB in: not the 2.2 patchified input
    odd = tmp_path / "odd_vae22.safetensors"
    save_file(sd, str(odd))
    with pytest.raises(MusubiInputError, match="odd_vae22.*3 encoder input channels"):
        load_wan_vae(odd)



class _Edited(_ShapeOnly):
    """The tiny preset's keys and shapes with some keys dropped and some shapes replaced."""

    def __init__(self, drop=(), **shapes):
        with torch.device("meta"):
            super().__init__(WanVAE22(tiny_vae22_config()))
        self.source = "edited.safetensors"
        for k in [k for k in self._shapes if k.startswith(drop)] if drop else ():
            del self._shapes[k]
        self._shapes.update({k.replace("__", "."): v for k, v in shapes.items()})


def test_a_layout_that_is_not_the_2_2_vae_is_refused_by_what_differs(raises_input):
    tiny = tiny_vae22_config()
    assert (tiny.dim, tiny.dec_dim, tiny.dim_mult) == (16, 24, [1, 2, 4, 4])    # a decoder width of its own
    assert infer_vae_config(_Edited()) == tiny
    layout = "the Wan 2.2 VAE layout (equal residual blocks per stage, widths multiple of the base dim)"
    stage1 = "encoder.downsamples.1.downsamples."
    with raises_input("VAE file edited.safetensors", "encoder stage widths [16, 32, 64, 64], residual blocks [1, 2]",
                      layout):                                                    # one stage one block short
        infer_vae_config(_Edited(drop=f"{stage1}1."))
    with raises_input("VAE file edited.safetensors", "encoder stage widths [16, 0, 64, 64], residual blocks [0, 2]",
                      layout):                                                    # a stage without blocks
        infer_vae_config(_Edited(drop=(f"{stage1}0.", f"{stage1}1.")))
    with raises_input("VAE file edited.safetensors", "encoder stage widths [16, 40, 64, 64], residual blocks [2]",
                      layout):                                                    # a width off the base dim
        infer_vae_config(_Edited(**{f"{stage1}0.residual.2.weight".replace(".", "__"): (40, 40, 3, 3, 3)}))
    with raises_input("VAE file edited.safetensors", "decoder width 98", "a multiple of 4"):
        infer_vae_config(_Edited(decoder__conv1__weight=(98, 48, 3, 3, 3)))
    with raises_input("VAE file edited.safetensors", "16 encoder input channels",
                      "the Wan 2.2 VAE's 12 (2x2-patchified RGB)"):
        infer_vae_config(_Edited(encoder__conv1__weight=(16, 16, 3, 3, 3)))


def test_a_vae_whose_stages_all_differ_in_width_runs_and_is_read_back():
    """The real VAE repeats its last width (mult 1, 2, 4, 4), so an index off by one there goes unseen: a layout
    with every width its own still builds, encodes, decodes and reads back from its shapes."""
    cfg = WanVAE22Config(dim=8, dec_dim=4, dim_mult=[2, 8, 4, 2], num_res_blocks=1,
                         temporal_downsample=[False, True, True])
    vae = WanVAE22(cfg).eval()
    with torch.no_grad():
        z = vae.encode(_clip(f=5, h=32, w=32))
        assert z.shape == (1, 48, 2, 2, 2) and vae.decode(z).shape == (1, 3, 5, 32, 32)
    shapes = _ShapeOnly(vae)
    shapes._shapes["decoder.conv1.weight"] = (10, 48, 3, 3, 3)                  # dec_dim 5: 10 is 5 x 2
    assert infer_vae_config(shapes).dec_dim == 5
    shapes._shapes["decoder.conv1.weight"] = (9, 48, 3, 3, 3)
    with pytest.raises(MusubiInputError, match=r"^VAE file meta: got 'decoder width 9'; expected a multiple of 2$"):
        infer_vae_config(shapes)


def test_the_shortcuts_refuse_channels_that_do_not_divide():
    assert AvgDown(3, 8, 2, 2).group == 3 and DupUp(8, 3, 2, 2).repeats == 3    # 3 * 8 = 24 = 8 * 3
    with pytest.raises(ValueError, match=r"^AvgDown: 3\*8 channels do not group into 5$"):
        AvgDown(3, 5, 2, 2)
    with pytest.raises(ValueError, match=r"^DupUp: 5 channels do not spread over 3\*8$"):
        DupUp(5, 3, 2, 2)


def test_the_preset_file_says_what_it_is(tmp_path):
    from safetensors import safe_open

    with safe_open(str(write_vae22_preset(tmp_path / "v.safetensors")), "pt") as f:
        assert f.metadata() == {"musubi_preset": "tiny-vae22"}


# --- preview -----------------------------------------------------------------------------------------------------

def test_rgb_preview_uses_comfyui_factors(comfyui_dir):
    fmt = _comfy_latent_format(comfyui_dir)
    assert torch.equal(torch.tensor(WAN22_RGB_FACTORS), torch.tensor(fmt.latent_rgb_factors))   # [48, 3]
    assert list(WAN22_RGB_BIAS) == pytest.approx(fmt.latent_rgb_factors_bias)
    z = torch.randn(2, 48, 3, 4, 5)
    rgb = latent_to_rgb_preview22(z, frame=1)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == torch.float32 and 0 <= rgb.min() and rgb.max() <= 1
    manual = (z[0, :, 1].permute(1, 2, 0) @ torch.tensor(fmt.latent_rgb_factors)
              + torch.tensor(fmt.latent_rgb_factors_bias))
    assert torch.allclose(rgb, ((manual + 1) / 2).clamp(0, 1), atol=1e-6)
    assert torch.equal(latent_to_rgb_preview22(z[0]), latent_to_rgb_preview22(z, frame=0))
    assert torch.equal(latent_to_rgb_preview22(z), latent_to_rgb_preview22(z, frame=0))          # frame 0 by default
    with pytest.raises(MusubiInputError, match=r"^latents: got \(1, 16, 1, 2, 2\); expected \[B, 48, F, h, w\] or "
                                               r"\[48, F, h, w\] Wan 2.2 latents"):
        latent_to_rgb_preview22(torch.zeros(1, 16, 1, 2, 2))
