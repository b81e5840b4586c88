"""Atomic file writes: a temporary file in the target folder, fsync, then rename over the target.

An interrupted run (cancel, crash, power loss) leaves either the old file or the new one, never half a file.
The file gets the mode a plain `open(path, "w")` would give (0644 under umask 022, like ComfyUI's own outputs), not
mkstemp's private 0600; the folder is fsynced after the rename so the new name itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import invalid


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it replaces `target`, on error it is removed."""
    target = Path(target)
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise invalid("output path", str(target), f"a writable folder ({e})") from e
    if not os.access(folder, os.W_OK):
        raise invalid("output path", str(target), "a path in a writable folder")
    sweep_stale_tmp(folder)
    # the pid in the name tells a later run whether the writer is gone (crash, kill -9) or still writing
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # after the body: writers such as safetensors' save_file may recreate the file (0600 again)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        _fsync_folder(folder)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# `.<name>.<pid>.<8 random>.tmp` (older versions: no pid); only names of the files this pack writes
_TMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp$")
_OUR_SUFFIXES = (".safetensors", ".sft", ".pt", ".json", ".mp4")
_SWEPT: set[str] = set()


def sweep_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary files a crashed or killed save left in `folder` (once per folder and process).

    A file is stale when its writer process is gone; files of a live writer, of this process, and files that are
    not ours are left alone. Returns what was removed."""
    folder = Path(folder)
    key = os.path.realpath(folder)
    if key in _SWEPT:
        return []
    _SWEPT.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        m = _TMP_RE.match(e.name)
        if not m or not m["name"].endswith(_OUR_SUFFIXES) or not e.is_file(follow_symlinks=False):
            continue
        pid = int(m["pid"]) if m["pid"] else None
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        try:
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        import psutil  # ComfyUI's own dependency; works on Windows, where os.kill(pid, 0) would kill the process

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True   # exists (another user's process) or unknown: keep the file
    return True

def current_umask() -> int:
    """The process umask. Linux shows it in /proc (no race); elsewhere set-and-restore is the only way to read it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync_folder(folder: Path) -> None:
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals the rename itself
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike, obj) -> None:
    write_bytes_atomic(target, json.dumps(obj, indent=1, sort_keys=True).encode())


def save_safetensors_atomic(tensors: dict, target: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file through a temporary file. Tensors are made contiguous (safetensors requires it)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def torch_save_atomic(obj, target: str | os.PathLike) -> None:
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def save_weights_atomic(tensors: dict, target: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """A state dict as safetensors, or as a torch pickle when the name ends in .pt / .pth (official releases' form)."""
    if str(target).endswith((".pt", ".pth")):
        torch_save_atomic(tensors, target)
    else:
        save_safetensors_atomic(tensors, target, metadata)
