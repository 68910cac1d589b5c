"""The audit stage's driver: read manifest + features (+ clusters/primary), find duplicates,
conflicts, leakage and probable label errors, write the audit tables and (on request) the
exclusions in ``errors/audit.parquet``. See the package docstring for the contract."""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline import tables
from pipeline.audit import _duplicates as dup
from pipeline.audit import _labels as lab
from pipeline.audit._schemas import (DUPLICATES, ISSUE_RATES, LABEL_CONFLICTS, LABEL_ISSUES,
                                     LEAKAGE, LEAKAGE_COUNTS, SCHEMAS, SUMMARY)
from pipeline.cluster import PRIMARY  # clusters/primary, owned by cluster
from pipeline.config import Config
from pipeline.schemas import manifest_attributes
from pipeline.seeds import derive_seed

log = logging.getLogger(__name__)
STAGE = "audit"
DROP = "drop_conflicting_exact"
# Non-boolean annotations compared inside duplicate groups (when the dataset has them).
OTHER_LABELS = ("age", "gender", "race", "identity", "person")
# UTKFace's boolean columns are derived from its raw labels (Male from gender, Young from age):
# audit and group by the raw label, and never predict one from its own twin.
TWINS = {"gender": "Male", "age": "Young", "Male": "gender", "Young": "age"}


# --------------------------------------------------------------------------- inputs

def _load(cfg: Config) -> tuple[pl.DataFrame, np.ndarray, list[str], list[str]]:
    """(rows, embedding, boolean attributes annotated, every annotation compared)."""
    for name in ("manifest", "features"):
        if not tables.exists(cfg, name):
            raise ValueError(f"audit needs {name}/ under {cfg.output.root}: run the "
                             f"{'ingest' if name == 'manifest' else 'extract'} stage first")
    manifest = tables.read(cfg, "manifest")
    attrs = manifest_attributes(manifest.schema)
    m = pl.from_arrow(manifest)
    feats = tables.read(cfg, "features")
    if "content_hash" not in feats.column_names:
        raise ValueError("features/ has no content_hash column (written by an older extract); "
                         "rerun it: python -m jobs.extract --config ... --force")
    f = pl.from_arrow(feats.select(["image_id", "content_hash"])).with_row_index("__f")
    rows = m.join(f, on="image_id", how="inner").sort("image_id")
    emb = feats.column("embedding").combine_chunks()
    E = emb.flatten().to_numpy().reshape(len(emb), -1)[rows["__f"].to_numpy()]
    labelled = [a for a in attrs if rows[a].null_count() < rows.height]
    others = [c for c in OTHER_LABELS if c in rows.columns and rows[c].null_count() < rows.height]
    if tables.exists(cfg, PRIMARY):
        cl = pl.from_arrow(tables.read(cfg, PRIMARY, columns=["image_id", "cluster"]))
        rows = rows.join(cl.select("image_id", pl.col("cluster").cast(pl.Int32).alias(
            "__cluster")), on="image_id", how="left")
    else:
        rows = rows.with_columns(pl.lit(None, pl.Int32).alias("__cluster"))
    if "identity" not in rows.columns:
        rows = rows.with_columns(pl.lit(None, pl.Int32).alias("identity"))
    return rows.drop("__f"), E, labelled, labelled + others


def _audited_attributes(cfg: Config, rows: pl.DataFrame, labelled: list[str]) -> list[str]:
    present = set(labelled) | {c for c in ("age", "gender", "race") if c in rows.columns
                               and rows[c].null_count() < rows.height}
    want = cfg.audit.label_attributes or (
        [cfg.classify.target, *cfg.classify.sensitive, "gender", "race", "age"])
    unknown = [a for a in cfg.audit.label_attributes if a not in rows.columns]
    if unknown:
        raise ValueError(f"audit.label_attributes {unknown} are not manifest columns; annotated "
                         f"labels are {sorted(present)}")
    out = []
    for a in dict.fromkeys(want):
        if a in present and not (a in ("Male", "Young") and TWINS[a] in present
                                 and not cfg.audit.label_attributes):
            out.append(a)
    return out


def _label_values(rows: pl.DataFrame, attr: str, age_bins: list[int]) -> np.ndarray:
    """The attribute's annotation per row as text (None = missing); age as its age group."""
    if attr == "age":
        return lab.age_groups(rows["age"].to_numpy().astype(float), age_bins)
    return np.array([None if v is None else str(v) for v in rows[attr].to_list()], dtype=object)


