"""Utility nodes: memory management of the pack's own models."""

from __future__ import annotations

from . import comfy_compat as compat
from .placement import release_swap
from .registry import MODELS, SESSIONS


class MusubiUnloadModels:
    DESCRIPTION = ("Release the models and training sessions this pack holds (ComfyUI's own unload never touches "
                   "them). 'offload' moves them to CPU memory and keeps them loaded; 'release' frees them.")
    CATEGORY = "Musubi/utils"
    FUNCTION = "run"
    OUTPUT_NODE = True
    RETURN_TYPES = (compat.ANY,)
    RETURN_NAMES = ("passthrough",)
    OUTPUT_TOOLTIPS = ("The 'passthrough' input, unchanged, so the unload can be ordered inside a graph.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (["offload", "release"], {"default": "offload",
                         "tooltip": "offload: move the pack's models to CPU RAM; release: drop them from memory."}),
                "what": (["models", "training sessions", "everything"], {"default": "models",
                         "tooltip": "Which of the pack's objects to unload."}),
            },
            "optional": {
                "passthrough": (compat.ANY, {"tooltip": "Any value; connect it to run this node after another one."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None, **kwargs):
        return True

    def run(self, mode, what, passthrough=None):
        count = unload(mode, what)
        if mode == "release":
            compat.free_all()
        return {"ui": {"text": [f"{mode}: {count} object(s)"]}, "result": (passthrough,)}


def unload(mode: str, what: str = "everything") -> int:
    """Offload ("offload": to CPU RAM) or drop ("release") the pack's models and/or training sessions."""
    registries = {"models": [MODELS], "training sessions": [SESSIONS], "everything": [MODELS, SESSIONS]}[what]
    count = 0
    # block swap first: detached to CPU, host (pinned) masters freed, no hook left on a model that moves or goes
    release_swap()
    for reg in registries:
        if mode == "release":
            count += reg.release()
        else:
            for obj in reg.values():
                to = getattr(obj, "to", None)
                if callable(to):
                    to("cpu")
                    count += 1
    return count


# ComfyUI's "Unload models" button (POST /free) offloads the pack's models to CPU RAM as it unloads its own; "Free
# model and node cache" drops them and the training sessions, as it drops its node cache.
compat.install_free_hooks(lambda: unload("offload"), lambda: unload("release"))


NODE_CLASS_MAPPINGS = {"MusubiUnloadModels": MusubiUnloadModels}
NODE_DISPLAY_NAME_MAPPINGS = {"MusubiUnloadModels": "Musubi Unload Models"}
