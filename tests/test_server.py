"""The server tier: a real `main.py --cpu` with the pack symlinked into custom_nodes."""

import json
import random
import time
import uuid
from pathlib import Path

import pytest
import torch

from comfy_harness import REPO_ROOT, ui_to_api
from engine.training.state import state_run   # (the engine is importable standalone)

pytestmark = pytest.mark.server


def test_object_info_lists_every_pack_node_with_tooltips(comfy_server):
    info = comfy_server.get_json("/object_info")
    pack_nodes = {k: v for k, v in info.items() if k.startswith("Musubi")}
    assert {"MusubiWanDiTLoader", "MusubiWanSampler", "MusubiSaveVideo", "MusubiUnloadModels"} <= set(pack_nodes)
    sampler = pack_nodes["MusubiWanSampler"]
    assert sampler["category"].startswith("Musubi/")
    assert sampler["input"]["required"]["seed"][1]["tooltip"]
    assert sampler["python_module"].startswith("custom_nodes.")


def test_prompt_runs_with_progress_over_websocket_and_history(comfy_server):
    wf = json.loads((REPO_ROOT / "workflows" / "wan_t2v_generate.json").read_text())
    input_types = {k: v["input"] for k, v in comfy_server.get_json("/object_info").items()}
    prompt = ui_to_api(wf, input_types)
    sampler_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "MusubiWanSampler")
    prompt[sampler_id]["inputs"]["seed"] = 4242  # differs from the browser test's run: the server caches outputs
    prompt_id, events, history = comfy_server.run_prompt(prompt, extra_data={"extra_pnginfo": {"workflow": wf}})
    assert history["status"]["status_str"] == "success"
    progress = [e["data"] for e in events if e.get("type") == "progress" and e["data"]["node"] == sampler_id]
    steps = next(n["widgets_values"][3] for n in wf["nodes"] if n["type"] == "MusubiWanSampler")
    assert progress and progress[-1]["value"] == progress[-1]["max"] == steps
    assert any(e.get("type") == "binary" for e in events), "latent previews are sent during sampling"
    save_id = next(str(n["id"]) for n in wf["nodes"] if n["type"] == "MusubiSaveVideo")
    saved = history["outputs"][save_id]["images"][0]
    data = comfy_server.get_bytes(f"/view?filename={saved['filename']}&subfolder={saved['subfolder']}&type=output")
    assert data[4:8] == b"ftyp", "an mp4 file is served"


def test_invalid_prompt_is_rejected_with_the_node_named(comfy_server):
    prompt = {"1": {"class_type": "MusubiWanDiTLoader",
                    "inputs": {"model_name": "no-such-file.safetensors", "dtype": "bf16", "attention": "sdpa"}},
              "2": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                    "passthrough": ["1", 0]}}}
    status, body = comfy_server.post_json("/prompt", {"prompt": prompt, "client_id": "x",
                                                      "prompt_id": str(uuid.uuid4())})
    assert status == 400 and "1" in body["node_errors"]


def test_workflows_are_listed_as_the_packs_templates(comfy_server):
    """ComfyUI's template browser reads `workflows/` too: every shipped workflow and its thumbnail are served."""
    module = REPO_ROOT.name                          # the pack's folder name under custom_nodes
    shipped = sorted(p.stem for p in (REPO_ROOT / "workflows").glob("*.json"))
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(module, [])) == shipped, templates
    for name in shipped:
        served = json.loads(comfy_server.get_bytes(f"/api/workflow_templates/{module}/{name}.json"))
        assert served == json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())
        assert comfy_server.get_bytes(f"/api/workflow_templates/{module}/{name}.jpg")[:3] == b"\xff\xd8\xff"


# --- training across server crashes (#23 items 9 and 10) ----------------------------------------------------------
# The tiny presets and a 2-image 32x32 dataset made in the graph: a step takes ~0.05 s on an idle CPU.
TRAIN = "8"   # the training node (Train LoRA, or Train Steps after Init Training "7")


