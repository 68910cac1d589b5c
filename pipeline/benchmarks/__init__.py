"""Benchmarks: one module per stage, `run(cfg, **options) -> dict` (see jobs/benchmark.py)."""
