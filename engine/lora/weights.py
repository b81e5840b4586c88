"""One module's adapter tensors as read from a file, and the ΔW they stand for (float32).

Scale rules follow ComfyUI's loader (the consumer that matters): LoRA and LoHa use alpha / rank (rank = rows of the
down / w1_b matrix), 1.0 when the file has no alpha; LoKr uses alpha / rank of its low-rank factor, and 1.0 when both
Kronecker factors are full matrices (LyCORIS convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LORA_PARTS = ("down", "up")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class ModuleWeights:
    kind: str                                  # "lora" | "loha" | "lokr"
    tensors: dict[str, torch.Tensor]           # lora: down [r, in], up [out, r]; LoHa/LoKr: LyCORIS names
    alpha: float | None = None                 # None: the file has no alpha
    source_keys: list[str] = field(default_factory=list)  # the file keys this module came from

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if "lokr_w2_b" in t:  # ComfyUI: the w2 factor's rank wins when both are low-rank
            return t["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in t:
            return t["lokr_w1_b"].shape[0]
        return None  # both factors full

    @property
    def scale(self) -> float:
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return self.alpha / rank

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the weight this module changes."""
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].shape[1]
        if self.kind == "loha":
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
        w1 = _lokr_factor(t, 1, shape_only=True)
        w2 = _lokr_factor(t, 2, shape_only=True)
        return w1[0] * w2[0], w1[1] * w2[1]

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """ΔW [out, in] float32 on `device`: scale included, strength not."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            return (t["up"] @ t["down"]) * self.scale
        if self.kind == "loha":
            return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * self.scale
        return torch.kron(_lokr_factor(t, 1), _lokr_factor(t, 2)) * self.scale

    def validate(self, where: str) -> None:
        """Raise MusubiInputError (naming `where`) if the parts are incomplete or inconsistent."""
        from ..errors import invalid

        t = self.tensors
        need = {"lora": [LORA_PARTS], "loha": [LOHA_PARTS],
                "lokr": [("lokr_w1",), ("lokr_w1_a", "lokr_w1_b")]}[self.kind]
        if self.kind == "lokr":
            has1 = "lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= t.keys()
            has2 = "lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= t.keys()
            if not (has1 and has2):
                raise invalid(where, sorted(t), "LoKr tensors lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b)")
        elif not set(need[0]) <= t.keys():
            raise invalid(where, sorted(t), f"all of {list(need[0])}")
        for k, v in t.items():
            if v.ndim != 2:
                raise invalid(f"{where} tensor {k}", tuple(v.shape), "a 2-D matrix (only Linear layers are supported)")
        try:
            if self.kind == "lora" and t["up"].shape[1] != t["down"].shape[0]:
                raise ValueError
            if self.kind == "loha" and not (t["hada_w1_a"].shape[1] == t["hada_w1_b"].shape[0]
                                            and t["hada_w1_a"].shape == t["hada_w2_a"].shape
                                            and t["hada_w1_b"].shape == t["hada_w2_b"].shape):
                raise ValueError
            if self.kind == "lokr":
                for i in (1, 2):
                    if f"lokr_w{i}_a" in t and t[f"lokr_w{i}_a"].shape[1] != t[f"lokr_w{i}_b"].shape[0]:
                        raise ValueError
        except ValueError:
            raise invalid(where, {k: tuple(v.shape) for k, v in t.items()}, "factor shapes that multiply") from None


def _lokr_factor(t: dict, i: int, shape_only: bool = False):
    full = t.get(f"lokr_w{i}")
    if full is not None:
        return tuple(full.shape) if shape_only else full
    a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    return (a.shape[0], b.shape[1]) if shape_only else a @ b
