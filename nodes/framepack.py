"""FramePack nodes: loaders (the FramePack DiT; HunyuanVideo's VAE and text-encoder pair and the SigLIP image encoder,
on handles that say "framepack" so the generic cache, training and validation nodes make FramePack caches and
samples), encoders (text with per-section prompts, start/end image, per-section start images, one-frame control
images), the section sampler, the one-frame sampler (kisekaeichi) and the per-section VAE decode. The family's node
file (docs/ARCHITECTURE.md); nodes/hunyuan.py is its model and shares its VAE and text-encoder loading here.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import comfy_compat as compat
from . import checks
from . import types as T
from .generation import NOISE_INPUTS, RUN_INPUTS, magcache_for, step_progress
from .hunyuan import (DECODE_TILING_INPUTS, core_latent_samples, encode_prompts, load_text_encoders, load_vae,
                      text_encoder_loader_inputs, vae_loader_inputs)
from .loading import (ATTENTION_INPUT, DIT_DTYPE_INPUT, DTYPES, dit_handle, dit_memory_inputs, load_dit,
                      model_choices, owner_of, resolve_source, room_for, source_identity)
from .placement import dit_on_device, on_compute_device
from .registry import MODELS
from .video import video_to_image
from ..engine.errors import invalid
from ..engine.handle import ModelHandle, RunOptions

FAMILY = "framepack"   # the family these loaders load for (caches, validation and decodes follow the handles)
DIT_PRESETS = ["demo:framepack_demo_i2v.safetensors", "preset:tiny"]
SIGLIP_PRESETS = ["demo:siglip_demo.safetensors", "preset:tiny-siglip"]
SOLVERS = ["unipc", "dpm++", "euler"]    # Musubi's FramePack sampler: UniPC
FPS = 30.0
DIT_EXPECTED = "a DiT from Musubi FramePack DiT Loader"
VAE_EXPECTED = "a VAE from Musubi FramePack VAE Loader"
CLIP_EXPECTED = "the SigLIP image encoder from Musubi FramePack Image Encoder Loader"
TEXT_ENCODER_EXPECTED = "text encoders from Musubi FramePack Text Encoder Loader"
EMBEDS_EXPECTED = "prompt embeddings from Musubi FramePack Text Encode"
IMAGE_EXPECTED = "a start image from Musubi FramePack Image Encode"
SECTIONS_EXPECTED = "section images from Musubi FramePack Section Image"
CONTROLS_EXPECTED = "control images from Musubi FramePack Control Image"


def _kind(value, field: str, kind: str, expected: str) -> dict:
    """Refuse a value another family's node (or another FramePack node) made: FramePack's image values say which."""
    family = value.get("family") if isinstance(value, dict) else None
    if family != FAMILY or value.get("kind") != kind:
        made = f"made for {family}" if family and family != FAMILY else (
            f"FramePack {value.get('kind')}" if family else type(value).__name__)
        raise invalid(field, made, expected)
    return value


def _check_family(handle, field: str, expected: str):
    if handle.family != FAMILY:
        raise invalid(field, f"a model of family {handle.family!r}", expected)
    return handle


def _rgb(image, field: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """IMAGE [B, H, W, C] 0..1 (first image) -> ([3, H, W] in [-1, 1], its alpha as [H, W] uint8 or None). Sizes are
    left to the engine (Musubi's bucket resize: cover, centre crop)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise invalid(field, getattr(image, "shape", type(image).__name__), "an IMAGE [batch, height, width, 3]")
    x = compat.unwrap_inference_tensor(image[0]).float().clamp(0, 1)
    alpha = None
    if x.shape[-1] >= 4:
        alpha = (x[..., 3] * 255).round().to(torch.uint8).numpy()
    return x[..., :3].permute(2, 0, 1) * 2.0 - 1.0, alpha


# --- loaders ------------------------------------------------------------------------------------------------------

class MusubiFramePackDiTLoader:
    DESCRIPTION = ("Load a FramePack diffusion transformer (lllyasviel's FramePackI2V_HY or FramePack-F1, Kijai's "
                   "single-file bf16/fp8) from models/diffusion_models. A sharded model (the three "
                   "diffusion_pytorch_model-0000N-of-00003 files in a folder there) loads from any of its shards. "
                   "HunyuanVideo and Wan DiTs are refused. The model stays loaded between runs and serves training "
                   "and sampling.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded FramePack DiT (kept in the pack's memory; train it or sample with it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(DIT_PRESETS, "diffusion_models"), {
                "tooltip": "A FramePack DiT file from models/diffusion_models (for a sharded model: any of its "
                           "shards), or the tiny built-in preset for tests."}),
            "dtype": DIT_DTYPE_INPUT,
            "attention": ATTENTION_INPUT,
        }, "optional": dit_memory_inputs(59, "59 for the 13B model's 20 double + 40 single blocks, swapped over "
                                             "both lists", "the image, text, time and guidance embedders, the "
                                                           "clean-latent projections and the final layer"),
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, model_name, dtype, attention, fp8="none", blocks_to_swap=0, activation_offload=False,
             offload_after_use=False, offload_non_block_weights=False, compile_blocks=False, fp8_matmul=False,
             fp8_scale_dtype="float32", unique_id=None, prompt=None):
        from ..engine.families.framepack.loader import load_framepack_dit

        source = resolve_source(model_name, "diffusion_models", "model_name")
        model = load_dit(self, unique_id, prompt, "framepack_dit", source, dtype, fp8, fp8_matmul,
                         load_framepack_dit, fp8_scale_dtype)
        return (dit_handle(model, attention, blocks_to_swap, activation_offload, offload_after_use,
                           offload_non_block_weights, compile_blocks),)