def _groupings(cfg: Config, rows: pl.DataFrame, attr: str, present: list[str]
               ) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if rows["__cluster"].null_count() < rows.height:
        out["cluster"] = np.array([None if c is None or c < 0 else str(c)
                                   for c in rows["__cluster"].to_list()], dtype=object)
    for s in dict.fromkeys([*cfg.classify.sensitive, "gender", "race", "age"]):
        if s == attr or TWINS.get(s) == attr or s not in present:
            continue
        if s in ("Male", "Young") and TWINS[s] in present:
            continue
        out[s] = _label_values(rows, s, cfg.audit.age_bins)
    return out


def _design(cfg: Config, rows: pl.DataFrame, E: np.ndarray, labelled: list[str]
            ) -> tuple[np.ndarray, list[str]]:
    """The label model's inputs: embedding PCs, then the boolean annotations (0/1)."""
    from sklearn.decomposition import PCA

    blocks, names = [], []
    if "embedding" in cfg.audit.label_features:
        k = min(cfg.audit.embedding_components, E.shape[1], max(1, len(E) - 1))
        Z = PCA(n_components=k, svd_solver="randomized",
                random_state=derive_seed(cfg.run.seed, STAGE, "label_pca")).fit_transform(E)
        blocks.append(Z)
        names += [f"pc_{j + 1}" for j in range(k)]
    if "annotations" in cfg.audit.label_features:
        for a in labelled:
            blocks.append(rows[a].cast(pl.Float64).fill_null(0.5).to_numpy()[:, None])
            names.append(a)
    X = np.hstack(blocks) if blocks else np.zeros((len(rows), 0))
    return X, names


# --------------------------------------------------------------------------- Ray tasks

def _ray_blocks(E_ref, k: int, cpus: float):
    import ray

    task = ray.remote(num_cpus=cpus)(dup.neighbour_block)

    def run_blocks(blocks):
        return ray.get([task.remote(E_ref, s, t, k) for s, t in blocks])
    return run_blocks


def _label_task(X, keep_rows, keep_cols, labels, folds, seed):
    return lab.out_of_sample_probs(X[keep_rows][:, keep_cols], labels, folds, seed)


# --------------------------------------------------------------------------- stage

def _empty(name: str) -> pa.Table:
    return pa.Table.from_pylist([], schema=SCHEMAS[name])


def _arrow(df: pl.DataFrame, name: str) -> pa.Table:
    if df.height == 0:
        return _empty(name)
    return df.select([f.name for f in SCHEMAS[name]]).to_arrow()


def _near_space(cfg: Config, E: np.ndarray) -> np.ndarray:
    """The embedding the neighbour search runs on: PCA-reduced when wider than near_dims."""
    a = cfg.audit
    if a.near_dims and E.shape[1] > a.near_dims and len(E) > a.near_dims:
        from sklearn.decomposition import PCA

        fit = np.random.default_rng(derive_seed(cfg.run.seed, STAGE, "near_pca")).choice(
            len(E), size=min(len(E), 20000), replace=False)
        pca = PCA(n_components=a.near_dims, svd_solver="randomized",
                  random_state=derive_seed(cfg.run.seed, STAGE, "near_pca_fit")).fit(E[np.sort(fit)])
        E = pca.transform(E)
    return dup.normalise(E)


