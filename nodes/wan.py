"""Wan nodes (2.1 and 2.2): loaders (DiT, VAE, umT5 text encoder, CLIP vision), the 2.2 A14B expert pair, encoders
(text, I2V/FLF2V/TI2V image, Fun-Control, one-frame), the sampler and the VAE decode. The family's node file
(docs/ARCHITECTURE.md)."""

from __future__ import annotations

import torch

from . import checks
from . import types as T
from .generation import NOISE_INPUTS, RUN_INPUTS, step_progress, warnings_on_node
from .loading import (ATTENTION, ATTENTION_INPUT, DIT_DTYPE_INPUT, DTYPES, dit_handle, dit_memory_inputs, load_dit,
                      model_choices, owner_of, resolve_source, room_for, source_identity)
from .placement import dit_on_device, experts_on_device, on_compute_device
from .registry import MODELS
from .video import RESIZE_INPUT, decode_video, image_to_video_tensor, video_frames_tensor, video_to_image
from ..engine.errors import MusubiInputError, invalid
from ..engine.handle import ModelHandle, RunOptions

FAMILY = "wan"   # the family these loaders load for (encoders are shared modules; their handle names the family)
DIT_PRESETS = ["demo:wan2.1_demo_t2v.safetensors", "preset:tiny-t2v", "preset:tiny-i2v", "preset:tiny-flf2v",
               "preset:tiny-fun-control", "preset:tiny-t2v-a14b-high-noise", "preset:tiny-t2v-a14b-low-noise",
               "preset:tiny-i2v-a14b-high-noise", "preset:tiny-i2v-a14b-low-noise", "preset:tiny-ti2v-5b"]
VAE_PRESETS = ["demo:wan2.1_demo_vae.safetensors", "preset:tiny-vae", "preset:tiny-vae22"]
EXPERT_MODES = ["both", "offload"]
T5_PRESETS = ["demo:umt5_demo.safetensors", "preset:tiny-umt5"]
CLIP_PRESETS = ["preset:tiny-clip"]
SOLVERS = ["unipc", "dpm++", "euler"]
DIT_EXPECTED = "a DiT from Musubi Wan DiT Loader (or a pair from Musubi Wan 2.2 Experts)"
VAE_EXPECTED = "a VAE from Musubi Wan VAE Loader"
TEXT_ENCODER_EXPECTED = "a text encoder from Musubi umT5 Text Encoder Loader"
CLIP_EXPECTED = "a CLIP vision model from Musubi CLIP Vision Loader"
CFG_SKIP = ["none", "early", "late", "middle", "early_late", "alternate"]
END_IMAGE_MODES = ["flf2v", "i2v_extra_frame"]



class MusubiWanDiTLoader:
    DESCRIPTION = ("Load a Wan 2.1 diffusion transformer (T2V 1.3B/14B, I2V, FLF2V, Fun-Control) from "
                   "models/diffusion_models: official or ComfyUI files, bf16/fp16/fp8/scaled fp8. The variant is "
                   "detected from the file. The model stays loaded between runs and serves training and sampling.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.DIT,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The loaded Wan DiT (kept in the pack's memory; train it or sample with it).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(DIT_PRESETS, "diffusion_models"), {
                "tooltip": "A Wan 2.1 DiT file from models/diffusion_models, or a tiny built-in preset for tests."}),
            "dtype": DIT_DTYPE_INPUT,
            "attention": ATTENTION_INPUT,
        }, "optional": dit_memory_inputs(39, "39 for 14B, 29 for 1.3B",
                                         "about 0.85 GB less VRAM for 14B, which keeps its time projection in fp32"),
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, model_name, dtype, attention, fp8="none", blocks_to_swap=0, activation_offload=False,
             offload_after_use=False, offload_non_block_weights=False, compile_blocks=False, fp8_matmul=False,
             fp8_scale_dtype="float32", unique_id=None, prompt=None):
        from ..engine.families.wan.loader import load_wan_dit

        source = resolve_source(model_name, "diffusion_models", "model_name")
        model = load_dit(self, unique_id, prompt, "wan_dit", source, dtype, fp8, fp8_matmul, load_wan_dit,
                         fp8_scale_dtype)
        return (dit_handle(model, attention, blocks_to_swap, activation_offload, offload_after_use,
                           offload_non_block_weights, compile_blocks),)