def training_prompt(output_dir: str, *, steps: int, minutes: float, name: str = "lora", all_in_one: bool = True):
    """Dataset made, cached and trained on in one graph, as a user would queue it; `minutes` is the node's
    save_state_every_minutes."""
    p = {
        "1": {"class_type": "MusubiWanDiTLoader",
              "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa"}},
        "2": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
        "3": {"class_type": "MusubiWanVAELoader",
              "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}},
        "4": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 13378082}},
        # two captions: the data order (shuffled per epoch, part of the saved state) changes what each step sees
        "5": {"class_type": "MusubiDatasetFromImages",
              "inputs": {"images": ["4", 0], "captions": "a red square\na blue square", "width": 32, "height": 32,
                         "num_repeats": 1, "as_video": False, "cache_directory": ""}},
        "6": {"class_type": "MusubiCacheLatents",
              "inputs": {"dataset": ["5", 0], "vae": ["3", 0], "task": "t2v", "keep_cache": False, "workers": 0}},
        "7": {"class_type": "MusubiCacheTextEmbeddings",
              "inputs": {"dataset": ["6", 0], "text_encoder": ["2", 0], "keep_cache": False}},
    }
    common = {"seed": 7, "mixed_precision": "no", "gradient_checkpointing": True, "timestep_sampling": "shift",
              "discrete_flow_shift": 3.0, "output_name": name, "output_dir": output_dir,
              "save_state_every_minutes": minutes}
    if all_in_one:
        p[TRAIN] = {"class_type": "MusubiTrainLoRA", "inputs": {
            "model": ["1", 0], "dataset": ["7", 0], "steps": steps, "network_kind": "lora", "rank": 4, "alpha": 4.0,
            "optimizer_type": "AdamW", "learning_rate": 1e-3, "lr_scheduler": "constant", "save_format": "comfyui",
            **common}}
        p["9"] = {"class_type": "PreviewImage", "inputs": {"images": [TRAIN, 1]}}   # makes Train LoRA run
        return p
    p["10"] = {"class_type": "MusubiLoRAConfig", "inputs": {"network_kind": "lora", "rank": 4, "alpha": 4.0,
                                                            "dropout": 0.2, "rank_dropout": 0.0, "module_dropout": 0.0}}
    p["11"] = {"class_type": "MusubiOptimizerConfig", "inputs": {
        "optimizer_type": "AdamW", "learning_rate": 1e-3, "max_grad_norm": 1.0, "lr_scheduler": "cosine",
        "lr_warmup_steps": "2"}}
    p["12"] = {"class_type": "MusubiInitTraining", "inputs": {
        "model": ["1", 0], "dataset": ["7", 0], "lora_config": ["10", 0], "optimizer_config": ["11", 0],
        "max_train_steps": steps, "gradient_accumulation_steps": 1, "sigmoid_scale": 1.0, "weighting_scheme": "none",
        "min_timestep": 0, "max_timestep": 1000, "save_every_n_steps": 0, "keep_last_n_saves": 0,
        "save_state": False, "attention_backend": "model", "save_format": "comfyui", **common}}
    # steps == max_train_steps: every queue trains to the end, wherever the session (or its saved state) is
    p[TRAIN] = {"class_type": "MusubiTrainSteps", "inputs": {"session": ["12", 0], "steps": steps}}
    p["9"] = {"class_type": "PreviewImage", "inputs": {"images": [TRAIN, 1]}}
    return p


def train_progress(events) -> list[dict]:
    return [e["data"] for e in events if e.get("type") == "progress" and e["data"]["node"] == TRAIN]


def saved_step(state: Path) -> int:
    """The step of the state a continuing session would load (the .pt, not its run.json sidecar)."""
    return int(torch.load(state / "training_state.pt", map_location="cpu", weights_only=True)["step"])


