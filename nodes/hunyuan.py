"""HunyuanVideo nodes: loaders (DiT, VAE, the LLaVA-LLaMA-3 + CLIP-L text-encoder pair), encoders (text, SkyReels
I2V start image, V2V source video), the sampler and the VAE decode. The family's node file (docs/ARCHITECTURE.md);
nodes/wan.py is its model.

Tokenizers are never downloaded: for weight files, the loader passes the tokenizers ComfyUI ships
(comfy/text_encoders/llama_tokenizer/, comfy/sd1_tokenizer/) unless a tokenizer path is given.
"""

from __future__ import annotations

import os

import torch

from . import comfy_compat as compat
from . import checks
from . import types as T
from .generation import NOISE_INPUTS, RUN_INPUTS, magcache_for, step_progress, warnings_on_node
from .loading import (ATTENTION_INPUT, DIT_DTYPE_INPUT, DTYPES, dit_handle, dit_memory_inputs, load_dit,
                      model_choices, owner_of, resolve_source, room_for, source_identity)
from .placement import dit_on_device, on_compute_device
from .registry import MODELS
from .video import RESIZE_INPUT, decode_video, image_to_video_tensor, video_frames_tensor, video_to_image
from ..engine import demo
from ..engine.errors import invalid
from ..engine.handle import ModelHandle, RunOptions

FAMILY = "hunyuan"   # the family these loaders load for (the text-encoder handle names it: caches are made for it)
DIT_PRESETS = ["demo:hunyuan_video_demo_t2v.safetensors", "preset:tiny", "preset:tiny-i2v"]
VAE_PRESETS = ["demo:hunyuan_video_demo_vae.safetensors", "preset:tiny-vae"]
LLM_PRESETS = ["demo:llava_llama3_demo.safetensors", "preset:tiny-llava-llama"]
CLIP_PRESETS = ["demo:clip_l_demo.safetensors", "preset:tiny-clip-l"]
SOLVERS = ["euler", "unipc", "dpm++"]     # Musubi's hv_generate_video: Euler only
FPS = 24.0
LLAMA_TOKENIZER = "text_encoders/llama_tokenizer"   # inside ComfyUI's `comfy` package
CLIP_TOKENIZER = "sd1_tokenizer"
DIT_EXPECTED = "a DiT from Musubi HunyuanVideo DiT Loader"
VAE_EXPECTED = "a VAE from Musubi HunyuanVideo VAE Loader"
TEXT_ENCODER_EXPECTED = "text encoders from Musubi HunyuanVideo Text Encoder Loader"
EMBEDS_EXPECTED = "prompt embeddings from Musubi HunyuanVideo Text Encode"


def _family_value(value, field: str, expected: str) -> None:
    """Refuse a value another family's node made (embeds, image embeds, latents carry their family)."""
    family = value.get("family") if isinstance(value, dict) else None
    if family != FAMILY:
        made = f"made for {family}" if family else type(value).__name__ + (" without a family (Wan's)"
                                                                           if isinstance(value, dict) else "")
        raise invalid(field, made, expected)


def _check_family(handle, field: str, expected: str):
    if handle.family != FAMILY:
        raise invalid(field, f"a model of family {handle.family!r}", expected)
    return handle


