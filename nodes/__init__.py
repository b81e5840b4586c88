"""Node classes of the pack (classic V1 API). One module per family (`wan.py`, `hunyuan.py`, `framepack.py`) and per generic
theme; each exports its own mappings.

Node ids are prefixed `Musubi` and are never renamed once released: saved workflows refer to them.
"""

from . import data, demo, distributed, framepack, generation, hunyuan, lora, training, utility, video, wan

# family node files first, then the generic ones
_MODULES = [wan, hunyuan, framepack, generation, video, utility, lora, training, distributed, data, demo]

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _m in _MODULES:
    clash = set(NODE_CLASS_MAPPINGS) & set(_m.NODE_CLASS_MAPPINGS)
    if clash:
        raise RuntimeError(f"duplicate node ids {sorted(clash)} in {_m.__name__}")
    NODE_CLASS_MAPPINGS.update(_m.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_m.NODE_DISPLAY_NAME_MAPPINGS)
