"""The compat module works on the ComfyUI the tests run, and the pack behaves under 0.38's behaviours (emulated):
a throttled progress hook and an interrupt exception deriving from BaseException."""

import gc
import inspect
import importlib
import json

import pytest
import torch

from comfy_harness import REPO_ROOT, ui_to_api

pytestmark = pytest.mark.comfy
T2V = json.loads((REPO_ROOT / "workflows" / "wan_t2v_generate.json").read_text())
SAMPLER_ID = next(str(n["id"]) for n in T2V["nodes"] if n["type"] == "MusubiWanSampler")


def _compat(comfy):
    return comfy.pack_module("nodes.comfy_compat")


def test_every_comfyui_symbol_the_compat_module_uses_exists(comfy):
    compat = _compat(comfy)
    missing = [f"{mod}.{name}" for mod, names in compat.USED_SYMBOLS.items()
               for name in names if not hasattr(importlib.import_module(mod), name)]
    assert not missing, missing
    mm = importlib.import_module("comfy.model_management")
    assert list(inspect.signature(mm.free_memory).parameters)[:2] == ["memory_required", "device"]
    assert "node_id" in inspect.signature(importlib.import_module("comfy.utils").ProgressBar).parameters
    server = importlib.import_module("server")
    assert list(inspect.signature(server.PromptServer.send_progress_text).parameters)[1:3] == ["text", "node_id"]


@pytest.fixture
def t2v_prompt(comfy):
    prompt = ui_to_api(T2V, comfy.input_types())
    prompt[SAMPLER_ID]["inputs"]["steps"] = 8
    return prompt


@pytest.mark.parametrize("emulate", [False, True], ids=["0.3.75", "0.38-emulated"])
def test_cancel_stops_sampling_within_one_step(comfy, t2v_prompt, emulate):
    comfy.cancel_after = (SAMPLER_ID, 2)
    try:
        if emulate:
            with comfy.emulate_038():
                comfy.run(t2v_prompt, expect_success=False)
        else:
            comfy.run(t2v_prompt, expect_success=False)
    finally:
        comfy.cancel_after = None
    assert not comfy.executor.success
    assert comfy.events_of("execution_interrupted"), comfy.server.events[-3:]
    steps_seen = [v for node, v, _ in comfy.progress_calls if node == SAMPLER_ID]
    assert max(steps_seen) <= 3, f"sampling went on after cancel: {steps_seen}"


def test_training_context_leaves_inference_mode_and_restores_in_training(comfy, monkeypatch):
    compat = _compat(comfy)
    mm = comfy.b.mm
    monkeypatch.setattr(mm, "in_training", False, raising=False)  # 0.38 has this flag; emulate it
    with torch.inference_mode():
        made_in_prompt = torch.ones(3)
        with compat.training_context():
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
            assert mm.in_training is True
            w = torch.ones(3, requires_grad=True)
            (compat.unwrap_inference_tensor(made_in_prompt) * w).sum().backward()
            assert torch.equal(w.grad, torch.ones(3))
        assert torch.is_inference_mode_enabled()
    assert mm.in_training is False


def test_make_room_asks_comfyui_before_measuring(comfy, monkeypatch):
    compat = _compat(comfy)
    calls = []
    monkeypatch.setattr(comfy.b.mm, "free_memory", lambda need, dev, *a, **k: calls.append(("free", need, str(dev))))
    monkeypatch.setattr(comfy.b.mm, "soft_empty_cache", lambda *a, **k: calls.append(("empty",)))
    monkeypatch.setattr(comfy.b.mm, "get_free_memory", lambda dev=None, *a, **k: calls.append(("measure",)) or 123)
    assert compat.make_room(1000, "cuda:0") == 123
    assert [c[0] for c in calls] == ["free", "empty", "measure"] and calls[0][1:] == (1000, "cuda:0")
    assert compat.make_room(1000, "cpu") == 0


def test_engine_room_requests_reach_comfyui(comfy, monkeypatch):
    """Inside ComfyUI, the engine's own room requests (block swap loading a block, detaching to the GPU) ask
    ComfyUI to free memory first: the before-move hook is wired to make_room when the pack loads."""
    placement = comfy.pack_module("engine.memory.placement")
    calls = []
    monkeypatch.setattr(comfy.b.mm, "free_memory", lambda need, dev, *a, **k: calls.append((need, str(dev))))
    monkeypatch.setattr(comfy.b.mm, "soft_empty_cache", lambda *a, **k: calls.append("flush"))
    placement.request_room(4096, "cuda:0")
    assert calls == [(4096, "cuda:0")]   # no cache flush per block load


def test_make_video_builds_a_core_video(comfy):
    video = _compat(comfy).make_video(torch.rand(5, 16, 24, 3), 16.0)
    comps = video.get_components()
    assert comps.images.shape == (5, 16, 24, 3) and float(comps.frame_rate) == 16.0


def test_rerun_without_cache_keeps_one_model_in_memory(comfy):
    """ComfyUI 0.38 evicts node outputs under RAM pressure; the pack's registry must prevent a second load."""
    prompt = ui_to_api(T2V, comfy.input_types())
    comfy.run(prompt)
    dit_id = next(str(n["id"]) for n in T2V["nodes"] if n["type"] == "MusubiWanDiTLoader")
    first = comfy.module(dit_id)
    comfy.executor.reset()  # drop every cached output, as RAM-pressure eviction would
    comfy.run(prompt)
    assert comfy.module(dit_id) is first
    gc.collect()
    wan_cls = type(first)
    live = [o for o in gc.get_objects() if type(o) is wan_cls and getattr(o, "source_path", None) == first.source_path]
    assert len(live) == 1


def test_loader_placement_options_decide_whether_models_go_back_to_cpu(comfy, monkeypatch):
    """keep_on_gpu (VAE/encoder loaders) keeps a model on the GPU after use; otherwise it returns to CPU."""
    placement = comfy.pack_module("nodes.placement")
    compat = _compat(comfy)
    monkeypatch.setattr(compat, "torch_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(compat, "make_room", lambda *a, **k: 0)

    handles = comfy.pack_module("engine.handle")

    class Encoder:  # records moves; no real GPU needed
        def __init__(self):
            self.model, self.moves = torch.nn.Linear(2, 2), []

        def to(self, device):
            self.moves.append(str(device))
            return self

    for keep, expected in ((False, ["cuda", "cpu"]), (True, ["cuda"])):
        enc = Encoder()
        with placement.on_compute_device(handles.ModelHandle.of(enc, keep_on_gpu=keep)) as device:
            assert device.type == "cuda"
        assert enc.moves == expected
