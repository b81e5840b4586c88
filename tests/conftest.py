"""Test bootstrap.

* The engine is importable standalone as `engine` (the repo root is appended to sys.path, *after* ComfyUI's folder,
  so ComfyUI's own top-level `nodes`/`utils` always win). Engine tests never need ComfyUI.
* Tests that need ComfyUI use the fixtures from `comfy_harness.py` (in-process executor, server, browser); ComfyUI is
  booted lazily the first time such a fixture is requested.
"""

import os
import sys
from pathlib import Path

import pytest

# The pack refuses to write outside ComfyUI's folders (nodes/paths.py). Tests write into pytest's own tmp folders,
# so the documented escape hatch is on for the suite; the tests of the rule itself (test_nodes_paths.py) turn it off.
os.environ.setdefault("MUSUBI_ALLOW_ANY_PATH", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

pytest_plugins = ["comfy_harness"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are ~300x slower with 2 threads on a loaded 2-core box; restore the setting afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI tree the harness uses (COMFYUI_DIR / MUSUBI_ENV, as set up by scripts/setup_env.sh), for tests that
    only read its files. A missing tree fails: a reference check that is skipped checks nothing."""
    from comfy_harness import COMFYUI_DIR

    assert (COMFYUI_DIR / "comfy").is_dir(), f"no ComfyUI tree at {COMFYUI_DIR}: set COMFYUI_DIR or MUSUBI_ENV"
    return COMFYUI_DIR


def _comfy_quantize(sd: dict, is_target, fmt: str = "float8_e4m3fn", conf_in_metadata: bool = False,
                    per_row: bool = False, input_scale: bool = False):
    """Quantize the selected 2-D weights of `sd` into ComfyUI's current quantized layout (what its mixed-precision
    ops load): `<layer>.weight` (fp8 / int8), `<layer>.weight_scale`, optional `<layer>.input_scale`, and the
    format either as a uint8 JSON tensor `<layer>.comfy_quant` or in the `_quantization_metadata` header entry.
    Returns (tensors to save, dequantized reference weights, safetensors metadata)."""
    import json

    import torch

    stored, dequant, layers = {}, {}, {}
    for k, w in sd.items():
        if not (k.endswith(".weight") and w.ndim == 2 and is_target(k)):
            stored[k] = dequant[k] = w
            continue
        layer, w32 = k[: -len(".weight")], w.float()
        amax = w32.abs().amax(dim=1, keepdim=True) if per_row else w32.abs().amax()
        if fmt.startswith("int8"):
            scale = amax / 127.0
            q = (w32 / scale).round().clamp(-127, 127).to(torch.int8)
        else:
            dt = getattr(torch, fmt)
            scale = amax / torch.finfo(dt).max
            q = (w32 / scale).to(dt)
        stored[k], stored[layer + ".weight_scale"] = q, scale.float()
        if input_scale:
            stored[layer + ".input_scale"] = torch.tensor(1.0)
        dequant[k] = q.float() * scale
        conf = {"format": fmt}
        if conf_in_metadata:
            layers[layer] = conf
        else:
            stored[layer + ".comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if layers else {}
    return stored, dequant, meta


def _raises_input(name, value, expected):
    """pytest.raises for the engine's standard refusal (`engine.errors.invalid`), matched from the message's start:
    the input's name, the value found and the start of what was expected."""
    import re

    from engine.errors import MusubiInputError

    return pytest.raises(MusubiInputError, match="^" + re.escape(f"{name}: got {value!r}; expected {expected}"))


@pytest.fixture
def raises_input():
    """`_raises_input` as a fixture: `with raises_input("fp8 mode", "fp4", "one of"): ...`."""
    return _raises_input


@pytest.fixture
def comfy_quantize():
    """`_comfy_quantize` as a fixture (used by the DiT and text-encoder loading tests)."""
    return _comfy_quantize


def _diffusers_framepack(cfg, sd, guidance: bool = True):
    """diffusers' HunyuanVideoFramepackTransformer3DModel (an independent implementation) with the pack's FramePack
    config and state dict: the checkpoint's names are diffusers', so the state dict loads unchanged."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    ref = HunyuanVideoFramepackTransformer3DModel(  # config built locally, no hub access
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks,
        num_refiner_layers=cfg.refiner_blocks, mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size[1],
        patch_size_t=cfg.patch_size[0], guidance_embeds=guidance, text_embed_dim=cfg.text_dim,
        pooled_projection_dim=cfg.text_pool_dim, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dims,
        has_image_proj=True, image_proj_dim=cfg.image_dim, has_clean_x_embedder=True)
    ref.load_state_dict({k: v for k, v in sd.items() if guidance or "guidance_embedder" not in k}, strict=True)
    return ref.eval()


@pytest.fixture
def diffusers_framepack():
    """`_diffusers_framepack` as a fixture (the FramePack DiT parity tests and the LoRA-loading test)."""
    return _diffusers_framepack


def _wan22_vae_key_to_diffusers(key: str, num_res_blocks: int) -> str:
    """Official Wan 2.2 VAE key -> diffusers AutoencoderKLWan(is_residual=True) key, written for the tests from
    diffusers' module tree (the engine's own map goes the other way, in engine/families/wan/vae22.py)."""
    import re

    key = re.sub(r"^conv1\.", "quant_conv.", re.sub(r"^conv2\.", "post_quant_conv.", key))
    key = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", key)
    for a, b in ((".head.0.", ".norm_out."), (".head.2.", ".conv_out."), (".middle.0.", ".mid_block.resnets.0."),
                 (".middle.1.", ".mid_block.attentions.0."), (".middle.2.", ".mid_block.resnets.1.")):
        key = key.replace(a, b)
    for side, outer, blocks, sampler, n in (("encoder", "downsamples", "down_blocks", "downsampler", num_res_blocks),
                                            ("decoder", "upsamples", "up_blocks", "upsampler", num_res_blocks + 1)):
        m = re.match(rf"{side}\.{outer}\.(\d+)\.{outer}\.(\d+)\.(.*)", key)
        if m:
            i, j, rest = m.groups()
            key = f"{side}.{blocks}.{i}." + (f"resnets.{j}." if int(j) < n else f"{sampler}.") + rest
    for a, b in (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
                 ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut.")):
        key = key.replace("." + a, "." + b)
    return key


def _diffusers_wan22_vae(cfg, sd):
    """diffusers' AutoencoderKLWan in its Wan 2.2 shape (is_residual, 2x2 patch, 12 channels in/out, 16x stride)
    with the engine's config and official-named state dict renamed to diffusers names; loaded strictly."""
    from diffusers import AutoencoderKLWan
    from engine.families.wan.vae22 import LATENT_MEAN, LATENT_STD

    ref = AutoencoderKLWan(  # config built locally, no hub access
        base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=cfg.dim_mult,
        num_res_blocks=cfg.num_res_blocks, temperal_downsample=cfg.temporal_downsample, is_residual=True,
        in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=list(LATENT_MEAN), latents_std=list(LATENT_STD))
    ref.load_state_dict({_wan22_vae_key_to_diffusers(k, cfg.num_res_blocks): v for k, v in sd.items()}, strict=True)
    return ref.eval()


