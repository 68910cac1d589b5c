"""The classify stage's inputs: one row per usable image with its features, target, split,
cluster and sensitive-group labels, built once and shared by every fit.

Feature sources (``classify.features``), in this column order:

- ``semantic``: the extract stage's predicted probabilities ``p_<Attribute>``, except ``p_<target>``.
- ``annotations``: the manifest's ground-truth boolean attributes as 0/1, named as in the
  manifest, except the target; attributes the dataset does not annotate (all null) are left out.
- ``embedding``: the first ``classify.embedding_components`` principal components
  ``pc_1 ... pc_k`` of the embedding; PCA is fitted on the train split only (seeded).

Rows that cannot be used (target or a used annotation is null, no features row, unknown split)
go to ``errors/`` with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.decomposition import PCA

from pipeline import storage, tables
from pipeline.classify._fit import SPLIT_CODES
from pipeline.cluster import PRIMARY  # clusters/primary, owned by cluster
from pipeline.config import CELEBA_ATTRIBUTES, Config
from pipeline.schemas import SPLITS, manifest_attributes
from pipeline.seeds import derive_seed

log = logging.getLogger(__name__)


class NoTarget(Exception):
    """The manifest has no labels at all (e.g. a plain folder of faces)."""


def dataset_schema(features: list[str]) -> pa.Schema:
    """``classifiers/dataset``: the exact matrix the models were trained and evaluated on."""
    return pa.schema(
        [pa.field("image_id", pa.string(), nullable=False),
         pa.field("split", pa.string(), nullable=False),  # train / val / test
         pa.field("cluster", pa.int32()),  # clusters/primary; null = none (or noise)
         pa.field("target", pa.bool_(), nullable=False)]  # classify.target
        + [pa.field(f, pa.float64(), nullable=False) for f in features])


@dataclass
class Inputs:
    image_id: np.ndarray  # str, sorted
    split: np.ndarray  # int8 codes (SPLIT_CODES)
    y: np.ndarray  # bool
    cluster: np.ndarray  # int32, -1 = no cluster
    X: np.ndarray  # float64 n × f
    feature_names: list[str]
    sensitive: dict[str, np.ndarray]  # name -> object array of group labels (None = missing)
    has_clusters: bool
    errors: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def arrays(self) -> dict:
        """What the fit tasks need (goes through the object store once)."""
        return {"X": self.X, "y": self.y, "cluster": self.cluster, "split": self.split,
                "feature_names": list(self.feature_names)}

    def table(self) -> pa.Table:
        split_names = np.array(list(SPLIT_CODES))[self.split]
        cols = {"image_id": self.image_id.astype(object), "split": split_names,
                "cluster": pa.array(self.cluster, pa.int32(), mask=self.cluster < 0),
                "target": self.y}
        for j, name in enumerate(self.feature_names):
            cols[name] = self.X[:, j]
        return pa.table(cols, schema=dataset_schema(self.feature_names))


def _complete_rows(df: pl.DataFrame, cols: list[str], reason: str, nan_is_missing: bool
                   ) -> tuple[pl.DataFrame, list[dict]]:
    """Rows of ``df`` with every one of ``cols`` present, cast to float64, and an error row for
    each dropped image (NaN counts as missing only for float columns: booleans have none)."""
    missing = [pl.col(x).is_null() | pl.col(x).is_nan() if nan_is_missing else pl.col(x).is_null()
               for x in cols]
    bad = df.filter(pl.any_horizontal(missing))
    errors = [{"image_id": i, "uri": None, "reason": reason} for i in bad["image_id"].to_list()]
    kept = df.filter(~pl.col("image_id").is_in(bad["image_id"]))
    return kept.with_columns([pl.col(x).cast(pl.Float64) for x in cols]), errors


def _null_errors(df: pl.DataFrame, col: str, reason: str) -> list[dict]:
    bad = df.filter(pl.col(col).is_null())
    return [{"image_id": r["image_id"], "uri": r.get("uri"), "reason": reason}
            for r in bad.select([c for c in ("image_id", "uri") if c in bad.columns]).to_dicts()]


def load_inputs(cfg: Config) -> Inputs:
    """The rows every fit shares: manifest rows with a known split and target (less those the
    audit keeps out), joined to their feature blocks, clusters and sensitive-group labels."""
    c = cfg.classify
    target = c.target
    m, attrs, labelled = _read_manifest(cfg)
    errors: list[dict] = []
    notes: dict = {}
    m = _usable_rows(cfg, m, errors, notes)
    feats = None
    if any(s in c.features for s in ("semantic", "embedding")):
        feats, m = _read_features(cfg, m, errors)
    names: list[str] = []
    blocks: list[pl.DataFrame] = []  # per source: image_id + feature columns
    for source in c.features:
        if source == "semantic":
            block, cols = _semantic_block(target, feats, errors)
        elif source == "annotations":
            block, cols = _annotation_block(target, m, attrs, labelled, errors, notes)
        elif source == "embedding":
            block, cols = _embedding_block(cfg, m, feats, notes)
        else:  # the config's Literal already forbids this
            raise ValueError(f"unknown feature source {source!r}")
        blocks.append(block)
        names += cols
    if target in names or f"p_{target}" in names:  # the target must never be its own feature
        raise AssertionError(f"target {target} leaked into the features")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate feature names across classify.features sources: {names}")

    base = m.select("image_id", "split", pl.col(target).alias("__target"),
                    *[pl.col(s) for s in c.sensitive if s in m.columns])
    for b in blocks:
        base = base.join(b, on="image_id", how="inner")
    base, has_clusters = _join_clusters(cfg, base, notes)
    base = base.sort("image_id")
    sensitive = _sensitive_groups(cfg, m, base, notes)
    return Inputs(
        image_id=base["image_id"].to_numpy().astype(object),
        split=base["split"].replace_strict(SPLIT_CODES, return_dtype=pl.Int8).to_numpy(),
        y=base["__target"].to_numpy().astype(bool),
        cluster=base["cluster"].fill_null(-1).to_numpy().astype(np.int32),
        X=base.select(names).to_numpy().astype(np.float64) if names else np.zeros((base.height, 0)),
        feature_names=names, sensitive=sensitive, has_clusters=has_clusters,
        errors=errors, notes=notes)


def _read_manifest(cfg: Config) -> tuple[pl.DataFrame, list[str], list[str]]:
    """(manifest, its boolean attributes, those annotated for some image); refuses a target
    that is not a labelled boolean attribute (:class:`NoTarget` when the dataset lacks it)."""
    c = cfg.classify
    target = c.target
    mschema = storage.read_schema(tables.location(cfg, "manifest"))
    if mschema is None:
        raise FileNotFoundError(f"{tables.location(cfg, 'manifest').uri}: no manifest table; "
                                "run the ingest stage first")
    attrs = manifest_attributes(mschema)
    # only the columns used: the manifest also carries landmarks, identities, paths ...
    wanted = ["image_id", "uri", "split", *attrs,
              *[s for s in c.sensitive if s in mschema.names and s not in attrs]]
    manifest = tables.read(cfg, "manifest", columns=[n for n in wanted if n in mschema.names])
    m = pl.from_arrow(manifest)
    del manifest
    labelled = [a for a in attrs if m[a].null_count() < m.height]
    if not labelled:
        raise NoTarget("the manifest holds no annotated boolean attribute (nothing to classify)")
    if target not in m.columns and target in CELEBA_ATTRIBUTES:
        # a CelebA attribute this dataset does not annotate (UTKFace has only Male and Young):
        # nothing to classify here, which is not a config error
        raise NoTarget(f"classify.target={target!r} is not annotated in this dataset "
                       f"({cfg.data.dataset}); its annotated attributes are {labelled}")
    if target not in m.columns:
        raise ValueError(f"classify.target={target!r} is not a manifest column; annotated "
                         f"attributes are {labelled}")
    if target not in attrs:
        raise ValueError(f"classify.target={target!r} must be a boolean attribute, manifest has "
                         f"type {mschema.field(target).type}")
    if target not in labelled:
        raise NoTarget(f"classify.target={target!r} is null for every image of this dataset")
    return m, attrs, labelled


def _usable_rows(cfg: Config, m: pl.DataFrame, errors: list[dict], notes: dict) -> pl.DataFrame:
    """Rows with a known split and a target, less those the audit keeps out (each dropped row
    gets an error)."""
    target = cfg.classify.target
    bad_split = m.filter(~pl.col("split").is_in(list(SPLITS)))
    errors += [{"image_id": r["image_id"], "uri": r["uri"],
                "reason": f"classify: split {r['split']!r} is not one of {list(SPLITS)}"}
               for r in bad_split.select("image_id", "uri", "split").to_dicts()]
    m = m.filter(pl.col("split").is_in(list(SPLITS)))
    errors += _null_errors(m, target, f"classify: target {target} is null")
    m = m.filter(pl.col(target).is_not_null())
    # -- audit.action = drop_conflicting_exact: images the audit keeps out (errors/audit)
    from pipeline.audit import excluded_image_ids

    excluded = excluded_image_ids(cfg)
    if excluded:
        out = m.filter(pl.col("image_id").is_in(excluded))
        errors += [{"image_id": r["image_id"], "uri": r["uri"],
                    "reason": "classify: left out by the audit (exact duplicate with conflicting "
                              "labels; see errors/audit.parquet)"}
                   for r in out.select("image_id", "uri").to_dicts()]
        notes["audit_excluded"] = out.height
        m = m.filter(~pl.col("image_id").is_in(excluded))
    return m


def _read_features(cfg: Config, m: pl.DataFrame, errors: list[dict]
                   ) -> tuple[pa.Table, pl.DataFrame]:
    """The features/ columns the sources use, and the rows of ``m`` that have a features row
    (the others get an error)."""
    c = cfg.classify
    if not tables.exists(cfg, "features"):
        raise ValueError(f"classify.features={c.features} needs the features/ table, which "
                         f"is missing under {cfg.output.root}: run the extract stage first, "
                         "or set classify.features=[\"annotations\"]")
    fschema = storage.read_schema(tables.location(cfg, "features"))
    fcols = ["image_id"]
    if "semantic" in c.features:
        fcols += [n for n in fschema.names if n.startswith("p_")]
    if "embedding" in c.features:
        fcols.append("embedding")  # 1 GB at 202,599 x 1280: read only when it is a feature
    feats = tables.read(cfg, "features", columns=fcols)
    fids = pl.from_arrow(feats.select(["image_id"]))
    missing = m.join(fids, on="image_id", how="anti")
    errors += [{"image_id": r["image_id"], "uri": r["uri"],
                "reason": "classify: no features row for this image (extract skipped it)"}
               for r in missing.select("image_id", "uri").to_dicts()]
    return feats, m.join(fids, on="image_id", how="semi")


def _semantic_block(target: str, feats: pa.Table, errors: list[dict]
                    ) -> tuple[pl.DataFrame, list[str]]:
    """The predicted probabilities p_* except the target's (rows with a null/NaN dropped)."""
    cols = [n for n in feats.column_names if n.startswith("p_") and n != f"p_{target}"]
    if not cols:
        raise ValueError("classify.features has 'semantic' but features/ has no p_* "
                         "columns besides the target's")
    block, errs = _complete_rows(pl.from_arrow(feats.select(["image_id"] + cols)), cols,
                                 "classify: a predicted attribute is null/NaN",
                                 nan_is_missing=True)
    errors += errs
    return block, cols