class MusubiWanVAELoader:
    DESCRIPTION = ("Load a Wan VAE from models/vae: the Wan 2.1 VAE (Wan2.1_VAE.pth, ComfyUI's wan_2.1_vae; also "
                   "for Wan 2.2 A14B) or the Wan 2.2 VAE of TI2V-5B (Wan2.2_VAE.pth, wan2.2_vae).")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The loaded Wan VAE.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae_name": (model_choices(VAE_PRESETS, "vae"), {"tooltip": "A Wan 2.1 or 2.2 VAE file from models/vae, or a tiny preset."}),
            "dtype": (["bf16", "fp16", "fp32"], {"default": "bf16", "tooltip": "Precision of the VAE weights."}),
            "cache_on_cpu": ("BOOLEAN", {"default": False,
                             "tooltip": "Keep the VAE's temporal feature caches in CPU memory (less VRAM, slower)."}),
        }, "optional": {
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, vae_name, dtype, cache_on_cpu, keep_on_gpu=False, unique_id=None, prompt=None):
        from ..engine.families.wan.vae import load_wan_vae

        source = resolve_source(vae_name, "vae", "vae_name")
        key = ("wan_vae", source_identity(source), dtype)
        def load():
            vae = load_wan_vae(source, dtype=DTYPES[dtype], device="cpu")
            vae.identity = ":".join(map(str, key[1]))   # names the weights in latent caches
            return vae

        vae = MODELS.get_or_create(key, room_for(source, prompt, load), owner=owner_of(self, unique_id))
        return (ModelHandle.of(vae, keep_on_gpu=keep_on_gpu, cache_on_cpu=bool(cache_on_cpu)),)


class MusubiUMT5Loader:
    DESCRIPTION = ("Load the umT5-XXL text encoder from models/text_encoders: the official "
                   "models_t5_umt5-xxl-enc-bf16.pth or ComfyUI's umt5_xxl fp16 / fp8 scaled safetensors. The "
                   "tokenizer comes from the file itself or from the given path, never from the internet.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The loaded umT5 text encoder with its tokenizer.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (model_choices(T5_PRESETS, "text_encoders"), {
                "tooltip": "A umT5-XXL file from models/text_encoders, or the tiny preset."}),
            "dtype": (["bf16", "fp16", "fp32", "fp8_e4m3fn"], {"default": "bf16",
                      "tooltip": "Precision of the encoder weights. fp8_e4m3fn (Musubi's --fp8_t5): the block "
                                 "Linear layers stored in fp8 with scales, computed in bf16 (about 40 % less memory, "
                                 "embeddings differ slightly, so caches made with it are kept apart)."}),
        }, "optional": {
            "tokenizer_path": ("STRING", {"default": "",
                               "tooltip": "Optional: a folder with spiece.model/tokenizer.json, or a .model file. "
                                          "Empty: use the tokenizer embedded in the weight file."}),
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, text_encoder_name, dtype, tokenizer_path="", keep_on_gpu=False, unique_id=None,
             prompt=None):
        from ..engine.encoders.umt5 import load_umt5

        source = resolve_source(text_encoder_name, "text_encoders", "text_encoder_name")
        tok = tokenizer_path.strip() or None
        key = ("umt5", source_identity(source), dtype, tok)
        fp8 = dtype == "fp8_e4m3fn"
        create = room_for(source, prompt, lambda: load_umt5(source, dtype=torch.bfloat16 if fp8 else DTYPES[dtype],
                                                            device="cpu", tokenizer_path=tok, fp8=fp8))
        enc = MODELS.get_or_create(key, create, owner=owner_of(self, unique_id))
        return (ModelHandle(enc, FAMILY, RunOptions(keep_on_gpu=keep_on_gpu)),)


class MusubiClipVisionLoader:
    DESCRIPTION = ("Load the CLIP ViT-H/14 image encoder used by Wan I2V/FLF2V from models/clip_vision "
                   "(ComfyUI's clip_vision_h.safetensors or the official open-clip .pth).")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (T.CLIP_VISION,)
    RETURN_NAMES = ("clip_vision",)
    OUTPUT_TOOLTIPS = ("The loaded CLIP vision encoder.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_name": (model_choices(CLIP_PRESETS, "clip_vision"), {
                "tooltip": "A CLIP ViT-H/14 file from models/clip_vision, or the tiny preset."}),
            "dtype": (["fp16", "bf16", "fp32"], {"default": "fp16", "tooltip": "Precision (Wan runs CLIP in fp16)."}),
        }, "optional": {
            "keep_on_gpu": ("BOOLEAN", {"default": False,
                            "tooltip": "Keep this model on the GPU between uses (faster, uses VRAM). Off: it goes "
                                       "back to CPU memory after each use."}),
        }, "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"}}

    def load(self, clip_name, dtype, keep_on_gpu=False, unique_id=None, prompt=None):
        from ..engine.encoders.clip_vision import load_clip_vision

        source = resolve_source(clip_name, "clip_vision", "clip_name")
        key = ("clip_vision", source_identity(source), dtype)
        create = room_for(source, prompt, lambda: load_clip_vision(source, dtype=DTYPES[dtype], device="cpu"))
        clip = MODELS.get_or_create(key, create, owner=owner_of(self, unique_id))
        return (ModelHandle(clip, FAMILY, RunOptions(keep_on_gpu=keep_on_gpu)),)


