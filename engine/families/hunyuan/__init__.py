"""HunyuanVideo models: DiT (`dit`), config detection (`detect`), tiny presets (`presets`), loaders (`loader`),
LoRA names (`names`).

Import the sub-modules directly (`from engine.families.hunyuan.dit import HunyuanVideoModel`); this package imports
nothing so that each module can be used (and tested) on its own.
"""
