"""Apply several LoRA files with strengths to a live model, as adapters (hooks) or merged into the weights.

Re-applying is idempotent: the LoRAs a previous `apply_loras` call put on the model are removed first (adapters
detached, merged weights restored), so re-queueing a ComfyUI graph never stacks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..errors import invalid
from .adapters import AdapterNetwork, LoRAModule, _Adapter
from .dialects import LoRAFile, MatchReport, match_lora, read_lora, require_complete, resolved_modules
from .merge import MergeHandle, merge_into_model
from .targets import block_index
from .weights import ModuleWeights

_APPLIED_ATTR = "_musubi_applied_loras"
NAME_PREFIX = "lora-file:"


class FileAdapter(_Adapter):
    """A LoHa/LoKr read from a file, computing ΔW from its stored factors (tensors kept as float32 buffers)."""

    def __init__(self, base: nn.Linear, weights: ModuleWeights):
        super().__init__(base, weights.rank or 1, weights.scale * (weights.rank or 1))
        self.kind = weights.kind
        self._weights = weights
        for k, v in weights.tensors.items():
            self.register_buffer(k, v.detach().to(base.weight.device, torch.float32))
        self._probe = nn.Parameter(torch.zeros((), device=base.weight.device), requires_grad=False)

    def _current(self) -> ModuleWeights:
        tensors = {k: getattr(self, k) for k in self._weights.tensors}
        return ModuleWeights(self.kind, tensors, self._weights.alpha)

    def _delta_matrix(self) -> torch.Tensor:
        return self._current().delta(self._probe.device)

    def delta_weight(self) -> torch.Tensor:
        return self._current().delta(self._probe.device)


def network_from_lora(model: nn.Module, lora: LoRAFile, name: str, multiplier: float = 1.0,
                      module_filter=None) -> AdapterNetwork:
    """An AdapterNetwork carrying the file's plain low-rank weights (LoRA: trainable-form LoRAModule; LoHa/LoKr:
    FileAdapter). Patches a hook cannot compute from the input alone (DoRA, `.diff`, `.set_weight`, biases) are
    not in it: merge them with `merge_into_model(..., hooked=True)`."""
    modules = dict(model.named_modules())
    net = AdapterNetwork(name, multiplier)
    for mod_name, mw in resolved_modules(lora, model).items():
        if not mw.hookable or (module_filter is not None and not module_filter(mod_name)):
            continue
        base = modules[mod_name]
        if mw.kind == "lora":
            down = mw.tensors["down"].float()
            if "mid" in mw.tensors:   # up @ (mid @ down): the LoCon/Tucker middle factor folded into down
                down = mw.tensors["mid"].float() @ down
            # the scale stays alpha / rank of the file's down (ComfyUI's rule), whatever the folded rank
            adapter = LoRAModule(base, rank=down.shape[0], alpha=mw.scale * down.shape[0])
            adapter.load_factors(down, mw.tensors["up"].float())
        else:
            adapter = FileAdapter(base, mw)
        adapter.to(base.weight.device if base.weight.device.type != "meta" else "cpu")
        net.add(mod_name, adapter)
    return net


def block_filter_fn(block_filter):
    """None | list of block indices | regex (searched in the module name) -> predicate or None."""
    if block_filter is None:
        return None
    if isinstance(block_filter, str):
        try:
            pattern = re.compile(block_filter)
        except re.error as e:
            raise invalid("block_filter", block_filter, f"a valid regular expression ({e})") from e
        return lambda name: bool(pattern.search(name))
    try:
        chosen = {int(i) for i in block_filter}
    except (TypeError, ValueError):
        raise invalid("block_filter", block_filter, "a list of block indices or a regex string") from None
    return lambda name: block_index(name) in chosen


@dataclass
class AppliedLoRAs:
    mode: str
    reports: list[MatchReport] = field(default_factory=list)
    networks: list[AdapterNetwork] = field(default_factory=list)
    merge: MergeHandle | None = None

    def remove(self) -> None:
        for net in self.networks:
            net.detach()
        if self.merge is not None:
            self.merge.restore()


def apply_loras(model: nn.Module, loras, mode: str = "adapter", block_filter=None,
                strict: bool = True) -> AppliedLoRAs:
    """Apply [(LoRA path or LoRAFile, strength), ...] to `model`.

    mode "adapter": one named AdapterNetwork per LoRA for the plain low-rank weights (strength = multiplier);
    what a hook cannot compute (DoRA, `.diff`, `.set_weight`, biases) is merged in place as in mode "merge";
    mode "merge": parameters changed in place (fp32 math), the originals kept on CPU for `remove()`.
    `block_filter`: block indices or a regex; only matching modules get the LoRA.
    Every file is checked with `match_lora` first (wrong family/variant/size is refused; keys that match nothing
    are refused when `strict`, else skipped and listed in the reports)."""
    if mode not in ("adapter", "merge"):
        raise invalid("LoRA apply mode", mode, "'adapter' or 'merge'")
    keep = block_filter_fn(block_filter)
    files = []
    for i, (item, strength) in enumerate(loras):
        lora = item if isinstance(item, LoRAFile) else read_lora(item, model=model)
        label = str(lora.source or f"LoRA #{i + 1}")
        report = match_lora(lora, model, label)
        if strict:
            require_complete(report, label)
        files.append((lora, float(strength), report))

    previous = model.__dict__.get(_APPLIED_ATTR)
    if previous is not None:
        previous.remove()
    result = AppliedLoRAs(mode, [r for _, _, r in files])
    handle = MergeHandle(model)
    for i, (lora, strength, _) in enumerate(files):
        if mode == "adapter":
            net = network_from_lora(model, lora, f"{NAME_PREFIX}{i}:{lora.name}", strength, keep)
            result.networks.append(net.attach(model))
        merge_into_model(model, lora, strength, keep, handle, strict=False, hooked=mode == "adapter")
    result.merge = handle
    model.__dict__[_APPLIED_ATTR] = result
    return result
