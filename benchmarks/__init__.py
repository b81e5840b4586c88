"""Benchmark and simulation scripts (run them as files; importable as `benchmarks.*` with the repo root on sys.path)."""
