"""A community speed/distill LoRA (lightx2v style: low-rank weights plus `.diff` / `.diff_b` on norms and biases)
stacks with a freshly trained session adapter, from the nodes in a real ComfyUI: Apply LoRA on Train Steps' model
output (generation / validation with both), and training on top of Apply LoRA's output (the speed LoRA frozen under
the trained adapter). The cached tiny dataset and the training prompt come from test_nodes_training.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engine.lora import AdapterConfig, AdapterNetwork, merge_into_model, read_lora
from lora_fixtures import tiny_model
from test_engine_lora_core_kinds import community_lora
from training_graphs import train_prompt

pytestmark = pytest.mark.comfy


def _probe(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = [torch.randn(5, model.config.text_dim, generator=g)]
    with torch.inference_mode():
        return model(x, torch.tensor([500.0]), ctx).float()


def _speed_file(comfy, sd, name) -> str:
    """A new file name per test: Load LoRA's cached output follows the name (ComfyUI re-runs a node on input change)."""
    from pathlib import Path

    folder = Path(comfy.b.folder_paths.get_folder_paths("loras")[0]) / "stacking"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / f"{name}.safetensors"))
    return f"stacking/{name}.safetensors"


def _reference(base, speed, trained_state, strength):
    """A separate tiny model with `base`'s weights, the speed LoRA merged (ComfyUI's arithmetic) and the trained
    adapter's weights."""
    ref = tiny_model("t2v")
    ref.load_state_dict({k: v.clone() for k, v in base.state_dict().items()})
    merge_into_model(ref, read_lora(speed, model=ref), strength, strict=False)
    net = AdapterNetwork.create(ref, AdapterConfig(kind="lora", rank=4, alpha=4.0), name="ref")
    net.load_state_dict(trained_state)
    return ref


@pytest.mark.parametrize("where", ["after training", "under training"])
def test_speed_lora_stacks_with_a_trained_adapter(comfy, data, tmp_path, where):
    speed = community_lora()
    p = train_prompt(tmp_path / "out", steps=2, max_steps=4, rank=4, lr=1e-2)
    p["40"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": _speed_file(comfy, speed, f"speed_{where[:5]}")}}
    p["41"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["6", 4], "lora": ["40", 0], "strength": 0.9,
                                                           "mode": "adapter"}}
    p["42"] = {"class_type": "PreviewAny", "inputs": {"source": ["41", 1]}}   # an output needs the node
    if where == "under training":
        p["41"]["inputs"]["model"] = ["1", 0]
        p["5"]["inputs"]["model"] = ["41", 0]
    comfy.run(p)
    report = comfy.output("41", 1)
    assert "skipped 1 keys" in report and "modulation.diff" in report          # listed, not a refusal
    assert "merged into copy-on-write weights" in report
    assert "loss" in comfy.output("6", 3).lower()

    final = comfy.module("41") if where == "after training" else comfy.module("6", 4)
    stack = [(e["name"], e["mode"]) for e in comfy.pack_module("nodes.lora").lora_stack(final)]
    expected_stack = [("lora", "training"), (f"speed_{where[:5]}", "adapter")]
    assert stack == (expected_stack if where == "after training" else expected_stack[::-1])
    trained = next(net for net in final.__dict__["_musubi_lora_networks"] if net.name != "ref"
                   and not net.name.startswith("musubi-apply"))
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_up" in k)  # it trained
    base = comfy.module("1")
    clean = _probe(base)
    torch.testing.assert_close(_probe(final), _probe(_reference(base, speed, state, 0.9)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_probe(final), clean, atol=1e-3)
    # the loader's shared model stays clean
    ref = tiny_model("t2v")
    ref.load_state_dict({k: v.clone() for k, v in base.state_dict().items()})
    torch.testing.assert_close(clean, _probe(ref), rtol=0, atol=0)
    assert sum(len(m._forward_hooks) for m in base.modules()) == 0


def test_training_on_merged_base_weights_saves_only_the_new_adapter(comfy, data, tmp_path):
    """Musubi's --base_weights in a graph: Apply LoRA (merge) before Init Training. The session trains on the merged
    weights; the saved file holds only the trained adapter, never the merged LoRA."""
    speed = community_lora()
    p = train_prompt(tmp_path / "out", steps=2, max_steps=2, rank=4, lr=1e-2)
    p["40"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": _speed_file(comfy, speed, "speed_merge")}}
    p["41"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["40", 0], "strength": 0.9,
                                                           "mode": "merge"}}
    p["5"]["inputs"]["model"] = ["41", 0]
    comfy.run(p)
    final = comfy.module("6", 4)
    trained = next(net for net in final.__dict__["_musubi_lora_networks"] if net.name == "training")
    state = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    torch.testing.assert_close(_probe(final), _probe(_reference(comfy.module("1"), speed, state, 0.9)),
                               rtol=1e-4, atol=1e-5)
    saved = read_lora(str(tmp_path / "out" / "lora.safetensors"))
    assert set(saved.modules) == set(trained.adapters())
    assert all(mw.kind == "lora" and mw.weight_patch is None and mw.bias_diff is None for mw in saved.modules.values())
