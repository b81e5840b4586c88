"""Test bootstrap.

* The engine is importable standalone as `engine` (the repo root is appended to sys.path, *after* ComfyUI's folder,
  so ComfyUI's own top-level `nodes`/`utils` always win). Engine tests never need ComfyUI.
* Tests that need ComfyUI use the fixtures from `comfy_harness.py` (in-process executor, server, browser); ComfyUI is
  booted lazily the first time such a fixture is requested.
"""

import os
import sys
from pathlib import Path

import pytest

# The pack refuses to write outside ComfyUI's folders (nodes/paths.py). Tests write into pytest's own tmp folders,
# so the documented escape hatch is on for the suite; the tests of the rule itself (test_nodes_paths.py) turn it off.
os.environ.setdefault("MUSUBI_ALLOW_ANY_PATH", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

pytest_plugins = ["comfy_harness"]


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI tree the harness uses (COMFYUI_DIR / MUSUBI_ENV, as set up by scripts/setup_env.sh), for tests that
    only read its files. A missing tree fails: a reference check that is skipped checks nothing."""
    from comfy_harness import COMFYUI_DIR

    assert (COMFYUI_DIR / "comfy").is_dir(), f"no ComfyUI tree at {COMFYUI_DIR}: set COMFYUI_DIR or MUSUBI_ENV"
    return COMFYUI_DIR
