"""What every family's generation nodes share: the sampler's seed/noise and run inputs, per-step progress with live
previews, an encoder's warnings shown on its node, and the MagCache settings node."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

from ..engine.errors import invalid
from . import comfy_compat as compat
from . import types as T

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


def magcache_for(settings, node_id):
    """The sampler's MagCacheConfig from a Musubi MagCache node's output (None: off). The sampler node shows how many
    block passes were skipped (all runs of this execution: FramePack runs one per section), or a calibration run's
    table, ready to paste into mag_ratios."""
    if settings is None:
        return None
    from ..engine.sampling.magcache import MagCacheConfig

    if not isinstance(settings, MagCacheConfig):
        raise invalid("magcache", type(settings).__name__, "settings from a Musubi MagCache node")
    runs = []

    def show(cache):
        runs.append(cache)
        if settings.calibrate:
            table = ",".join(f"{r:g}" for r in cache.calibration.mag_ratios())
            compat.log.info("MagCache calibration: %s", table)
            compat.send_text(node_id, f"MagCache calibration (paste into mag_ratios):\n{table}")
            return
        skipped, steps = sum(len(c.skipped) for c in runs), sum(c.steps for c in runs)
        compat.log.info("MagCache skipped %d of %d block passes", skipped, steps)
        compat.send_text(node_id, f"MagCache skipped {skipped} of {steps} block passes")
    return dataclasses.replace(settings, on_done=show)


class MusubiMagCache:
    DESCRIPTION = ("MagCache settings for a sampler: on steps where the DiT blocks' residual is predictable from a "
                   "calibration, reuse the last one instead of running the blocks (fewer block passes, small "
                   "change to the result). Calibrate once per model and step count for the best table.")
    CATEGORY = "Musubi/generation"
    FUNCTION = "build"
    RETURN_TYPES = (T.MAGCACHE,)
    RETURN_NAMES = ("magcache",)
    OUTPUT_TOOLTIPS = ("Connect to a Musubi sampler's magcache input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mag_ratios": ("STRING", {"default": "", "tooltip": "Comma-separated calibration (any length, resampled "
                                      "to the step count); empty = the model's built-in table."}),
            "retention_ratio": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.05,
                                "tooltip": "This fraction of the first steps always runs the blocks."}),
            "threshold": ("FLOAT", {"default": 0.24, "min": 0.0, "max": 10.0, "step": 0.01,
                          "tooltip": "Accumulated error allowed while skipping (lower: fewer skips, closer "
                                     "result)."}),
            "max_skips": ("INT", {"default": 6, "min": 1, "max": 1000,
                          "tooltip": "Consecutive skipped steps at most (MagCache's K)."}),
            "calibrate": ("BOOLEAN", {"default": False, "tooltip": "Run every step and show the measured table on "
                                                                   "the sampler node (to paste into mag_ratios)."}),
        }}

    def build(self, mag_ratios, retention_ratio, threshold, max_skips, calibrate):
        from ..engine.sampling.magcache import MagCacheConfig

        ratios = None
        if mag_ratios.strip():
            try:
                ratios = [float(v) for v in mag_ratios.replace("\n", ",").split(",") if v.strip()]
            except ValueError:
                raise invalid("mag_ratios", mag_ratios, "comma-separated numbers, e.g. 1.0,1.06971,1.29073") \
                    from None
        config = MagCacheConfig(ratios, float(retention_ratio), float(threshold), int(max_skips), bool(calibrate))
        if ratios is not None or calibrate:
            config.validate()
        return (config,)


NODE_CLASS_MAPPINGS = {"MusubiMagCache": MusubiMagCache}
NODE_DISPLAY_NAME_MAPPINGS = {"MusubiMagCache": "Musubi MagCache"}