class MusubiFramePackVAELoader:
    DESCRIPTION = ("Load the HunyuanVideo VAE for FramePack (the same files as Musubi HunyuanVideo VAE Loader: the "
                   "official pytorch_model.pt or ComfyUI's hunyuan_video_vae_bf16.safetensors) from models/vae. Its "
                   "handle says FramePack: Musubi Cache Latents makes FramePack section caches with it.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The loaded VAE, for FramePack (encode, decode, caching, validation).",)

    @classmethod
    def INPUT_TYPES(cls):
        return vae_loader_inputs("FramePack")

    def load(self, vae_name, dtype, keep_on_gpu=False, unique_id=None, prompt=None):
        return (load_vae(self, FAMILY, vae_name, dtype, keep_on_gpu, unique_id, prompt),)


class MusubiFramePackTextEncoderLoader:
    DESCRIPTION = ("Load FramePack's text encoders (HunyuanVideo's: LLaVA-LLaMA-3-8B and CLIP-L, the same files as "
                   "Musubi HunyuanVideo Text Encoder Loader) from models/text_encoders. Tokenizers come from "
                   "ComfyUI's own folders or the given paths, never from the internet. Its handle says FramePack: "
                   "Musubi Cache Text Embeddings makes FramePack text caches with it.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("Both text encoders with their tokenizers (for FramePack Text Encode and Cache Text "
                       "Embeddings).",)

    @classmethod
    def INPUT_TYPES(cls):
        return text_encoder_loader_inputs()

    def load(self, llm_name, clip_name, dtype, fp8_llm, llm_tokenizer_path="", clip_tokenizer_path="",
             keep_on_gpu=False, unique_id=None, prompt=None):
        return (load_text_encoders(self, FAMILY, llm_name, clip_name, dtype, fp8_llm, llm_tokenizer_path,
                                   clip_tokenizer_path, keep_on_gpu, unique_id, prompt),)


class MusubiFramePackImageEncoderLoader:
    DESCRIPTION = ("Load FramePack's SigLIP image encoder from models/clip_vision: ComfyUI's "
                   "sigclip_vision_patch14_384.safetensors, or FLUX.1-Redux's image_encoder folder (config.json + "
                   "model.safetensors) copied there.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The SigLIP image encoder (for FramePack Image Encode and Musubi Cache Latents' clip_vision).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_encoder_name": (model_choices(SIGLIP_PRESETS, "clip_vision"), {
                "tooltip": "sigclip_vision_patch14_384.safetensors (or a FLUX Redux image_encoder/model.safetensors) "
                           "from models/clip_vision, or the tiny preset."}),
            "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16",
                      "tooltip": "Precision (Musubi runs SigLIP in fp16)."}),
        }, "optional": {
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, image_encoder_name, dtype, keep_on_gpu=False, unique_id=None, prompt=None):
        from ..engine.encoders.siglip import load_siglip

        source = resolve_source(image_encoder_name, "clip_vision", "image_encoder_name")
        path = source
        if not source.startswith("preset:") and os.path.isfile(os.path.join(os.path.dirname(source), "config.json")):
            path = os.path.dirname(source)     # an HF folder (FLUX Redux image_encoder): its config names the sizes
        key = ("siglip", source_identity(source), dtype)
        create = room_for(source, prompt, lambda: load_siglip(path, dtype=DTYPES[dtype], device="cpu"))
        encoder = MODELS.get_or_create(key, create, owner=owner_of(self, unique_id))
        return (ModelHandle(encoder, FAMILY, RunOptions(keep_on_gpu=keep_on_gpu)),)


