"""A training session as an application hosts it between other work (the ComfyUI nodes, a notebook).

Three names, three things:

* `TrainingSession` (trainer.py): the trainer itself: adapter, optimizer, data position, steps, states.
* `HostedSession` (here): a `TrainingSession` on a *LoRA view* of a loaded model that the host shares with other
  users of its weights (samplers, other views): placed on the device by the host's `Residency` before it trains or
  samples, offloadable in between, closed with its unsaved steps saved.
* the host's own reference to it (the nodes' `SessionOutput`: a hosted session + the graph point it comes from).

The view shares every weight with the loaded model, so the model itself never carries an adapter and replacing a
session drops its view: adapters never stack.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..errors import MusubiInputError
from ..handle import ModelHandle, RunOptions, apply_run_options
from ..lora.views import add_network, make_lora_view
from ..memory.residency import Residency
from .state import state_dir, state_run
from .trainer import TrainingSession, check_attention

log = logging.getLogger("ComfyUI-Musubi")


def move_optimizer_state(optimizer, device: torch.device) -> None:
    for state in optimizer.state.values():
        for k, v in list(state.items()):
            if isinstance(v, torch.Tensor) and v.device != device and v.dim() > 0:
                state[k] = v.to(device)


def make_trainable(model: torch.nn.Module) -> None:
    """Weights loaded under `torch.inference_mode` (ComfyUI runs prompts in it) are inference tensors, which autograd
    refuses to save for backward: replace each by a normal copy, one tensor at a time (peak memory: one tensor), in
    the module's own parameter and buffer dicts (shared with every LoRA view). Values are unchanged; later calls
    find nothing to do."""
    with torch.inference_mode(False):
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if isinstance(t, torch.Tensor) and t.is_inference():
                        plain = t.detach().clone()
                        store[name] = (torch.nn.Parameter(plain, requires_grad=False)
                                       if isinstance(t, torch.nn.Parameter) else plain)


def saved_state(config) -> Path | None:
    """The state folder saved under the config's output name, if one exists."""
    folder = state_dir(Path(config.output_dir), config.output_name)
    return folder if state_run(folder) is not None else None


class HostedSession:
    def __init__(self, session: TrainingSession, residency: Residency, options: RunOptions, key=None, base=None):
        self.session = session
        # the loaded model the view shares its weights with: kept alive, so a host registry that released it (weakly
        # held) hands this same module back to a loader that runs again, and the session's key stays valid
        self.base = base
        self.residency = residency
        self.options = options                # the loader's current run options (block swap, offload, attention)
        self.key = key                        # the host's registry key
        self.targets: dict[tuple, int] = {}   # host bookkeeping: a caller's token -> the step it must reach
        self.listener = None                  # whoever shows validation progress while training (host's choice)

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    @property
    def network(self):
        return self.session.network

    def handle(self) -> ModelHandle:
        """The trained view with the loader's run options (to sample with)."""
        return ModelHandle(self.model, getattr(type(self.model), "family", None), self.options)

    def activate(self, device: torch.device) -> torch.device:
        """Before training or sampling: the adapter attached, the view placed (with block swap: the weight set's
        swapper on the view), adapter and optimizer state on the device; activation offload as the loader says."""
        s, opts = self.session, self.options
        apply_run_options(self.handle())
        if s.config.attention_backend:   # the training config's kernel wins over the loader's
            s.model.attention_backend = s.config.attention_backend
        check_attention(s.model, s.config)
        if not s.network.is_attached:
            s.network.attach(s.model)
        s.activation_offload = opts.activation_offload
        device = self.residency.place(s.model, device, opts.blocks_to_swap, opts.offload_non_blocks, training=True)
        with torch.inference_mode(False):   # adapters of swapped blocks were created in host memory: move them
            s.network.to(device)
            move_optimizer_state(s.optimizer, device)
        return device

    def offload(self, device="cpu") -> "HostedSession":
        """The view's block swapper detached (to CPU), adapter and optimizer state to `device`; `activate` brings
        them back."""
        self.residency.release(self.session.model, only_if_attached_to_it=True)
        with torch.inference_mode(False):
            self.session.network.to(device)
            move_optimizer_state(self.session.optimizer, torch.device(device))
        return self

    def to(self, device) -> "HostedSession":   # the host registry's offload protocol
        return self.offload(device)

    def close(self) -> None:
        """Replaced or released: unsaved steps go to the state folder first, then the adapter comes off."""
        self.session.close(save=True)
        self.residency.release(self.session.model, only_if_attached_to_it=True)
        self.session.network.detach()

    def train_to(self, target: int, device: torch.device, progress: Callable | None = None,
                 interrupt: Callable[[], None] | None = None) -> list[float]:
        """Train until step `target` (capped at the session's total); `progress(step, total, info)` after each
        optimizer step and `interrupt()` between micro-batches may raise to cancel (the session then saves a
        resumable state, goes back to its last completed step and re-raises)."""
        s = self.session
        todo = min(target, s.total_steps) - s.step
        if todo <= 0:
            return []
        self.activate(device)
        return s.train_steps(todo, progress, interrupt)


def host_session(handle: ModelHandle, loader, network, optimizer, config, *, residency: Residency,
                 device: torch.device, resume_from=None, continue_saved: bool = False, key=None,
                 node: str = "?") -> HostedSession:
    """A new hosted session on a fresh LoRA view of `handle.module`. `continue_saved`: continue from the state saved
    under the output name when there is one the network fits (else start fresh; that state is kept). The caller
    has validated the configs."""
    model = handle.module
    make_trainable(model)
    # no swapper on the weight set while the view and its adapters are made; with block swap the swapped blocks
    # stay in host memory (their adapters are created there and moved by activate, which attaches the swapper)
    residency.prepare_for_view(model, handle.options.blocks_to_swap, device)
    view = make_lora_view(model)
    saved = saved_state(config) if continue_saved and not resume_from else None
    session = None
    if saved is not None:
        try:
            session = TrainingSession(view, network, optimizer, loader, config, resume_from=saved)
        except MusubiInputError as e:   # saved for another network (kind/rank): a fresh run beside it
            log.warning("ComfyUI-Musubi: not continuing from %s (%s); starting from step 0", saved, e)
            view = make_lora_view(model)
    if session is None:
        session = TrainingSession(view, network, optimizer, loader, config, resume_from=resume_from)
    add_network(view, session.network, {"name": config.output_name, "strength": 1.0, "mode": "training",
                                        "node": node})
    return HostedSession(session, residency, handle.options, key, base=model)
