"""Trainable/inference adapters (LoRA, LoHa, LoKr) on `nn.Linear` modules, and the network that attaches them.

An adapter never touches the wrapped Linear's weight. It is attached as a forward hook on the Linear, so the base
module itself runs (an fp8 or block-swapped Linear keeps working) and the hook adds the low-rank term:

    y = base(x) + multiplier · scale · delta(x)          scale = alpha / rank

Several named networks can be active on one model (several LoRAs with strengths); attaching a network under a
name that is already attached first detaches the old one, so re-running a ComfyUI graph never stacks adapters.
Adapter weights are float32 by default whatever the base dtype; the term is computed in the adapter dtype and cast
to the output dtype.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import invalid
from .targets import musubi_stem, select_targets

KINDS = ("lora", "loha", "lokr")
_REGISTRY_ATTR = "_musubi_adapter_networks"  # model attribute: {network name: AdapterNetwork}


@dataclass
class AdapterConfig:
    kind: str = "lora"                 # "lora" | "loha" | "lokr"
    rank: int = 4                      # network_dim
    alpha: float | None = 1.0          # network_alpha; None/0 -> alpha = rank (scale 1)
    dropout: float | None = None       # neuron dropout on the rank activations (training only)
    rank_dropout: float | None = None  # random rank mask, rescaled by 1/(1-p) (training only)
    module_dropout: float | None = None  # skip the whole adapter with this probability (training only)
    lokr_factor: int = -1              # LoKr Kronecker factor, -1 = balanced
    include: list[str] = field(default_factory=list)  # regexes re-admitting excluded modules
    exclude: list[str] = field(default_factory=list)  # regexes, added to the family's default exclusion
    dtype: torch.dtype = torch.float32

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise invalid("network kind", self.kind, f"one of {KINDS}")
        if int(self.rank) < 1:
            raise invalid("network rank", self.rank, "an integer >= 1")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= p < 1.0:
                raise invalid(f"network {name}", p, "a probability in [0, 1)")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if not self.alpha else float(self.alpha)


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n (LyCORIS convention: 512 -> (16, 32); factor N -> (N, dim/N))."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    m = int(math.isqrt(dimension))
    while dimension % m:
        m -= 1
    return m, dimension // m


class _Adapter(nn.Module):
    """Common behaviour: the base Linear (not registered: its weights are not adapter state), multiplier, dropouts."""

    kind = ""
    dropped_in_graph = False   # module dropout as a zero term instead of no term (set for data-parallel training)

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout=None, rank_dropout=None,
                 module_dropout=None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise invalid("adapter target", type(base).__name__, "an nn.Linear module")
        object.__setattr__(self, "_base", base)  # plain attribute: no parameter sharing with the model
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = int(rank)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._alpha = float(alpha)  # python copy: reading the buffer each forward would sync a GPU
        self.multiplier = 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    @property
    def base(self) -> nn.Linear:
        return self._base

    @property
    def scale(self) -> float:
        return self._alpha / self.rank

    def set_alpha(self, alpha: float) -> None:
        self._alpha = float(alpha)
        self.alpha.fill_(self._alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._alpha = float(self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted Linear on its own: base(x) + term (the hook does the same inside the model)."""
        y = self._base(x)
        return y + self.term(x, y.dtype)

    def term(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor | float:
        """multiplier · scale · delta(x), or 0 when disabled / module-dropped."""
        if self.multiplier == 0:
            return 0.0
        dropped = bool(self.training and self.module_dropout and torch.rand(()) < self.module_dropout)
        if dropped and not self.dropped_in_graph:
            return 0.0
        # Under autocast (mixed-precision training) x goes in as it is: autocast runs the adapter in its dtype like
        # the base layer, and autograd saves x itself. Casting it to float32 first would make autograd keep a
        # full-size copy per adapted layer (1.8 GB for a 14B video DiT's FFN input at 832x480x81); the result is the same.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.param_dtype)
        out = self._delta(x)
        if dropped:   # data-parallel training: a zero term keeps every adapter weight in every backward (DDP)
            out = out * 0.0
        elif self.multiplier != 1.0:   # (out * 1.0 is out: skip the full-size copy)
            out = out * self.multiplier
        return out.to(out_dtype)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _rank_mask(self, like: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        if not (self.training and self.rank_dropout):
            return None, 1.0
        mask = (torch.rand(self.rank, device=like.device) > self.rank_dropout).to(like.dtype)
        return mask, 1.0 / (1.0 - self.rank_dropout)

    def delta_weight(self) -> torch.Tensor:  # [out, in] float32, scale included, multiplier not
        raise NotImplementedError

    def _delta(self, x: torch.Tensor) -> torch.Tensor:  # default: through the materialized ΔW (LoHa, LoKr)
        if self.training and self.dropout:
            x = F.dropout(x, p=self.dropout)
        return F.linear(x, self._delta_matrix())

    def _delta_matrix(self) -> torch.Tensor:
        raise NotImplementedError


class LoRAModule(_Adapter):
    """ΔW = scale · up @ down; down [rank, in] Kaiming-uniform(a=√5), up [out, rank] zero (Musubi init)."""

    kind = "lora"

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 1.0, dtype=torch.float32, **dropouts):
        super().__init__(base, rank, alpha, **dropouts)
        dev = base.weight.device if base.weight.device.type != "meta" else "cpu"
        self.lora_down = nn.Linear(self.in_features, self.rank, bias=False, device=dev, dtype=dtype)
        self.lora_up = nn.Linear(self.rank, self.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_down(x)                      # [..., rank]
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        mask, rescale = self._rank_mask(h)
        if mask is not None:
            h = h * mask
        return self.lora_up(h).mul_(self.scale * rescale)   # in place: the Linear's fresh output (not saved)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale

    def load_factors(self, down: torch.Tensor, up: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_down.weight.copy_(down)
            self.lora_up.weight.copy_(up)


class LoHaModule(_Adapter):
    """ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b); init as Musubi/LyCORIS: w1b, w2b ~ N(0,1), w2a ~ N(0,0.1), w1a = 0."""

    kind = "loha"

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 1.0, dtype=torch.float32, **dropouts):
        super().__init__(base, rank, alpha, **dropouts)
        dev = base.weight.device if base.weight.device.type != "meta" else "cpu"
        o, i, r = self.out_features, self.in_features, self.rank
        self.hada_w1_a = nn.Parameter(torch.zeros(o, r, device=dev, dtype=dtype))
        self.hada_w1_b = nn.Parameter(torch.randn(r, i, device=dev, dtype=dtype))
        self.hada_w2_a = nn.Parameter(torch.randn(o, r, device=dev, dtype=dtype) * 0.1)
        self.hada_w2_b = nn.Parameter(torch.randn(r, i, device=dev, dtype=dtype))

    def _delta_matrix(self) -> torch.Tensor:
        w1a, w2a = self.hada_w1_a, self.hada_w2_a
        mask, rescale = self._rank_mask(w1a)
        if mask is not None:  # the same rank components dropped in both products
            w1a, w2a = w1a * mask, w2a * mask
        return (w1a @ self.hada_w1_b) * (w2a @ self.hada_w2_b) * (self.scale * rescale)

    def delta_weight(self) -> torch.Tensor:
        return ((self.hada_w1_a.float() @ self.hada_w1_b.float())
                * (self.hada_w2_a.float() @ self.hada_w2_b.float())) * self.scale


class LoKrModule(_Adapter):
    """ΔW = scale · kron(w1, w2) with w1 [out_m, in_m] full and w2 [out_n, in_n] = w2_a @ w2_b (rank r) or full.

    Factors follow LyCORIS (m <= n). Init: w1 Kaiming-uniform, w2_a Kaiming-uniform, w2_b zero (full w2: zero), so
    ΔW = 0 at start. Scale = alpha / rank; when w2 is full (rank >= max(w2 shape)) the scale is 1, as LyCORIS and
    ComfyUI read such files (the stored alpha is then max(w2 shape), so Musubi's alpha/max(w2 shape) is 1 too)."""

    kind = "lokr"

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 1.0, dtype=torch.float32, factor: int = -1,
                 **dropouts):
        super().__init__(base, rank, alpha, **dropouts)
        dev = base.weight.device if base.weight.device.type != "meta" else "cpu"
        in_m, in_n = lokr_factorization(self.in_features, factor)
        out_m, out_n = lokr_factorization(self.out_features, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(out_m, in_m, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.full_w2 = self.rank >= max(out_n, in_n)
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_n, in_n, device=dev, dtype=dtype))
            self.rank = max(out_n, in_n)
            self.set_alpha(self.rank)
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_n, self.rank, device=dev, dtype=dtype))
            self.lokr_w2_b = nn.Parameter(torch.zeros(self.rank, in_n, device=dev, dtype=dtype))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return 1.0 if self.full_w2 else self._alpha / self.rank

    def _w2(self, mask=None) -> torch.Tensor:
        if self.full_w2:
            return self.lokr_w2
        a = self.lokr_w2_a if mask is None else self.lokr_w2_a * mask
        return a @ self.lokr_w2_b

    def _delta_matrix(self) -> torch.Tensor:
        mask, rescale = (None, 1.0) if self.full_w2 else self._rank_mask(self.lokr_w1)
        return torch.kron(self.lokr_w1, self._w2(mask)) * (self.scale * rescale)

    def delta_weight(self) -> torch.Tensor:
        w2 = self._w2().float()
        return torch.kron(self.lokr_w1.float(), w2) * self.scale


