"""Video helpers every family's nodes share (IMAGE <-> video tensors, VAE decode on the compute device) and the
Save Video node."""

from __future__ import annotations

import os

import torch

from . import comfy_compat as compat
from . import checks
from .paths import check_write_path
from .placement import on_compute_device
from ..engine.data.buckets import RESIZE_MODES, fit_frames
from ..engine.errors import invalid

RESIZE_INPUT = (list(RESIZE_MODES), {"default": "stretch", "tooltip": (
    "How images of another aspect ratio are fitted to width x height: stretch (ComfyUI's usual resize), crop (keep "
    "the aspect ratio, cut the overhang at the centre, as the training buckets do) or pad (keep all of the image, "
    "black bars).")})


def image_to_video_tensor(image: torch.Tensor, width: int, height: int, field: str,
                          resize_mode: str = "stretch") -> torch.Tensor:
    """IMAGE [B,H,W,C] 0..1 (first image used) -> [3, H', W'] in [-1, 1] fitted to width x height (bicubic;
    `engine.data.buckets.fit_frames` modes)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise invalid(field, getattr(image, "shape", type(image).__name__), "an IMAGE [batch, height, width, 3]")
    x = compat.unwrap_inference_tensor(image[:1, :, :, :3]).movedim(-1, 1).float()  # [1,3,H,W]
    return (fit_frames(x, width, height, resize_mode)[0].clamp(0, 1) * 2.0 - 1.0)


def video_frames_tensor(images: torch.Tensor, width: int, height: int, field: str,
                        resize_mode: str = "stretch") -> torch.Tensor:
    """IMAGE frames [F,H,W,C] 0..1 -> [3, F, height, width] in [-1, 1] (each frame fitted like the image above)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] < 3:
        raise invalid(field, getattr(images, "shape", type(images).__name__), "IMAGE frames [frames, height, width, 3]")
    x = compat.unwrap_inference_tensor(images[..., :3]).movedim(-1, 1).float()          # [F,3,H,W]
    return (fit_frames(x, width, height, resize_mode).clamp(0, 1) * 2.0 - 1.0).movedim(0, 1)   # [3,F,H,W]


def decode_video(vae, latents: torch.Tensor, tile_size=None, tile_overlap=None, **tiling) -> torch.Tensor:
    """Latents -> video [B, 3, F, H, W] in [-1, 1] (float32, CPU), decoded on the compute device. `tiling`: the
    family VAE's other decode options (HunyuanVideo: temporal_tile, temporal_overlap)."""
    with on_compute_device(vae) as device:
        dtype = next(vae.module.parameters()).dtype
        video = vae.module.decode(latents.to(device, dtype), tile_size=tile_size, tile_overlap=tile_overlap,
                                  **tiling)
    return video.float().cpu()


def video_to_image(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> IMAGE [B·F, H, W, 3] in [0, 1] (the samples of a batch one after another)."""
    frames = ((video.float().cpu() + 1.0) / 2.0).clamp(0, 1)
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, *frames.shape[-2:], 3).contiguous()


class MusubiSaveVideo:
    DESCRIPTION = ("Save IMAGE frames as an H.264 mp4 in the output folder, with the workflow embedded (drop the "
                   "video onto ComfyUI to get the graph back).")
    CATEGORY = "Musubi/generation"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    OUTPUT_TOOLTIPS = ()

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None):
        return checks.validate_inputs(cls, {"filename_prefix": checks.relative_name}, filename_prefix=filename_prefix)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Frames to save."}),
            "fps": ("FLOAT", {"default": 16.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip": "Frame rate."}),
            "filename_prefix": ("STRING", {"default": "musubi/video", "tooltip": "Output file prefix (subfolders allowed)."}),
            "crf": ("INT", {"default": 19, "min": 0, "max": 51, "tooltip": "H.264 quality (lower = better, bigger)."}),
        }, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    def save(self, images, fps, filename_prefix, crf, prompt=None, extra_pnginfo=None):
        from ..engine.video_io import write_mp4

        folder, filename, counter, subfolder, _ = compat.save_path(filename_prefix, images.shape[2], images.shape[1])
        check_write_path(folder, "filename_prefix")
        name = f"{filename}_{counter:05}_.mp4"
        metadata = {}
        if not compat.metadata_disabled():   # --disable-metadata, as core savers honour it
            if extra_pnginfo:
                metadata.update(extra_pnginfo)
            if prompt is not None:
                metadata["prompt"] = prompt
        write_mp4(images, os.path.join(folder, name), fps, metadata=metadata, crf=crf)
        return {"ui": {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}], "animated": (True,)}}


NODE_CLASS_MAPPINGS = {"MusubiSaveVideo": MusubiSaveVideo}
NODE_DISPLAY_NAME_MAPPINGS = {"MusubiSaveVideo": "Musubi Save Video"}
