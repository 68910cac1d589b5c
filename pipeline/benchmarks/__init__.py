"""Benchmarks: one module per stage, `run(cfg, **options) -> dict` (see jobs/benchmark.py)."""


def headline(out: dict, keys: tuple[str, ...]) -> dict:
    """Print ``out``'s headline numbers (``key: value`` a line, for the console) and return it."""
    for k in keys:
        print(f"{k}: {out[k]}")
    return out


def wait_until_quiet(busy_below: float = 0.15, window_s: float = 2.0, max_s: float = 30.0
                     ) -> float:
    """Block until the machine's CPUs were busy less than ``busy_below`` (a fraction) over a
    ``window_s`` window, at most ``max_s`` seconds; returns the seconds waited. A baseline timed
    while Ray is still starting its own processes (dashboard agent, prestarted workers) reads
    10-20 % low. Linux only (/proc/stat); elsewhere it returns at once."""
    import time

    def ticks() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0)  # total, idle + iowait

    t0 = time.perf_counter()
    last = ticks()
    while last is not None and time.perf_counter() - t0 < max_s:
        time.sleep(window_s)
        now = ticks()
        if now is None:
            break
        total, idle = now[0] - last[0], now[1] - last[1]
        if total > 0 and 1 - idle / total < busy_below:
            break
        last = now
    return round(time.perf_counter() - t0, 1)
