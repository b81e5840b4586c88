"""LoRA toolbox nodes through a real ComfyUI (in-process executor): apply without stacking and without touching the
shared model, Save -> Load round trip, Convert (checked by ComfyUI's own LoRA key map), merge into a DiT file, post-hoc
EMA, and the error messages for bad inputs."""

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.lora import EMAConfig, merge_into_model, post_hoc_ema
from engine.families.wan.presets import build_preset_state_dict

from lora_fixtures import random_lora_factors, tiny_model, write_musubi_lora

pytestmark = pytest.mark.comfy

LOADER = {"class_type": "MusubiWanDiTLoader",
          "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa"}}


# --- helpers -------------------------------------------------------------------------------------------------------
def _folder(comfy, key) -> Path:
    p = Path(comfy.b.folder_paths.get_folder_paths(key)[0])
    p.mkdir(parents=True, exist_ok=True)
    return p


def _probe(model, seed=0):
    """One DiT forward on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = [torch.randn(5, model.config.text_dim, generator=g)]
    with torch.inference_mode():
        return model(x, torch.tensor([500.0]), ctx).float()


def _reference(base, merges):
    """A separate model with the base weights and W + s·ΔW merged by the engine: one application of each LoRA."""
    ref = tiny_model("t2v")
    ref.load_state_dict({k: v.clone() for k, v in base.state_dict().items()})
    for path, strength in merges:
        merge_into_model(ref, str(path), strength)
    return ref


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def _error(comfy, prompt) -> str:
    comfy.run(prompt, expect_success=False)
    assert not comfy.executor.success
    return comfy.error_message()


def _stack(comfy, model):
    return comfy.pack_module("nodes.lora").lora_stack(model)


# --- apply ---------------------------------------------------------------------------------------------------------
def _apply_prompt(lora_a, strength, mode="adapter", chain_b=None, block_filter=""):
    p = {"1": LOADER,
         "2": {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": lora_a}},
         "3": {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["2", 0], "strength": strength,
                                                           "mode": mode, "block_filter": block_filter}},
         "9": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}}
    if chain_b is not None:
        p["4"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": chain_b}}
        p["5"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["3", 0], "lora": ["4", 0], "strength": 1.0,
                                                              "mode": "merge"}}
        p["9"]["inputs"]["source"] = ["5", 1]
    return p


@pytest.mark.parametrize("mode", ["adapter", "merge"])
def test_requeue_with_new_strength_replaces_instead_of_stacking(comfy, lora_files, mode):
    comfy.run(_apply_prompt(lora_files["a"], 0.5, mode))
    base = comfy.module("1")
    base_out = _probe(base)
    first = comfy.module("3")
    assert "lora_a @ 0.5: 20/20 modules matched, 0 keys unmatched" in comfy.output("3", 1)
    comfy.run(_apply_prompt(lora_files["a"], 1.0, mode))
    view = comfy.module("3")
    assert comfy.module("1") is base and view is not first
    assert [(e["name"], e["strength"]) for e in _stack(comfy, view)] == [("lora_a", 1.0)]
    assert _hook_count(view) == (20 if mode == "adapter" else 0)
    expected = _probe(_reference(base, [(lora_files["a_path"], 1.0)]))
    torch.testing.assert_close(_probe(view), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, base_out, atol=1e-3)
    # the shared model itself never carried the LoRA
    assert _hook_count(base) == 0 and _stack(comfy, base) == []
    torch.testing.assert_close(_probe(base), base_out, rtol=0, atol=0)


def test_chained_apply_keeps_both_and_reruns_do_not_stack(comfy, lora_files):
    for s in (0.5, 1.0):
        comfy.run(_apply_prompt(lora_files["a"], s, "adapter", chain_b=lora_files["b"]))
    base, view = comfy.module("1"), comfy.module("5")
    assert [(e["name"], e["strength"], e["mode"]) for e in _stack(comfy, view)] == \
        [("lora_a", 1.0, "adapter"), ("lora_b", 1.0, "merge")]
    assert _hook_count(view) == 20                 # lora_a's adapters, once
    expected = _probe(_reference(base, [(lora_files["a_path"], 1.0), (lora_files["b_path"], 1.0)]))
    torch.testing.assert_close(_probe(view), expected, rtol=1e-4, atol=1e-5)
    assert "LoRAs on this model: lora_a@1 (adapter, node 3), lora_b@1 (merge, node 5)" in comfy.output("5", 1)
    assert _hook_count(base) == 0


def test_two_loras_in_one_node(comfy, lora_files):
    prompt = _apply_prompt(lora_files["a"], 0.6)
    prompt["4"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": lora_files["b"]}}
    prompt["3"]["inputs"].update(lora_2=["4", 0], strength_2=-0.4)
    comfy.run(prompt)
    base, view = comfy.module("1"), comfy.module("3")
    expected = _probe(_reference(base, [(lora_files["a_path"], 0.6), (lora_files["b_path"], -0.4)]))
    torch.testing.assert_close(_probe(view), expected, rtol=1e-4, atol=1e-5)
    assert "lora_2 lora_b @ -0.4" in comfy.output("3", 1)


def test_block_filter_limits_the_modules(comfy, lora_files):
    comfy.run(_apply_prompt(lora_files["a"], 1.0, "adapter", block_filter="1"))
    view = comfy.module("3")
    hooked = {n for n, m in view.named_modules() if m._forward_hooks}
    assert hooked and all(n.startswith("blocks.1.") for n in hooked)
    assert "block filter kept 10" in comfy.output("3", 1)


def _sample_prompt(model_src, apply_inputs=None):
    p = {"1": LOADER,
         "2": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32",
                                                             "tokenizer_path": ""}},
         "3": {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a red square",
                                                               "negative_prompt": "", "offload_after": True}},
         "6": {"class_type": "MusubiWanSampler", "inputs": {
             "model": [model_src, 0], "embeds": ["3", 0], "width": 32, "height": 32, "frames": 1, "steps": 3,
             "guidance_scale": 5.0, "shift": 0.0, "solver": "euler", "seed": 3, "noise_device": "cpu"}},
         "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}}
    if apply_inputs is not None:
        p["4"] = {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": apply_inputs["lora_name"]}}
        p["5"] = {"class_type": "MusubiApplyLoRA", "inputs": {"model": ["1", 0], "lora": ["4", 0], "strength": 1.0,
                                                              "mode": apply_inputs["mode"]}}
    return p


def test_graph_without_the_apply_node_samples_the_clean_model(comfy, lora_files):
    comfy.run(_sample_prompt("1"))
    clean = comfy.output("6")["samples"].clone()
    for mode in ("merge", "adapter"):
        comfy.run(_sample_prompt("5", {"lora_name": lora_files["a"], "mode": mode}))
        with_lora = comfy.output("6")["samples"].clone()
        assert not torch.allclose(with_lora, clean, atol=1e-4)
        comfy.run(_sample_prompt("1"))          # the Apply node removed from the graph
        torch.testing.assert_close(comfy.output("6")["samples"], clean, rtol=0, atol=0)


# --- save / load / info / convert ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["comfyui", "musubi", "diffusers"])
def test_save_then_load_round_trip(comfy, fmt):
    loras = _folder(comfy, "loras")
    comfy.run({"1": LOADER,
               "2": {"class_type": "MusubiCreateRandomLoRA", "inputs": {"model": ["1", 0], "rank": 3, "seed": 5}},
               "3": {"class_type": "MusubiSaveLoRA", "inputs": {
                   "lora": ["2", 0], "filename_prefix": f"roundtrip/{fmt}", "format": fmt, "dtype": "fp32",
                   "save_to": "models/loras", "metadata": '{"author": "tests", "steps": 3}'}}})
    created, path = comfy.output("2"), Path(comfy.output("3", 1))
    assert path.parent == loras / "roundtrip" and re.fullmatch(rf"{fmt}_\d{{5}}_\.safetensors", path.name)
    name = path.relative_to(loras).as_posix()
    comfy.run({"4": {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": name}},
               "5": {"class_type": "MusubiLoRAInfo", "inputs": {"lora": ["4", 0]}}})
    loaded = comfy.output("4")
    assert set(loaded.modules) == set(created.modules) and len(created.modules) == 20
    for m, mw in created.modules.items():
        torch.testing.assert_close(loaded.modules[m].delta(), mw.delta(), rtol=1e-5, atol=1e-7)
    assert loaded.metadata["author"] == "tests" and loaded.metadata["steps"] == "3"
    info = comfy.output("5")
    assert f"dialect: {fmt}" in info and "modules: 20 (lora)" in info and "ranks: 3" in info
    assert info == comfy.output("4", 1)
    # the registry keeps one copy per file identity: a re-run (cache dropped) does not re-read the file
    comfy.executor.reset()
    comfy.run({"4": {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": name}},
               "5": {"class_type": "MusubiLoRAInfo", "inputs": {"lora": ["4", 0]}}})
    assert comfy.output("4") is loaded


def _comfy_key_check(comfy_lora_path: Path):
    """ComfyUI's own Wan LoRA key map (what core LoraLoaderModelOnly uses) consumes every key of the file."""
    import logging

    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils
    from lora_fixtures import comfy_base

    patcher = comfy.sd.load_diffusion_model_state_dict(comfy_base("t2v"), model_options={"dtype": torch.float32})
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora_sd = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(comfy_lora_path)))
    not_loaded = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("lora key not loaded"):
                not_loaded.append(record.getMessage())

    h = Collect(logging.WARNING)
    logging.getLogger().addHandler(h)
    try:
        patches = comfy.lora.load_lora(lora_sd, key_map)
    finally:
        logging.getLogger().removeHandler(h)
    return patches, not_loaded


