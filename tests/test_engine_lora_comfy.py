"""Interop: a comfyui-format file written by the engine is fully consumed by ComfyUI's own LoRA loader and patches
the weights to exactly what the engine computes (W + strength·ΔW). ComfyUI runs in one subprocess for all cases."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.lora import AdapterConfig, AdapterNetwork, merge_into_model, read_lora, save_lora

from lora_fixtures import comfy_base, tiny_model

PROBE = Path(__file__).with_name("comfy_lora_probe.py")
CASES = [("t2v", "lora"), ("i2v", "lora"), ("t2v", "loha"), ("i2v", "lokr")]
STRENGTH = 0.75


@pytest.fixture(scope="module")
def comfy_runs(tmp_path_factory, comfyui_dir):
    tmp = tmp_path_factory.mktemp("comfy_lora")
    jobs, cases = [], []
    for i, (variant, kind) in enumerate(CASES):
        model = tiny_model(variant)
        net = AdapterNetwork.create(model, AdapterConfig(kind=kind, rank=4, alpha=2.0))
        g = torch.Generator().manual_seed(5 + i)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        net.detach()
        base = comfy_base(variant)
        # the in-memory trained network's answer, captured before anything is written: W + strength·scale·ΔW
        expected = {f"{m}.weight": base[f"{m}.weight"] + STRENGTH * net.delta_weight(m) for m in net.adapters()}
        lora_path = save_lora(net, tmp / f"lora_{i}.safetensors", format="comfyui")
        save_file(base, str(tmp / f"base_{i}.safetensors"))
        jobs.append({"base": str(tmp / f"base_{i}.safetensors"), "lora": str(lora_path), "strength": STRENGTH,
                     "out": str(tmp / f"patched_{i}.safetensors")})
        cases.append((variant, base, lora_path, expected))
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([sys.executable, str(PROBE), str(tmp / "jobs.json")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COMFYUI_DIR": str(comfyui_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(c, r, load_file(j["out"])) for c, r, j in zip(cases, results, jobs)]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{v}-{k}" for v, k in CASES])
def test_comfyui_loader_maps_every_key_and_patches_identically(comfy_runs, case):
    (variant, base, lora_path, expected), result, patched = comfy_runs[case]
    assert result["model_class"] == "WAN21"
    assert result["not_loaded"] == []                       # every LoRA key consumed by ComfyUI's key map
    lora = read_lora(lora_path)
    assert sorted(result["patched_keys"]) == sorted(f"{m}.weight" for m in lora.modules)
    assert len(lora.modules) == (24 if variant == "i2v" else 20)

    # ComfyUI's patch equals the network that was trained (alpha 2 ≠ rank 4, so a dropped scale shows), not only
    # the engine's re-reading of the same file
    assert sorted(patched) == sorted(expected)
    for key, theirs in patched.items():
        torch.testing.assert_close(theirs, expected[key], rtol=1e-6, atol=1e-7)

    # and the engine's reading of the file agrees: W + strength·ΔW through its own merge, float32, the same weights
    ours = tiny_model(variant)
    own_keys = set(ours.state_dict())
    ours.load_state_dict({k: v for k, v in base.items() if k in own_keys and v.shape == ours.state_dict()[k].shape},
                         strict=False)
    merge_into_model(ours, lora, STRENGTH)
    mods = dict(ours.named_modules())
    for key, theirs in patched.items():
        mine = mods[key[: -len(".weight")]].weight.detach()
        assert not torch.equal(theirs, base[key])
        torch.testing.assert_close(theirs, mine, rtol=1e-6, atol=1e-7)