# --- encoders -----------------------------------------------------------------------------------------------------

class MusubiFramePackTextEncode:
    DESCRIPTION = ("Encode a prompt and a negative prompt with LLaVA-LLaMA-3 and CLIP-L for FramePack sampling (and "
                   "training validation). Per-section prompts use Musubi's syntax: '0:a cat sits;;;1-2:the cat "
                   "stands up;;;-1:the cat jumps' (section indices in time order, -1 = the last; a section not "
                   "named takes section 0's prompt). The negative prompt is used only with real CFG.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.EMBEDS,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Prompt (one per SPEC) and negative-prompt embeddings: LLM states of the real tokens and "
                       "CLIP-L pooled vectors.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (T.TEXT_ENCODER, {"tooltip": "The pair from Musubi FramePack Text Encoder Loader."}),
            "prompt": ("STRING", {"multiline": True, "default": "",
                       "tooltip": "What happens. One prompt for the whole video, or per section: "
                                  "'SPEC:text;;;SPEC:text' with SPEC N, -N (from the end) or S-E."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "What to avoid (real CFG only: the sampler's guidance_scale > 1)."}),
            "offload_after": ("BOOLEAN", {"default": True,
                              "tooltip": "Move the encoders back to CPU memory after encoding (frees VRAM)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, text_encoder, prompt, negative_prompt, offload_after, unique_id=None):
        from ..engine.families.framepack.sections import parse_section_string, spec_indices

        parts = parse_section_string(prompt)
        for spec, _ in parts:
            spec_indices(spec, 10**6)             # a malformed SPEC before the encoders run (range: at sampling)
        texts = list(dict.fromkeys(text for _, text in parts))
        encoded = encode_prompts(text_encoder, texts + [negative_prompt], offload_after, unique_id,
                                 TEXT_ENCODER_EXPECTED)
        by_text = dict(zip(texts, encoded))
        sections = [(spec, by_text[text]) for spec, text in parts]
        first = _section_zero(sections)
        return ({"family": FAMILY, "context": first["context"], "pooled": first["pooled"],
                 "negative_context": encoded[-1]["context"], "negative_pooled": encoded[-1]["pooled"],
                 "sections": sections, "prompt": prompt, "negative_prompt": negative_prompt},)


def _section_zero(sections: list) -> dict:
    """The value section 0 takes (Musubi's rule: the one named 0, else the smallest non-negative index's, else the
    first given): the single prompt nodes that take one (Validation Prompt) use."""
    from ..engine.families.framepack.sections import spec_indices

    named = [(min(spec_indices(spec, 10**6)), v) for spec, v in sections]
    non_negative = [iv for iv in named if iv[0] >= 0]
    zero = [v for i, v in named if i == 0]
    if zero:
        return zero[-1]
    return min(non_negative, key=lambda iv: iv[0])[1] if non_negative else min(named, key=lambda iv: iv[0])[1]


def _image_inputs() -> dict:
    return checks.size_inputs(640, 640, None)


class MusubiFramePackImageEncode:
    DESCRIPTION = ("Prepare FramePack's start image (its VAE latent and SigLIP embedding) at the video's size "
                   "(Musubi's bucket resize: cover, centre crop), and optionally an end image the original "
                   "schedule steers towards. Usable as a Validation Prompt's image_embeds.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("The start (and end) image conditioning for Musubi FramePack Sampler, Section Image or "
                       "Validation Prompt; the video's size is the one given here.",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The VAE from Musubi FramePack VAE Loader."}),
            "clip_vision": (T.CLIP_VISION, {"tooltip": "The SigLIP image encoder (Musubi FramePack Image Encoder "
                                                       "Loader)."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video (the first image of a batch)."}),
            **_image_inputs(),
        }, "optional": {
            "end_image": ("IMAGE", {"tooltip": "Optional last frame (original FramePack only, not F1; Musubi "
                                               "--end_image_path)."}),
        }}

    def encode(self, vae, clip_vision, start_image, width, height, end_image=None):
        from ..engine.families.framepack.pipeline import prepare_image

        vae = _check_family(T.handle(vae, "vae", VAE_EXPECTED), "vae", VAE_EXPECTED)
        clip = _check_family(T.handle(clip_vision, "clip_vision", CLIP_EXPECTED), "clip_vision", CLIP_EXPECTED)
        start, _ = _rgb(start_image, "start_image")
        end = _rgb(end_image, "end_image")[0] if end_image is not None else None
        with on_compute_device(vae), on_compute_device(clip):
            image = prepare_image(vae.module, clip.module, start, width, height)
            end_cond = prepare_image(vae.module, None, end, width, height) if end is not None else None
        return ({"family": FAMILY, "kind": "start", "task": "i2v", "conditioning": image, "end_image": end_cond,
                 "width": width, "height": height, "frames": None},)


class MusubiFramePackSectionImage:
    DESCRIPTION = ("A start image for some sections of a FramePack video (Musubi's per-section --image_path "
                   "'SPEC:path'): chain several, then connect the last to the sampler's section_images. Sections "
                   "not named use the sampler's image_embeds.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "build"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("section_images",)
    OUTPUT_TOOLTIPS = ("The section images so far (the connected ones, then this one), for Musubi FramePack "
                       "Sampler's section_images.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "The image, from Musubi FramePack Image Encode (the same "
                                                         "size as the sampler's image_embeds)."}),
            "section": ("STRING", {"default": "0", "tooltip": "SPEC of the sections that start from this image: "
                                                              "N (0 = first), -N (from the end) or S-E."}),
        }, "optional": {
            "previous": (T.IMAGE_EMBEDS, {"tooltip": "Section images of an earlier Section Image node (a later one "
                                                     "overrides an earlier one for the same section)."}),
        }}

    def build(self, image_embeds, section, previous=None):
        from ..engine.families.framepack.sections import spec_indices

        image = _kind(image_embeds, "image_embeds", "start", IMAGE_EXPECTED)
        spec_indices(section, 10**6)            # its syntax now; its range once the sampler knows the sections
        entries = []
        if previous is not None:
            prev = _kind(previous, "previous", "section_images", SECTIONS_EXPECTED)
            if (prev["width"], prev["height"]) != (image["width"], image["height"]):
                raise invalid("image_embeds", (image["width"], image["height"]),
                              f"the size of the previous section images {(prev['width'], prev['height'])}")
            entries = list(prev["sections"])
        entries.append((str(section).strip(), image["conditioning"]))
        return ({"family": FAMILY, "kind": "section_images", "sections": entries, "width": image["width"],
                 "height": image["height"]},)


class MusubiFramePackControlImage:
    DESCRIPTION = ("A control image for FramePack one-frame inference (Musubi --control_image_path; kisekaeichi: "
                   "the reference, then the clothing). Its alpha (an RGBA IMAGE) or a MASK says which parts count. "
                   "Chain several in order; connect the last to the one-frame sampler's control_images.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "build"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("control_images",)
    OUTPUT_TOOLTIPS = ("The control images so far (the connected ones, then this one), in order.",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The VAE from Musubi FramePack VAE Loader."}),
            "image": ("IMAGE", {"tooltip": "The control image (resized and centre-cropped to width x height); an "
                                           "alpha channel is its mask (255 = used, 0 = ignored)."}),
            **_image_inputs(),
        }, "optional": {
            "mask": ("MASK", {"tooltip": "Optional mask, as Load Image gives it: 1 = transparent = ignored, 0 = used "
                                         "(replaces the image's alpha). Resized to the latent size, not cropped."}),
            "previous": (T.IMAGE_EMBEDS, {"tooltip": "Control images of an earlier Control Image node (they come "
                                                     "first)."}),
        }}

    def build(self, vae, image, width, height, mask=None, previous=None):
        from ..engine.families.framepack.pipeline import prepare_image
        from ..engine.families.framepack.sections import latent_mask

        vae = _check_family(T.handle(vae, "vae", VAE_EXPECTED), "vae", VAE_EXPECTED)
        entries = []
        if previous is not None:
            prev = _kind(previous, "previous", "controls", CONTROLS_EXPECTED)
            if (prev["width"], prev["height"]) != (width, height):
                raise invalid("width/height", (width, height), f"the previous control images' size "
                                                               f"{(prev['width'], prev['height'])}")
            entries = list(prev["controls"])
        rgb, alpha = _rgb(image, "image")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
                raise invalid("mask", getattr(mask, "shape", type(mask).__name__), "a MASK [batch, height, width]")
            m = compat.unwrap_inference_tensor(mask if mask.ndim == 2 else mask[0]).float().clamp(0, 1)
            alpha = ((1.0 - m) * 255).round().to(torch.uint8).numpy()
        with on_compute_device(vae):
            cond = prepare_image(vae.module, None, rgb, width, height)
        lat_mask = None if alpha is None else latent_mask(alpha, (height // 8, width // 8))
        entries.append((cond.latent, lat_mask))
        return ({"family": FAMILY, "kind": "controls", "controls": entries, "width": width, "height": height},)


# --- samplers -----------------------------------------------------------------------------------------------------

def _prompts(embeds):
    """The embeds' per-SPEC prompts as FramePackPrompts, and the negative one."""
    from ..engine.families.framepack.pipeline import FramePackPrompt

    if not isinstance(embeds, dict) or embeds.get("family") != FAMILY or "sections" not in embeds:
        family = embeds.get("family") if isinstance(embeds, dict) else None
        raise invalid("embeds", f"made for {family}" if family else type(embeds).__name__, EMBEDS_EXPECTED)
    sections = [(spec, FramePackPrompt(v["context"], v["pooled"])) for spec, v in embeds["sections"]]
    negative = FramePackPrompt(embeds["negative_context"], embeds["negative_pooled"])
    return sections, negative


GUIDANCE_INPUTS = {
    "steps": ("INT", {"default": 25, "min": 1, "max": 1000,
              "tooltip": "Denoising steps per section (Musubi: 25)."}),
    "embedded_guidance": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 30.0, "step": 0.1,
                          "tooltip": "Distilled guidance of the FramePack DiT (Musubi --embedded_cfg_scale, 10.0)."}),
    "guidance_scale": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                       "tooltip": "Real classifier-free guidance with the negative prompt (1.0 = off: one pass per "
                                  "step, as FramePack is used)."}),
    "guidance_rescale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                         "tooltip": "With real CFG: rescale the guided prediction's spread towards the positive "
                                    "one's (Musubi --guidance_rescale; 0 = off)."}),
    "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
              "tooltip": "Flow shift; 0 = Musubi's dynamic shift from the section's size."}),
    "solver": (SOLVERS, {"default": "unipc", "tooltip": "Sampler: UniPC (Musubi's), DPM++ 2M or Euler."}),
}


