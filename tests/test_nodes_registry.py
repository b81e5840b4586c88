"""The model registry is bounded: a loader whose inputs change releases what it loaded before; a copy still held
elsewhere is handed back instead of loaded twice (issue 23 item 2). Counted in live objects, not timings."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

pytestmark = pytest.mark.comfy


def _prompt(dtype: str, second: str | None = None) -> dict:
    p = {"1": {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-t2v", "dtype": dtype,
                                                              "attention": "sdpa"}},
         "9": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                              "passthrough": ["1", 0]}}}
    if second is not None:
        p["2"] = {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": "preset:tiny-t2v", "dtype": second,
                                                                 "attention": "sdpa"}}
        p["10"] = {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                  "passthrough": ["2", 0]}}
    return p


def _dits(reg) -> list:
    return [k for k in reg.keys() if k[0] == "wan_dit"]


def _live_dits(comfy) -> int:
    """Live DiT modules (the class is taken from a loaded model: the Wan code may move between modules)."""
    gc.collect()
    cls = LOADED_CLASS[0]
    return sum(1 for o in gc.get_objects() if type(o) is cls)


LOADED_CLASS: list = []


@pytest.fixture
def models(comfy):
    reg = comfy.pack_module("nodes.registry").MODELS
    reg.release()
    comfy.executor.reset()
    yield reg
    comfy.executor.reset()
    reg.release()


def test_changing_a_loader_input_releases_the_copy_it_loaded_before(comfy, models):
    comfy.run(_prompt("fp32"))
    LOADED_CLASS[:] = [type(comfy.module("1"))]
    first = weakref.ref(comfy.module("1"))
    for dtype in ("bf16", "fp16", "fp32", "bf16"):
        comfy.run(_prompt(dtype))
        assert len(_dits(models)) == 1, _dits(models)
        assert _live_dits(comfy) == 1, "an earlier copy is still in memory"
    assert first() is None


def test_two_loaders_share_one_copy_and_keep_it_while_one_uses_it(comfy, models):
    comfy.run(_prompt("fp32", second="fp32"))
    LOADED_CLASS[:] = [type(comfy.module("1"))]
    assert comfy.module("1") is comfy.module("2") and len(_dits(models)) == 1
    comfy.run(_prompt("fp32", second="bf16"))      # node 2 moves on; node 1 still uses the fp32 copy
    assert len(_dits(models)) == 2 and _live_dits(comfy) == 2
    comfy.run(_prompt("bf16", second="bf16"))      # now nobody uses fp32
    assert len(_dits(models)) == 1 and _live_dits(comfy) == 1


def test_a_released_copy_still_held_elsewhere_is_handed_back_not_loaded_again(comfy, models):
    comfy.run(_prompt("fp32"))
    held = comfy.module("1")
    LOADED_CLASS[:] = [type(held)]                      # e.g. a training session still holds the model
    comfy.run(_prompt("bf16"))
    assert len(_dits(models)) == 1 and models.live_released() == 1
    comfy.run(_prompt("fp32"))
    assert comfy.module("1") is held and _live_dits(comfy) == 1   # the bf16 copy went when its output was replaced
    del held


def test_load_lora_releases_the_previous_file(comfy, models, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("a", "b"):
        save_file({"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(2, 32),
                   "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(32, 2)},
                  str(folder / f"{name}.safetensors"))
    comfy.b.folder_paths.add_model_folder_path("loras", str(folder))
    try:
        def prompt(name):
            return {"1": {"class_type": "MusubiLoadLoRA", "inputs": {"lora_name": f"{name}.safetensors"}},
                    "2": {"class_type": "MusubiLoRAInfo", "inputs": {"lora": ["1", 0]}}}
        comfy.run(prompt("a"))
        a = weakref.ref(comfy.output("1"))
        comfy.run(prompt("b"))
        gc.collect()
        assert a() is None and len([k for k in models.keys() if k[0] == "lora"]) == 1
    finally:
        comfy.b.folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))


def test_under_ram_pressure_a_load_first_releases_the_models_of_other_graphs(comfy, models, tmp_path, monkeypatch):
    """ComfyUI's RAM-pressure cache cannot free what the registry holds: when a new file does not fit in the
    available RAM, the models of loader nodes that are not in the running prompt go first."""
    from engine.families.wan.presets import write_preset_checkpoint

    registry = comfy.pack_module("nodes.registry")
    folder = tmp_path / "dits"
    folder.mkdir()
    write_preset_checkpoint("tiny-t2v", folder / "dit_a.safetensors", dtype=torch.float32, seed=0)
    write_preset_checkpoint("tiny-t2v", folder / "dit_b.safetensors", dtype=torch.float32, seed=1)
    comfy.b.folder_paths.add_model_folder_path("diffusion_models", str(folder))

    def graph(node: str, name: str) -> dict:
        return {node: {"class_type": "MusubiWanDiTLoader", "inputs": {"model_name": name, "dtype": "fp32",
                                                                      "attention": "sdpa"}},
                node + "9": {"class_type": "MusubiUnloadModels", "inputs": {"mode": "offload", "what": "models",
                                                                            "passthrough": [node, 0]}}}
    try:
        plenty, short = (lambda: 1 << 50), (lambda: 0)
        monkeypatch.setattr(registry, "available_ram", plenty, raising=False)   # both graphs stay loaded
        comfy.run(graph("1", "dit_a.safetensors"))
        comfy.run(graph("5", "dit_b.safetensors"))
        assert len(_dits(models)) == 2
        comfy.run(graph("1", "dit_a.safetensors"))
        a = weakref.ref(comfy.module("1"))
        monkeypatch.setattr(registry, "available_ram", short, raising=False)
        models.release(lambda k: k[0] == "wan_dit" and "dit_b.safetensors" in str(k[1]))
        comfy.run(graph("5", "dit_b.safetensors"))                           # another workflow loads a new file
        gc.collect()
        assert a() is None and len(_dits(models)) == 1, _dits(models)
    finally:
        comfy.b.folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(folder))
