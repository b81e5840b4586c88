"""Worker ranks of a data-parallel session hosted in an application's own process (the nodes: ComfyUI's process is
rank 0 and trains on its device; `python -m engine.train CONFIG --follow` runs every other rank).

Rank 0 starts the workers with torchrun's environment and a `torch.distributed.TCPStore` it hosts. Through the
store (keys below) a worker says it is ready (model and dataset loaded) or why it failed, and then waits for
commands: `train <step>` (train until that step, as rank 0 does: every collective of the steps pairs up) or
`close`. The store, not a collective, carries the commands, so an idle session never runs into the group's timeout.

A worker ends with its parent: Linux's parent-death signal, and a check of its parent between commands; rank 0
checks its workers before every command and names a dead one with the end of its log.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..errors import invalid
from .distributed import DEFAULT_TIMEOUT_S, DataParallel, PeerLost

READY, ERROR, COMMAND = "musubi/ready/{}", "musubi/error/{}", "musubi/command/{}"
POLL_S = 0.1
PACK_ROOT = Path(__file__).resolve().parents[2]   # the folder `python -m engine.train` runs from


class WorkerGroup:
    """Rank 0's side: the worker processes, the store, the process group."""

    _active: "WorkerGroup | None" = None   # one default process group per process

    def __init__(self, procs: list[subprocess.Popen], logs: list[Path], devices: list[str], store):
        self.procs, self.logs, self.devices, self.store = procs, logs, devices, store
        self.commands = 0
        self.parallel: DataParallel | None = None
        self.closed = False

    @property
    def world_size(self) -> int:
        return len(self.procs) + 1

    @classmethod
    def start(cls, config: dict, devices: list[str], folder: Path, name: str, device: torch.device,
              timeout_s: float = DEFAULT_TIMEOUT_S, interrupt: Callable[[], None] | None = None) -> "WorkerGroup":
        """Start a worker on each of `devices[1:]` (`devices[0]`: this process, on `device`), wait until each has
        loaded its model and dataset, and form the process group. `config`: the run's config as plain data."""
        if cls._active is not None and not cls._active.closed:
            raise invalid("devices", devices, "one multi-device training session at a time in this process: "
                                              "release the other one first")
        if dist.is_initialized():
            raise invalid("devices", devices, "no other torch.distributed process group in this process")
        folder.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(config))
        config.setdefault("run", {})["timeout_s"] = float(timeout_s)
        path = folder / f"{name}-workers.json"
        path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=float(timeout_s)),
                              wait_for_workers=False)
        world = len(devices)
        procs, logs = [], []
        group = cls(procs, logs, devices, store)
        try:
            for rank in range(1, world):
                env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), RANK=str(rank),
                           WORLD_SIZE=str(world), LOCAL_RANK=str(rank), PYTHONUNBUFFERED="1")
                log = folder / f"{name}-rank{rank}.log"
                logs.append(log)
                with open(log, "w", encoding="utf-8") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "engine.train", str(path), "--follow", "--device", devices[rank]],
                        cwd=PACK_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
            cls._active = group
            atexit.register(group.close)
            group._wait_ready(time.monotonic() + float(timeout_s), interrupt)
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=store, rank=0, world_size=world,
                                    timeout=timedelta(seconds=float(timeout_s)))
            group.parallel = DataParallel(device=device)
        except BaseException:
            group.close()
            raise
        return group

    def _wait_ready(self, deadline: float, interrupt) -> None:
        waiting = set(range(1, self.world_size))
        while waiting:
            for rank in sorted(waiting):
                if self.store.check([ERROR.format(rank)]):
                    raise PeerLost(f"devices: the worker for {self.devices[rank]} (rank {rank}) could not start: "
                                   f"{self.store.get(ERROR.format(rank)).decode()}")
                if self.store.check([READY.format(rank)]):
                    waiting.discard(rank)
            self.check_alive()
            if interrupt is not None:
                interrupt()
            if waiting and time.monotonic() > deadline:
                raise PeerLost(f"devices: the workers of ranks {sorted(waiting)} were not ready in time")
            time.sleep(POLL_S)

    def check_alive(self) -> None:
        for rank, (proc, log) in enumerate(zip(self.procs, self.logs), start=1):
            code = proc.poll()
            if code is not None:
                tail = _tail(log)
                raise PeerLost(f"devices: the worker for {self.devices[rank]} (rank {rank}) ended (exit code {code})"
                               f"; its log {log} ends with:\n{tail}")

    def train(self, target: int) -> None:
        """Tell every worker to train until step `target` (rank 0 then trains too)."""
        self.check_alive()
        self._command(f"train {int(target)}")

    def _command(self, text: str) -> None:
        self.commands += 1
        self.store.set(COMMAND.format(self.commands), text)

    def close(self, wait_s: float = 30.0) -> None:
        """Workers told to stop, then ended (killed after `wait_s`: 0 after an error, when a worker may wait in a
        collective that rank 0 never joins); the process group destroyed."""
        if self.closed:
            return
        self.closed = True
        try:
            if any(p.poll() is None for p in self.procs):
                self._command("close")
        except Exception:  # noqa: BLE001 - the store may be gone with a dead worker; the processes end below
            pass
        if dist.is_initialized():
            dist.destroy_process_group()
        end = time.monotonic() + wait_s
        for p in self.procs:
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.store = None
        if WorkerGroup._active is self:
            WorkerGroup._active = None
        atexit.unregister(self.close)


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- the worker's side -------------------------------------------------------------------------------------------

def die_with_parent() -> Callable[[], bool]:
    """Linux: SIGKILL when the parent dies. Returns a check that the parent is still this process's parent."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return lambda: os.getppid() == parent


def worker_store(timeout_s: float):
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=float(timeout_s)))


def next_command(store, number: int, parent_alive: Callable[[], bool]) -> str:
    """Command `number` from rank 0; "close" when the parent is gone."""
    key = COMMAND.format(number)
    while not store.check([key]):
        if not parent_alive():
            return "close"
        time.sleep(POLL_S)
    return store.get(key).decode()


__all__ = ["WorkerGroup", "die_with_parent", "next_command", "worker_store", "READY", "ERROR", "COMMAND"]
