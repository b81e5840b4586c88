"""Saving LoRA files during training (Musubi naming + retention) and the full resumable training state.

LoRA files: per step `NAME-step00000500.safetensors`, per epoch `NAME-000001.safetensors`,
final `NAME.safetensors`, written with `engine.lora.writer.save_lora`. State folders: `NAME-step00000500-state`,
`NAME-000001-state`, `NAME-state` (latest / on cancel / on train end), each holding one `training_state.pt`
written atomically and read with `torch.load(weights_only=True)` — only tensors, dicts, lists, numbers, strings.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch

from ..atomic import torch_save_atomic, write_json_atomic
from ..errors import invalid

STATE_FILE = "training_state.pt"
STATE_VERSION = 1


def lora_path(folder: Path, name: str, step: int | None = None, epoch: int | None = None) -> Path:
    if step is not None:
        return folder / f"{name}-step{step:08d}.safetensors"
    if epoch is not None:
        return folder / f"{name}-{epoch:06d}.safetensors"
    return folder / f"{name}.safetensors"


def state_dir(folder: Path, name: str, step: int | None = None, epoch: int | None = None) -> Path:
    if step is not None:
        return folder / f"{name}-step{step:08d}-state"
    if epoch is not None:
        return folder / f"{name}-{epoch:06d}-state"
    return folder / f"{name}-state"


def prune(folder: Path, name: str, kind: str, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` periodic saves of one kind: "step"/"epoch" LoRA files or
    "step-state"/"epoch-state" folders. Returns what was removed. Ordering is by the number in the name."""
    if not keep:
        return []
    esc = re.escape(name)
    patterns = {
        "step": rf"^{esc}-step(\d{{8}})\.safetensors$",
        "epoch": rf"^{esc}-(\d{{6}})\.safetensors$",
        "step-state": rf"^{esc}-step(\d{{8}})-state$",
        "epoch-state": rf"^{esc}-(\d{{6}})-state$",
    }
    rx = re.compile(patterns[kind])
    found = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := rx.match(p.name))), key=lambda x: x[0])
    removed = []
    for _, p in found[:-keep]:
        if p.is_dir():
            for child in p.iterdir():
                child.unlink()
            p.rmdir()
        else:
            p.unlink()
        removed.append(p)
    return removed


# --- RNG -----------------------------------------------------------------------------------------------------

def capture_rng(generator: torch.Generator) -> dict:
    """Session generator + torch CPU/CUDA global RNGs + Python `random` + numpy (as tensors/lists only)."""
    state = {"session": generator.get_state().clone(), "torch_cpu": torch.get_rng_state().clone(),
             "python": _py_state_to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["session"])
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(_py_state_from_plain(state["python"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


def _py_state_to_plain(st) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_state_from_plain(st) -> tuple:
    version, internal, gauss = st
    return (int(version), tuple(int(v) for v in internal), gauss)


# --- state file ----------------------------------------------------------------------------------------------

RUN_FILE = "run.json"   # {"session_id", "step"} of the state beside it: read without loading the state


def write_state(folder: Path, state: dict) -> Path:
    """Atomically write `state` (plain tensors/containers) to `folder/training_state.pt` (+ its `run.json`)."""
    state = dict(state, version=STATE_VERSION)
    target = Path(folder) / STATE_FILE
    torch_save_atomic(state, target)
    write_json_atomic(Path(folder) / RUN_FILE, {"session_id": state.get("session_id"), "step": int(state["step"])})
    return target


def state_run(folder: Path) -> dict | None:
    """{"session_id", "step"} of the state in `folder`, or None when there is none (or an unreadable one)."""
    try:
        with open(Path(folder) / RUN_FILE, encoding="utf-8") as f:
            run = json.load(f)
        if isinstance(run, dict) and isinstance(run.get("step"), int):
            return run
    except (OSError, ValueError):
        pass
    # no sidecar: a kill between the state's write and its run.json's. The state itself says (a rare, slow path:
    # without it a continuing run would not see this state, start from step 0 and overwrite it)
    if not (Path(folder) / STATE_FILE).is_file():
        return None
    try:
        state = read_state(folder)
        return {"session_id": state.get("session_id"), "step": int(state["step"])}
    except Exception:  # noqa: BLE001 - an unreadable state is no state
        return None


def read_state(path: str | Path) -> dict:
    """Read a state folder (or the .pt inside it) with weights_only=True."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise invalid("resume state", str(path), f"a state folder containing {STATE_FILE}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise invalid("resume state", str(file), f"a readable training state ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise invalid("resume state", str(file), f"a training state of version {STATE_VERSION}")
    return state
