"""The audit stage's driver: read manifest + features (+ clusters/primary), find duplicates,
conflicts, leakage and probable label errors, write the audit tables and (on request) the
exclusions in ``errors/audit.parquet``. See the package docstring for the contract."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage, tables
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

# Rows (seeded sample) the PCAs of the embedding are fitted on (near space, label-model PCs):
# the driver holds at most this many embedding rows, whatever the collection's size. Below it
# every row is used.
PCA_FIT_ROWS = 20_000


@dataclass
class Inputs:
    """What the stage audits. The embedding never sits whole on the driver: it is streamed from
    ``features/`` in batches of ``audit.block_rows`` rows, and each batch's projections go to
    Ray's object store as one block (``near_blocks``, ``pc_blocks``); ``block_rows[b]`` are the
    rows of ``rows`` that block ``b`` holds, in its order."""

    rows: pl.DataFrame  # manifest x features, sorted by image_id; audited columns only
    labelled: list[str]  # boolean attributes annotated
    compared: list[str]  # every annotation compared inside duplicate groups
    near_blocks: list  # refs: unit-norm rows of the near-duplicate space (float32)
    pc_blocks: list  # refs: the embedding's first audit.embedding_components PCs (float32)
    block_rows: list[np.ndarray]
    dim: int  # the embedding's width
    pcs: int  # columns of each pc_blocks block (0: none)
    fit_rows: int  # rows the PCAs were fitted on


def _columns(cfg: Config, name: str) -> list[str]:
    schema = storage.read_schema(tables.location(cfg, name))
    return schema.names if schema is not None else []


def _load_rows(cfg: Config) -> tuple[pl.DataFrame, list[str], list[str]]:
    """(rows, boolean attributes annotated, every annotation compared): the manifest's audited
    columns (not uri or landmarks) joined with features' image_id and content_hash."""
    for name in ("manifest", "features"):
        if not tables.exists(cfg, name):
            raise ValueError(f"audit needs {name}/ under {cfg.output.root}: run the "
                             f"{'ingest' if name == 'manifest' else 'extract'} stage first")
    schema = storage.read_schema(tables.location(cfg, "manifest"))
    attrs = manifest_attributes(schema)
    want = ["image_id", "split", *attrs, *[c for c in OTHER_LABELS if c in schema.names]]
    m = pl.from_arrow(tables.read(cfg, "manifest", columns=want))
    fcols = _columns(cfg, "features")
    if "content_hash" not in fcols:
        raise ValueError("features/ has no content_hash column (written by an older extract); "
                         "rerun it: python -m jobs.extract --config ... --force")
    if "embedding" not in fcols:
        raise ValueError("features/ has no embedding column; rerun extract: "
                         "python -m jobs.extract --config ... --force")
    f = pl.from_arrow(tables.read(cfg, "features", columns=["image_id", "content_hash"]))
    rows = m.join(f, on="image_id", how="inner").sort("image_id")
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
    return rows, labelled, labelled + others


def _embedding_batches(cfg: Config, ids: pl.Series):
    """(rows of ``ids`` they are, (m, d) float32 embedding) per batch of features/ rows."""
    loc = tables.location(cfg, "features")
    ds = pads.dataset(storage.parquet_files(loc), filesystem=loc.fs, format="parquet")
    value_set = ids.to_arrow()
    # one file and one batch read ahead: the defaults buffer several files' embeddings
    for batch in ds.to_batches(columns=["image_id", "embedding"], batch_size=cfg.audit.block_rows,
                               batch_readahead=1, fragment_readahead=1):
        if batch.num_rows == 0:
            continue
        pos = pc.index_in(batch.column(0), value_set=value_set)
        keep = pc.is_valid(pos)
        if not pc.all(keep).as_py():  # no manifest row: not audited
            batch, pos = batch.filter(keep), pos.filter(keep)
            if batch.num_rows == 0:
                continue
        emb = batch.column(1)
        if emb.null_count:
            raise ValueError(f"features.embedding has {emb.null_count} null rows; extract must "
                             "record unusable images in errors/ instead (rerun it with --force)")
        flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        yield pos.to_numpy(zero_copy_only=False).astype(np.int64), flat.reshape(len(emb), -1)


