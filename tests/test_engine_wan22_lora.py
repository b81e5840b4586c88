"""Wan 2.2 LoRAs (an A14B expert of each kind, TI2V-5B) written by the engine in every dialect are read by the tools
that use them: ComfyUI 0.3.75's own loader (one subprocess for every case) maps every key and patches W + s·ΔW of
the network captured before saving; diffusers' `WanTransformer3DModel` (2.2 configs) takes the file through its
Wan LoRA loader and PEFT and fuses the same ΔW; the engine reads its own Musubi file back exactly. alpha ≠ rank
throughout, so a dropped or doubled scale shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.families.wan.presets import build_preset_state_dict, preset_config
from engine.lora import AdapterConfig, AdapterNetwork, merge_into_model, read_lora, save_lora

from lora_fixtures import comfy_base, tiny_model

PROBE = Path(__file__).with_name("comfy_lora_probe.py")
# (tiny preset, ComfyUI's model class): A14B experts are Wan 2.1 14B DiTs to ComfyUI (I2V: in_dim 36, no CLIP
# branch); TI2V-5B (48 output channels) is its WAN22 model
VARIANTS = [("ti2v-5b", "WAN22"), ("t2v-a14b-high-noise", "WAN21"), ("i2v-a14b-low-noise", "WAN21")]
COMFY_FORMATS = ("comfyui", "musubi")      # the two spellings ComfyUI's Wan key map takes
STRENGTH = 0.75
RANK, ALPHA = 4, 2.0


def _network(variant: str, seed: int):
    """A LoRA on the tiny model with random (non-zero) factors, and its ΔW per module captured in memory."""
    model = tiny_model(variant)
    net = AdapterNetwork.create(model, AdapterConfig(rank=RANK, alpha=ALPHA))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    deltas = {m: net.delta_weight(m).detach().clone() for m in net.adapters()}
    net.detach()
    return model, net, deltas


@pytest.fixture(scope="module")
def comfy_runs(tmp_path_factory, comfyui_dir):
    tmp = tmp_path_factory.mktemp("comfy_wan22_lora")
    jobs, cases = [], []
    for i, (variant, model_class) in enumerate(VARIANTS):
        _, net, deltas = _network(variant, seed=20 + i)
        base = comfy_base(variant)
        save_file(base, str(tmp / f"base_{i}.safetensors"))
        expected = {f"{m}.weight": base[f"{m}.weight"] + STRENGTH * d for m, d in deltas.items()}
        for fmt in COMFY_FORMATS:
            lora_path = save_lora(net, tmp / f"lora_{i}_{fmt}.safetensors", format=fmt)
            jobs.append({"base": str(tmp / f"base_{i}.safetensors"), "lora": str(lora_path), "strength": STRENGTH,
                         "out": str(tmp / f"patched_{i}_{fmt}.safetensors")})
            cases.append((variant, model_class, fmt, base, lora_path, expected))
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp / "jobs.json")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COMFYUI_DIR": str(comfyui_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {(c[0], c[2]): (c, r, load_file(j["out"])) for c, r, j in zip(cases, results, jobs)}


@pytest.mark.parametrize("fmt", COMFY_FORMATS)
@pytest.mark.parametrize("variant", [v for v, _ in VARIANTS])
def test_comfyui_loader_maps_every_key_of_a_wan22_lora_and_patches_w_plus_s_delta(comfy_runs, variant, fmt):
    (_, model_class, _, base, lora_path, expected), result, patched = comfy_runs[variant, fmt]
    assert result["model_class"] == model_class
    assert result["not_loaded"] == []                                  # every key consumed by ComfyUI's key map
    lora = read_lora(lora_path)
    assert len(lora.modules) == 20                                     # 2 blocks × 10 (no image cross-attention)
    assert result["lora_keys"] == 3 * len(lora.modules)               # down, up, alpha per module
    assert sorted(result["patched_keys"]) == sorted(f"{m}.weight" for m in lora.modules)

    # ComfyUI's patch is the network that was trained, not only the engine's re-reading of the same file
    assert sorted(patched) == sorted(expected)
    for key, theirs in patched.items():
        assert not torch.equal(theirs, base[key])
        torch.testing.assert_close(theirs, expected[key], rtol=1e-6, atol=1e-7)

    # the engine's own merge of the file onto the same base weights agrees
    ours = tiny_model(variant)
    own = ours.state_dict()
    ours.load_state_dict({k: v for k, v in base.items() if k in own and v.shape == own[k].shape}, strict=False)
    merge_into_model(ours, lora, STRENGTH)
    mods = dict(ours.named_modules())
    for key, theirs in patched.items():
        torch.testing.assert_close(theirs, mods[key[: -len(".weight")]].weight.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["diffusers", "comfyui", "musubi"])
@pytest.mark.parametrize("variant", [v for v, _ in VARIANTS])
def test_diffusers_wan22_transformer_fuses_the_trained_delta_through_peft(tmp_path, diffusers_wan, variant, fmt):
    """What `WanPipeline.load_lora_weights` does, on the transformer alone: the pipeline's Wan LoRA reader
    (diffusers-named files as they are; ComfyUI / Musubi spellings through diffusers' own converters), then PEFT's
    `load_lora_adapter` and `fuse_lora`: every adapted weight moves by exactly the network's ΔW."""
    from diffusers import WanPipeline

    _, net, deltas = _network(variant, seed=40)
    ref = diffusers_wan(preset_config(f"tiny-{variant}"), build_preset_state_dict(f"tiny-{variant}"))
    assert ref.config.out_channels == (48 if variant == "ti2v-5b" else 16)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    path = save_lora(net, tmp_path / f"{variant}_{fmt}.safetensors", format=fmt)
    state = WanPipeline.lora_state_dict(str(path))
    ref.load_lora_adapter(state, adapter_name="w22", prefix="transformer")
    ref.fuse_lora(lora_scale=1.0)
    params = dict(ref.named_parameters())
    names = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2"}   # diffusers' WanTransformerBlock spelling, written out here independently
    moved = 0
    for module, delta in deltas.items():
        _, i, sub = module.split(".", 2)
        name = f"blocks.{i}.{names[sub]}"
        weight = params.get(f"{name}.base_layer.weight", params.get(f"{name}.weight"))
        torch.testing.assert_close(weight.detach() - before[f"{name}.weight"], delta, rtol=1e-5, atol=1e-7)
        moved += 1
    assert moved == 20
    untouched = [n for n, p in params.items() if n in before and "blocks." not in n
                 and not torch.equal(p.detach(), before[n])]
    assert untouched == []


@pytest.mark.parametrize("variant", [v for v, _ in VARIANTS])
def test_musubi_file_round_trips_through_the_engine_reader(tmp_path, variant):
    """Musubi's spelling (lora_unet_…, alpha per module) read back by the engine, with and without the model:
    the same modules, shapes and ΔW as the network, and the Wan metadata Musubi writes."""
    model, net, deltas = _network(variant, seed=60)
    path = save_lora(net, tmp_path / f"{variant}.safetensors", format="musubi",
                     metadata={"ss_timestep_boundary": 0.875})
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_blocks_") for k in keys) and len(keys) == 3 * len(deltas)
    assert all(f.endswith(".alpha") for f in keys if "alpha" in f)
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_timestep_boundary"] == "0.875"
    for back in (read_lora(path), read_lora(path, model=model)):
        assert back.dialect.startswith("musubi")
        assert sorted(back.modules) == sorted(deltas)
        for name, delta in deltas.items():
            torch.testing.assert_close(back.modules[name].delta(), delta, rtol=1e-6, atol=1e-8)
    # and onward to the other dialects and back: W + ΔW unchanged
    for fmt in ("comfyui", "diffusers"):
        again = read_lora(save_lora(path, tmp_path / f"{variant}_{fmt}.safetensors", format=fmt), model=model)
        for name, delta in deltas.items():
            torch.testing.assert_close(again.modules[name].delta(), delta, rtol=1e-5, atol=1e-7)
