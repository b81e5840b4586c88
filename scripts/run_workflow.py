"""Run UI-format workflow files through a real ComfyUI in this process (no server, no browser) and print where the
outputs went. Used by the README's main job; also handy to run any workflow headless:

    python scripts/run_workflow.py workflows/wan_t2v_generate.json --output out/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflows", nargs="+", type=Path)
    ap.add_argument("--output", type=Path, default=REPO / "out")
    args = ap.parse_args()
    out = args.output.resolve()
    out.mkdir(parents=True, exist_ok=True)

    import comfy_harness

    comfy_harness.boot(output_dir=out)
    runner = comfy_harness.InProcessComfy()
    for path in args.workflows:
        t0 = time.perf_counter()
        result = runner.run_workflow(json.loads(path.read_text()))
        print(f"\n{path.name}: finished in {time.perf_counter() - t0:.1f} s")
        for node_id, ui in result["outputs"].items():
            for item in ui.get("images", []):
                if item.get("type") == "output":
                    print(f"  node {node_id}: {out / item.get('subfolder', '') / item['filename']}")
            for text in ui.get("text", []):
                print(f"  node {node_id}: {text}")
    print(f"\nAll outputs are in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