def _annotation_block(target: str, m: pl.DataFrame, attrs: list[str], labelled: list[str],
                      errors: list[dict], notes: dict) -> tuple[pl.DataFrame, list[str]]:
    """The annotated attributes except the target, as 0/1 (rows with a null dropped)."""
    cols = [a for a in labelled if a != target]
    dropped = [a for a in attrs if a not in labelled]
    if dropped:
        notes["annotations_not_in_dataset"] = dropped
    if not cols:
        raise ValueError("classify.features has 'annotations' but the manifest annotates "
                         "no attribute besides the target")
    block, errs = _complete_rows(m.select(["image_id"] + cols), cols,
                                 "classify: a ground-truth annotation is null",
                                 nan_is_missing=False)
    errors += errs
    return block, cols


def _embedding_block(cfg: Config, m: pl.DataFrame, feats: pa.Table, notes: dict
                     ) -> tuple[pl.DataFrame, list[str]]:
    """The embedding's first principal components pc_1..pc_k, PCA fitted on the train split."""
    c = cfg.classify
    emb = feats.select(["image_id", "embedding"])
    ids = emb.column("image_id").to_numpy(zero_copy_only=False)
    train_ids = m.filter(pl.col("split") == "train")["image_id"].to_arrow()
    # a hash lookup: numpy's isin on object arrays compares every pair (3e10 at full CelebA)
    is_train = pc.is_in(emb.column("image_id"),
                        value_set=train_ids.cast(emb.schema.field("image_id").type)).to_numpy(
        zero_copy_only=False)
    col = emb.column("embedding").combine_chunks()
    if col.null_count:
        raise ValueError("features/embedding has null rows; rerun extract")
    # float32 as extracted (a float64 copy is 2 GB at 202,599 x 1280)
    E = col.flatten().to_numpy().reshape(len(col), -1)
    del emb, col
    k = min(c.embedding_components, E.shape[1], int(is_train.sum()))
    if k < 1:
        raise ValueError("no train rows with an embedding to fit the PCA on")
    pca = PCA(n_components=k, svd_solver="randomized",
              random_state=derive_seed(cfg.run.seed, "classify", "pca"))
    pca.fit(E[is_train])
    Z = pca.transform(E)
    cols = [f"pc_{j + 1}" for j in range(k)]
    notes["embedding_pca_explained_variance"] = float(pca.explained_variance_ratio_.sum())
    return (pl.DataFrame({"image_id": ids, **{n: Z[:, j] for j, n in enumerate(cols)}},
                         schema_overrides={"image_id": pl.String}), cols)