class MusubiWanTextEncode:
    DESCRIPTION = "Encode a prompt and a negative prompt with umT5 for Wan sampling (and training validation)."
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.EMBEDS,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Prompt and negative-prompt embeddings.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (T.TEXT_ENCODER, {"tooltip": "The umT5 text encoder."}),
            "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "What to generate."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "What to avoid. Empty: Wan's official default negative prompt."}),
            "offload_after": ("BOOLEAN", {"default": True,
                              "tooltip": "Move the encoder back to CPU memory after encoding (frees VRAM)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def encode(self, text_encoder, prompt, negative_prompt, offload_after, unique_id=None):
        text_encoder = T.handle(text_encoder, "text_encoder", TEXT_ENCODER_EXPECTED)
        from ..engine.families.wan.pipeline import NEGATIVE_PROMPT

        negative = negative_prompt.strip() or NEGATIVE_PROMPT
        with on_compute_device(text_encoder, offload_after), warnings_on_node(unique_id):   # > 512 tokens
            pos, neg = text_encoder.module.encode([prompt, negative])
        return ({"context": pos.float().cpu(), "negative_context": neg.float().cpu(), "prompt": prompt,
                 "negative_prompt": negative},)


class MusubiWanImageEncode:
    DESCRIPTION = ("Prepare image conditioning for Wan I2V (start image) or FLF2V (start + end image): VAE latents "
                   "with the frame mask, and CLIP vision features (Wan 2.1). Wan 2.2: the I2V A14B experts take no "
                   "CLIP (leave clip_vision unconnected); TI2V-5B (with the Wan 2.2 VAE) the start image's latent.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("I2V/FLF2V conditioning for the sampler (its size and frame count must match the sampler's).",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The Wan VAE (the Wan 2.2 VAE for TI2V-5B)."}),
            "start_image": ("IMAGE", {"tooltip": "The first frame of the video."}),
            **checks.size_inputs(),
        }, "optional": {
            "clip_vision": (T.CLIP_VISION, {"tooltip": "The CLIP ViT-H/14 image encoder: Wan 2.1 I2V/FLF2V models "
                                                       "need it; Wan 2.2 models take none."}),
            "end_image": ("IMAGE", {"tooltip": "Optional last frame (FLF2V models; with end_image_mode "
                                               "i2v_extra_frame, an I2V model)."}),
            "end_image_mode": (END_IMAGE_MODES, {"default": "flf2v",
                               "tooltip": "How the end image conditions the video. flf2v: an FLF2V model's first/last "
                                          "frame (both CLIP features). i2v_extra_frame: Musubi's unofficial end "
                                          "frame for a plain I2V model, encoded alone as one extra latent frame "
                                          "(the video is 4 frames longer; trim them with the sampler's "
                                          "trim_tail_frames, e.g. 3)."}),
            "resize_mode": RESIZE_INPUT,
        }}

    def encode(self, vae, start_image, width, height, frames, clip_vision=None, end_image=None,
               end_image_mode="flf2v", resize_mode="stretch"):
        from ..engine.families.wan.pipeline import prepare_flf2v, prepare_i2v, prepare_ti2v

        if end_image_mode not in END_IMAGE_MODES:
            raise invalid("end_image_mode", end_image_mode, f"one of {END_IMAGE_MODES}")
        vae = T.handle(vae, "vae", VAE_EXPECTED)
        if clip_vision is not None:
            clip_vision = T.handle(clip_vision, "clip_vision", CLIP_EXPECTED)
        ti2v = vae.module.latent_channels != 16          # the Wan 2.2 VAE: TI2V-5B's start image
        if ti2v and (clip_vision is not None or end_image is not None):
            raise invalid("clip_vision" if clip_vision is not None else "end_image", "connected",
                          "nothing with the Wan 2.2 VAE (TI2V-5B takes the start image's latent only)")
        _check_size(width, height)
        first = image_to_video_tensor(start_image, width, height, "start_image", resize_mode)
        last = image_to_video_tensor(end_image, width, height, "end_image", resize_mode) \
            if end_image is not None else None
        flf2v = last is not None and end_image_mode == "flf2v"
        if flf2v and clip_vision is None:
            raise invalid("clip_vision", None, "the CLIP vision encoder for first/last-frame (FLF2V) conditioning")
        clip_fea = None
        if clip_vision is not None:
            with on_compute_device(clip_vision):
                clips = [clip_vision.module.encode(first[None])[0]]
                if flf2v:   # an I2V model takes the start image's CLIP features only
                    clips.append(clip_vision.module.encode(last[None])[0])
            clip_fea = torch.cat(clips).float().cpu()
        with on_compute_device(vae):
            if ti2v:
                cond = prepare_ti2v(vae.module, first)
            elif flf2v:
                cond = prepare_flf2v(vae.module, first, last, frames)
            else:
                cond = prepare_i2v(vae.module, first, frames, end_image=last)
        return ({"conditioning": cond, "clip_fea": clip_fea, "width": width, "height": height, "frames": frames,
                 "task": "flf2v" if flf2v else "i2v"},)


def _check_size(width: int, height: int) -> None:
    if width % 16 or height % 16:
        raise invalid("width/height", (width, height), "multiples of 16")


class MusubiWanFunControlEncode:
    DESCRIPTION = ("Prepare Fun-Control conditioning (Wan2.1-Fun Control models): a control video (depth, pose, "
                   "edges... as IMAGE frames) and an optional start image with its CLIP features.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("Fun-Control conditioning for the sampler (same width/height/frames as the sampler).",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The Wan VAE."}),
            "control_video": ("IMAGE", {"tooltip": "Control frames; at least `frames` of them (the first are used)."}),
            **checks.size_inputs(),
        }, "optional": {
            "start_image": ("IMAGE", {"tooltip": "Optional first frame (needs clip_vision too)."}),
            "clip_vision": (T.CLIP_VISION, {"tooltip": "CLIP ViT-H/14, required with a start image."}),
            "resize_mode": RESIZE_INPUT,
        }}

    def encode(self, vae, control_video, width, height, frames, start_image=None, clip_vision=None,
               resize_mode="stretch"):
        from ..engine.families.wan.pipeline import prepare_fun_control

        vae = T.handle(vae, "vae", VAE_EXPECTED)
        _check_size(width, height)
        if start_image is not None and clip_vision is None:
            raise invalid("clip_vision", None, "a CLIP vision model when a start image is given")
        control = video_frames_tensor(control_video, width, height, "control_video", resize_mode)
        image = image_to_video_tensor(start_image, width, height, "start_image", resize_mode) \
            if start_image is not None else None
        clip_fea = None
        if image is not None:
            clip_vision = T.handle(clip_vision, "clip_vision", CLIP_EXPECTED)
            with on_compute_device(clip_vision):
                clip_fea = clip_vision.module.encode(image[None])[0].float().cpu()
        with on_compute_device(vae):
            cond = prepare_fun_control(vae.module, control, frames, image=image)
        return ({"conditioning": cond, "clip_fea": clip_fea, "width": width, "height": height, "frames": frames,
                 "task": "fun_control"},)


