"""Data-parallel training on a `torch.distributed` process group (one `TrainingSession` per rank).

What a session asks of its `Parallel` (`SingleProcess` when there is no group: the same calls, no communication):

* data: `shard(loader)` gives each rank its share of one global batch sequence. The W ranks take the next W global
  batches together (rank r the r-th), epochs back to back, so an optimizer step of W ranks × accumulation A reads
  the same A·W batches, in the same order, as one process with accumulation A·W. The position is saved in global
  batches (the loader's own state format), so a state saved with W ranks resumes with any other number.
* random numbers: every rank keeps the session generator in the same state. For each micro-batch the ranks share
  their batch shapes (`all_gather`) and every rank draws t and ε for all W batches in rank order, as one process
  would for A·W micro-batches, and keeps its own (`draw`). Costs W× the noise draws (CPU), never a transfer.
  Dropout uses the global torch RNG: ranks > 0 reseed it per step from (seed, step, rank) (distinct masks per rank,
  the same ones on resume); rank 0 keeps the saved stream, so a 1-rank run is bit-identical to no group at all.
* gradients: `forward` runs the family's forward through `DistributedDataParallel` on a module that holds the
  adapter network only (the frozen base is never a DDP parameter, never broadcast, never in a bucket); `no_sync`
  for all but the last micro-batch of a step. DDP averages over ranks, the session scales by 1/A: the gradient of
  the mean loss of the A·W micro-batches. Module dropout keeps a dropped adapter in the graph with a zero term
  (DDP needs every adapter weight in every backward; gradient checkpointing rules out `find_unused_parameters`).
* two timestep experts (a pair): each rank's batch picks its own expert (the draws of all W batches are made on
  every rank, so every rank knows all W choices), so the ranks of one micro-batch may run different experts and
  DDP's per-bucket all-reduces would not pair up. A pair trains without DDP: each rank accumulates its own
  gradients and `reduce_gradients` averages them once per step, after the last backward (one flag all-reduce, then
  the gradients in flat buckets). A weight no rank touched in the step (the idle expert) keeps a None gradient, so
  the optimizer leaves it alone as in one process; a weight only some ranks touched gets zeros from the others.
* agreement: the step loss is the mean over ranks (`mean_loss`: every rank sees the same value, so a non-finite
  loss stops all of them at the same step); a cancel on any rank (rank 0's progress / interrupt hooks, a signal)
  is agreed with one all-reduce (`agree_stop`) at every step and micro-batch boundary, so all ranks stop at the
  same step; rank 0 re-raises its cancel (and saves the state), the others raise `TrainingStopped`.
* failures: a rank that dies makes the next collective fail on the others (gloo: connection closed, at once; a
  hung rank: the group's timeout); the session turns it into `PeerLost` naming the rank and the step.
* side effects (LoRA files, states, TensorBoard, validation, evaluation, progress) happen on rank 0 only.
* frozen base (`shard_base="fsdp2"`): each rank keeps 1/W of the base weights (sharding.py, FSDP2 per block);
  the adapters stay whole under DDP as above. Nothing may run the model on one rank alone then (no validation).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import invalid

DEFAULT_TIMEOUT_S = 1800.0   # a collective waits this long for a hung rank (rank 0 alone runs validation meanwhile)


class TrainingStopped(Exception):
    """Raised on a rank whose peers agreed to stop (rank 0 was cancelled): the step it stopped after is `step`."""

    def __init__(self, step: int):
        super().__init__(f"training stopped by another rank after step {step}")
        self.step = step


class PeerLost(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or its process group went away."""


# --- the process group ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or a launcher doing the same) puts in the environment."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def read(cls, environ=None) -> "LaunchEnv":
        env = os.environ if environ is None else environ
        values = {}
        for key, name in (("RANK", "rank"), ("WORLD_SIZE", "world_size"), ("LOCAL_RANK", "local_rank")):
            text = env.get(key)
            if text is None or text == "":
                continue
            try:
                values[name] = int(text)
            except ValueError:
                raise invalid(f"environment variable {key}", text, "an integer (set by torchrun)") from None
        launch = cls(**values)
        if launch.world_size < 1 or not 0 <= launch.rank < launch.world_size:
            raise invalid("environment RANK / WORLD_SIZE", (launch.rank, launch.world_size),
                          "0 <= RANK < WORLD_SIZE (set by torchrun)")
        if launch.world_size > 1 and not env.get("MASTER_ADDR"):
            raise invalid("environment MASTER_ADDR", None, "the address of rank 0 (set by torchrun) when "
                                                           "WORLD_SIZE > 1")
        return launch


