"""Benchmarks: one module per stage, `run(cfg, **options) -> dict` (see jobs/benchmark.py)."""


def headline(out: dict, keys: tuple[str, ...]) -> dict:
    """Print ``out``'s headline numbers (``key: value`` a line, for the console) and return it."""
    for k in keys:
        print(f"{k}: {out[k]}")
    return out
