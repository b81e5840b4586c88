"""ComfyUI-Musubi engine: pure PyTorch (models, data, training, sampling, LoRA, memory).

This package never imports ComfyUI. It runs standalone, e.g. from a benchmark script:

    sys.path.insert(0, "<repo root>"); import engine
"""

__all__ = ["errors", "checkpoint"]