def assert_same_lora(path: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    got, want = load_file(str(path)), load_file(str(reference))
    assert sorted(got) == sorted(want) and got
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, f"{len(different)}/{len(want)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def test_training_killed_by_a_crash_continues_after_the_restart_bit_exactly(restartable_comfy_server):
    """#23 items 1/9: SIGKILL mid-training after a periodic state save, restart, re-queue the same graph: Train
    LoRA continues from the saved step (only the rest is trained) and ends with the uninterrupted run's LoRA; a run
    that had finished before the restart trains nothing and keeps its file."""
    srv, steps = restartable_comfy_server, 40
    out = srv.base / "output" / "t23_restart"
    _, _, history = srv.run_prompt(training_prompt("t23_restart", steps=steps, minutes=10.0, name="reference"))
    assert history["status"]["status_str"] == "success"
    reference = out / "reference.safetensors"
    reference_mtime = reference.stat().st_mtime_ns

    # ~0.5 s between state saves: several saves in a 40-step run, and the kill loses the steps after the last one
    prompt = training_prompt("t23_restart", steps=steps, minutes=0.5 / 60)
    state = out / "lora-state"

    on_disk = {}

    def state_saved_and_trained_past_it(ev) -> bool:
        if ev["type"] != "progress" or ev["data"]["node"] != TRAIN:
            return False
        on_disk.update(state_run(state) or {})
        return "step" in on_disk and ev["data"]["value"] >= on_disk["step"] + 2

    _, events, history = srv.run_prompt(prompt, stop_when=state_saved_and_trained_past_it)
    assert history is None, "training finished before a periodic state save"
    srv.kill()
    saved = saved_step(state)   # (a later periodic save may have landed before the kill)
    assert 0 < on_disk["step"] <= saved < steps and not (out / "lora.safetensors").exists()

    srv.start()
    _, events, history = srv.run_prompt(training_prompt("t23_restart", steps=steps, minutes=0.5 / 60))
    assert history["status"]["status_str"] == "success"
    progress = train_progress(events)
    assert progress and {p["max"] for p in progress} == {steps - saved}, "not continued from the saved step"
    assert progress[-1]["value"] == steps - saved
    assert_same_lora(out / "lora.safetensors", reference)
    assert saved_step(state) == steps

    # the reference finished in the killed server: after the restart its graph trains nothing and keeps its file
    _, events, history = srv.run_prompt(training_prompt("t23_restart", steps=steps, minutes=10.0, name="reference"))
    assert history["status"]["status_str"] == "success"
    assert not train_progress(events), "a finished run was trained again after the restart"
    assert reference.stat().st_mtime_ns == reference_mtime


def test_seeded_chaos_kills_during_training_lose_no_saved_step_and_end_bit_exact(restartable_comfy_server):
    """#23 item 10: SIGKILL at 3 seeded-random moments of a short Init Training + Train Steps run (any point of a
    step or of its state save), restart and re-queue each time: every re-queue continues from the last state, no
    step that was saved is lost, and the run ends with the uninterrupted run's LoRA and no leftover or corrupt file."""
    from safetensors.torch import load_file

    srv, steps, rng = restartable_comfy_server, 30, random.Random(2323)
    output = srv.base / "output"
    # the reference saves no state mid-run (the default 10 minutes): saving must not change the training
    srv.run_prompt(training_prompt("t23_chaos_ref", steps=steps, minutes=10.0, all_in_one=False))
    # a time-based save after every step: the save interval is one step, so at most the step in flight is lost
    prompt = training_prompt("t23_chaos", steps=steps, minutes=1e-6, all_in_one=False)
    out, state = output / "t23_chaos", output / "t23_chaos" / "lora-state"

    start = 0
    for kill in range(3):
        after, phase = rng.randint(2, 6), rng.random()
        seen = []

        def nth_step(ev) -> bool:
            if ev["type"] == "progress" and ev["data"]["node"] == TRAIN:
                seen.append(ev)
            return len(seen) >= after

        _, _, history = srv.run_prompt(prompt, stop_when=nth_step)
        assert history is None and seen[0]["data"]["max"] == steps - start, f"kill {kill}: not continued from {start}"
        # the seeded moment: a random point of the next step or of its state save (a step lasts about as long as
        # the last one did)
        time.sleep(max(0.0, seen[-1]["t"] + phase * (seen[-1]["t"] - seen[-2]["t"]) - time.monotonic()))
        srv.kill()
        last_seen = start + seen[-1]["data"]["value"]
        saved = saved_step(state)
        # each step's state is written before its progress event is sent: a step the user saw is never lost
        assert last_seen <= saved < steps, (kill, last_seen, saved)
        srv.start()
        start = saved

    _, events, history = srv.run_prompt(prompt)
    assert history["status"]["status_str"] == "success"
    assert {p["max"] for p in train_progress(events)} == {steps - start}
    assert_same_lora(out / "lora.safetensors", output / "t23_chaos_ref" / "lora.safetensors")
    assert saved_step(state) == steps and state_run(state)["step"] == steps
    # nothing orphaned (a killed save's hidden .tmp is swept by the next save there, no NAME-run<id>-state of a
    # "different" run) and nothing corrupt
    assert sorted(p.name for p in out.iterdir()) == ["lora-state", "lora.safetensors"]
    assert sorted(p.name for p in state.iterdir()) == ["run.json", "training_state.pt"]
    assert not [p for p in output.rglob("*.tmp")]
    for f in output.rglob("*.safetensors"):
        load_file(str(f))
