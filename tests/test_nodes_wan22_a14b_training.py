"""Wan 2.2 A14B training from the nodes in a real ComfyUI (tiny expert presets): a pair from Musubi Wan 2.2 Experts
trained in one session matches the engine's `TrainingSession(experts=...)` step for step in both memory modes, the
trained pair samples directly, the saved pair reads back with each expert's weights, validation runs both experts,
a resume across an expert switch is exact, one expert trains alone on its side of the boundary, I2V A14B caches take
no CLIP, and every mistake is refused before training naming the input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training_graphs import SIZE, sample_nodes, sessions, train_prompt

pytestmark = pytest.mark.comfy
BOUNDARY = 0.6          # both experts get batches within a few steps of the tiny runs
HIGH_T2V, LOW_T2V = "preset:tiny-t2v-a14b-high-noise", "preset:tiny-t2v-a14b-low-noise"


@pytest.fixture(autouse=True)
def _release_sessions(comfy):
    """Each test sees only its own sessions (`sessions(comfy)`: node 5's)."""
    comfy.pack_module("nodes.registry").SESSIONS.release()
    yield
    comfy.pack_module("nodes.registry").SESSIONS.release()


def pair_prompt(out_dir, *, steps=8, max_steps=200, mode="both", layout="auto", boundary=BOUNDARY, high=HIGH_T2V,
                low=LOW_T2V, **init) -> dict:
    """train_prompt's graph on a pair: 1 low-noise loader, 30 high-noise loader, 31 Experts -> 5 Init Training."""
    p = train_prompt(out_dir, steps=steps, max_steps=max_steps)
    p["1"]["inputs"]["model_name"] = low
    p["30"] = {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": high, "dtype": "fp32",
                                                              "attention": "sdpa"}}
    p["31"] = {"class_type": "MusubiWan22Experts", "inputs": {"high_noise_model": ["30", 0],
                                                              "low_noise_model": ["1", 0], "boundary": boundary,
                                                              "memory_mode": mode}}
    p["5"]["inputs"].update(model=["31", 0], expert_layout=layout, **init)
    return p


def engine_run(comfy, run, out_dir, steps, mode="both", layout="separate"):
    """The same training in the engine alone: fresh views of the loaders' models, the node session's cached
    batches, configs written out here. -> (session, losses, expert per step)."""
    E = comfy.pack_module("engine.training")
    views = comfy.pack_module("engine.lora.views")
    ex = comfy.pack_module("engine.training.experts")
    low, high = (views.make_lora_view(run.base), views.make_lora_view(run.high_base))
    cfg = E.TrainingConfig(output_dir=str(out_dir), output_name="lora", max_train_steps=200, mixed_precision="no",
                           gradient_checkpointing=True, seed=1,
                           timesteps=E.TimestepConfig("shift", discrete_flow_shift=2.0))
    loader = comfy.pack_module("engine.data").CachedBatchLoader(run.session.loader.datasets, seed=1)
    s = E.TrainingSession(low, E.NetworkConfig(rank=8, alpha=8.0), E.OptimizerConfig(learning_rate=3e-3), loader,
                          cfg, experts=ex.TimestepExperts(high, BOUNDARY, layout=layout, mode=mode, device="cpu"))
    picked = []
    losses = s.train_steps(steps, progress=lambda step, total, info: picked.extend(info["experts"]))
    return s, losses, picked


