"""What every family's generation nodes share: the sampler's seed/noise and run inputs, per-step progress with live
previews, and an encoder's warnings shown on its node."""

from __future__ import annotations

import contextlib
import warnings

from . import comfy_compat as compat

# a sampler's required noise inputs (seed with ComfyUI's randomize control: a generation seed, unlike training's)
NOISE_INPUTS = {
    "seed": ("INT", {"default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": True,
             "tooltip": "Noise seed."}),
    "noise_device": (["cpu", "gpu"], {"default": "cpu",
                     "tooltip": "cpu: the same noise on any machine (as ComfyUI); gpu: drawn on the GPU."}),
}
# a sampler's optional run inputs
RUN_INPUTS = {
    "offload_after": ("BOOLEAN", {"default": True, "tooltip": "Move the DiT back to CPU memory after sampling "
                      "(frees VRAM for the VAE and other models, as ComfyUI does; off: faster re-runs)."}),
    "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                   "tooltip": "Videos generated together (video b uses seed + b, so each is the video a batch of 1 "
                              "gives with that seed). Decoded one after another."}),
}


def step_progress(steps: int, node_id, latent_format: str):
    """`progress(step, total, x0)` for an engine sampler: ComfyUI's progress bar with a live preview of x0 through
    the family's latent format (none with --preview-method none); raising from it (ComfyUI's cancel) stops sampling."""
    bar = compat.Progress(steps, node_id)
    previewer = compat.latent_previewer(latent_format)

    def progress(step, total, x0):
        preview = None
        if x0 is not None and previewer is not None:
            preview = previewer.decode_latent_to_preview_image("JPEG", x0)
        bar.update(step, preview=preview)
    return progress


@contextlib.contextmanager
def warnings_on_node(node_id):
    """Warnings raised inside (e.g. a prompt longer than the encoder reads) are shown on the node, not only logged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    notes = [f"warning: {w.message}" for w in caught]
    if notes:
        compat.log.warning("%s", "; ".join(notes))
        compat.send_text(node_id, "\n".join(notes))
