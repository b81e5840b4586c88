"""The end-to-end quality oracle: each family's trained demo models (demo_models/) generate what the prompt says,
and its demo workflow's LoRA teaches a concept the base model has never seen. Measured by the demo detector
(engine/demo/score.py) on clips made through the real workflow in the in-process ComfyUI tier."""

import copy
import json

import pytest

from comfy_harness import REPO_ROOT, ui_to_api
from engine.demo import shapes
from engine.demo.score import clip_matches

pytestmark = pytest.mark.comfy

WORKFLOWS = {"wan": "wan_demo_train_then_generate.json", "hunyuan": "hunyuan_demo_train_then_generate.json",
             "framepack": "framepack_demo_train_then_generate.json"}
BASE_PROMPTS = [s.caption for s in shapes.eval_specs()]          # 12 prompts: every colour, shape and motion
# loaders, then encode -> sample -> decode -> save; FramePack (image to video) also its image encoder loader and the
# base prompt's start image: a demo clip of the prompt (node 31, its first frame encoded by 32)
BASE_NODES = ("1", "2", "3", "4", "5", "6", "7")
START_NODES = {"framepack": ("30", "31", "32")}
BASE_SEEDS = range(42, 48)                                       # 12 prompts x 6 seeds: 72 clips
# what each demo LoRA teaches: a colour the text-to-video base models never saw; for FramePack, whose start image
# already shows the colour and the shape, a motion it never saw (down and to the right)
LORA = {"wan": ("a magenta circle moving up", "colour"), "hunyuan": ("a magenta circle moving up", "colour"),
        "framepack": ("a red square moving diagonally", "motion")}
LORA_SEEDS = range(42, 52)
# Colour, shape and motion all right: issue #20's bar is 80 %. The shipped Wan models reach 61 of 72 (85 %); the
# HunyuanVideo ones 35 of 72 (49 %), FramePack's 56 of 72 (78 %): most of their misses are squares and triangles
# that come out as round blobs (docs/demo.md), so their bars guard what they reach until they are retrained. Colour
# and motion alone are right in at least 95 % of the clips of all three.
BASE_BARS = {"wan": 0.8, "hunyuan": 0.4, "framepack": 0.75}
PART_BAR = 0.95


def _prompt(comfy, family: str) -> dict:
    workflow = json.loads((REPO_ROOT / "workflows" / WORKFLOWS[family]).read_text())
    return ui_to_api(copy.deepcopy(workflow), comfy.input_types())


def _clip(comfy, decode_node: str):
    return (comfy.output(decode_node, 0).numpy() * 255).round().astype("uint8")    # IMAGE [F, H, W, 3]


def _base_match_rates(comfy, family: str, seeds=BASE_SEEDS) -> tuple[dict, list]:
    """Fractions of the (prompt, seed) pairs whose clip matches the colour, shape, motion, and all three; the misses."""
    base = {k: v for k, v in _prompt(comfy, family).items() if k in BASE_NODES + START_NODES.get(family, ())}
    hits, misses = dict.fromkeys(("colour", "shape", "motion", "all"), 0), []
    for prompt in BASE_PROMPTS:
        for seed in seeds:
            base["4"]["inputs"]["prompt"], base["5"]["inputs"]["seed"] = prompt, seed
            if "31" in base:    # the start image: the first frame of a clip of the prompt, one per seed
                spec = shapes.parse_caption(prompt)
                base["31"]["inputs"].update(colours=spec.colour, shapes=spec.shape, motions=spec.motion,
                                            variation=seed)
            comfy.run(base)
            m = clip_matches(_clip(comfy, "6"), prompt)
            for k in hits:
                hits[k] += m[k]
            if not m["all"]:
                misses.append((prompt, seed, m))
    return {k: v / (len(seeds) * len(BASE_PROMPTS)) for k, v in hits.items()}, misses


@pytest.mark.parametrize("family", WORKFLOWS)
def test_the_base_demo_model_generates_the_prompted_shape_colour_and_motion(comfy, family):
    rates, misses = _base_match_rates(comfy, family)
    assert rates["all"] >= BASE_BARS[family], (rates, misses)
    assert rates["colour"] >= PART_BAR and rates["motion"] >= PART_BAR, (rates, misses)


def _break_latent_normalisation(comfy, monkeypatch, family: str) -> None:
    """Decode with the wrong latent scale: Wan's per-channel std, HunyuanVideo's scaling factor, × 0.4."""
    if family == "wan":
        vae = comfy.pack_module("engine.families.wan.vae")
        monkeypatch.setattr(vae.WanVAE, "latent_std", tuple(0.4 * s for s in vae.LATENT_STD))
    else:
        vae = comfy.pack_module("engine.families.hunyuan.vae")
        monkeypatch.setattr(vae, "SCALING_FACTOR", 0.4 * vae.SCALING_FACTOR)


def _swap_prompt_and_negative(comfy, monkeypatch, family: str) -> None:
    """Classifier-free guidance with the prompt and the negative prompt swapped (the order of the batched pair)."""
    pipeline = comfy.pack_module("engine.families.framepack.pipeline")
    merge = pipeline._merge_all
    monkeypatch.setattr(pipeline, "_merge_all", lambda conds: merge(conds[::-1]))


# A deliberate bug each oracle must catch. FramePack's is a text-conditioning bug: a wrong latent scale does not
# break image to video, since the start image is encoded with the same wrong scale and carries the clip.
BREAKS = {"wan": _break_latent_normalisation, "hunyuan": _break_latent_normalisation,
          "framepack": _swap_prompt_and_negative}


@pytest.mark.parametrize("family", WORKFLOWS)
def test_a_broken_pipeline_fails_the_oracle(comfy, monkeypatch, family):
    """The oracle catches a broken pipeline (the kind of bug a shape or finiteness check never sees): the match
    rate drops far below the bar."""
    BREAKS[family](comfy, monkeypatch, family)
    rates, _ = _base_match_rates(comfy, family, seeds=(42, 43))
    assert rates["all"] < 0.3, rates


@pytest.mark.parametrize("family", WORKFLOWS)
def test_the_demo_lora_teaches_a_new_concept(comfy, family):
    """The whole demo workflow: the LoRA trained in the graph on clips of the new concept (magenta; FramePack: a
    shape moving diagonally) makes it appear for most seeds, where the base model shows it for almost none. Re-queueing
    with other seeds reuses the trained LoRA (cached)."""
    prompt = _prompt(comfy, family)
    text, attribute = LORA[family]
    assert prompt["8"]["inputs"]["prompt"] == prompt["22"]["inputs"]["prompt"] == text
    before, after = [], []
    for seed in LORA_SEEDS:
        prompt["9"]["inputs"]["seed"] = prompt["23"]["inputs"]["seed"] = seed
        comfy.run(prompt)
        before.append(clip_matches(_clip(comfy, "10"), text)[attribute])
        after.append(clip_matches(_clip(comfy, "24"), text)[attribute])
    assert sum(after) >= 8 and sum(before) <= 1, (before, after)
