"""`python -m jobs.benchmark audit [--config FILE] [-- --rows N --compare M --dim D ...]`

The audit stage at full CelebA size and at a tenth of it, side by side (issues 16 and 20).

Data: a manifest from the official full CelebA annotation files (``--annotations``, default
``../shared/real/celeba-full``: the 40 attributes, partition and identity of every id), laid out
as the scale benchmark does (hard links to the real JPEGs, so ingest runs as it does for a user),
and a *generated* ``features/`` table (no network runs): ``dim``-wide random embeddings (1280 by
default, the width of the scale config's attribute-backbone embedding), of which 1 % are planted
as near copies of another row (within the same 10,000-row chunk) and 0.1 % as byte-identical
twins (same ``content_hash``, same embedding). With ``--sources S`` the rows instead cycle over
``S`` files, as the scale benchmark's hard links do (every id a twin of ~n/S others).

Per size it runs ``python -m jobs.audit --force`` as its own process (so the benchmark's own
heap never counts) and records: the stage's seconds from run.json, peak PSS and anonymous PSS of
the driver and of the driver plus its Ray workers, and how many planted near pairs ended in one
near group. Then the ratios (big / small) against issue 16's goals (driver <= 1.5x, time <= 12x
for 10x the rows).

Recall (``--recall_rows``, default 20,000): the near-duplicate search's approximate index (IVF)
against the exact one on the same 128-d unit vectors with 1 % planted near copies: pairs within
the threshold, groups, and the nearest-neighbour distance percentiles; and at the full size
(one IVF index over all rows) the pairs within the threshold found for every planted row and
2,000 random others, against exact search of those query rows.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import Config

log = logging.getLogger(__name__)

# ../shared/real beside the checkout, or $FACEAUDIT_REAL_DATA (a worktree elsewhere)
_SHARED = Path(os.environ.get("FACEAUDIT_REAL_DATA")
               or Path(__file__).resolve().parents[2].parent / "shared" / "real")
CHUNK = 10_000  # features rows generated (and written) per part
DRIVER_GOAL, TIME_GOAL = 1.5, 12.0


# --------------------------------------------------------------------------- data

def _planted(rng: np.random.Generator, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(near sources, near copies, twins' sources, twins) as disjoint rows of a chunk of ``m``."""
    k_near, k_twin = max(1, m // 100), max(1, m // 1000)
    chosen = rng.choice(m, size=2 * k_near + 2 * k_twin, replace=False)
    return (chosen[:k_near], chosen[k_near:2 * k_near], chosen[2 * k_near:2 * k_near + k_twin],
            chosen[2 * k_near + k_twin:])


def write_features(cfg: Config, dim: int, sources: int, seed: int = 0) -> list[tuple[str, str]]:
    """A generated ``features/`` for every manifest row, written a chunk at a time (bounded
    memory); returns the planted near pairs as (image_id, image_id)."""
    from pipeline import storage, tables
    from pipeline.extract import features_schema
    from pipeline.schemas import manifest_attributes

    man = tables.read(cfg, "manifest", columns=["image_id"])
    attrs = manifest_attributes(storage.read_schema(tables.location(cfg, "manifest")))
    ids = np.asarray(man["image_id"].to_pylist(), dtype=object)
    schema = features_schema(attrs, dim)
    base = None
    if sources:
        base = np.random.default_rng([seed, 1]).normal(size=(sources, dim)).astype(np.float32)
    pairs: list[tuple[str, str]] = []
    for part, s in enumerate(range(0, len(ids), CHUNK)):
        chunk = ids[s:s + CHUNK]
        m = len(chunk)
        rng = np.random.default_rng([seed, 2, part])
        if sources:
            src = (np.arange(s, s + m) % sources)
            E = base[src]
            hashes = np.array([f"{x:032x}" for x in src], dtype=object)
        else:
            E = rng.normal(size=(m, dim)).astype(np.float32)
            hashes = np.array([f"{s + r:032x}" for r in range(m)], dtype=object)
            near_src, near_dst, twin_src, twin_dst = _planted(rng, m)
            E[near_dst] = E[near_src] + 0.01 * rng.normal(size=(len(near_src), dim))
            E[twin_dst], hashes[twin_dst] = E[twin_src], hashes[twin_src]
            pairs += list(zip(chunk[near_src].tolist(), chunk[near_dst].tolist()))
        cols = {"image_id": chunk.tolist(),
                **{f"p_{a}": rng.random(m, dtype=np.float32) for a in attrs},
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(E.ravel(), pa.float32()), dim),
                "content_hash": hashes.tolist()}
        tables.write(cfg, "features", pa.table(cols).cast(schema), schema=schema,
                     part=f"part-{part:05d}")
    return pairs