class MusubiWanOneFrameEncode:
    DESCRIPTION = ("One-frame inference (Musubi's one_frame_inference, for I2V models; FLF2V models with two control "
                   "images for intermediate frames, e.g. control_indices '0;2', target_index 1): generate a single "
                   "frame at `target_index` from one or two control images placed at `control_indices` on the time "
                   "axis — edits, poses and next-frame prediction. Set the sampler's frames to 1.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "encode"
    RETURN_TYPES = (T.IMAGE_EMBEDS,)
    RETURN_NAMES = ("image_embeds",)
    OUTPUT_TOOLTIPS = ("One-frame conditioning for the sampler (frames = 1).",)

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The Wan VAE."}),
            "clip_vision": (T.CLIP_VISION, {"tooltip": "CLIP ViT-H/14: features of every control image (an I2V "
                                                       "model uses the first image's, an FLF2V model both)."}),
            "control_image": ("IMAGE", {"tooltip": "The first control image."}),
            "control_indices": ("STRING", {"default": "0", "tooltip": "Frame index of each control image, e.g. '0' or '0;10'."}),
            "target_index": ("INT", {"default": 9, "min": 0, "max": 1000, "tooltip": "Frame index of the generated frame."}),
            **checks.size_inputs(frames=None),
        }, "optional": {
            "control_image_2": ("IMAGE", {"tooltip": "Optional second control image (needs two control indices)."}),
            "resize_mode": RESIZE_INPUT,
        }}

    def encode(self, vae, clip_vision, control_image, control_indices, target_index, width, height,
               control_image_2=None, resize_mode="stretch"):
        from ..engine.families.wan.pipeline import prepare_one_frame

        vae, clip_vision = T.handle(vae, "vae", VAE_EXPECTED), T.handle(clip_vision, "clip_vision", CLIP_EXPECTED)
        _check_size(width, height)
        try:
            indices = [int(s) for s in control_indices.replace(",", ";").split(";") if s.strip()]
        except ValueError:
            raise invalid("control_indices", control_indices, "frame indices separated by ';', e.g. '0;10'") from None
        images = [image_to_video_tensor(control_image, width, height, "control_image", resize_mode)]
        if control_image_2 is not None:
            images.append(image_to_video_tensor(control_image_2, width, height, "control_image_2", resize_mode))
        with on_compute_device(clip_vision):   # [257 · controls, clip_dim], first control first
            clip_fea = torch.cat([clip_vision.module.encode(im[None])[0] for im in images]).float().cpu()
        with on_compute_device(vae):
            cond = prepare_one_frame(vae.module, images, indices, target_index)
        return ({"conditioning": cond, "clip_fea": clip_fea, "width": width, "height": height, "frames": 1,
                 "task": "one_frame"},)


