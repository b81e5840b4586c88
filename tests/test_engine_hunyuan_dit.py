"""HunyuanVideo DiT: numerics against diffusers, every checkpoint layout, config detection, refusals, bad input.

All models are tiny (hidden 64 = 2 heads x 32, 2 double + 2 single blocks, text 32 / CLIP pooled 24 wide) so the
file runs in seconds on CPU.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import Checkpoint
from engine.errors import MusubiInputError
from engine.families.hunyuan.detect import detect_hunyuan_config
from engine.families.hunyuan.dit import HunyuanVideoModel, build_hunyuan_model
from engine.families.hunyuan.loader import PRESET_PREFIX, load_hunyuan_dit
from engine.families.hunyuan.presets import OFFICIAL, build_preset_state_dict, preset_config, write_preset_checkpoint

# float32 end to end; differences come only from summation order inside matmuls/softmax.
PARITY_RTOL = 1e-5  # observed 2.9-3.3e-7; padded text tokens used as keys give 1.5e-1


def _inputs(cfg, batch=2, frames=3, h=4, w=6, tokens=7, valid=(5, 3), seed=1):
    """Latents, t, text states with right padding (`valid` real tokens per sample), mask, CLIP pooled."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, frames, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, tokens, cfg.text_dim, generator=g)
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    for b, n in enumerate(valid[:batch]):
        mask[b, :n] = True
    pooled = torch.randn(batch, cfg.text_pool_dim, generator=g)
    return x, t, text, mask, pooled


def _model(name, seed=0) -> HunyuanVideoModel:
    model = HunyuanVideoModel(preset_config(name))
    model.load_state_dict(build_preset_state_dict(name, seed))
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# (a) numerics vs diffusers' HunyuanVideoTransformer3DModel (an independent implementation)
# --------------------------------------------------------------------------------------------------------------