class MusubiHunyuanDiTLoader:
    DESCRIPTION = ("Load a HunyuanVideo diffusion transformer (T2V 720p cfg-distilled, SkyReels V1 T2V/I2V) from "
                   "models/diffusion_models: the official mp_rank_00_model_states.pt, ComfyUI's or kohya's "
                   "safetensors, bf16/fp16/fp8/scaled fp8. The variant (T2V or SkyReels I2V) is detected from the "
                   "file. The model stays loaded between runs and serves training and sampling.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded HunyuanVideo DiT (kept in the pack's memory; train it or sample with it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(DIT_PRESETS, "diffusion_models"), {
                "tooltip": "A HunyuanVideo DiT file from models/diffusion_models, or a tiny built-in preset for "
                           "tests (tiny: T2V; tiny-i2v: SkyReels I2V)."}),
            "dtype": DIT_DTYPE_INPUT,
            "attention": ATTENTION_INPUT,
        }, "optional": dit_memory_inputs(59, "59 for the 13B model's 20 double + 40 single blocks, swapped over "
                                             "both lists", "the image, text, time and guidance embedders and the "
                                                           "final layer"),
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, model_name, dtype, attention, fp8="none", blocks_to_swap=0, activation_offload=False,
             offload_after_use=False, offload_non_block_weights=False, compile_blocks=False, fp8_matmul=False,
             fp8_scale_dtype="float32", unique_id=None, prompt=None):
        from ..engine.families.hunyuan.loader import load_hunyuan_dit

        source = resolve_source(model_name, "diffusion_models", "model_name")
        model = load_dit(self, unique_id, prompt, "hunyuan_dit", source, dtype, fp8, fp8_matmul, load_hunyuan_dit,
                         fp8_scale_dtype)
        return (dit_handle(model, attention, blocks_to_swap, activation_offload, offload_after_use,
                           offload_non_block_weights, compile_blocks),)


def vae_loader_inputs(family_name: str) -> dict:
    """The inputs of a loader of HunyuanVideo's VAE (HunyuanVideo's own, FramePack's: the same files)."""
    return {"required": {
        "vae_name": (model_choices(VAE_PRESETS, "vae"), {
            "tooltip": f"The HunyuanVideo VAE file from models/vae (what {family_name} uses), or the tiny preset."}),
        "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16",
                  "tooltip": "Precision of the VAE weights (Musubi's default for HunyuanVideo: fp16)."}),
    }, "optional": {
        "keep_on_gpu": ("BOOLEAN", {"default": False,
                        "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                   "back to CPU memory after each use."}),
    }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}


def load_vae(node, family: str, vae_name, dtype, keep_on_gpu=False, unique_id=None, prompt=None) -> ModelHandle:
    """HunyuanVideo's VAE through the registry (one copy whichever family's loader asks), on a handle naming
    `family`: the family its latent caches and decodes are for."""
    from ..engine.families.hunyuan.vae import load_hunyuan_vae

    source = resolve_source(vae_name, "vae", "vae_name")
    key = ("hunyuan_vae", source_identity(source), dtype)

    def load():
        vae = load_hunyuan_vae(source, dtype=DTYPES[dtype], device="cpu")
        vae.identity = ":".join(map(str, key[1]))   # names the weights in latent caches
        return vae

    vae = MODELS.get_or_create(key, room_for(source, prompt, load), owner=owner_of(node, unique_id))
    return ModelHandle(vae, family, RunOptions(keep_on_gpu=keep_on_gpu))


class MusubiHunyuanVAELoader:
    DESCRIPTION = ("Load the HunyuanVideo VAE (the official pytorch_model.pt or ComfyUI's hunyuan_video_vae_bf16"
                   ".safetensors) from models/vae.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The loaded HunyuanVideo VAE.",)

    @classmethod
    def INPUT_TYPES(cls):
        return vae_loader_inputs("HunyuanVideo")

    def load(self, vae_name, dtype, keep_on_gpu=False, unique_id=None, prompt=None):
        return (load_vae(self, FAMILY, vae_name, dtype, keep_on_gpu, unique_id, prompt),)


def _tokenizer(source: str, given: str, shipped: str, field: str) -> str | None:
    """The tokenizer a text encoder loads with: the given path; for a weight file, the one ComfyUI ships; for a
    preset (its own tiny tokenizer), an HF folder (its tokenizer folder) or a demo model (the tiny tokenizers next
    to it), None."""
    given = (given or "").strip()
    if given:
        return given
    if source.startswith("preset:") or os.path.isdir(source) or demo.is_demo_file(source):
        return None
    path = compat.shipped_tokenizer(shipped)
    if path is None:
        raise invalid(field, "", f"a tokenizer folder: this ComfyUI has no comfy/{shipped}/ to use by default")
    return path


def text_encoder_loader_inputs() -> dict:
    """The inputs of a loader of HunyuanVideo's text-encoder pair (HunyuanVideo's own, FramePack's)."""
    return {"required": {
        "llm_name": (model_choices(LLM_PRESETS, "text_encoders"), {
            "tooltip": "The LLaVA-LLaMA-3 text encoder (text_encoder1 in Musubi) from models/text_encoders, "
                       "or the tiny preset."}),
        "clip_name": (model_choices(CLIP_PRESETS, "text_encoders"), {
            "tooltip": "The CLIP-L text encoder (text_encoder2 in Musubi) from models/text_encoders, or the "
                       "tiny preset."}),
        "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16",
                  "tooltip": "Compute precision of both encoders (Musubi's default: fp16)."}),
        "fp8_llm": ("BOOLEAN", {"default": False,
                    "tooltip": "Store the LLM's decoder Linear layers in fp8 with scales (Musubi --fp8_llm): "
                               "about half the memory; embeddings differ slightly, so caches made with it are "
                               "kept apart. Needs dtype fp16 or bf16."}),
    }, "optional": {
        "llm_tokenizer_path": ("STRING", {"default": "",
                               "tooltip": "Optional: a LLaMA-3 tokenizer.json or its folder. Empty: ComfyUI's "
                                          "comfy/text_encoders/llama_tokenizer (or the HF folder's own)."}),
        "clip_tokenizer_path": ("STRING", {"default": "",
                                "tooltip": "Optional: a CLIP tokenizer folder (vocab.json + merges.txt). Empty: "
                                           "ComfyUI's comfy/sd1_tokenizer (or the HF folder's own)."}),
        "keep_on_gpu": ("BOOLEAN", {"default": False,
                        "tooltip": "Keep these models on the GPU between uses (faster, uses VRAM). Off: they go "
                                   "back to CPU memory after each use."}),
    }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}