@pytest.fixture(scope="session")
def diffusers_wan22_vae():
    """`_diffusers_wan22_vae` as a fixture: the independent reference for the Wan 2.2 VAE."""
    return _diffusers_wan22_vae


@pytest.fixture(scope="session")
def tiny_wan_encoders():
    """The tiny Wan encoders in fp32 as the engine's caching takes them (each with an `identity`): "vae22" (48
    channels, Wan 2.2 / TI2V-5B), "vae" (16 channels, Wan 2.1) and "umt5" (32-wide text)."""
    import torch

    from engine.encoders.umt5 import load_umt5
    from engine.families.wan.vae import load_wan_vae

    out = {"vae22": load_wan_vae("preset:tiny-vae22", dtype=torch.float32),
           "vae": load_wan_vae("preset:tiny-vae", dtype=torch.float32),
           "umt5": load_umt5("preset:tiny-umt5", dtype=torch.float32)}
    for name in ("vae22", "vae"):
        out[name].identity = f"preset:tiny-{name}"
    return out


@pytest.fixture(scope="session")
def tiny_t2v_dataset(tiny_wan_encoders, tmp_path_factory):
    """A dataset on disk as a user has it after caching: four solid-colour 32x32 PNGs with captions, a dataset TOML
    (batch size 1) and its caches built for the tiny T2V preset with the tiny encoders. Returns the TOML's path."""
    import numpy as np
    import torch
    from PIL import Image

    from engine.data import build_cache, load_dataset_config
    from engine.families.wan.cache import WanCacheAdapter

    root = tmp_path_factory.mktemp("tiny_t2v_dataset")
    (root / "images").mkdir()
    colours = {"red": (230, 30, 20), "blue": (20, 40, 230), "green": (30, 200, 40), "grey": (128, 128, 128)}
    for name, rgb in colours.items():
        Image.fromarray(np.full((32, 32, 3), rgb, dtype=np.uint8)).save(root / "images" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(f"a {name} square")
    toml = root / "dataset.toml"
    toml.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\nbatch_size = 1\n\n'
                    f'[[datasets]]\nimage_directory = "{(root / "images").as_posix()}"\n'
                    f'cache_directory = "{(root / "cache").as_posix()}"\n')
    enc = tiny_wan_encoders
    with torch.inference_mode():
        build_cache(load_dataset_config(toml), WanCacheAdapter(vae=enc["vae"], text_encoder=enc["umt5"],
                                                               dtype=torch.float32, text_dtype=torch.float32))
    return toml