def _request_common(embeds, image, steps, embedded_guidance, guidance_scale, guidance_rescale, shift, solver, seed,
                    noise_device, batch_size, magcache, unique_id) -> tuple[dict, list]:
    """The request fields both samplers take from their widgets, and the prompts by SPEC."""
    sections, negative = _prompts(embeds)
    return dict(negative_prompt=negative if float(guidance_scale) != 1.0 else None, width=image["width"],
                height=image["height"], steps=int(steps), embedded_guidance=float(embedded_guidance),
                guidance_scale=float(guidance_scale), guidance_rescale=float(guidance_rescale),
                shift=float(shift) or None, solver=solver, seed=int(seed), batch_size=int(batch_size),
                noise_device=noise_device, magcache=magcache_for(magcache, unique_id)), sections


def _run(handle, request, offload_after, unique_id) -> torch.Tensor:
    from ..engine.families.framepack.pipeline import generate, validate_request

    request = request.resolve()
    validate_request(handle.module, request)   # every mistake before the DiT moves
    with dit_on_device(handle, offload_after):
        latents = generate(handle.module, request,
                           step_progress(request.sections * request.steps, unique_id, "HunyuanVideo"))
    return latents.float().cpu()


def _outputs(latents: torch.Tensor, task: str, lws: int, one_frame: bool) -> tuple:
    from ..engine.families.hunyuan.vae import from_latent

    return ({"family": FAMILY, "samples": latents, "fps": FPS, "task": task, "latent_window_size": lws,
             "one_frame": one_frame}, {"samples": from_latent(latents)})