def load_text_encoders(node, family: str, llm_name, clip_name, dtype, fp8_llm, llm_tokenizer_path="",
                       clip_tokenizer_path="", keep_on_gpu=False, unique_id=None, prompt=None) -> ModelHandle:
    """The LLaVA-LLaMA-3 + CLIP-L pair through the registry (one copy whichever family's loader asks), on a handle
    naming `family`: the family its text caches are for."""
    from ..engine.encoders.clip_text import load_clip_text
    from ..engine.encoders.llava_llama import load_llava_llama
    from ..engine.families.hunyuan.text import HunyuanTextEncoders

    if fp8_llm and dtype == "fp32":
        raise invalid("fp8_llm", True, "dtype fp16 or bf16 (fp8 weights compute in 16-bit), or fp8_llm off")
    llm = resolve_source(llm_name, "text_encoders", "llm_name")
    clip = resolve_source(clip_name, "text_encoders", "clip_name")
    llm_tok = _tokenizer(llm, llm_tokenizer_path, LLAMA_TOKENIZER, "llm_tokenizer_path")
    clip_tok = _tokenizer(clip, clip_tokenizer_path, CLIP_TOKENIZER, "clip_tokenizer_path")
    key = ("hunyuan_text", source_identity(llm), source_identity(clip), dtype, bool(fp8_llm), llm_tok, clip_tok)

    def load():
        # CLIP-L first (small): every tokenizer problem shows before the 8B model is read
        c = load_clip_text(clip, dtype=DTYPES[dtype], device="cpu", tokenizer_path=clip_tok)
        m = load_llava_llama(llm, dtype=DTYPES[dtype], device="cpu", tokenizer_path=llm_tok, fp8=bool(fp8_llm))
        return HunyuanTextEncoders(m, c)

    pair = MODELS.get_or_create(key, room_for(llm, prompt, load), owner=owner_of(node, unique_id))
    return ModelHandle(pair, family, RunOptions(keep_on_gpu=keep_on_gpu))


