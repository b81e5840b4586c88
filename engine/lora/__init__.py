"""LoRA engine: adapters (LoRA/LoHa/LoKr), dialect reader, writer, convert, merge, apply, post-hoc EMA.

Canonical module names are the module paths of the family's model (engine.families), also ComfyUI's native names.
"""

from .adapters import (AdapterConfig, AdapterNetwork, LoHaModule, LoKrModule, LoRAModule, attached_networks,
                       detach_all, lokr_factorization)
from .apply import AppliedLoRAs, apply_loras, network_from_lora
from .convert import convert_lora
from .dialects import LoRAFile, MatchReport, match_lora, read_lora
from .ema import EMAConfig, post_hoc_ema, sigma_rel_to_gamma
from .merge import MergeHandle, merge_into_model, merge_loras_into_checkpoint
from .targets import select_targets
from .weights import ModuleWeights
from .writer import FORMATS, save_lora

__all__ = [
    "AdapterConfig", "AdapterNetwork", "LoRAModule", "LoHaModule", "LoKrModule", "attached_networks", "detach_all",
    "lokr_factorization", "apply_loras", "AppliedLoRAs", "network_from_lora", "convert_lora", "LoRAFile",
    "MatchReport", "match_lora", "read_lora", "EMAConfig", "post_hoc_ema", "sigma_rel_to_gamma", "MergeHandle",
    "merge_into_model", "merge_loras_into_checkpoint", "select_targets", "ModuleWeights",
    "FORMATS", "save_lora",
]