def run(cfg: Config) -> dict:
    """Write the ``audit/*`` tables (and ``errors/audit.parquet`` under the drop action)."""
    import ray

    t0 = time.time()
    a = cfg.audit
    rows, E, labelled, compared = _load(cfg)
    n = rows.height
    log.info("[audit] %d images, embedding %d-d, %d annotations compared", n, E.shape[1],
             len(compared))
    summary: list[dict] = [{"metric": "images_audited", "attribute": None, "value": n}]

    # --- exact duplicates (content hash) and near duplicates (embedding neighbours)
    hashes = rows["content_hash"].to_numpy()
    exact = dup.exact_groups(hashes)
    En = _near_space(cfg, E)
    E_ref = ray.put(En)
    pi, pj, pd_, nearest = dup.near_pairs(En, k=a.near_neighbours, threshold=a.near_threshold,
                                          block_rows=a.block_rows,
                                          run_blocks=_ray_blocks(E_ref, a.near_neighbours,
                                                                 a.cpus_per_task))
    del E_ref
    near = dup.near_groups(n, pi, pj, pd_, exact)
    same = (near[pi] >= 0) & (near[pi] == near[pj])  # pairs inside one near group
    dist = dup.member_distance(n, pi[same], pj[same], pd_[same], exact)
    # identity is both a table column and (when annotated) a compared label; conform casts back
    base = rows.select("image_id", "split", "content_hash", *compared,
                       *([] if "identity" in compared else [pl.col("identity").cast(pl.Int32)]))
    ex_dups, ex_conf = dup.duplicate_tables(base, "exact", exact, np.zeros(n), compared)
    nr_dups, nr_conf = dup.duplicate_tables(base, "near", near, np.where(np.isinf(dist), 0, dist),
                                            compared)
    dups = pl.concat([d for d in (ex_dups, nr_dups) if d.height], how="vertical_relaxed") \
        if ex_dups.height or nr_dups.height else pl.DataFrame()
    conflicts = pl.concat([c for c in (ex_conf, nr_conf) if c.height], how="vertical_relaxed") \
        if ex_conf.height or nr_conf.height else pl.DataFrame()
    for kind, d in (("exact", ex_dups), ("near", nr_dups)):
        groups = d.select(pl.col("group").n_unique()).item() if d.height else 0
        bad = d.filter(~pl.col("labels_agree"))["group"].n_unique() if d.height else 0
        summary += [{"metric": f"{kind}_groups", "attribute": None, "value": groups},
                    {"metric": f"{kind}_images", "attribute": None, "value": d.height},
                    {"metric": f"{kind}_groups_conflicting", "attribute": None, "value": bad}]
    finite = nearest[np.isfinite(nearest)]
    if len(finite):
        summary += [{"metric": "nearest_distance_p01", "attribute": None,
                     "value": float(np.quantile(finite, 0.01))},
                    {"metric": "nearest_distance_p50", "attribute": None,
                     "value": float(np.median(finite))}]
    summary.append({"metric": "near_threshold", "attribute": None, "value": a.near_threshold})
    if conflicts.height:
        for (kind, attr), g in conflicts.group_by("kind", "attribute"):
            summary.append({"metric": f"{kind}_conflicts", "attribute": attr, "value": g.height})

    # --- leakage across splits: duplicate groups, then identities
    leak_rows, leak_counts = [], []
    for kind, d in (("exact_duplicate", ex_dups), ("near_duplicate", nr_dups)):
        if d.height:
            r, c = dup.leakage(d.select(pl.col("group").alias("key"), "image_id", "split"), kind)
            leak_rows.append(r)
            leak_counts.append(c)
    ident = "identity" if rows["identity"].null_count() < n else (
        "person" if "person" in rows.columns and rows["person"].null_count() < n else None)
    if ident:
        r, c = dup.leakage(rows.filter(pl.col(ident).is_not_null()).select(
            pl.col(ident).cast(pl.String).alias("key"), "image_id", "split"), "identity")
        leak_rows.append(r)
        leak_counts.append(c)
    leak = pl.concat(leak_rows) if leak_rows else pl.DataFrame()
    counts = pl.concat(leak_counts) if leak_counts else pl.DataFrame()
    for kind in ("exact_duplicate", "near_duplicate", "identity"):
        k_rows = leak.filter(pl.col("kind") == kind) if leak.height else leak
        summary.append({"metric": "leaking_groups", "attribute": kind,
                        "value": k_rows["key"].n_unique() if k_rows.height else 0})

    # --- probable label errors per attribute (one Ray task each), rates per group
    attrs = _audited_attributes(cfg, rows, labelled)
    present = labelled + [c for c in ("age", "gender", "race") if c in compared]
    X, xnames = _design(cfg, rows, E, labelled)
    X_ref = ray.put(X)
    task = ray.remote(num_cpus=a.cpus_per_task)(_label_task)
    plans, skipped = [], {}
    for attr in attrs:
        vals = _label_values(rows, attr, a.age_bins)
        ok = np.array([v is not None for v in vals])
        cats, cnt = np.unique(vals[ok].astype(str), return_counts=True)
        small = set(cats[cnt < a.cv_folds].tolist())
        if small:
            ok &= np.array([v is None or str(v) not in small for v in vals])
            skipped[attr] = f"classes with fewer than {a.cv_folds} images left out: {sorted(small)}"
        cats = sorted(set(vals[ok].astype(str).tolist()))
        cols = [j for j, nm in enumerate(xnames) if nm != attr and nm != TWINS.get(attr)]
        if len(cats) < 2 or not cols:
            skipped[attr] = "fewer than two classes" if len(cats) < 2 else "no model inputs"
            continue
        codes = np.array([cats.index(str(v)) for v in vals[ok]], np.int64)
        rows_idx = np.flatnonzero(ok)
        seed = derive_seed(cfg.run.seed, STAGE, "label_cv", attr)
        plans.append((attr, cats, rows_idx, codes,
                      task.remote(X_ref, rows_idx, np.asarray(cols), codes, a.cv_folds, seed)))
    issue_tables, rate_tables = [], []
    image_ids = rows["image_id"].to_numpy()
    splits = rows["split"].to_numpy()
    for attr, cats, rows_idx, codes, ref in plans:
        probs = ray.get(ref)
        is_issue, quality, rank = lab.label_issues(codes, probs)
        cat_arr = np.asarray(cats, dtype=object)
        issue_tables.append(pl.DataFrame({
            "attribute": [attr] * len(codes), "image_id": image_ids[rows_idx],
            "split": splits[rows_idx], "given": cat_arr[codes],
            "predicted": cat_arr[probs.argmax(1)],
            "p_given": probs[np.arange(len(codes)), codes].astype(np.float64),
            "quality": quality, "is_issue": is_issue, "rank": rank},
            schema_overrides={"given": pl.String, "predicted": pl.String}))
        groups = {k: v[rows_idx] for k, v in _groupings(cfg, rows, attr, present).items()}
        rates = lab.issue_rates(is_issue, groups, a.alpha)
        rate_tables.append(rates.with_columns(pl.lit(attr).alias("attribute")))
        summary += [{"metric": "label_rows", "attribute": attr, "value": len(codes)},
                    {"metric": "label_issues", "attribute": attr, "value": int(is_issue.sum())},
                    {"metric": "label_issue_rate", "attribute": attr,
                     "value": float(is_issue.mean())},
                    {"metric": "significant_groupings", "attribute": attr,
                     "value": rates.filter(pl.col("significant").fill_null(False))
                     ["group_by"].n_unique()}]
        # how far the verdicts can be trusted: the out-of-sample model against the majority class
        acc = float((probs.argmax(1) == codes).mean())
        majority = float(np.bincount(codes).max() / len(codes))
        summary += [{"metric": "label_model_accuracy", "attribute": attr, "value": acc},
                    {"metric": "label_majority_share", "attribute": attr, "value": majority}]
        log.info("[audit] %s: %d of %d labels suspect (label model accuracy %.3f, majority "
                 "%.3f)", attr, int(is_issue.sum()), len(codes), acc, majority)
    del X_ref
    issues = pl.concat(issue_tables) if issue_tables else pl.DataFrame()
    rates = pl.concat(rate_tables) if rate_tables else pl.DataFrame()

    # --- the action: drop exact duplicates whose labels conflict (recorded in errors/)
    dropped = 0
    tables.clear_errors(cfg, STAGE)
    if a.action == DROP and ex_dups.height:
        bad = ex_dups.filter(~pl.col("labels_agree")).join(
            rows.select("image_id", "uri"), on="image_id")
        errs = [{"image_id": r["image_id"], "uri": r["uri"],
                 "reason": f"audit: exact duplicate (group {r['group']}, {r['group_size']} files) "
                           f"with conflicting {', '.join(r['conflicting'])}; left out of classify "
                           f"training and evaluation (audit.action = {DROP})"}
                for r in bad.iter_rows(named=True)]
        if errs:
            dropped = tables.write_errors(cfg, STAGE, errs)
    summary.append({"metric": "dropped_images", "attribute": None, "value": dropped})

    written = {}
    for name, df in ((DUPLICATES, dups), (LABEL_CONFLICTS, conflicts), (LEAKAGE, leak),
                     (LEAKAGE_COUNTS, counts), (LABEL_ISSUES, issues), (ISSUE_RATES, rates),
                     (SUMMARY, pl.DataFrame(summary, schema={"metric": pl.String,
                                                             "attribute": pl.String,
                                                             "value": pl.Float64}))):
        written[name] = tables.replace(cfg, name, _arrow(df, name), schema=SCHEMAS[name],
                                       metadata={"action": a.action} if name == SUMMARY else None)
    return {
        "images": n,
        "exact_groups": int(ex_dups["group"].n_unique()) if ex_dups.height else 0,
        "near_groups": int(nr_dups["group"].n_unique()) if nr_dups.height else 0,
        "conflict_rows": written[LABEL_CONFLICTS],
        "leakage_rows": written[LEAKAGE],
        "label_attributes": [p[0] for p in plans],
        "label_issues": int(issues["is_issue"].sum()) if issues.height else 0,
        "label_skipped": skipped,
        "dropped_images": dropped,
        "seconds": round(time.time() - t0, 2),
    }


def excluded_image_ids(cfg: Config) -> list[str]:
    """Images the audit keeps out of training and evaluation (``audit.action`` = drop), read
    from ``errors/audit.parquet``; empty under ``report``."""
    if cfg.audit.action != DROP or not tables.exists(cfg, "errors"):
        return []
    t = tables.read_errors(cfg, STAGE)
    return sorted(set(t["image_id"].drop_null().to_pylist()))
