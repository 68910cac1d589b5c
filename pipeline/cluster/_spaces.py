"""Read ``manifest/`` (and ``features/`` when it exists) and build the feature spaces.

* ``annotations``: the manifest's ground-truth boolean attributes as 0/1, the classify target
  left out. Rows with a null attribute are left out (errors/ row each).
* ``semantic``: the features table's ``p_<Attribute>`` probabilities (or their 0/1 form with
  ``cluster.binarize_semantic``), ``p_<target>`` left out.
* ``embedding``: the features table's ``embedding`` projected by a PCA fitted on a seeded sample
  of ``cluster.pca_fit_rows`` rows and applied to every row.

Rows are ordered by ``image_id`` so that seeded samples pick the same images on every rerun.
A space whose input is missing is not built; the reason is returned for run.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage, tables
from pipeline.config import Config
from pipeline.schemas import manifest_attributes
from pipeline.seeds import derive_seed, sample_indices

log = logging.getLogger(__name__)

# Manifest columns that describe people and are profiled as demographics when present (UTKFace).
DEMOGRAPHIC_COLUMNS = ("race", "gender", "age")
# Age bins for the demographic composition (years, right-open; the last is open-ended).
AGE_BINS = ((0, 18, "0-17"), (18, 30, "18-29"), (30, 45, "30-44"), (45, 60, "45-59"),
            (60, 10_000, "60+"))


@dataclass
class Space:
    """One feature space: its rows (image ids) and the matrix clustered."""

    name: str
    image_ids: np.ndarray  # object array of str, sorted
    X: np.ndarray  # float32, rows aligned with image_ids
    columns: list[str]  # what each column of X is (attribute names or PC1..)
    info: dict = field(default_factory=dict)  # details for run.json (PCA variance ...)


@dataclass
class Inputs:
    """What the stage read: the manifest's labels and the features table, aligned by image_id."""

    image_ids: np.ndarray  # manifest image ids, sorted
    attributes: list[str]  # manifest boolean attributes
    truth: dict[str, np.ndarray]  # attribute -> bool array (nulls as False; see valid)
    valid: dict[str, np.ndarray]  # attribute -> bool array: the value is not null
    demographics: dict[str, np.ndarray]  # race/gender/age_bin -> object array (None = unknown)
    features: pa.Table | None  # features rows joined to the manifest, sorted by image_id
    errors: list[dict]  # rows for errors/
    has_embedding: bool = False  # features/ has an embedding column (streamed, never held whole)
    _feature_ids: np.ndarray | None = None

    def feature_ids(self) -> np.ndarray:
        """``features``' image ids as an object array (made once: every space and the
        profiles index by it, and each copy is ~14 MB of str objects at 202,599 rows)."""
        if self._feature_ids is None:
            self._feature_ids = self.features["image_id"].to_numpy(zero_copy_only=False)
        return self._feature_ids


def _feature_schema(cfg: Config) -> pa.Schema | None:
    loc = tables.location(cfg, "features")
    files = storage.parquet_files(loc)
    if not files:
        return None
    try:
        return pads.dataset(files, filesystem=loc.fs, format="parquet").schema
    except (OSError, pa.ArrowException) as exc:
        raise storage.StorageError(storage.describe_error(loc.uri, exc)) from None


