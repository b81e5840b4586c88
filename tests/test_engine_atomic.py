"""Atomic writes: files are readable like ComfyUI's own outputs, and the rename is made durable."""

import os
import stat

import pytest
import torch

from engine import atomic


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one (it is process-wide)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


WRITERS = {
    "bytes": lambda p: atomic.write_bytes_atomic(p, b"x"),
    "json": lambda p: atomic.write_json_atomic(p, {"a": 1}),
    "safetensors": lambda p: atomic.save_safetensors_atomic({"w": torch.zeros(2)}, p, {"k": "v"}),
    "torch": lambda p: atomic.torch_save_atomic({"w": torch.zeros(2)}, p),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_saved_files_get_their_mode_from_the_umask(tmp_path, umask, writer, mask):
    umask(mask)
    target = tmp_path / f"out.{writer}"
    WRITERS[writer](target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary left behind


def test_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert atomic.current_umask() == 0o027
    assert os.umask(0o027) == 0o027


def test_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", None))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_bytes_atomic(tmp_path / "f.bin", b"data")
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