class MusubiWan22Experts:
    DESCRIPTION = ("Pair the two Wan 2.2 A14B experts for the sampler: the high-noise DiT runs the steps whose "
                   "timestep is at or above the boundary, the low-noise DiT the rest. Each expert keeps its own "
                   "loader settings (block swap, fp8) and LoRAs (apply them to each DiT before pairing).")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "pair"
    RETURN_TYPES = (T.WAN_EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The expert pair: connect it to Musubi Wan Sampler's model input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "high_noise_model": (T.DIT, {"tooltip": "The high-noise expert (e.g. wan2.2_t2v_high_noise_14B_*)."}),
            "low_noise_model": (T.DIT, {"tooltip": "The low-noise expert (e.g. wan2.2_t2v_low_noise_14B_*)."}),
            "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 999.0, "step": 0.005,
                         "tooltip": "Switch point as a fraction of the timesteps (or a timestep 1-999); 0 = the "
                                    "release's default (0.875 T2V, 0.9 I2V)."}),
            "memory_mode": (EXPERT_MODES, {"default": "both",
                            "tooltip": "both: both experts on the GPU; offload: only the running one, the other in "
                                       "pinned CPU memory (moved at the switch; works with block swap)."}),
        }}

    def pair(self, high_noise_model, low_noise_model, boundary, memory_mode):
        from ..engine.families.wan.experts import WanExperts, check_experts

        handles = {}
        for field, value in (("high_noise_model", high_noise_model), ("low_noise_model", low_noise_model)):
            handle = T.handle(value, field, "a DiT from Musubi Wan DiT Loader")
            if handle.family != FAMILY:
                raise invalid(field, f"a model of family {handle.family!r}", "a Wan 2.2 A14B DiT")
            handles[field] = handle
        if memory_mode not in EXPERT_MODES:
            raise invalid("memory_mode", memory_mode, f"one of {EXPERT_MODES}")
        experts = WanExperts(low=handles["low_noise_model"], high=handles["high_noise_model"],
                             boundary=float(boundary) or None, mode=memory_mode)
        check_experts(experts)   # mismatched or swapped experts, a bad boundary: refused here
        return (experts,)


class MusubiWan22LazyExperts:
    DESCRIPTION = ("A Wan 2.2 A14B expert pair loaded lazily (Musubi --lazy_loading): nothing is loaded here; each "
                   "expert is read from its file at its first step and freed after its last, so host memory holds "
                   "one expert at a time (each generation reads the files again). For LoRAs on the experts, use two "
                   "Musubi Wan DiT Loaders and Musubi Wan 2.2 Experts instead.")
    CATEGORY = "Musubi/loaders"
    FUNCTION = "pair"
    RETURN_TYPES = (T.WAN_EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The lazily loaded expert pair: connect it to Musubi Wan Sampler's model input.",)

    @classmethod
    def INPUT_TYPES(cls):
        files = model_choices(DIT_PRESETS, "diffusion_models")
        return {"required": {
            "high_noise_name": (files, {"tooltip": "The high-noise expert's file."}),
            "low_noise_name": (files, {"tooltip": "The low-noise expert's file."}),
            "dtype": DIT_DTYPE_INPUT,
            "attention": ATTENTION_INPUT,
            "fp8": (["none", "scaled", "e4m3"], {"default": "none", "tooltip": "Store the block Linears in fp8 "
                                                 "('scaled': block-wise scales); fp8 files are used as they are."}),
            "blocks_to_swap": ("INT", {"default": 0, "min": 0, "max": 39,
                               "tooltip": "Blocks of each expert kept in CPU memory and streamed in (at most 39)."}),
            "boundary": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 999.0, "step": 0.005,
                         "tooltip": "Switch point as a fraction of the timesteps (or a timestep 1-999); 0 = the "
                                    "release's default (0.875 T2V, 0.9 I2V)."}),
        }}

    def pair(self, high_noise_name, low_noise_name, dtype, attention, fp8, blocks_to_swap, boundary):
        from ..engine.families.wan.experts import LazyExpert, WanExperts, check_experts

        if fp8 not in ("none", "scaled", "e4m3"):
            raise invalid("fp8", fp8, "none, scaled or e4m3")
        if dtype not in DIT_DTYPE_INPUT[0]:
            raise invalid("dtype", dtype, f"one of {DIT_DTYPE_INPUT[0]}")
        experts = {}
        for field, name in (("high_noise_name", high_noise_name), ("low_noise_name", low_noise_name)):
            source = resolve_source(name, "diffusion_models", field)
            experts[field] = LazyExpert(wan_dit_config(source, field), name=str(name),
                                        load=_lazy_loader(source, dtype, fp8, attention, int(blocks_to_swap)))
        pair = WanExperts(low=experts["low_noise_name"], high=experts["high_noise_name"],
                          boundary=float(boundary) or None, mode="lazy")
        check_experts(pair)   # mismatched or swapped files, a bad boundary: refused before anything loads
        return (pair,)


