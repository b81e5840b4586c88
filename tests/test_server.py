"""The server tier: a real `main.py --cpu` with the pack symlinked into custom_nodes."""

import json
import uuid

import pytest

from comfy_harness import REPO_ROOT, ui_to_api

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