def encode_prompts(text_encoder, texts: list[str], offload_after: bool, unique_id, expected: str) -> list[dict]:
    """Each text through the HunyuanVideo text-encoder pair -> {"context": LLM states of the real tokens,
    "pooled": CLIP-L pooled} (float32, CPU)."""
    from ..engine.families.hunyuan.text import HunyuanTextEncoders, real_tokens

    handle = T.handle(text_encoder, "text_encoder", expected)
    if not isinstance(handle.module, HunyuanTextEncoders):
        raise invalid("text_encoder", type(handle.module).__name__, expected)
    with on_compute_device(handle, offload_after), warnings_on_node(unique_id):   # > 256 tokens
        out = handle.module.encode(list(texts))
    states, mask, pooled = (out[k].float().cpu() for k in ("states", "mask", "pooled"))
    return [{"context": real_tokens(states[i], mask[i]), "pooled": pooled[i]} for i in range(len(texts))]


class MusubiHunyuanTextEncoderLoader:
    DESCRIPTION = ("Load HunyuanVideo's two text encoders from models/text_encoders: LLaVA-LLaMA-3-8B (ComfyUI's "
                   "llava_llama3_fp16 / fp8_scaled safetensors, or an HF text_encoder folder) and CLIP-L (clip_l"
                   ".safetensors). Tokenizers come from ComfyUI's own folders (comfy/text_encoders/llama_tokenizer, "
                   "comfy/sd1_tokenizer) or the given paths, never from the internet.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("Both text encoders with their tokenizers (for HunyuanVideo Text Encode and Cache Text "
                       "Embeddings).",)

    @classmethod
    def INPUT_TYPES(cls):
        return text_encoder_loader_inputs()

    def load(self, llm_name, clip_name, dtype, fp8_llm, llm_tokenizer_path="", clip_tokenizer_path="",
             keep_on_gpu=False, unique_id=None, prompt=None):
        return (load_text_encoders(self, FAMILY, llm_name, clip_name, dtype, fp8_llm, llm_tokenizer_path,
                                   clip_tokenizer_path, keep_on_gpu, unique_id, prompt),)


class MusubiHunyuanTextEncode:
    DESCRIPTION = ("Encode a prompt and a negative prompt with LLaVA-LLaMA-3 (video template) and CLIP-L for "
                   "HunyuanVideo sampling (and training validation). The negative prompt is used only with real "
                   "CFG (the sampler's guidance_scale > 1).")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.EMBEDS,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Prompt and negative-prompt embeddings: LLM states (real tokens) and CLIP-L pooled vectors.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (T.TEXT_ENCODER, {"tooltip": "The pair from Musubi HunyuanVideo Text Encoder Loader."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "What to avoid (real CFG only). Empty: an empty prompt, as Musubi."}),
            "offload_after": ("BOOLEAN", {"default": True,
                              "tooltip": "Move the encoders back to CPU memory after encoding (frees VRAM)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, text_encoder, prompt, negative_prompt, offload_after, unique_id=None):
        pos, neg = encode_prompts(text_encoder, [prompt, negative_prompt], offload_after, unique_id,
                                  TEXT_ENCODER_EXPECTED)
        return ({"family": FAMILY, "context": pos["context"], "pooled": pos["pooled"],
                 "negative_context": neg["context"], "negative_pooled": neg["pooled"],
                 "prompt": prompt, "negative_prompt": negative_prompt},)


def _size_and_frames(width, height, frames) -> None:
    if width % 16 or height % 16:
        raise invalid("width/height", (width, height), "multiples of 16")
    if checks.frames_4k1(frames):
        raise invalid("frames", frames, "a frame count of the form 4k+1 (1, 5, 9, ..., 129)")


class MusubiHunyuanImageEncode:
    DESCRIPTION = ("Prepare a start image for SkyReels V1 I2V (a HunyuanVideo DiT with 32 input channels): the "
                   "image's VAE latent in the first latent frame, zeros in the others.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("SkyReels I2V conditioning for the sampler (its size and frame count must match the "
                       "sampler's).",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The HunyuanVideo VAE."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video."}),
            **checks.size_inputs(960, 544, 129),
        }, "optional": {
            "resize_mode": RESIZE_INPUT,
        }}

    def encode(self, vae, start_image, width, height, frames, resize_mode="stretch"):
        from ..engine.families.hunyuan.pipeline import prepare_skyreels_i2v

        vae = _check_family(T.handle(vae, "vae", VAE_EXPECTED), "vae", VAE_EXPECTED)
        _size_and_frames(width, height, frames)
        image = image_to_video_tensor(start_image, width, height, "start_image", resize_mode)
        with on_compute_device(vae):
            cond = prepare_skyreels_i2v(vae.module, image, frames)
        return ({"family": FAMILY, "conditioning": cond, "width": width, "height": height, "frames": frames,
                 "task": "i2v"},)


class MusubiHunyuanVideoEncode:
    DESCRIPTION = ("Prepare a source video for HunyuanVideo video-to-video (SDEdit-like, Musubi --video_path): its "
                   "latents, noised to `strength` (1 = start from pure noise); the sampler then runs "
                   "steps x strength steps.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("V2V conditioning for the sampler (its size and frame count must match the sampler's).",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The HunyuanVideo VAE."}),
            "video": ("IMAGE", {"tooltip": "Source frames; at least `frames` of them (the first are used)."}),
            **checks.size_inputs(960, 544, 129),
            "strength": ("FLOAT", {"default": 0.8, "min": 0.01, "max": 1.0, "step": 0.01,
                         "tooltip": "How much of the video is re-generated (Musubi --strength): 1 = all of it."}),
        }, "optional": {
            "resize_mode": RESIZE_INPUT,
        }}

    def encode(self, vae, video, width, height, frames, strength, resize_mode="stretch"):
        from ..engine.families.hunyuan.pipeline import prepare_v2v

        vae = _check_family(T.handle(vae, "vae", VAE_EXPECTED), "vae", VAE_EXPECTED)
        _size_and_frames(width, height, frames)
        if not 0.0 < float(strength) <= 1.0:
            raise invalid("strength", strength, "a number in (0, 1]")
        frames_tensor = video_frames_tensor(video, width, height, "video", resize_mode)
        if frames_tensor.shape[1] < frames:
            raise invalid("video", f"{frames_tensor.shape[1]} frame(s)", f"at least the {frames} frames asked for")
        with on_compute_device(vae):
            cond = prepare_v2v(vae.module, frames_tensor, frames)
        return ({"family": FAMILY, "conditioning": cond, "width": width, "height": height, "frames": frames,
                 "task": "v2v", "strength": float(strength)},)


class MusubiHunyuanSampler:
    DESCRIPTION = ("Generate HunyuanVideo latents: T2V, T2I (1 frame), V2V and SkyReels I2V (with image embeds). "
                   "Flow-matching Euler (Musubi's; UniPC / DPM++ too), embedded guidance for the cfg-distilled "
                   "model, optional real CFG with the negative prompt. A LoRA applied to (or being trained on) the "
                   "model is used as it is.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "sample"
    RETURN_TYPES = (T.LATENTS, "LATENT")
    RETURN_NAMES = ("latents", "latent")
    OUTPUT_TOOLTIPS = ("Generated latents; decode them with Musubi HunyuanVideo VAE Decode.",
                       "The same latents as ComfyUI's LATENT (HunyuanVideo format): core VAE Decode, Save Latent and "
                       "latent nodes work on it.")

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (T.DIT, {"tooltip": "The HunyuanVideo DiT (optionally with LoRAs applied or trained)."}),
            "embeds": (T.EMBEDS, {"tooltip": "Prompt embeddings from Musubi HunyuanVideo Text Encode."}),
            **checks.size_inputs(960, 544, 129),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Denoising steps (Musubi: 50)."}),
            "embedded_guidance": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Embedded guidance of the cfg-distilled model (Musubi "
                                             "--embedded_cfg_scale, 6.0). Ignored by models without a guidance "
                                             "embedder (SkyReels I2V)."}),
            "guidance_scale": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                               "tooltip": "Real classifier-free guidance with the negative prompt (1.0 = off: one "
                                          "pass per step). SkyReels models use about 6.0."}),
            "shift": ("FLOAT", {"default": 7.0, "min": 0.01, "max": 100.0, "step": 0.1,
                      "tooltip": "Flow shift (Musubi: 7.0 for 50 steps; about 17 under 20 steps)."}),
            "solver": (SOLVERS, {"default": "euler", "tooltip": "Sampler: Euler (Musubi's), UniPC or DPM++ 2M."}),
            **NOISE_INPUTS,
        }, "optional": {
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "SkyReels I2V (Musubi HunyuanVideo Image Encode) or V2V "
                                                         "(Musubi HunyuanVideo Video Encode) conditioning."}),
            **RUN_INPUTS,
            "magcache": (T.MAGCACHE, {"tooltip": "Skip the blocks on predictable steps (Musubi MagCache; its "
                                                 "built-in table is HunyuanVideo's, calibrated at 50 steps)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, embeds, width, height, frames, steps, embedded_guidance, guidance_scale, shift, solver,
               seed, noise_device, image_embeds=None, offload_after=True, batch_size=1, magcache=None,
               unique_id=None):
        from ..engine.families.hunyuan.pipeline import HunyuanGenerateRequest, generate, model_task_kind, \
            validate_request
        from ..engine.families.hunyuan.vae import from_latent

        handle = _check_family(T.handle(model, "model", DIT_EXPECTED), "model", DIT_EXPECTED)
        module = handle.module
        _family_value(embeds, "embeds", EMBEDS_EXPECTED)
        if image_embeds is not None:
            _family_value(image_embeds, "image_embeds", "conditioning from Musubi HunyuanVideo Image Encode or "
                                                        "Video Encode")
            size = (image_embeds["width"], image_embeds["height"], image_embeds["frames"])
            if size != (width, height, frames):
                raise invalid("image_embeds", size, f"the sampler's width/height/frames {(width, height, frames)}")
        kind = model_task_kind(module.config)
        if image_embeds is None and kind == "i2v":
            raise invalid("image_embeds", None, f"a start image from Musubi HunyuanVideo Image Encode: the loaded "
                                                f"{module.config.variant} model is a SkyReels I2V model")
        task = image_embeds["task"] if image_embeds is not None else ("t2i" if frames == 1 else "t2v")
        request = HunyuanGenerateRequest(
            task=task, context=embeds["context"], pooled=embeds["pooled"],
            negative_context=embeds.get("negative_context"), negative_pooled=embeds.get("negative_pooled"),
            width=width, height=height, frames=frames, steps=steps, shift=shift, guidance_scale=guidance_scale,
            embedded_guidance=float(embedded_guidance) if module.config.guidance_embed else None,
            strength=image_embeds.get("strength") if task == "v2v" else None, solver=solver, seed=seed,
            batch_size=int(batch_size), noise_device=noise_device,
            conditioning=image_embeds["conditioning"] if image_embeds is not None else None,
            magcache=magcache_for(magcache, unique_id)).resolve()
        validate_request(module, request)   # every mistake before the DiT moves
        with dit_on_device(handle, offload_after):
            latents = generate(module, request, step_progress(request.run_steps(), unique_id, "HunyuanVideo"))
        latents = latents.float().cpu()
        return ({"family": FAMILY, "samples": latents, "fps": FPS, "task": task},
                {"samples": from_latent(latents)})


# the HunyuanVideo VAE's tiling widgets (its decode nodes: HunyuanVideo's, FramePack's)
DECODE_TILING_INPUTS = {
    "tile_size": ("INT", {"default": 256, "min": 0, "max": 4096, "step": 16,
                  "tooltip": "Spatial tile size in pixels (0 = no spatial tiling; Musubi: 256)."}),
    "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                     "tooltip": "Spatial tile overlap in pixels (a multiple of 8, below tile_size)."}),
    "temporal_tile": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 4,
                      "tooltip": "Frames per temporal window (0 = no temporal tiling; Musubi: 64)."}),
    "temporal_overlap": ("INT", {"default": 16, "min": 0, "max": 512, "step": 4,
                         "tooltip": "Overlapping frames between windows (a multiple of 4, below temporal_tile)."}),
}


