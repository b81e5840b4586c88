"""One module's patch as read from a file, and what it does to the model's weights (float32 math).

Formulas and scale rules follow ComfyUI's loader (comfy/lora.py, comfy/weight_adapter), the consumer that matters:
  LoRA    ΔW = alpha/rank · up @ down           (rank = rows of down; with a Tucker/LoCon `mid`: up @ mid @ down)
  LoHa    ΔW = alpha/rank · (w1a @ w1b) ⊙ (w2a @ w2b)   (Tucker: w1a^T·t1·w1b ⊙ w2a^T·t2·w2b; rank = rows of w1b)
  LoKr    ΔW = alpha/rank · kron(w1, w2)       (factors full or a @ b; w2 Tucker: w2a^T·t2·w2b; the rank is that
                                                 of w2's factor when low-rank, else w1's; 1.0 when both are full)
  alpha missing -> scale 1.
  DoRA (`dora_scale`, with any of the three): W' = (W + ΔW) · dora_scale / (‖·‖ + eps), the norm taken per output
    row of the *original* W when dora_scale is [out, 1] and per input column of W + ΔW when it is [1, in] (ComfyUI's
    exact rule, kept so results match it); strength s blends: W + s·(W' − W).
  `.diff` / `.w_norm` (full weight difference): W + s·diff; `.set_weight`: W := set_weight (strength ignored, as
    ComfyUI does); either replaces the module's low-rank patch (ComfyUI's precedence: set > diff > w_norm > adapter).
  `.diff_b` (or `.b_norm`, only read together with `.w_norm`): bias + s·diff_b.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LORA_PARTS = ("down", "up")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOW_RANK = ("lora", "loha", "lokr")


@dataclass
class ModuleWeights:
    kind: str                                  # "lora" | "loha" | "lokr" | "diff" (no low-rank part)
    tensors: dict[str, torch.Tensor]           # lora: down [r, in], up [out, r] (+ mid [r, r]); LyCORIS names
    alpha: float | None = None                 # None: the file has no alpha
    source_keys: list[str] = field(default_factory=list)  # the file keys this module came from
    dora_scale: torch.Tensor | None = None     # DoRA magnitude, [out, 1] or [1, in]
    weight_patch: tuple[str, torch.Tensor] | None = None  # ("diff" | "set", tensor): replaces the low-rank patch
    bias_diff: torch.Tensor | None = None      # added to the module's bias
    overridden: list[str] = field(default_factory=list)   # file keys read but replaced by a weight_patch

    @property
    def low_rank(self) -> bool:
        """A low-rank ΔW is applied (not replaced by a full weight patch)."""
        return self.kind in LOW_RANK and self.weight_patch is None

    @property
    def hookable(self) -> bool:
        """The weight change is a plain additive ΔW that a forward hook can compute on the fly (no DoRA, no full
        weight patch); the bias change, if any, is applied separately."""
        return self.low_rank and self.dora_scale is None

    @property
    def touches_weight(self) -> bool:
        return self.low_rank or self.weight_patch is not None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "lora":
            return t["down"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind != "lokr":
            return None
        if "lokr_w2_b" in t and "lokr_w2" not in t:  # ComfyUI: the w2 factor's rank wins when both are low-rank
            return t["lokr_w2_b"].shape[0]
        if "lokr_w1_b" in t and "lokr_w1" not in t:
            return t["lokr_w1_b"].shape[0]
        return None  # both factors full

    @property
    def scale(self) -> float:
        rank = self.rank
        if self.alpha is None or rank is None:
            return 1.0
        return self.alpha / rank

    @property
    def shape(self) -> tuple[int, ...] | None:
        """Shape of the weight this module changes (out, in) for low-rank kinds; the patch's own shape for a full
        weight patch; None when only the bias changes."""
        if self.weight_patch is not None:
            return tuple(self.weight_patch[1].shape)
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].shape[1]
        if self.kind == "loha":
            if "hada_t1" in t:
                return t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1]
            return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]
        if self.kind == "lokr":
            w1 = _lokr_factor(t, 1, shape_only=True)
            w2 = _lokr_factor(t, 2, shape_only=True)
            return w1[0] * w2[0], w1[1] * w2[1]
        return None

    def raw_delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The low-rank product [out, in] float32, before the alpha/rank scale."""
        t = {k: v.to(device=device, dtype=torch.float32) for k, v in self.tensors.items()}
        if self.kind == "lora":
            down = t["mid"] @ t["down"] if "mid" in t else t["down"]
            return t["up"] @ down
        if self.kind == "loha":
            return _loha_factor(t, 1) * _loha_factor(t, 2)
        if self.kind == "lokr":
            return torch.kron(_lokr_factor(t, 1), _lokr_factor(t, 2))
        raise ValueError(f"no low-rank weights in a {self.kind!r} patch")

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """ΔW [out, in] float32 on `device`: scale included, strength not. Only for additive weight changes (a
        low-rank patch without DoRA, or a `.diff`); DoRA and `set_weight` depend on W: use `patched_weight`."""
        if self.weight_patch is not None:
            how, t = self.weight_patch
            if how != "diff":
                raise ValueError("a set_weight patch has no ΔW")
            return t.to(device=device, dtype=torch.float32)
        if self.dora_scale is not None:
            raise ValueError("a DoRA patch has no ΔW independent of the weight")
        return self.raw_delta(device) * self.scale

    def patched_weight(self, w: torch.Tensor, strength: float) -> torch.Tensor:
        """The new weight (float32) for the current weight `w` at `strength` (ComfyUI's arithmetic)."""
        w = w.float()
        if self.weight_patch is not None:
            how, t = self.weight_patch
            t = t.to(device=w.device, dtype=torch.float32)
            if how == "set":
                return t.clone() if strength != 0 else w.clone()
            return w + strength * t
        if not self.low_rank:
            return w.clone()
        diff = self.raw_delta(w.device).reshape(w.shape)
        if self.dora_scale is None:
            return w + (strength * self.scale) * diff
        return _dora(w, diff * self.scale, self.dora_scale.to(w.device, torch.float32), strength)

    def patched_bias(self, b: torch.Tensor, strength: float) -> torch.Tensor:
        return b.float() + strength * self.bias_diff.to(device=b.device, dtype=torch.float32)

    def validate(self, where: str) -> None:
        """Raise MusubiInputError (naming `where`) if the parts are incomplete or inconsistent."""
        from ..errors import invalid

        t = self.tensors
        if self.kind == "lokr":
            has1 = "lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= t.keys()
            has2 = "lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= t.keys()
            if not (has1 and has2):
                raise invalid(where, sorted(t), "LoKr tensors lokr_w1 (or _a/_b) and lokr_w2 (or _a/_b)")
        elif self.kind == "loha" and not set(LOHA_PARTS) <= t.keys():
            raise invalid(where, sorted(t), f"all of {list(LOHA_PARTS)}")
        elif self.kind == "loha" and ("hada_t1" in t) != ("hada_t2" in t):
            raise invalid(where, sorted(t), "both Tucker cores hada_t1 and hada_t2, or neither")
        elif self.kind == "lora" and not set(LORA_PARTS) <= t.keys():
            raise invalid(where, sorted(t), f"all of {list(LORA_PARTS)}")
        for k, v in t.items():
            if v.ndim != 2:
                raise invalid(f"{where} tensor {k}", tuple(v.shape), "a 2-D matrix (only Linear layers are supported)")
        try:
            if self.kind == "lora":
                r = t["up"].shape[1]
                if "mid" in t and t["mid"].shape[1] != t["down"].shape[0]:
                    raise ValueError
                if ("mid" in t and t["mid"].shape[0] != r) or ("mid" not in t and t["down"].shape[0] != r):
                    raise ValueError
            if self.kind == "loha":
                for i in (1, 2):
                    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
                    core = t.get(f"hada_t{i}")
                    if core is None and a.shape[1] != b.shape[0]:
                        raise ValueError
                    if core is not None and (core.shape[0] != a.shape[0] or core.shape[1] != b.shape[0]):
                        raise ValueError
                if _loha_shape(t, 1) != _loha_shape(t, 2):
                    raise ValueError
            if self.kind == "lokr":
                for i in (1, 2):
                    if f"lokr_w{i}_a" in t and f"lokr_w{i}" not in t:
                        a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
                        core = t.get(f"lokr_t{i}")
                        if core is None and a.shape[1] != b.shape[0]:
                            raise ValueError
                        if core is not None and (core.shape[0] != a.shape[0] or core.shape[1] != b.shape[0]):
                            raise ValueError
        except ValueError:
            raise invalid(where, {k: tuple(v.shape) for k, v in t.items()}, "factor shapes that multiply") from None
        if self.dora_scale is not None:
            shape = self.shape
            if self.kind not in LOW_RANK:
                raise invalid(f"{where} dora_scale", "no LoRA/LoHa/LoKr weights", "DoRA with low-rank weights")
            if shape is None or tuple(self.dora_scale.shape) not in ((shape[0], 1), (1, shape[1])):
                raise invalid(f"{where} dora_scale", tuple(self.dora_scale.shape),
                              f"shape ({shape[0]}, 1) or (1, {shape[1]}) for a weight of shape {shape}")


