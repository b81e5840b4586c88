"""The demo's data node: procedural shape clips made in the graph (what the demo models were trained on, and new
concepts for a demo LoRA to teach them)."""

from __future__ import annotations

import numpy as np
import torch

from ..engine.demo import shapes as demo
from ..engine.errors import invalid


def _words(text: str, field: str, allowed) -> list[str]:
    words = [w.strip().lower() for w in str(text).replace(";", ",").split(",") if w.strip()]
    if not words:
        raise invalid(field, text, f"a comma-separated list of {', '.join(allowed)}")
    for w in words:
        if w not in allowed:
            raise invalid(field, w, f"one of {', '.join(allowed)}")
    return list(dict.fromkeys(words))


class MusubiDemoShapeClips:
    DESCRIPTION = ("Procedural video clips of one coloured shape moving in a straight line, each captioned ('a red "
                   "square moving to the right'), for every combination of the colours, shapes and motions given. "
                   "The demo models know red, green, blue and yellow; magenta and cyan are new to them (a LoRA can "
                   "teach them). Connect to Musubi Dataset from Images with frames_per_clip.")
    CATEGORY = "Musubi/data"
    FUNCTION = "make"
    RETURN_TYPES = ("IMAGE", "STRING", "INT")
    RETURN_NAMES = ("frames", "captions", "frames_per_clip")
    OUTPUT_TOOLTIPS = ("Every clip's frames, one clip after the other [clips x frames, H, W, 3].",
                       "One caption per clip, one per line.",
                       "Frames per clip (for Dataset from Images' frames_per_clip).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "colours": ("STRING", {"default": "magenta",
                        "tooltip": f"Comma-separated colours: {', '.join(demo.PALETTE)}."}),
            "shapes": ("STRING", {"default": ", ".join(demo.SHAPES),
                       "tooltip": f"Comma-separated shapes: {', '.join(demo.SHAPES)}."}),
            "motions": ("STRING", {"default": ", ".join(demo.BASE_MOTIONS),
                        "tooltip": f"Comma-separated motions: {', '.join(demo.MOTIONS)} (the demo base models "
                                   "know the four directions)."}),
            "clips_per_combination": ("INT", {"default": 1, "min": 1, "max": 64,
                                      "tooltip": "Clips per colour/shape/motion (each with its own size, start and "
                                                 "speed)."}),
            "variation": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1,
                          "tooltip": "Picks sizes, start points and speeds; the same value gives the same clips."}),
            "frames": ("INT", {"default": 17, "min": 5, "max": 81, "step": 4, "tooltip": "Frames per clip (4k+1)."}),
            "width": ("INT", {"default": 64, "min": 32, "max": 512, "step": 16, "tooltip": "Clip width."}),
            "height": ("INT", {"default": 64, "min": 32, "max": 512, "step": 16, "tooltip": "Clip height."}),
        }}

    def make(self, colours, shapes, motions, clips_per_combination, variation, frames, width, height):
        if (frames - 1) % 4:
            raise invalid("frames", frames, "4k+1 frames (5, 9, 13, 17, ...)")
        specs = demo.all_specs(_words(colours, "colours", demo.PALETTE), _words(shapes, "shapes", demo.SHAPES),
                               _words(motions, "motions", demo.MOTIONS))
        clips = demo.make_dataset(specs, clips_per_combination, variation, frames=frames, height=height, width=width)
        video = np.concatenate([c for c, _ in clips])                     # [N * F, H, W, 3] uint8
        return (torch.from_numpy(video).float() / 255.0, "\n".join(cap for _, cap in clips), frames)


NODE_CLASS_MAPPINGS = {"MusubiDemoShapeClips": MusubiDemoShapeClips}
NODE_DISPLAY_NAME_MAPPINGS = {"MusubiDemoShapeClips": "Musubi Demo Shape Clips"}