def _prepare(cfg: Config, n: int, work: Path, dim: int, sources: int, annotations: Path,
             images_from: Path) -> tuple[Config, Path, list[tuple[str, str]]]:
    from pipeline import ingest
    from pipeline.benchmarks.scale import layout_celeba
    from pipeline.config import dump_toml

    folder = layout_celeba(work / f"celeba-{n}", n, annotations, images_from)
    out = work / f"run-{n}"
    if out.exists():
        shutil.rmtree(out)
    scfg = cfg.model_copy(deep=True)
    scfg.data.root, scfg.data.dataset, scfg.data.limit = str(folder), "celeba", 0
    scfg.output.root = str(out)
    ingest.run(scfg)
    t = time.perf_counter()
    pairs = write_features(scfg, dim, sources, seed=scfg.run.seed)
    log.info("[bench audit] %d features rows generated in %.1f s", n, time.perf_counter() - t)
    config = work / f"run-{n}.toml"
    config.write_text(dump_toml(scfg))
    return scfg, config, pairs


def _run_stage(scfg: Config, config: Path, pairs: list[tuple[str, str]]) -> dict:
    import polars as pl

    from pipeline import runlog, tables
    from pipeline.benchmarks.memory import MemorySampler

    env = {**os.environ}
    env.setdefault("RAY_raylet_start_wait_time_s", "600")  # a busy machine registers slowly
    for attempt in range(3):  # Ray's start can time out under load: the stage never began
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "jobs.audit", "--config", str(config),
                                 "--force"], env=env)
        with MemorySampler(0.25, pid=proc.pid) as mem:
            rc = proc.wait()
        wall = time.perf_counter() - t0
        record = runlog.stage_record(scfg, "audit") or {}
        if rc == 0 or record:
            break
        log.warning("[bench audit] jobs.audit exited %d before the stage started (Ray's "
                    "start?); attempt %d of 3", rc, attempt + 1)
    if rc != 0:
        raise RuntimeError(f"[bench audit] jobs.audit failed (exit {rc}) on {scfg.output.root}; "
                           f"run.json says: {record.get('error')}")
    details = record.get("details") or {}
    near = pl.from_arrow(tables.read(scfg, "audit/duplicates")).filter(pl.col("kind") == "near")
    group = dict(zip(near["image_id"].to_list(), near["group"].to_list()))
    together = sum(1 for a, b in pairs if a in group and group.get(a) == group.get(b))
    summary = pl.from_arrow(tables.read(scfg, "audit/summary"))
    return {"seconds": round(float(record.get("seconds") or wall), 1),
            "process_seconds": round(wall, 1), **mem.mib(),
            "images": details.get("images"), "exact_groups": details.get("exact_groups"),
            "near_groups": details.get("near_groups"),
            "planted_near_pairs": len(pairs), "planted_pairs_grouped": together,
            "near_search": (tables.read(scfg, "audit/summary").schema.metadata or {}).get(
                b"faceaudit.audit_near_search", b"").decode(),
            "nearest_p01": _metric(summary, "nearest_distance_p01"),
            "nearest_p50": _metric(summary, "nearest_distance_p50"),
            "load_average": round(os.getloadavg()[0], 1)}


def _metric(summary, name: str):
    import polars as pl

    v = summary.filter(pl.col("metric") == name)["value"]
    return round(float(v[0]), 4) if len(v) else None


# --------------------------------------------------------------------------- recall

def _unit_rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    from pipeline.audit import normalise

    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n, dim)).astype(np.float32)
    near_src, near_dst, _, _ = _planted(rng, n)
    E[near_dst] = E[near_src] + 0.01 * rng.normal(size=(len(near_src), dim))
    return normalise(E), {(min(a, b), max(a, b)) for a, b in zip(near_src.tolist(),
                                                                 near_dst.tolist())}


