"""The demo: procedural shape clips (`shapes`), a detector that scores a clip against its caption (`score`), and the
tiny trained demo models shipped in `demo_models/` (trained by `scripts/train_demo_models.py`; docs/demo.md)."""

from __future__ import annotations

from pathlib import Path

from ..errors import invalid

MODELS_DIR = Path(__file__).resolve().parents[2] / "demo_models"
PREFIX = "demo:"      # how loaders list a demo model: "demo:<file name>"


def _file(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def is_shipped(name: str) -> bool:
    """Is "demo:<file>" (or "<file>") a demo model file of this install?"""
    file = _file(name)
    return "/" not in file and "\\" not in file and (MODELS_DIR / file).is_file()


def is_demo_file(path: str | Path) -> bool:
    """Is `path` a file of the demo models folder (whose text encoders have their tokenizers next to them)?"""
    return Path(path).resolve().parent == MODELS_DIR.resolve()


def model_path(name: str) -> Path:
    """"demo:<file>" (or "<file>") -> the shipped file's path; refuses names that are not a shipped demo model."""
    if not is_shipped(name):
        shipped = sorted(p.name for p in MODELS_DIR.glob("*.safetensors"))
        raise invalid("demo model", name, f"one of the shipped demo models {shipped} in {MODELS_DIR}")
    return MODELS_DIR / _file(name)
