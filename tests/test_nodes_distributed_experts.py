"""A pair of Wan 2.2 A14B experts (Musubi Wan 2.2 Experts, tiny T2V A14B presets) trained on two devices from the
graph in a real ComfyUI: Init Training with devices 'cpu, cpu' (a worker process loads both experts) trains like one
device accumulating two (losses, both LoRA files); Resume Training with devices continues exactly; Export Training
Config writes the pair for the headless trainer; the worker ends with the session."""

from __future__ import annotations

import json

import pytest
import torch

from distributed_runs import history, train
from test_nodes_distributed import export_prompt
from training_graphs import sessions

pytestmark = pytest.mark.comfy
BOUNDARY = 0.6
HIGH, LOW = "preset:tiny-t2v-a14b-high-noise", "preset:tiny-t2v-a14b-low-noise"
FILES = ["lora_high_noise.safetensors", "lora_low_noise.safetensors"]


@pytest.fixture(autouse=True)
def _release_sessions(comfy):
    comfy.pack_module("nodes.registry").SESSIONS.release()
    yield
    comfy.pack_module("nodes.registry").SESSIONS.release()


def pair_export_prompt(out_dir, toml, steps: int, layout: str = "separate") -> dict:
    """test_nodes_distributed's graph (TOML dataset cached in the graph, accumulation 2, export node 8) on a pair:
    1 the low-noise loader, 30 the high-noise one, 31 Musubi Wan 2.2 Experts."""
    p = export_prompt(out_dir, toml, steps)
    p["1"]["inputs"]["model_name"] = LOW
    p["30"] = {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": HIGH, "dtype": "fp32",
                                                              "attention": "sdpa"}}
    p["31"] = {"class_type": "MusubiWan22Experts", "inputs": {"high_noise_model": ["30", 0],
                                                              "low_noise_model": ["1", 0], "boundary": BOUNDARY,
                                                              "memory_mode": "offload"}}
    for node in ("5", "8"):
        p[node]["inputs"].update(model=["31", 0], expert_layout=layout)
    return p


def tensors(folder):
    from safetensors.torch import load_file

    return {name: load_file(str(folder / name)) for name in FILES}


def assert_same_files(got: dict, want: dict) -> None:
    for name in FILES:
        assert list(got[name]) == list(want[name]), name
        for k in want[name]:
            torch.testing.assert_close(got[name][k], want[name][k], rtol=1e-4, atol=1e-6)


def test_a_pair_on_two_devices_trains_like_one_device_accumulating_two(comfy, tiny_t2v_dataset, tmp_path):
    p = pair_export_prompt(tmp_path / "one", tiny_t2v_dataset, steps=4)
    p["5"]["inputs"]["max_train_steps"] = 4
    comfy.run(p)
    reference, reference_files = comfy.output("6", 2)["loss"], tensors(tmp_path / "one")

    # the exported config describes the pair; the headless trainer on two ranks trains it the same way
    config = json.loads((tmp_path / "one" / "train_config.json").read_text())
    model = config["model"]
    assert (model["path"], model["high_path"], model["boundary"], model["expert_layout"], model["expert_mode"]) == \
        (LOW, HIGH, BOUNDARY, "separate", "offload")
    cli = tmp_path / "cli"
    cli.mkdir()
    config["training"].update(output_dir=str(cli / "out"), lora_dir=None, gradient_accumulation_steps=1)
    (cli / "run.json").write_text(json.dumps(config))
    train(cli / "run.json", 2)
    torch.testing.assert_close(torch.tensor(history(cli)), torch.tensor(reference), rtol=1e-5, atol=1e-6)
    assert_same_files(tensors(cli / "out"), reference_files)

    # Init Training with devices: ComfyUI's process is rank 0, a worker loads both experts
    two = pair_export_prompt(tmp_path / "two", tiny_t2v_dataset, steps=4)
    del two["8"]
    two["5"]["inputs"].update(gradient_accumulation_steps=1, devices="cpu, cpu", max_train_steps=4)
    comfy.run(two)
    (run,) = sessions(comfy)
    (worker,) = run.workers.procs
    assert run.pair is not None and run.pair.mode == "offload" and worker.poll() is None
    torch.testing.assert_close(torch.tensor(run.session.history.losses), torch.tensor(reference), rtol=1e-5,
                               atol=1e-6)
    assert_same_files(tensors(tmp_path / "two"), reference_files)
    workers_config = json.loads((tmp_path / "two" / "lora-workers.json").read_text())
    assert workers_config["model"]["high_path"] == HIGH
    registry = comfy.pack_module("nodes.registry").SESSIONS
    registry.release()
    assert worker.wait(30) == 0 and not torch.distributed.is_initialized()


def test_resume_training_a_pair_on_two_devices_continues_exactly(comfy, tiny_t2v_dataset, tmp_path):
    """2 devices to step 2, released (state saved), resumed by Resume Training on 2 devices to step 4: the losses of
    1 device accumulating 2 over 4 steps."""
    p = pair_export_prompt(tmp_path / "one", tiny_t2v_dataset, steps=4, layout="shared")
    del p["8"]
    p["5"]["inputs"]["max_train_steps"] = 4
    comfy.run(p)
    reference = comfy.output("6", 2)["loss"]

    two = pair_export_prompt(tmp_path / "two", tiny_t2v_dataset, steps=2, layout="shared")
    del two["8"]
    two["5"]["inputs"].update(gradient_accumulation_steps=1, devices="cpu, cpu", max_train_steps=2)
    comfy.run(two)
    registry = comfy.pack_module("nodes.registry").SESSIONS
    registry.release()
    assert not torch.distributed.is_initialized()

    two["5"] = {"class_type": "MusubiResumeTraining",
                "inputs": {"model": ["31", 0], "dataset": ["14", 0],
                           "state_path": str(tmp_path / "two" / "lora-state"), "max_train_steps": 4,
                           "devices": "cpu, cpu"}}
    two["6"]["inputs"]["steps"] = 4
    comfy.run(two)
    (run,) = sessions(comfy)
    (worker,) = run.workers.procs
    assert run.session.step == 4 and run.pair.layout == "shared" and worker.poll() is None
    torch.testing.assert_close(torch.tensor(run.session.history.losses), torch.tensor(reference), rtol=1e-5,
                               atol=1e-6)
    registry.release()
    assert worker.wait(30) == 0


def test_devices_refuse_a_pair_whose_loaders_differ(comfy, tiny_t2v_dataset, tmp_path):
    """The worker loads both experts with one set of options: loaders that differ are named before any worker
    starts."""
    p = pair_export_prompt(tmp_path / "two", tiny_t2v_dataset, steps=1)
    del p["8"]
    p["30"]["inputs"]["dtype"] = "bf16"
    p["5"]["inputs"].update(gradient_accumulation_steps=1, devices="cpu, cpu")
    comfy.run(p, expect_success=False)
    message = comfy.error_message()
    assert "devices with a pair of experts: got {'dtype': ('bf16', 'fp32')}" in message, message
    assert "the same loader settings for both experts" in message
    assert not sessions(comfy) and not torch.distributed.is_initialized()
    assert not (tmp_path / "two" / "lora-workers.json").exists()