def test_convert_writes_keys_comfyui_core_accepts(comfy, lora_files, factors_a):
    prompt = {"1": {"class_type": "MusubiConvertLoRA", "inputs": {
        "lora_name": lora_files["a"], "format": "comfyui", "output_name": "converted/lora_a_comfy",
        "save_to": "models/loras", "dtype": "fp32", "lora_path": ""}}}
    comfy.run(prompt)
    out = Path(comfy.output("1", 1))
    assert out == _folder(comfy, "loras") / "converted" / "lora_a_comfy.safetensors"
    sd = load_file(str(out))
    pattern = re.compile(r"diffusion_model\.blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]\.(lora_down\.weight|"
                         r"lora_up\.weight|alpha)|diffusion_model\.blocks\.\d+\.ffn\.[02]\.(lora_down\.weight|"
                         r"lora_up\.weight|alpha)")
    assert len(sd) == 60 and all(pattern.fullmatch(k) for k in sd), sorted(sd)[:5]
    patches, not_loaded = _comfy_key_check(out)
    assert not_loaded == [] and sorted(patches) == sorted(f"diffusion_model.{m}.weight" for m in factors_a)

    # by path (what the workflow does with Save's path output), to diffusers
    prompt["1"]["inputs"].update(lora_name="none", lora_path=str(out), format="diffusers",
                                 output_name="converted/lora_a_diffusers")
    comfy.run(prompt)
    keys = load_file(comfy.output("1", 1)).keys()
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in keys and all(k.startswith("transformer.") for k in keys)
    for m, (down, up, alpha) in factors_a.items():
        torch.testing.assert_close(comfy.output("1").modules[m].delta(), (up @ down) * (alpha / down.shape[0]),
                                   rtol=1e-5, atol=1e-7)


