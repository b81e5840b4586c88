"""Export Training Config in a real ComfyUI: the config it writes runs the graph's training headless, one process or
two gloo ranks, with the graph's losses (the same training the nodes run)."""

from __future__ import annotations

import json

import pytest
import torch

from distributed_runs import history, train
from training_graphs import train_prompt

pytestmark = pytest.mark.comfy


def export_prompt(out_dir, toml, steps: int) -> dict:
    """Init Training (accumulation 2, `steps` steps) + Train Steps on the TOML dataset, and the export of the same
    inputs."""
    p = train_prompt(out_dir, steps=steps, max_steps=steps, rank=4, lr=3e-3)
    p["2"] = {"class_type": "MusubiDatasetFromTOML", "inputs": {"toml_path": str(toml)}}
    p["11"] = {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                             "cache_on_cpu": False}}
    p["12"] = {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["2", 0], "vae": ["11", 0], "task": "t2v",
                                                             "keep_cache": False, "workers": 0}}
    p["13"] = {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}}
    p["14"] = {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["12", 0], "text_encoder": ["13", 0],
                                                                    "keep_cache": False}}
    init = p["5"]["inputs"]
    init.update(dataset=["14", 0], gradient_accumulation_steps=2, save_state_every_minutes=0.0)
    p["8"] = {"class_type": "MusubiExportTrainingConfig",
              "inputs": {**{k: v for k, v in init.items()}, "config_name": "train_config.json"}}
    return p


def test_exported_config_trains_like_the_graph_on_one_and_two_ranks(comfy, tiny_t2v_dataset, tmp_path):
    p = export_prompt(tmp_path / "graph", tiny_t2v_dataset, steps=3)
    comfy.run(p)
    graph_losses = comfy.output("6", 2)["loss"]
    path = comfy.output("8")
    assert path == str(tmp_path / "graph" / "train_config.json")
    config = json.loads((tmp_path / "graph" / "train_config.json").read_text())
    assert config["model"] == {"family": "wan", "path": "preset:tiny-t2v", "dtype": "fp32", "fp8": "none",
                               "attention": "sdpa", "blocks_to_swap": 0, "offload_non_blocks": False,
                               "activation_offload": False}
    assert config["dataset"]["config"] == str(tiny_t2v_dataset.resolve())
    assert config["training"]["gradient_accumulation_steps"] == 2 and config["network"]["rank"] == 4

    for world in (1, 2):
        folder = tmp_path / f"cli{world}"
        folder.mkdir()
        config["training"]["output_dir"] = str(folder / "out")
        config["training"]["lora_dir"] = None
        config["training"]["gradient_accumulation_steps"] = 2 // world   # the same global batch
        (folder / "run.json").write_text(json.dumps(config))
        train(folder / "run.json", world)
        torch.testing.assert_close(torch.tensor(history(folder)), torch.tensor(graph_losses), rtol=1e-5, atol=1e-6)


def test_export_refuses_a_dataset_without_a_toml(comfy, data, tmp_path):
    p = export_prompt(tmp_path / "graph", "unused.toml", steps=1)
    p["8"]["inputs"]["dataset"] = ["2", 0]
    p["2"] = {"class_type": "MusubiTestCachedDataset", "inputs": {"name": "cached"}}
    for node in ("5", "6", "7", "11", "12", "13", "14"):
        p.pop(node)
    comfy.run(p, expect_success=False)
    assert "a dataset read from a TOML file" in comfy.error_message()
