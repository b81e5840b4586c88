"""Write the UI-format workflow files in workflows/ from compact descriptions below.

UI format is what ComfyUI's File -> Save writes (nodes with positional `widgets_values`, links as
[id, from, from_slot, to, to_slot, type]). Node input/output specs come from the real ComfyUI (booted in-process by
the test harness), so the files always match the nodes. The tests run every file in workflows/, and the browser test
drops one onto the real frontend. Re-run after changing a node's inputs:

    python scripts/build_workflows.py        (with the venv python; COMFYUI_DIR as for the tests)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the backport the pack depends on there
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# Each node: (id, type, widget values by name, {input name: (source id, output index)}, title or None)
TINY_T2V = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (4, "MusubiWanTextEncode", {"prompt": "a red square moving to the right", "negative_prompt": "",
                                "offload_after": True}, {"text_encoder": (2, 0)}),
    (5, "MusubiWanSampler", {"width": 64, "height": 48, "frames": 9, "steps": 6, "guidance_scale": 5.0, "shift": 0.0,
                             "solver": "unipc", "seed": 42, "noise_device": "cpu"},
     {"model": (1, 0), "embeds": (4, 0)}),
    (6, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (3, 0), "latents": (5, 0)}),
    (7, "MusubiSaveVideo", {"filename_prefix": "musubi/t2v", "crf": 19}, {"images": (6, 0), "fps": (6, 1)}),
    (8, "PreviewImage", {}, {"images": (6, 0)}),
]

TINY_I2V = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-i2v", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (4, "MusubiClipVisionLoader", {"clip_name": "preset:tiny-clip", "dtype": "fp32"}, {}),
    (5, "EmptyImage", {"width": 64, "height": 48, "batch_size": 1, "color": 0xCC3322}, {}),
    (6, "MusubiWanTextEncode", {"prompt": "the square starts to spin", "negative_prompt": "", "offload_after": True},
     {"text_encoder": (2, 0)}),
    (7, "MusubiWanImageEncode", {"width": 64, "height": 48, "frames": 9},
     {"vae": (3, 0), "clip_vision": (4, 0), "start_image": (5, 0)}),
    (8, "MusubiWanSampler", {"width": 64, "height": 48, "frames": 9, "steps": 6, "guidance_scale": 5.0, "shift": 0.0,
                             "solver": "unipc", "seed": 7, "noise_device": "cpu"},
     {"model": (1, 0), "embeds": (6, 0), "image_embeds": (7, 0)}),
    (9, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (3, 0), "latents": (8, 0)}),
    (10, "CreateVideo", {"fps": 16.0}, {"images": (9, 0)}),
    (11, "SaveVideo", {"filename_prefix": "musubi/i2v", "format": "auto", "codec": "auto"}, {"video": (10, 0)}),
]

# Self-contained LoRA toolbox demo: no LoRA file exists in a fresh install, so the graph makes two random LoRAs, saves
# them (Save also outputs the LoRA read back and the file path), converts one by path, averages both by path (post-hoc
# EMA), applies the converted + averaged LoRAs as adapters, chains a merged one on top, and samples with the result.
LORA_TOOLS = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (4, "MusubiWanTextEncode", {"prompt": "a red square moving to the right", "negative_prompt": "",
                                "offload_after": True}, {"text_encoder": (2, 0)}),
    (5, "MusubiCreateRandomLoRA", {"rank": 4, "seed": 1}, {"model": (1, 0)}),
    (6, "MusubiSaveLoRA", {"filename_prefix": "musubi_demo/random_lora_a", "format": "comfyui", "dtype": "fp32",
                           "save_to": "output", "metadata": '{"title": "random demo LoRA A"}'}, {"lora": (5, 0)}),
    (7, "MusubiCreateRandomLoRA", {"rank": 4, "seed": 2}, {"model": (1, 0)}),
    (8, "MusubiSaveLoRA", {"filename_prefix": "musubi_demo/random_lora_b", "format": "comfyui", "dtype": "fp32",
                           "save_to": "output", "metadata": ""}, {"lora": (7, 0)}),
    (9, "MusubiLoRAInfo", {}, {"lora": (6, 0)}),
    (10, "MusubiConvertLoRA", {"lora_name": "none", "format": "diffusers",
                               "output_name": "musubi_demo/random_lora_a_diffusers", "save_to": "output",
                               "dtype": "fp32"}, {"lora_path": (6, 1)}),
    (11, "StringConcatenate", {"delimiter": "\n"}, {"string_a": (6, 1), "string_b": (8, 1)}),
    (12, "MusubiLoRAPostHocEMA", {"beta": 0.9, "beta2": 0.0, "sigma_rel": 0.0, "sort_by_mtime": False,
                                  "output_name": "musubi_demo/random_lora_ema", "save_to": "output"},
     {"files": (11, 0)}),
    (13, "MusubiApplyLoRA", {"strength": 0.8, "mode": "adapter", "block_filter": "", "strength_2": 0.5},
     {"model": (1, 0), "lora": (10, 0), "lora_2": (12, 0)}),
    (14, "MusubiApplyLoRA", {"strength": 0.5, "mode": "merge", "block_filter": "1", "strength_2": 1.0},
     {"model": (13, 0), "lora": (8, 0)}),
    (15, "MusubiWanSampler", {"width": 64, "height": 48, "frames": 9, "steps": 6, "guidance_scale": 5.0,
                              "shift": 0.0, "solver": "unipc", "seed": 42, "noise_device": "cpu"},
     {"model": (14, 0), "embeds": (4, 0)}),
    (16, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (3, 0), "latents": (15, 0)}),
    (17, "PreviewImage", {}, {"images": (16, 0)}),
]

# Self-contained dataset demo: a solid-color image made in the graph (media always exists on a fresh install; no
# ImageBatch, which current ComfyUI deprecates), one caption per line, cached with the tiny VAE and umT5
# (re-queueing reuses the cache), then the debug preview.
DATASET_CACHE = [
    (1, "EmptyImage", {"width": 64, "height": 48, "batch_size": 1, "color": 0xCC3322}, {}),
    (4, "MusubiDatasetFromImages", {"captions": "a plain red picture", "width": 64, "height": 48,
                                    "num_repeats": 1, "as_video": False, "cache_directory": "", "batch_size": 1},
     {"images": (1, 0)}),
    (5, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (6, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (7, "MusubiCacheLatents", {"task": "t2v", "keep_cache": False, "workers": 2}, {"dataset": (4, 0), "vae": (5, 0)}),
    (8, "MusubiCacheTextEmbeddings", {"keep_cache": False}, {"dataset": (7, 0), "text_encoder": (6, 0)}),
    (9, "MusubiDatasetPreview", {"max_items": 8, "frames_per_clip": 1, "tile_size": 128}, {"dataset": (8, 0)}),
    (10, "PreviewImage", {}, {"images": (9, 0)}),
    (11, "PreviewAny", {}, {"source": (9, 1)}),
]

# The product's heart in one graph, self-contained on a fresh install (tiny presets, a dataset made in the graph):
# cache a dataset, train a LoRA on the in-memory model, watch loss and a validation sample, save the LoRA, then
# generate with the LoRA still in memory. Every stage shares the one loaded DiT (training uses a view of it).
TRAIN_THEN_GENERATE = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (4, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xCC2222}, {}),
    (7, "MusubiDatasetFromImages", {"captions": "a red square", "width": 48, "height": 48,
                                    "num_repeats": 1, "as_video": False, "cache_directory": "", "batch_size": 1},
     {"images": (4, 0)}),
    (8, "MusubiCacheLatents", {"task": "t2v", "keep_cache": False, "workers": 0}, {"dataset": (7, 0), "vae": (3, 0)}),
    (9, "MusubiCacheTextEmbeddings", {"keep_cache": False}, {"dataset": (8, 0), "text_encoder": (2, 0)}),
    (10, "MusubiLoRAConfig", {"network_kind": "lora", "rank": 8, "alpha": 8.0, "dropout": 0.0, "rank_dropout": 0.0,
                              "module_dropout": 0.0}, {}),
    (11, "MusubiOptimizerConfig", {"optimizer_type": "AdamW", "learning_rate": 3e-3, "max_grad_norm": 1.0,
                                   "lr_scheduler": "constant", "lr_warmup_steps": "0"}, {}),
    (12, "MusubiInitTraining", {"seed": 1, "max_train_steps": 60, "mixed_precision": "no",
                                "gradient_checkpointing": True, "gradient_accumulation_steps": 1,
                                "timestep_sampling": "shift", "discrete_flow_shift": 2.0, "sigmoid_scale": 1.0,
                                "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
                                "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": "",
                                "output_name": "tiny_wan_lora", "save_state": False, "attention_backend": "model",
                                "save_format": "comfyui"},
     {"model": (1, 0), "dataset": (9, 0), "lora_config": (10, 0), "optimizer_config": (11, 0)}),
    (13, "MusubiTrainSteps", {"steps": 60, "train_on_every_queue": False}, {"session": (12, 0)}),
    (14, "PreviewImage", {}, {"images": (13, 1)}),
    (15, "MusubiWanTextEncode", {"prompt": "a red square", "negative_prompt": "", "offload_after": True},
     {"text_encoder": (2, 0)}),
    (16, "MusubiValidate", {"width": 48, "height": 48, "frames": 1, "steps": 8, "guidance_scale": 1.0, "shift": 0.0,
                            "seed": 3}, {"session": (13, 0), "vae": (3, 0), "embeds": (15, 0)}),
    (17, "PreviewImage", {}, {"images": (16, 0)}),
    (18, "MusubiSaveTrainedLoRA", {"format": "comfyui", "filename_prefix": "loras/tiny_wan_lora", "dtype": "bf16",
                                   "save_to": "output"}, {"session": (16, 1)}),
    (19, "MusubiWanSampler", {"width": 48, "height": 48, "frames": 5, "steps": 10, "guidance_scale": 1.0, "shift": 0.0,
                              "solver": "unipc", "seed": 42, "noise_device": "cpu"},
     {"model": (13, 4), "embeds": (15, 0)}),
    (20, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (3, 0), "latents": (19, 0)}),
    (21, "MusubiSaveVideo", {"filename_prefix": "musubi/train_then_generate", "crf": 19},
     {"images": (20, 0), "fps": (20, 1)}),
    (22, "PreviewImage", {}, {"images": (20, 0)}),
]

# The main job: the trained demo models (demo_models/, docs/demo.md) generate the prompted shape, colour and motion;
# then a LoRA learns a colour the base model has never seen (magenta, from clips made in the graph) and the same
# prompt and seed are generated again with the LoRA still in memory. Before / after go side by side.
DEMO_LOADERS = {
    "wan": [
        (1, "MusubiWanDiTLoader", {"model_name": "demo:wan2.1_demo_t2v.safetensors", "dtype": "fp32",
                                   "attention": "sdpa"}, {}),
        (2, "MusubiUMT5Loader", {"text_encoder_name": "demo:umt5_demo.safetensors", "dtype": "fp32",
                                 "tokenizer_path": ""}, {}),
        (3, "MusubiWanVAELoader", {"vae_name": "demo:wan2.1_demo_vae.safetensors", "dtype": "fp32",
                                   "cache_on_cpu": False}, {}),
    ],
    "hunyuan": [
        (1, "MusubiHunyuanDiTLoader", {"model_name": "demo:hunyuan_video_demo_t2v.safetensors", "dtype": "fp32",
                                       "attention": "sdpa"}, {}),
        (2, "MusubiHunyuanTextEncoderLoader", {"llm_name": "demo:llava_llama3_demo.safetensors",
                                               "clip_name": "demo:clip_l_demo.safetensors", "dtype": "fp32",
                                               "fp8_llm": False}, {}),
        (3, "MusubiHunyuanVAELoader", {"vae_name": "demo:hunyuan_video_demo_vae.safetensors", "dtype": "fp32"}, {}),
    ],
}
DEMO_SAMPLE = {"width": 64, "height": 64, "frames": 17, "steps": 20, "guidance_scale": 5.0, "shift": 3.0,
               "solver": "unipc", "seed": 42, "noise_device": "cpu"}
# per family: text encode, sampler (its widgets), VAE decode (its widgets). The HunyuanVideo demo DiT has no
# guidance embedder (it is not guidance-distilled): real CFG, embedded guidance 0.
DEMO_NODES = {
    "wan": ("MusubiWanTextEncode", "MusubiWanSampler", DEMO_SAMPLE, "MusubiWanVAEDecode",
            {"tile_size": 0, "tile_overlap": 64}),
    "hunyuan": ("MusubiHunyuanTextEncode", "MusubiHunyuanSampler", {**DEMO_SAMPLE, "embedded_guidance": 0.0},
                "MusubiHunyuanVAEDecode", {"tile_size": 256, "tile_overlap": 64, "temporal_tile": 64,
                                           "temporal_overlap": 16}),
}
DEMO_LORA_PROMPT = "a magenta circle moving up"


def _demo_generate(family: str, first_id: int, prompt: str, model: tuple[int, int], prefix: str, title: str) -> list:
    """Text Encode -> Sampler -> VAE Decode -> Save Video, ids first_id .. first_id + 3."""
    encode, sampler, sample, decode, decoding = DEMO_NODES[family]
    t, s, d, v = range(first_id, first_id + 4)
    return [
        (t, encode, {"prompt": prompt, "negative_prompt": "", "offload_after": False}, {"text_encoder": (2, 0)},
         f"{title}: prompt"),
        (s, sampler, sample, {"model": model, "embeds": (t, 0)}, f"{title}: sample"),
        (d, decode, decoding, {"vae": (3, 0), "latents": (s, 0)}),
        (v, "MusubiSaveVideo", {"filename_prefix": f"musubi/{prefix}", "crf": 12},
         {"images": (d, 0), "fps": (d, 1)}, title),
    ]


def _demo_lora(name: str, title: str, concept: dict, cache: dict, cache_links: dict | None = None,
               dataset: dict | None = None) -> list:
    """Nodes 12-21 of a demo: 24 clips of the new concept (`concept`: colours, shapes, motions) made in the graph,
    cached, a rank-16 LoRA trained 300 steps on the loaded DiT (node 1), saved as `name`."""
    return [
        (12, "MusubiDemoShapeClips", {**concept, "clips_per_combination": 2, "variation": 7, "frames": 17,
                                      "width": 64, "height": 64}, {}, title),
        (13, "MusubiDatasetFromImages", {"width": 64, "height": 64, "num_repeats": 1, "as_video": True,
                                         "cache_directory": "", "batch_size": 1, **(dataset or {})},
         {"images": (12, 0), "captions": (12, 1), "frames_per_clip": (12, 2)}),
        (14, "MusubiCacheLatents", {**cache, "keep_cache": False, "workers": 0},
         {"dataset": (13, 0), "vae": (3, 0), **(cache_links or {})}),
        (15, "MusubiCacheTextEmbeddings", {"keep_cache": False}, {"dataset": (14, 0), "text_encoder": (2, 0)}),
        (16, "MusubiLoRAConfig", {"network_kind": "lora", "rank": 16, "alpha": 16.0, "dropout": 0.0,
                                  "rank_dropout": 0.0, "module_dropout": 0.0}, {}),
        (17, "MusubiOptimizerConfig", {"optimizer_type": "AdamW", "learning_rate": 2e-3, "max_grad_norm": 1.0,
                                       "lr_scheduler": "constant", "lr_warmup_steps": "0"}, {}),
        (18, "MusubiInitTraining", {"seed": 1, "max_train_steps": 300, "mixed_precision": "no",
                                    "gradient_checkpointing": False, "gradient_accumulation_steps": 1,
                                    "timestep_sampling": "shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
                                    "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
                                    "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": "",
                                    "output_name": name, "save_state": False,
                                    "attention_backend": "model", "save_format": "comfyui"},
         {"model": (1, 0), "dataset": (15, 0), "lora_config": (16, 0), "optimizer_config": (17, 0)}),
        (19, "MusubiTrainSteps", {"steps": 300, "train_on_every_queue": False}, {"session": (18, 0)},
         "Train the LoRA"),
        (20, "PreviewImage", {}, {"images": (19, 1)}, "Loss"),
        (21, "MusubiSaveTrainedLoRA", {"format": "comfyui", "filename_prefix": f"loras/{name}",
                                       "dtype": "bf16", "save_to": "output"}, {"session": (19, 0)}),
    ]


def _demo(family: str, prefix: str) -> list:
    """The demo: the base model generates a prompt it was trained on and one in a colour it never saw (magenta);
    magenta clips made in the graph train a LoRA on the loaded DiT, then the same prompt and seed again."""
    return DEMO_LOADERS[family] + \
        _demo_generate(family, 4, "a green triangle moving up", (1, 0), f"{prefix}_base", "Base model") + \
        _demo_generate(family, 8, DEMO_LORA_PROMPT, (1, 0), f"{prefix}_before", "New colour, before the LoRA") + \
        _demo_lora(f"{prefix}_magenta_lora", "Clips of the new colour",
                   {"colours": "magenta", "shapes": "square, circle, triangle", "motions": "right, left, up, down"},
                   {"task": "t2v"}) + \
        _demo_generate(family, 22, DEMO_LORA_PROMPT, (19, 4), f"{prefix}_after", "New colour, after the LoRA")


WAN_DEMO = _demo("wan", "demo")
HUNYUAN_DEMO = _demo("hunyuan", "hunyuan_demo")

# FramePack's demo is image to video: each generation starts from the first frame of a demo clip of its prompt, and
# the LoRA teaches a motion the base model never saw (a shape moving diagonally: down and to the right), since the
# start image already shows the colour and the shape. Same node ids as the text-to-video demos for what they share;
# 30 and up for the start images.
FRAMEPACK_DEMO_SAMPLE = {"video_seconds": 1.0, "sections": 1, "latent_window_size": 4, "steps": 20,
                         "embedded_guidance": 10.0, "guidance_scale": 5.0, "guidance_rescale": 0.0, "shift": 3.0,
                         "solver": "unipc", "f1": False, "seed": 42, "noise_device": "cpu"}
FRAMEPACK_DEMO_LORA_PROMPT = "a red square moving diagonally"


def _framepack_start(first_id: int, clip: tuple[str, str, str], title: str) -> list:
    """Demo Shape Clips (one clip: colour, shape, motion) -> FramePack Image Encode (its first frame), ids first_id,
    first_id + 1."""
    colour, shape, motion = clip
    return [
        (first_id, "MusubiDemoShapeClips", {"colours": colour, "shapes": shape, "motions": motion,
                                            "clips_per_combination": 1, "variation": 42, "frames": 17, "width": 64,
                                            "height": 64}, {}, f"{title}: start image"),
        (first_id + 1, "MusubiFramePackImageEncode", {"width": 64, "height": 64},
         {"vae": (3, 0), "clip_vision": (30, 0), "start_image": (first_id, 0)}),
    ]


def _framepack_generate(first_id: int, prompt: str, model: tuple[int, int], start: int, prefix: str,
                        title: str) -> list:
    """Text Encode -> Sampler (from the start image `start`) -> VAE Decode -> Save Video, ids first_id .. +3."""
    t, s, d, v = range(first_id, first_id + 4)
    return [
        (t, "MusubiFramePackTextEncode", {"prompt": prompt, "negative_prompt": "", "offload_after": False},
         {"text_encoder": (2, 0)}, f"{title}: prompt"),
        (s, "MusubiFramePackSampler", FRAMEPACK_DEMO_SAMPLE,
         {"model": model, "embeds": (t, 0), "image_embeds": (start, 0)}, f"{title}: sample"),
        (d, "MusubiFramePackVAEDecode", {"mode": "sections", "tile_size": 256, "tile_overlap": 64,
                                         "temporal_tile": 64, "temporal_overlap": 16},
         {"vae": (3, 0), "latents": (s, 0)}),
        (v, "MusubiSaveVideo", {"filename_prefix": f"musubi/{prefix}", "crf": 12},
         {"images": (d, 0), "fps": (d, 1)}, title),
    ]


def _framepack_demo(prefix: str) -> list:
    base_prompt = "a green triangle moving up"
    return [
        (1, "MusubiFramePackDiTLoader", {"model_name": "demo:framepack_demo_i2v.safetensors", "dtype": "fp32",
                                         "attention": "sdpa"}, {}),
        (2, "MusubiFramePackTextEncoderLoader", {"llm_name": "demo:llava_llama3_demo.safetensors",
                                                 "clip_name": "demo:clip_l_demo.safetensors", "dtype": "fp32",
                                                 "fp8_llm": False}, {}),
        (3, "MusubiFramePackVAELoader", {"vae_name": "demo:hunyuan_video_demo_vae.safetensors", "dtype": "fp32"},
         {}),
        (30, "MusubiFramePackImageEncoderLoader", {"image_encoder_name": "demo:siglip_demo.safetensors",
                                                   "dtype": "fp32"}, {}),
    ] + _framepack_start(31, ("green", "triangle", "up"), "Base model") + \
        _framepack_generate(4, base_prompt, (1, 0), 32, f"{prefix}_base", "Base model") + \
        _framepack_start(33, ("red", "square", "diagonally"), "New motion") + \
        _framepack_generate(8, FRAMEPACK_DEMO_LORA_PROMPT, (1, 0), 34, f"{prefix}_before",
                            "New motion, before the LoRA") + \
        _demo_lora(f"{prefix}_diagonal_lora", "Clips of the new motion",
                   {"colours": "red, green, blue, yellow", "shapes": "square, circle, triangle",
                    "motions": "diagonally"},
                   {"task": "i2v"}, {"clip_vision": (30, 0)}, {"fp_latent_window_size": 4}) + \
        _framepack_generate(22, FRAMEPACK_DEMO_LORA_PROMPT, (19, 4), 34, f"{prefix}_after",
                            "New motion, after the LoRA")


FRAMEPACK_DEMO = _framepack_demo("framepack_demo")

# HunyuanVideo on its tiny presets: the text-encoder pair (LLaVA-LLaMA-3 + CLIP-L) feeds the encode node; embedded
# guidance 6.0 without real CFG (the cfg-distilled model's default), Euler, flow shift 7.
HUNYUAN_LOADERS = [
    (1, "MusubiHunyuanDiTLoader", {"model_name": "preset:tiny", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiHunyuanTextEncoderLoader", {"llm_name": "preset:tiny-llava-llama", "clip_name": "preset:tiny-clip-l",
                                           "dtype": "fp32", "fp8_llm": False}, {}),
    (3, "MusubiHunyuanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32"}, {}),
]
HUNYUAN_T2V = HUNYUAN_LOADERS + [
    (4, "MusubiHunyuanTextEncode", {"prompt": "a red square moving to the right", "negative_prompt": "",
                                    "offload_after": True}, {"text_encoder": (2, 0)}),
    (5, "MusubiHunyuanSampler", {"width": 64, "height": 48, "frames": 9, "steps": 6, "embedded_guidance": 6.0,
                                 "guidance_scale": 1.0, "shift": 7.0, "solver": "euler", "seed": 42,
                                 "noise_device": "cpu"}, {"model": (1, 0), "embeds": (4, 0)}),
    (6, "MusubiHunyuanVAEDecode", {"tile_size": 256, "tile_overlap": 64, "temporal_tile": 64, "temporal_overlap": 16},
     {"vae": (3, 0), "latents": (5, 0)}),
    (7, "MusubiSaveVideo", {"filename_prefix": "musubi/hunyuan_t2v", "crf": 19}, {"images": (6, 0), "fps": (6, 1)}),
    (8, "PreviewImage", {}, {"images": (6, 0)}),
]

# The train-then-generate graph on HunyuanVideo: the same generic dataset, caching, training and LoRA nodes as Wan's;
# only the loaders, the encode, the sampler and the decode are the family's.
HUNYUAN_TRAIN_THEN_GENERATE = HUNYUAN_LOADERS + [
    (4, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xCC2222}, {}),
    (7, "MusubiDatasetFromImages", {"captions": "a red square", "width": 48, "height": 48,
                                    "num_repeats": 1, "as_video": False, "cache_directory": "", "batch_size": 1},
     {"images": (4, 0)}),
    (8, "MusubiCacheLatents", {"task": "t2v", "keep_cache": False, "workers": 0}, {"dataset": (7, 0), "vae": (3, 0)}),
    (9, "MusubiCacheTextEmbeddings", {"keep_cache": False}, {"dataset": (8, 0), "text_encoder": (2, 0)}),
    (10, "MusubiLoRAConfig", {"network_kind": "lora", "rank": 8, "alpha": 8.0, "dropout": 0.0, "rank_dropout": 0.0,
                              "module_dropout": 0.0}, {}),
    (11, "MusubiOptimizerConfig", {"optimizer_type": "AdamW", "learning_rate": 3e-3, "max_grad_norm": 1.0,
                                   "lr_scheduler": "constant", "lr_warmup_steps": "0"}, {}),
    (15, "MusubiHunyuanTextEncode", {"prompt": "a red square", "negative_prompt": "", "offload_after": True},
     {"text_encoder": (2, 0)}),
    (23, "MusubiValidationPrompt", {"width": 48, "height": 48, "frames": 1, "seed": 3, "steps": 8,
                                    "guidance_scale": 1.0, "shift": 0.0, "embedded_guidance": 0.0},
     {"embeds": (15, 0)}),
    (12, "MusubiInitTraining", {"seed": 1, "max_train_steps": 60, "mixed_precision": "no",
                                "gradient_checkpointing": True, "gradient_accumulation_steps": 1,
                                "timestep_sampling": "shift", "discrete_flow_shift": 2.0, "sigmoid_scale": 1.0,
                                "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
                                "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": "",
                                "output_name": "tiny_hunyuan_lora", "save_state": False,
                                "attention_backend": "model", "save_format": "comfyui",
                                "validate_every_n_steps": 30},
     {"model": (1, 0), "dataset": (9, 0), "lora_config": (10, 0), "optimizer_config": (11, 0),
      "validation_prompts": (23, 0), "validation_vae": (3, 0)}),
    (13, "MusubiTrainSteps", {"steps": 60, "train_on_every_queue": False}, {"session": (12, 0)}),
    (14, "PreviewImage", {}, {"images": (13, 1)}),
    (16, "MusubiValidate", {"width": 48, "height": 48, "frames": 1, "steps": 8, "guidance_scale": 1.0, "shift": 0.0,
                            "seed": 3}, {"session": (13, 0), "vae": (3, 0), "embeds": (15, 0)}),
    (17, "PreviewImage", {}, {"images": (16, 0)}),
    (18, "MusubiSaveTrainedLoRA", {"format": "comfyui", "filename_prefix": "loras/tiny_hunyuan_lora",
                                   "dtype": "bf16", "save_to": "output"}, {"session": (16, 1)}),
    (19, "MusubiHunyuanSampler", {"width": 48, "height": 48, "frames": 5, "steps": 10, "embedded_guidance": 6.0,
                                  "guidance_scale": 1.0, "shift": 7.0, "solver": "euler", "seed": 42,
                                  "noise_device": "cpu"}, {"model": (13, 4), "embeds": (15, 0)}),
    (20, "MusubiHunyuanVAEDecode", {"tile_size": 256, "tile_overlap": 64, "temporal_tile": 64,
                                    "temporal_overlap": 16}, {"vae": (3, 0), "latents": (19, 0)}),
    (21, "MusubiSaveVideo", {"filename_prefix": "musubi/hunyuan_train_then_generate", "crf": 19},
     {"images": (20, 0), "fps": (20, 1)}),
    (22, "PreviewImage", {}, {"images": (20, 0)}),
]

# FramePack on its tiny presets: HunyuanVideo's VAE and text pair and the SigLIP image encoder loaded for FramePack;
# a start image, per-section prompts in Musubi's SPEC syntax, a second start image for the last section, two sections
# of 3 latents sampled by the original schedule (UniPC, embedded guidance 10, dynamic shift, MagCache with the
# built-in table), decoded per section.
FRAMEPACK_LOADERS = [
    (1, "MusubiFramePackDiTLoader", {"model_name": "preset:tiny", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiFramePackTextEncoderLoader", {"llm_name": "preset:tiny-llava-llama",
                                             "clip_name": "preset:tiny-clip-l", "dtype": "fp32", "fp8_llm": False},
     {}),
    (3, "MusubiFramePackVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32"}, {}),
    (4, "MusubiFramePackImageEncoderLoader", {"image_encoder_name": "preset:tiny-siglip", "dtype": "fp32"}, {}),
]
FRAMEPACK_I2V = FRAMEPACK_LOADERS + [
    (5, "EmptyImage", {"width": 64, "height": 48, "batch_size": 1, "color": 0xCC3322}, {}),
    (6, "EmptyImage", {"width": 64, "height": 48, "batch_size": 1, "color": 0x2244CC}, {}),
    (7, "MusubiFramePackTextEncode", {"prompt": "0:a red square;;;-1:the square turns blue", "negative_prompt": "",
                                      "offload_after": True}, {"text_encoder": (2, 0)}),
    (8, "MusubiFramePackImageEncode", {"width": 64, "height": 48},
     {"vae": (3, 0), "clip_vision": (4, 0), "start_image": (5, 0)}),
    (9, "MusubiFramePackImageEncode", {"width": 64, "height": 48},
     {"vae": (3, 0), "clip_vision": (4, 0), "start_image": (6, 0)}),
    (10, "MusubiFramePackSectionImage", {"section": "-1"}, {"image_embeds": (9, 0)}),
    (11, "MusubiFramePackSampler", {"video_seconds": 5.0, "sections": 2, "latent_window_size": 3, "steps": 6,
                                    "embedded_guidance": 10.0, "guidance_scale": 1.0, "guidance_rescale": 0.0,
                                    "shift": 0.0, "solver": "unipc", "f1": False, "seed": 42, "noise_device": "cpu"},
     {"model": (1, 0), "embeds": (7, 0), "image_embeds": (8, 0), "section_images": (10, 0), "magcache": (15, 0)}),
    (12, "MusubiFramePackVAEDecode", {"mode": "sections", "tile_size": 256, "tile_overlap": 64, "temporal_tile": 64,
                                      "temporal_overlap": 16}, {"vae": (3, 0), "latents": (11, 0)}),
    (13, "MusubiSaveVideo", {"filename_prefix": "musubi/framepack_i2v", "crf": 19}, {"images": (12, 0), "fps": (12, 1)}),
    (14, "PreviewImage", {}, {"images": (12, 0)}),
    (15, "MusubiMagCache", {"mag_ratios": "", "retention_ratio": 0.2, "threshold": 0.24, "max_skips": 6,
                            "calibrate": False}, {}),
]

# Kisekaeichi (one-frame inference): the reference image (left half masked out) at RoPE index 0 and the clothing
# image at 10, the new frame at index 1, no post / 2x / 4x clean latents (Musubi's recommended options).
FRAMEPACK_ONE_FRAME = FRAMEPACK_LOADERS + [
    (5, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xDDBB99}, {}),
    (6, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xCC2222}, {}),
    (7, "SolidMask", {"value": 0.0, "width": 48, "height": 48}, {}),
    (8, "SolidMask", {"value": 1.0, "width": 24, "height": 48}, {}),
    (9, "MaskComposite", {"x": 0, "y": 0, "operation": "add"}, {"destination": (7, 0), "source": (8, 0)}),
    (10, "MusubiFramePackTextEncode", {"prompt": "the woman wears the red dress", "negative_prompt": "",
                                       "offload_after": True}, {"text_encoder": (2, 0)}),
    (11, "MusubiFramePackImageEncode", {"width": 48, "height": 48},
     {"vae": (3, 0), "clip_vision": (4, 0), "start_image": (5, 0)}),
    (12, "MusubiFramePackControlImage", {"width": 48, "height": 48}, {"vae": (3, 0), "image": (5, 0), "mask": (9, 0)}),
    (13, "MusubiFramePackControlImage", {"width": 48, "height": 48},
     {"vae": (3, 0), "image": (6, 0), "previous": (12, 0)}),
    (14, "MusubiFramePackOneFrameSampler", {"target_index": 1, "control_index": "0;10", "no_post": True,
                                            "no_2x": True, "no_4x": True, "latent_window_size": 9, "steps": 6,
                                            "embedded_guidance": 10.0, "guidance_scale": 1.0,
                                            "guidance_rescale": 0.0, "shift": 0.0, "solver": "unipc", "seed": 42,
                                            "noise_device": "cpu"},
     {"model": (1, 0), "embeds": (10, 0), "image_embeds": (11, 0), "control_images": (13, 0)}),
    (15, "MusubiFramePackVAEDecode", {"mode": "sections", "tile_size": 256, "tile_overlap": 64, "temporal_tile": 64,
                                      "temporal_overlap": 16}, {"vae": (3, 0), "latents": (14, 0)}),
    (16, "PreviewImage", {}, {"images": (15, 0)}),
]

# Train a FramePack LoRA: a 37-frame video made in the graph (one section of FramePack's 9-latent window), cached
# with the FramePack VAE and the SigLIP encoder (section caches), captions with the text pair, trained with a
# validation sample from a start image, then the trained model generates from the same start image.
FRAMEPACK_TRAIN_THEN_GENERATE = FRAMEPACK_LOADERS + [
    (5, "EmptyImage", {"width": 48, "height": 48, "batch_size": 37, "color": 0xCC2222}, {}),
    (6, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xCC2222}, {}),
    (7, "MusubiDatasetFromImages", {"captions": "a red square", "width": 48, "height": 48, "num_repeats": 1,
                                    "as_video": True, "cache_directory": "", "batch_size": 1}, {"images": (5, 0)}),
    (8, "MusubiCacheLatents", {"task": "i2v", "keep_cache": False, "workers": 0},
     {"dataset": (7, 0), "vae": (3, 0), "clip_vision": (4, 0)}),
    (9, "MusubiCacheTextEmbeddings", {"keep_cache": False}, {"dataset": (8, 0), "text_encoder": (2, 0)}),
    (10, "MusubiLoRAConfig", {"network_kind": "lora", "rank": 8, "alpha": 8.0, "dropout": 0.0, "rank_dropout": 0.0,
                              "module_dropout": 0.0}, {}),
    (11, "MusubiOptimizerConfig", {"optimizer_type": "AdamW", "learning_rate": 3e-3, "max_grad_norm": 1.0,
                                   "lr_scheduler": "constant", "lr_warmup_steps": "0"}, {}),
    (15, "MusubiFramePackTextEncode", {"prompt": "a red square", "negative_prompt": "", "offload_after": True},
     {"text_encoder": (2, 0)}),
    (24, "MusubiFramePackImageEncode", {"width": 48, "height": 48},
     {"vae": (3, 0), "clip_vision": (4, 0), "start_image": (6, 0)}),
    (23, "MusubiValidationPrompt", {"width": 48, "height": 48, "frames": 1, "seed": 3, "steps": 4,
                                    "guidance_scale": 1.0, "shift": 0.0, "embedded_guidance": 0.0},
     {"embeds": (15, 0), "image_embeds": (24, 0)}),
    (12, "MusubiInitTraining", {"seed": 1, "max_train_steps": 20, "mixed_precision": "no",
                                "gradient_checkpointing": True, "gradient_accumulation_steps": 1,
                                "timestep_sampling": "shift", "discrete_flow_shift": 2.0, "sigmoid_scale": 1.0,
                                "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
                                "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": "",
                                "output_name": "tiny_framepack_lora", "save_state": False,
                                "attention_backend": "model", "save_format": "comfyui",
                                "validate_every_n_steps": 10},
     {"model": (1, 0), "dataset": (9, 0), "lora_config": (10, 0), "optimizer_config": (11, 0),
      "validation_prompts": (23, 0), "validation_vae": (3, 0)}),
    (13, "MusubiTrainSteps", {"steps": 20, "train_on_every_queue": False}, {"session": (12, 0)}),
    (14, "PreviewImage", {}, {"images": (13, 1)}),
    (18, "MusubiSaveTrainedLoRA", {"format": "comfyui", "filename_prefix": "loras/tiny_framepack_lora",
                                   "dtype": "bf16", "save_to": "output"}, {"session": (13, 0)}),
    (19, "MusubiFramePackSampler", {"video_seconds": 5.0, "sections": 1, "latent_window_size": 9, "steps": 6,
                                    "embedded_guidance": 10.0, "guidance_scale": 1.0, "guidance_rescale": 0.0,
                                    "shift": 0.0, "solver": "unipc", "f1": False, "seed": 42, "noise_device": "cpu"},
     {"model": (13, 4), "embeds": (15, 0), "image_embeds": (24, 0)}),
    (20, "MusubiFramePackVAEDecode", {"mode": "sections", "tile_size": 256, "tile_overlap": 64, "temporal_tile": 64,
                                      "temporal_overlap": 16}, {"vae": (3, 0), "latents": (19, 0)}),
    (21, "MusubiSaveVideo", {"filename_prefix": "musubi/framepack_train_then_generate", "crf": 19},
     {"images": (20, 0), "fps": (20, 1)}),
    (22, "PreviewImage", {}, {"images": (20, 0)}),
]

# Wan 2.2 A14B on tiny expert presets: the high- and low-noise DiTs paired (the release's boundary, both on the GPU),
# per-expert guidance (3.0 low, 4.0 high), decoded with the Wan 2.1 VAE the A14B models use.
WAN22_T2V = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v-a14b-high-noise", "dtype": "fp32", "attention": "sdpa"},
     {}),
    (2, "MusubiWanDiTLoader", {"model_name": "preset:tiny-t2v-a14b-low-noise", "dtype": "fp32", "attention": "sdpa"},
     {}),
    (3, "MusubiWan22Experts", {"boundary": 0.0, "memory_mode": "both"},
     {"high_noise_model": (1, 0), "low_noise_model": (2, 0)}),
    (4, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (5, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (6, "MusubiWanTextEncode", {"prompt": "a red square moving to the right", "negative_prompt": "",
                                "offload_after": True}, {"text_encoder": (4, 0)}),
    (7, "MusubiWanSampler", {"width": 64, "height": 48, "frames": 9, "steps": 6, "guidance_scale": 3.0, "shift": 0.0,
                             "solver": "unipc", "seed": 42, "noise_device": "cpu", "guidance_scale_high": 4.0},
     {"model": (3, 0), "embeds": (6, 0)}),
    (8, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (5, 0), "latents": (7, 0)}),
    (9, "MusubiSaveVideo", {"filename_prefix": "musubi/wan22_t2v", "crf": 19}, {"images": (8, 0), "fps": (8, 1)}),
    (10, "PreviewImage", {}, {"images": (8, 0)}),
]

# The same generation with the experts loaded lazily (Musubi's --lazy_loading): each one is read from its file at its
# first step and freed after its last, so host memory holds one 14B expert at a time.
WAN22_T2V_LAZY = [
    (1, "MusubiWan22LazyExperts", {"high_noise_name": "preset:tiny-t2v-a14b-high-noise",
                                   "low_noise_name": "preset:tiny-t2v-a14b-low-noise", "dtype": "fp32",
                                   "attention": "sdpa", "fp8": "none", "blocks_to_swap": 0, "boundary": 0.0}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (4, "MusubiWanTextEncode", {"prompt": "a red square moving to the right", "negative_prompt": "",
                                "offload_after": True}, {"text_encoder": (2, 0)}),
    (5, "MusubiWanSampler", {"width": 64, "height": 48, "frames": 9, "steps": 6, "guidance_scale": 3.0, "shift": 0.0,
                             "solver": "unipc", "seed": 42, "noise_device": "cpu", "guidance_scale_high": 4.0},
     {"model": (1, 0), "embeds": (4, 0)}),
    (6, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (3, 0), "latents": (5, 0)}),
    (7, "MusubiSaveVideo", {"filename_prefix": "musubi/wan22_t2v_lazy", "crf": 19}, {"images": (6, 0), "fps": (6, 1)}),
]

# Wan 2.2 TI2V-5B on its tiny preset: one model for text and image to video; the start image's latent (Wan 2.2 VAE,
# 48 channels, 16x) is kept clean as frame 0; 24 fps.
WAN22_TI2V_5B = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-ti2v-5b", "dtype": "fp32", "attention": "sdpa"}, {}),
    (2, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (3, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae22", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (4, "EmptyImage", {"width": 64, "height": 64, "batch_size": 1, "color": 0x22AA66}, {}),
    (5, "MusubiWanTextEncode", {"prompt": "the green square starts to spin", "negative_prompt": "",
                                "offload_after": True}, {"text_encoder": (2, 0)}),
    (6, "MusubiWanImageEncode", {"width": 64, "height": 64, "frames": 9}, {"vae": (3, 0), "start_image": (4, 0)}),
    (7, "MusubiWanSampler", {"width": 64, "height": 64, "frames": 9, "steps": 6, "guidance_scale": 5.0, "shift": 0.0,
                             "solver": "unipc", "seed": 7, "noise_device": "cpu"},
     {"model": (1, 0), "embeds": (5, 0), "image_embeds": (6, 0)}),
    (8, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (3, 0), "latents": (7, 0)}),
    (9, "MusubiSaveVideo", {"filename_prefix": "musubi/wan22_ti2v", "crf": 19}, {"images": (8, 0), "fps": (8, 1)}),
    (10, "PreviewImage", {}, {"images": (8, 0)}),
]

# Wan 2.2 A14B I2V: train both experts of the pair in one run, then generate with the trained pair. A 9-frame video
# made in the graph is cached for I2V without CLIP vision (the A14B experts take none); Init Training takes the pair
# from Musubi Wan 2.2 Experts (its boundary, the release's 0.9, and its memory mode) and trains one LoRA per expert
# (each batch trains the expert whose side of the boundary its timestep falls on); Save Trained LoRA writes
# NAME_high_noise / NAME_low_noise; Train Steps' model output is the pair with each expert's adapter.
WAN22_I2V_TRAIN_THEN_GENERATE = [
    (1, "MusubiWanDiTLoader", {"model_name": "preset:tiny-i2v-a14b-high-noise", "dtype": "fp32", "attention": "sdpa"},
     {}),
    (2, "MusubiWanDiTLoader", {"model_name": "preset:tiny-i2v-a14b-low-noise", "dtype": "fp32", "attention": "sdpa"},
     {}),
    (3, "MusubiWan22Experts", {"boundary": 0.0, "memory_mode": "offload"},
     {"high_noise_model": (1, 0), "low_noise_model": (2, 0)}),
    (4, "MusubiUMT5Loader", {"text_encoder_name": "preset:tiny-umt5", "dtype": "fp32", "tokenizer_path": ""}, {}),
    (5, "MusubiWanVAELoader", {"vae_name": "preset:tiny-vae", "dtype": "fp32", "cache_on_cpu": False}, {}),
    (6, "EmptyImage", {"width": 48, "height": 48, "batch_size": 9, "color": 0xCC2222}, {}),
    (7, "EmptyImage", {"width": 48, "height": 48, "batch_size": 1, "color": 0xCC2222}, {}),
    (8, "MusubiDatasetFromImages", {"captions": "a red square", "width": 48, "height": 48, "num_repeats": 1,
                                    "as_video": True, "cache_directory": "", "batch_size": 1}, {"images": (6, 0)}),
    (9, "MusubiCacheLatents", {"task": "i2v", "keep_cache": False, "workers": 0}, {"dataset": (8, 0), "vae": (5, 0)}),
    (10, "MusubiCacheTextEmbeddings", {"keep_cache": False}, {"dataset": (9, 0), "text_encoder": (4, 0)}),
    (11, "MusubiLoRAConfig", {"network_kind": "lora", "rank": 8, "alpha": 8.0, "dropout": 0.0, "rank_dropout": 0.0,
                              "module_dropout": 0.0}, {}),
    (12, "MusubiOptimizerConfig", {"optimizer_type": "AdamW", "learning_rate": 3e-3, "max_grad_norm": 1.0,
                                   "lr_scheduler": "constant", "lr_warmup_steps": "0"}, {}),
    (13, "MusubiWanTextEncode", {"prompt": "a red square", "negative_prompt": "", "offload_after": True},
     {"text_encoder": (4, 0)}),
    (14, "MusubiWanImageEncode", {"width": 48, "height": 48, "frames": 9}, {"vae": (5, 0), "start_image": (7, 0)}),
    (15, "MusubiValidationPrompt", {"width": 48, "height": 48, "frames": 9, "seed": 3, "steps": 6,
                                    "guidance_scale": 1.0, "shift": 0.0, "embedded_guidance": 0.0},
     {"embeds": (13, 0), "image_embeds": (14, 0)}),
    (16, "MusubiInitTraining", {"seed": 1, "max_train_steps": 20, "mixed_precision": "no",
                                "gradient_checkpointing": True, "gradient_accumulation_steps": 1,
                                "timestep_sampling": "shift", "discrete_flow_shift": 3.0, "sigmoid_scale": 1.0,
                                "weighting_scheme": "none", "min_timestep": 0, "max_timestep": 1000,
                                "save_every_n_steps": 0, "keep_last_n_saves": 0, "output_dir": "",
                                "output_name": "tiny_wan22_i2v_lora", "save_state": False,
                                "attention_backend": "model", "save_format": "comfyui",
                                "validate_every_n_steps": 10, "expert_layout": "separate"},
     {"model": (3, 0), "dataset": (10, 0), "lora_config": (11, 0), "optimizer_config": (12, 0),
      "validation_prompts": (15, 0), "validation_vae": (5, 0)}),
    (17, "MusubiTrainSteps", {"steps": 20, "train_on_every_queue": False}, {"session": (16, 0)}),
    (18, "PreviewImage", {}, {"images": (17, 1)}),
    (19, "MusubiSaveTrainedLoRA", {"format": "comfyui", "filename_prefix": "loras/tiny_wan22_i2v_lora",
                                   "dtype": "bf16", "save_to": "output"}, {"session": (17, 0)}),
    (20, "MusubiWanSampler", {"width": 48, "height": 48, "frames": 9, "steps": 8, "guidance_scale": 3.5,
                              "shift": 0.0, "solver": "unipc", "seed": 42, "noise_device": "cpu",
                              "guidance_scale_high": 3.5},
     {"model": (17, 4), "embeds": (13, 0), "image_embeds": (14, 0)}),
    (21, "MusubiWanVAEDecode", {"tile_size": 0, "tile_overlap": 64}, {"vae": (5, 0), "latents": (20, 0)}),
    (22, "MusubiSaveVideo", {"filename_prefix": "musubi/wan22_i2v_train_then_generate", "crf": 19},
     {"images": (21, 0), "fps": (21, 1)}),
    (23, "PreviewImage", {}, {"images": (21, 0)}),
]

WORKFLOWS = {"wan_t2v_generate.json": TINY_T2V, "wan_i2v_generate.json": TINY_I2V, "lora_tools.json": LORA_TOOLS,
             "wan_dataset_cache.json": DATASET_CACHE,
             "wan_train_then_generate.json": TRAIN_THEN_GENERATE,
             "hunyuan_t2v_generate.json": HUNYUAN_T2V,
             "hunyuan_train_then_generate.json": HUNYUAN_TRAIN_THEN_GENERATE,
             "framepack_i2v_generate.json": FRAMEPACK_I2V, "framepack_one_frame.json": FRAMEPACK_ONE_FRAME,
             "framepack_train_then_generate.json": FRAMEPACK_TRAIN_THEN_GENERATE,
             "wan22_t2v_generate.json": WAN22_T2V, "wan22_t2v_lazy_generate.json": WAN22_T2V_LAZY,
             "wan22_ti2v_5b_generate.json": WAN22_TI2V_5B,
             "wan22_i2v_train_then_generate.json": WAN22_I2V_TRAIN_THEN_GENERATE,
             "wan_demo_train_then_generate.json": WAN_DEMO,
             "hunyuan_demo_train_then_generate.json": HUNYUAN_DEMO,
             "framepack_demo_train_then_generate.json": FRAMEPACK_DEMO}


def _spec_lists(cls):
    spec = cls.INPUT_TYPES()
    sockets, widgets = [], []
    from comfy_harness import WIDGET_TYPES, _has_control_widget

    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            typ, opts = s[0], (s[1] if len(s) > 1 else {})
            if (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                widgets.append((name, typ, opts))
            else:
                sockets.append((name, typ))
    return sockets, widgets, _has_control_widget


def _pack_version() -> tuple[str, str]:
    """(registry id, version) from pyproject.toml: what the frontend's cnr_id / ver point ComfyUI Manager at."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["name"], project["version"]