class MusubiFramePackSampler:
    DESCRIPTION = ("Generate a FramePack image-to-video by sections (Musubi fpack_generate_video): original "
                   "('inverted anti-drifting', with an optional end image) or F1 (forward). Per-section prompts "
                   "come from the Text Encode's SPEC syntax, per-section start images from Section Image nodes. "
                   "A LoRA applied to (or being trained on) the model is used as it is.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "sample"
    RETURN_TYPES = (T.LATENTS, "LATENT")
    RETURN_NAMES = ("latents", "latent")
    OUTPUT_TOOLTIPS = ("Generated latents (start latent first, sections·latent_window_size + 1 frames); decode them "
                       "with Musubi FramePack VAE Decode.",
                       "The same latents as ComfyUI's LATENT (HunyuanVideo format): core VAE Decode, Save Latent and "
                       "latent nodes work on it.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (T.DIT, {"tooltip": "The FramePack DiT (optionally with LoRAs applied or trained)."}),
            "embeds": (T.EMBEDS, {"tooltip": "Prompt embeddings from Musubi FramePack Text Encode."}),
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "The start (and end) image from Musubi FramePack Image "
                                                         "Encode; its size is the video's."}),
            "video_seconds": ("FLOAT", {"default": 5.0, "min": 0.1, "max": 600.0, "step": 0.1,
                              "tooltip": "Video length (Musubi --video_seconds): sections = round(seconds·30 / "
                                         "(latent_window_size·4)). Ignored when sections > 0."}),
            "sections": ("INT", {"default": 0, "min": 0, "max": 1000,
                         "tooltip": "Number of sections (Musubi --video_sections); 0 = from video_seconds."}),
            "latent_window_size": ("INT", {"default": 9, "min": 1, "max": 64,
                                   "tooltip": "Latent frames per section (FramePack: 9 = 33 video frames)."}),
            **GUIDANCE_INPUTS,
            "f1": ("BOOLEAN", {"default": False, "tooltip": "FramePack-F1 forward sampling (for the F1 DiT); off: "
                                                            "the original schedule."}),
            **NOISE_INPUTS,
        }, "optional": {
            "section_images": (T.IMAGE_EMBEDS, {"tooltip": "Start images for some sections, from Musubi FramePack "
                                                           "Section Image (the others start from image_embeds)."}),
            "latent_paddings": ("STRING", {"default": "", "tooltip": "Original schedule only: comma-separated "
                                           "padding per section in generation order (Musubi --latent_paddings, e.g. "
                                           "'3,2,1,0'); empty = FramePack's default."}),
            "rope_scaling_factor": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                    "tooltip": "RoPE height/width scaling factor on early steps (Musubi "
                                               "--rope_scaling_factor, e.g. 0.5); 0 = off."}),
            "rope_scaling_timestep_threshold": ("INT", {"default": 800, "min": 0, "max": 1000,
                                                "tooltip": "Steps with a timestep at or above this use the RoPE "
                                                           "scaling (Musubi --rope_scaling_timestep_threshold)."}),
            **RUN_INPUTS,
            "magcache": (T.MAGCACHE, {"tooltip": "Skip the blocks on predictable steps (Musubi MagCache, reset every "
                                                 "section; its built-in table is HunyuanVideo's)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, embeds, image_embeds, video_seconds, sections, latent_window_size, steps,
               embedded_guidance, guidance_scale, guidance_rescale, shift, solver, f1, seed, noise_device,
               section_images=None, latent_paddings="", rope_scaling_factor=0.0,
               rope_scaling_timestep_threshold=800, offload_after=True, batch_size=1, magcache=None, unique_id=None):
        from ..engine.families.framepack.pipeline import FramePackGenerateRequest
        from ..engine.families.framepack.sections import resolve_section_values, section_count

        handle = _check_family(T.handle(model, "model", DIT_EXPECTED), "model", DIT_EXPECTED)
        image = _kind(image_embeds, "image_embeds", "start", IMAGE_EXPECTED)
        lws = int(latent_window_size)
        n = int(sections) or section_count(float(video_seconds), lws)
        common, prompt_specs = _request_common(embeds, image, steps, embedded_guidance,
                                               guidance_scale, guidance_rescale, shift, solver, seed, noise_device,
                                               batch_size, magcache, unique_id)
        prompts = resolve_section_values(prompt_specs, n)          # a SPEC outside the video: refused here
        images = [image["conditioning"]] * n
        if section_images is not None:
            extra = _kind(section_images, "section_images", "section_images", SECTIONS_EXPECTED)
            if (extra["width"], extra["height"]) != (image["width"], image["height"]):
                raise invalid("section_images", (extra["width"], extra["height"]),
                              f"the image_embeds' size {(image['width'], image['height'])}")
            images = resolve_section_values([("0", image["conditioning"])] + list(extra["sections"]), n)
        paddings = latent_paddings.strip() or None
        rope = None
        if float(rope_scaling_factor) > 0:
            rope = (float(rope_scaling_timestep_threshold), float(rope_scaling_factor))
        request = FramePackGenerateRequest(prompt=prompts, image=images, end_image=image.get("end_image"),
                                           f1=bool(f1), sections=n, latent_window_size=lws,
                                           latent_paddings=paddings, rope_scaling=rope, **common)
        latents = _run(handle, request, offload_after, unique_id)
        return _outputs(latents, "f1" if f1 else "i2v", lws, False)


class MusubiFramePackOneFrameSampler:
    DESCRIPTION = ("FramePack one-frame inference (Musubi --one_frame_inference): one image generated at "
                   "target_index from control images placed at control_index (default: the start image at 0). "
                   "Kisekaeichi: control images reference (masked) and clothing (masked), control_index '0;10', "
                   "target_index 1, no_post, no_2x and no_4x on.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "sample"
    RETURN_TYPES = (T.LATENTS, "LATENT")
    RETURN_NAMES = ("latents", "latent")
    OUTPUT_TOOLTIPS = ("The generated frame's latent [batch, 16, 1, h, w]; decode it with Musubi FramePack VAE "
                       "Decode.", "The same latent as ComfyUI's LATENT (HunyuanVideo format).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (T.DIT, {"tooltip": "The FramePack DiT (optionally with LoRAs applied or trained)."}),
            "embeds": (T.EMBEDS, {"tooltip": "Prompt embeddings from Musubi FramePack Text Encode (section 0's "
                                             "prompt is used)."}),
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "The start image from Musubi FramePack Image Encode: its "
                                                         "SigLIP embedding conditions the frame; its size is the "
                                                         "output's."}),
            "target_index": ("INT", {"default": -1, "min": -1, "max": 1000,
                             "tooltip": "RoPE frame index of the generated frame; -1 = latent_window_size (Musubi's "
                                        "default)."}),
            "control_index": ("STRING", {"default": "", "tooltip": "RoPE frame indices of the control images, ';'-"
                                         "separated in order (e.g. '0;10'); empty = 0 for each."}),
            "no_post": ("BOOLEAN", {"default": False, "tooltip": "No zero 'post' latent after the controls."}),
            "no_2x": ("BOOLEAN", {"default": False, "tooltip": "No 2x-downsampled clean latents."}),
            "no_4x": ("BOOLEAN", {"default": False, "tooltip": "No 4x-downsampled clean latents."}),
            "latent_window_size": ("INT", {"default": 9, "min": 1, "max": 64,
                                   "tooltip": "FramePack's window size (places the default target and post)."}),
            **GUIDANCE_INPUTS,
            **NOISE_INPUTS,
        }, "optional": {
            "control_images": (T.IMAGE_EMBEDS, {"tooltip": "Control images in order, from Musubi FramePack Control "
                                                           "Image (none: the start image, unmasked)."}),
            **RUN_INPUTS,
            "magcache": (T.MAGCACHE, {"tooltip": "Skip the blocks on predictable steps (Musubi MagCache)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, embeds, image_embeds, target_index, control_index, no_post, no_2x, no_4x,
               latent_window_size, steps, embedded_guidance, guidance_scale, guidance_rescale, shift, solver, seed,
               noise_device, control_images=None, offload_after=True, batch_size=1, magcache=None, unique_id=None):
        from ..engine.families.framepack.pipeline import FramePackGenerateRequest
        from ..engine.families.framepack.sections import parse_one_frame_options

        handle = _check_family(T.handle(model, "model", DIT_EXPECTED), "model", DIT_EXPECTED)
        image = _kind(image_embeds, "image_embeds", "start", IMAGE_EXPECTED)
        if image.get("end_image") is not None:
            raise invalid("image_embeds", "an end image", "a start image only (one-frame inference takes control "
                                                          "images instead)")
        options = [k for k, on in (("no_post", no_post), ("no_2x", no_2x), ("no_4x", no_4x)) if on]
        if int(target_index) >= 0:
            options.append(f"target_index={int(target_index)}")
        if str(control_index).strip():
            options.append(f"control_index={str(control_index).strip()}")
        one_frame = parse_one_frame_options(",".join(options))
        if control_images is not None:
            ctrl = _kind(control_images, "control_images", "controls", CONTROLS_EXPECTED)
            if (ctrl["width"], ctrl["height"]) != (image["width"], image["height"]):
                raise invalid("control_images", (ctrl["width"], ctrl["height"]),
                              f"the image_embeds' size {(image['width'], image['height'])}")
            latents_, masks = [c for c, _ in ctrl["controls"]], [m for _, m in ctrl["controls"]]
        else:
            latents_, masks = [image["conditioning"].latent], []
        common, prompt_specs = _request_common(embeds, image, steps, embedded_guidance,
                                               guidance_scale, guidance_rescale, shift, solver, seed, noise_device,
                                               batch_size, magcache, unique_id)
        prompt = _section_zero(prompt_specs)
        request = FramePackGenerateRequest(prompt=prompt, image=image["conditioning"], one_frame=one_frame,
                                           latent_window_size=int(latent_window_size), control_latents=latents_,
                                           control_masks=masks, **common)
        latents = _run(handle, request, offload_after, unique_id)
        return _outputs(latents, "one_frame", int(latent_window_size), True)


class MusubiFramePackVAEDecode:
    DESCRIPTION = ("Decode FramePack latents to IMAGE frames and their fps (30): per section with the overlaps "
                   "soft-blended, as Musubi does, or in one piece (bulk). One-frame latents decode frame by frame. "
                   "Spatial and temporal tiling keep the VRAM low.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = ("Decoded frames [frames, height, width, 3] (samples of a batch one after another).",
                       "Frame rate of the video (30 for FramePack).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The VAE from Musubi FramePack VAE Loader."}),
            "mode": (["sections", "bulk"], {"default": "sections",
                     "tooltip": "sections: decode two sections at a time and blend the shared frames (Musubi's "
                                "default, less VRAM); bulk: the whole video in one decode (Musubi --bulk_decode)."}),
            **DECODE_TILING_INPUTS,
        }, "optional": {
            "latents": (T.LATENTS, {"tooltip": "Latents from a Musubi FramePack sampler (connect this or "
                                               "`latent`)."}),
            "latent": ("LATENT", {"tooltip": "A core LATENT in HunyuanVideo format (connect this or `latents`)."}),
            "latent_window_size": ("INT", {"default": 9, "min": 1, "max": 64,
                                   "tooltip": "Section size of a core LATENT (Musubi latents carry their own)."}),
        }}

    def decode(self, vae, mode, tile_size, tile_overlap, temporal_tile, temporal_overlap, latents=None, latent=None,
               latent_window_size=9):
        from ..engine.families.framepack.pipeline import decode_sections

        vae = _check_family(T.handle(vae, "vae", VAE_EXPECTED), "vae", VAE_EXPECTED)
        if mode not in ("sections", "bulk"):
            raise invalid("mode", mode, "sections or bulk")
        if (latents is None) == (latent is None):
            raise invalid("latents / latent", "both" if latents is not None else "neither",
                          "exactly one of them connected")
        if latent is not None:
            samples = core_latent_samples(latent)
            latents = {"family": FAMILY, "samples": samples, "latent_window_size": int(latent_window_size),
                       "one_frame": samples.shape[2] == 1}
        family = latents.get("family") if isinstance(latents, dict) else None
        if family != FAMILY:
            raise invalid("latents", f"made for {family}" if family else type(latents).__name__,
                          "latents from a Musubi FramePack sampler")
        lws = int(latents.get("latent_window_size", latent_window_size))
        one_frame = bool(latents.get("one_frame"))
        with on_compute_device(vae) as device:
            dtype = next(vae.module.parameters()).dtype
            video = decode_sections(vae.module, latents["samples"].to(device, dtype), lws, bulk=mode == "bulk",
                                    one_frame=one_frame, tile_size=tile_size, tile_overlap=tile_overlap,
                                    temporal_tile=temporal_tile, temporal_overlap=temporal_overlap)
        return (video_to_image(video), float(latents.get("fps", FPS)))


