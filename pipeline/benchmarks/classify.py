"""Benchmark of the classify stage: the same grid of fits and evaluations run sequentially in
one process (the baseline) and as Ray tasks, on the same machine and the same inputs.

``python -m jobs.benchmark classify --config jobs/configs/demo.toml [-- --rows N]``

Inputs: the run's own ``manifest/``, ``features/`` and ``clusters/primary`` under
``output.root`` when they exist (e.g. after ``make demo``); otherwise, or with ``--rows N``, a
synthetic set of N rows (CelebA-like attributes, 4 clusters) written to a temporary root. Model
files go to temporary folders that are removed afterwards; no table of the run is touched.

Ray is measured twice: ``ray_cold_s`` includes starting the worker processes (and their
imports), ``ray_s`` is the second, warm pass — the number to compare with the baseline. Both
passes must produce exactly the baseline's metric rows (``same_results``).
"""

from __future__ import annotations

import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa

from pipeline import tables
from pipeline.classify import execute, load_inputs, plan
from pipeline.config import CELEBA_ATTRIBUTES, Config
from pipeline.ray_runtime import cluster_cpus, ensure_ray
from pipeline.schemas import LANDMARKS, manifest_schema
from pipeline.seeds import rng as seeded_rng


def write_synthetic_inputs(cfg: Config, n: int) -> None:
    """Manifest, features and clusters/primary for ``n`` synthetic rows under ``output.root``."""
    r = seeded_rng(cfg.run.seed, "benchmark", "classify", "inputs")
    A = {a: r.random(n) < 0.35 for a in CELEBA_ATTRIBUTES}
    logit = 1.5 * A["Heavy_Makeup"] + 1.0 * A["Young"] - 1.2 * A["Male"] + r.normal(0, 1, n)
    A["Attractive"] = logit > 0.3
    ids = [f"{i:06d}.jpg" for i in range(n)]
    split = np.array(["train", "train", "train", "train", "train", "train", "train", "train",
                      "val", "test"])[np.arange(n) % 10]
    schema = manifest_schema()
    cols = {"image_id": ids, "uri": ids, "split": split, "identity": pa.nulls(n, pa.int32()),
            "dataset": ["celeba"] * n, **A, **{c: pa.nulls(n, pa.int32()) for c in LANDMARKS},
            "age": pa.nulls(n, pa.int16()), "gender": pa.nulls(n, pa.string()),
            "race": pa.nulls(n, pa.string()), "person": pa.nulls(n, pa.string())}
    tables.replace(cfg, "manifest", pa.table({f.name: cols[f.name] for f in schema}).cast(schema),
                   schema=schema)
    feats = {"image_id": ids}
    for a in CELEBA_ATTRIBUTES:
        feats[f"p_{a}"] = np.clip(0.15 + 0.7 * A[a] + r.normal(0, 0.15, n), 0, 1).astype(np.float32)
    emb = r.normal(size=(n, 16)).astype(np.float32)
    feats["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 16)
    tables.replace(cfg, "features", pa.table(feats))
    cluster = (2 * A["Male"] + A["Young"]).astype(np.int32)
    tables.replace(cfg, "clusters/primary", pa.table({"image_id": ids, "cluster": cluster}))


def _timed(cfg, inputs, specs, mode):
    out = tempfile.mkdtemp(prefix=f"classify-bench-{mode}-")
    try:
        t0 = time.perf_counter()
        results, rows, timing = execute(cfg, inputs, specs, out, mode=mode)
        return time.perf_counter() - t0, rows, timing, sum(r.status == "ok" for r in results)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run(cfg: Config, rows: int = 0) -> dict:
    tmp_root = None
    if rows or not tables.exists(cfg, "manifest"):
        tmp_root = tempfile.mkdtemp(prefix="classify-bench-inputs-")
        cfg = cfg.model_copy(deep=True)
        cfg.output.root = tmp_root
        write_synthetic_inputs(cfg, rows or 2000)
    try:
        inputs = load_inputs(cfg)
        specs, skipped = plan(cfg, inputs)
        ensure_ray(cfg)
        seq_s, seq_rows, seq_t, ok = _timed(cfg, inputs, specs, "sequential")
        cold_s, cold_rows, _, _ = _timed(cfg, inputs, specs, "ray")
        ray_s, ray_rows, ray_t, _ = _timed(cfg, inputs, specs, "ray")
    finally:
        if tmp_root:
            shutil.rmtree(tmp_root, ignore_errors=True)

    def key(rs):  # NaN-safe: an undefined value must be undefined in both
        return [(r["model"], r["sampling"], r["trained_on"], r["evaluated_on"], r["metric"],
                 round(r["value"], 12) if np.isfinite(r["value"]) else None) for r in rs]

    def same(a, b):
        return key(a) == key(b)

    return {
        "inputs": "synthetic" if tmp_root else cfg.output.root,
        "rows": int(len(inputs.y)), "features": len(inputs.feature_names),
        "fits": len(specs), "fits_ok": ok, "skipped_combinations": len(skipped),
        "bootstrap": cfg.classify.bootstrap, "ray_cpus": cluster_cpus(),
        "cpus_per_task": cfg.classify.cpus_per_task,
        "sequential_s": round(seq_s, 2), "sequential_phases_s": {k: round(v, 2) for k, v in seq_t.items()},
        "ray_cold_s": round(cold_s, 2), "ray_s": round(ray_s, 2),
        "ray_phases_s": {k: round(v, 2) for k, v in ray_t.items()},
        "speedup": round(seq_s / ray_s, 2) if ray_s else None,
        "same_results": same(seq_rows, cold_rows) and same(seq_rows, ray_rows),
    }
