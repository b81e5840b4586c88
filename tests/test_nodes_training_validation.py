"""Sampling during training and TensorBoard, driven from the nodes in a real ComfyUI: Init Training's validation
prompts are sampled every N steps with the in-memory model + adapter and shown as Train Steps' preview and `samples`
output, sampling never changes the training's losses, TensorBoard event files hold the loss, and bad validation
inputs fail before any session exists with a message naming the input.

The cached tiny dataset and the prompt builder come from test_nodes_training.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from training_graphs import SIZE, sessions, train_prompt

pytestmark = pytest.mark.comfy


def add_validation(p: dict, *, every=2, at_start=False, tensorboard=False, prompts=True, vae=True) -> None:
    """Two chained Validation Prompts (32x32 and 48x48, 1 frame) on Init Training (node 5); samples previewed."""
    p["20"] = {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}}
    p["21"] = {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["20", 0], "prompt": "a red square",
                                                               "negative_prompt": "", "offload_after": True}}
    p["22"] = {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                              "cache_on_cpu": False}}
    common = {"embeds": ["21", 0], "frames": 1, "seed": 3, "steps": 3, "guidance_scale": 1.0, "shift": 0.0}
    p["30"] = {"class_type": "MusubiValidationPrompt", "inputs": {**common, "width": SIZE, "height": SIZE}}
    p["31"] = {"class_type": "MusubiValidationPrompt",
               "inputs": {**common, "width": 48, "height": 48, "validation_prompts": ["30", 0]}}
    init = p["5"]["inputs"]
    init.update({"validate_every_n_steps": every, "validate_at_start": at_start, "tensorboard": tensorboard})
    if prompts:
        init["validation_prompts"] = ["31", 0]
    if vae:
        init["validation_vae"] = ["22", 0]
    if "6" in p:
        p["8"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 5]}}


class PreviewRecorder:
    """Wraps the harness's progress hook to also record the preview images the nodes send."""

    def __init__(self, comfy):
        self.comfy, self.previews = comfy, []

    def hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        node = node_id or (ctx.node_id if ctx is not None else None)
        if preview_image is not None:
            self.previews.append((str(node), int(value), preview_image[1]))
        return self.comfy._progress_hook(value, total, preview_image, prompt_id, node_id)

    def __enter__(self):
        self.comfy.b.comfy_utils.set_progress_bar_global_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.comfy.b.comfy_utils.set_progress_bar_global_hook(self.comfy._progress_hook)


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file under `folder` (TFRecord framing, tensorboardX's Event proto)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        raw, pos = f.read_bytes(), 0
        while pos + 12 <= len(raw):
            (n,) = struct.unpack("<Q", raw[pos:pos + 8])
            pos += 12                                     # length + its masked CRC
            event = event_pb2.Event()
            event.ParseFromString(raw[pos:pos + n])
            pos += n + 4                                  # data + its masked CRC
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":
                    out.setdefault(v.tag, []).append((int(event.step), float(v.simple_value)))
    return out


def test_validation_every_2_steps_previews_samples_and_leaves_losses_unchanged(comfy, data, tmp_path):
    steps = 4
    comfy.run(train_prompt(tmp_path / "plain", steps=steps))
    reference = comfy.output("6", 2)["loss"]
    black = comfy.output("6", 5)
    assert black.shape == (1, 64, 64, 3) and not black.any(), "no validation: a black placeholder"
    assert not (tmp_path / "plain" / "logs").exists(), "TensorBoard is off by default"

    p = train_prompt(tmp_path / "val", steps=steps)
    add_validation(p, every=2, tensorboard=True)
    with PreviewRecorder(comfy) as rec:
        comfy.run(p)

    assert comfy.output("6", 2)["loss"] == reference, "sampling during training changed the training"
    (run,) = sessions(comfy)
    assert run.session.step == steps
    assert len(run.session.last_samples) == 2

    samples = comfy.output("6", 5)
    assert samples.shape == (2, SIZE, SIZE, 3), samples.shape  # both prompts, the 48x48 one resized to the first's
    assert torch.isfinite(samples).all() and samples.min() >= 0 and samples.max() <= 1 and samples.std() > 0.01

    # each decoded sample is the node's preview (its first frame at the prompt's size), at steps 2 and 4
    sample_previews = [(v, img.size) for node, v, img in rec.previews
                       if node == "6" and img.size in ((SIZE, SIZE), (48, 48))]
    assert sample_previews == [(2, (SIZE, SIZE)), (2, (48, 48)), (4, (SIZE, SIZE)), (4, (48, 48))], sample_previews
    texts = [t for node, t in comfy.server.texts if node == "6"]
    assert any("validation sample 2/2" in t for t in texts), texts

    # TensorBoard: <output_dir>/logs/<name>_<time>/events.out.tfevents.* with the loss of every step
    logs = tmp_path / "val" / "logs"
    assert list(logs.rglob("events.out.tfevents.*")), f"no event files under {logs}"
    scalars = read_scalars(logs)
    assert [s for s, _ in scalars["loss/current"]] == list(range(1, steps + 1))
    assert [v for _, v in scalars["loss/current"]] == pytest.approx(reference, rel=1e-6)
    assert "lr/unet" in scalars and "loss/average" in scalars


def test_validate_at_start_and_switching_validation_keeps_the_session(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", steps=2)
    add_validation(p, every=0, at_start=False)
    comfy.run(p)
    (run,) = sessions(comfy)
    assert run.session.step == 2 and run.session.validation is None
    assert not comfy.output("6", 5).any()

    # turning validation (and TensorBoard) on applies to the running session: no new session, training continues
    p["5"]["inputs"].update({"validate_every_n_steps": 3, "tensorboard": True})
    p["6"]["inputs"]["steps"] = 1
    comfy.run(p)
    assert sessions(comfy) == [run] and run.session.step == 3
    assert comfy.output("6", 5).shape == (2, SIZE, SIZE, 3), "step 3 is a validation step"
    assert read_scalars(tmp_path / "out" / "logs")["loss/current"][-1][0] == 3

    # validate_at_start on a fresh session: samples of the untrained adapter before the first step
    q = train_prompt(tmp_path / "fresh", steps=1, seed=7)
    add_validation(q, every=0, at_start=True)
    comfy.run(q)
    (fresh,) = sessions(comfy)
    assert fresh is not run and fresh.session.step == 1
    assert comfy.output("6", 5).shape == (2, SIZE, SIZE, 3)


def test_cancel_during_validation_stops_and_saves_the_last_step(comfy, data, tmp_path):
    comfy.run(train_prompt(tmp_path / "ref", steps=3))
    reference = comfy.output("6", 2)["loss"]

    p = train_prompt(tmp_path / "cut", steps=3)
    add_validation(p, every=1)
    comfy.cancel_after = ("6", 1)  # the first progress of Train Steps: the first validation preview, after step 1
    try:
        comfy.run(p, expect_success=False)
    finally:
        comfy.cancel_after = None
    assert not comfy.executor.success and comfy.events_of("execution_interrupted")
    saved = torch.load(tmp_path / "cut" / "lora-state" / "training_state.pt", weights_only=True)
    assert int(saved["step"]) == 1 and saved["history"]["losses"] == reference[:1]


def test_validation_prompt_node_chains_prompts(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", train_node=False)
    add_validation(p)
    p = {k: v for k, v in p.items() if k in ("20", "21", "30", "31")}
    p["40"] = {"class_type": "PreviewAny", "inputs": {"source": ["31", 0]}}
    comfy.run(p)
    prompts = comfy.output("31")
    assert [(x.width, x.height, x.frames, x.seed, x.steps) for x in prompts] == [(SIZE, SIZE, 1, 3, 3),
                                                                                   (48, 48, 1, 3, 3)]
    assert len(comfy.output("30")) == 1, "chaining never changes the upstream list"
    assert prompts[0].context.ndim == 2 and not prompts[0].context.is_inference()


@pytest.mark.parametrize("case", ["no prompts", "no vae", "at start without prompts"])  # sizes: test_nodes_checks
def test_bad_validation_inputs_fail_before_training_naming_the_input(comfy, data, tmp_path, case):
    kw, expect = {
        "no prompts": ({"every": 2, "prompts": False}, "validation_prompts"),
        "no vae": ({"every": 2, "vae": False}, "validation_vae"),
        "at start without prompts": ({"every": 0, "at_start": True, "prompts": False}, "validation_prompts"),
    }[case]
    p = train_prompt(tmp_path / "out", steps=2)
    add_validation(p, **kw)
    before = {id(r) for r in sessions(comfy)}
    comfy.run(p, expect_success=False)
    assert not comfy.executor.success
    message = comfy.error_message()
    assert expect in message, message
    assert {id(r) for r in sessions(comfy)} <= before, "a session was created despite the error"
    assert not [c for c in comfy.progress_calls if c[0] == "6"], "training started"
