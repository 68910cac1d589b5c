"""`python -m jobs.benchmark audit [--config FILE] [-- --rows N --dim D --sequential true]`

The near-duplicate search of the audit stage on generated data (no inputs needed): ``rows``
unit vectors of ``dim`` dimensions (CelebA-sized by default, 202,599 x 128) with 1 % of them
planted as near copies of another row. The stage's own search (:func:`pipeline.audit.near_pairs`
with ``audit.block_rows`` query rows per Ray task) against, with ``--sequential true``, the
same blocks one after the other in this process (the same function: equal pairs asserted).
Prints seconds, pairs found and how many planted pairs were recovered.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.audit import near_pairs
from pipeline.audit._duplicates import neighbour_block, normalise
from pipeline.config import Config


def run(cfg: Config, rows: int = 202_599, dim: int = 128, sequential: bool = False) -> dict:
    import ray

    from pipeline.ray_runtime import ensure_ray

    a = cfg.audit
    rng = np.random.default_rng(0)
    E = rng.normal(size=(rows, dim)).astype(np.float32)
    # disjoint sources and copies, so no copy is itself overwritten as another's source
    chosen = rng.choice(rows, size=2 * (rows // 200), replace=False)
    src, dst = chosen[: len(chosen) // 2], chosen[len(chosen) // 2:]
    E[dst] = E[src] + 0.01 * rng.normal(size=(len(src), dim)).astype(np.float32)
    E = normalise(E)
    planted = {(min(s, d), max(s, d)) for s, d in zip(src.tolist(), dst.tolist())}

    ensure_ray(cfg)
    task = ray.remote(num_cpus=a.cpus_per_task)(neighbour_block)
    t0 = time.time()
    ref = ray.put(E)

    def on_ray(blocks):
        return ray.get([task.remote(ref, s, t, a.near_neighbours) for s, t in blocks])
    i, j, d, _ = near_pairs(E, k=a.near_neighbours, threshold=a.near_threshold,
                            block_rows=a.block_rows, run_blocks=on_ray)
    ray_s = time.time() - t0
    found = set(zip(i.tolist(), j.tolist()))
    out = {"rows": rows, "dim": dim, "block_rows": a.block_rows, "k": a.near_neighbours,
           "threshold": a.near_threshold, "ray_seconds": round(ray_s, 1), "pairs": len(found),
           "planted": len(planted), "planted_found": len(planted & found),
           "load_average": os.getloadavg()[0]}
    if sequential:
        t0 = time.time()
        i2, j2, _, _ = near_pairs(E, k=a.near_neighbours, threshold=a.near_threshold,
                                  block_rows=a.block_rows)
        out["sequential_seconds"] = round(time.time() - t0, 1)
        out["same_pairs"] = set(zip(i2.tolist(), j2.tolist())) == found
    return out
