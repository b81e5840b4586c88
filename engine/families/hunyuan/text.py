"""HunyuanVideo's two text encoders as one loaded object: LLaVA-LLaMA-3 (`text_states` + mask) and CLIP-L (the
pooled vector). What a loader node hands on one text-encoder socket; the family's cache adapter and the pipeline's
callers unpack it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...errors import invalid


class HunyuanTextEncoders:
    """`llm.encode(prompts, template) -> (states [B, L, D], mask [B, L])`, `clip.encode(prompts) -> pooled [B, 768]`
    (engine.encoders.llava_llama / clip_text). `model` holds both modules (placement moves them together);
    `identity` names both (embedding caches key it)."""

    def __init__(self, llm, clip):
        for name, enc in (("LLaVA-LLaMA-3 text encoder", llm), ("CLIP-L text encoder", clip)):
            if not callable(getattr(enc, "encode", None)) or not isinstance(getattr(enc, "model", None), nn.Module):
                raise invalid(name, type(enc).__name__, "a loaded encoder (engine.encoders)")
        self.llm, self.clip = llm, clip
        self.model = nn.ModuleDict({"llm": llm.model, "clip": clip.model})
        self.identity = f"{llm.identity}+{clip.identity}"

    def to(self, device) -> "HunyuanTextEncoders":
        self.llm.to(device)
        self.clip.to(device)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str], template: str = "video") -> dict[str, torch.Tensor]:
        """-> {"states" [B, L, D], "mask" [B, L] bool, "pooled" [B, 768]} (the models' dtype and device)."""
        states, mask = self.llm.encode(list(prompts), template=template)
        pooled = self.clip.encode(list(prompts))
        return {"states": states, "mask": mask.bool(), "pooled": pooled}


def real_tokens(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One prompt's states [L, D] with mask [L] -> the unpadded tokens [n, D] (what the pipeline and validation
    prompts take: every token real; the DiT masks padding, so both give the same prediction)."""
    keep = mask.bool()
    if not bool(keep.any()):
        raise invalid("prompt mask", "no real token", "at least one token (an empty prompt still has its end token)")
    return states[keep]
