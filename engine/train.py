"""Headless LoRA training: the training the nodes run, from a config file (engine/training/run_config.py).

    cd custom_nodes/ComfyUI-Musubi
    python -m engine.train run.toml                               # one process
    torchrun --nproc_per_node 4 -m engine.train run.toml          # 4 ranks on this machine (docs/distributed.md)

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in the environment) each process is one rank of a
data-parallel run: NCCL on CUDA, gloo on CPU. Rank 0 prints progress and writes the LoRA files and states; a stop
(the stop file, SIGINT or SIGTERM) stops every rank after the same step with the state saved; running the same
command again continues from it (`[run] continue_saved`), with any number of ranks.

Exit codes: 0 done or stopped, 2 a config / input mistake (nothing trained), 1 a lost rank or another error.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import torch

from .errors import MusubiInputError, invalid

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": None}


class StopRequested(BaseException):
    """The stop file or a signal: stop after the current step (a BaseException, like ComfyUI's interrupt)."""


class _Stop:
    """Stop requests of this process: signals (any rank), the stop file (rank 0)."""

    def __init__(self, stop_file: Path | None):
        self.stop_file, self.signalled = stop_file, False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def check(self, *args) -> None:
        if self.signalled:
            raise StopRequested("signal")
        if self.stop_file is not None and self.stop_file.exists():
            try:
                self.stop_file.unlink()   # honoured once: the next run does not stop at once
            except OSError:
                pass
            raise StopRequested(str(self.stop_file))


def load_model(config, path: str | None = None):
    """The DiT of `[model]` (or the one at `path` with `[model]`'s options) through its family's `load_dit`."""
    from .families import get_family

    family = get_family(config.family)
    load = getattr(family, "load_dit", None)
    if load is None:
        raise invalid("[model] family", config.family, "a family the headless trainer can load (it has load_dit)")
    from .memory.fp8 import Fp8Linear, enable_fp8_matmul, set_fp8_scale_dtype

    fp8 = None if config.fp8 == "none" else config.fp8
    model = load(path or config.path, dtype=DTYPES[config.dtype], device="cpu", fp8=fp8)
    has_fp8 = any(isinstance(m, Fp8Linear) for m in model.modules())
    if (config.fp8_matmul or config.fp8_scale_dtype == "bf16") and not has_fp8:
        raise invalid("[model] fp8_matmul / fp8_scale_dtype", (config.fp8_matmul, config.fp8_scale_dtype),
                      "fp8 weights: fp8 'scaled' or 'e4m3', or an fp8 file")
    if config.fp8_matmul:
        enable_fp8_matmul(model)
    if config.fp8_scale_dtype == "bf16":
        set_fp8_scale_dtype(model, torch.bfloat16)
    return model


def dataset_loader(config, model, seed: int):
    """The cached dataset of `[dataset]`, checked against the model (the nodes' check)."""
    from .data import CachedBatchLoader, check_cache_for_model, load_dataset_config
    from .families import family_of

    datasets = load_dataset_config(config.config)
    cached = check_cache_for_model(datasets, family_of(model).cache_requirements(model))
    return CachedBatchLoader(cached, seed=seed)


def prepare(config):
    """The heavy part before any rank talks to another: (model, loader); `model` is (low, high) for a pair of
    timestep experts (`[model] high_path`)."""
    low = load_model(config.model)
    loader = dataset_loader(config.dataset, low, config.training.seed)
    if config.model.high_path is None:
        return low, loader
    return (low, load_model(config.model, config.model.high_path)), loader


def open_session(config, model, loader, parallel, device: torch.device):
    """The hosted session of this rank (the nodes' kind: a LoRA view of the model, placed by a Residency)."""
    from .handle import ModelHandle, RunOptions
    from .memory.residency import Residency
    from .training.hosted import host_session

    opts = RunOptions(attention=config.model.attention, blocks_to_swap=config.model.blocks_to_swap,
                      offload_non_blocks=config.model.offload_non_blocks,
                      activation_offload=config.model.activation_offload, compile=config.model.compile_blocks)
    experts = None
    if isinstance(model, tuple):   # a pair: the low-noise expert trains as the session's model
        from .training.hosted import HostedExperts

        model, high = model
        experts = HostedExperts(ModelHandle(high, getattr(type(high), "family", None), opts),
                                config.model.boundary, config.model.expert_layout, config.model.expert_mode)
    handle = ModelHandle(model, getattr(type(model), "family", None), opts)
    # a sharded base stays in host memory until each rank's shards go to its device (never the whole model there)
    prepare_on = torch.device("cpu") if parallel.shards_base else device
    hosted = host_session(handle, loader, config.network, config.optimizer, config.training, residency=Residency(),
                          device=prepare_on, resume_from=config.run.resume_from,
                          continue_saved=config.run.continue_saved, node="cli", experts=experts,
                          parallel=parallel)
    parallel.check_same_start(hosted.session.step)
    return hosted


def run(config, parallel=None, device: torch.device | None = None, out=print) -> int:
    """Train as `config` says on this rank; returns the exit code. `parallel`: this rank's `DataParallel`."""
    from .training.distributed import SingleProcess, TrainingStopped

    parallel = parallel or SingleProcess()
    device = device or torch.device("cpu")
    main = parallel.is_main
    say = out if main else (lambda *a, **k: None)   # other ranks are silent
    model, loader = prepare(config)
    hosted = open_session(config, model, loader, parallel, device)
    session = hosted.session
    stop = _Stop(config.stop_path() if main else None)
    stop.install()
    say(f"training {config.training.output_name}: step {session.step}/{session.total_steps} on "
        f"{parallel.world_size} rank(s), device {device}", flush=True)
    report = getattr(parallel, "shard_report", None)
    if report is not None:
        say(f"base sharded (fsdp2, {report.units} units): {report.local_bytes / 2**20:.1f} MiB of "
            f"{report.total_bytes / 2**20:.1f} MiB on rank 0", flush=True)
    elif config.model.shard_base != "none":
        say(f"shard_base = {config.model.shard_base}: one rank, nothing to shard (the whole base is on {device})",
            flush=True)

    def progress(step, total, info):
        experts = f" | experts {','.join(info['experts'])}" if info.get("experts") else ""   # a pair's choices
        say(info["status"] + experts, flush=True)
        stop.check()

    try:
        hosted.train_to(session.total_steps, device, progress=progress, interrupt=stop.check)
    except TrainingStopped as e:
        print(f"rank {parallel.rank}: stopped by another rank after step {e.step}", file=sys.stderr, flush=True)
        return 0
    except StopRequested:
        say(f"stopped after step {session.step}; state saved in {session.latest_state_dir()} "
            f"(run the same command to continue)", flush=True)
        return 0
    finally:
        session.close(save=False)
    if main:
        say(f"saved {', '.join(str(p) for p in session.saved_loras)} and the state "
            f"{session.latest_state_dir()}", flush=True)
    return 0


def follow(config, launch, device: torch.device) -> int:
    """A worker rank of a session hosted by rank 0 in another process (training/workers.py): load, say ready,
    join the group, then train to each step rank 0 names until it says close."""
    from .training.distributed import DataParallel, TrainingStopped, init_process_group
    from .training.workers import ERROR, READY, die_with_parent, next_command, worker_store

    parent_alive = die_with_parent()
    store = worker_store(config.run.timeout_s)
    try:
        model, loader = prepare(config)
    except Exception as e:  # noqa: BLE001 - rank 0 shows it on the node
        store.set(ERROR.format(launch.rank), f"{type(e).__name__}: {e}")
        raise
    store.set(READY.format(launch.rank), "ok")
    init_process_group(launch, device, config.run.timeout_s, store=store)
    parallel = DataParallel(device=device)
    hosted = open_session(config, model, loader, parallel, device)
    number = 0
    while True:
        number += 1
        command = next_command(store, number, parent_alive)
        if command == "close":
            hosted.session.close(save=False)
            return 0
        try:
            hosted.train_to(int(command.split()[1]), device)
        except TrainingStopped:   # rank 0 was cancelled: wait for its next command
            pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .training.distributed import (DataParallel, LaunchEnv, PeerLost, destroy_process_group, init_process_group,
                                       launch_device)
    from .training.run_config import load_run_config

    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the run's .toml or .json config")
    parser.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)   # a worker of a hosted session
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:   # every mistake before a process group or a model exists
        config = load_run_config(args.config)
        launch = LaunchEnv.read()
        device = launch_device(launch, args.device or config.run.device)
    except MusubiInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    parallel = None
    try:
        if args.follow:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            return follow(config, launch, device)
        if launch.world_size > 1:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            init_process_group(launch, device, config.run.timeout_s)
            parallel = DataParallel(device=device, shard_base=config.model.shard_base)
        return run(config, parallel, device)
    except MusubiInputError as e:
        print(f"error (rank {launch.rank}): {e}", file=sys.stderr, flush=True)
        return 2
    except PeerLost as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