def make_adapter(base: nn.Linear, config: AdapterConfig) -> _Adapter:
    common = dict(rank=config.rank, alpha=config.effective_alpha, dtype=config.dtype, dropout=config.dropout,
                  rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
    if config.kind == "lora":
        return LoRAModule(base, **common)
    if config.kind == "loha":
        return LoHaModule(base, **common)
    return LoKrModule(base, factor=config.lokr_factor, **common)


class AdapterNetwork(nn.Module):
    """A named set of adapters on one model. Submodule names are Musubi stems, so `state_dict()` is a Musubi file:
    `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha` (LoHa/LoKr: LyCORIS names)."""

    def __init__(self, name: str = "default", multiplier: float = 1.0):
        super().__init__()
        self.name = name
        self.module_names: dict[str, str] = {}   # stem -> dotted module name
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        object.__setattr__(self, "_model", None)
        self._multiplier = float(multiplier)

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def create(cls, model: nn.Module, config: AdapterConfig, name: str = "default",
               multiplier: float = 1.0) -> "AdapterNetwork":
        """Fresh adapters (Musubi init) on the family's default targets filtered by `config`, attached to `model`."""
        config.validate()
        targets = select_targets(model, config.include, config.exclude)
        if not targets:
            raise invalid("network targets", {"include": config.include, "exclude": config.exclude},
                          "patterns that leave at least one Linear layer inside the DiT blocks")
        net = cls(name, multiplier)
        modules = dict(model.named_modules())
        for target in targets:
            net.add(target, make_adapter(modules[target], config))
        return net.attach(model)

    def add(self, module_name: str, adapter: _Adapter) -> None:
        stem = musubi_stem(module_name)
        adapter.multiplier = self._multiplier
        self.add_module(stem, adapter)
        self.module_names[stem] = module_name

    def adapters(self) -> dict[str, _Adapter]:
        """dotted module name -> adapter."""
        return {self.module_names[stem]: mod for stem, mod in self.named_children()}

    # --- attach / detach ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "AdapterNetwork":
        """Hook every adapter onto its Linear in `model`; a network already attached under this name is detached."""
        registry = attached_networks(model)
        previous = registry.get(self.name)
        if previous is not None and previous is not self:
            previous.detach()
        if self._model is not None:
            self.detach()
        modules = dict(model.named_modules())
        for stem, adapter in self.named_children():
            target = modules.get(self.module_names[stem])
            if target is not adapter.base:
                self._remove_hooks()
                raise invalid(f"adapter {self.module_names[stem]!r}", "not a module of this model",
                              "a network built for this model instance")
            self._hooks[stem] = target.register_forward_hook(_make_hook(adapter))
        object.__setattr__(self, "_model", model)
        registry[self.name] = self
        return self

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what it computed before `attach`."""
        self._remove_hooks()
        model = self._model
        if model is not None:
            registry = attached_networks(model)
            if registry.get(self.name) is self:
                del registry[self.name]
        object.__setattr__(self, "_model", None)

    def _remove_hooks(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    @property
    def is_attached(self) -> bool:
        return self._model is not None

    # --- strength / weights ------------------------------------------------------------------------------------
    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        for adapter in self.children():
            adapter.multiplier = self._multiplier

    def delta_weight(self, module_name: str) -> torch.Tensor:
        """ΔW [out, in] float32 of one target (scale included, multiplier not)."""
        adapters = self.adapters()
        if module_name not in adapters:
            raise invalid("module name", module_name, f"one of the {len(adapters)} adapted modules")
        with torch.no_grad():
            return adapters[module_name].delta_weight()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a Musubi-named state dict (what `state_dict()` returns); tensors are cast to the adapter dtype."""
        own = self.state_dict()
        for key, value in state_dict.items():
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise invalid(f"adapter weights {key!r}", tuple(value.shape), f"shape {tuple(own[key].shape)}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _make_hook(adapter: _Adapter):
    def hook(module, args, output):
        term = adapter.term(args[0], output.dtype)
        if (isinstance(term, torch.Tensor) and term.shape == output.shape and term.dtype == output.dtype
                and output._base is None):
            # in place: the base Linear's output is a fresh tensor nothing saves, so this is output + term without
            # a third [tokens, out] buffer (the same values); a view (e.g. made inside a custom Function) is not
            # written to
            return output.add_(term)
        return output + term
    return hook


def attached_networks(model: nn.Module) -> dict[str, AdapterNetwork]:
    """The live {name: network} registry of a model (created on first use)."""
    registry = model.__dict__.get(_REGISTRY_ATTR)
    if registry is None:
        registry = {}
        model.__dict__[_REGISTRY_ATTR] = registry
    return registry


def detach_all(model: nn.Module) -> None:
    for net in list(attached_networks(model).values()):
        net.detach()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """`model` and every network attached to it in eval mode (no LoRA/rank/module dropout) for the duration; each
    one's train/eval flag is restored after. Generation runs inside it: a network left in train mode (a training
    session, a user's script) would otherwise make same-seed samples differ."""
    modules = [model, *attached_networks(model).values()]
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)
