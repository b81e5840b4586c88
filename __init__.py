"""ComfyUI-Musubi: train LoRAs for video models (Wan 2.1; HunyuanVideo and FramePack to follow) and generate with
them in one ComfyUI graph. ComfyUI loads this file; the node classes live in nodes/, the model math in engine/."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The frontend extension that shows the nodes' status text (web/musubi_status.js). WEB_DIRECTORY only: a
# `[tool.comfy] web` entry as well would load it twice.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