def recall(cfg: Config, rows: int, dim: int = 128, full_rows: int = 0) -> dict:
    """The approximate search (IVF) against the exact one on ``rows`` unit vectors (all pairs
    and groups), and at ``full_rows`` (when given) on 2,000 query rows' neighbour lists."""
    from pipeline import audit

    a = cfg.audit
    E, planted = _unit_rows(rows, dim, seed=1)
    out: dict = {"rows": rows, "dim": dim, "method": audit.search_method(rows, 0)}
    res = {}
    for name, exact_max in (("exact", rows), ("approximate", 0)):
        t = time.perf_counter()
        res[name] = audit.near_pairs(E, k=a.near_neighbours, threshold=a.near_threshold,
                                     block_rows=a.block_rows, exact_max_rows=exact_max, seed=0)
        out[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
    (ei, ej, ed, en), (ai, aj, ad, an) = res["exact"], res["approximate"]
    exact_pairs, approx_pairs = set(zip(ei.tolist(), ej.tolist())), set(zip(ai.tolist(),
                                                                            aj.tolist()))
    none = np.full(rows, -1)
    ge, ga = (audit.near_groups(rows, ei, ej, ed, none), audit.near_groups(rows, ai, aj, ad, none))
    out.update({
        "pairs_exact": len(exact_pairs), "pairs_approximate": len(approx_pairs),
        "pair_recall": round(len(exact_pairs & approx_pairs) / max(1, len(exact_pairs)), 5),
        "planted": len(planted), "planted_found_exact": len(planted & exact_pairs),
        "planted_found_approximate": len(planted & approx_pairs),
        "same_groups": bool(np.array_equal(ge, ga)),
        "nearest_p01": [round(float(np.nanquantile(x, 0.01)), 4) for x in (en, an)],
        "nearest_p50": [round(float(np.nanmedian(x)), 4) for x in (en, an)],
        "nearest_equal_share": round(float(np.mean(np.isclose(en, an, atol=1e-6))), 4)})
    if full_rows:  # queries: every planted row and 2,000 others; exact search of just those
        F, full_planted = _unit_rows(full_rows, dim, seed=2)
        others = np.random.default_rng(3).choice(full_rows, 2000, replace=False)
        q = np.unique(np.concatenate([np.array(sorted(full_planted)).ravel(), others]))
        t = time.perf_counter()
        index = audit.build_index(F, exact_max_rows=0, seed=0)
        ai, ad = audit.neighbour_block(index, F[q], a.near_neighbours)
        out["full_ivf_build_and_query_seconds"] = round(time.perf_counter() - t, 1)
        del index
        ei, ed = audit.neighbour_block(audit.build_index(F, exact_max_rows=full_rows), F[q],
                                       a.near_neighbours)

        def within(idx, dist):
            return {(int(x), int(y)) for x, row, drow in zip(q, idx, dist)
                    for y, dd in zip(row, drow) if y != x and dd <= a.near_threshold}
        ew, aw = within(ei, ed), within(ai, ad)
        rnd = np.isin(q, others)

        def nearest(idx, dist):
            return np.where(idx == q[:, None], np.inf, dist).min(1)
        out.update({"full_rows": full_rows, "full_method": audit.search_method(full_rows, 0),
                    "full_queries": len(q), "full_pairs_within_exact": len(ew),
                    "full_pair_recall": round(len(ew & aw) / max(1, len(ew)), 5),
                    "full_nearest_equal_share_random": round(float(np.mean(np.isclose(
                        nearest(ei, ed)[rnd], nearest(ai, ad)[rnd], atol=1e-6))), 4)})
    return out


# --------------------------------------------------------------------------- entry

def run(cfg: Config, rows: int = 202_599, compare: int = 20_000, dim: int = 1280,
        sources: int = 0, workdir: str = "", annotations: str = "", images_from: str = "",
        recall_rows: int = 20_000, keep: bool = False) -> dict:
    annotations_dir = Path(annotations) if annotations else _SHARED / "celeba-full"
    images_dir = Path(images_from) if images_from else _SHARED / "celeba" / "img_align_celeba"
    work = Path(workdir) if workdir else Path(tempfile.gettempdir()) / "faceaudit-audit-bench"
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted({int(compare), int(rows)} - {0})
    per_size = {}
    for n in sizes:
        scfg, config, pairs = _prepare(cfg, n, work, dim, sources, annotations_dir, images_dir)
        per_size[n] = _run_stage(scfg, config, pairs)
        log.info("[bench audit] %d rows: %s", n, per_size[n])
        if not keep:
            shutil.rmtree(scfg.output.root, ignore_errors=True)
    out = {"dim": dim, "sources": sources, "per_size": {str(n): r for n, r in per_size.items()}}
    if len(sizes) == 2:
        small, big = per_size[sizes[0]], per_size[sizes[1]]
        t_ratio = big["seconds"] / max(small["seconds"], 1e-9)
        out["comparison"] = {
            "time_ratio": round(t_ratio, 2),
            "driver_pss_ratio": round(big["driver_pss_mib"] / small["driver_pss_mib"], 2),
            "driver_anon_ratio": round(big["driver_anon_mib"] / small["driver_anon_mib"], 2),
            "time_ok": t_ratio <= TIME_GOAL * (sizes[1] / sizes[0]) / 10,
            "driver_ok": big["driver_anon_mib"] / small["driver_anon_mib"] <= DRIVER_GOAL}
    if recall_rows:
        out["recall"] = recall(cfg, recall_rows, full_rows=max(sizes) if sizes else 0)
    print(json.dumps(out.get("comparison", {}), indent=1))
    return out