def core_latent_samples(latent) -> torch.Tensor:
    """A core LATENT in HunyuanVideo's format (FramePack's too) -> the DiT latents it holds."""
    from ..engine.families.hunyuan.vae import to_latent

    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] != 16:
        raise invalid("latent", getattr(samples, "shape", type(latent).__name__),
                      "a HunyuanVideo LATENT [batch, 16, frames, height/8, width/8]")
    return to_latent(samples)


class MusubiHunyuanVAEDecode:
    DESCRIPTION = ("Decode HunyuanVideo latents to IMAGE frames (usable by core CreateVideo/SaveVideo/PreviewImage) "
                   "and their fps. Spatial and temporal tiling keep the VRAM low (Musubi always tiles).")
    CATEGORY = "Musubi/generation"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = ("Decoded frames [frames, height, width, 3] (samples of a batch one after another).",
                       "Frame rate of the video (24 for HunyuanVideo).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The HunyuanVideo VAE."}),
            **DECODE_TILING_INPUTS,
        }, "optional": {
            "latents": (T.LATENTS, {"tooltip": "Latents from Musubi HunyuanVideo Sampler (connect this or "
                                               "`latent`)."}),
            "latent": ("LATENT", {"tooltip": "A core LATENT in HunyuanVideo format (from any node; connect this or "
                                             "`latents`)."}),
        }}

    def decode(self, vae, tile_size, tile_overlap, temporal_tile, temporal_overlap, latents=None, latent=None):
        vae = _check_family(T.handle(vae, "vae", VAE_EXPECTED), "vae", VAE_EXPECTED)
        if (latents is None) == (latent is None):
            raise invalid("latents / latent", "both" if latents is not None else "neither",
                          "exactly one of them connected")
        if latent is not None:
            latents = {"family": FAMILY, "samples": core_latent_samples(latent)}
        _family_value(latents, "latents", "latents from Musubi HunyuanVideo Sampler")
        video = decode_video(vae, latents["samples"], tile_size, tile_overlap, temporal_tile=temporal_tile,
                             temporal_overlap=temporal_overlap)
        return (video_to_image(video), float(latents.get("fps", FPS)))


