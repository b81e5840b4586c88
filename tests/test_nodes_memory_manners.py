"""Memory manners as ComfyUI users expect them: the DiT leaves the GPU after sampling by default, ComfyUI's
"Unload models" / "Free model and node cache" buttons (POST /free) reach the pack's models, and pinned host memory
is declared to newer ComfyUI's free_memory."""

import time
import uuid

import pytest

pytestmark = pytest.mark.comfy


def _t2v(seed, **sampler):
    inputs = {"model": ["1", 0], "embeds": ["5", 0], "width": 32, "height": 32, "frames": 1, "steps": 2,
              "guidance_scale": 1.0, "shift": 0.0, "solver": "euler", "seed": seed, "noise_device": "cpu", **sampler}
    return {
        "1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32",
                                                             "attention": "sdpa"}},
        "2": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
        "5": {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a cat",
                                                              "negative_prompt": "", "offload_after": True}},
        "8": {"class_type": "MusubiWanSampler", "inputs": inputs},
        "9": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "training sessions",
                                                             "passthrough": ["8", 0]}},
    }


def test_sampler_offloads_the_dit_after_use_by_default(comfy, monkeypatch):
    placement = comfy.pack_module("nodes.placement")
    offloaded = []
    monkeypatch.setattr(placement, "offload_dit", lambda m: offloaded.append(m))
    comfy.run(_t2v(31))                              # offload_after not given: the node's default
    assert offloaded and offloaded[-1] is comfy.output("1")
    spec = comfy.b.nodes.NODE_CLASS_MAPPINGS["MusubiWanSampler"].INPUT_TYPES()["optional"]["offload_after"]
    assert spec[1]["default"] is True                # what the frontend puts in a new node
    offloaded.clear()
    comfy.run(_t2v(32, offload_after=False))
    assert offloaded == []


@pytest.mark.parametrize("flags, expected", [({"unload_models": True}, ["offload"]),
                                             ({"free_memory": True}, ["release"]),
                                             ({"unload_models": True, "free_memory": True}, ["release"]),
                                             ({}, [])])
def test_free_flags_reach_the_pack_on_the_worker(comfy, monkeypatch, flags, expected):
    import execution

    utility = comfy.pack_module("nodes.utility")
    calls = []
    monkeypatch.setattr(utility, "unload", lambda mode, what="everything": calls.append(mode) or 0)
    q = execution.PromptQueue(comfy.server)
    for k, v in flags.items():                       # what POST /free does
        q.set_flag(k, v)
    assert q.get_flags() == flags                    # what the worker loop does next
    assert calls == expected
    assert q.get_flags(reset=False) == {} and calls == expected  # peeking is not consuming


def test_pinned_memory_is_declared_where_free_memory_takes_it(comfy, monkeypatch):
    compat = comfy.pack_module("nodes.comfy_compat")
    mm = comfy.b.mm
    calls = []
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: 7)

    def free_038(memory_required, device, keep_loaded=[], for_dynamic=False, pins_required=0, ram_required=0):
        calls.append(("0.38", memory_required, pins_required))

    def free_0375(memory_required, device, keep_loaded=[]):
        calls.append(("0.3.75", memory_required))

    monkeypatch.setattr(mm, "free_memory", free_038)
    assert compat.make_room(100, "cuda:0", pins_required=40) == 7
    monkeypatch.setattr(mm, "free_memory", free_0375)
    assert compat.make_room(100, "cuda:0", pins_required=40) == 7
    assert calls == [("0.38", 100, 40), ("0.3.75", 100)]


def _text(history, node):
    return "".join(history["outputs"][node]["text"])


@pytest.mark.server
def test_free_button_releases_the_packs_models(comfy_server):
    """POST /free {"unload_models", "free_memory"} (the "Free model and node cache" button) on the real server."""
    def load_and_count(what):
        prompt = {"1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-t2v",
                                                                       "dtype": "fp32", "attention": "sdpa"}},
                  "2": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": what,
                                                                       "passthrough": ["1", 0]}}}
        return comfy_server.run_prompt(prompt)[2]

    # the server is shared by the tier's tests: start from an empty registry (what earlier tests loaded is gone)
    comfy_server.run_prompt({"0": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "release",
                                                                                  "what": "everything"}}})
    assert _text(load_and_count("models"), "2") == "offload: 1 object(s)"     # the DiT is in the pack's registry
    status, _ = comfy_server.post_json("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    time.sleep(2)                                    # the worker takes the flags between prompts
    count = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "everything"}}
    history = comfy_server.run_prompt({"3": count})[2]
    assert _text(history, "3") == "offload: 0 object(s)"
