"""The classify stage's driver: plan the fits, run them (Ray tasks or in-process), evaluate,
write the tables. See the package docstring for what each output means."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from pipeline import storage, tables
from pipeline.classify._data import Inputs, NoTarget, load_inputs
from pipeline.classify._evaluate import bootstrap_weights, evaluate
from pipeline.classify._fit import (MODEL_NAMES, SPLIT_CODES, FitResult, FitSpec,
                                   build_estimator, fit_one)
from pipeline.classify._sampling import PER_CLUSTER_SAMPLINGS
from pipeline.classify._significance import (FINDINGS_SCHEMA, adjust, intersections,
                                             permutation_tests)
from pipeline.classify._tables import (DATASET_TABLE, FINDINGS_TABLE, METRICS_SCHEMA,
                                       METRICS_TABLE, MODEL_FILE_SUFFIX, MODEL_FILES,
                                       MODELS_SCHEMA, MODELS_TABLE, PREDICTIONS_SCHEMA,
                                       PREDICTIONS_TABLE, Settings)
from pipeline.config import Config
from pipeline.progress import gather
from pipeline.seeds import derive_seed
from pipeline.stages import StageSkipped

log = logging.getLogger(__name__)

def plan(cfg: Config, inputs: Inputs) -> tuple[list[FitSpec], list[dict]]:
    """Every fit to make, and the combinations left out with the reason."""
    c = cfg.classify
    clusters = sorted(int(k) for k in np.unique(inputs.cluster[inputs.cluster >= 0]))
    specs: list[FitSpec] = []
    skipped: list[dict] = []
    for model in c.models:
        for sampling in c.samplings:
            if sampling in ("cluster", "cluster_class") and not clusters:
                skipped.append({"model": model, "sampling": sampling, "trained_on": "global",
                                "reason": "no clusters (clusters/primary missing or empty)"})
            else:
                specs.append(FitSpec(model, sampling, "global"))
            if not c.per_cluster:
                continue
            if not clusters:
                skipped.append({"model": model, "sampling": sampling, "trained_on": "cluster_*",
                                "reason": "no clusters (clusters/primary missing or empty)"})
            elif sampling not in PER_CLUSTER_SAMPLINGS:
                skipped.append({"model": model, "sampling": sampling, "trained_on": "cluster_*",
                                "reason": "inside one cluster this sampling equals "
                                          f"{'none' if sampling == 'cluster' else 'class'}"})
            else:
                specs += [FitSpec(model, sampling, f"cluster_{k}", k) for k in clusters]
    return specs, skipped


def _test_arrays(cfg: Config, inputs: Inputs) -> dict:
    """The test split's rows, truth and groupings (plain, then intersectional; see
    :mod:`pipeline.classify._significance`), with each intersectional grouping's too-small
    groups."""
    test = np.flatnonzero(inputs.split == SPLIT_CODES["test"])
    groupings = {}
    if inputs.has_clusters:
        cl = inputs.cluster[test]
        groupings["cluster"] = np.where(cl >= 0, cl.astype(str), None).astype(object)
    for name, labels in inputs.sensitive.items():
        groupings[name] = labels[test]
    too_small: dict[str, list[str]] = {}
    if cfg.classify.intersections:
        crossed, too_small = intersections(groupings, cfg.classify.min_group_size)
        groupings.update(crossed)
    return {"test": test, "y": inputs.y[test], "groupings": groupings, "too_small": too_small}


def _eval_data(cfg: Config, inputs: Inputs) -> dict:
    """Test-split arrays every evaluation shares (one ray.put), with the bootstrap weights."""
    ev = _test_arrays(cfg, inputs)
    rng = np.random.default_rng(derive_seed(cfg.run.seed, "classify", "bootstrap"))
    return {**ev, "weights": bootstrap_weights(len(ev["test"]), cfg.classify.bootstrap, rng),
            "ci_level": cfg.classify.ci_level}


def _evaluations(results: list[FitResult]) -> list[dict]:
    """One evaluation per model × sampling for the global fit and for the per-cluster fits
    stitched together (each test row scored by the model of its own cluster)."""
    out: dict[tuple, dict] = {}
    for r in results:
        if r.status != "ok":
            continue
        trained_on = "global" if r.spec.cluster is None else "per_cluster"
        e = out.setdefault((r.spec.model, r.spec.sampling, trained_on),
                           {"model": r.spec.model, "sampling": r.spec.sampling,
                            "trained_on": trained_on, "index": [], "score": [], "label": []})
        e["index"].append(r.test_index)
        e["score"].append(r.test_score)
        e["label"].append(r.test_score >= r.threshold)
    evals = []
    for e in out.values():
        order = np.argsort(np.concatenate(e["index"]), kind="stable")
        for k in ("index", "score", "label"):
            e[k] = np.concatenate(e[k])[order]
        evals.append(e)
    return evals


def evaluate_one(ev: dict, e: dict) -> list[dict]:
    """Metric rows of one evaluation ``e`` on the shared test arrays ``ev``."""
    pos = np.searchsorted(ev["test"], e["index"])  # positions within the test split
    rows = evaluate(ev["y"][pos], e["score"], e["label"],
                    {g: lab[pos] for g, lab in ev["groupings"].items()},
                    ev["weights"][pos], ev["ci_level"])
    head = {"model": e["model"], "sampling": e["sampling"], "trained_on": e["trained_on"]}
    return [{**head, **r} for r in rows]


def significance_one(ev: dict, e: dict, permutations: int, seeds: dict[str, int]) -> list[dict]:
    """Permutation p-values of every gap row of one evaluation ``e`` (one Ray task)."""
    pos = np.searchsorted(ev["test"], e["index"])
    rows = permutation_tests(ev["y"][pos], e["label"], e["score"],
                             {g: lab[pos] for g, lab in ev["groupings"].items()},
                             permutations, seeds)
    head = {"model": e["model"], "sampling": e["sampling"], "trained_on": e["trained_on"]}
    return [{**head, **r} for r in rows]


def significance(cfg: Config, inputs: Inputs, results: list[FitResult], metric_rows: list[dict],
                 mode: str = "ray") -> tuple[pa.Table, dict]:
    """The ``classifiers/findings`` table: every gap row of ``metric_rows`` with its permutation
    p-value and its corrected decision (one Ray task per evaluation in mode "ray")."""
    c = cfg.classify
    ev = _test_arrays(cfg, inputs)
    seeds = {g: derive_seed(cfg.run.seed, "classify", "permutation", g) for g in ev["groupings"]}
    evals = _evaluations(results)
    t0 = time.perf_counter()
    if mode == "ray":
        import ray

        task = ray.remote(significance_one).options(num_cpus=c.cpus_per_task)
        ev_ref = ray.put(ev)
        parts = ray.get([task.remote(ev_ref, e, c.permutations, seeds) for e in evals])
    else:
        parts = [significance_one(ev, e, c.permutations, seeds) for e in evals]
    seconds = time.perf_counter() - t0
    tested = {(r["model"], r["sampling"], r["trained_on"], r["group_by"], r["metric"]): r
              for p in parts for r in p}
    rows = []
    for m in metric_rows:
        if not m["evaluated_on"].startswith("gap:"):
            continue
        key = (m["model"], m["sampling"], m["trained_on"], m["group_by"], m["metric"])
        t = tested[key]  # every gap row has its test (same groupings, same rows)
        rows.append({**t, "value": m["value"], "ci_low": m["ci_low"], "ci_high": m["ci_high"],
                     "too_small": ev["too_small"].get(m["group_by"], [])})
    p = np.array([r["p_value"] for r in rows], dtype=np.float64)
    adj = adjust(p, c.correction)
    for r, a in zip(rows, adj):
        r.update(p_adjusted=a, significant=bool(np.isfinite(a) and a <= c.alpha),
                 correction=c.correction, alpha=c.alpha)
    cols = {f.name: [r[f.name] for r in rows] for f in FINDINGS_SCHEMA}
    for k in ("value", "ci_low", "ci_high", "high_value", "low_value", "p_value", "p_adjusted"):
        cols[k] = pa.array(np.asarray(cols[k], dtype=np.float64), pa.float64(), from_pandas=True)
    table = pa.table(cols, schema=FINDINGS_SCHEMA)
    tested_n = int(np.isfinite(p).sum())
    summary = {"gap_rows": len(rows), "tested": tested_n,
               "significant": int(sum(r["significant"] for r in rows)),
               "correction": c.correction, "alpha": c.alpha, "permutations": c.permutations,
               "seconds": round(seconds, 2),
               "too_small": {k: v for k, v in ev["too_small"].items() if v}}
    floor = 1.0 / (1 + c.permutations)
    if c.correction == "holm" and tested_n and floor * tested_n > c.alpha:
        summary["warning"] = (f"with {c.permutations} permutations the smallest p-value is "
                              f"{floor:.2g}; Holm over {tested_n} rows needs p <= "
                              f"{c.alpha / tested_n:.2g}, so no row can be significant: raise "
                              "classify.permutations to at least "
                              f"{int(np.ceil(tested_n / c.alpha))}")
        log.warning("classify: %s", summary["warning"])
    return table, summary


def execute(cfg: Config, inputs: Inputs, specs: list[FitSpec], out_root: str,
            mode: str = "ray") -> tuple[list[FitResult], list[dict], dict]:
    """Run every fit then every evaluation; ``mode`` "ray" (one task each, shared data put in
    the object store once) or "sequential" (the same functions in this process, the baseline).
    Returns (fit results, metric rows, timings in seconds)."""
    t0 = time.perf_counter()
    ev = _eval_data(cfg, inputs)
    if mode == "ray":
        import ray

        from pipeline.ray_runtime import ensure_ray

        ensure_ray(cfg)  # a no-op under jobs.* and tests, which start Ray themselves
        opts = {"num_cpus": cfg.classify.cpus_per_task}
        fit_task = ray.remote(fit_one).options(**opts)
        data_ref = ray.put(inputs.arrays())
        results = gather([fit_task.remote(data_ref, s, cfg, out_root) for s in specs],
                         "classify", "fits", unit="fits")
        t1 = time.perf_counter()
        ev_ref = ray.put(ev)
        eval_task = ray.remote(evaluate_one).options(**opts)
        parts = gather([eval_task.remote(ev_ref, e) for e in _evaluations(results)],
                       "classify", "evaluations", unit="tasks")
    elif mode == "sequential":
        data = inputs.arrays()
        results = [fit_one(data, s, cfg, out_root) for s in specs]
        t1 = time.perf_counter()
        parts = [evaluate_one(ev, e) for e in _evaluations(results)]
    else:
        raise ValueError(f"mode must be 'ray' or 'sequential', got {mode!r}")
    t2 = time.perf_counter()
    rows = [r for p in parts for r in p]
    return results, rows, {"fit_s": t1 - t0, "evaluate_s": t2 - t1, "total_s": t2 - t0}


def _models_table(cfg: Config, results: list[FitResult]) -> pa.Table:
    ok = [r for r in results if r.status == "ok"]
    return pa.Table.from_pylist([{
        "model": r.spec.model, "sampling": r.spec.sampling, "trained_on": r.spec.trained_on,
        "cluster": r.spec.cluster, "path": r.path, "features": r.features,
        "n_train": r.n_train, "target": cfg.classify.target, "threshold": r.threshold,
        "n_train_positive": r.n_train_positive} for r in ok], schema=MODELS_SCHEMA)


def _predictions_table(inputs: Inputs, results: list[FitResult]) -> pa.Table:
    parts = []
    for r in results:
        if r.status != "ok" or not len(r.test_index):
            continue
        n = len(r.test_index)
        parts.append(pa.table({
            "image_id": inputs.image_id[r.test_index].astype(str),
            "model": [r.spec.model] * n, "sampling": [r.spec.sampling] * n,
            "trained_on": [r.spec.trained_on] * n, "score": r.test_score,
            "label": r.test_score >= r.threshold, "split": ["test"] * n},
            schema=PREDICTIONS_SCHEMA))
    return pa.concat_tables(parts) if parts else PREDICTIONS_SCHEMA.empty_table()


def _metrics_table(rows: list[dict]) -> pa.Table:
    cols = {f.name: [r[f.name] for r in rows] for f in METRICS_SCHEMA}
    for k in ("value", "ci_low", "ci_high"):  # NaN (undefined) is written as null
        cols[k] = pa.array(np.asarray(cols[k], dtype=np.float64), pa.float64(),
                           from_pandas=True) if rows else []
    return pa.table(cols, schema=METRICS_SCHEMA)


def _remove_stale_models(cfg: Config, keep: set[str]) -> int:
    """Delete model files no index row points at; also any ``.skops`` left in the index folder
    by a run from before model files had their own folder, so it holds only Parquet."""
    removed = 0
    for name, keep_these in ((MODEL_FILES, keep), (MODELS_TABLE, set())):
        loc = tables.location(cfg, name)
        for info in storage.list_files(loc, recursive=False):
            if info.path.endswith(MODEL_FILE_SUFFIX) and info.path not in keep_these:
                loc.fs.delete_file(info.path)
                removed += 1
    return removed


def _r(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def summarize(rows: list[dict]) -> dict:
    """Per evaluation: overall accuracy (with interval), accuracy per cluster, and the gaps."""
    out: dict[str, dict] = {}
    for r in rows:
        key = f"{r['model']}/{r['sampling']}/{r['trained_on']}"
        s = out.setdefault(key, {})
        if r["metric"] == "accuracy" and r["group_by"] == "overall":
            s["accuracy"] = _r(r["value"])
            s["accuracy_ci"] = [_r(r["ci_low"]), _r(r["ci_high"])]
        elif r["metric"] == "accuracy" and r["group_by"] == "cluster":
            s.setdefault("accuracy_by_cluster", {})[r["group"]] = _r(r["value"])
        elif r["metric"] in ("accuracy_gap_difference", "equalized_odds_difference"):
            s[f"{r['metric']}[{r['group_by']}]"] = _r(r["value"])
    return out


def run(cfg: Config) -> dict:
    """Fit, evaluate and save the classifiers for ``classify.target``; returns row counts,
    what was skipped and why, timings and a per-cluster accuracy summary."""

    c = cfg.classify
    unknown = sorted(set(c.params) - set(MODEL_NAMES))
    if unknown:
        raise ValueError(f"classify.params has unknown model names {unknown}; models are "
                         f"{list(MODEL_NAMES)}")
    for m in c.models:  # bad hyper-parameters fail here, before any data is read
        build_estimator(m, c.params.get(m, {}), 0)
    try:
        inputs = load_inputs(cfg)
    except NoTarget as why:
        raise StageSkipped(str(why)) from None
    tables.clear_errors(cfg, "classify")
    if inputs.errors:
        tables.write_errors(cfg, "classify", inputs.errors)
        log.warning("classify: %d images unusable (see errors/classify.parquet)",
                    len(inputs.errors))
    for split, code in SPLIT_CODES.items():
        if not (inputs.split == code).any():
            raise ValueError(f"classify needs train, val and test rows; the {split} split is "
                             "empty (check the manifest's split column)")
    specs, skipped = plan(cfg, inputs)
    if not specs:
        raise StageSkipped("nothing to fit: " + "; ".join(s["reason"] for s in skipped))
    log.info("classify: %d rows, %d features, %d fits", len(inputs.y),
             len(inputs.feature_names), len(specs))
    ds = inputs.table()
    tables.replace(cfg, DATASET_TABLE, ds, schema=ds.schema,
                   metadata={"target": c.target, "feature_sources": ",".join(c.features)})
    results, rows, timing = execute(cfg, inputs, specs, cfg.output.root, mode="ray")
    for r in results:
        if r.status != "ok":
            skipped.append({"model": r.spec.model, "sampling": r.spec.sampling,
                            "trained_on": r.spec.trained_on, "reason": r.reason})
            log.warning("classify: %s skipped: %s", r.spec.key, r.reason)
    models = _models_table(cfg, results)
    preds = _predictions_table(inputs, results)
    metrics = _metrics_table(rows)
    settings = Settings.from_config(cfg).metadata()  # the report reads these, not its config
    tables.replace(cfg, MODELS_TABLE, models, schema=MODELS_SCHEMA)
    tables.replace(cfg, PREDICTIONS_TABLE, preds, schema=PREDICTIONS_SCHEMA)
    tables.replace(cfg, METRICS_TABLE, metrics, schema=METRICS_SCHEMA, metadata=settings)
    findings, tests = significance(cfg, inputs, results, rows, mode="ray")
    tables.replace(cfg, FINDINGS_TABLE, findings, schema=FINDINGS_SCHEMA, metadata=settings)
    keep = {tables.root(cfg).join(*p.split("/")).path for p in models.column("path").to_pylist()}
    stale = _remove_stale_models(cfg, keep)
    return {
        "rows": len(inputs.y), "errors": len(inputs.errors),
        "features": list(inputs.feature_names),
        "fits": len(specs), "models": models.num_rows, "metrics_rows": metrics.num_rows,
        "predictions_rows": preds.num_rows, "stale_models_removed": stale,
        "findings_rows": findings.num_rows, "significance": tests,
        "skipped": skipped, "notes": inputs.notes,
        "selected_features": {r.spec.key: r.features for r in results
                              if r.status == "ok" and c.feature_selection != "none"},
        "thresholds": {r.spec.key: [_r(r.threshold), r.threshold_note]
                       for r in results if r.status == "ok"},
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "summary": summarize(rows),
    }
