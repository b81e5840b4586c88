"""The LoRA training session: one object that owns the adapter, optimizer, scheduler, RNG and data position, and
runs optimizer steps on demand (`train_steps(n)` may be called many times, e.g. by several "Train Steps" nodes).

One optimizer step = `gradient_accumulation_steps` micro-batches:
    x0 = cached latents [B, C, F, H, W]; per sample (in order): t ~ timestep sampler, ε ~ N(0, I) from the
    session's CPU generator; x_t = (1 − t)·x0 + t·ε; (v̂, target) = family.training_forward(model, batch, x_t,
    1000·t, ε − x0) (the model's family runs its DiT on the batch's conditioning and may narrow the target);
    loss = mean((v̂ − target)²·w) / accum, backward; then clip, optimizer/scheduler step.
Drawing t and ε per sample makes "accumulate 2 × batch 1" see the same noise as "batch 2".
With two timestep experts (`experts=TimestepExperts(...)`, experts.py) each micro-batch's timesteps are drawn first
and pick the expert that runs it (Musubi Tuner's per-batch choice), then its noise; the pair owns that logic, the
networks (one per expert, or one shared) and the placement of the experts.

Crash/cancel safety: at every step boundary the session snapshots the cheap, fast-moving parts of its state (RNGs,
data position, timestep pool, step). Weights and optimizer only change inside the optimizer step, so on any
exception (including BaseException: ComfyUI's interrupt) the `finally` of `train_steps` writes a state that is
exactly the last completed step, and re-raises. Resuming from it reproduces the uninterrupted run bit for bit (CPU).

Data source protocol (engine.data.loader.CachedBatchLoader satisfies it): iterating yields the rest of the current
epoch's batches (dicts with `latents` and the family's conditioning keys, see `Family.collate`), `len()` = batches
per epoch, attributes `epoch` / `index` (position), `state_dict()` / `load_state_dict()`; for data-parallel
training also `batch_at(epoch, index)` (distributed.py: each rank reads only its share of the global sequence).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import secrets
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import MusubiInputError, invalid
from ..families import family_of
from ..memory.checkpointing import set_block_checkpointing
from ..memory.placement import execution_device
from .config import SAVE_DTYPES, TRAINING_BACKENDS_REFUSED, NetworkConfig, TrainingConfig, to_plain
from .distributed import SingleProcess
from .evaluation import EvalConfig, held_out_loss
from .experts import HIGH, ExpertPair, TimestepExperts
from .logging import LossHistory, StepTimer, TensorBoardLogger, current_lrs, status_text
from .loss import flow_matching_loss, noisy_latents, velocity_target
from .optimizers import OptimizerConfig, build_optimizer, move_optimizer_state, optimizer_train_mode
from .schedulers import build_scheduler
from .state import capture_rng, lora_path, prune, read_state, restore_rng, state_dir, state_run, write_state
from .timesteps import TimestepSampler
from .validation import ValidationConfig, run_validation

Progress = Callable[[int, int, dict], None]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    avg_loss: float | None
    lr: float | None
    it_per_s: float
    epoch: int
    status: str
    timesteps: list[float] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)   # the expert of each micro-batch (two experts; all ranks',
                                                        # in the order one process accumulating A·W reads them)


# --- checks that run before any heavy work -------------------------------------------------------------------

def check_attention(model, config: TrainingConfig, host_backend: str | None = None) -> None:
    """Refuse a kernel without a backward pass: the config's, else the host's choice (loader), else the model's."""
    backend = config.attention_backend or host_backend or getattr(model, "attention_backend", "sdpa")
    if backend in TRAINING_BACKENDS_REFUSED:
        raise invalid("attention_backend", backend, TRAINING_BACKENDS_REFUSED[backend])


def check_loader(loader) -> None:
    missing = [m for m in ("__iter__", "__len__", "state_dict", "load_state_dict") if not hasattr(loader, m)]
    if missing:
        raise invalid("dataset loader", type(loader).__name__, f"a batch loader with {missing}")
    if len(loader) < 1:
        raise invalid("dataset", "0 batches per epoch", "at least one cached batch")