def _load(cfg: Config) -> Inputs:
    """Rows, then two passes over the embedding: the seeded PCA fit sample, the projections."""
    import ray
    from sklearn.decomposition import PCA

    a = cfg.audit
    rows, labelled, compared = _load_rows(cfg)
    n = rows.height
    ids = rows["image_id"]
    fit_n = min(n, PCA_FIT_ROWS)
    fit = np.sort(np.random.default_rng(derive_seed(cfg.run.seed, STAGE, "near_pca")).choice(
        n, size=fit_n, replace=False))
    slot = np.full(n, -1, np.int64)  # row -> row of the fit sample
    slot[fit] = np.arange(fit_n)
    E_fit, d = None, 0
    for pos, E in _embedding_batches(cfg, ids):
        if E_fit is None:
            d = E.shape[1]
            E_fit = np.empty((fit_n, d), np.float32)
        s = slot[pos]
        E_fit[s[s >= 0]] = E[s >= 0]
    near_pca = label_pca = None
    if E_fit is not None and a.near_dims and d > a.near_dims and n > a.near_dims:
        near_pca = PCA(n_components=a.near_dims, svd_solver="randomized",
                       random_state=derive_seed(cfg.run.seed, STAGE, "near_pca_fit")).fit(E_fit)
    if E_fit is not None and "embedding" in a.label_features:
        k = min(a.embedding_components, d, max(1, n - 1))
        label_pca = PCA(n_components=k, svd_solver="randomized",
                        random_state=derive_seed(cfg.run.seed, STAGE, "label_pca")).fit(E_fit)
    del E_fit
    near_blocks, pc_blocks, block_rows = [], [], []
    for pos, E in _embedding_batches(cfg, ids):
        near_blocks.append(ray.put(dup.normalise(near_pca.transform(E) if near_pca else E)))
        if label_pca is not None:
            pc_blocks.append(ray.put(label_pca.transform(E).astype(np.float32)))
        block_rows.append(pos)
    got = int(sum(len(p) for p in block_rows))
    if got != n:
        raise ValueError(f"features/ holds {got} embedding rows for the {n} audited images; "
                         "expected one per image (duplicate image ids?): rerun extract --force")
    return Inputs(rows, labelled, compared, near_blocks, pc_blocks, block_rows, d,
                  label_pca.n_components_ if label_pca is not None else 0, fit_n)


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
    col = pl.col(attr)
    if rows[attr].dtype == pl.Boolean:  # as Python writes them: "True" / "False"
        col = pl.when(col).then(pl.lit("True")).when(~col).then(pl.lit("False"))
    return rows.select(col.cast(pl.String).alias("v"))["v"].to_numpy()


def _groupings(cfg: Config, rows: pl.DataFrame, attr: str, present: list[str]
               ) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if rows["__cluster"].null_count() < rows.height:
        c = pl.col("__cluster")
        out["cluster"] = rows.select(pl.when(c >= 0).then(c.cast(pl.String)).alias("v"))[
            "v"].to_numpy()
    for s in dict.fromkeys([*cfg.classify.sensitive, "gender", "race", "age"]):
        if s == attr or TWINS.get(s) == attr or s not in present:
            continue
        if s in ("Male", "Young") and TWINS[s] in present:
            continue
        out[s] = _label_values(rows, s, cfg.audit.age_bins)
    return out


def _design_names(cfg: Config, inp: Inputs) -> list[str]:
    """Columns of the label model's inputs: embedding PCs, then the boolean annotations."""
    names = []
    names += [f"pc_{j + 1}" for j in range(inp.pcs)]
    if "annotations" in cfg.audit.label_features:
        names += inp.labelled
    return names


def _annotations(cfg: Config, inp: Inputs) -> np.ndarray:
    """The boolean annotations as int8 (1, 0, -1 = missing): n x attributes in 1 byte each."""
    if "annotations" not in cfg.audit.label_features or not inp.labelled:
        return np.zeros((inp.rows.height, 0), np.int8)
    return inp.rows.select([pl.col(a).cast(pl.Int8).fill_null(-1) for a in inp.labelled]
                           ).to_numpy().astype(np.int8, copy=False)


# --------------------------------------------------------------------------- Ray tasks

