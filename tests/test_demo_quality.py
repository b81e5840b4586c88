"""End-to-end quality oracle: the trained demo models, run through the real demo workflow in ComfyUI, generate what
the prompt says, and the workflow's LoRA teaches them a colour they have never seen (docs/demo.md).

Clips are scored by the numpy detector (engine/demo/score.py): colour, shape class and motion direction."""

import copy
import json

import numpy as np
import pytest

from comfy_harness import REPO_ROOT, ui_to_api

pytestmark = pytest.mark.comfy
WORKFLOW = REPO_ROOT / "workflows" / "wan_demo_train_then_generate.json"
BASE_SAMPLER, NEW_BEFORE, NEW_AFTER = "5", "9", "22"     # sampler node ids in the workflow
SEEDS_PER_PROMPT = 2


def fixed_prompts(shapes) -> list[str]:
    """12 prompts: every base colour, shape and motion three or four times, in different combinations."""
    colours, kinds, motions = shapes.BASE_COLOURS, shapes.SHAPES, list(shapes.MOTIONS)
    return [shapes.ClipSpec(colours[i % 4], kinds[i % 3], motions[(i // 3) % 4]).caption for i in range(12)]


def demo_prompt(comfy) -> dict:
    return ui_to_api(json.loads(WORKFLOW.read_text()), comfy.input_types())


def clips_of(comfy, decode_id: str, frames: int) -> list[np.ndarray]:
    images = comfy.output(decode_id).numpy()                  # [B * F, H, W, 3] in [0, 1]
    return list(images.reshape(-1, frames, *images.shape[1:]))


def base_generation_prompt(comfy, prompts: list[str]) -> dict:
    """The workflow's base-model branch (loaders -> Text Encode 4 -> Sampler 5 -> Decode 6), once per prompt."""
    wf = demo_prompt(comfy)
    p = {k: wf[k] for k in ("1", "2", "3")}
    for i, text in enumerate(prompts):
        enc, smp, dec = (copy.deepcopy(wf[k]) for k in ("4", BASE_SAMPLER, "6"))
        enc["inputs"]["prompt"] = text
        smp["inputs"].update(embeds=[f"e{i}", 0], batch_size=SEEDS_PER_PROMPT)
        dec["inputs"]["latents"] = [f"s{i}", 0]
        p.update({f"e{i}": enc, f"s{i}": smp, f"d{i}": dec})
    return p


def match_rate(comfy, prompts, frames: int) -> tuple[float, list]:
    score = comfy.pack_module("engine.demo.score")
    results = []
    for i, text in enumerate(prompts):
        for clip in clips_of(comfy, f"d{i}", frames):
            results.append((text, score.score_clip(clip), score.clip_matches(clip, text)["all"]))
    return sum(ok for *_, ok in results) / len(results), results


@pytest.fixture(scope="module")
def demo(comfy):
    shapes = comfy.pack_module("engine.demo.shapes")
    return shapes, fixed_prompts(shapes), demo_prompt(comfy)[BASE_SAMPLER]["inputs"]["frames"]


def test_the_base_demo_model_generates_what_the_prompt_says(comfy, demo):
    shapes, prompts, frames = demo
    comfy.run(base_generation_prompt(comfy, prompts))
    rate, results = match_rate(comfy, prompts, frames)
    assert rate >= 0.8, f"{rate:.0%} of clips match colour, shape and motion: {results}"


def test_a_broken_pipeline_fails_the_quality_oracle(comfy, demo, monkeypatch):
    """The deliberate mutation: Wan 2.1's latent normalisation off (std 1 instead of the VAE's), as a loader or
    decoder bug would leave it. The same graph then no longer produces the prompted clips."""
    shapes, prompts, frames = demo
    vae = comfy.pack_module("engine.families.wan.vae")
    monkeypatch.setattr(vae.WanVAE, "latent_std", tuple(1.0 for _ in vae.LATENT_STD))
    comfy.executor.reset()      # nothing from the unbroken run may be reused from ComfyUI's cache
    comfy.run(base_generation_prompt(comfy, prompts))
    rate, results = match_rate(comfy, prompts, frames)
    comfy.executor.reset()
    assert rate < 0.3, f"a broken normalisation still matched {rate:.0%}: {results}"


def test_the_workflow_lora_teaches_a_new_colour(comfy, demo):
    """The whole demo workflow as shipped (magenta clips made in the graph, LoRA trained), with 10 seeds sampled
    before and after the LoRA: magenta in >= 80 % of the clips after it, <= 10 % before."""
    shapes, _, frames = demo
    p = demo_prompt(comfy)
    for node in (NEW_BEFORE, NEW_AFTER):
        p[node]["inputs"]["batch_size"] = 10
    comfy.run(p)
    score = comfy.pack_module("engine.demo.score")
    new = shapes.parse_caption(p["8"]["inputs"]["prompt"]).colour
    assert new not in shapes.BASE_COLOURS
    before = [score.score_clip(c).colour for c in clips_of(comfy, "10", frames)]
    after = [score.score_clip(c).colour for c in clips_of(comfy, "23", frames)]
    assert sum(c == new for c in before) <= 1, before
    assert sum(c == new for c in after) >= 8, after