# Official -> diffusers names, checked against diffusers 0.42 transformer_hunyuan_video.py and its single-file
# converter (whose single-block split assumes hidden 3072, so the mapping is written out here).
_GLOBAL = [
    ("img_in.", "x_embedder."),
    ("time_in.mlp.0.", "time_text_embed.timestep_embedder.linear_1."),
    ("time_in.mlp.2.", "time_text_embed.timestep_embedder.linear_2."),
    ("guidance_in.mlp.0.", "time_text_embed.guidance_embedder.linear_1."),
    ("guidance_in.mlp.2.", "time_text_embed.guidance_embedder.linear_2."),
    ("vector_in.in_layer.", "time_text_embed.text_embedder.linear_1."),
    ("vector_in.out_layer.", "time_text_embed.text_embedder.linear_2."),
    ("txt_in.input_embedder.", "context_embedder.proj_in."),
    ("txt_in.t_embedder.mlp.0.", "context_embedder.time_text_embed.timestep_embedder.linear_1."),
    ("txt_in.t_embedder.mlp.2.", "context_embedder.time_text_embed.timestep_embedder.linear_2."),
    ("txt_in.c_embedder.linear_1.", "context_embedder.time_text_embed.text_embedder.linear_1."),
    ("txt_in.c_embedder.linear_2.", "context_embedder.time_text_embed.text_embedder.linear_2."),
    ("final_layer.linear.", "proj_out."),
]
_BLOCKS = {  # official block list -> (diffusers block list, renamed leaves, fused leaves split along the rows)
    "txt_in.individual_token_refiner.blocks": (
        "context_embedder.token_refiner.refiner_blocks",
        {"norm1": "norm1", "norm2": "norm2", "self_attn_proj": "attn.to_out.0", "mlp.fc1": "ff.net.0.proj",
         "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm_out.linear"},
        {"self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}),
    "double_blocks": (
        "transformer_blocks",
        {"img_mod.linear": "norm1.linear", "txt_mod.linear": "norm1_context.linear",
         "img_attn_q_norm": "attn.norm_q", "img_attn_k_norm": "attn.norm_k",
         "txt_attn_q_norm": "attn.norm_added_q", "txt_attn_k_norm": "attn.norm_added_k",
         "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out",
         "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
         "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"},
        {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
    "single_blocks": (
        "single_transformer_blocks",
        {"linear2": "proj_out", "q_norm": "attn.norm_q", "k_norm": "attn.norm_k", "modulation.linear": "norm.linear"},
        {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}),
}
_BLOCK_KEY = re.compile(r"^(txt_in\.individual_token_refiner\.blocks|double_blocks|single_blocks)\.(\d+)\.(.+)\."
                        r"(weight|bias)$")


def official_to_diffusers(sd: dict, hidden: int) -> dict:
    out = {}
    for k, v in sd.items():
        m = _BLOCK_KEY.match(k)
        if m:
            target, renamed, fused = _BLOCKS[m[1]]
            prefix = f"{target}.{m[2]}"
            if m[3] in fused:
                names = fused[m[3]]
                sizes = [hidden] * 3 + [v.shape[0] - 3 * hidden] * (len(names) == 4)   # q, k, v (, MLP input)
                out.update({f"{prefix}.{n}.{m[4]}": piece for n, piece in zip(names, v.split(sizes))})
            else:
                out[f"{prefix}.{renamed[m[3]]}.{m[4]}"] = v
        elif k.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = v.chunk(2)                   # diffusers' AdaLayerNormContinuous takes (scale, shift)
            out[f"norm_out.linear.{k.rsplit('.', 1)[1]}"] = torch.cat([scale, shift])
        else:
            old, new = next((a, b) for a, b in _GLOBAL if k.startswith(a))
            out[new + k[len(old):]] = v
    return out


def _diffusers_model(cfg, official_sd):
    from diffusers import HunyuanVideoTransformer3DModel

    ref = HunyuanVideoTransformer3DModel(  # config built locally, no hub access
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim, num_layers=cfg.double_blocks, num_single_layers=cfg.single_blocks,
        num_refiner_layers=cfg.refiner_blocks, mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size[1],
        patch_size_t=cfg.patch_size[0], guidance_embeds=cfg.guidance_embed, text_embed_dim=cfg.text_dim,
        pooled_projection_dim=cfg.text_pool_dim, rope_theta=cfg.rope_theta, rope_axes_dim=cfg.rope_dims)
    missing, unexpected = ref.load_state_dict(official_to_diffusers(official_sd, cfg.hidden_size), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref.eval()


@pytest.mark.parametrize("name,batch,valid,frames", [
    ("tiny", 2, (5, 3), 3),        # guidance-distilled, two prompts padded differently (one kernel call each)
    ("tiny", 2, (4, 4), 1),        # same padding in both samples (one gathered call), one frame
    ("tiny-i2v", 2, (7, 2), 2),    # SkyReels I2V layout (32 channels), no guidance embedder, one prompt unpadded
])
def test_matches_diffusers(name, batch, valid, frames):
    cfg = preset_config(name)
    sd = build_preset_state_dict(name, seed=3)
    ours = HunyuanVideoModel(cfg)
    ours.load_state_dict(sd)
    ours.eval()
    ref = _diffusers_model(cfg, sd)
    x, t, text, mask, pooled = _inputs(cfg, batch=batch, frames=frames, valid=valid)
    guidance = torch.tensor([6000.0, 3500.0])[:batch] if cfg.guidance_embed else None   # 6.0 / 3.5 x 1000

    with torch.no_grad():
        out = ours(x, t, text, mask, pooled, guidance)
        expected = ref(x, t, text, mask.long(), pooled, guidance, return_dict=False)[0]
    assert out.shape == expected.shape == (batch, 16, frames, 4, 6)
    rel = (out - expected).abs().max() / expected.abs().max()
    assert rel < PARITY_RTOL, f"max relative error {rel:.2e}"


def test_padded_text_never_reaches_the_video_and_batches_are_independent():
    model = _model("tiny", seed=2)
    cfg = model.config
    x, t, text, mask, pooled = _inputs(cfg)
    guidance = torch.tensor([5000.0, 5000.0])
    with torch.no_grad():
        out = model(x, t, text, mask, pooled, guidance)
        garbage = text.clone()
        garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), cfg.text_dim)
        assert torch.equal(model(x, t, garbage, mask, pooled, guidance), out)
        # a sample alone, its prompt trimmed to its real tokens, gives the same video
        alone = model(x[1:], t[1:], text[1:, :3], None, pooled[1:], guidance[1:])
        torch.testing.assert_close(alone, out[1:], rtol=1e-5, atol=1e-5)
        # and the mask matters: without it the padding is attended to
        assert not torch.allclose(model(x, t, text, None, pooled, guidance), out, atol=1e-3)
        # guidance=None skips the guidance embedding (an unconditional CFG pass)
        assert not torch.allclose(model(x, t, text, mask, pooled, None), out, atol=1e-3)


def test_official_size():
    cfg = OFFICIAL["t2v-13B"]
    model = build_hunyuan_model(cfg, "meta")
    assert cfg.head_dim == 128 and cfg.rope_dims == (16, 56, 56) and cfg.guidance_embed
    assert len(model.double_blocks) == 20 and len(model.single_blocks) == 40
    assert 12.7e9 < sum(p.numel() for p in model.parameters()) < 12.9e9     # the published 13B (12.8B)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # official names the checkpoint, ComfyUI's repackage and Musubi's LoRA keys use
    assert shapes["double_blocks.0.img_attn_qkv.weight"] == (9216, 3072)
    assert shapes["single_blocks.0.linear1.weight"] == (3 * 3072 + 12288, 3072)
    assert shapes["single_blocks.0.linear2.weight"] == (3072, 3072 + 12288)
    assert shapes["txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight"] == (9216, 3072)
    assert shapes["txt_in.c_embedder.linear_1.weight"] == (3072, 4096)
    assert shapes["vector_in.in_layer.weight"] == (3072, 768)
    assert shapes["img_in.proj.weight"] == (3072, 16, 1, 2, 2)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert shapes["guidance_in.mlp.0.weight"] == (3072, 256)
    assert shapes["double_blocks.0.img_attn_q_norm.weight"] == (128,)


# --------------------------------------------------------------------------------------------------------------
# (b) every checkpoint layout loads to the weights it stores
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def master():
    return build_preset_state_dict("tiny", seed=5)


def _loaded(path, **kw):
    model = load_hunyuan_dit(path, dtype=torch.float32, **kw)
    return {k: v.float() for k, v in model.state_dict().items()}


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k].float()), k


def _forward(model):
    x, t, text, mask, pooled = _inputs(model.config, batch=1, valid=(5,))
    with torch.no_grad():
        return model(x, t, text, mask, pooled, torch.tensor([6000.0]) if model.config.guidance_embed else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_bare_safetensors_dtypes(tmp_path, master, dtype):
    path = tmp_path / "mp_rank_00_model_states_fp8.safetensors"    # kohya's fp8 file is a plain e4m3 cast
    save_file({k: v.to(dtype) for k, v in master.items()}, str(path))
    _assert_same(_loaded(path), {k: v.to(dtype).float() for k, v in master.items()})


@pytest.mark.parametrize("nest", ["module", "ema"])
def test_official_pt(tmp_path, master, nest):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({nest: {k: v.to(torch.bfloat16) for k, v in master.items()}}, path)
    model = load_hunyuan_dit(path, dtype=torch.float32)
    _assert_same({k: v for k, v in model.state_dict().items()},
                 {k: v.to(torch.bfloat16).float() for k, v in master.items()})
    assert model.config.variant.startswith("custom") and model.config.guidance_embed
    reference = HunyuanVideoModel(preset_config("tiny"))
    reference.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in master.items()})
    assert torch.equal(_forward(model), _forward(reference.eval()))


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model."])
def test_comfy_prefixed(tmp_path, master, prefix):
    path = tmp_path / "hunyuan_video_t2v_720p_bf16.safetensors"
    save_file({prefix + k: v for k, v in master.items()}, str(path))
    _assert_same(_loaded(path), master)