def wan_dit_config(source: str, field: str):
    """The WanConfig of a DiT file from its header (no weights read); other files refused naming the input."""
    from ..engine.families.wan.loader import read_wan_config

    try:
        return read_wan_config(source)
    except MusubiInputError as e:
        raise invalid(field, source, f"a Wan 2.2 A14B DiT file ({e})") from None


def _lazy_loader(source: str, dtype: str, fp8: str, attention: str, blocks_to_swap: int):
    """Load one expert at its first step: read from the file each time (not shared with the loader nodes' copies)."""
    def load():
        from ..engine.families.wan.loader import load_wan_dit

        model = load_wan_dit(source, dtype=None if dtype == "keep" else DTYPES[dtype], device="cpu",
                             fp8=None if fp8 == "none" else fp8)
        return dit_handle(model, attention, blocks_to_swap, False, False, False, False)
    return load


class MusubiWanSampler:
    DESCRIPTION = ("Generate Wan 2.1 latents: T2V, T2I (1 frame), I2V, FLF2V, Fun-Control and one-frame (with image embeds). Flow-matching "
                   "UniPC / DPM++ / Euler, CFG with negative prompt, CFG skip and skip-layer guidance. A LoRA applied "
                   "to (or being trained on) the model is used as it is.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "sample"
    RETURN_TYPES = (T.LATENTS, "LATENT")
    RETURN_NAMES = ("latents", "latent")
    OUTPUT_TOOLTIPS = ("Generated latents; decode them with Musubi Wan VAE Decode.",
                       "The same latents as ComfyUI's LATENT (Wan 2.1 format): core VAE Decode, Save Latent and "
                       "latent nodes work on it.")

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames=None):
        return checks.validate_inputs(cls, checks.VIDEO_SIZE, width=width, height=height, frames=frames)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (f"{T.DIT},{T.WAN_EXPERTS}", {"tooltip": "The Wan DiT (optionally with LoRAs applied or "
                                                             "trained), or a Wan 2.2 A14B pair from Musubi Wan 2.2 "
                                                             "Experts."}),
            "embeds": (T.EMBEDS, {"tooltip": "Prompt embeddings from Musubi Wan Text Encode."}),
            **checks.size_inputs(),
            "steps": ("INT", {"default": 0, "min": 0, "max": 1000,
                      "tooltip": "Denoising steps; 0 = the official default of the task (50 T2V, 40 I2V/FLF2V)."}),
            "guidance_scale": ("FLOAT", {"default": 5.0, "min": 1.0, "max": 30.0, "step": 0.1,
                               "tooltip": "Classifier-free guidance scale."}),
            "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                      "tooltip": "Flow shift; 0 = the task default (5.0, or 3.0 for I2V at 832x480)."}),
            "solver": (SOLVERS, {"default": "unipc", "tooltip": "Sampler: UniPC (official default), DPM++ 2M or Euler."}),
            **NOISE_INPUTS,
        }, "optional": {
            "image_embeds": (T.IMAGE_EMBEDS, {"tooltip": "I2V/FLF2V, Fun-Control or one-frame conditioning from a "
                                                         "Musubi Wan ... Encode node."}),
            "cfg_skip_mode": (CFG_SKIP, {"default": "none", "tooltip": "Skip the negative pass on some steps (faster)."}),
            "cfg_apply_ratio": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                "tooltip": "Fraction of steps that apply CFG when cfg_skip_mode is not none."}),
            "slg_layers": ("STRING", {"default": "", "tooltip": "Skip-layer guidance blocks, e.g. '9' or '4,5,6'; empty = off."}),
            "slg_scale": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 20.0, "step": 0.1, "tooltip": "Skip-layer guidance scale."}),
            "slg_start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "SLG start (fraction of steps)."}),
            "slg_end": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "SLG end (fraction of steps)."}),
            **RUN_INPUTS,
            "guidance_scale_high": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                    "tooltip": "Wan 2.2 A14B pair: the guidance scale of the high-noise steps "
                                               "(guidance_scale is the low-noise one); 0 = the release's default "
                                               "(4.0 T2V, 3.5 I2V)."}),
            "trim_tail_frames": ("INT", {"default": 0, "min": 0, "max": 1024,
                                 "tooltip": "Drop this many frames at the end of the decoded video (Musubi "
                                            "--trim_tail_frames; e.g. 3 with an I2V end image, which adds 4 frames). "
                                            "Applied by Musubi Wan VAE Decode on the `latents` output."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def sample(self, model, embeds, width, height, frames, steps, guidance_scale, shift, solver, seed, noise_device,
               image_embeds=None, cfg_skip_mode="none", cfg_apply_ratio=1.0, slg_layers="", slg_scale=3.0,
               slg_start=0.0, slg_end=0.3, offload_after=True, batch_size=1, guidance_scale_high=0.0,
               trim_tail_frames=0, unique_id=None):
        from ..engine.families.wan.experts import WanExperts, reference
        from ..engine.families.wan.pipeline import (WanGenerateRequest, fps_of, generate, latent_format_of,
                                                    raw_latents, resolve_request)

        try:
            layers = tuple(int(s) for s in slg_layers.replace(" ", "").split(",") if s)
        except ValueError:
            raise invalid("slg_layers", slg_layers, "comma-separated block indices such as '9' or '4,5,6'") from None
        from ..engine.families.wan.pipeline import model_task_kind

        experts = model if isinstance(model, WanExperts) else None
        if experts is None:
            handle = T.handle(model, "model", DIT_EXPECTED)
            if handle.family != FAMILY:
                raise invalid("model", f"a model of family {handle.family!r}", DIT_EXPECTED)
            model = handle.module
        else:
            model = reference(experts)           # the pair's config (its experts may not be loaded yet)
        if isinstance(embeds, dict) and embeds.get("family", FAMILY) != FAMILY:
            raise invalid("embeds", f"made for {embeds['family']}", "prompt embeddings from Musubi Wan Text Encode")
        if experts is None and guidance_scale_high:
            raise invalid("guidance_scale_high", guidance_scale_high, "0 for a single DiT (it is the high-noise "
                                                                      "scale of a Wan 2.2 A14B expert pair)")
        kind = model_task_kind(model.config)
        if image_embeds is None and kind in ("i2v", "flf2v"):
            raise invalid("image_embeds", None, f"a start image from Musubi Wan Image Encode: the loaded "
                                                f"{model.config.variant} model is an image-to-video model")
        task = image_embeds["task"] if image_embeds is not None else ("t2i" if frames == 1 else "t2v")
        if task == "flf2v" and kind == "i2v":
            raise invalid("image_embeds", "first/last-frame (FLF2V) conditioning",
                          f"I2V conditioning for the loaded {model.config.variant} I2V model: set Musubi Wan Image "
                          "Encode's end_image_mode to i2v_extra_frame to use the end image with an I2V model")
        cond = image_embeds["conditioning"] if image_embeds is not None else None
        extra = getattr(cond, "extra_latent_frames", 0) if cond is not None else 0
        decoded = 1 if task == "one_frame" else frames + 4 * extra
        if isinstance(trim_tail_frames, bool) or not isinstance(trim_tail_frames, int) \
                or not 0 <= trim_tail_frames < decoded:
            raise invalid("trim_tail_frames", trim_tail_frames,
                          f"0..{decoded - 1} (fewer than the {decoded} decoded frames)")
        if image_embeds is not None and (image_embeds["width"], image_embeds["height"], image_embeds["frames"]) != \
                (width, height, frames):
            raise invalid("image_embeds", (image_embeds["width"], image_embeds["height"], image_embeds["frames"]),
                          f"the sampler's width/height/frames {(width, height, frames)}")
        request = WanGenerateRequest(
            task=task, context=embeds["context"], negative_context=embeds["negative_context"], width=width,
            height=height, frames=frames, steps=steps or None, shift=shift or None, guidance_scale=guidance_scale,
            solver=solver, seed=seed, batch_size=int(batch_size), noise_device=noise_device,
            cfg_skip_mode=cfg_skip_mode,
            cfg_apply_ratio=cfg_apply_ratio if cfg_skip_mode != "none" else None, slg_layers=layers,
            slg_scale=slg_scale, slg_start=slg_start, slg_end=slg_end,
            conditioning=image_embeds["conditioning"] if image_embeds is not None else None,
            clip_fea=image_embeds["clip_fea"] if image_embeds is not None else None,
            guidance_scale_high=guidance_scale_high or None)
        preview = latent_format_of(model.config)
        request = resolve_request(experts or model, request)    # (for the progress bar's step count)
        if experts is None:
            with dit_on_device(handle, offload_after):
                latents = generate(model, request, step_progress(request.steps, unique_id, preview))
        else:
            latents = generate(experts_on_device(experts, offload_after), request,
                               step_progress(request.steps, unique_id, preview))
        latents = latents.float().cpu()
        out = {"samples": latents, "fps": fps_of(model.config), "task": task}
        if trim_tail_frames:
            out["trim_tail_frames"] = int(trim_tail_frames)
        return (out, {"samples": raw_latents(latents)})


class MusubiWanVAEDecode:
    DESCRIPTION = "Decode Wan latents to IMAGE frames (usable by core CreateVideo/SaveVideo/PreviewImage) and their fps."
    CATEGORY = "Musubi/generation"
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = ("Decoded frames [frames, height, width, 3] (samples of a batch one after another).",
                       "Frame rate of the video (16 for Wan 2.1 and 2.2 A14B, 24 for TI2V-5B).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (T.VAE, {"tooltip": "The Wan VAE."}),
            "tile_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 32,
                          "tooltip": "Spatial tile size in pixels (0 = no tiling; tiling lowers VRAM)."}),
            "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 16, "tooltip": "Tile overlap in pixels."}),
        }, "optional": {
            "latents": (T.LATENTS, {"tooltip": "Latents from the Musubi sampler (connect this or `latent`); its "
                                               "trim_tail_frames are dropped from the end of the video."}),
            "latent": ("LATENT", {"tooltip": "A core LATENT in Wan 2.1 or 2.2 (TI2V-5B) format (from any "
                                             "node; connect this or `latents`)."}),
        }}

    def decode(self, vae, tile_size, tile_overlap, latents=None, latent=None):
        from ..engine.families.wan.pipeline import FPS, TI2V_FPS, normalized_latents

        vae = T.handle(vae, "vae", VAE_EXPECTED)
        if (latents is None) == (latent is None):
            raise invalid("latents / latent", "both" if latents is not None else "neither",
                          "exactly one of them connected")
        if latent is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else None
            if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[1] not in (16, 48):
                raise invalid("latent", getattr(samples, "shape", type(latent).__name__),
                              "a Wan LATENT [batch, 16, frames, height/8, width/8] (Wan 2.2 TI2V-5B: "
                              "[batch, 48, frames, height/16, width/16])")
            latents = {"samples": normalized_latents(samples),
                       "fps": TI2V_FPS if samples.shape[1] == 48 else FPS}
        if isinstance(latents, dict) and latents.get("family", FAMILY) != FAMILY:
            raise invalid("latents", f"made for {latents['family']}", "latents from Musubi Wan Sampler")
        channels, wanted = latents["samples"].shape[1], vae.module.latent_channels
        if channels != wanted:
            raise invalid("latents", f"{channels}-channel latents", f"{wanted}-channel latents for the connected "
                          f"{'Wan 2.2' if wanted == 48 else 'Wan 2.1'} VAE (TI2V-5B latents need the Wan 2.2 VAE, "
                          "all other Wan models the Wan 2.1 VAE)")
        video = decode_video(vae, latents["samples"], tile_size or None, tile_overlap if tile_size else None)
        trim = int(latents.get("trim_tail_frames", 0) or 0)   # the sampler's trim_tail_frames (checked there)
        if trim:
            video = video[:, :, :max(1, video.shape[2] - trim)]
        return (video_to_image(video), float(latents.get("fps", FPS)))