# --- merge into a checkpoint file ----------------------------------------------------------------------------------
def test_merge_into_model_file_equals_base_plus_delta(comfy, lora_files, factors_a, factors_b):
    dm = _folder(comfy, "diffusion_models")
    base_sd = build_preset_state_dict("tiny-t2v")
    save_file({k: v.contiguous() for k, v in base_sd.items()}, str(dm / "tiny_base.safetensors"))
    prompt = {"1": {"class_type": "MusubiMergeLoRAIntoModel", "inputs": {
        "model_name": "tiny_base.safetensors", "lora_1": lora_files["a"], "strength_1": 0.7,
        "lora_2": lora_files["b"], "strength_2": -0.5, "lora_3": "none", "strength_3": 1.0, "out_dtype": "keep",
        "device": "cpu", "output_name": "merged/tiny_merged", "save_to": "models/diffusion_models"}}}
    comfy.run(prompt)
    out = Path(comfy.output("1"))
    assert out == dm / "merged" / "tiny_merged.safetensors"
    merged = load_file(str(out))
    assert set(merged) == set(base_sd)
    for k, w in base_sd.items():
        expected = w.float().clone()
        name = k[: -len(".weight")]
        for factors, s in ((factors_a, 0.7), (factors_b, -0.5)):
            if k.endswith(".weight") and name in factors:
                down, up, alpha = factors[name]
                expected += s * (up @ down) * (alpha / down.shape[0])
        torch.testing.assert_close(merged[k].float(), expected, rtol=1e-5, atol=1e-6, msg=k)

    prompt["1"]["inputs"]["output_name"] = "tiny_base"       # == the input DiT file
    msg = _error(comfy, prompt)
    assert "output_name" in msg and "tiny_base" in msg
    prompt["1"]["inputs"].update(output_name="x", lora_1="none", lora_2="none")
    assert "lora_1" in _error(comfy, prompt)