NODE_CLASS_MAPPINGS = {
    "MusubiFramePackDiTLoader": MusubiFramePackDiTLoader,
    "MusubiFramePackVAELoader": MusubiFramePackVAELoader,
    "MusubiFramePackTextEncoderLoader": MusubiFramePackTextEncoderLoader,
    "MusubiFramePackImageEncoderLoader": MusubiFramePackImageEncoderLoader,
    "MusubiFramePackTextEncode": MusubiFramePackTextEncode,
    "MusubiFramePackImageEncode": MusubiFramePackImageEncode,
    "MusubiFramePackSectionImage": MusubiFramePackSectionImage,
    "MusubiFramePackControlImage": MusubiFramePackControlImage,
    "MusubiFramePackSampler": MusubiFramePackSampler,
    "MusubiFramePackOneFrameSampler": MusubiFramePackOneFrameSampler,
    "MusubiFramePackVAEDecode": MusubiFramePackVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiFramePackDiTLoader": "Musubi FramePack DiT Loader",
    "MusubiFramePackVAELoader": "Musubi FramePack VAE Loader (HunyuanVideo VAE)",
    "MusubiFramePackTextEncoderLoader": "Musubi FramePack Text Encoder Loader (LLaVA-LLaMA-3 + CLIP-L)",
    "MusubiFramePackImageEncoderLoader": "Musubi FramePack Image Encoder Loader (SigLIP)",
    "MusubiFramePackTextEncode": "Musubi FramePack Text Encode",
    "MusubiFramePackImageEncode": "Musubi FramePack Image Encode",
    "MusubiFramePackSectionImage": "Musubi FramePack Section Image",
    "MusubiFramePackControlImage": "Musubi FramePack Control Image (one-frame)",
    "MusubiFramePackSampler": "Musubi FramePack Sampler",
    "MusubiFramePackOneFrameSampler": "Musubi FramePack One-Frame Sampler (kisekaeichi)",
    "MusubiFramePackVAEDecode": "Musubi FramePack VAE Decode",
}