NODE_CLASS_MAPPINGS = {
    "MusubiWanDiTLoader": MusubiWanDiTLoader,
    "MusubiWanVAELoader": MusubiWanVAELoader,
    "MusubiUMT5Loader": MusubiUMT5Loader,
    "MusubiClipVisionLoader": MusubiClipVisionLoader,
    "MusubiWanTextEncode": MusubiWanTextEncode,
    "MusubiWanImageEncode": MusubiWanImageEncode,
    "MusubiWanFunControlEncode": MusubiWanFunControlEncode,
    "MusubiWanOneFrameEncode": MusubiWanOneFrameEncode,
    "MusubiWan22Experts": MusubiWan22Experts,
    "MusubiWan22LazyExperts": MusubiWan22LazyExperts,
    "MusubiWanSampler": MusubiWanSampler,
    "MusubiWanVAEDecode": MusubiWanVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MusubiWanDiTLoader": "Musubi Wan DiT Loader",
    "MusubiWanVAELoader": "Musubi Wan VAE Loader",
    "MusubiUMT5Loader": "Musubi umT5 Text Encoder Loader",
    "MusubiClipVisionLoader": "Musubi CLIP Vision Loader",
    "MusubiWanTextEncode": "Musubi Wan Text Encode",
    "MusubiWanImageEncode": "Musubi Wan Image Encode (I2V/FLF2V)",
    "MusubiWanFunControlEncode": "Musubi Wan Fun-Control Encode",
    "MusubiWanOneFrameEncode": "Musubi Wan One-Frame Encode",
    "MusubiWan22Experts": "Musubi Wan 2.2 Experts (A14B)",
    "MusubiWan22LazyExperts": "Musubi Wan 2.2 Experts Loader (A14B, lazy)",
    "MusubiWanSampler": "Musubi Wan Sampler",
    "MusubiWanVAEDecode": "Musubi Wan VAE Decode",
}