def peek_batch(loader) -> dict:
    """The next batch without moving the loader (position saved and restored)."""
    saved = copy.deepcopy(loader.state_dict())
    try:
        it = iter(loader)
        batch = next(it, None)
        if batch is None:  # at the very end of an epoch: the next epoch starts
            batch = next(iter(loader), None)
    finally:
        loader.load_state_dict(saved)
    if batch is None:
        raise invalid("dataset", "no batches", "at least one cached batch")
    return batch


def check_batch_for_model(model, batch: dict) -> None:
    """Is the cache made for this DiT? The model's family decides (latent channels, text width, conditioning)."""
    family_of(model).check_batch(model, batch)


def resolve_total_steps(config: TrainingConfig, loader) -> int:
    if config.max_train_epochs:
        return config.max_train_epochs * math.ceil(len(loader) / config.gradient_accumulation_steps)
    return config.max_train_steps


# --- the session ---------------------------------------------------------------------------------------------

# adapter parameter -> its tensor name in a read LoRA file (LoHa/LoKr use their parameter names)
_FILE_PART = {"lora_down.weight": "down", "lora_up.weight": "up"}

class TrainingSession:
    def __init__(self, model: torch.nn.Module, network: NetworkConfig, optimizer: OptimizerConfig, loader,
                 config: TrainingConfig, validation: ValidationConfig | None = None,
                 evaluation: EvalConfig | None = None,
                 resume_from: str | Path | None = None, experts: TimestepExperts | None = None,
                 parallel=None):
        """`experts`: train `model` (the low-noise expert) and a high-noise expert in one run (experts.py).
        `parallel`: this rank of a data-parallel run (distributed.py `DataParallel`; None: one process)."""
        # 1. everything a user can get wrong, before touching the model
        config.validate()
        network.validate()
        optimizer.validate()
        if validation is not None:
            validation.validate()
        self.parallel = parallel if parallel is not None else SingleProcess()
        self.parallel.check(network, experts)
        loader = self.parallel.shard(loader)   # this rank's share of the global batch sequence
        self.pair = ExpertPair(model, experts) if experts is not None else None
        if self.pair is not None and evaluation is not None:
            raise invalid("eval dataset", "given", "no held-out evaluation while training two experts (not supported)")
        check_loader(loader)
        batch = peek_batch(loader)
        for m in self._models(model):
            check_attention(m, config)
            check_batch_for_model(m, batch)
        if resume_from is not None:
            resume_state = read_state(resume_from)
            _check_resume_compatible(resume_state, network, experts)
        else:
            resume_state = None
        if self.parallel.shards_base:
            if validation is not None and validation.prompts or evaluation is not None:
                raise invalid("validation / eval dataset", "given with a sharded base (fsdp2)",
                              "none: one rank cannot run a model whose weights are split across all ranks")
            model.requires_grad_(False)
            self.parallel.shard_model(model)   # before the adapters: they are made on the shards' device

        self.model, self.loader, self.config = model, loader, config
        self.family = family_of(model)
        self.network_config, self.optimizer_config, self.validation = network, optimizer, validation
        self.evaluation = evaluation
        # the swapper's device when layers sit on the host; a pair's own device when it places its experts
        self.device = self.pair.device if self.pair is not None and self.pair.device is not None \
            else execution_device(model)
        self.activation_offload = False         # checkpointed block inputs in host memory (set by the host)
        self._interrupt: Callable[[], None] | None = None   # cancel check between micro-batches (train_steps)
        self.output_dir = Path(config.output_dir)
        self.lora_dir = Path(config.lora_dir) if config.lora_dir else self.output_dir
        self.total_steps = resolve_total_steps(config, loader)

        # 2. model: frozen base, chosen attention (checkpointing is set per train_steps call)
        for m in self._models():
            m.requires_grad_(False)
            if config.attention_backend:
                m.attention_backend = config.attention_backend

        # 3. adapter (fp32, seeded init), optimizer, scheduler, scaler, RNG
        _seed_everything(config.seed)
        from ..lora.adapters import AdapterNetwork

        if self.pair is not None:
            self.network = self.pair.create_networks(network.adapter_config(), network.name)
        else:
            self.network = AdapterNetwork.create(model, network.adapter_config(), name=network.name)
        if network.network_weights:
            self._load_network_weights(network.network_weights)
        built = build_optimizer(list(self.network.named_parameters()), optimizer)
        self.optimizer, self.optimizer_name = built.optimizer, built.name
        self.scheduler = build_scheduler(self.optimizer, optimizer, self.total_steps, built.forced_scheduler)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.mixed_precision == "fp16" else None
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.timesteps = TimestepSampler(config.timesteps)

        self.step = 0
        # Musubi's ss_session_id / ss_training_started_at; secrets leaves the seeded RNGs untouched
        self.session_id = secrets.randbelow(2**32)
        self.started_at = time.time()
        self.history = LossHistory()
        self.timer = StepTimer()
        self.last_samples: list[torch.Tensor] | None = None
        self.last_info: StepInfo | None = None
        self.saved_loras: list[Path] = []                 # the files of the last save_lora (two for a pair)
        self._step_experts: list[str] = []                # the expert of each micro-batch of the current step
        self._iter = None
        self._epochs_done = self._completed_epochs()
        self._tb: TensorBoardLogger | None = None
        self._clock = time.monotonic                      # training time for time-based state saves (tests swap it)
        self._last_state_save = self._clock()
        self.saved_step: int | None = None                # the step of the last state written by this session
        if resume_state is not None:
            self._apply_state(resume_state)
            self.saved_step = self.step
        self._boundary = self._snapshot()

    # --- public API -----------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    @property
    def epoch(self) -> int:
        return self._completed_epochs()

    def train_steps(self, n: int, progress: Progress | None = None,
                    interrupt: Callable[[], None] | None = None) -> list[float]:
        """Run up to `n` optimizer steps (fewer at the end of training); returns their losses.

        `progress(step, total, info: dict)` runs after every optimizer step and may raise to cancel; `interrupt()`
        runs before every further micro-batch of a gradient-accumulation step and may raise too (cancel within a
        long step). On any exception the full state of the last completed step is written to
        `<output>/<name>-state`, the session itself goes back to that step (a later call continues exactly as a
        resume from the state would), and the exception is re-raised."""
        if not isinstance(n, int) or n < 1:
            raise invalid("steps", n, "an integer ≥ 1")
        end = min(self.total_steps, self.step + n)
        losses: list[float] = []
        completed = False
        self.network.train()
        for m in self._models():
            m.train()
            # activation offload is a memory option of the host's (the DiT loader's), read at each call
            set_block_checkpointing(m, bool(self.config.gradient_checkpointing),
                                    offload=bool(self.activation_offload),
                                    saved_dtype=(AMP_DTYPES.get(self.config.mixed_precision)
                                                 if self.config.checkpoint_dtype == "compute" else None))
        optimizer_train_mode(self.optimizer, True)
        self.timer.reset()
        self._interrupt = interrupt
        self.parallel.start_steps()
        # the random streams as the last completed step left them: whatever ran since (a sampler, another session)
        # does not change this run, and a call continues exactly as a resume from the saved state would
        restore_rng(self._boundary["rng"], self.generator)
        try:
            with self.parallel.errors(lambda: self.step):
                self.parallel.sync_parameters(self.network.trainable_parameters())
                if self.step == 0 and self.validation is not None and self.validation.at_first \
                        and self.last_samples is None and self.parallel.is_main:
                    self.sample()
                while self.step < end:
                    loss, t = self._optimizer_step()
                    losses.append(loss)
                    info = self._after_step(loss, t)
                    # a cancel raised by the hook stops every rank after this same step
                    self.parallel.agree_stop(_raised(progress, self.step, self.total_steps, info.__dict__),
                                             self.step)
            completed = True
        finally:
            for m in self._models():
                m.eval()
            self.network.eval()  # dropout is for training steps only: samples after training must be deterministic
            self._interrupt = None
            if not completed:
                self._save_state_safely()
                self._rewind_to_boundary()
            if self._tb is not None:
                self._tb.flush()
        if self.finished and losses:
            self._save_final()
        return losses

    def save_state(self, folder: str | Path | None = None) -> Path:
        """The state of the last completed step (weights, optimizer, scheduler, scaler, RNGs, data position); by
        default the latest-state folder (`latest_state_dir`)."""
        latest = folder is None
        folder = self.latest_state_dir() if latest else Path(folder)
        if not self.parallel.is_main:   # rank 0 writes the states of a data-parallel run
            return folder
        write_state(folder, self._state())
        if latest:   # what close() and the time-based save look at
            self.saved_step, self._last_state_save = self._boundary["step"], self._clock()
        return folder

    def latest_state_dir(self) -> Path:
        """`<name>-state`; when it holds a later step of another run (e.g. a fresh start under the same name), this
        run's own `<name>-run<session id>-state` instead, so neither overwrites the other."""
        folder = state_dir(self.output_dir, self.config.output_name)
        other = state_run(folder)
        if other and other.get("session_id") != self.session_id and other["step"] > self._boundary["step"]:
            return folder.with_name(f"{self.config.output_name}-run{self.session_id}-state")
        return folder

    def load_state(self, folder: str | Path) -> None:
        state = read_state(folder)
        _check_resume_compatible(state, self.network_config, self.pair.spec if self.pair is not None else None)
        self._apply_state(state)
        self._boundary = self._snapshot()

    def save_lora(self, path: str | Path | None = None, epoch: int | None = None, step: int | None = None) -> Path:
        """The LoRA file; two experts in the separate layout write `<name>_high_noise` and `<name>_low_noise`
        (`saved_loras` lists them; the high-noise one is returned); `path` may then be a dict of both files."""
        from ..lora.writer import save_lora

        path = Path(path) if path is not None and not isinstance(path, dict) else path
        name = self.config.output_name
        if self.pair is None:
            files = [(path or lora_path(self.lora_dir, name, step, epoch), self.network, {}, self.model)]
        else:
            files = self.pair.lora_files(self.network, name, path, self.lora_dir, step, epoch, lora_path)
        if not self.parallel.is_main:   # rank 0 writes the files of a data-parallel run
            return Path(files[0][0])
        inputs = [getattr(m, "source_path", None) for m in self._models()]
        optimizer_train_mode(self.optimizer, False)  # schedule-free: save the averaged weights
        try:
            self.saved_loras = [save_lora(net, where, format=self.config.save_format,
                                          metadata={**self._metadata(epoch, model), **extra},
                                          dtype=SAVE_DTYPES[self.config.save_precision], input_paths=inputs)
                                for where, net, extra, model in files]
        finally:
            optimizer_train_mode(self.optimizer, True)
        return self.saved_loras[0]

    def sample(self, progress=None) -> list[torch.Tensor]:
        """Run the validation prompts now (model + adapter as trained so far)."""
        v = self.validation
        if v is None or not v.prompts:
            return []
        self.last_samples = self.sample_prompts(v.prompts, v.vae, v.sample_fn, progress)
        return self.last_samples

    def sample_prompts(self, prompts, vae=None, sample_fn=None, progress=None) -> list[torch.Tensor]:
        """`run_validation` of `prompts` with the model and adapter as trained so far (two experts: through the
        family's pair, placed as in training)."""
        optimizer_train_mode(self.optimizer, False)
        try:
            if self.pair is None:
                return run_validation(self.model, prompts, self.network, vae, sample_fn, progress)
            try:
                return run_validation(self.model, prompts, self.network, vae, sample_fn, progress,
                                      sampled=self.pair.sampling_target(self.family), modules=self._models())
            finally:
                self.pair.placement_unknown()
        finally:
            optimizer_train_mode(self.optimizer, True)

    def evaluate(self) -> float:
        """The held-out eval loss now (recorded in the history and TensorBoard); needs `evaluation` set."""
        if self.evaluation is None:
            raise invalid("eval dataset", None, "a held-out cached dataset to evaluate on")
        value = held_out_loss(self.model, self.network, self.family, self.evaluation, self.device, self._autocast)
        self.history.add_eval(self.step, value)
        if self.config.logging_dir:
            if self._tb is None:
                self._tb = TensorBoardLogger(self.config.logging_dir, prefix=f"{self.config.output_name}_")
            self._tb.log_eval(self.step, value)
        return value

    def loss_map(self) -> dict[str, list[float]]:
        return self.history.loss_map()

    def save_progress(self) -> None:
        """Write the latest state if steps were made since the last one (never raises: warns)."""
        if self.step > 0 and self.saved_step != self.step:
            self._save_state_safely()

    def close(self, save: bool = True) -> None:
        """End the session; with `save`, progress not yet in a state file is saved first (a session replaced or
        released never loses its steps)."""
        if save:
            self.save_progress()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # --- one optimizer step ----------------------------------------------------------------------------------
    def _optimizer_step(self) -> tuple[float, torch.Tensor]:
        accum = self.config.gradient_accumulation_steps
        params = self.network.trainable_parameters()
        total, ts, self._step_experts = 0.0, [], []
        self.parallel.seed_step(self.config.seed, self.step)
        for k in range(accum):
            if k:
                self.parallel.agree_stop(_raised(self._interrupt), self.step)
            with self.parallel.no_sync(self.network, last=k == accum - 1):
                loss, t = self._micro_step(self._next_batch(), 1.0 / accum)
            total += float(loss)
            ts.append(t)
        self.parallel.reduce_gradients(params)   # a pair of experts on several ranks (DDP did it otherwise)
        mean = self.parallel.mean_loss(total, accum)   # over the micro-batches of every rank
        if not math.isfinite(mean):
            # stop before the optimizer step turns the adapter into NaN; train_steps saves the last good step
            folder = self.latest_state_dir()
            raise invalid(f"training loss at step {self.step + 1}", mean,
                          f"a finite value: training diverged (lower the learning rate, or use bf16/fp32 instead of "
                          f"fp16); the state of step {self.step} is saved in {folder} to resume from")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.optimizer_config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.optimizer_config.max_grad_norm)
        offload = self.config.offload_optimizer_state
        if offload:
            move_optimizer_state(self.optimizer, params[0].device)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if offload:
            move_optimizer_state(self.optimizer, "cpu")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._boundary = self._snapshot()
        return mean, torch.cat(ts)

    def _micro_step(self, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = batch["latents"].to(self.device, torch.float32)                     # [B, C, F, H, W]
        model = self.model
        if self.pair is None:
            def draw(shape):   # t then ε for each sample in turn: batch 2 == 2 micro-batches of 1 == 2 ranks
                draws, noises = [], []
                for _ in range(shape[0]):
                    draws.append(self.timesteps.sample(1, shape, self.generator))
                    noises.append(torch.randn(shape[1:], generator=self.generator))
                return draws, noises
            draws, noises = self.parallel.draw(draw, tuple(x0.shape))
        else:   # the batch's timesteps pick the expert, then the noise of each sample; each rank's batch its own
            def draw(shape):
                choice = self.pair.choose(self.timesteps, shape[0], shape, self.generator)
                return choice, [torch.randn(shape[1:], generator=self.generator) for _ in choice.draws]
            every = self.parallel.draw_all(draw, tuple(x0.shape))   # [(choice, noises)] of all ranks, in order
            choice, noises = every[self.parallel.rank]
            draws = choice.draws
            model = self.pair.activate(choice.expert)
            self._step_experts.extend(c.expert for c, _ in every)   # the global order of one process
        noise = torch.stack(noises).to(self.device)                               # [B, C, F, H, W]
        t = torch.cat([d.t for d in draws])                                       # [B] in [0, 1]
        model_t = torch.cat([d.model_t for d in draws]).to(self.device)           # [B] 0..1000
        weight = None if draws[0].weight is None else torch.cat([d.weight for d in draws]).to(self.device)

        x_t = noisy_latents(x0, noise, t.to(self.device))
        target = velocity_target(x0, noise)
        with self._autocast():   # the family runs its DiT on the batch's conditioning (through DDP: several ranks)
            pred, target = self.parallel.forward(lambda *a: self.family.training_forward(model, *a), self.network,
                                                 batch, x_t, model_t, target)
        loss = flow_matching_loss(pred, target, weight)
        scaled = loss * scale
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return loss.detach(), t

    def _models(self, model=None) -> list[torch.nn.Module]:
        """The trained DiT, or both experts (low-noise first)."""
        low = model if model is not None else self.model
        return [low] if self.pair is None else [low, self.pair.models[HIGH]]

    def _autocast(self):
        dtype = AMP_DTYPES.get(self.config.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _next_batch(self) -> dict:
        for _ in range(2):
            if self._iter is None:
                self._iter = iter(self.loader)
            batch = next(self._iter, None)
            if batch is not None:
                return batch
            self._iter = None  # epoch finished: the loader moved to the next epoch
        raise invalid("dataset", "no batches", "at least one cached batch")

    def _completed_epochs(self) -> int:
        if hasattr(self.loader, "completed_epochs"):   # a rank's share (distributed.py)
            return int(self.loader.completed_epochs)
        epoch = int(getattr(self.loader, "epoch", 0))
        index = getattr(self.loader, "index", None)
        return epoch + (1 if index is not None and index >= len(self.loader) else 0)

    # --- after a step: history, logging, periodic saves, sampling ----------------------------------------------
    def _after_step(self, loss: float, t: torch.Tensor) -> StepInfo:
        cfg = self.config
        self.history.add(self.step, loss)
        self.timer.tick()
        lrs = current_lrs(self.optimizer)
        lr = lrs.get("lr/unet")
        avg = self.history.moving_average()
        it_s = self.timer.it_per_s
        main = self.parallel.is_main   # logging, saving, validation: rank 0 of a data-parallel run
        if main and cfg.logging_dir and self.step % cfg.log_every_n_steps == 0:
            if self._tb is None:
                self._tb = TensorBoardLogger(cfg.logging_dir, prefix=f"{cfg.output_name}_")
            self._tb.log_step(self.step, loss, avg, lrs, it_s, t)

        epochs = self._completed_epochs()
        new_epoch = epochs > self._epochs_done
        self._epochs_done = epochs
        if main and not self.finished:
            if cfg.save_every_n_steps and self.step % cfg.save_every_n_steps == 0:
                self._periodic_save(step=self.step)
            if new_epoch and cfg.save_every_n_epochs and epochs % cfg.save_every_n_epochs == 0:
                self._periodic_save(epoch=epochs)
            minutes = cfg.save_state_every_minutes
            if minutes and self.saved_step != self.step and self._clock() - self._last_state_save >= 60 * minutes:
                self.save_state()   # a crash or power cut loses at most this much training time
        if main and self.validation is not None and self.validation.due(self.step):
            self.sample()
        if main and self.evaluation is not None and self.evaluation.due(self.step):
            self.evaluate()
        status = status_text(self.step, self.total_steps, loss, avg, lr, it_s, self.device)
        if self.history.eval_losses:
            status += f" | eval loss {self.history.eval_losses[-1]:.4f} (step {self.history.eval_steps[-1]})"
        info = StepInfo(self.step, self.total_steps, loss, avg, lr, it_s, epochs, status, [float(v) for v in t],
                        list(self._step_experts))
        self.last_info = info
        return info

    def _periodic_save(self, step: int | None = None, epoch: int | None = None) -> None:
        cfg, out = self.config, self.output_dir
        kind = "step" if step is not None else "epoch"
        self.save_lora(step=step, epoch=epoch)
        for name in ([cfg.output_name] if self.pair is None else self.pair.file_names(cfg.output_name)):
            prune(self.lora_dir, name, kind, cfg.keep_last_n_saves)
        if cfg.save_state:
            self.save_state(state_dir(out, cfg.output_name, step, epoch))
            prune(out, cfg.output_name, f"{kind}-state", cfg.keep_last_n_states)

    def _save_final(self) -> None:
        self.save_lora()
        self.save_state()

    def _save_state_safely(self, folder: Path | None = None) -> None:
        """Called while an exception propagates: never replace it with a saving error."""
        try:
            self.save_state(folder)
        except Exception as e:  # noqa: BLE001 - the original exception matters more
            warnings.warn(f"could not save the training state to {folder}: {type(e).__name__}: {e}")

    # --- state -----------------------------------------------------------------------------------------------
    def _rewind_to_boundary(self) -> None:
        """After a failed or cancelled step: drop its partial gradients and give back the batches and random
        numbers it drew (weights and optimizer only change when a step completes)."""
        b = self._boundary
        self.optimizer.zero_grad(set_to_none=True)
        restore_rng(b["rng"], self.generator)
        self.loader.load_state_dict(copy.deepcopy(b["loader"]))
        self._iter = None
        self.timesteps.load_state_dict(b["timesteps"])
        self._epochs_done = b["epochs_done"]
        if self.pair is not None:
            self.pair.load_state_dict(b["experts"])

    def _snapshot(self) -> dict:
        return {"step": self.step, "rng": capture_rng(self.generator),
                "loader": copy.deepcopy(self.loader.state_dict()), "timesteps": self.timesteps.state_dict(),
                "epochs_done": self._epochs_done, "session_id": self.session_id, "started_at": self.started_at,
                "experts": self.pair.state_dict() if self.pair is not None else None}

    def _state(self) -> dict:
        b = self._boundary
        return {
            "step": b["step"], "epochs_done": b["epochs_done"], "rng": b["rng"], "loader": b["loader"],
            "session_id": b["session_id"], "started_at": b["started_at"],
            "timesteps": b["timesteps"], "history": self.history.state_dict(), "experts": b["experts"],
            "network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "config": {"training": to_plain(self.config), "network": to_plain(self.network_config),
                       "optimizer": to_plain(self.optimizer_config), "total_steps": self.total_steps,
                       "experts": self.pair.spec.plain() if self.pair is not None else None},
        }

    def _apply_state(self, state: dict) -> None:
        self.network.load_state_dict({k: v.to(self.device) for k, v in state["network"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"], self.generator)
        self.loader.load_state_dict(state["loader"])
        self._iter = None
        self.timesteps.load_state_dict(state.get("timesteps", {}))
        self.step = int(state["step"])
        self._epochs_done = int(state.get("epochs_done", 0))
        self.session_id = int(state.get("session_id", self.session_id))   # a resumed run is the same session
        self.started_at = float(state.get("started_at", self.started_at))
        self.history.load_state_dict(state.get("history", {}))
        if self.pair is not None:
            self.pair.load_state_dict(state.get("experts") or {})

    def _load_network_weights(self, path: str) -> None:
        """Start from a saved LoRA / LoHa / LoKr of the same kind and shape (Musubi `--network_weights`); with two
        experts, both networks start from it."""
        from ..lora.dialects import read_lora

        lora = read_lora(path)
        for net in (self.network.networks().values() if self.pair is not None else [self.network]):
            self._load_adapters(net.adapters(), lora, path)

    @staticmethod
    def _load_adapters(adapters: dict, lora, path: str) -> None:
        missing = [n for n in adapters if n not in lora.modules]
        if missing:
            raise invalid("network_weights", path, f"a LoRA with weights for every trained module (missing {missing[:3]})")
        for name, adapter in adapters.items():
            mw = lora.modules[name]
            if mw.kind != adapter.kind or not mw.hookable or {"mid", "hada_t1", "hada_t2"} & mw.tensors.keys():
                raise invalid("network_weights", path, f"a {adapter.kind} file without DoRA, Tucker cores or .diff "
                                                       f"keys (found {mw.kind} in {name!r})")
            params = {k: v for k, v in adapter.state_dict().items() if k != "alpha"}
            stored = {_FILE_PART.get(k, k): k for k in params}      # file tensor name -> adapter parameter
            if set(stored) != set(mw.tensors):
                raise invalid("network_weights", path, f"{adapter.kind} tensors {sorted(stored)} in {name!r} "
                                                       f"(found {sorted(mw.tensors)}: another rank or factor?)")
            for part, key in stored.items():
                if tuple(mw.tensors[part].shape) != tuple(params[key].shape):
                    raise invalid(f"network_weights {name}.{part} shape", tuple(mw.tensors[part].shape),
                                  f"{tuple(params[key].shape)} (the configured rank {adapter.rank} / factor)")
            with torch.no_grad():
                for part, key in stored.items():
                    adapter.get_parameter(key).copy_(mw.tensors[part])
            adapter.set_alpha(mw.scale * adapter.rank)

    def _metadata(self, epoch: int | None, model=None) -> dict[str, str]:
        cfg, o, ts = self.config, self.optimizer_config, self.config.timesteps
        meta = {
            "ss_learning_rate": o.learning_rate, "ss_optimizer": self.optimizer_name, "ss_lr_scheduler": o.lr_scheduler,
            "ss_lr_warmup_steps": o.lr_warmup_steps, "ss_max_grad_norm": o.max_grad_norm,
            "ss_steps": self.step, "ss_epoch": epoch if epoch is not None else self._epochs_done,
            "ss_max_train_steps": self.total_steps, "ss_gradient_checkpointing": cfg.gradient_checkpointing,
            "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "ss_mixed_precision": cfg.mixed_precision, "ss_seed": cfg.seed,
            "ss_timestep_sampling": ts.timestep_sampling, "ss_discrete_flow_shift": ts.discrete_flow_shift,
            "ss_sigmoid_scale": ts.sigmoid_scale, "ss_weighting_scheme": ts.weighting_scheme,
            "ss_output_name": cfg.output_name,
            "ss_session_id": self.session_id, "ss_training_started_at": self.started_at,
            "ss_training_finished_at": time.time(), "ss_network_dropout": self.network_config.dropout,
        }
        batches = self.loader.global_len() if hasattr(self.loader, "global_len") else len(self.loader)
        per_step = cfg.gradient_accumulation_steps * self.parallel.world_size   # batches of one optimizer step
        meta["ss_num_batches_per_epoch"] = batches
        meta["ss_num_epochs"] = math.ceil(self.total_steps / max(1, math.ceil(batches / per_step)))
        datasets = _datasets_metadata(self.loader)
        if datasets:
            meta["ss_datasets"] = json.dumps(datasets)
            meta["ss_num_train_items"] = sum(d["num_train_items"] for d in datasets)
            buckets = {}
            for d in datasets:
                for b, n in d["bucket_info"].items():
                    buckets[b] = buckets.get(b, 0) + n
            w, h = max(buckets, key=buckets.get).split("x")[:2]
            meta["modelspec.resolution"] = f"{w}x{h}"   # the most used training bucket
        args = _network_args(self.network_config)
        if args:  # Musubi writes ss_network_args only when some were given
            meta["ss_network_args"] = json.dumps(args)
        if ts.min_timestep is not None or ts.max_timestep is not None:
            meta["modelspec.timestep_range"] = f"{ts.min_timestep or 0},{ts.max_timestep or 1000}"
        model = model if model is not None else self.model   # the base model of the file written
        if getattr(model, "source_path", None):
            meta["ss_sd_model_name"] = Path(model.source_path).name
        return {k: str(v) for k, v in meta.items()}


def _network_args(net: NetworkConfig) -> dict[str, str]:
    """The extra network arguments of Musubi's `--network_args` (values as strings, as Musubi stores them)."""
    args = {}
    for key in ("rank_dropout", "module_dropout"):
        if getattr(net, key) is not None:
            args[key] = str(getattr(net, key))
    if net.include:
        args["include_patterns"] = str(list(net.include))
    if net.exclude:
        args["exclude_patterns"] = str(list(net.exclude))
    if net.kind == "lokr" and net.lokr_factor != -1:
        args["factor"] = str(net.lokr_factor)
    return args


def _datasets_metadata(loader) -> list[dict]:
    """Per-dataset entries of ss_datasets (empty for loaders that are not the cached-dataset loader)."""
    out = []
    for ds in getattr(loader, "datasets", None) or []:
        samples = getattr(ds, "samples", None)
        if samples is None:
            continue
        buckets: dict[str, int] = {}
        for s in samples:
            w, h, t = s.bucket
            key = f"{w}x{h}x{t}"
            buckets[key] = buckets.get(key, 0) + ds.num_repeats
        out.append({"is_image_dataset": all(s.bucket[2] == 1 for s in samples),
                    "num_items": len({s.key for s in samples}), "num_clips": len(samples),
                    "num_repeats": ds.num_repeats, "num_train_items": len(samples) * ds.num_repeats,
                    "batch_size": ds.batch_size, "bucket_info": buckets,
                    "cache_directory": Path(ds.cache_dir).name})
    return out


def _check_resume_compatible(state: dict, network: NetworkConfig, experts: TimestepExperts | None = None) -> None:
    saved = state.get("config", {}).get("network", {})
    for key in ("kind", "rank"):
        if key in saved and saved[key] != getattr(network, key):
            raise invalid(f"resume state network {key}", saved[key], f"{getattr(network, key)} (the current network)")
    pair, now = state.get("config", {}).get("experts"), (experts.plain() if experts is not None else None)
    if pair != now:   # one model vs two, another layout or boundary: the saved weights and choices do not apply
        raise invalid("resume state experts", pair, f"{now} (the current training)")


def _raised(hook: Callable | None, *args) -> BaseException | None:
    """What `hook(*args)` raised (a cancel), instead of raising it: the ranks agree before anyone stops."""
    if hook is None:
        return None
    try:
        hook(*args)
    except BaseException as e:  # noqa: BLE001 - ComfyUI's interrupt is a BaseException; re-raised by agree_stop
        return e
    return None


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass


__all__ = ["TrainingSession", "StepInfo", "check_batch_for_model", "peek_batch", "MusubiInputError"]
