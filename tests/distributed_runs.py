"""Launching the headless trainer the way torchrun does (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT), one process per rank, output in files; used by the distributed engine and node tests."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.training import read_state

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
RUN_TIMEOUT = 120          # seconds any launched run may take (a hang fails the test instead of blocking it)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """`python -m engine.train CONFIG` once per rank, torchrun's environment, output in files."""

    def __init__(self, config: Path, world: int):
        self.config, self.world, self.procs, self.logs = config, world, [], []
        port = free_port()
        for rank in range(world):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RANK=str(rank),
                       WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            if world == 1:
                for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                    env.pop(key)
            out, err = config.parent / f"rank{rank}.out", config.parent / f"rank{rank}.err"
            self.logs.append((out, err))
            self.procs.append(subprocess.Popen([PY, "-m", "engine.train", str(config)], cwd=REPO, env=env,
                                               stdout=out.open("w"), stderr=err.open("w")))

    def out(self, rank: int) -> str:
        return self.logs[rank][0].read_text()

    def err(self, rank: int) -> str:
        return self.logs[rank][1].read_text()

    def wait_for(self, rank: int, text: str, timeout: float = RUN_TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while text not in self.out(rank):
            if self.procs[rank].poll() is not None or time.monotonic() > end:
                self.kill()
                pytest.fail(f"rank {rank} never printed {text!r}:\n{self.out(rank)}\n{self.err(rank)}")
            time.sleep(0.05)

    def wait(self, timeout: float = RUN_TIMEOUT) -> list[int]:
        end = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(max(0.1, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"ranks still running after {timeout} s:\n" +
                            "\n".join(self.out(r) + self.err(r) for r in range(self.world)))
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def assert_gone(self) -> None:
        """No rank process left (not even a zombie: each was waited for)."""
        for p in self.procs:
            assert p.poll() is not None
            assert not Path(f"/proc/{p.pid}").exists() or _state(p.pid) not in ("R", "S", "D"), p.pid


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"


def train(config: Path, world: int) -> Ranks:
    ranks = Ranks(config, world)
    try:
        codes = ranks.wait()
    finally:
        ranks.kill()
    assert codes == [0] * world, [ranks.err(r) for r in range(world)]
    ranks.assert_gone()
    return ranks


def history(folder: Path) -> list[float]:
    """The loss of every step, from the final state of a run whose output_dir is `folder`/out."""
    return read_state(folder / "out" / "lora-state")["history"]["losses"]
