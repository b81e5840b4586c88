"""The end-to-end quality oracle: the trained demo models (demo_models/) generate what the prompt says, and the demo
workflow's LoRA teaches a colour the base model has never seen. Measured by the demo detector (engine/demo/score.py)
on clips made through the real workflow in the in-process ComfyUI tier."""

import copy
import json

import pytest

from comfy_harness import REPO_ROOT, ui_to_api
from engine.demo import shapes
from engine.demo.score import clip_matches

pytestmark = pytest.mark.comfy

WORKFLOW = json.loads((REPO_ROOT / "workflows" / "wan_demo_train_then_generate.json").read_text())
BASE_PROMPTS = [s.caption for s in shapes.eval_specs()]          # 12 prompts: every colour, shape and motion
BASE_NODES = ("1", "2", "3", "4", "5", "6", "7")                 # loaders, then encode -> sample -> decode -> save
LORA_PROMPT = "a magenta circle moving up"
SEEDS = range(42, 52)
BASE_SEEDS = range(42, 48)                                       # 12 prompts x 6 seeds: 72 clips


def _prompt(comfy) -> dict:
    return ui_to_api(copy.deepcopy(WORKFLOW), comfy.input_types())


def _clip(comfy, decode_node: str):
    return (comfy.output(decode_node, 0).numpy() * 255).round().astype("uint8")    # IMAGE [F, H, W, 3]


def _base_match_rate(comfy, seeds=BASE_SEEDS) -> tuple[float, list]:
    """Fraction of (prompt, seed) pairs whose clip matches colour, shape and motion, and the misses."""
    base = {k: v for k, v in _prompt(comfy).items() if k in BASE_NODES}
    hits, misses = 0, []
    for prompt in BASE_PROMPTS:
        for seed in seeds:
            base["4"]["inputs"]["prompt"], base["5"]["inputs"]["seed"] = prompt, seed
            comfy.run(base)
            m = clip_matches(_clip(comfy, "6"), prompt)
            hits += m["all"]
            if not m["all"]:
                misses.append((prompt, seed, m))
    return hits / (len(seeds) * len(BASE_PROMPTS)), misses


# Issue #20's bar. The shipped models reach 61 of 72 (85 %; docs/demo.md): colour and motion always, some squares
# come out with corners round enough to read as circles.
BASE_BAR = 0.8


def test_the_base_demo_model_generates_the_prompted_shape_colour_and_motion(comfy):
    rate, misses = _base_match_rate(comfy)
    assert rate >= BASE_BAR, (rate, misses)


def test_a_wrong_latent_normalisation_fails_the_oracle(comfy, monkeypatch):
    """The oracle catches a broken pipeline: decoding with the wrong per-channel latent std (the kind of bug a
    shape or finiteness check never sees) drops the match rate far below the bar."""
    vae = comfy.pack_module("engine.families.wan.vae")
    monkeypatch.setattr(vae.WanVAE, "latent_std", tuple(0.4 * s for s in vae.LATENT_STD))
    rate, _ = _base_match_rate(comfy, seeds=(42, 43))
    assert rate < 0.3, rate


def test_the_demo_lora_teaches_a_new_colour(comfy):
    """The whole demo workflow: the LoRA trained in the graph on magenta clips makes magenta appear for most seeds,
    where the base model shows it for almost none. Re-queueing with other seeds reuses the trained LoRA (cached)."""
    prompt = _prompt(comfy)
    assert prompt["8"]["inputs"]["prompt"] == prompt["22"]["inputs"]["prompt"] == LORA_PROMPT
    before, after = [], []
    for seed in SEEDS:
        prompt["9"]["inputs"]["seed"] = prompt["23"]["inputs"]["seed"] = seed
        comfy.run(prompt)
        before.append(clip_matches(_clip(comfy, "10"), LORA_PROMPT)["colour"])
        after.append(clip_matches(_clip(comfy, "24"), LORA_PROMPT)["colour"])
    assert sum(after) >= 8 and sum(before) <= 1, (before, after)