def init_process_group(launch: LaunchEnv, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S,
                       store=None) -> None:
    """env:// rendezvous (MASTER_ADDR / MASTER_PORT) or `store`'s; NCCL on CUDA devices, gloo otherwise."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # NCCL binds the group to this rank's GPU (torch ≥ 2.3 takes device_id; older ones find it themselves)
    takes_device = "device_id" in inspect.signature(dist.init_process_group).parameters
    kwargs = {"device_id": device} if device.type == "cuda" and takes_device else {}
    if store is not None:
        kwargs["store"] = store
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=float(timeout_s)), **kwargs)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_device(launch: LaunchEnv, requested: str | None = None) -> torch.device:
    """The device of this rank: `cuda:LOCAL_RANK` when CUDA is there (unless `requested` says otherwise)."""
    if requested not in (None, "", "auto"):
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", launch.local_rank)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", launch.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


# --- the data shard ---------------------------------------------------------------------------------------------

class ShardedLoader:
    """Rank `rank` of `world`'s share of a loader's global batch sequence (epochs back to back). The loader must
    answer `batch_at(epoch, index)` and have the same number of batches every epoch (both built-in loaders do).

    The position (`epoch`, `index`: the next global batch not read by any rank) is always inside an epoch, so it is
    also a valid position of the plain loader: the saved state is the loader's own."""

    def __init__(self, loader, rank: int, world: int):
        if not callable(getattr(loader, "batch_at", None)):
            raise invalid("dataset loader", type(loader).__name__, "a batch loader with batch_at(epoch, index) "
                                                                   "(needed to read one rank's share)")
        self.inner, self.rank, self.world = loader, int(rank), int(world)
        self.epoch, self.index = self._normal(int(loader.epoch), int(loader.index))

    @property
    def datasets(self):
        return getattr(self.inner, "datasets", None)

    @property
    def seed(self):
        return self.inner.seed

    @property
    def completed_epochs(self) -> int:
        return self.epoch

    def global_len(self) -> int:
        return len(self.inner)

    def __len__(self) -> int:
        """This rank's batches per epoch (rounded up): steps per epoch come out as for one process with W× the
        accumulation."""
        return math.ceil(len(self.inner) / self.world)

    def _normal(self, epoch: int, index: int) -> tuple[int, int]:
        n = len(self.inner)
        return epoch + index // n, index % n

    def __iter__(self):
        """This rank's batches until the group's position leaves the current epoch."""
        start = self.epoch
        while self.epoch == start:
            epoch, index = self._normal(self.epoch, self.index + self.rank)
            batch = self.inner.batch_at(epoch, index)
            self.epoch, self.index = self._normal(self.epoch, self.index + self.world)
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.inner.seed, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)   # the loader's own checks (seed, index in range)
        self.epoch, self.index = self._normal(int(state["epoch"]), int(state["index"]))


# --- what the session calls -------------------------------------------------------------------------------------

class SingleProcess:
    """No process group: every call does what one process does, without communication."""

    rank, world_size, is_main = 0, 1, True
    shards_base = False

    def shard(self, loader):
        return loader

    def shard_model(self, model) -> None:
        pass

    def draw(self, fn: Callable, shape: tuple):
        return fn(tuple(shape))

    def draw_all(self, fn: Callable, shape: tuple) -> list:
        return [fn(tuple(shape))]

    def sync_parameters(self, params) -> None:
        pass

    def reduce_gradients(self, params) -> None:
        pass

    def forward(self, run: Callable, network, *args):
        return run(*args)

    def no_sync(self, network, last: bool):
        return contextlib.nullcontext()

    def mean_loss(self, total: float, count: int) -> float:
        return total / count

    def agree_stop(self, raised: BaseException | None, step: int) -> None:
        if raised is not None:
            raise raised

    def seed_step(self, seed: int, step: int) -> None:
        pass

    @contextlib.contextmanager
    def errors(self, step: Callable[[], int]):
        yield

    def check(self, network_config, experts) -> None:
        pass

    def check_same_start(self, step: int) -> None:
        pass

    def start_steps(self) -> None:
        pass


