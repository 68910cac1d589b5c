"""`python -m jobs.benchmark extract_commit [-- --images 400 --rows-per-file 40 --delay 0.5]`

Is extract's commit off the stream's critical path? The same extract run twice on the same
synthetic images: once with the real writer, once with every shard's commit made slower by
``delay`` seconds (a sleep before the write, as a slow S3 would). With the commit inline the
slow run would take about ``shards x delay`` longer; with the background writer only the last
shard's delay (plus queue stalls, reported) should remain. Goal: slow within 10 % of fast.
Besides both wall times it reports what the stream itself waited for the writer (queue stalls +
the final drain), whose difference between the two runs does not depend on the machine's load.

Outputs go to a temporary root; the attribute model is random-init (what is measured is the
stream, not the model).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def run(cfg, images: int = 400, rows_per_file: int = 40, delay: float = 0.5,
        keep: bool = False) -> dict:
    from pipeline import extract, ingest
    from pipeline.benchmarks.extract import place_attribute_model
    from pipeline.ray_runtime import ensure_ray
    from pipeline.sample import make_sample

    tmp = Path(tempfile.mkdtemp(prefix="faceaudit-bench-commit-"))
    bcfg = cfg.model_copy(deep=True)
    bcfg.output.root = str(tmp / "run")
    bcfg.extract.rows_per_file = int(rows_per_file)
    try:
        make_sample(str(tmp / "data"), int(images), cfg.run.seed,
                    workers=max(1, min(4, os.cpu_count() or 1)))
        bcfg.data.root, bcfg.data.dataset, bcfg.data.limit = str(tmp / "data"), "celeba", 0
        ingest.run(bcfg)
        place_attribute_model(cfg, bcfg, random_init=True)
        ensure_ray(bcfg)

        real = extract.commit_shard

        def slow_commit(*args, **kwargs):
            time.sleep(float(delay))
            return real(*args, **kwargs)

        out = {"images": int(images), "rows_per_file": int(rows_per_file),
               "delay_s_per_shard": float(delay)}
        for name, commit in (("fast", real), ("slow", slow_commit)):
            extract.commit_shard = commit
            try:
                t0 = time.perf_counter()
                res = extract.run(bcfg)  # the second run starts clean (the first completed)
                wall = time.perf_counter() - t0
            finally:
                extract.commit_shard = real
            out[f"{name}_wall_s"] = round(wall, 2)
            out[f"{name}_images_per_s"] = round(int(images) / wall, 1)
            # what the stream itself waited for the writer: a full queue, then the last shards
            out[f"{name}_writer_wait_s"] = round(res.get("commit_stall_s", 0.0)
                                                 + res.get("commit_drain_s", 0.0), 2)
            out["shards"] = res["shards"]
        out["slow_over_fast"] = round(out["slow_wall_s"] / out["fast_wall_s"], 3)
        out["inline_commit_estimate_s"] = round(out["fast_wall_s"] + out["shards"] * delay, 2)
        # load-independent form of the goal: the extra wait the slow writer caused the stream,
        # over the fast run's wall time (wall times on a shared machine vary more than 10 %)
        out["extra_wait_over_fast_wall"] = round(
            (out["slow_writer_wait_s"] - out["fast_writer_wait_s"]) / out["fast_wall_s"], 3)
        print(f"extract commit: fast {out['fast_images_per_s']} img/s, slow writer (+{delay} s "
              f"per shard x {out['shards']}) {out['slow_images_per_s']} img/s: slow/fast wall "
              f"{out['slow_over_fast']} (inline commits would take ~"
              f"{out['inline_commit_estimate_s']} s); the stream waited for the writer "
              f"{out['fast_writer_wait_s']} s (fast) vs {out['slow_writer_wait_s']} s (slow)")
        return out
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
