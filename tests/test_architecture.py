"""The layering docs/ARCHITECTURE.md describes: generic engine code names no model family and imports none; every
family is reached through the registry."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERIC = ["engine/training", "engine/data", "engine/lora", "engine/memory", "engine/sampling", "engine/atomic.py",
           "engine/attention.py", "engine/checkpoint.py", "engine/errors.py", "engine/video_io.py", "engine/handle.py",
           "engine/tiling.py", "engine/families/family.py"]   # engine/families/__init__.py: the registry, one line per built-in family
FAMILY_WORD = re.compile(r"(?i:(^|[^a-z0-9])(wan|hunyuan|hunyuanvideo|framepack)([^a-z0-9]|$))|WAN_|Wan[A-Z]")


def _generic_files():
    for entry in GENERIC:
        path = REPO / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_generic_engine_code_names_no_family():
    hits = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in _generic_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if FAMILY_WORD.search(line)]
    assert not hits, "generic modules must ask the family (engine.families), not name it:\n" + "\n".join(hits)


def _family_imports(paths) -> list[str]:
    families = {p.name for p in (REPO / "engine" / "families").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert "wan" in families
    hits = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if "families" in parts and parts[parts.index("families") + 1:][:1] and \
                        parts[parts.index("families") + 1] in families:
                    hits.append(f"{p.relative_to(REPO)}: from {node.module}")
    return hits


def test_generic_engine_code_imports_no_family_folder():
    hits = _family_imports(_generic_files())
    assert not hits, hits


def test_generic_nodes_import_no_family_folder():
    """Only a family's node file (nodes/<family>.py) reaches into its family folder; the data, training, LoRA,
    video and utility nodes go through the registry and the model handles."""
    families = {p.name for p in (REPO / "engine" / "families").iterdir() if p.is_dir() and p.name != "__pycache__"}
    generic = [p for p in sorted((REPO / "nodes").glob("*.py")) if p.stem not in families]
    assert len(generic) > 5 and not _family_imports(generic), _family_imports(generic)


# a family built on another one's models says so here (FramePack reuses HunyuanVideo's VAE)
FAMILY_DEPENDENCIES = {"framepack": {"hunyuan"}}


def test_a_family_folder_imports_no_other_family():
    """Shared building blocks live in generic modules (engine/tiling.py, engine/encoders/), not in one family's
    folder that another reaches into."""
    root = REPO / "engine" / "families"
    families = {p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__"}
    hits = []
    for family in sorted(families):
        for p in sorted((root / family).rglob("*.py")):
            for node in ast.walk(ast.parse(p.read_text())):
                if not isinstance(node, ast.ImportFrom) or not node.module:
                    continue
                parts = node.module.split(".")
                # `from ..other.x import` (level 2 from engine/families/<family>/) or `...families.other.x`
                other = parts[0] if node.level == 2 else (parts[parts.index("families") + 1]
                                                          if "families" in parts[:-1] else None)
                if other in families and other != family and other not in FAMILY_DEPENDENCIES.get(family, ()):
                    hits.append(f"{p.relative_to(REPO)}: from {'.' * node.level}{node.module}")
    assert not hits, hits


def test_the_check_sees_a_family_name():   # the guard itself works on a line that names a family
    assert FAMILY_WORD.search("x = WanModel()") and FAMILY_WORD.search("# the Wan 2.1 default")
    assert not FAMILY_WORD.search("swapped blocks, the one wanted")