def _dora(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, strength: float) -> torch.Tensor:
    """ComfyUI's weight decomposition: the magnitude over the output rows of W (axis 0) or the input columns of
    W + ΔW (axis 1), picked by the magnitude's shape; strength interpolates between W and the result."""
    merged = w + delta
    if magnitude.shape[0] == merged.shape[0]:
        norm = w.norm(dim=1, keepdim=True)
    else:
        norm = merged.norm(dim=0, keepdim=True)
    merged = merged * (magnitude / (norm + torch.finfo(torch.float32).eps))
    if strength == 1.0:
        return merged
    return w + strength * (merged - w)


def _loha_factor(t: dict, i: int) -> torch.Tensor:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    core = t.get(f"hada_t{i}")
    return a @ b if core is None else a.t() @ core @ b   # Tucker: a is [rank, out], b is [rank, in]


def _loha_shape(t: dict, i: int) -> tuple[int, int]:
    a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    return (a.shape[1] if f"hada_t{i}" in t else a.shape[0]), b.shape[1]


def _lokr_factor(t: dict, i: int, shape_only: bool = False):
    full = t.get(f"lokr_w{i}")
    if full is not None:
        return tuple(full.shape) if shape_only else full
    a, b = t[f"lokr_w{i}_a"], t[f"lokr_w{i}_b"]
    core = t.get(f"lokr_t{i}")
    if shape_only:
        return (a.shape[1] if core is not None else a.shape[0]), b.shape[1]
    return a @ b if core is None else a.t() @ core @ b