def _index_task(exact_max_rows: int, seed: int, *blocks: np.ndarray) -> np.ndarray:
    """One index over every block (stacked in block order), as bytes for the search tasks."""
    return dup.serialise_index(dup.build_index(np.concatenate(blocks),
                                               exact_max_rows=exact_max_rows, seed=seed))


def _label_task(A: np.ndarray, block_rows: np.ndarray, keep_rows, keep_cols, labels, folds,
                seed, *pc_blocks: np.ndarray):
    """The label model's inputs assembled here (never on the driver): PCs in row order, then
    the annotations with a missing value as 0.5; float64, as the model was fitted before."""
    n = len(A)
    parts = []
    if pc_blocks:
        Z = np.empty((n, pc_blocks[0].shape[1]), np.float64)
        Z[block_rows] = np.concatenate(pc_blocks)
        parts.append(Z)
    if A.shape[1]:
        parts.append(np.where(A < 0, 0.5, A).astype(np.float64))
    X = np.hstack(parts)[keep_rows][:, keep_cols]
    return lab.out_of_sample_probs(X, labels, folds, seed)


# --------------------------------------------------------------------------- stage

def _empty(name: str) -> pa.Table:
    return pa.Table.from_pylist([], schema=SCHEMAS[name])


def _arrow(df: pl.DataFrame, name: str) -> pa.Table:
    if df.height == 0:
        return _empty(name)
    return df.select([f.name for f in SCHEMAS[name]]).to_arrow()


def _label_meta(cfg: Config, inp: Inputs) -> dict[str, str]:
    a = cfg.audit
    return {"faceaudit.audit_label_model": (
        f"StandardScaler + LogisticRegression, {a.cv_folds}-fold cross_val_predict on every "
        f"labelled row; inputs: {inp.pcs} embedding PCs (PCA fitted on {inp.fit_rows} rows) + "
        f"{len(inp.labelled) if 'annotations' in a.label_features else 0} annotations")}


def _drop_parts(cfg: Config, name: str, parts: int, meta: dict[str, str]) -> None:
    """Leave exactly ``parts`` written parts in table ``name`` (an empty one when none), written
    before the older files are deleted, as :func:`tables.replace` does for one part."""
    if parts == 0:
        tables.write(cfg, name, _empty(name), schema=SCHEMAS[name], metadata=meta)
        parts = 1
    loc = tables.location(cfg, name)
    keep = {loc.join(f"part-{k:05d}.parquet").path for k in range(parts)}
    for path in storage.parquet_files(loc):
        if path not in keep:
            loc.fs.delete_file(path)


def _near_search(cfg: Config, inp: Inputs):
    """(i, j, distance, nearest) over ``inp.rows``: one index task over every block, then one
    search task per block (``audit.block_rows`` query rows each)."""
    import ray

    a = cfg.audit
    n = inp.rows.height
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.full(n, np.nan)
    build = ray.remote(num_cpus=a.cpus_per_task)(_index_task)
    search = ray.remote(num_cpus=a.cpus_per_task)(dup.neighbour_block)
    index = build.remote(dup.EXACT_MAX_ROWS, derive_seed(cfg.run.seed, STAGE, "near_index"),
                         *inp.near_blocks)
    found = ray.get([search.remote(index, b, a.near_neighbours) for b in inp.near_blocks])
    del index
    order = np.concatenate(inp.block_rows)  # index position -> row
    results = [(q, np.where(idx >= 0, order[np.maximum(idx, 0)], -1), dist)
               for q, (idx, dist) in zip(inp.block_rows, found)]
    return dup.pairs_from_neighbours(n, results, a.near_threshold)