def load_inputs(cfg: Config, need_embedding: bool) -> Inputs:
    """The manifest's labels and, when present, the features table (joined on image_id)."""
    if not tables.exists(cfg, "manifest"):
        raise FileNotFoundError(
            f"{tables.location(cfg, 'manifest').uri}: no manifest table; the cluster stage "
            "reads the ingest stage's output (run `python -m jobs.ingest` first)")
    loc = tables.location(cfg, "manifest")
    files = storage.parquet_files(loc)
    mschema = pads.dataset(files, filesystem=loc.fs, format="parquet").schema
    attrs = manifest_attributes(mschema)
    demo_cols = [c for c in DEMOGRAPHIC_COLUMNS if c in mschema.names]
    manifest = tables.read(cfg, "manifest", columns=["image_id", *attrs, *demo_cols])
    manifest = manifest.sort_by("image_id")
    ids = np.asarray(manifest["image_id"].to_pylist(), dtype=object)
    if len(set(ids)) != len(ids):
        raise ValueError("manifest has duplicate image_id values; the ingest stage must write "
                         "one row per image")
    truth, valid = {}, {}
    for a in attrs:
        col = manifest[a]
        valid[a] = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        truth[a] = np.asarray(col.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    demographics = {}
    for c in demo_cols:
        vals = manifest[c].to_pylist()
        if all(v is None for v in vals):
            continue  # the column exists in every manifest; only UTKFace fills it
        if c == "age":
            demographics["age_bin"] = np.asarray([_age_bin(v) for v in vals], dtype=object)
        else:
            demographics[c] = np.asarray([None if v is None else str(v) for v in vals], dtype=object)

    errors: list[dict] = []
    features = None
    fschema = _feature_schema(cfg)
    if fschema is not None:
        # The embedding is streamed by build_embedding (it is the one column that grows with
        # n x d: 1 GB at 202,599 x 1280); the driver holds only ids and probabilities here.
        cols = ["image_id"] + [n for n in fschema.names if n.startswith("p_")]
        features = tables.read(cfg, "features", columns=cols).sort_by("image_id")
        # a hash lookup: numpy's isin on object arrays compares every pair (4e10 string
        # comparisons at 202,599 rows; the scale benchmark's cluster stage sat here 9 minutes
        # before it was stopped)
        known = pc.is_in(features["image_id"], value_set=manifest["image_id"])
        if not pc.all(known).as_py():
            for fid in features.filter(pc.invert(known))["image_id"].to_pylist():
                errors.append({"image_id": fid, "uri": None,
                               "reason": "features row has no manifest row (left out of clustering)"})
            features = features.filter(known)
        dup = pc.count_distinct(features["image_id"]).as_py() != features.num_rows
        if dup:
            raise ValueError("features table has duplicate image_id values; rerun the extract "
                             "stage (--force extract)")
    has_embedding = bool(need_embedding and fschema is not None and "embedding" in fschema.names)
    return Inputs(ids, attrs, truth, valid, demographics, features, errors, has_embedding)


def _age_bin(age) -> str | None:
    if age is None:
        return None
    for lo, hi, name in AGE_BINS:
        if lo <= age < hi:
            return name
    return None


def build_annotations(cfg: Config, inp: Inputs) -> tuple[Space | None, str]:
    target = cfg.classify.target
    cols = [a for a in inp.attributes if a != target]
    if not cols:
        return None, "the manifest has no annotated attributes besides the target"
    ok = np.logical_and.reduce([inp.valid[a] for a in cols])
    for i in np.flatnonzero(~ok):
        inp.errors.append({"image_id": inp.image_ids[i], "uri": None,
                           "reason": "null attribute value: left out of the annotations space"})
    X = np.stack([inp.truth[a][ok] for a in cols], axis=1).astype(np.float32)
    return Space("annotations", inp.image_ids[ok], X, cols, {"dims": len(cols)}), ""


def _finite_rows(space: str, ids: np.ndarray, X: np.ndarray, errors: list[dict]) -> np.ndarray:
    ok = np.isfinite(X).all(axis=1)
    for i in np.flatnonzero(~ok):
        errors.append({"image_id": ids[i], "uri": None,
                       "reason": f"non-finite {space} features: left out of the {space} space"})
    return ok


def build_semantic(cfg: Config, inp: Inputs) -> tuple[Space | None, str]:
    if inp.features is None:
        return None, "no features table (the extract stage has not run)"
    target = f"p_{cfg.classify.target}"
    pcols = [n for n in inp.features.column_names if n.startswith("p_") and n != target]
    if not pcols:
        return None, "the features table has no p_<Attribute> columns besides the target"
    ids = inp.feature_ids()
    X = np.stack([inp.features[c].to_numpy(zero_copy_only=False).astype(np.float32)
                  for c in pcols], axis=1)
    ok = _finite_rows("semantic", ids, X, inp.errors)
    X = X[ok]
    if cfg.cluster.binarize_semantic:
        X = (X >= 0.5).astype(np.float32)
    return Space("semantic", ids[ok], X, [c[2:] for c in pcols],
                 {"dims": len(pcols), "binarized": cfg.cluster.binarize_semantic}), ""


def embedding_matrix(col: pa.ChunkedArray) -> np.ndarray:
    """A (n, d) float32 matrix from a (fixed-size) list column; ragged or null rows are errors."""
    arr = col.combine_chunks()
    if arr.null_count:
        raise ValueError(f"features.embedding has {arr.null_count} null rows; the extract stage "
                         "must record unusable images in errors/ instead of writing nulls")
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            raise ValueError("features.embedding rows have different lengths; expected one "
                             "fixed size (rerun --force extract)")
        d = int(lengths[0]) if len(lengths) else 0
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(arr), d)