# --- post-hoc EMA --------------------------------------------------------------------------------------------------
@pytest.fixture
def ema_files(comfy):
    folder = _folder(comfy, "loras") / "ema_test"
    model = tiny_model("t2v")
    paths = []
    for i in range(3):
        p = write_musubi_lora(folder / f"step{i}.safetensors", random_lora_factors(model, rank=2, seed=10 + i))
        t = time.time() - 100 + 10 * (2 - i)          # mtimes in reverse name order
        os.utime(p, (t, t))
        paths.append(p)
    return paths


@pytest.mark.parametrize("config", [
    dict(beta=0.8, beta2=0.0, sigma_rel=0.0, sort_by_mtime=False),
    dict(beta=0.8, beta2=0.95, sigma_rel=0.0, sort_by_mtime=True),
    dict(beta=0.9, beta2=0.0, sigma_rel=0.2, sort_by_mtime=True),
], ids=["constant", "linear-sorted", "power"])
def test_post_hoc_ema_equals_the_engine(comfy, ema_files, tmp_path, config):
    files = "\n".join(f"ema_test/{p.name}" for p in ema_files)
    comfy.run({"1": {"class_type": "MusubiLoRAPostHocEMA", "inputs": {
        "files": files, **config, "output_name": "ema_out/result", "save_to": "models/loras"}}})
    out = Path(comfy.output("1", 1))
    assert out == _folder(comfy, "loras") / "ema_out" / "result.safetensors"
    ref = post_hoc_ema([str(p) for p in ema_files], tmp_path / "ref.safetensors",
                       EMAConfig(beta=config["beta"], beta2=config["beta2"] or None,
                                 sigma_rel=config["sigma_rel"] or None, sort=config["sort_by_mtime"]))
    ours, theirs = load_file(str(out)), load_file(str(ref))
    assert set(ours) == set(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    order = [p.name for p in (reversed(ema_files) if config["sort_by_mtime"] else ema_files)]
    assert ", ".join(order) in comfy.output("1", 2)


def test_post_hoc_ema_over_a_folder(comfy, ema_files, tmp_path):
    comfy.run({"1": {"class_type": "MusubiLoRAPostHocEMA", "inputs": {
        "files": "ema_test", "beta": 0.7, "beta2": 0.0, "sigma_rel": 0.0, "sort_by_mtime": True,
        "output_name": "ema_out/folder", "save_to": "output"}}})
    ref = post_hoc_ema(str(ema_files[0].parent), tmp_path / "ref.safetensors", EMAConfig(beta=0.7))
    ours, theirs = load_file(comfy.output("1", 1)), load_file(str(ref))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- bad inputs ----------------------------------------------------------------------------------------------------
def _bad_lora(comfy, name, sd):
    path = _folder(comfy, "loras") / "bad" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return f"bad/{name}"


def test_bad_inputs_name_the_input(comfy, lora_files):
    convert = {"1": {"class_type": "MusubiConvertLoRA", "inputs": {
        "lora_name": "none", "format": "comfyui", "output_name": "x", "save_to": "output", "dtype": "fp32",
        "lora_path": "no/such/lora.safetensors"}}}
    msg = _error(comfy, convert)
    assert "lora_path" in msg and "no/such/lora.safetensors" in msg

    convert["1"]["inputs"].update(lora_name=lora_files["a"], lora_path="", output_name="nodes_test/lora_a",
                                  save_to="models/loras")
    msg = _error(comfy, convert)
    assert "output_name" in msg and "different from the input" in msg
    assert lora_files["a_path"].is_file()

    ema = {"1": {"class_type": "MusubiLoRAPostHocEMA", "inputs": {
        "files": f"{lora_files['a']}\nnodes_test/missing.safetensors", "beta": 0.9, "beta2": 0.0, "sigma_rel": 0.0,
        "sort_by_mtime": True, "output_name": "x", "save_to": "output"}}}
    msg = _error(comfy, ema)
    assert "files" in msg and "nodes_test/missing.safetensors" in msg

    save = {"1": LOADER,
            "2": {"class_type": "MusubiCreateRandomLoRA", "inputs": {"model": ["1", 0], "rank": 2, "seed": 0}},
            "3": {"class_type": "MusubiSaveLoRA", "inputs": {"lora": ["2", 0], "filename_prefix": "nodes_test/x",
                                                             "format": "comfyui", "dtype": "fp32", "save_to": "output",
                                                             "metadata": "[1, 2]"}}}
    assert "metadata" in _error(comfy, save)
    save["3"]["inputs"]["metadata"] = ""
    save["3"]["inputs"]["filename_prefix"] = "../escape"
    ok, _, _, node_errors = comfy.validate(save)  # refused when queued (VALIDATE_INPUTS)
    assert not ok and "filename_prefix" in json.dumps(node_errors)


@pytest.mark.parametrize("case", ["other family", "i2v on t2v", "matches nothing", "block filter"])
def test_apply_refuses_loras_that_do_not_fit(comfy, lora_files, case):
    g = torch.Generator().manual_seed(0)
    lora_name, block_filter = lora_files["a"], ""
    if case == "other family":
        lora_name = _bad_lora(comfy, "flux.safetensors", {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, 256, generator=g),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(768, 4, generator=g)})
        expected = "HunyuanVideo or Flux"
    elif case == "i2v on t2v":
        lora_name = _bad_lora(comfy, "i2v.safetensors", {
            "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.randn(4, 256, generator=g),
            "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.randn(256, 4, generator=g)})
        expected = "k_img"
    elif case == "matches nothing":
        lora_name = _bad_lora(comfy, "nothing.safetensors", {
            "diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.randn(4, 256, generator=g),
            "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.randn(256, 4, generator=g)})
        expected = "none of its 1 modules"
    else:
        block_filter = "5-6"
        expected = "block_filter"
    msg = _error(comfy, _apply_prompt(lora_name, 1.0, block_filter=block_filter))
    assert expected in msg and ("lora" in msg or "block_filter" in msg), msg
    assert _hook_count(comfy.module("1")) == 0


# --- every patch kind, against ComfyUI's own loader ---------------------------------------------------------------
def _core_kinds_file(g):
    """A file with `.diff`, `.diff_b`, DoRA (both axes), `lora_mid` (LoCon/Tucker, conv-shaped as LyCORIS writes it),
    a Tucker LoHa and a bias key ComfyUI does not apply. Sizes: tiny-t2v (dim 256, ffn 512)."""
    P = "diffusion_model.blocks."

    def r(*shape, s=0.05):
        return torch.randn(*shape, generator=g) * s

    sd = {}
    for m, (o, i) in {"0.self_attn.q": (256, 256), "0.ffn.0": (512, 256), "1.cross_attn.v": (256, 256)}.items():
        sd |= {f"{P}{m}.lora_down.weight": r(4, i), f"{P}{m}.lora_up.weight": r(o, 4), f"{P}{m}.alpha": torch.tensor(2.0),
               f"{P}{m}.diff_b": r(o)}
    sd[f"{P}0.self_attn.q.lora_mid.weight"] = r(4, 4, 1, 1, s=0.5)
    sd[f"{P}0.ffn.0.dora_scale"] = r(512, 1, s=1.0).abs() + 0.5         # output axis
    sd[f"{P}1.cross_attn.v.dora_scale"] = r(1, 256, s=1.0).abs() + 0.5   # input axis
    sd |= {f"{P}1.ffn.2.hada_w1_a": r(3, 256, s=0.3), f"{P}1.ffn.2.hada_w1_b": r(3, 512, s=0.3),
           f"{P}1.ffn.2.hada_t1": r(3, 3, 1, 1, s=0.5), f"{P}1.ffn.2.hada_w2_a": r(3, 256, s=0.3),
           f"{P}1.ffn.2.hada_w2_b": r(3, 512, s=0.3), f"{P}1.ffn.2.hada_t2": r(3, 3, 1, 1, s=0.5),
           f"{P}1.ffn.2.alpha": torch.tensor(3.0)}
    for n, shape in {"0.norm3": (256,), "0.self_attn.norm_q": (256,), "1.cross_attn.norm_k": (256,),
                     "1.modulation": (1, 6, 256), "0.self_attn.o": (256, 256)}.items():
        sd[f"{P}{n}.diff"] = r(*shape)
    sd[f"{P}0.norm3.diff_b"] = r(256)
    sd["diffusion_model.head.head.diff_b"] = r(64)
    sd[f"{P}1.self_attn.k.lora_B.bias"] = r(256)                          # ComfyUI leaves it: so do we
    return sd


def _comfy_patched(lora_path: Path, strength: float):
    """ComfyUI's own loader (LoraLoaderModelOnly's path: key map, load_lora, add_patches, patch_model) on the
    tiny Wan DiT: {native key: patched float32 tensor}, and the keys it did not load."""
    import logging

    import comfy.lora
    import comfy.lora_convert
    import comfy.sd
    import comfy.utils
    from lora_fixtures import comfy_base

    patcher = comfy.sd.load_diffusion_model_state_dict(comfy_base("t2v"), model_options={"dtype": torch.float32})
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    lora_sd = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(str(lora_path)))
    not_loaded = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("lora key not loaded:"):
                not_loaded.append(record.getMessage().split(":", 1)[1].strip())

    h = Collect(logging.WARNING)
    logging.getLogger().addHandler(h)
    try:
        patches = comfy.lora.load_lora(lora_sd, key_map)
    finally:
        logging.getLogger().removeHandler(h)
    keys = patcher.add_patches(patches, strength)
    patcher.patch_model()
    sd = patcher.model.diffusion_model.state_dict()
    out = {k[len("diffusion_model."):]: sd[k[len("diffusion_model."):]].detach().float().clone() for k in keys}
    patcher.unpatch_model()
    return out, not_loaded


@pytest.mark.parametrize("mode", ["merge", "adapter"])
def test_core_kinds_patch_like_comfyui_core_loader(comfy, mode):
    """`.diff`, `.diff_b`, DoRA, `lora_mid` (and Tucker LoHa, a modulation table, norms): Apply LoRA's patched weights
    equal ComfyUI's own loader's within 1e-6; the key ComfyUI does not load is skipped and listed, not refused."""
    path = _folder(comfy, "loras") / "core_kinds" / "mixed.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_core_kinds_file(torch.Generator().manual_seed(7)), str(path))
    strength = 0.8
    theirs, not_loaded = _comfy_patched(path, strength)
    assert not_loaded == ["diffusion_model.blocks.1.self_attn.k.lora_B.bias"]
    # ComfyUI accepts the modulation .diff but its patcher never writes a parameter of a module with submodules
    # ("random weights in non leaf modules"): unchanged there, so skipped (and listed) here
    assert torch.equal(theirs.pop("blocks.1.modulation"), build_preset_state_dict("tiny-t2v")["blocks.1.modulation"])
    assert len(theirs) == 13           # weights: 3 LoRA, 1 LoHa, 4 .diff; biases: 5 .diff_b

    prompt = _apply_prompt("core_kinds/mixed.safetensors", strength, mode)
    comfy.run(prompt)
    base, view, report = comfy.module("1"), comfy.module("3"), comfy.output("3", 1)
    assert "skipped 2 keys" in report and "blocks.1.self_attn.k.lora_B.bias" in report
    assert "blocks.1.modulation.diff" in report
    assert "DoRA 2" in report and ".diff 4" in report and ".diff_b 5" in report
    base_sd = build_preset_state_dict("tiny-t2v")
    for k, v in base.state_dict().items():           # the loader's preset weights are ComfyUI's base here
        if k in theirs:
            torch.testing.assert_close(v.float(), base_sd[k].float(), rtol=0, atol=0)

    ours = {k: v.detach().float().clone() for k, v in view.named_parameters()}
    if mode == "adapter":   # hooks apply the plain low-rank ΔW on the fly: add it to compare weights
        assert "merged into copy-on-write weights" in report
        for net in view.__dict__["_musubi_lora_networks"]:
            for m, _ in net.adapters().items():
                ours[f"{m}.weight"] += net.multiplier * net.delta_weight(m)
    for k, w in theirs.items():
        assert not torch.equal(w, base_sd[k].float()), k
        torch.testing.assert_close(ours[k], w, rtol=0, atol=1e-6, msg=k)
    # nothing else changed, and the shared model is untouched
    for k, v in base.named_parameters():
        if k not in theirs:
            assert torch.equal(ours[k], v.detach().float()), k
        torch.testing.assert_close(v.detach().float(), base_sd[k].float(), rtol=0, atol=0)

    prompt["3"]["inputs"]["strict"] = True
    msg = _error(comfy, prompt)
    assert "strict" in msg and "lora_B.bias" in msg
