"""Every benchmark runs at its small CPU shape and reports its numbers as JSON (no timing is asserted: speed is
measured by the benchmarks, never by tests; this keeps them runnable so regressions show in their output)."""

import json
import subprocess
import sys

import pytest

from comfy_harness import REPO_ROOT

BENCHES = {
    "bench_wan_dit.py": ["--model", "tiny", "--device", "cpu", "--steps", "2"],
    "bench_hunyuan_dit.py": ["--model", "tiny", "--device", "cpu", "--steps", "1"],
    "bench_wan_vae.py": ["--device", "cpu"],
    "bench_training.py": ["--model", "tiny", "--device", "cpu"],
    "bench_dataset.py": ["--videos", "2", "--frames", "9", "--size", "64x48"],
    "bench_memory.py": ["--device", "cpu", "--model", "tiny"],
    "bench_framepack.py": ["--model", "tiny", "--device", "cpu", "--steps", "6", "--window", "2", "--dtype", "fp32"],
    "bench_memory.py hunyuan": ["--device", "cpu", "--model", "tiny", "--family", "hunyuan", "--fp8", "scaled",
                                "--swap", "0,max", "--steps", "1"],
    "bench_memory.py wan22": ["--device", "cpu", "--model", "tiny-i2v,tiny-ti2v", "--family", "wan22", "--fp8",
                              "none", "--swap", "0,max", "--steps", "1", "--latent", "3,8,8"],
    "bench_multi_gpu.py": ["--tiny"],
}
KEYS = {"bench_wan_dit.py": "s_per_step", "bench_hunyuan_dit.py": "s_per_train_step", "bench_wan_vae.py": "decode_s", "bench_training.py": "s_per_step",
        "bench_dataset.py": "clips_per_s", "bench_memory.py": "s_per_step",
        "bench_framepack.py": "s_per_section", "bench_multi_gpu.py": "steps_per_s"}   # by script


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_benchmark_runs_on_cpu_and_reports_json(name):
    script = name.split()[0]
    r = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *BENCHES[name]],
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
    if script == "bench_multi_gpu.py":   # 1 and 2 gloo ranks, DDP and FSDP2 (each rank holds half the base)
        assert [(row["world_size"], row["shard_base"]) for row in rows] == [(1, "none"), (2, "none"), (2, "fsdp2")]
        assert rows[0]["scaling_efficiency"] == 1.0 and rows[2]["scaling_efficiency"] > 0, rows
        assert 0.45 < rows[2]["base_gib_per_rank"] / rows[2]["base_gib"] < 0.6, rows
    if script == "bench_framepack.py":   # MagCache at its defaults skips some of the 6 block passes, changes little
        assert 1 <= rows[0]["magcache_block_passes"] < 6 and 0 < rows[0]["magcache_relative_difference"] < 1, rows
    if script == "bench_hunyuan_dit.py":   # the sampling forward is timed too, and the FLOPs add up
        assert rows[0]["s_per_forward"] > 0 and rows[0]["tokens"] == 2 * 4 * 4, rows
        assert rows[0]["tflop_per_train_step"] == pytest.approx(3 * rows[0]["gflop_per_forward"] / 1e3), rows


def _load_bench(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("guidance", [True, False])
def test_hunyuan_benchmark_flop_count_matches_torch_for_every_linear_and_conv(guidance):
    """bench_hunyuan_dit's analytic FLOPs minus attention (FlopCounterMode does not see CPU SDPA) equal what torch
    counts for every Linear/Conv3d of a real tiny forward, with and without the guidance embedder."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    bench = _load_bench("bench_hunyuan_dit")
    model = bench.build_random_model(bench.MODELS["tiny"], torch.device("cpu"), torch.float32, "sdpa", "none")
    cfg = model.config
    x = torch.randn(1, 16, 3, 8, 12)
    text = torch.randn(1, bench.TEXT_TOKENS, cfg.text_dim)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, torch.tensor([500.0]), text, None, torch.randn(1, cfg.text_pool_dim),
              guidance=torch.tensor([6000.0]) if guidance else None)
    flops = bench.forward_flops(cfg, tokens=3 * 4 * 6, guidance=guidance)
    assert counter.get_total_flops() == flops["total"] - flops["attention"]
    n = 3 * 4 * 6 + bench.TEXT_TOKENS
    assert flops["attention"] == 4 * (4 * n**2 * 64) + 2 * 4 * bench.TEXT_TOKENS**2 * 64