def run(cfg: Config) -> dict:
    """Write the ``audit/*`` tables (and ``errors/audit.parquet`` under the drop action)."""
    t0 = time.time()
    a = cfg.audit
    from pipeline.ray_runtime import ensure_ray

    ensure_ray(cfg)
    inp = _load(cfg)
    rows, labelled, compared = inp.rows, inp.labelled, inp.compared
    n = rows.height
    log.info("[audit] %d images, embedding %d-d, %d annotations compared", n, inp.dim,
             len(compared))
    method = dup.search_method(n)
    summary: list[dict] = [{"metric": "images_audited", "attribute": None, "value": n},
                           {"metric": "near_search_exact", "attribute": None,
                            "value": float(n <= dup.EXACT_MAX_ROWS)},
                           {"metric": "pca_fit_rows", "attribute": None, "value": inp.fit_rows}]
    meta = {"faceaudit.audit_near_search": method,
            "faceaudit.audit_pca_fit_rows": f"{inp.fit_rows} of {n} rows (seeded sample)"}

    ex_dups, nr_dups, dups, conflicts = _duplicates(cfg, inp, summary)
    leak, counts = _leakage(rows, ex_dups, nr_dups, summary)
    # probable label errors per attribute (one Ray task each), rates per group
    plans, skipped, refs = _submit_label_tasks(cfg, inp, labelled)
    issue_parts, rate_tables, n_issues = _collect_label_issues(
        cfg, inp, plans, labelled + [c for c in ("age", "gender", "race") if c in compared],
        meta, summary)
    del refs
    inp.pc_blocks.clear()
    _drop_parts(cfg, LABEL_ISSUES, len(issue_parts), meta)
    rates = pl.concat(rate_tables) if rate_tables else pl.DataFrame()
    dropped = _drop_conflicting(cfg, ex_dups)
    summary.append({"metric": "dropped_images", "attribute": None, "value": dropped})

    written = {LABEL_ISSUES: sum(issue_parts)}
    for name, df in ((DUPLICATES, dups), (LABEL_CONFLICTS, conflicts), (LEAKAGE, leak),
                     (LEAKAGE_COUNTS, counts), (ISSUE_RATES, rates),
                     (SUMMARY, pl.DataFrame(summary, schema={"metric": pl.String,
                                                             "attribute": pl.String,
                                                             "value": pl.Float64}))):
        written[name] = tables.replace(cfg, name, _arrow(df, name), schema=SCHEMAS[name],
                                       metadata={**meta, "action": a.action} if name == SUMMARY else meta)
    return {
        "images": n,
        "exact_groups": int(ex_dups["group"].n_unique()) if ex_dups.height else 0,
        "near_groups": int(nr_dups["group"].n_unique()) if nr_dups.height else 0,
        "conflict_rows": written[LABEL_CONFLICTS],
        "leakage_rows": written[LEAKAGE],
        "label_attributes": [p[0] for p in plans],
        "label_issues": n_issues,
        "label_skipped": skipped,
        "dropped_images": dropped,
        "seconds": round(time.time() - t0, 2),
    }


def _duplicates(cfg: Config, inp, summary: list[dict]):
    """Exact duplicates (content hash) and near duplicates (embedding neighbours), their label
    conflicts and summary rows. Returns (exact, near, all duplicates, conflicts)."""
    a = cfg.audit
    rows, compared = inp.rows, inp.compared
    n = rows.height
    exact = dup.exact_groups(rows["content_hash"])
    pi, pj, pd_, nearest = _near_search(cfg, inp)
    inp.near_blocks.clear()  # frees them in the object store
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
    return ex_dups, nr_dups, dups, conflicts