class _NetworkForward(torch.nn.Module):
    """What DDP wraps: the adapter network as its only submodule (its parameters are DDP's), and the family's
    forward on the model (a plain attribute: the base weights stay outside DDP)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        object.__setattr__(self, "run", None)

    def forward(self, *args):
        return self.run(*args)


class DataParallel:
    """This rank of an initialised process group (`torch.distributed`)."""

    def __init__(self, group=None, device: torch.device | None = None, shard_base: str = "none"):
        """`device`: this rank's CUDA device for NCCL's small tensors (default: the current CUDA device).
        `shard_base`: "fsdp2" splits the frozen base across the ranks (sharding.py); "none" keeps it whole."""
        from .sharding import validate_shard_mode

        validate_shard_mode(shard_base)
        if not dist.is_available() or not dist.is_initialized():
            raise invalid("distributed training", "no process group", "torch.distributed initialised (torchrun, or "
                                                                     "engine.training.distributed.init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.is_main = self.rank == 0
        # NCCL moves CUDA tensors only: the small agreement tensors go to the device the backend needs
        backend = dist.get_backend(group)
        if backend != "nccl":
            self.comm_device = torch.device("cpu")
        else:
            self.comm_device = device if device is not None and device.type == "cuda" \
                else torch.device("cuda", torch.cuda.current_device())
        self._ddp = None
        self._ddp_key = None
        self.agreed_stop = False   # the last train_steps ended by a stop all ranks agreed on (they are in step)
        self.shard_base = shard_base
        self.shard_report = None   # sharding.ShardReport once the base is sharded
        self.per_step_reduce = False   # a pair of experts: no DDP, `reduce_gradients` once per step (check)

    def check(self, network_config, experts) -> None:
        """Called by the session before anything is built: a pair of experts reduces per step, without DDP."""
        if experts is not None and self.shards_base:
            raise invalid("shard_base", f"{self.shard_base} with two timestep experts",
                          "none: a pair of experts trains with each rank holding both whole experts")
        self.per_step_reduce = experts is not None

    def shard(self, loader):
        return ShardedLoader(loader, self.rank, self.world_size)

    @property
    def shards_base(self) -> bool:
        return self.shard_base != "none" and self.world_size > 1

    def shard_model(self, model) -> None:
        """The frozen base split across the ranks (every rank calls it at the same point; before the adapters
        are made, so they land on the shards' device). Idempotent."""
        if not self.shards_base or self.shard_report is not None:
            return
        from .sharding import shard_frozen_base

        with self.errors(lambda: 0):
            self.shard_report = shard_frozen_base(model, self.comm_device, self.group)

    def check_same_start(self, step: int) -> None:
        """Every rank starts from the same step (a resumed state must be readable by all of them)."""
        with self.errors(lambda: step):
            mine = torch.tensor([int(step)], dtype=torch.int64, device=self.comm_device)
            every = torch.empty(self.world_size, dtype=torch.int64, device=self.comm_device)
            _all_gather(every, mine, group=self.group)
        steps = every.tolist()
        if len(set(steps)) > 1:
            raise invalid("training state per rank (steps)", steps, "the same step on every rank: the output_dir "
                                                                    "(and resume_from) must be a folder every node "
                                                                    "reads")

    # --- random numbers of one micro-batch --------------------------------------------------------------------
    def draw(self, fn: Callable, shape: tuple):
        """`fn(shape)` for every rank's batch shape in rank order (the same generator calls on every rank); this
        rank's result."""
        return self.draw_all(fn, shape)[self.rank]

    def draw_all(self, fn: Callable, shape: tuple) -> list:
        """`fn(shape)` for every rank's batch shape in rank order: every rank's result (the same on every rank)."""
        return [fn(s) for s in self._gather_shapes(tuple(shape))]

    def _gather_shapes(self, shape: tuple) -> list[tuple]:
        width = 8
        if len(shape) > width - 1:
            raise invalid("batch latents", shape, f"at most {width - 1} dimensions")
        mine = torch.tensor([len(shape), *shape, *([0] * (width - 1 - len(shape)))], dtype=torch.int64,
                            device=self.comm_device)
        every = torch.empty(self.world_size * width, dtype=torch.int64, device=self.comm_device)
        _all_gather(every, mine, group=self.group)
        rows = every.view(self.world_size, width).tolist()
        return [tuple(r[1:1 + r[0]]) for r in rows]

    def seed_step(self, seed: int, step: int) -> None:
        if self.rank:   # distinct dropout masks per rank; rank 0 keeps its (saved) stream
            torch.manual_seed((int(seed) * 1_000_003 + int(step)) * 1_009 + self.rank)

    # --- gradients ------------------------------------------------------------------------------------------
    def start_steps(self) -> None:
        """Every rank calls this at the start of each `train_steps`: DDP is built again there (a collective), so
        a network moved in between (a hosted session offloaded and placed again) never keeps stale buckets."""
        self._ddp, self._ddp_key = None, None
        self.agreed_stop = False

    def forward(self, run: Callable, network, *args):
        if self.per_step_reduce:
            return run(*args)
        ddp = self._wrapped(network)
        ddp.module.run = run
        try:
            return ddp(*args)
        finally:
            ddp.module.run = None

    def _wrapped(self, network):
        """DDP over the network, built again when its parameters moved (offload, another device) or changed."""
        params = [p for p in network.parameters() if p.requires_grad]
        key = (id(network), tuple((id(p), p.device) for p in params))
        if self._ddp is None or self._ddp_key != key:
            _keep_dropped_adapters_in_graph(network)
            device = params[0].device
            options = {"device_ids": [device.index] if device.type == "cuda" else None,
                       "process_group": self.group, "find_unused_parameters": False}
            # buffers (adapter alphas) are equal on every rank: no broadcast before each forward
            if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
                options["forward_sync_buffers"] = False
            else:
                options["broadcast_buffers"] = False
            self._ddp = torch.nn.parallel.DistributedDataParallel(_NetworkForward(network), **options)
            self._ddp_key = key
        return self._ddp

    def no_sync(self, network, last: bool):
        """Accumulate locally; the last micro-batch of a step all-reduces (overlapped with its backward)."""
        if self.per_step_reduce:
            return contextlib.nullcontext()
        ddp = self._wrapped(network)
        return contextlib.nullcontext() if last else ddp.no_sync()

    # --- gradients without DDP (a pair of experts) ------------------------------------------------------------
    def sync_parameters(self, params) -> None:
        """Rank 0's trainable weights on every rank (what DDP's construction does), at the start of each
        `train_steps` of a pair."""
        if not self.per_step_reduce:
            return
        with torch.no_grad():
            for bucket in _buckets(list(params)):
                flat = torch.cat([p.detach().reshape(-1) for p in bucket])
                dist.broadcast(flat, 0, group=self.group)
                _unflatten(flat, bucket, lambda p, v: p.copy_(v))

    def reduce_gradients(self, params) -> None:
        """A pair's step gradients averaged over the ranks, after the step's last backward: the gradient of the
        mean loss of the A·W micro-batches, as one process accumulating A·W computes it. A weight without a
        gradient on every rank keeps None (its expert ran nowhere in this step: the optimizer skips it)."""
        if not self.per_step_reduce:
            return
        params = list(params)
        if not params:
            return
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.group)
        used = [p for p, h in zip(params, has.tolist()) if h]
        with torch.no_grad():
            for bucket in _buckets(used):
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in bucket])
                dist.all_reduce(flat, group=self.group)
                flat /= self.world_size
                _unflatten(flat, bucket, _set_grad)

    # --- agreement ------------------------------------------------------------------------------------------
    def mean_loss(self, total: float, count: int) -> float:
        """The mean of the step's `count` micro-batch losses on every rank (float64 sum)."""
        t = torch.tensor([total], dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t, group=self.group)
        return float(t.item()) / (count * self.world_size)

    def agree_stop(self, raised: BaseException | None, step: int) -> None:
        """Every rank calls this at the same point; when any rank asks to stop, all stop here."""
        flag = torch.tensor([1 if raised is not None else 0], dtype=torch.int32, device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if int(flag.item()):
            self.agreed_stop = True
            if raised is not None:
                raise raised
            raise TrainingStopped(step)

    @contextlib.contextmanager
    def errors(self, step: Callable[[], int]):
        """A failed collective becomes `PeerLost` with what to do about it."""
        try:
            yield
        except (PeerLost, TrainingStopped):
            raise
        except RuntimeError as e:
            if not _is_comm_error(e):
                raise
            raise PeerLost(f"distributed training: rank {self.rank} of {self.world_size} lost contact with another "
                           f"rank during step {step() + 1} ({type(e).__name__}: {str(e).splitlines()[0][:300]}). "
                           f"Another rank died or hung; see its log. The state of the last completed step is "
                           f"saved by rank 0: resume from it.") from e


# torch 2.14 renamed it (the old name warns); older torch has only the old one
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _is_comm_error(e: BaseException) -> bool:
    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                   "broken pipe", "process group"))


BUCKET_ELEMENTS = 1 << 24   # 64 MiB of fp32 per flat all-reduce: bounds the extra memory of a pair's reduction


def _buckets(params: list, size: int = BUCKET_ELEMENTS) -> list[list]:
    """Consecutive runs of `params` of one device and dtype, each at most `size` elements (or one tensor)."""
    out, current, count = [], [], 0
    for p in params:
        if current and (count + p.numel() > size or p.device != current[0].device or p.dtype != current[0].dtype):
            out.append(current)
            current, count = [], 0
        current.append(p)
        count += p.numel()
    if current:
        out.append(current)
    return out


def _unflatten(flat: torch.Tensor, params: list, put: Callable) -> None:
    offset = 0
    for p in params:
        put(p, flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _set_grad(p: torch.Tensor, value: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = value.clone()
    else:
        p.grad.copy_(value)


def _keep_dropped_adapters_in_graph(network) -> None:
    for module in network.modules():
        if hasattr(module, "module_dropout"):
            module.dropped_in_graph = True


__all__ = ["DataParallel", "LaunchEnv", "PeerLost", "ShardedLoader", "SingleProcess", "TrainingStopped",
           "DEFAULT_TIMEOUT_S", "destroy_process_group", "init_process_group", "launch_device"]
