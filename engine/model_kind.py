"""Name what kind of model a weight file holds, from its key names, for refusal messages ("this looks like a VAE").

One ordered table shared by the loaders, so every loader describes a wrong file the same way."""

from __future__ import annotations

# (kind, substrings of which any one marks it); checked in this order
_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CLIP vision model", ("vision_model.", "visual.transformer")),
    ("T5 text encoder", ("SelfAttention", "token_embedding", "shared.weight")),
    ("diffusion model (DiT)", ("cross_attn",)),
    ("VAE", ("decoder.conv", "encoder.conv1")),
    ("CLIP text encoder", ("text_model.",)),
)


def foreign_hint(keys: list[str], expected: str, otherwise: str | None = None) -> str:
    """'this looks like a <kind>' for the first kind (other than `expected`) whose markers occur in `keys`;
    `otherwise` (default 'not a <expected>') when none does."""
    joined = " ".join(keys[:2000])
    for kind, markers in _MARKERS:
        if kind != expected and any(m in joined for m in markers):
            return f"this looks like a {kind}"
    return otherwise or f"not a {expected}"