def _diffusers_wan(cfg, official_sd):
    """diffusers' WanTransformer3DModel (an independent implementation) with a pack WanConfig, its weights converted
    from the official layout by diffusers' own single-file converter (2.1 and 2.2: per-token t when t is [B, L])."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ref = WanTransformer3DModel(  # config built locally, no hub access
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps,
        image_dim=cfg.clip_dim if cfg.has_image_input else None,
        added_kv_proj_dim=cfg.dim if cfg.has_image_input else None,
        pos_embed_seq_len=cfg.image_tokens if cfg.has_flf_pos_emb else None,
    )
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in official_sd.items()})
    if "img_emb.emb_pos" in converted:  # the one FLF2V key diffusers' single-file converter does not rename
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    missing, unexpected = ref.load_state_dict(converted, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ref.eval()


@pytest.fixture
def diffusers_wan():
    """`_diffusers_wan` as a fixture (the Wan 2.1 and 2.2 DiT parity tests)."""
    return _diffusers_wan


class _MetaFile:
    """Shapes without data: lets detection run on full-size (14B) key layouts without allocating them."""

    def __init__(self, state, name="meta.safetensors"):
        self.path, self.state, self.keys, self.metadata = Path(name), state, list(state), {}

    def get(self, key):
        return self.state[key]

    def shape(self, key):
        return tuple(self.state[key].shape)

    def dtype(self, key):
        return self.state[key].dtype


@pytest.fixture
def meta_checkpoint():
    """state dict (meta tensors), file name -> an `engine.checkpoint.Checkpoint` of those shapes under that name."""
    from engine.checkpoint import Checkpoint

    return lambda state, name="meta.safetensors": Checkpoint([_MetaFile(state, name)])


@pytest.fixture
def dual_family():
    """The test-only second model family (tests/dual_family.py), registered for one test."""
    from engine.families import register, unregister

    import dual_family as module

    register(module.FAMILY)
    yield module
    unregister(module.FAMILY.name)


# --- a cached dataset for the training-node tests -------------------------------------------------------------------
DATASETS: dict = {}


class MusubiTestCachedDataset:
    CATEGORY = "Musubi/tests"
    FUNCTION = "get"
    RETURN_TYPES = ("MUSUBI_DATASET",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "cached"})}}

    def get(self, name):
        return (DATASETS[name],)


@pytest.fixture(scope="module")
def data(comfy, tmp_path_factory):
    """Two solid-colour 32x32 images ('red' / 'blue'), cached for the tiny T2V preset; one dataset left uncached.
    The test node MusubiTestCachedDataset hands them to the training graphs of tests/training_graphs.py."""
    import torch

    from training_graphs import SIZE

    edata = comfy.pack_module("engine.data")
    wan_cache = comfy.pack_module("engine.families.wan.cache")
    WanCacheAdapter, wan_cache_requirements = wan_cache.WanCacheAdapter, wan_cache.cache_requirements
    ld = comfy.pack_module("nodes.wan")
    (vae,) = ld.MusubiWanVAELoader().load("preset:tiny-vae", "fp32", False)
    (te,) = ld.MusubiUMT5Loader().load("preset:tiny-umt5", "fp32")
    root = tmp_path_factory.mktemp("training_data")
    images = torch.zeros(2, SIZE, SIZE, 3)
    images[0, ..., 0], images[0, ..., 1] = 0.9, 0.1
    images[1, ..., 2], images[1, ..., 1] = 0.9, 0.6
    captions = ["a red square", "a blue square"]
    cfg = edata.dataset_from_tensors(images, captions, root / "cache", resolution=(SIZE, SIZE))
    with torch.inference_mode():
        edata.build_cache(cfg, WanCacheAdapter(vae=vae.module, text_encoder=te.module, dtype=torch.float32,
                                                     text_dtype=torch.float32))
    comfy.executor.reset()   # ComfyUI's cache may hold another module's dataset under the same node inputs
    DATASETS["cached"] = cfg
    DATASETS["uncached"] = edata.dataset_from_tensors(images, captions, root / "never", resolution=(SIZE, SIZE))
    mappings = comfy.b.nodes.NODE_CLASS_MAPPINGS
    mappings["MusubiTestCachedDataset"] = MusubiTestCachedDataset
    cached = edata.check_cache_for_model(cfg, wan_cache_requirements(text_dim=32))
    latents = {s.key: s.load()["latents"].float() for s in cached[0].samples}
    yield {"root": root, "latents": [latents[k] for k in sorted(latents)], "vae": vae}
    del mappings["MusubiTestCachedDataset"]
    comfy.pack_module("nodes.registry").SESSIONS.release()


@pytest.fixture(scope="module")
def factors_a():
    """Random LoRA factors {module: (down, up, alpha)} for the tiny Wan T2V layout (rank 4)."""
    from lora_fixtures import random_lora_factors, tiny_model

    return random_lora_factors(tiny_model("t2v"), rank=4, seed=1)


@pytest.fixture(scope="module")
def factors_b():
    from lora_fixtures import random_lora_factors, tiny_model

    return random_lora_factors(tiny_model("t2v"), rank=2, seed=2)


@pytest.fixture
def lora_files(comfy, factors_a, factors_b):
    """factors_a / factors_b as Musubi LoRA files in ComfyUI's loras folder: names for the loader, and paths."""
    from lora_fixtures import write_musubi_lora

    loras = Path(comfy.b.folder_paths.get_folder_paths("loras")[0])
    a = write_musubi_lora(loras / "nodes_test" / "lora_a.safetensors", factors_a)
    b = write_musubi_lora(loras / "nodes_test" / "lora_b.safetensors", factors_b)
    return {"a": "nodes_test/lora_a.safetensors", "b": "nodes_test/lora_b.safetensors", "a_path": a, "b_path": b}