NODE_CLASS_MAPPINGS = {
    "MusubiHunyuanDiTLoader": MusubiHunyuanDiTLoader,
    "MusubiHunyuanVAELoader": MusubiHunyuanVAELoader,
    "MusubiHunyuanTextEncoderLoader": MusubiHunyuanTextEncoderLoader,
    "MusubiHunyuanTextEncode": MusubiHunyuanTextEncode,
    "MusubiHunyuanImageEncode": MusubiHunyuanImageEncode,
    "MusubiHunyuanVideoEncode": MusubiHunyuanVideoEncode,
    "MusubiHunyuanSampler": MusubiHunyuanSampler,
    "MusubiHunyuanVAEDecode": MusubiHunyuanVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiHunyuanDiTLoader": "Musubi HunyuanVideo DiT Loader",
    "MusubiHunyuanVAELoader": "Musubi HunyuanVideo VAE Loader",
    "MusubiHunyuanTextEncoderLoader": "Musubi HunyuanVideo Text Encoder Loader (LLaVA-LLaMA-3 + CLIP-L)",
    "MusubiHunyuanTextEncode": "Musubi HunyuanVideo Text Encode",
    "MusubiHunyuanImageEncode": "Musubi HunyuanVideo Image Encode (SkyReels I2V)",
    "MusubiHunyuanVideoEncode": "Musubi HunyuanVideo Video Encode (V2V)",
    "MusubiHunyuanSampler": "Musubi HunyuanVideo Sampler",
    "MusubiHunyuanVAEDecode": "Musubi HunyuanVideo VAE Decode",
}
