"""Every benchmark runs at its small CPU shape and reports its numbers as JSON (no timing is asserted: speed is
measured by the benchmarks, never by tests; this keeps them runnable so regressions show in their output)."""

import json
import subprocess
import sys

import pytest

from comfy_harness import REPO_ROOT

BENCHES = {
    "bench_wan_dit.py": ["--model", "tiny", "--device", "cpu", "--steps", "2"],
    "bench_wan_vae.py": ["--device", "cpu"],
    "bench_training.py": ["--model", "tiny", "--device", "cpu"],
    "bench_dataset.py": ["--videos", "2", "--frames", "9", "--size", "64x48"],
    "bench_memory.py": ["--device", "cpu", "--model", "tiny"],
}
KEYS = {"bench_wan_dit.py": "s_per_step", "bench_wan_vae.py": "decode_s", "bench_training.py": "s_per_step",
        "bench_dataset.py": "clips_per_s", "bench_memory.py": "s_per_step"}


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_benchmark_runs_on_cpu_and_reports_json(script):
    r = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *BENCHES[script]],
                       capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line.split("JSON ", 1)[-1]) for line in r.stdout.splitlines()
            if line.startswith("{") or line.startswith("JSON {")]
    assert rows, r.stdout[-2000:]
    values = [row[KEYS[script]] for row in rows if KEYS[script] in row]
    assert values and all(v is not None and v > 0 for v in values), rows
    if script == "bench_memory.py":   # the default grid has both tasks, with and without swap
        assert {(row["task"], row["blocks_to_swap"] > 0) for row in rows} == \
            {("train", False), ("train", True), ("infer", False), ("infer", True)}, rows