def _leakage(rows: pl.DataFrame, ex_dups: pl.DataFrame, nr_dups: pl.DataFrame,
             summary: list[dict]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Leakage across splits: duplicate groups, then identities; (rows, counts)."""
    n = rows.height
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
    return leak, counts


def _submit_label_tasks(cfg: Config, inp, labelled: list[str]):
    """One cross-validated label task per audited attribute; returns (plans, skipped attributes
    with why, the tasks' shared object refs: kept until every task is collected)."""
    import ray

    a = cfg.audit
    rows = inp.rows
    attrs = _audited_attributes(cfg, rows, labelled)
    xnames = _design_names(cfg, inp)
    A_ref = ray.put(_annotations(cfg, inp))
    order_ref = ray.put(np.concatenate(inp.block_rows) if inp.block_rows
                        else np.zeros(0, np.int64))
    task = ray.remote(num_cpus=a.cpus_per_task)(_label_task)
    plans, skipped = [], {}
    for attr in attrs:
        vals = _label_values(rows, attr, a.age_bins)
        ok = vals != None  # noqa: E711 (elementwise on an object array)
        cats, inverse, cnt = np.unique(vals[ok].astype(str), return_inverse=True,
                                       return_counts=True)
        small = cnt < a.cv_folds
        if small.any():
            skipped[attr] = (f"classes with fewer than {a.cv_folds} images left out: "
                             f"{sorted(cats[small].tolist())}")
        keep = ~small[inverse]  # among the labelled rows
        rows_idx = np.flatnonzero(ok)[keep]
        # classes renumbered 0..K-1 over those kept, in sorted order
        cats_kept = cats[~small]
        codes = (np.cumsum(~small) - 1)[inverse[keep]].astype(np.int64)
        cols = [j for j, nm in enumerate(xnames) if nm != attr and nm != TWINS.get(attr)]
        if len(cats_kept) < 2 or not cols:
            skipped[attr] = "fewer than two classes" if len(cats_kept) < 2 else "no model inputs"
            continue
        seed = derive_seed(cfg.run.seed, STAGE, "label_cv", attr)
        plans.append((attr, cats_kept.tolist(), rows_idx, codes,
                      task.remote(A_ref, order_ref, rows_idx, np.asarray(cols), codes,
                                  a.cv_folds, seed, *inp.pc_blocks)))
    return plans, skipped, (A_ref, order_ref)


def _collect_label_issues(cfg: Config, inp, plans: list, present: list[str], meta: dict,
                          summary: list[dict]) -> tuple[list[int], list[pl.DataFrame], int]:
    """One attribute's rows at a time on the driver: each is its own part of
    audit/label_issues. Returns (rows per part, issue-rate tables, issue count)."""
    import ray

    a = cfg.audit
    rows = inp.rows
    issue_parts, rate_tables, n_issues = [], [], 0
    for attr, cats, rows_idx, codes, ref in plans:
        probs = ray.get(ref)
        is_issue, quality, rank = lab.label_issues(codes, probs)
        cat_s = pl.Series(cats, dtype=pl.String)
        part = pl.DataFrame({
            "attribute": pl.repeat(attr, len(codes), eager=True, dtype=pl.String),
            "image_id": rows["image_id"].gather(rows_idx),
            "split": rows["split"].gather(rows_idx), "given": cat_s.gather(codes),
            "predicted": cat_s.gather(probs.argmax(1)),
            "p_given": probs[np.arange(len(codes)), codes].astype(np.float64),
            "quality": quality, "is_issue": is_issue, "rank": rank})
        issue_parts.append(tables.write(
            cfg, LABEL_ISSUES, _arrow(part, LABEL_ISSUES), schema=SCHEMAS[LABEL_ISSUES],
            part=f"part-{len(issue_parts):05d}", metadata={**meta, **_label_meta(cfg, inp)}))
        n_issues += int(is_issue.sum())
        del part
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
    return issue_parts, rate_tables, n_issues


def _drop_conflicting(cfg: Config, ex_dups: pl.DataFrame) -> int:
    """The action: drop exact duplicates whose labels conflict (recorded in errors/); returns
    how many images were dropped."""
    a = cfg.audit
    dropped = 0
    tables.clear_errors(cfg, STAGE)
    if a.action == DROP and ex_dups.height:
        bad = ex_dups.filter(~pl.col("labels_agree")).join(
            pl.from_arrow(tables.read(cfg, "manifest", columns=["image_id", "uri"])),
            on="image_id")
        errs = [{"image_id": r["image_id"], "uri": r["uri"],
                 "reason": f"audit: exact duplicate (group {r['group']}, {r['group_size']} files) "
                           f"with conflicting {', '.join(r['conflicting'])}; left out of classify "
                           f"training and evaluation (audit.action = {DROP})"}
                for r in bad.iter_rows(named=True)]
        if errs:
            dropped = tables.write_errors(cfg, STAGE, errs)
    return dropped


def excluded_image_ids(cfg: Config) -> list[str]:
    """Images the audit keeps out of training and evaluation (``audit.action`` = drop), read
    from ``errors/audit.parquet``; empty under ``report``."""
    if cfg.audit.action != DROP or not tables.exists(cfg, "errors"):
        return []
    t = tables.read_errors(cfg, STAGE)
    return sorted(set(t["image_id"].drop_null().to_pylist()))
