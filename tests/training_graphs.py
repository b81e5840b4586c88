"""Prompt builders for the training-node tests (API format, the tiny presets). The dataset they read comes from the
`data` fixture in conftest.py (a test-only node holding a cached dataset)."""

from __future__ import annotations

SIZE = 32   # pixels of the cached test images and of the sampled frames


def train_prompt(out_dir, *, steps=12, max_steps=200, rank=8, lr=3e-3, attention="sdpa", dataset="cached",
                 seed=1, train_node=True, dropout=0.0) -> dict:
    p = {
        "1": {"class_type": "MusubiWanDiTLoader",
              "inputs": {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": attention}},
        "2": {"class_type": "MusubiTestCachedDataset", "inputs": {"name": dataset}},
        "3": {"class_type": "MusubiLoRAConfig",
              "inputs": {"network_kind": "lora", "rank": rank, "alpha": float(rank), "dropout": dropout,
                         "rank_dropout": dropout / 2, "module_dropout": dropout / 2}},
        "4": {"class_type": "MusubiOptimizerConfig",
              "inputs": {"optimizer_type": "AdamW", "learning_rate": lr, "max_grad_norm": 1.0,
                         "lr_scheduler": "constant", "lr_warmup_steps": "0"}},
        "5": {"class_type": "MusubiInitTraining",
              "inputs": {"model": ["1", 0], "dataset": ["2", 0], "lora_config": ["3", 0], "optimizer_config": ["4", 0],
                         "seed": seed, "max_train_steps": max_steps, "mixed_precision": "no",
                         "gradient_checkpointing": True, "gradient_accumulation_steps": 1,
                         "timestep_sampling": "shift", "discrete_flow_shift": 2.0, "sigmoid_scale": 1.0,
                         "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
                         "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": str(out_dir),
                         "output_name": "lora", "save_state": False, "attention_backend": "model"}},
    }
    if train_node:
        p["6"] = {"class_type": "MusubiTrainSteps", "inputs": {"session": ["5", 0], "steps": steps}}
        p["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 1]}}
    else:
        p["7"] = {"class_type": "MusubiSaveTrainedLoRA",
                  "inputs": {"session": ["5", 0], "format": "comfyui", "filename_prefix": "loras/never",
                             "dtype": "bf16", "save_to": "output"}}
    return p


def sample_nodes(p: dict, model_src, prefix: str, seed=5) -> None:
    """Text encode 'a red square', sample 1 frame at 32x32 with the given model, decode, preview. The DiT stays
    where sampling put it (offload_after off), so the memory tests can see the swapper that ran."""
    p.setdefault("20", {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5",
                                                                     "dtype": "fp32"}})
    p.setdefault("21", {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["20", 0],
                        "prompt": "a red square", "negative_prompt": "", "offload_after": True}})
    p.setdefault("22", {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                                      "cache_on_cpu": False}})
    p[f"{prefix}1"] = {"class_type": "MusubiWanSampler", "inputs": {
        "model": model_src, "embeds": ["21", 0], "width": SIZE, "height": SIZE, "frames": 1, "steps": 12,
        "guidance_scale": 1.0, "shift": 0.0, "solver": "euler", "seed": seed, "noise_device": "cpu",
        "offload_after": False}}
    p[f"{prefix}2"] = {"class_type": "MusubiWanVAEDecode", "inputs": {"vae": ["22", 0], "latents": [f"{prefix}1", 0],
                                                                     "tile_size": 0, "tile_overlap": 64}}
    p[f"{prefix}3"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{prefix}2", 0]}}


def networks(model) -> dict:
    return dict(model.__dict__.get("_musubi_adapter_networks", {}))


def sessions(comfy, node="5") -> list:
    reg = comfy.pack_module("nodes.registry").SESSIONS
    return [reg.get(k) for k in reg.keys() if isinstance(k, tuple) and k[1] == node]


def conditioned_train_prompt(out_dir, toml_path, *, dit: str, task: str, clip: bool, encode: dict, frames: int,
                             steps: int = 2) -> dict:
    """The whole I2V / FLF2V / Fun-Control training graph from the nodes (tiny presets, SIZE x SIZE): dataset from
    `toml_path` -> Cache Latents (`task`, CLIP vision when `clip`) -> Cache Text -> Init Training on `dit` with one
    validation prompt conditioned by `encode` (an encode node; it may use the VAE "3", CLIP vision "4" and the image
    "12") sampled every `steps` steps -> Train Steps (`steps`) -> Save Trained LoRA.

    Nodes: 1 DiT, 2 dataset, 3 VAE, 4 CLIP vision, 5 umT5, 6 Cache Latents, 7 Cache Text, 8 LoRA config, 9 optimizer,
    10 text encode, 12 image (`frames` x SIZE x SIZE), 13 encode, 14 validation prompt, 15 Init Training,
    16 Train Steps, 17 Save Trained LoRA, 18 samples preview, 19 Musubi Validate (the same prompt, after training),
    20 its preview."""
    base = train_prompt(out_dir, steps=steps, rank=4, lr=1e-3)
    init = base["5"]
    init["inputs"].update({"model": ["1", 0], "dataset": ["7", 0], "lora_config": ["8", 0],
                           "optimizer_config": ["9", 0], "validation_prompts": ["14", 0],
                           "validation_vae": ["3", 0], "validate_every_n_steps": steps})
    one_frame = encode["class_type"] == "MusubiWanOneFrameEncode"
    return {
        "1": {**base["1"], "inputs": {**base["1"]["inputs"], "model_name": dit}},
        "2": {"class_type": "MusubiDatasetFromTOML", "inputs": {"toml_path": str(toml_path)}},
        "3": {"class_type": "MusubiWanVAELoader", "inputs": {"vae_name": "preset:tiny-vae", "dtype": "fp32",
                                                             "cache_on_cpu": False}},
        "4": {"class_type": "MusubiClipVisionLoader", "inputs": {"clip_name": "preset:tiny-clip", "dtype": "fp32"}},
        "5": {"class_type": "MusubiUMT5Loader", "inputs": {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32"}},
        "6": {"class_type": "MusubiCacheLatents", "inputs": {
            "dataset": ["2", 0], "vae": ["3", 0], "task": task, "keep_cache": False, "workers": 0,
            **({"clip_vision": ["4", 0]} if clip else {})}},
        "7": {"class_type": "MusubiCacheTextEmbeddings", "inputs": {"dataset": ["6", 0], "text_encoder": ["5", 0],
                                                                   "keep_cache": False}},
        "8": base["3"], "9": base["4"],
        "10": {"class_type": "MusubiWanTextEncode", "inputs": {"text_encoder": ["5", 0], "prompt": "a red square",
                                                               "negative_prompt": "", "offload_after": True}},
        "12": {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": frames,
                                                      "color": 0xCC3322}},
        "13": encode,
        "14": {"class_type": "MusubiValidationPrompt", "inputs": {
            "embeds": ["10", 0], "width": SIZE, "height": SIZE, "frames": 1 if one_frame else frames, "seed": 3,
            "steps": 2, "guidance_scale": 1.0, "shift": 0.0, "image_embeds": ["13", 0]}},
        "15": init,
        "16": {"class_type": "MusubiTrainSteps", "inputs": {"session": ["15", 0], "steps": steps}},
        "17": {"class_type": "MusubiSaveTrainedLoRA", "inputs": {"session": ["16", 0], "format": "comfyui",
                                                                "filename_prefix": "loras/conditioned",
                                                                "dtype": "fp32", "save_to": "output"}},
        "18": {"class_type": "PreviewImage", "inputs": {"images": ["16", 5]}},
        "19": {"class_type": "MusubiValidate", "inputs": {
            "session": ["16", 0], "vae": ["3", 0], "embeds": ["10", 0], "width": SIZE, "height": SIZE,
            "frames": 1 if one_frame else frames, "steps": 2, "guidance_scale": 1.0, "shift": 0.0, "seed": 3,
            "image_embeds": ["13", 0]}},
        "20": {"class_type": "PreviewImage", "inputs": {"images": ["19", 0]}},
    }
