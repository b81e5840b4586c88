"""Custom ComfyUI socket types of the pack, and the small wrappers that travel on them.

Type names are part of saved workflows: never rename them.
"""

DIT = "MUSUBI_DIT"                  # a diffusion transformer of any family (its class names the family)
VAE = "MUSUBI_VAE"                  # a video VAE of any family
TEXT_ENCODER = "MUSUBI_TEXT_ENCODER"
CLIP_VISION = "MUSUBI_CLIP_VISION"
EMBEDS = "MUSUBI_EMBEDS"            # text embeddings (positive + negative)
IMAGE_EMBEDS = "MUSUBI_IMAGE_EMBEDS"  # I2V/FLF2V conditioning (y + CLIP features)
LATENTS = "MUSUBI_LATENTS"
DATASET = "MUSUBI_DATASET"
LORA = "MUSUBI_LORA"
LORA_CONFIG = "MUSUBI_LORA_CONFIG"
OPTIMIZER_CONFIG = "MUSUBI_OPTIMIZER_CONFIG"
TRAINING_SESSION = "MUSUBI_TRAINING_SESSION"
VALIDATION_PROMPTS = "MUSUBI_VALIDATION_PROMPTS"
MAGCACHE = "MUSUBI_MAGCACHE"          # MagCache settings for a sampler (engine.sampling.magcache.MagCacheConfig)
WAN_EXPERTS = "MUSUBI_WAN_EXPERTS"    # a Wan 2.2 A14B expert pair (engine.families.wan.experts.WanExperts)


def handle(value, field: str, expected: str):
    """The ModelHandle on a model socket (engine/handle.py); a bare model gets default run options. Anything else
    is refused naming the input."""
    from ..engine.errors import invalid
    from ..engine.handle import as_handle

    h = as_handle(value)
    if h is None:
        raise invalid(field, type(value).__name__, expected)
    return h
