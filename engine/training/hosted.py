"""A training session as an application hosts it between other work (the ComfyUI nodes, a notebook).

Three names, three things:

* `TrainingSession` (trainer.py): the trainer itself: adapter, optimizer, data position, steps, states.
* `HostedSession` (here): a `TrainingSession` on a *LoRA view* of a loaded model that the host shares with other
  users of its weights (samplers, other views): placed on the device by the host's `Residency` before it trains or
  samples, offloadable in between, closed with its unsaved steps saved.
* the host's own reference to it (the nodes' `SessionOutput`: a hosted session + the graph point it comes from).

The view shares every weight with the loaded model, so the model itself never carries an adapter and replacing a
session drops its view: adapters never stack.

Two timestep experts (`HostedExperts`): the session trains a view of each (experts.py); `handle` is the low-noise
expert's view, each expert is placed by the pair with its own loader's options, and `trained_model` is the family's
expert pair of both trained views (what its sampler takes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import MusubiInputError
from ..families import family_of
from ..handle import ModelHandle, RunOptions, apply_run_options
from ..lora.views import add_network, make_lora_view
from ..memory.residency import Residency
from .distributed import PeerLost
from .experts import HIGH, LOW, TimestepExperts
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


@dataclass(frozen=True)
class HostedExperts:
    """The second expert of a hosted session (`host_session`'s handle is the low-noise one) and the pair's
    settings (experts.py `TimestepExperts`)."""
    high: ModelHandle
    boundary: float
    layout: str = "separate"
    mode: str = "both"


def saved_state(config) -> Path | None:
    """The state folder saved under the config's output name, if one exists."""
    folder = state_dir(Path(config.output_dir), config.output_name)
    return folder if state_run(folder) is not None else None


class HostedSession:
    def __init__(self, session: TrainingSession, residency: Residency, options: RunOptions, key=None, base=None,
                 high_base=None):
        self.session = session
        # the loaded model the view shares its weights with: kept alive, so a host registry that released it (weakly
        # held) hands this same module back to a loader that runs again, and the session's key stays valid
        self.base = base
        self.residency = residency
        self.options = options                # the loader's current run options (block swap, offload, attention)
        self.high_base = high_base            # two experts: the high-noise expert's loaded model (kept alive too)
        self.key = key                        # the host's registry key
        self.targets: dict[tuple, int] = {}   # host bookkeeping: a caller's token -> the step it must reach
        self.listener = None                  # whoever shows validation progress while training (host's choice)
        self.workers = None                   # data-parallel: the other ranks' processes (workers.WorkerGroup)

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    @property
    def network(self):
        return self.session.network

    @property
    def pair(self):
        """The session's `ExpertPair` (two experts), or None."""
        return self.session.pair

    def handle(self) -> ModelHandle:
        """The trained view with the loader's run options (two experts: the low-noise one's)."""
        return ModelHandle(self.model, getattr(type(self.model), "family", None), self.options)

    def handles(self) -> dict[str, ModelHandle]:
        """Each trained view with its loader's run options: {LOW: handle()}, and HIGH for two experts."""
        if self.pair is None:
            return {LOW: self.handle()}
        m = self.pair.models[HIGH]
        return {HIGH: ModelHandle(m, getattr(type(m), "family", None), self.pair.options[HIGH]), LOW: self.handle()}

    def set_options(self, options: RunOptions, high_options: RunOptions | None = None) -> None:
        """The loaders' current run options (a loader node re-ran with other settings)."""
        self.options = options
        if self.pair is not None:
            self.pair.options = {HIGH: high_options or self.pair.options[HIGH], LOW: options}

    def trained_model(self):
        """What the family's sampler takes to generate with the adapter as trained so far: the view's handle, or
        for two experts the family's pair of both views (each with its loader's options)."""
        if self.pair is None:
            return self.handle()
        h = self.handles()
        return family_of(self.model).expert_pair(high=h[HIGH], low=h[LOW], boundary=self.pair.boundary,
                                                 mode=self.pair.mode)

    def activate(self, device: torch.device) -> torch.device:
        """Before training or sampling: the adapter attached, the view placed (with block swap: the weight set's
        swapper on the view), adapter and optimizer state on the device; activation offload as the loader says.
        Two experts: placed by the pair at its next batch (or sample), each with its own loader's options."""
        s = self.session
        for handle in self.handles().values():
            apply_run_options(handle)
            if s.config.attention_backend:   # the training config's kernel wins over the loader's
                handle.module.attention_backend = s.config.attention_backend
            check_attention(handle.module, s.config)
        if not s.network.is_attached:
            s.network.attach(s.model)
        s.activation_offload = any(h.options.activation_offload for h in self.handles().values())
        if self.pair is None:
            opts = self.options
            device = self.residency.place(s.model, device, opts.blocks_to_swap, opts.offload_non_blocks,
                                          training=True)
        else:   # anything may have moved the experts since the last call (a sampler, another session)
            self.pair.placement_unknown()
        with torch.inference_mode(False):   # adapters of swapped blocks were created in host memory: move them
            s.network.to(device)
            move_optimizer_state(s.optimizer, device)
        return device

    def _release(self) -> None:
        for handle in self.handles().values():
            self.residency.release(handle.module, only_if_attached_to_it=True)

    def offload(self, device="cpu") -> "HostedSession":
        """The views' block swappers detached (to CPU), adapter and optimizer state to `device`; `activate` brings
        them back."""
        self._release()
        with torch.inference_mode(False):
            self.session.network.to(device)
            move_optimizer_state(self.session.optimizer, torch.device(device))
        return self

    def to(self, device) -> "HostedSession":   # the host registry's offload protocol
        return self.offload(device)

    def close(self) -> None:
        """Replaced or released: unsaved steps go to the state folder first, then the adapter comes off."""
        try:
            self.session.close(save=True)
        finally:
            if self.workers is not None:
                self.workers.close()
        self._release()
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
        if self.workers is None:
            self.activate(device)
            return s.train_steps(todo, progress, interrupt)
        if self.workers.closed:
            raise PeerLost("distributed training: this session's worker processes were stopped after an error; "
                           "queue Init Training again to start new ones (it continues from the saved state)")
        self.workers.parallel.agreed_stop = False
        try:
            self.workers.train(s.step + todo)   # the other ranks train the same steps (every collective pairs up)
            self.activate(device)
            return s.train_steps(todo, progress, interrupt)
        except BaseException:
            if not self.workers.parallel.agreed_stop:   # they may wait inside a step: never pair it with another
                self.workers.close(wait_s=0)            # (nothing of theirs to save: rank 0 saved the state)
            raise


def host_session(handle: ModelHandle, loader, network, optimizer, config, *, residency: Residency,
                 device: torch.device, resume_from=None, continue_saved: bool = False, key=None,
                 node: str = "?", experts: HostedExperts | None = None, parallel=None) -> HostedSession:
    """A new hosted session on a fresh LoRA view of `handle.module` (and of `experts.high.module`: two experts).
    `continue_saved`: continue from the state saved under the output name when there is one the network fits
    (else start fresh; that state is kept). `parallel`: this rank of a data-parallel run (distributed.py).
    The caller has validated the configs."""
    handles = [handle] + ([experts.high] if experts is not None else [])
    for h in handles:
        make_trainable(h.module)
        # no swapper on the weight set while the view and its adapters are made; with block swap the swapped blocks
        # stay in host memory (their adapters are created there and moved by activate, which attaches the swapper)
        residency.prepare_for_view(h.module, h.options.blocks_to_swap, device)

    def start(resume):
        views = [make_lora_view(h.module) for h in handles]
        pair = None if experts is None else TimestepExperts(
            views[1], experts.boundary, layout=experts.layout, mode=experts.mode, device=device,
            residency=residency, options={LOW: handle.options, HIGH: experts.high.options})
        return TrainingSession(views[0], network, optimizer, loader, config, resume_from=resume, experts=pair,
                               parallel=parallel)

    saved = saved_state(config) if continue_saved and not resume_from else None
    session = None
    if saved is not None:
        try:
            session = start(saved)
        except MusubiInputError as e:   # saved for another network (kind/rank) or pair: a fresh run beside it
            log.warning("ComfyUI-Musubi: not continuing from %s (%s); starting from step 0", saved, e)
    if session is None:
        session = start(resume_from)
    entry = {"name": config.output_name, "strength": 1.0, "mode": "training", "node": node}
    if session.pair is None:
        add_network(session.model, session.network, entry)
    else:
        for expert, net in session.network.networks().items():
            add_network(session.pair.models[expert], net, entry)
    return HostedSession(session, residency, handle.options, key, base=handle.module,
                         high_base=experts.high.module if experts is not None else None)
