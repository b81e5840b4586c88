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
                               "fp8_matmul": False, "fp8_scale_dtype": "float32", "attention": "sdpa",
                               "blocks_to_swap": 0, "offload_non_blocks": False, "activation_offload": False,
                               "compile_blocks": False}
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


def test_two_devices_from_the_graph_train_like_one_accumulating_two(comfy, tiny_t2v_dataset, tmp_path):
    """Init Training with devices 'cpu, cpu': a worker process is rank 1. Losses of 2 ranks × accumulation 1 ==
    1 device × accumulation 2; a cancel stops both ranks and the re-queued graph continues exactly; a killed
    worker is named on the node; releasing the session ends the worker."""
    import os
    import signal

    from training_graphs import sessions

    comfy.run(export_prompt(tmp_path / "one", tiny_t2v_dataset, steps=6))
    reference = comfy.output("6", 2)["loss"]

    p = export_prompt(tmp_path / "two", tiny_t2v_dataset, steps=6)
    del p["8"]
    p["5"]["inputs"].update(gradient_accumulation_steps=1, devices="cpu, cpu", max_train_steps=50)
    comfy.cancel_after = ("6", 2)
    try:
        comfy.run(p, expect_success=False)
    finally:
        comfy.cancel_after = None
    assert comfy.events_of("execution_interrupted")
    (run,) = sessions(comfy)
    (worker,) = run.workers.procs
    assert worker.poll() is None                                   # the worker waits for the next command
    done = run.session.step
    assert 2 <= done < 6 and run.session.history.losses == pytest.approx(reference[:done], rel=1e-5)

    comfy.run(p)                                                   # continues the session in memory
    assert run.session.step == 6
    torch.testing.assert_close(torch.tensor(run.session.history.losses), torch.tensor(reference), rtol=1e-5,
                               atol=1e-6)
    assert sorted(f.name for f in (tmp_path / "two").glob("lora-rank*.log")) == ["lora-rank1.log"]

    registry = comfy.pack_module("nodes.registry").SESSIONS
    registry.release()                                             # the worker is told to close, and does
    assert worker.wait(30) == 0 and run.workers.closed and not torch.distributed.is_initialized()

    comfy.executor.reset()   # ComfyUI's cache would skip the nodes: run them again
    comfy.run(p)   # a new session: rank 0 and a new worker continue from the state saved at step 6, 6 more steps
    (run,) = sessions(comfy)
    (worker,) = run.workers.procs
    assert run.session.step == 12 and worker.poll() is None
    assert run.session.history.losses[:6] == pytest.approx(reference, rel=1e-5)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    p["6"]["inputs"]["steps"] = 8
    comfy.run(p, expect_success=False)
    assert "the worker for cpu (rank 1) ended" in comfy.error_message(), comfy.error_message()
    # the session with a lost rank is gone: the worker group closed, the process group destroyed
    assert run.workers.closed and not sessions(comfy) and not torch.distributed.is_initialized()


def test_an_error_on_rank_0_mid_step_ends_the_workers_at_once(comfy, tiny_t2v_dataset, tmp_path, monkeypatch):
    """Rank 0 fails inside a step (here: its forward raises) while the worker waits in that step's all-reduce: the
    worker must never pair that wait with a later step. The workers are ended (closing the group ends the wait) and
    the session released, so the next queue starts afresh from the saved state."""
    import time

    from training_graphs import sessions

    family = comfy.pack_module("engine.families.wan.family").FAMILY
    original, calls = type(family).training_forward, []

    def failing(model, batch, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("rank 0 broke")
        return original(model, batch, *args)

    monkeypatch.setattr(type(family), "training_forward", staticmethod(failing))
    workers = comfy.pack_module("engine.training.workers").WorkerGroup
    started, start_group = [], workers.start.__func__

    def recording(cls, *args, **kw):
        started.append(start_group(cls, *args, **kw))
        return started[-1]

    monkeypatch.setattr(workers, "start", classmethod(recording))
    p = export_prompt(tmp_path / "two", tiny_t2v_dataset, steps=4)
    del p["8"]
    p["5"]["inputs"].update(gradient_accumulation_steps=1, devices="cpu, cpu")
    start = time.monotonic()
    comfy.run(p, expect_success=False)
    assert "rank 0 broke" in comfy.error_message()
    assert not sessions(comfy) and not torch.distributed.is_initialized()
    assert time.monotonic() - start < 20                      # no 30 s wait for a worker stuck in a collective
    assert all(p.poll() is not None for p in started[0].procs)   # no process left behind
    state = torch.load(tmp_path / "two" / "lora-state" / "training_state.pt", weights_only=True)
    assert state["step"] == 2


def test_resume_training_on_two_devices_continues_exactly(comfy, tiny_t2v_dataset, tmp_path):
    """Resume Training with devices 'cpu, cpu' from the state of a 2-device run (its worker is rank 1 and resumes
    from the same state): the losses of the uninterrupted run, 1 device accumulating 2."""
    from training_graphs import sessions

    comfy.run(export_prompt(tmp_path / "one", tiny_t2v_dataset, steps=6))
    reference = comfy.output("6", 2)["loss"]

    p = export_prompt(tmp_path / "two", tiny_t2v_dataset, steps=3)
    del p["8"]
    p["5"]["inputs"].update(gradient_accumulation_steps=1, devices="cpu, cpu", max_train_steps=3)
    comfy.run(p)
    registry = comfy.pack_module("nodes.registry").SESSIONS
    registry.release()                                             # the state of step 3 is written, the worker ends
    assert not torch.distributed.is_initialized()

    p["5"] = {"class_type": "MusubiResumeTraining",
              "inputs": {"model": ["1", 0], "dataset": ["14", 0], "state_path": str(tmp_path / "two" / "lora-state"),
                         "max_train_steps": 6, "devices": "cpu, cpu"}}
    comfy.run(p)
    (run,) = sessions(comfy)
    (worker,) = run.workers.procs
    assert run.session.step == 6 and worker.poll() is None
    torch.testing.assert_close(torch.tensor(run.session.history.losses), torch.tensor(reference), rtol=1e-5,
                               atol=1e-6)
    config = json.loads((tmp_path / "two" / "lora-workers.json").read_text())
    assert config["run"]["resume_from"] == str(tmp_path / "two" / "lora-state")
    registry.release()
    assert worker.wait(30) == 0
