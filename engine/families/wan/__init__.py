"""Wan 2.1 models: DiT (`dit`), config detection (`detect`), tiny presets (`presets`), loaders (`loader`), VAE (`vae`).

Import the sub-modules directly (`from engine.families.wan.dit import WanModel`); this package imports nothing so that
each module can be used (and tested) on its own.
"""
