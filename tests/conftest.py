"""Test bootstrap.

* The engine is importable standalone as `engine` (the repo root is appended to sys.path, *after* ComfyUI's folder,
  so ComfyUI's own top-level `nodes`/`utils` always win). Engine tests never need ComfyUI.
* Tests that need ComfyUI use the fixtures from `comfy_harness.py` (in-process executor, server, browser); ComfyUI is
  booted lazily the first time such a fixture is requested.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

pytest_plugins = ["comfy_harness"]
