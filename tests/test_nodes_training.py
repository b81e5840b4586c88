"""Training nodes in a real ComfyUI: learning happens (loss falls, samples move toward the training data), re-queueing
neither stacks adapters nor retrains, cancel stops within one step and leaves a state that resumes exactly, and bad
inputs fail before any step with a message naming them.

The dataset comes from a test-only node (`MusubiTestCachedDataset`, registered for this module only) holding a
dataset cached with the tiny VAE/umT5 presets, so these tests do not depend on the dataset nodes' widgets; the
shipped workflow (built from the real dataset nodes) runs in test_workflows.py and here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comfy_harness import REPO_ROOT
from training_graphs import SIZE, networks, sample_nodes, sessions, train_prompt  # noqa: F401

pytestmark = pytest.mark.comfy
WORKFLOW = REPO_ROOT / "workflows" / "wan_train_then_generate.json"


def test_loss_falls_and_the_lora_pulls_samples_toward_the_training_data(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", steps=80)
    sample_nodes(p, ["1", 0], "3")   # the loader's model: no adapter
    sample_nodes(p, ["6", 4], "4")   # Train Steps' model: the trained adapter attached
    comfy.run(p)
    losses = comfy.output("6", 2)["loss"]
    assert len(losses) == 80
    first, last = sum(losses[:15]) / 15, sum(losses[-15:]) / 15
    assert last < 0.75 * first, (first, last)
    status = comfy.output("6", 3)
    assert status.startswith("step 80/200") and "loss" in status and "it/s" in status and "ETA" in status
    assert any(node == "6" for node, _ in comfy.server.texts), "no progress text for the training node"
    curve = comfy.output("6", 1)
    assert curve.shape[0] == 1 and curve.shape[-1] == 3

    base, trained = comfy.module("1"), comfy.module("6", 4)
    assert trained is not base and not networks(base) and list(networks(trained)) == ["training"]
    red = data["latents"][0]  # sorted keys: item00000 = red
    without = comfy.output("31")["samples"][0]
    with_lora = comfy.output("41")["samples"][0]
    mse_without = float(((without - red) ** 2).mean())
    mse_with = float(((with_lora - red) ** 2).mean())
    # the metric: latent MSE of a same-seed sample of the training caption to that caption's training latents
    assert mse_with < 0.7 * mse_without, (mse_with, mse_without)


def test_requeue_continues_the_same_session_and_never_stacks(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", steps=5)
    comfy.run(p)
    (run,) = sessions(comfy)
    model = comfy.module("6", 4)
    assert run.session.step == 5

    comfy.run(p)                 # cached: nothing runs
    comfy.executor.reset()       # RAM-pressure eviction: every node runs again
    comfy.run(p)
    assert sessions(comfy) == [run] and run.session.step == 5, "re-execution after eviction trained again"
    assert comfy.module("6", 4) is model and list(networks(model)) == ["training"]
    assert not networks(comfy.module("1"))

    p["6"]["inputs"]["steps"] = 3  # a changed Train Steps input: N more steps on the same session
    comfy.run(p)
    assert sessions(comfy) == [run] and run.session.step == 8

    p["6"]["inputs"]["train_on_every_queue"] = True  # opt-in: every Queue runs N more steps
    comfy.run(p)
    comfy.run(p)
    assert sessions(comfy) == [run] and run.session.step == 14
    del p["6"]["inputs"]["train_on_every_queue"]

    p["3"]["inputs"]["rank"] = 4   # a changed config: a new session replaces this node's old one
    comfy.run(p)
    (new,) = sessions(comfy)
    assert new is not run and new.session.step == 3
    assert not run.network.is_attached and list(networks(comfy.module("6", 4))) == ["training"]


def test_chained_train_steps_with_validate_between(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", steps=4)
    sample_nodes(p, ["6", 4], "3")
    p["8"] = {"class_type": "MusubiValidate", "inputs": {
        "session": ["6", 0], "vae": ["22", 0], "embeds": ["21", 0], "width": SIZE, "height": SIZE, "frames": 1,
        "steps": 4, "guidance_scale": 1.0, "shift": 0.0, "seed": 3}}
    p["9"] = {"class_type": "MusubiTrainSteps", "inputs": {"session": ["8", 1], "steps": 3}}
    p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 1]}}
    p["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    comfy.run(p)
    assert len(comfy.output("9", 2)["loss"]) == 7
    frames = comfy.output("8", 0)
    assert frames.shape == (1, SIZE, SIZE, 3) and torch.isfinite(frames).all()


def test_training_progress_survives_a_bad_new_config_a_release_and_a_restart(comfy, data, tmp_path):
    """#23: a failing new config leaves the old session intact; a released session saves its steps; a new
    session (after a restart, or after Unload Models) continues from the saved state exactly."""
    comfy.run(train_prompt(tmp_path / "ref", steps=8))
    reference = comfy.output("6", 2)["loss"]

    p = train_prompt(tmp_path / "out", steps=4)
    comfy.run(p)
    (run,) = sessions(comfy)
    assert run.session.step == 4
    bad = train_prompt(tmp_path / "out", steps=4)
    bad["4"]["inputs"]["optimizer_args"] = "betas=(0.9"          # a typo in a new config
    comfy.run(bad, expect_success=False)
    assert "optimizer_args" in comfy.error_message()
    assert sessions(comfy) == [run] and run.session.step == 4 and run.network.is_attached

    comfy.pack_module("nodes.utility").unload("release", "training sessions")   # or a restart after a save
    assert sessions(comfy) == [] and not run.network.is_attached
    comfy.executor.reset()
    comfy.run(p)                                                   # a new session continues at step 4
    (new,) = sessions(comfy)
    assert new is not run and new.session.step == 8
    assert comfy.output("6", 2)["loss"][4:] == reference[4:]      # the same losses as the uninterrupted run

    p["5"]["inputs"]["continue_saved_state"] = False               # the visible choice to start from step 0
    comfy.run(p)
    (fresh,) = sessions(comfy)
    assert fresh.session.step == 4 and fresh.session.history.losses == reference[:4]
    fresh.close()                                                  # behind the saved run: saved beside it
    from engine.training.state import state_run   # (the engine is importable standalone)

    assert state_run(tmp_path / "out" / "lora-state")["step"] == 8
    assert state_run(tmp_path / "out" / f"lora-run{fresh.session.session_id}-state")["step"] == 4


def test_two_workflows_sharing_the_training_node_id_continue_their_own_steps(comfy, data, tmp_path):
    """#23 item 1: two graphs (other output names and seeds) whose Init Training has the same node id, queued in
    turn: each queue replaces the other graph's session, which saves first, and continues its own graph's steps
    from its state, with the losses of that graph run alone; neither starts again from step 0."""
    def graph(name, seed, out, steps):
        p = train_prompt(out, steps=steps, seed=seed, dropout=0.2)   # dropout: the global RNG must continue too
        p["5"]["inputs"]["output_name"] = name
        return p

    alone = {}
    for name, seed in (("a", 1), ("b", 2)):
        comfy.run(graph(name, seed, tmp_path / "alone", 6))
        alone[name] = comfy.output("6", 2)["loss"]
    assert alone["a"] != alone["b"]

    shared = tmp_path / "shared"
    a, b = graph("a", 1, shared, 3), graph("b", 2, shared, 3)
    for p, name, step in ((a, "a", 3), (b, "b", 3), (a, "a", 6), (b, "b", 6)):
        comfy.run(p)
        (run,) = sessions(comfy)   # one session per node id: the other graph's was replaced
        assert (run.session.config.output_name, run.session.step) == (name, step)
        assert comfy.output("6", 2)["loss"] == alone[name][:step], f"{name} at step {step}"
    comfy.pack_module("nodes.registry").SESSIONS.release()
    from engine.training.state import state_run   # (the engine is importable standalone)

    assert sorted(f.name for f in shared.iterdir()) == ["a-state", "b-state"], "a state saved beside another run's"
    assert state_run(shared / "a-state")["step"] == state_run(shared / "b-state")["step"] == 6


def test_two_train_lora_workflows_sharing_a_node_id_never_retrain_a_finished_run(comfy, data, tmp_path):
    """#23 item 1: Train LoRA A, then B with the same node id (B's session replaces A's), then A again: A's run is
    found finished in its state, trains nothing and keeps its file."""
    def graph(name):
        return {
            "1": train_prompt(tmp_path)["1"], "2": train_prompt(tmp_path)["2"],
            "3": {"class_type": "MusubiTrainLoRA", "inputs": {
                "model": ["1", 0], "dataset": ["2", 0], "steps": 3, "network_kind": "lora", "rank": 4, "alpha": 4.0,
                "optimizer_type": "AdamW", "learning_rate": 1e-3, "lr_scheduler": "constant", "seed": 0,
                "mixed_precision": "no", "gradient_checkpointing": False, "timestep_sampling": "shift",
                "discrete_flow_shift": 3.0, "output_name": name, "save_format": "comfyui",
                "output_dir": str(tmp_path / "aio")}},
            "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        }

    files = {}
    for name in ("x", "y"):
        comfy.run(graph(name))
        assert [v for node, v, _ in comfy.progress_calls if node == "3"] == [1, 2, 3]
        files[name] = Path(comfy.output("3", 2))
    written = {name: f.stat().st_mtime_ns for name, f in files.items()}
    for name in ("x", "y"):
        comfy.run(graph(name))
        assert not [c for c in comfy.progress_calls if c[0] == "3"], f"{name} was trained again"
        assert Path(comfy.output("3", 2)) == files[name] and files[name].stat().st_mtime_ns == written[name]


@pytest.mark.parametrize("emulate", [False, True], ids=["0.3.75", "0.38-emulated"])
def test_cancel_stops_within_one_step_and_resume_is_exact(comfy, data, tmp_path, emulate):
    # with dropout: the resumed run must also continue the global RNG stream the dropout masks come from
    total = 12
    comfy.run(train_prompt(tmp_path / "ref", steps=total, dropout=0.3))
    reference = comfy.output("6", 2)["loss"]

    p = train_prompt(tmp_path / "cut", steps=total, dropout=0.3)
    comfy.cancel_after = ("6", 4)
    try:
        if emulate:
            with comfy.emulate_038():
                comfy.run(p, expect_success=False)
        else:
            comfy.run(p, expect_success=False)
    finally:
        comfy.cancel_after = None
    assert not comfy.executor.success and comfy.events_of("execution_interrupted")
    seen = [v for node, v, _ in comfy.progress_calls if node == "6"]
    assert max(seen) <= 5, f"training went on after cancel: {seen}"
    state = tmp_path / "cut" / "lora-state"
    saved = torch.load(state / "training_state.pt", weights_only=True)
    done = int(saved["step"])
    # the cancel is seen at the next per-step check: the step in flight when it was pressed completes, no more
    assert max(seen) <= done <= 5 and saved["history"]["losses"] == reference[:done]

    resume = {
        "1": train_prompt(tmp_path)["1"], "2": train_prompt(tmp_path)["2"],
        "5": {"class_type": "MusubiResumeTraining", "inputs": {"model": ["1", 0], "dataset": ["2", 0],
                                                              "state_path": str(state)}},
        "6": {"class_type": "MusubiTrainSteps", "inputs": {"session": ["5", 0], "steps": total - done}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}},
    }
    comfy.run(resume)
    assert comfy.output("6", 2)["loss"] == reference


def test_same_seed_samples_after_training_with_dropout_are_identical(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", steps=4, dropout=0.5)
    sample_nodes(p, ["6", 4], "3")
    sample_nodes(p, ["6", 4], "4")   # the same sampler inputs again, as a second node
    sample_nodes(p, ["1", 0], "5")   # the base model: the adapter must matter for the comparison to mean anything
    comfy.run(p)
    first, second = comfy.output("31")["samples"], comfy.output("41")["samples"]
    assert torch.equal(first, second), float((first - second).abs().max())
    assert not torch.allclose(first, comfy.output("51")["samples"])
    assert networks(comfy.module("6", 4))["training"].training is False


def test_train_lora_all_in_one_and_save_trained_lora(comfy, data, tmp_path):
    p = {
        "1": train_prompt(tmp_path)["1"], "2": train_prompt(tmp_path)["2"],
        "3": {"class_type": "MusubiTrainLoRA", "inputs": {
            "model": ["1", 0], "dataset": ["2", 0], "steps": 6, "network_kind": "lora", "rank": 4, "alpha": 4.0,
            "optimizer_type": "AdamW", "learning_rate": 1e-3, "lr_scheduler": "constant", "seed": 0,
            "mixed_precision": "no", "gradient_checkpointing": False, "timestep_sampling": "shift",
            "discrete_flow_shift": 3.0, "output_name": "aio", "save_format": "comfyui",
            "output_dir": str(tmp_path / "aio")}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    comfy.run(p)
    path = Path(comfy.output("3", 2))
    assert path == tmp_path / "aio" / "aio.safetensors" and path.is_file()
    assert list(networks(comfy.module("3", 0))) == ["training"]

    q = train_prompt(tmp_path / "out", steps=2)
    q["8"] = {"class_type": "MusubiSaveTrainedLoRA", "inputs": {
        "session": ["6", 0], "format": "musubi", "filename_prefix": "loras/trained", "dtype": "fp32",
        "save_to": "output"}}
    comfy.run(q)
    lora, saved = comfy.output("8", 0), Path(comfy.output("8", 1))
    assert saved.is_file() and saved.name.startswith("trained_") and len(lora.modules) > 0
    assert lora.dialect.startswith("musubi")


@pytest.mark.parametrize("case", ["sage", "not cached", "not writable"])  # rank/lr 0: refused when queued (test_nodes_checks)
def test_bad_inputs_fail_before_training_naming_the_input(comfy, data, tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    kw, expect = {
        "sage": ({"attention": "sage"}, "attention_backend"),
        "not cached": ({"dataset": "uncached"}, "no latent cache"),
        "not writable": ({}, "output_dir"),
    }[case]
    out = blocker / "sub" if case == "not writable" else tmp_path / "out"
    before = {id(r) for r in sessions(comfy)}
    comfy.run(train_prompt(out, **kw), expect_success=False)
    assert not comfy.executor.success
    message = comfy.error_message()
    assert expect in message, message
    assert {id(r) for r in sessions(comfy)} <= before, "a session was created despite the error"
    assert not [c for c in comfy.progress_calls if c[0] == "6"], "training started"


@pytest.mark.skipif(not WORKFLOW.is_file(), reason="workflow not built yet")
def test_train_then_generate_workflow(comfy, data):
    wf = json.loads(WORKFLOW.read_text())
    result = comfy.run_workflow(wf)
    by_type = {}
    for n in wf["nodes"]:
        by_type.setdefault(n["type"], []).append(str(n["id"]))
    (train,) = by_type["MusubiTrainSteps"]
    losses = comfy.output(train, 2)["loss"]
    assert len(losses) >= 20 and sum(losses[-5:]) < sum(losses[:5])
    (sampler,) = by_type["MusubiWanSampler"]
    model = comfy.module(by_type["MusubiWanDiTLoader"][0])
    assert not networks(model)
    saved = comfy.output(by_type["MusubiSaveTrainedLoRA"][0], 1)
    assert Path(saved).is_file()
    assert result["outputs"]


def test_trained_loras_land_where_the_lora_pickers_look(comfy, data):
    """Default output_dir: Train LoRA's file is in models/loras/musubi and listed by core and pack LoRA loaders; the
    training state (a .pt) stays out of models/loras. Save Trained LoRA saves to models/loras by default."""
    p = {
        "1": train_prompt("x")["1"], "2": train_prompt("x")["2"],
        "3": {"class_type": "MusubiTrainLoRA", "inputs": {
            "model": ["1", 0], "dataset": ["2", 0], "steps": 2, "network_kind": "lora", "rank": 4, "alpha": 4.0,
            "optimizer_type": "AdamW", "learning_rate": 1e-3, "lr_scheduler": "constant", "seed": 0,
            "mixed_precision": "no", "gradient_checkpointing": False, "timestep_sampling": "shift",
            "discrete_flow_shift": 3.0, "output_name": "t23_picker", "save_format": "comfyui"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
    }
    comfy.run(p)
    loras = Path(comfy.b.folder_paths.get_folder_paths("loras")[0])
    assert Path(comfy.output("3", 2)) == loras / "musubi" / "t23_picker.safetensors"
    listed = comfy.b.folder_paths.get_filename_list("loras")
    assert "musubi/t23_picker.safetensors" in listed
    assert "musubi/t23_picker.safetensors" in comfy.b.nodes.LoraLoaderModelOnly.INPUT_TYPES()["required"]["lora_name"][0]
    assert "musubi/t23_picker.safetensors" in comfy.input_types()["MusubiLoadLoRA"]["required"]["lora_name"][0]
    assert not [f for f in listed if f.endswith(".pt")], "training states must not show up as LoRAs"

    spec = comfy.input_types()["MusubiSaveTrainedLoRA"]["required"]
    q = train_prompt(None, steps=1)
    q["5"]["inputs"]["output_dir"] = ""
    q["5"]["inputs"]["output_name"] = "t23_picker_session"
    q["8"] = {"class_type": "MusubiSaveTrainedLoRA", "inputs": {
        "session": ["6", 0], "format": "comfyui", "dtype": "bf16",
        "filename_prefix": spec["filename_prefix"][1]["default"], "save_to": spec["save_to"][1]["default"]}}
    comfy.run(q)
    saved = Path(comfy.output("8", 1))
    assert saved.parent.resolve().is_relative_to(loras.resolve())
    assert saved.relative_to(loras).as_posix() in comfy.b.folder_paths.get_filename_list("loras")


def test_save_trained_lora_writes_no_second_copy_when_its_output_was_evicted(comfy, data, tmp_path):
    """Issue 23 item 7: ComfyUI (RAM-pressure cache) drops outputs and re-runs nodes; the same adapter is not saved
    again under the next number. A changed adapter still gets its own file."""
    p = train_prompt(tmp_path / "dedupe", steps=2)
    p["8"] = {"class_type": "MusubiSaveTrainedLoRA", "inputs": {
        "session": ["6", 0], "format": "comfyui", "filename_prefix": "t23_dedupe/lora", "dtype": "bf16",
        "save_to": "output"}}
    comfy.run(p)
    first = Path(comfy.output("8", 1))
    folder = first.parent
    comfy.executor.reset()                       # every cached output evicted, as RAM pressure would
    comfy.run(p)
    assert Path(comfy.output("8", 1)) == first
    assert sorted(f.name for f in folder.iterdir()) == [first.name]
    p["6"]["inputs"]["steps"] = 3                # trains on: a different adapter
    comfy.run(p)
    second = Path(comfy.output("8", 1))
    assert second != first and sorted(f.name for f in folder.iterdir()) == sorted([first.name, second.name])


def test_cancel_inside_a_long_accumulation_step_keeps_the_last_step_and_requeue_is_exact(comfy, data, tmp_path,
                                                                                       monkeypatch):
    """8 micro-batches per optimizer step (minutes each on a 14B model): cancel is seen at the next micro-batch,
    the saved state is the last completed step, and re-queueing continues the session in memory exactly."""
    def prompt(out):
        p = train_prompt(out, steps=3, dropout=0.3)
        p["5"]["inputs"]["gradient_accumulation_steps"] = 8
        return p

    comfy.run(prompt(tmp_path / "ref"))
    reference = comfy.output("6", 2)["loss"]
    family = comfy.pack_module("engine.families.wan.family").FAMILY
    original, calls = type(family).training_forward, []

    def pressing_cancel(*args, **kw):   # the user presses cancel during micro-batch 2 of step 2
        calls.append(1)
        if len(calls) == 10:
            comfy.b.mm.interrupt_current_processing(True)
        return original(*args, **kw)

    monkeypatch.setattr(type(family), "training_forward", staticmethod(pressing_cancel))
    p = prompt(tmp_path / "cut")
    comfy.run(p, expect_success=False)
    assert not comfy.executor.success and comfy.events_of("execution_interrupted")
    assert len(calls) == 10, "the micro-batches after the cancel still ran"
    saved = torch.load(tmp_path / "cut" / "lora-state" / "training_state.pt", weights_only=True)
    assert int(saved["step"]) == 1 and saved["history"]["losses"] == reference[:1]
    comfy.run(p)                         # re-queue: the session in memory continues from step 1
    assert comfy.output("6", 2)["loss"] == reference


def test_eval_loss_on_a_held_out_dataset_is_logged_beside_the_training_loss(comfy, data, tmp_path):
    plain = train_prompt(tmp_path / "plain", steps=4)
    comfy.run(plain)
    reference = comfy.output("6", 2)["loss"]

    p = train_prompt(tmp_path / "eval", steps=4)
    p["8"] = {"class_type": "MusubiTestCachedDataset", "inputs": {"name": "cached"}}
    p["5"]["inputs"].update(eval_dataset=["8", 0], eval_every_n_steps=2)
    comfy.run(p)
    loss_map = comfy.output("6", 2)
    assert loss_map["loss"] == reference            # measuring changes nothing in training
    assert len(loss_map["eval_loss"]) == 2 and all(v > 0 for v in loss_map["eval_loss"])
    assert "eval loss" in comfy.output("6", 3)
    (run,) = [r for r in sessions(comfy) if r.session.config.output_dir == str(tmp_path / "eval")]
    assert run.session.history.eval_steps == [2, 4]
    assert run.session.evaluate() == loss_map["eval_loss"][-1]   # fixed timesteps and noise: the same value again

    p["5"]["inputs"]["eval_every_n_steps"] = 3      # an eval input changes: the same session goes on, not a new one
    p["6"]["inputs"]["steps"] = 2
    batches = run.session.evaluation.batches
    comfy.run(p)
    assert run.session.evaluation.batches is batches   # the held-out batches were not read again
    assert [r for r in sessions(comfy) if r.session.config.output_dir == str(tmp_path / "eval")] == [run]
    assert comfy.output("6", 2)["loss"][:4] == reference
    assert run.session.history.eval_steps[-1] == 6


def test_the_engines_schedule_and_timestep_options_from_the_graph(comfy, data, tmp_path):
    """#19 item 4: epochs, save every N epochs, LoRA+, WSD decay and the timestep-distribution options are inputs
    and reach the session (their arithmetic is tested in the engine tests)."""
    p = train_prompt(tmp_path / "out", steps=1000, max_steps=1000, lr=1e-3)
    p["4"]["inputs"].update({"lr_scheduler": "warmup_stable_decay", "lr_warmup_steps": "0", "lr_decay_steps": "50%",
                             "lr_scheduler_min_lr_ratio": 0.1, "loraplus_lr_ratio": 4.0})
    p["5"]["inputs"].update({"max_train_epochs": 2, "save_every_n_epochs": 1, "timestep_sampling": "logsnr",
                             "logit_mean": -0.5, "logit_std": 1.5, "mode_scale": 1.1, "min_timestep": 100,
                             "preserve_distribution_shape": True, "num_timestep_buckets": 4,
                             "checkpoint_dtype": "float32", "offload_optimizer_state": True})
    comfy.run(p)
    (run,) = [r for r in sessions(comfy) if r.session.config.output_dir == str(tmp_path / "out")]
    s = run.session
    ts = s.config.timesteps
    assert (ts.logit_mean, ts.logit_std, ts.mode_scale) == (-0.5, 1.5, 1.1)
    assert ts.preserve_distribution_shape and ts.num_timestep_buckets == 4 and ts.min_timestep == 100
    assert s.config.checkpoint_dtype == "float32" and s.config.offload_optimizer_state
    per_epoch = len(s.loader)
    assert s.total_steps == 2 * per_epoch and s.step == s.total_steps      # epochs win over max_train_steps
    out = tmp_path / "out"
    # as Musubi: every N-th epoch but the last, which is the final file
    assert sorted(f.name for f in out.glob("*.safetensors")) == ["lora-000001.safetensors", "lora.safetensors"]
    lrs = sorted(g["lr"] for g in s.optimizer.param_groups)
    assert lrs[-1] == pytest.approx(4 * lrs[0])                              # LoRA+: up matrices × 4
    assert lrs[0] == pytest.approx(1e-3 * 0.1, rel=0.05)                    # WSD decayed to its floor


@pytest.mark.parametrize("field, value", [("num_timestep_buckets", 1), ("lr_decay_steps", "soon")])
def test_bad_advanced_training_inputs_are_refused_by_name(comfy, data, tmp_path, field, value):
    p = train_prompt(tmp_path / "out", steps=1)
    p["5" if field == "num_timestep_buckets" else "4"]["inputs"][field] = value
    comfy.run(p, expect_success=False)
    assert field in comfy.error_message()


def test_lora_config_network_weights_continues_a_saved_loha(comfy, data, tmp_path):
    """LoRA Config's network_weights with a LyCORIS kind: the new session starts from the saved LoHa's weights."""
    p = train_prompt(tmp_path / "first", steps=2, max_steps=2, rank=4)
    p["3"]["inputs"]["network_kind"] = "loha"
    comfy.run(p)
    (first,) = [r for r in sessions(comfy) if r.session.config.output_dir == str(tmp_path / "first")]
    saved = {k: v.clone() for k, v in first.session.network.state_dict().items()}

    q = train_prompt(tmp_path / "second", rank=4, train_node=False)   # the session, no step
    q["3"]["inputs"].update(network_kind="loha", network_weights=str(tmp_path / "first" / "lora.safetensors"))
    comfy.run(q)
    (second,) = [r for r in sessions(comfy) if r.session.config.output_dir == str(tmp_path / "second")]
    assert second.session.step == 0
    for k, v in second.session.network.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