def _comfy_internal_name(key: str) -> str:
    """The renaming ComfyUI applies when it loads an official file (supported_models.HunyuanVideo
    .process_unet_state_dict, ComfyUI 0.3.x), written out independently of the loader's inverse."""
    for a, b in [("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
                 ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
                 ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
                 ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
                 ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."),
                 ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
                 ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
                 ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
                 (".q_norm.weight", ".norm.query_norm.scale"), (".k_norm.weight", ".norm.key_norm.scale"),
                 ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
                 ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer.")]:
        key = key.replace(a, b)
    return key


def test_comfy_internal_names(tmp_path, master):
    # what a model saved from ComfyUI holds: its internal (Flux-style) names under the diffusion model prefix
    stored = {"model.diffusion_model." + _comfy_internal_name(k): v for k, v in master.items()}
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in stored
    assert "model.diffusion_model.time_in.in_layer.weight" in stored
    path = tmp_path / "saved_from_comfy.safetensors"
    save_file(stored, str(path))
    _assert_same(_loaded(path), master)


def test_comfy_scaled_fp8(tmp_path, master):
    stored, expected = {}, {}
    for k, v in master.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and v.ndim == 2:
            scale = v.abs().max() / 448.0
            stored[k] = (v / scale).to(torch.float8_e4m3fn)
            stored[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
            expected[k] = stored[k].float() * scale
        else:
            stored[k] = expected[k] = v
    stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "hunyuan_video_t2v_720p_fp8_scaled.safetensors"
    save_file({f"model.diffusion_model.{k}" if k != "scaled_fp8" else k: v for k, v in stored.items()}, str(path))
    _assert_same(_loaded(path), expected)
    model = load_hunyuan_dit(path, dtype=None)          # fp8 files compute in bf16
    assert model.compute_dtype == torch.bfloat16
    # and straight into Fp8Linear: the file's bytes and scales, never upcast
    from engine.memory.fp8 import Fp8Linear

    fp8 = load_hunyuan_dit(path, dtype=torch.float32, fp8="scaled")
    qkv = fp8.double_blocks[0].img_attn_qkv
    assert isinstance(qkv, Fp8Linear)
    assert torch.equal(qkv.weight.view(torch.uint8), stored["double_blocks.0.img_attn_qkv.weight"].view(torch.uint8))
    assert not isinstance(fp8.single_blocks[0].modulation.linear, Fp8Linear)    # Musubi's exclusion
    reference = HunyuanVideoModel(preset_config("tiny"))
    reference.load_state_dict(expected)
    torch.testing.assert_close(_forward(fp8), _forward(reference.eval()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,conf_in_metadata", [("float8_e4m3fn", False), ("float8_e4m3fn", True)])
def test_comfy_current_quantized_layout(tmp_path, master, comfy_quantize, fmt, conf_in_metadata):
    stored, expected, meta = comfy_quantize({f"model.diffusion_model.{k}": v for k, v in master.items()},
                                            lambda k: "_blocks." in k, fmt, conf_in_metadata, False, True)
    path = tmp_path / f"dit_{fmt}.safetensors"
    save_file(stored, str(path), meta)
    _assert_same(_loaded(path), {k[len("model.diffusion_model."):]: v for k, v in expected.items()})


@pytest.mark.parametrize("mode", ["e4m3", "scaled"])
def test_fp8_storage_of_a_bf16_file_stays_close(tmp_path, mode):
    path = write_preset_checkpoint("tiny", tmp_path / "dit.safetensors", dtype=torch.float32)
    ref, q = load_hunyuan_dit(path, dtype=torch.float32), load_hunyuan_dit(path, dtype=torch.float32, fp8=mode)
    from engine.memory.fp8 import Fp8Linear

    assert isinstance(q.single_blocks[1].linear1, Fp8Linear) and isinstance(q.double_blocks[0].img_mod.linear,
                                                                             Fp8Linear)
    assert not isinstance(q.txt_in.input_embedder, Fp8Linear) and not isinstance(q.final_layer.linear, Fp8Linear)
    a, b = _forward(ref), _forward(q)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.05, rel


def test_skyreels_i2v_file(tmp_path):
    sd = build_preset_state_dict("tiny-i2v", seed=4)
    path = tmp_path / "skyreels_hunyuan_i2v_bf16.safetensors"
    save_file(sd, str(path))
    model = load_hunyuan_dit(path, dtype=torch.float32)
    assert model.config.in_channels == 32 and not model.config.guidance_embed
    _assert_same(model.state_dict(), sd)
    reference = HunyuanVideoModel(preset_config("tiny-i2v"))
    reference.load_state_dict(sd)
    # same weights; the Conv3d kernel may pick another summation order for a freshly mapped weight (~1e-7)
    torch.testing.assert_close(_forward(model), _forward(reference.eval()), rtol=1e-5, atol=1e-5)
    # x + y (first-frame latent) on channels is the same as the concatenated input
    x, t, text, mask, pooled = _inputs(model.config, batch=1, valid=(5,))
    with torch.no_grad():
        assert torch.equal(model(x[:, :16], t, text, mask, pooled, y=x[:, 16:]), model(x, t, text, mask, pooled))
    with pytest.raises(MusubiInputError, match=r"\[B, 32, F, H, W\]"):
        model(x[:, :16], t, text, mask, pooled)


def test_preset_and_keep_file_dtype(tmp_path):
    path = write_preset_checkpoint("tiny", tmp_path / "tiny.safetensors", dtype=torch.float16)
    model = load_hunyuan_dit(path, dtype=None)
    assert model.compute_dtype == torch.float16 and model.config.variant == "tiny"
    assert model.source_path == str(path)
    from_preset = load_hunyuan_dit(PRESET_PREFIX + "tiny", dtype=torch.float16)
    _assert_same({k: v.float() for k, v in from_preset.state_dict().items()},
                 {k: v.float() for k, v in model.state_dict().items()})
    out = _forward(model)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.std() > 0.1


def test_detect_official_13b():
    meta = build_hunyuan_model(OFFICIAL["t2v-13B"], "meta").state_dict()
    cfg = detect_hunyuan_config(Checkpoint.from_state_dict(meta))
    assert (cfg.variant, cfg.num_heads, cfg.rope_dims, cfg.guidance_embed) == ("t2v-13B", 24, (16, 56, 56), True)
    i2v = build_hunyuan_model(OFFICIAL["skyreels-i2v-13B"], "meta").state_dict()
    assert detect_hunyuan_config(Checkpoint.from_state_dict(i2v)).variant == "skyreels-i2v-13B"


# --------------------------------------------------------------------------------------------------------------
# (c) other files and bad input are refused with a message that names them
# --------------------------------------------------------------------------------------------------------------

def test_wan_file_is_refused(tmp_path):
    from engine.families.wan.presets import write_preset_checkpoint as write_wan

    path = write_wan("tiny-t2v", tmp_path / "wan2.1_t2v_1.3B_bf16.safetensors")
    with pytest.raises(MusubiInputError) as e:
        load_hunyuan_dit(path)
    assert str(path) in str(e.value) and "Wan 2.1 DiT" in str(e.value) and "HunyuanVideo DiT" in str(e.value)


@pytest.mark.parametrize("keys,needle", [
    ({"double_blocks.0.img_attn.qkv.weight": (4, 4), "img_in.weight": (4, 4)}, "Flux"),
    ({"transformer_blocks.0.attn.to_q.weight": (4, 4), "context_embedder.token_refiner.refiner_blocks.0.norm1.weight":
      (4,)}, "diffusers-layout HunyuanVideo"),
    ({"transformer_blocks.0.attn.to_q.weight": (4, 4), "clean_x_embedder.proj.weight": (4, 4)}, "FramePack"),
    ({"decoder.conv_in.weight": (4, 4), "encoder.conv_in.weight": (4, 4)}, "VAE"),
    ({"text_model.encoder.layers.0.mlp.fc1.weight": (4, 4)}, "CLIP text encoder"),
    ({"something.else": (4,)}, "no 'txt_in.individual_token_refiner"),
])
def test_other_files_are_refused(tmp_path, keys, needle):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    with pytest.raises(MusubiInputError, match=re.escape(needle)) as e:
        load_hunyuan_dit(path)
    assert str(path) in str(e.value)


def test_hunyuan_i2v_and_incomplete_files_are_refused(tmp_path, master):
    i2v = dict(master)
    i2v["img_in.proj.weight"] = torch.zeros(64, 33, 1, 2, 2)
    save_file(i2v, str(tmp_path / "hv_i2v.safetensors"))
    with pytest.raises(MusubiInputError, match="HunyuanVideo-I2V DiT"):
        load_hunyuan_dit(tmp_path / "hv_i2v.safetensors")
    gap = {k: v for k, v in master.items() if not k.startswith("single_blocks.0.")}
    save_file(gap, str(tmp_path / "gap.safetensors"))
    with pytest.raises(MusubiInputError, match=r"single_blocks\.\[0\] missing"):
        load_hunyuan_dit(tmp_path / "gap.safetensors")
    extra = dict(master, **{"double_blocks.0.extra.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(MusubiInputError, match="unexpected tensors"):
        load_hunyuan_dit(tmp_path / "extra.safetensors")


def test_tencent_fp8_with_separate_scale_map_is_refused(tmp_path, master):
    path = tmp_path / "mp_rank_00_model_states_fp8.pt"
    torch.save({"module": {k: v.to(torch.float8_e4m3fn) for k, v in master.items()}}, path)
    torch.save({"double_blocks.0.img_attn_qkv.weight": torch.tensor(0.5)},
               tmp_path / "mp_rank_00_model_states_fp8_map.pt")
    with pytest.raises(MusubiInputError, match="separate"):
        load_hunyuan_dit(path)


class _NotATensor:
    """Unpickling this would run the test module's code: weights_only loading must refuse it."""


def test_pickled_code_is_never_run(tmp_path, master):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": dict(master), "payload": _NotATensor()}, path)
    with pytest.raises(MusubiInputError, match="weights_only=True"):
        load_hunyuan_dit(path)


def test_bad_forward_inputs(raises_input):
    model = _model("tiny")
    x, t, text, mask, pooled = _inputs(model.config)
    cases = [
        ((x, t, torch.zeros(2, 7, 40), mask, pooled), "text_states", (2, 7, 40), "[B, tokens, 32] LLM hidden states for tiny"),
        ((x, t, text[:1].repeat(3, 1, 1), mask, pooled), "text_states", (3, 7, 32), "batch 2 (one prompt per latent)"),
        ((x, t, text, mask, None), "text_states_2", None, "[B, 24] CLIP-L pooled embeddings"),
        ((x, t, text, mask, pooled[:, :8]), "text_states_2", (2, 8), "[B, 24] CLIP-L pooled embeddings"),
        ((x, t, text, mask, torch.zeros(3, 24)), "text_states_2", (3, 24), "[2, 24]"),
        ((x, t, text, torch.stack([mask[0], torch.zeros_like(mask[1])]), pooled), "text_mask",
         "a prompt with no real token",
         "at least one True (unpadded) token per prompt"),
        ((x, t, text, mask[:, :5], pooled), "text_mask", (2, 5), "(2, 7) (one flag per token)"),
        ((x[..., :5], t, text, mask, pooled), "x", (2, 16, 3, 4, 5), "F, H, W divisible by the patch size (1, 2, 2)"),
        ((x[:, :8], t, text, mask, pooled), "x", "noisy latents (no y given) with shape (2, 8, 3, 4, 6)",
         "[B, 16, F, H, W] for tiny (in_channels=16)"),
        ((x[:, :, 0], t, text, mask, pooled), "x", "noisy latents (no y given) with shape (2, 16, 4, 6)",
         "[B, 16, F, H, W] for tiny (in_channels=16)"),
        ((x, torch.ones(3), text, mask, pooled), "t", (3,), "[2] timesteps (one per latent)"),
        ((x, t, text, mask, pooled, torch.ones(3)), "guidance", (3,), "[2] guidance values (one per latent)"),
    ]
    for args, name, value, expected in cases:
        with raises_input(name, value, expected):
            model(*args)
    i2v = _model("tiny-i2v")
    xi, ti, texti, maski, pooledi = _inputs(i2v.config)
    with raises_input("guidance", "a guidance value", "None: tiny-i2v has no guidance embedder (not a "
                      "guidance-distilled model; use real CFG)"):
        i2v(xi, ti, texti, maski, pooledi, torch.tensor([6000.0, 6000.0]))
    with raises_input("x", "noisy latents (no y given) with shape (2, 16, 3, 4, 6)", "[B, 32, F, H, W] for tiny-i2v"):
        i2v(xi[:, :16], ti, texti, maski, pooledi)
    with raises_input("x", "noisy latents + y with shape (2, 64, 3, 4, 6)", "[B, 32, F, H, W] for tiny-i2v"):
        i2v(xi, ti, texti, maski, pooledi, y=xi)
    with pytest.raises(MusubiInputError, match="attention_backend"):
        model.attention_backend = "magic"


def test_one_prompt_serves_a_batch_and_no_mask_means_every_token_is_real():
    """Text states, mask, pooled vector and guidance of batch 1 are broadcast over the latents' batch; y is
    concatenated to x on the channels."""
    model = _model("tiny")
    x, t, text, mask, pooled = _inputs(model.config, valid=(7, 7))
    g = torch.full((2,), 4000.0)
    with torch.no_grad():
        expected = model(x, t, text[:1].expand(2, -1, -1), mask, pooled[:1].expand(2, -1), g)
        assert torch.equal(model(x, t, text[:1], mask[:1], pooled[:1], g[:1]), expected)
        assert torch.equal(model(x, t, text[:1], None, pooled[:1], g), expected)
        assert not torch.equal(model(x, t, text, mask, pooled, g), expected)        # (the prompts differ)
        i2v = _model("tiny-i2v")
        xi = torch.randn(2, 32, 3, 4, 6, generator=torch.Generator().manual_seed(3))
        assert torch.equal(i2v(xi[:, :16], t, text, mask, pooled, y=xi[:, 16:]), i2v(xi, t, text, mask, pooled))


# --------------------------------------------------------------------------------------------------------------
# LoRA names: kohya underscore names and diffusers names map onto the official modules
# --------------------------------------------------------------------------------------------------------------

def test_underscore_names_resolve_every_linear():
    from engine.families.hunyuan.names import DEFAULT_EXCLUDE, underscore_to_name

    model = build_hunyuan_model(preset_config("tiny"), "meta")
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 30
    for name in linears:
        assert underscore_to_name(name.replace(".", "_")) == name, name
    assert underscore_to_name("double_blocks_0_img_attn_q_norm") is None and underscore_to_name("blocks_0_ffn_0") is None
    # Musubi's default targets: block Linears minus the modulation layers
    targets = [n for n in linears if n.startswith(("double_blocks.", "single_blocks."))
               and not re.fullmatch(DEFAULT_EXCLUDE, n)]
    assert {n.split(".", 2)[2] for n in targets} == {"img_attn_qkv", "img_attn_proj", "img_mlp.fc1", "img_mlp.fc2",
                                                     "txt_attn_qkv", "txt_attn_proj", "txt_mlp.fc1", "txt_mlp.fc2",
                                                     "linear1", "linear2"}


def test_diffusers_names_map_one_to_one_or_are_fused_pieces():
    from engine.families.hunyuan.names import FUSED_PIECES, diffusers_to_name, name_to_diffusers

    cfg = preset_config("tiny")
    ours = dict(build_hunyuan_model(cfg, "meta").named_modules())
    ref = _diffusers_model(cfg, build_preset_state_dict("tiny"))
    mapped = fused = 0
    for dname, module in ref.named_modules():
        if not isinstance(module, torch.nn.Linear) or dname.startswith(("context_embedder.token_refiner.",
                                                                           "context_embedder.time_text_embed.")):
            continue                                   # the refiner's internals: no LoRA targets them
        name = diffusers_to_name(dname)
        if dname == "norm_out.linear":                 # (scale, shift) rows where the official has (shift, scale)
            assert name is None
            continue
        if name is None:
            assert dname.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj",
                                                "proj_mlp"), dname
            assert any(dname.endswith(p) for pieces in FUSED_PIECES.values() for p in pieces)
            fused += 1
            continue
        assert ours[name].weight.shape == module.weight.shape, (dname, name)
        assert name_to_diffusers(name) == dname
        mapped += 1
    assert mapped >= 20 and fused == 2 * 6 + 2 * 4
    assert name_to_diffusers("double_blocks.0.img_attn_qkv") is None


def test_bf16_close_to_fp32_and_gradients_reach_every_block():
    model = _model("tiny", seed=1)
    x, t, text, mask, pooled = _inputs(model.config)
    guidance = torch.tensor([6000.0, 6000.0])
    with torch.no_grad():
        ref = model(x, t, text, mask, pooled, guidance)
        half = _model("tiny", seed=1).to(torch.bfloat16)(x, t, text, mask, pooled, guidance)
    assert half.dtype == torch.float32
    rel = ((half - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel
    model.requires_grad_(True)
    model(x, t, text, mask, pooled, guidance).square().mean().backward()
    for name in ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv", "double_blocks.0.txt_attn_qkv",
                 "single_blocks.1.linear1", "guidance_in.mlp.0", "vector_in.in_layer"):
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_config_refusals_and_the_official_rope_split(raises_input):
    from engine.families.hunyuan.dit import HunyuanConfig, official_rope_dims

    assert official_rope_dims(128) == (16, 56, 56) and official_rope_dims(64) == (8, 28, 28)
    assert official_rope_dims(96) == (12, 42, 42)
    assert HunyuanConfig(hidden_size=128, num_heads=2).rope_dims == (8, 28, 28)
    assert HunyuanConfig(hidden_size=128, num_heads=2, rope_dims=[16, 24, 24]).rope_dims == (16, 24, 24)
    with raises_input("HunyuanVideo head dim", 48, "a multiple of 32 (RoPE splits it 1/8, 7/16, 7/16)"):
        HunyuanConfig(hidden_size=96, num_heads=2)
    with raises_input("HunyuanConfig.num_heads", 3, "a divisor of hidden_size=128"):
        HunyuanConfig(hidden_size=128, num_heads=3)
    for bad in ((16, 24, 22), (15, 25, 24)):
        with raises_input("HunyuanConfig.rope_dims", bad, "three even numbers summing to the head dim 64"):
            HunyuanConfig(hidden_size=128, num_heads=2, rope_dims=bad)