# Rows of features/ per streamed batch: 16,384 x 2048-d float32 is 128 MiB at most.
EMBEDDING_BATCH_ROWS = 16384


def _embedding_batches(cfg: Config, inp: Inputs):
    """(positions in ``inp.features``, (m, d) float32 matrix) per batch of features/ rows.

    Rows whose id is not in ``inp.features`` (no manifest row: already an errors/ row) are left
    out, so positions index the sorted ids the other spaces use.
    """
    loc = tables.location(cfg, "features")
    ds = pads.dataset(storage.parquet_files(loc), filesystem=loc.fs, format="parquet")
    value_set = inp.features["image_id"].combine_chunks()
    # readahead 1: Arrow's default (16 batches, 4 files ahead) buffers most of the embedding
    # column at once, which made the driver grow ~5 KB per row (measured 20,000 -> 60,000 rows)
    for batch in ds.to_batches(columns=["image_id", "embedding"],
                               batch_size=EMBEDDING_BATCH_ROWS, batch_readahead=1,
                               fragment_readahead=1):
        if batch.num_rows == 0:
            continue
        pos = pc.index_in(batch.column(0), value_set=value_set)
        keep = pc.is_valid(pos)
        if not pc.all(keep).as_py():
            batch, pos = batch.filter(keep), pos.filter(keep)
        yield (pos.to_numpy(zero_copy_only=False).astype(np.int64),
               embedding_matrix(pa.chunked_array([batch.column(1)])))


def build_embedding(cfg: Config, inp: Inputs) -> tuple[Space | None, str]:
    """PCA of the embedding, streamed: three passes over features/ (finite rows, the seeded fit
    sample, the projection), so the driver never holds the n x d matrix, only n x components."""
    if inp.features is None:
        return None, "no features table (the extract stage has not run)"
    if not inp.has_embedding:
        return None, "the features table has no embedding column"
    from sklearn.decomposition import PCA

    ids_all = inp.feature_ids()
    finite = np.zeros(len(ids_all), dtype=bool)
    d = 0
    for pos, E in _embedding_batches(cfg, inp):
        finite[pos] = np.isfinite(E).all(axis=1)
        d = E.shape[1]
    for i in np.flatnonzero(~finite):
        inp.errors.append({"image_id": ids_all[i], "uri": None,
                           "reason": "non-finite embedding features: left out of the embedding space"})
    ok_idx = np.flatnonzero(finite)
    ids = ids_all[ok_idx]
    n = len(ok_idx)
    if n < 3:
        return None, f"only {n} usable embedding rows"
    fit_n = min(n, cfg.cluster.pca_fit_rows)
    fit_rows = ok_idx[sample_indices(n, fit_n, cfg.run.seed, "cluster", "pca")]
    slot = np.full(len(ids_all), -1, dtype=np.int64)  # features row -> row of the fit matrix
    slot[fit_rows] = np.arange(fit_n)
    E_fit = np.empty((fit_n, d), dtype=np.float32)
    for pos, E in _embedding_batches(cfg, inp):
        s = slot[pos]
        E_fit[s[s >= 0]] = E[s >= 0]
    comps = min(cfg.cluster.pca_components, d, fit_n)
    pca = PCA(n_components=comps,
              random_state=derive_seed(cfg.run.seed, "cluster", "pca", "solver")).fit(E_fit)
    del E_fit
    row_of = np.full(len(ids_all), -1, dtype=np.int64)  # features row -> row of X
    row_of[ok_idx] = np.arange(n)
    X = np.empty((n, comps), dtype=np.float32)
    for pos, E in _embedding_batches(cfg, inp):
        r = row_of[pos]
        good = r >= 0
        X[r[good]] = pca.transform(E[good])
    info = {"dims": comps, "input_dims": d, "pca_fit_rows": fit_n,
            "pca_explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4)}
    return Space("embedding", ids, X, [f"PC{i + 1}" for i in range(comps)], info), ""


BUILDERS = {"embedding": build_embedding, "semantic": build_semantic,
            "annotations": build_annotations}