def _comfy_version() -> str:
    from comfy_harness import COMFYUI_DIR

    text = (COMFYUI_DIR / "comfyui_version.py").read_text()
    return text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("'\"")


def _properties(ntype: str) -> dict:
    """Node properties as the frontend saves them: `cnr_id`/`ver` let it offer to install a missing pack."""
    cnr_id, ver = _pack_version() if ntype.startswith("Musubi") else ("comfy-core", _comfy_version())
    return {"cnr_id": cnr_id, "ver": ver, "Node name for S&R": ntype}


def build(nodes: list, classes: dict) -> dict:
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    link_id = 0
    for order, (nid, ntype, values, inputs, *rest) in enumerate(nodes):
        cls = classes[ntype]
        sockets, widgets, has_control = _spec_lists(cls)
        ui_inputs = []
        for name, typ in sockets:
            if name in inputs:
                src, slot = inputs[name]
                link_id += 1
                src_cls = classes[next(n[1] for n in nodes if n[0] == src)]
                ltype = src_cls.RETURN_TYPES[slot]
                links.append([link_id, src, slot, nid, len(ui_inputs), ltype])
                out_links.setdefault((src, slot), []).append(link_id)
                ui_inputs.append({"name": name, "type": typ, "link": link_id})
            else:
                ui_inputs.append({"name": name, "type": typ, "link": None})
        wv = []
        for name, typ, opts in widgets:
            if name in inputs:  # a widget driven by a link: the frontend keeps a value and adds a widget input
                src, slot = inputs[name]
                link_id += 1
                src_cls = classes[next(n[1] for n in nodes if n[0] == src)]
                links.append([link_id, src, slot, nid, len(ui_inputs), src_cls.RETURN_TYPES[slot]])
                out_links.setdefault((src, slot), []).append(link_id)
                ui_inputs.append({"name": name, "type": typ if isinstance(typ, str) else "COMBO", "link": link_id,
                                  "widget": {"name": name}})
                value = opts.get("default", "" if typ == "STRING" else 0)
            else:
                value = values.get(name, opts.get("default", typ[0] if isinstance(typ, list) else None))
            wv.append(value)
            if has_control(name, typ, opts):
                wv.append("fixed")
        col, row = order % 4, order // 4
        ui_nodes.append({
            "id": nid, "type": ntype, "pos": [40 + 380 * col, 60 + 420 * row], "size": [340, 60 + 28 * len(wv)],
            "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
            "outputs": [], "properties": _properties(ntype), "widgets_values": wv,
            "_returns": list(getattr(cls, "RETURN_TYPES", ())), "_names": list(getattr(cls, "RETURN_NAMES", ()) or ()),
        })
        if rest and rest[0]:
            ui_nodes[-1]["title"] = rest[0]
    for n in ui_nodes:
        rtypes, rnames = n.pop("_returns"), n.pop("_names")
        n["outputs"] = [{"name": (rnames[i] if i < len(rnames) else t), "type": t,
                         "links": out_links.get((n["id"], i), []), "slot_index": i} for i, t in enumerate(rtypes)]
    return {"last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": link_id, "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4}


TITLES = {"wan_t2v_generate.json": "Wan 2.1 text to video", "wan_i2v_generate.json": "Wan 2.1 image to video",
          "lora_tools.json": "LoRA tools", "wan_dataset_cache.json": "Dataset caching",
          "wan_train_then_generate.json": "Train a LoRA, then generate",
          "hunyuan_t2v_generate.json": "HunyuanVideo text to video",
          "hunyuan_train_then_generate.json": "HunyuanVideo: train a LoRA, then generate",
          "framepack_i2v_generate.json": "FramePack image to video (per-section prompts and images)",
          "framepack_one_frame.json": "FramePack one-frame inference (kisekaeichi)",
          "framepack_train_then_generate.json": "FramePack: train a LoRA, then generate",
          "wan22_t2v_generate.json": "Wan 2.2 A14B text to video (two experts)",
          "wan22_ti2v_5b_generate.json": "Wan 2.2 TI2V-5B image to video",
          "wan22_i2v_train_then_generate.json": "Wan 2.2 A14B I2V: train both experts, then generate",
          "wan_demo_train_then_generate.json": "Demo: generate, teach a new colour, generate again"}


def thumbnail(name: str, nodes: list, path: Path) -> None:
    """The same-name .jpg the template browser shows: the title and the graph's nodes, in order."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 384), (30, 34, 44))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 511, 56], fill=(72, 96, 160))
    draw.text((16, 12), "ComfyUI-Musubi", fill=(220, 228, 255))
    draw.text((16, 32), TITLES.get(name, name), fill=(255, 255, 255))
    y = 72
    for n in nodes[:14]:
        draw.rounded_rectangle([16, y, 496, y + 18], 4, fill=(52, 58, 72) if n[1].startswith("Musubi") else (44, 48, 58))
        draw.text((24, y + 3), n[1].removeprefix("Musubi"), fill=(235, 235, 235))
        y += 22
    img.save(path, "JPEG", quality=85)


def main():
    from comfy_harness import boot

    classes = boot().nodes.NODE_CLASS_MAPPINGS
    for name, nodes in WORKFLOWS.items():
        path = REPO / "workflows" / name
        path.write_text(json.dumps(build(nodes, classes), indent=1, ensure_ascii=False) + "\n")
        thumbnail(name, nodes, path.with_suffix(".jpg"))
        print("wrote", path, "and its thumbnail")


if __name__ == "__main__":
    main()