@pytest.mark.parametrize("mode", ["both", "offload"])
def test_pair_training_matches_the_engine_and_the_trained_pair_samples(comfy, data, tmp_path, mode):
    p = pair_prompt(tmp_path / "out", steps=8, mode=mode)
    sample_nodes(p, ["6", 4], "4")       # the Wan sampler on Train Steps' model: the trained pair
    comfy.run(p)
    (run,) = sessions(comfy)
    assert run.pair is not None and (run.pair.mode, run.pair.layout, run.pair.boundary) == (mode, "separate",
                                                                                             BOUNDARY)
    losses = comfy.output("6", 2)["loss"]
    s, expected, picked = engine_run(comfy, run, tmp_path / "engine", 8, mode)
    assert losses == expected
    assert {"high", "low"} <= set(picked) and run.pair.switches == s.pair.switches > 0
    if mode == "offload":
        assert ("park", "high") in run.pair.events or ("park", "low") in run.pair.events

    # the trained model output: the pair, each expert a view of its loader's model carrying its own adapter
    pair = comfy.output("6", 4)
    assert pair.mode == mode and pair.resolved_boundary() == BOUNDARY
    attached = comfy.pack_module("engine.lora.adapters").attached_networks
    for expert, node in (("high", "30"), ("low", "1")):
        view = getattr(pair, expert).module
        assert view is run.pair.models[expert] and view is not comfy.module(node) and not attached(comfy.module(node))
        assert attached(view)["training"] is run.network.networks()[expert]
    # the sampler generates with it as the engine does with both trained views
    generate = comfy.pack_module("engine.families.wan.pipeline").generate
    WanExperts = comfy.pack_module("engine.families.wan.experts").WanExperts
    embeds = comfy.output("21")
    request = comfy.pack_module("engine.families.wan.pipeline").WanGenerateRequest(
        task="t2i", context=embeds["context"], negative_context=embeds["negative_context"], width=SIZE,
        height=SIZE, frames=1, steps=12, guidance_scale=1.0, solver="euler", seed=5)
    with torch.no_grad():
        direct = generate(WanExperts(low=run.pair.models["low"], high=run.pair.models["high"], boundary=BOUNDARY),
                          request)
    torch.testing.assert_close(comfy.output("41")["samples"], direct.float().cpu(), rtol=1e-5, atol=1e-5)
    s.network.detach()


def test_saved_pair_reads_back_with_each_experts_weights(comfy, data, tmp_path):
    read_lora = comfy.pack_module("engine.lora").read_lora
    p = pair_prompt(tmp_path / "out", steps=6)
    p["8"] = {"class_type": "MusubiSaveTrainedLoRA", "inputs": {"session": ["6", 0], "format": "comfyui",
                                                               "filename_prefix": "loras/pair", "dtype": "fp32",
                                                               "save_to": "output"}}
    comfy.run(p)
    (run,) = sessions(comfy)
    high, low = Path(comfy.output("8", 1)), Path(comfy.output("8", 3))
    assert (high.name, low.name) == ("pair_high_noise_00001_.safetensors", "pair_low_noise_00001_.safetensors")
    for expert, path, lora in (("high", high, comfy.output("8", 0)), ("low", low, comfy.output("8", 2))):
        stored = read_lora(path)
        assert stored.metadata["ss_timestep_expert"] == f"{expert}_noise"
        assert set(lora.modules) == set(stored.modules)
        adapters = run.network.networks()[expert].adapters()
        assert stored.modules.keys() == adapters.keys()
        for name, a in adapters.items():
            assert torch.equal(stored.modules[name].tensors["up"], a.lora_up.weight.detach().cpu())
            assert torch.equal(stored.modules[name].tensors["down"], a.lora_down.weight.detach().cpu())
    ups = [read_lora(f).modules for f in (high, low)]
    assert any(not torch.equal(ups[0][n].tensors["up"], ups[1][n].tensors["up"]) for n in ups[0])
    # evicted and re-run: the same adapters are not written a second time; the next save gets the next counter
    comfy.executor.reset()
    comfy.run(p)
    assert Path(comfy.output("8", 1)) == high and not (high.parent / "pair_high_noise_00002_.safetensors").exists()
    p["6"]["inputs"]["steps"] = 7
    comfy.run(p)
    assert Path(comfy.output("8", 3)).name == "pair_low_noise_00002_.safetensors"