def _join_clusters(cfg: Config, base: pl.DataFrame, notes: dict) -> tuple[pl.DataFrame, bool]:
    """``base`` with each row's clusters/primary cluster (null: none or noise); whether the
    table exists."""
    has_clusters = tables.exists(cfg, PRIMARY)
    if has_clusters:
        cl = pl.from_arrow(tables.read(cfg, PRIMARY, columns=["image_id", "cluster"]))
        base = base.join(cl.with_columns(pl.col("cluster").cast(pl.Int32)), on="image_id",
                         how="left")
        # negative labels are "noise" (HDBSCAN); such rows belong to no cluster
        n_noise = base.filter(pl.col("cluster") < 0).height
        if n_noise:
            notes["rows_in_noise_cluster"] = n_noise
        base = base.with_columns(pl.when(pl.col("cluster") >= 0).then(pl.col("cluster"))
                                 .otherwise(None).alias("cluster"))
        notes["rows_without_cluster"] = int(base["cluster"].null_count())
    else:
        notes["clusters"] = ("clusters/primary missing: per-cluster models and the cluster / "
                             "cluster_class samplings are skipped")
        base = base.with_columns(pl.lit(None, dtype=pl.Int32).alias("cluster"))
    return base, has_clusters


def _sensitive_groups(cfg: Config, m: pl.DataFrame, base: pl.DataFrame, notes: dict
                      ) -> dict[str, np.ndarray]:
    """Per usable sensitive attribute, each row's group label (the others noted, with why)."""
    c = cfg.classify
    target = c.target
    sensitive: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for s in c.sensitive:
        if s == target:
            skipped[s] = "is the target"
        elif s not in m.columns:
            skipped[s] = "not a manifest column"
        elif base[s].null_count() == base.height:
            skipped[s] = "null for every image of this dataset"
        else:
            # group labels as str(value) ("True"/"False" for booleans), vectorised
            col = base[s]
            if col.dtype == pl.Boolean:
                col = pl.select(pl.when(col).then(pl.lit("True")).otherwise(pl.lit("False"))
                                .alias(s)).to_series().set(col.is_null(), None)
            else:
                col = col.cast(pl.String)
            sensitive[s] = col.to_numpy().astype(object)
    if skipped:
        notes["sensitive_skipped"] = skipped
        log.warning("classify: sensitive attributes skipped: %s", skipped)
    return sensitive
