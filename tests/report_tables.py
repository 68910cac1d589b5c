"""Plausible synthetic tables of a whole tiny run, for the report and README-example tests.

Every table is written with the schema constant of the stage that owns it (imported from that
stage's module), so a schema change in a stage shows up here as a failing report test rather
than as a report that silently stops matching the pipeline. Values are random but shaped like
real results (accuracies above baselines, CIs around values, ranks 1..n).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from pipeline import classify, cluster, explain, runlog, storage, tables
from pipeline.config import Config
from tests.helpers import write_tiny_manifest

SPACES = ("annotations", "semantic")
ALGORITHMS = ("kmeans", "gmm")
CHOSEN_K = 3
MODELS = ("random_forest", "logistic_regression")
SAMPLINGS = ("none", "class", "cluster", "cluster_class")
SHAP_FEATURES = ("Male", "Smiling", "Young", "Heavy_Makeup", "Wearing_Lipstick", "Eyeglasses",
                 "Bald", "Blond_Hair")


def write_manifest_and_errors(cfg: Config, n: int = 48) -> pa.Table:
    man = write_tiny_manifest(cfg, n)
    tables.write_errors(cfg, "ingest", [
        {"image_id": "broken.jpg", "uri": "/nowhere/broken.jpg",
         "reason": "cannot decode image: truncated file"},
        {"image_id": None, "uri": "/nowhere/list_attr.txt", "reason": "annotation line 7 malformed"},
    ])
    return man


def write_attribute_model(cfg: Config, rng: np.random.Generator) -> None:
    from pipeline.train import HISTORY_SCHEMA, MEAN_ROW, METRICS_SCHEMA

    attrs = list(cfg.train.attributes) or [
        "Male", "Smiling", "Young", "Eyeglasses", "Blond_Hair", "Attractive", "Bald", "Goatee"]
    base = rng.uniform(0.55, 0.95, len(attrs))
    acc = np.minimum(0.99, base + rng.uniform(0.0, 0.1, len(attrs)))
    rows = [{"attribute": a, "n": 10, "accuracy": float(acc[i]), "majority_baseline": float(base[i]),
             "balanced_accuracy": float(rng.uniform(0.5, 0.9)), "f1": float(rng.uniform(0.3, 0.9)),
             "roc_auc": float(rng.uniform(0.6, 0.95)), "predicted_positive_rate": 0.3,
             "true_positive_rate": float(1 - base[i]), "threshold": 0.5}
            for i, a in enumerate(attrs)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("attribute",)}
    rows.append({**mean, "attribute": MEAN_ROW, "n": 10})
    tables.replace(cfg, "models/attributes/metrics", pa.Table.from_pylist(rows, METRICS_SCHEMA),
                   schema=METRICS_SCHEMA)
    hist = [{"epoch": e, "step": 3 * e, "train_loss": 0.7 / e, "val_loss": 0.75 / e ** 0.8,
             "val_mean_accuracy": 0.6 + 0.05 * e, "images_per_s": 100.0, "seconds": 2.0}
            for e in (1, 2, 3)]
    tables.replace(cfg, "models/attributes/history", pa.Table.from_pylist(hist, HISTORY_SCHEMA),
                   schema=HISTORY_SCHEMA)
    storage.write_json(tables.root(cfg).join("models", "attributes", "model.json"),
                       {"arch": "mobilenet_v2", "image_size": 32, "attributes": attrs,
                        "pretrained": cfg.train.pretrained})


def write_features(cfg: Config, man: pa.Table, rng: np.random.Generator, dim: int = 8) -> None:
    from pipeline.extract import features_schema
    from pipeline.schemas import manifest_attributes

    attrs = manifest_attributes(man.schema)
    schema = features_schema(attrs, dim)
    n = man.num_rows
    cols = {"image_id": man["image_id"]}
    for a in attrs:
        cols[f"p_{a}"] = pa.array(rng.random(n).astype(np.float32))
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim)
    cols["content_hash"] = pa.array([f"h{i:031d}" for i in range(n)])
    tables.replace(cfg, "features", pa.table(cols).cast(schema), schema=schema,
                   metadata={"embedding_model": "resnet50", "attribute_model": "mobilenet_v2"})


def write_clusters(cfg: Config, man: pa.Table, rng: np.random.Generator) -> np.ndarray:
    """Returns the primary cluster of every manifest row."""
    ids = man["image_id"].to_pylist()
    n = len(ids)
    attrs = ["Male", "Smiling", "Young", "Eyeglasses", "Blond_Hair", "Goatee", "Attractive"]
    sweep, assign, profiles, dist, demo = [], [], [], [], []
    ref = list(cfg.cluster.reference_attributes)
    primary = None
    for space in SPACES:
        for algo in ALGORITHMS:
            for k in range(2, 5):
                row = {"space": space, "algorithm": algo, "k": k, "param": f"n_clusters={k}",
                       "n_rows": n, "fit_rows": n, "noise_fraction": 0.0,
                       "inertia": 100.0 / k + rng.random(), "silhouette": rng.uniform(0, 0.4),
                       "silhouette_rows": n, "davies_bouldin": rng.uniform(1, 3),
                       "calinski_harabasz": rng.uniform(5, 50), "fit_seconds": 0.01,
                       "chosen": k == CHOSEN_K}
                for a in ref:
                    row.update({f"nmi_{a}": rng.random() / 5, f"ari_{a}": rng.random() / 10,
                                f"purity_{a}": rng.uniform(0.5, 0.9)})
                sweep.append(row)
            labels = rng.integers(0, CHOSEN_K, n)
            labels[:CHOSEN_K] = np.arange(CHOSEN_K)  # every cluster non-empty
            if primary is None:
                primary = labels
            xy = rng.normal(size=(n, 2)) + labels[:, None] * 3
            assign += [{"image_id": i, "space": space, "algorithm": algo, "k": CHOSEN_K,
                        "cluster": int(c), "x": float(x), "y": float(y)}
                       for i, c, (x, y) in zip(ids, labels, xy)]
            for c in range(CHOSEN_K):
                size = int((labels == c).sum())
                for a in attrs:
                    prev, overall = rng.uniform(0.05, 0.9), rng.uniform(0.2, 0.6)
                    profiles.append({"space": space, "algorithm": algo, "k": CHOSEN_K,
                                     "cluster": c, "size": size, "share": size / n,
                                     "attribute": a, "source": "annotations",
                                     "prevalence": prev, "overall": overall,
                                     "lift": prev / overall,
                                     "label": f"{attrs[c]} · not {attrs[c + 1]}"})
                for c2 in range(CHOSEN_K):
                    dist.append({"space": space, "algorithm": algo, "k": CHOSEN_K,
                                 "cluster_a": c, "cluster_b": c2,
                                 "distance": 0.0 if c == c2 else 1.0 + abs(c - c2)})
                for attr, cats in (("Male", ("false", "true")),
                                   ("age_bin", ("0-19", "20-39", "40+"))):
                    shares = rng.dirichlet(np.ones(len(cats)))
                    for cat, sh in zip(cats, shares):
                        demo.append({"space": space, "algorithm": algo, "k": CHOSEN_K,
                                     "attribute": attr, "cluster": c, "category": cat,
                                     "count": int(round(sh * size)), "share": float(sh),
                                     "overall": 1.0 / len(cats), "chi2": 4.2, "dof": 2,
                                     "p_value": 0.12})
    c = cfg.cluster
    # what the cluster stage records in its tables' metadata, from this config
    meta = cluster.Settings(spaces=tuple(c.spaces), k_rule=c.k_rule, k=c.k,
                            primary_space=SPACES[0], primary_algorithm=c.primary_algorithm,
                            primary_k=CHOSEN_K, profile_source="annotations",
                            map_method=c.map_method).metadata()
    sweep_schema = cluster.sweep_schema(ref)
    tables.replace(cfg, cluster.SWEEP, pa.Table.from_pylist(sweep, sweep_schema),
                   schema=sweep_schema, metadata=meta)
    for name, rows, schema in ((cluster.ASSIGNMENTS, assign, cluster.ASSIGNMENTS_SCHEMA),
                               (cluster.PROFILES, profiles, cluster.PROFILES_SCHEMA),
                               (cluster.DEMOGRAPHICS, demo, cluster.DEMOGRAPHICS_SCHEMA)):
        tables.replace(cfg, name, pa.Table.from_pylist(rows, schema), schema=schema, metadata=meta)
    tables.replace(cfg, cluster.CENTROID_DISTANCES,
                   pa.Table.from_pylist(dist, cluster.CENTROID_DISTANCES_SCHEMA),
                   schema=cluster.CENTROID_DISTANCES_SCHEMA)
    cond = [{"attribute": a, "given": b, "p": 1.0 if a == b else float(rng.random()),
             "n_given": 10, "source": "annotations"} for a in attrs for b in attrs]
    tables.replace(cfg, cluster.CONDITIONAL, pa.Table.from_pylist(cond, cluster.CONDITIONAL_SCHEMA),
                   schema=cluster.CONDITIONAL_SCHEMA, metadata=meta)
    prim = pa.table({"image_id": ids, "cluster": pa.array(primary, pa.int32())})
    tables.replace(cfg, cluster.PRIMARY, prim, schema=cluster.PRIMARY_SCHEMA, metadata=meta)
    # identity purity, by the cluster stage's own function, from the manifest's identities
    ident, _ = cluster.identity_table(pa.Table.from_pylist(assign, cluster.ASSIGNMENTS_SCHEMA),
                                      tables.read(cfg, "manifest", columns=["image_id", "identity"]))
    tables.replace(cfg, cluster.IDENTITY, ident, schema=cluster.IDENTITY_SCHEMA, metadata=meta)
    return primary


def _metric_row(rng, model, sampling, trained_on, group_by, group, metric, n):
    v = float(rng.uniform(0.4, 0.9))
    w = float(rng.uniform(0.02, 0.15))
    on = "overall" if group_by == "overall" else f"{group_by}={group}"
    return {"model": model, "sampling": sampling, "trained_on": trained_on, "evaluated_on": on,
            "group_by": group_by, "group": group, "metric": metric, "value": v,
            "ci_low": v - w, "ci_high": min(1.0, v + w), "n": n}


def write_classifiers(cfg: Config, man: pa.Table, primary: np.ndarray,
                      rng: np.random.Generator) -> None:
    from pipeline.classify import FAIRNESS_GAPS, METRICS, METRICS_SCHEMA, PREDICTIONS_SCHEMA

    groupings = {"overall": ["all"], "cluster": [str(c) for c in range(CHOSEN_K)],
                 "Male": ["False", "True"], "Young": ["False", "True"]}
    rows = []
    for model in MODELS:
        for sampling in SAMPLINGS:
            for trained_on in ("global", "per_cluster") if sampling == "none" else ("global",):
                for gb, groups in groupings.items():
                    for g in groups:
                        rows += [_metric_row(rng, model, sampling, trained_on, gb, g, m, 10)
                                 for m in METRICS]
                    if gb == "overall":
                        continue
                    gaps = [f"{m}_gap_difference" for m in METRICS] + \
                        [f"{m}_gap_ratio" for m in METRICS] + list(FAIRNESS_GAPS)
                    for m in gaps:
                        r = _metric_row(rng, model, sampling, trained_on, gb, None, m, 20)
                        r.update(evaluated_on=f"gap:{gb}", value=r["value"] / 3,
                                 ci_low=max(0.0, r["ci_low"] / 3 - 0.05), ci_high=r["ci_high"] / 3)
                        rows.append(r)
    tables.replace(cfg, classify.METRICS_TABLE, pa.Table.from_pylist(rows, METRICS_SCHEMA),
                   schema=METRICS_SCHEMA, metadata=classify.Settings.from_config(cfg).metadata())
    write_findings(cfg, rows, rng)
    test = [i for i, s in zip(man["image_id"].to_pylist(), man["split"].to_pylist()) if s == "test"]
    preds = [{"image_id": i, "model": m, "sampling": "none", "trained_on": "global",
              "score": float(rng.random()), "label": bool(rng.random() < 0.5), "split": "test"}
             for m in MODELS for i in test]
    tables.replace(cfg, classify.PREDICTIONS_TABLE, pa.Table.from_pylist(preds, PREDICTIONS_SCHEMA),
                   schema=PREDICTIONS_SCHEMA)


def write_findings(cfg: Config, metric_rows: list[dict], rng: np.random.Generator) -> None:
    """One classifiers/findings row per gap row; every third tested row significant."""
    from pipeline.classify import FINDINGS_SCHEMA

    groups = {}
    for r in metric_rows:
        if r["group"] is not None:
            groups.setdefault(r["group_by"], set()).add(r["group"])
    rows = []
    for i, r in enumerate(x for x in metric_rows if x["evaluated_on"].startswith("gap:")):
        hi, lo = sorted(groups[r["group_by"]])[-1], sorted(groups[r["group_by"]])[0]
        p = float(rng.uniform(0.0005, 0.5))
        rows.append({k: r[k] for k in ("model", "sampling", "trained_on", "group_by", "metric",
                                       "value", "ci_low", "ci_high", "n")}
                    | {"n_groups": len(groups[r["group_by"]]), "high_group": hi,
                       "high_value": 0.8, "low_group": lo, "low_value": 0.5, "p_value": p,
                       "permutations": cfg.classify.permutations,
                       "p_adjusted": 0.01 if i % 3 == 0 else max(0.06, min(1.0, 3 * p)),
                       "significant": i % 3 == 0, "correction": "bh", "alpha": 0.05,
                       "too_small": ["1×True (n=3)"] if r["group_by"] == "cluster" else []})
    tables.replace(cfg, classify.FINDINGS_TABLE, pa.Table.from_pylist(rows, FINDINGS_SCHEMA),
                   schema=FINDINGS_SCHEMA, metadata=classify.Settings.from_config(cfg).metadata())


def write_shap(cfg: Config, rng: np.random.Generator) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.explain import COMPARISON_SCHEMA, IMPORTANCE_SCHEMA

    imp, comp = [], []
    for model in MODELS:
        output = "probability" if model == "random_forest" else "log_odds"
        vectors = {("global", None)}
        vectors |= {("global", c) for c in range(CHOSEN_K)}
        vectors |= {(f"cluster_{c}", c) for c in range(CHOSEN_K)}
        for trained_on, cl in sorted(vectors, key=str):
            vals = rng.exponential(0.05, len(SHAP_FEATURES))
            ranks = (-vals).argsort().argsort() + 1
            imp += [{"model": model, "sampling": "none", "trained_on": trained_on, "cluster": cl,
                     "output": output, "feature": f, "mean_abs_shap": float(v), "rank": int(r),
                     "n_rows": 10} for f, v, r in zip(SHAP_FEATURES, vals, ranks)]
        for c in range(CHOSEN_K):
            for kind, left, right in (
                    ("global_model_cluster_vs_all", ("global", c), ("global", None)),
                    ("cluster_model_vs_global", (f"cluster_{c}", c), ("global", None))):
                comp.append({"model": model, "sampling": "none", "kind": kind,
                             "left_trained_on": left[0], "left_cluster": left[1],
                             "right_trained_on": right[0], "right_cluster": right[1],
                             "n_features": len(SHAP_FEATURES), "kendall_tau": float(rng.uniform(-0.5, 1)),
                             "kendall_p": 0.3, "k": cfg.explain.top_k, "top_k_overlap": float(rng.choice([0.4, 0.6, 1.0]))})
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.scatter(rng.normal(size=30), rng.integers(0, 5, 30), c=rng.random(30))
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        storage.write_bytes(tables.location(cfg, explain.PLOTS).join(
            explain.beeswarm_name(model, "none", "global", None)), buf.getvalue())
    tables.replace(cfg, explain.IMPORTANCE, pa.Table.from_pylist(imp, IMPORTANCE_SCHEMA),
                   schema=IMPORTANCE_SCHEMA)
    tables.replace(cfg, explain.COMPARISON, pa.Table.from_pylist(comp, COMPARISON_SCHEMA),
                   schema=COMPARISON_SCHEMA)


def write_audit(cfg: Config, man: pa.Table, primary: np.ndarray | None,
                rng: np.random.Generator) -> None:
    """The audit tables in their schemas, from the audit's own label functions on the manifest:
    two files filed twice (one pair with conflicting labels, across splits)."""
    import polars as pl

    from pipeline import audit

    ids, splits = man["image_id"].to_pylist(), man["split"].to_pylist()
    male = np.asarray(man["Male"].to_pylist(), bool)
    n = len(ids)
    # group 0: rows 0 and n-1 (train / test), Male differs; group 1: rows 1 and 2, labels agree
    dups = [{"group": 0, "kind": "exact", "image_id": ids[i], "split": splits[i], "identity": None,
             "content_hash": "h0", "distance": 0.0, "group_size": 2, "labels_agree": False,
             "conflicting": ["Male"]} for i in (0, n - 1)]
    dups += [{"group": 1, "kind": "exact", "image_id": ids[i], "split": splits[i], "identity": None,
              "content_hash": "h1", "distance": 0.0, "group_size": 2, "labels_agree": True,
              "conflicting": []} for i in (1, 2)]
    conflicts = [{"group": 0, "kind": "exact", "attribute": "Male", "n_images": 2, "n_values": 2,
                  "image_ids": [ids[0], ids[n - 1]], "values": ["True", "False"],
                  "splits": [splits[0], splits[n - 1]]}]
    leak = [{"kind": "exact_duplicate", "key": "0", "image_id": ids[i], "split": splits[i]}
            for i in (0, n - 1)]
    counts = [{"kind": "exact_duplicate", "split_a": splits[0], "split_b": splits[n - 1],
               "groups": 1, "images": 2}]
    labels = male.astype(int)
    probs = np.clip(np.stack([1 - labels, labels], 1) * 0.8 + rng.random((n, 2)) * 0.2, 0, 1)
    probs /= probs.sum(1, keepdims=True)
    is_issue, quality, rank = audit.label_issues(labels, probs)
    issues = [{"attribute": "Male", "image_id": ids[i], "split": splits[i],
               "given": str(bool(labels[i])), "predicted": str(bool(probs[i].argmax())),
               "p_given": float(probs[i, labels[i]]), "quality": float(quality[i]),
               "is_issue": bool(is_issue[i]), "rank": int(rank[i])} for i in range(n)]
    groups = {"cluster": np.array([str(c) for c in (primary if primary is not None
                                                     else np.zeros(n, int))], dtype=object)}
    rates = audit.issue_rates(is_issue, groups, 0.05).with_columns(pl.lit("Male").alias(
        "attribute"))
    summary = [{"metric": m, "attribute": a, "value": v} for m, a, v in (
        ("images_audited", None, n), ("exact_groups", None, 2), ("exact_images", None, 4),
        ("exact_groups_conflicting", None, 1), ("near_groups", None, 0), ("near_images", None, 0),
        ("leaking_groups", "exact_duplicate", 1), ("dropped_images", None, 0),
        ("nearest_distance_p01", None, 0.0), ("nearest_distance_p50", None, 0.2),
        ("near_threshold", None, cfg.audit.near_threshold))]
    for name, rows in ((audit.DUPLICATES, dups), (audit.LABEL_CONFLICTS, conflicts),
                       (audit.LEAKAGE, leak), (audit.LEAKAGE_COUNTS, counts),
                       (audit.LABEL_ISSUES, issues), (audit.SUMMARY, summary)):
        tables.replace(cfg, name, pa.Table.from_pylist(rows, audit.SCHEMAS[name]),
                       schema=audit.SCHEMAS[name],
                       metadata={"action": cfg.audit.action} if name == audit.SUMMARY else None)
    tables.replace(cfg, audit.ISSUE_RATES, rates.to_arrow(), schema=audit.ISSUE_RATES_SCHEMA)


STAGE_WRITERS = ("ingest", "train_attributes", "extract", "cluster", "audit", "classify",
                 "explain")


def write_run(cfg: Config, stages: tuple[str, ...] = STAGE_WRITERS, n: int = 48,
              seed: int = 0) -> dict:
    """Write the tables of ``stages`` (in order) plus their run.json records."""
    from pipeline.config import dump_toml

    rng = np.random.default_rng(seed)
    # as runlog.track does for every stage that writes tables
    storage.write_bytes(tables.root(cfg).join("config.toml"), dump_toml(cfg).encode())
    man = write_manifest_and_errors(cfg, n)
    primary = None
    for stage in stages:
        if stage == "train_attributes":
            write_attribute_model(cfg, rng)
        elif stage == "extract":
            write_features(cfg, man, rng)
        elif stage == "cluster":
            primary = write_clusters(cfg, man, rng)
        elif stage == "audit":
            write_audit(cfg, man, primary, rng)
        elif stage == "classify":
            write_classifiers(cfg, man, primary if primary is not None
                              else np.zeros(n, dtype=int), rng)
        elif stage == "explain":
            write_shap(cfg, rng)
        runlog.update(cfg, stage, status="done", seconds=float(rng.uniform(1, 20)),
                      details={"rows": n}, fingerprint="synthetic")
    return {"manifest": man}