def test_shared_layout_saves_one_file_and_validate_samples_both_experts(comfy, data, tmp_path):
    p = pair_prompt(tmp_path / "out", steps=4, layout="shared")
    sample_nodes(p, ["6", 4], "4")
    comfy.run(p)                               # (the text encode and VAE of sample_nodes, for Validate below)
    (run,) = sessions(comfy)
    calls = []
    hooks = [run.pair.models[e].register_forward_pre_hook(lambda mod, args, e=e: calls.append(e))
             for e in ("high", "low")]
    try:
        p["9"] = {"class_type": "MusubiValidate", "inputs": {
            "session": ["6", 0], "vae": ["22", 0], "embeds": ["21", 0], "width": SIZE, "height": SIZE, "frames": 1,
            "steps": 6, "guidance_scale": 1.0, "shift": 3.0, "seed": 3}}
        p["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
        p["8"] = {"class_type": "MusubiSaveTrainedLoRA", "inputs": {"session": ["9", 1], "format": "comfyui",
                                                                   "filename_prefix": "loras/shared",
                                                                   "dtype": "fp32", "save_to": "output"}}
        comfy.run(p)
    finally:
        for h in hooks:
            h.remove()
    assert calls[0] == "high" and set(calls) == {"high", "low"}
    images = comfy.output("9", 0)
    assert images.shape == (1, SIZE, SIZE, 3) and images.std() > 0
    assert comfy.output("8", 1) == comfy.output("8", 3)
    assert Path(comfy.output("8", 1)).name == "shared_00001_.safetensors"
    assert comfy.output("8", 0).metadata["ss_timestep_expert"] == "both"


def test_validation_during_training_samples_through_both_experts(comfy, data, tmp_path):
    p = pair_prompt(tmp_path / "out", steps=2)
    sample_nodes(p, ["6", 4], "4")
    p["11"] = {"class_type": "MusubiValidationPrompt", "inputs": {
        "embeds": ["21", 0], "width": SIZE, "height": SIZE, "frames": 1, "seed": 3, "steps": 6,
        "guidance_scale": 1.0, "shift": 3.0}}
    p["5"]["inputs"].update(validation_prompts=["11", 0], validation_vae=["22", 0], validate_every_n_steps=2)
    p["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 5]}}
    comfy.run(p)
    (run,) = sessions(comfy)
    samples = comfy.output("6", 5)
    assert samples.shape == (1, SIZE, SIZE, 3) and samples.std() > 0
    # the same prompt through the trained pair again gives the sample Train Steps shows
    video = comfy.pack_module("nodes.video")
    prompt = comfy.output("11")[0]
    (again,) = run.session.sample_prompts([prompt])
    torch.testing.assert_close(video.video_to_image(video.decode_video(data["vae"], again)), samples,
                               rtol=1e-4, atol=1e-4)
    run.network.high.multiplier = 0.0       # the high-noise expert's adapter is part of that sample
    try:
        (without,) = run.session.sample_prompts([prompt])
    finally:
        run.network.high.multiplier = 1.0
    assert not torch.allclose(without, again)


def test_resume_across_an_expert_switch_is_exact(comfy, data, tmp_path):
    total = 10
    comfy.run(pair_prompt(tmp_path / "ref", steps=total, mode="offload"))
    (ref,) = sessions(comfy)
    reference = comfy.output("6", 2)["loss"]
    _, expected, picked = engine_run(comfy, ref, tmp_path / "engine", total, "offload")
    assert expected == reference
    k = next(i for i in range(2, total) if picked[i] != picked[i - 1])   # step k+1 runs the other expert
    comfy.pack_module("nodes.registry").SESSIONS.release()

    comfy.run(pair_prompt(tmp_path / "cut", steps=k, max_steps=k, mode="offload"))   # ends at k: state saved
    state = tmp_path / "cut" / "lora-state"
    assert (state / "training_state.pt").is_file()
    comfy.pack_module("nodes.registry").SESSIONS.release()
    p = pair_prompt(tmp_path / "cut", steps=total - k, mode="offload")
    p["5"] = {"class_type": "MusubiResumeTraining", "inputs": {"model": ["31", 0], "dataset": ["2", 0],
                                                              "state_path": str(state), "max_train_steps": 200}}
    comfy.run(p)
    (run,) = sessions(comfy)
    assert run.pair is not None and run.pair.layout == "separate"
    assert comfy.output("6", 2)["loss"] == reference
    assert run.pair.active == picked[-1] and run.pair.switches == ref.pair.switches
    assert comfy.output("5", 1).high.module is run.pair.models["high"]


def test_one_expert_trains_alone_on_its_side_of_the_boundary(comfy, data, tmp_path):
    p = train_prompt(tmp_path / "out", steps=6)
    p["1"]["inputs"]["model_name"] = HIGH_T2V
    p["5"]["inputs"].update(train_expert="high", expert_boundary=875.0)
    comfy.run(p)
    (run,) = sessions(comfy)
    ts = run.session.config.timesteps
    assert run.pair is None and ts.bounds() == (875, 1000) and ts.preserve_distribution_shape
    assert min(run.session.last_info.timesteps) >= 0.875
    assert comfy.output("6", 4).module is run.model      # a single DiT's output stays a handle


def test_i2v_a14b_caches_without_clip_train_the_pair_and_refuse_wan21_i2v(comfy, tmp_path):
    """Cache Latents i2v without CLIP vision: the I2V latents, no CLIP features; the I2V A14B pair trains on it (and
    samples its validation prompt with the start image); Wan 2.1 I2V, which needs CLIP, refuses it naming it."""
    def prompt(model_src, extra):
        p = {
            "1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-i2v-a14b-low-noise",
                                                                 "dtype": "fp32", "attention": "sdpa"}},
            "30": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-i2v-a14b-high-noise",
                                                                  "dtype": "fp32", "attention": "sdpa"}},
            "31": {"class_type": "MusubiWan22Experts", "inputs": {"high_noise_model": ["30", 0],
                                                                  "low_noise_model": ["1", 0], "boundary": BOUNDARY,
                                                                  "memory_mode": "both"}},
            "32": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-i2v", "dtype": "fp32",
                                                                  "attention": "sdpa"}},
            "3": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                                 "cache_on_cpu": False}},
            "4": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5",
                                                               "dtype": "fp32"}},
            "12": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 5,
                                                          "color": 0xCC3322}},
            "13": {"class_type": "MusubiDatasetFromImages", "inputs": {
                "images": ["12", 0], "captions": "a red square", "width": SIZE, "height": SIZE, "num_repeats": 1,
                "as_video": True, "cache_directory": "", "batch_size": 1}},
            "14": {"class_type": "MusubiCacheLatents", "inputs": {"dataset": ["13", 0], "vae": ["3", 0],
                                                                  "task": "i2v", "keep_cache": False, "workers": 0}},
            "15": {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["14", 0],
                                                                         "text_encoder": ["4", 0],
                                                                         "keep_cache": False}},
        }
        base = train_prompt(tmp_path / "out", steps=2, rank=4)
        p.update({"8": base["3"], "9": base["4"], "5": base["5"], "6": base["6"], "7": base["7"]})
        p["5"]["inputs"].update(model=model_src, dataset=["15", 0], lora_config=["8", 0], optimizer_config=["9", 0],
                                **extra)
        return p

    p = prompt(["31", 0], {})
    p["20"] = {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["4", 0], "prompt": "a red square",
                                                               "negative_prompt": "", "offload_after": True}}
    p["21"] = {"class_type": "MusubiWanImageEncode", "inputs": {"vae": ["3", 0], "start_image": ["12", 0],
                                                                "width": SIZE, "height": SIZE, "frames": 5}}
    p["22"] = {"class_type": "MusubiValidationPrompt", "inputs": {
        "embeds": ["20", 0], "width": SIZE, "height": SIZE, "frames": 5, "seed": 3, "steps": 4,
        "guidance_scale": 1.0, "shift": 0.0, "image_embeds": ["21", 0]}}
    p["5"]["inputs"].update(validation_prompts=["22", 0], validation_vae=["3", 0], validate_every_n_steps=2)
    p["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 5]}}
    comfy.run(p)
    load = comfy.pack_module("engine.data.cache").load_cache_file
    (latent_file,) = sorted(Path(comfy.output("15").config.datasets[0].cache_directory).glob("*_wan.safetensors"))
    tensors = load(latent_file)
    assert tuple(tensors["latents_image"].shape[:2]) == (20, 2) and "clip" not in tensors
    family = comfy.pack_module("engine.families.wan.family").FAMILY
    assert "clip" not in family.cache_requirements(comfy.module("1")).required
    (run,) = sessions(comfy)
    assert run.session.step == 2 and all(torch.isfinite(torch.tensor(comfy.output("6", 2)["loss"])))
    assert comfy.output("6", 5).shape == (5, SIZE, SIZE, 3)

    comfy.pack_module("nodes.registry").SESSIONS.release()
    comfy.run(prompt(["32", 0], {}), expect_success=False)
    msg = comfy.error_message()
    assert "dataset CLIP features" in msg and "tiny-i2v" in msg, msg


REFUSALS = {
    # name: (prompt changes, words of the message)
    "layout_for_a_single_dit": (lambda p: p["5"]["inputs"].update(model=["1", 0], expert_layout="separate"),
                                ["expert_layout", "separate", "auto for a single DiT"]),
    "one_module_twice": (lambda p: (p["1"]["inputs"].update(model_name="preset:tiny-t2v"),
                                    p["31"]["inputs"].update(high_noise_model=["1", 0])),
                         ["high-noise expert", "a model other than the low-noise expert"]),
    "i2v_pair_on_a_t2v_cache": (lambda p: (p["1"]["inputs"].update(model_name="preset:tiny-i2v-a14b-low-noise"),
                                           p["30"]["inputs"].update(model_name="preset:tiny-i2v-a14b-high-noise")),
                                ["no 'latents_image' tensor", "re-run caching"]),
    "train_expert_with_a_pair": (lambda p: p["5"]["inputs"].update(train_expert="high"),
                                 ["train_expert", "none for a pair"]),
    "train_expert_without_boundary": (lambda p: p["5"]["inputs"].update(model=["1", 0], train_expert="low"),
                                      ["expert_boundary", "0.875"]),
    "train_expert_of_the_other_file": (lambda p: p["5"]["inputs"].update(model=["1", 0], train_expert="high",
                                                                         expert_boundary=0.875),
                                       ["train_expert", "the model's file is the low-noise expert"]),
    "boundary_with_a_pair": (lambda p: p["5"]["inputs"].update(expert_boundary=0.9),
                             ["expert_boundary", "comes from Musubi Wan 2.2 Experts"]),
    "eval_dataset_with_a_pair": (lambda p: p["5"]["inputs"].update(eval_dataset=["2", 0]),
                                 ["eval_dataset", "no held-out evaluation"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_mistakes_are_refused_before_training_naming_the_input(comfy, data, tmp_path, case):
    change, words = REFUSALS[case]
    p = pair_prompt(tmp_path / "out", steps=2)
    change(p)
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert all(w in msg for w in words), msg
    assert sessions(comfy) == []


def test_resume_refuses_a_single_dit_for_a_pair_state(comfy, data, tmp_path):
    comfy.run(pair_prompt(tmp_path / "out", steps=2, max_steps=2))
    p = train_prompt(tmp_path / "out", steps=1)
    p["5"] = {"class_type": "MusubiResumeTraining", "inputs": {"model": ["1", 0], "dataset": ["2", 0],
                                                              "state_path": str(tmp_path / "out" / "lora-state")}}
    comfy.run(p, expect_success=False)
    msg = comfy.error_message()
    assert "model" in msg and "a pair from Musubi Wan 2.2 Experts" in msg, msg
