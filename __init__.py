"""ComfyUI-Musubi: train LoRAs for video models (Wan 2.1; HunyuanVideo and FramePack to follow) and generate with
them in one ComfyUI graph. ComfyUI loads this file; the node classes live in nodes/, the model math in engine/."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
