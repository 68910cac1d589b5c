"""Explain the classifiers with SHAP, in parallel on Ray, and compare what drives them per cluster.

Input (written by the classify stage):

- ``classifiers/dataset``: ``image_id``, ``split``, ``cluster`` (int32, nullable), ``target``,
  then one float64 column per feature.
- ``classifiers/models``: one row per fitted model (:data:`pipeline.classify.MODELS_SCHEMA`, read
  with :func:`pipeline.classify.read_models`): ``model``, ``sampling``, ``trained_on``
  (``"global"`` or ``"cluster_<c>"``), ``cluster``, ``path`` (skops file under
  ``classifiers/model_files/``, relative to the output root), ``features`` (the model's input
  columns, in order), ``n_train``, ``target``.

Which rows are explained: a global model explains the test rows (all, or a seeded sample of
``explain.max_rows``); a cluster-``c`` model explains the test rows of cluster ``c``. All global
models share one row sample and one background, so their values line up row by row.

Explainers (exact ones only, so additivity can be checked):

- RandomForest / ExtraTrees / DecisionTree: ``shap.TreeExplainer`` with ``model_output="raw"``,
  interventional, on a background of ``explain.background_rows`` train rows of the model's scope
  (drawn with a seed derived from ``run.seed``). For sklearn forests "raw" is the probability of
  the positive class, so ``output = "probability"`` and the check is against ``predict_proba[:, 1]``.
- HistGradientBoosting / GradientBoosting: ``TreeExplainer`` in ``tree_path_dependent`` mode
  (no background), ``output = "log_odds"`` checked against ``decision_function``. Why not
  interventional: with shap 0.51 interventional TreeSHAP on HistGradientBoosting breaks
  additivity (measured: up to 0.44 log-odds off on 20 features), and this stage refuses values
  that do not add up.
- LogisticRegression (bare or the last step of a Pipeline, e.g. StandardScaler + LR):
  ``shap.LinearExplainer`` on the final step, with the background and the rows passed through the
  preceding steps; the preceding steps must map features one to one, so the values are per
  original feature. ``output = "log_odds"`` checked against the whole pipeline's
  ``decision_function`` (so a wrong transform also fails the check).

Parallelism: the rows of every model are cut into blocks of ``explain.block_rows``; each block is
one Ray task (``explain.cpus_per_task`` CPUs). Each model and its background are ``ray.put`` once
and every block task of that model receives the same object refs. Results are taken as they
finish (``ray.wait``), additivity is checked on the driver for every block (a failing block
raises :class:`AdditivityError` naming the model and the block), and each block is written at
once as its own part of ``shap/values`` (``<model>__<sampling>__<trained_on>__b<block>``), so
nothing waits for the slowest model and nothing holds all values in memory: importance is
accumulated as running sums, and only ``explain.plot_rows`` rows per (model, cluster) are kept
for the beeswarm plots.

Reruns and resumes: part names are deterministic, so a rerun replaces rather than duplicates;
parts no longer planned are removed. Each part carries a content key (model file digest,
background, rows, explainer settings); a part whose key matches is reused, not recomputed, so a
stage that died half-way resumes where it stopped.

Cost control (deep forests are the expensive case; interventional TreeSHAP costs roughly
rows x background rows x trees x depth):

- ``classify.params.random_forest.max_depth`` (and ``min_samples_leaf``, ``n_estimators``) cap
  the forest's size at training time; the classify stage passes them to the estimator.
- ``explain.max_rows`` caps the rows explained per model; ``explain.background_rows`` the
  background; ``explain.block_rows`` sets the task size (big enough that the task's overhead,
  ~10 ms, is small against its work; small enough to keep every CPU busy).

Outputs: ``shap/values``, ``shap/importance`` (mean |SHAP| per model x evaluated cluster, with
rank), ``shap/comparison`` (Kendall's tau and top-k overlap between clusters and against the
global model), and PNG beeswarm plots under ``shap/plots/`` named by :func:`beeswarm_name` (the
report finds them from ``shap/importance`` rows through that function, never by parsing names).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import modelfiles, storage, tables
from pipeline.classify import DATASET_TABLE as CLASSIFY_DATASET
from pipeline.classify import MODELS_TABLE as CLASSIFY_MODELS
from pipeline.classify import model_key, read_models
from pipeline.config import Config
from pipeline.progress import Progress
from pipeline.seeds import sample_indices
from pipeline.stages import StageSkipped

log = logging.getLogger(__name__)

VALUES = "shap/values"
IMPORTANCE = "shap/importance"
COMPARISON = "shap/comparison"
PLOTS = "shap/plots"  # PNG figures, not a table


def beeswarm_name(model: str, sampling: str, trained_on: str, cluster: int | None) -> str:
    """File name (under :data:`PLOTS`) of the beeswarm of model ``trained_on`` on ``cluster``'s
    test rows (None: all rows); one per ``shap/importance`` (model, sampling, trained_on,
    cluster) that has plotted rows."""
    where = "all" if cluster is None else f"cluster_{int(cluster)}"
    return f"beeswarm__{model_key(model, sampling, trained_on)}__{where}.png"

# Columns of shap/values before the per-feature columns.
_VALUE_BASE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),  # random_forest, logistic_regression ...
    pa.field("sampling", pa.string(), nullable=False),  # none, class, cluster, cluster_class
    pa.field("trained_on", pa.string(), nullable=False),  # "global" or "cluster_<c>"
    pa.field("cluster", pa.int32()),  # the row's cluster (null when it has none)
    pa.field("output", pa.string(), nullable=False),  # what SHAP explains: probability | log_odds
    pa.field("base_value", pa.float64(), nullable=False),  # explainer's expected value
    pa.field("model_output", pa.float64(), nullable=False),  # the model's output for the row
]

IMPORTANCE_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("trained_on", pa.string(), nullable=False),
    pa.field("cluster", pa.int32()),  # the evaluated cluster; null = all explained rows
    pa.field("output", pa.string(), nullable=False),
    pa.field("feature", pa.string(), nullable=False),
    pa.field("mean_abs_shap", pa.float64(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),  # 1 = most important; ties share the best
    pa.field("n_rows", pa.int64(), nullable=False),  # rows the mean is over
])

COMPARISON_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # which comparison, see _comparison_pairs
    pa.field("left_trained_on", pa.string(), nullable=False),
    pa.field("left_cluster", pa.int32()),  # null = all rows
    pa.field("right_trained_on", pa.string(), nullable=False),
    pa.field("right_cluster", pa.int32()),
    pa.field("n_features", pa.int32(), nullable=False),  # features both vectors have
    pa.field("kendall_tau", pa.float64()),  # on mean|SHAP| over the shared features; null if undefined
    pa.field("kendall_p", pa.float64()),
    pa.field("k", pa.int32(), nullable=False),
    # |top-k(left) & top-k(right)| / k; null when a vector is all zero (a constant model)
    pa.field("top_k_overlap", pa.float64()),
])


def values_schema(features: list[str]) -> pa.Schema:
    """``shap/values``: the fixed columns, then one float64 column per feature (null where the
    row's model does not use the feature)."""
    taken = {f.name for f in _VALUE_BASE_FIELDS}
    clash = [f for f in features if f in taken]
    if clash:
        raise ExplainError(f"feature names {clash} clash with shap/values columns; rename them "
                           "in the classify stage")
    return pa.schema(_VALUE_BASE_FIELDS + [pa.field(f, pa.float64()) for f in features])


# Every table the stage writes (values' schema depends on the models' features, hence a function)
SCHEMAS = {VALUES: values_schema, IMPORTANCE: IMPORTANCE_SCHEMA, COMPARISON: COMPARISON_SCHEMA}


class ExplainError(RuntimeError):
    """The explain stage cannot proceed; the message says what was expected and found."""


class AdditivityError(ExplainError):
    """A block's SHAP values plus the base value do not reproduce the model's output."""


# ---------------------------------------------------------------------------------------------
# Models and explainers (pure functions, used by the Ray tasks and by the benchmark baseline)

_PROBABILITY_TREES = ("RandomForestClassifier", "ExtraTreesClassifier", "DecisionTreeClassifier")
_BOOSTED_TREES = ("HistGradientBoostingClassifier", "GradientBoostingClassifier")
_LINEAR = ("LogisticRegression", "LogisticRegressionCV", "SGDClassifier", "RidgeClassifier",
           "LinearSVC")


def split_pipeline(model) -> tuple[Any, Any]:
    """``(preprocessing or None, final estimator)`` of a bare estimator or a Pipeline."""
    from sklearn.pipeline import Pipeline

    if isinstance(model, Pipeline):
        pre = model[:-1] if len(model.steps) > 1 else None
        return pre, model.steps[-1][1]
    return None, model


def explainer_kind(model) -> dict[str, str]:
    """How ``model`` is explained: ``{"explainer", "output", "perturbation"}``."""
    _, final = split_pipeline(model)
    name = type(final).__name__
    classes = getattr(final, "classes_", None)
    if classes is None:
        raise ExplainError(f"{name} is not fitted (no classes_)")
    if len(classes) != 2:
        raise ExplainError(f"{name} has {len(classes)} classes {list(classes)}; explain needs a "
                           "binary classifier (was a cluster trained on one class only?)")
    if name in _PROBABILITY_TREES:
        return {"explainer": "tree", "output": "probability", "perturbation": "interventional"}
    if name in _BOOSTED_TREES:
        return {"explainer": "tree", "output": "log_odds", "perturbation": "tree_path_dependent"}
    if name in _LINEAR:
        return {"explainer": "linear", "output": "log_odds", "perturbation": "interventional"}
    raise ExplainError(f"no exact SHAP explainer for {name}; supported: "
                       f"{sorted(_PROBABILITY_TREES + _BOOSTED_TREES + _LINEAR)}")


def model_output(model, X: np.ndarray, output: str) -> np.ndarray:
    """The quantity SHAP explains, from the whole model (pipeline included)."""
    if output == "probability":
        return np.asarray(model.predict_proba(X), dtype=np.float64)[:, 1]
    return np.asarray(model.decision_function(X), dtype=np.float64).reshape(-1)


def _transform(pre, X: np.ndarray) -> np.ndarray:
    if pre is None:
        return X
    Xt = np.asarray(pre.transform(X), dtype=np.float64)
    if Xt.shape[1] != X.shape[1]:
        raise ExplainError(f"the pipeline's preprocessing maps {X.shape[1]} features to "
                           f"{Xt.shape[1]}; SHAP values per original feature need a one-to-one "
                           "transform (e.g. StandardScaler)")
    return Xt


def as_tree_input(Xt: np.ndarray) -> np.ndarray:
    """``Xt`` rounded to float32, as scikit-learn's trees see it at predict time.

    sklearn casts X to float32 before walking a tree while shap walks the interventional
    background in float64, so a background value within float32 rounding of a split threshold
    took opposite branches in the two: the base value (the model's mean on the background) then
    disagreed with the values' paths and additivity broke (real CelebA: 0.0045 off, random
    forest on 39 scaled features). Rows to explain get the same rounding, for the same reason.
    """
    return np.asarray(Xt, dtype=np.float32).astype(np.float64)


def build_explainer(model, background: np.ndarray):
    """A shap explainer for ``model``'s final step (background already in raw feature space)."""
    import shap

    kind = explainer_kind(model)
    pre, final = split_pipeline(model)
    if kind["explainer"] == "linear":
        bg = _transform(pre, background)
        # max_samples = all rows: shap would otherwise subsample the background on its own.
        masker = shap.maskers.Independent(bg, max_samples=len(bg))
        return shap.LinearExplainer(final, masker)
    if kind["perturbation"] == "interventional":
        return shap.TreeExplainer(final, data=as_tree_input(_transform(pre, background)),
                                  model_output="raw", feature_perturbation="interventional")
    return shap.TreeExplainer(final, model_output="raw", feature_perturbation="tree_path_dependent")


def explain_rows(model, explainer, X: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``(values (n, f), base value, model output (n,))`` for rows ``X`` (raw features)."""
    kind = explainer_kind(model)
    pre, _ = split_pipeline(model)
    Xt = _transform(pre, X)
    if kind["explainer"] == "tree":
        # shap's own check is off: ours runs on every block with the configured tolerance.
        # forests compare in float32 (see as_tree_input); histogram boosting bins in float64
        rows = as_tree_input(Xt) if kind["perturbation"] == "interventional" else Xt
        raw = explainer.shap_values(rows, check_additivity=False)
    else:
        raw = explainer.shap_values(Xt)
    vals = np.asarray(raw, dtype=np.float64)
    base = np.asarray(explainer.expected_value, dtype=np.float64).reshape(-1)
    if vals.ndim == 3:  # (rows, features, classes): keep the positive class
        vals, base = vals[:, :, 1], base[1:]
    if vals.shape != X.shape or base.size != 1:
        raise ExplainError(f"unexpected SHAP output shape {vals.shape} / base {base.shape} for "
                           f"rows {X.shape}")
    return vals, float(base[0]), model_output(model, X, kind["output"])


def check_additivity(values: np.ndarray, base: float, output: np.ndarray, tol: float,
                     label: str, block: int) -> float:
    """Raise :class:`AdditivityError` unless ``values.sum(1) + base == output`` within ``tol``;
    returns the largest absolute error."""
    err = np.abs(values.sum(axis=1) + base - output)
    bad = ~(err <= tol)  # NaN counts as a failure
    if bad.any():
        worst = int(np.nanargmax(np.where(np.isnan(err), np.inf, err)))
        raise AdditivityError(
            f"SHAP additivity fails for model {label}, block {block}: {int(bad.sum())} of "
            f"{len(err)} rows off by more than explain.additivity_tol={tol:g} (worst row "
            f"{worst}: values sum + base = {values[worst].sum() + base:.6g}, model output "
            f"{output[worst]:.6g}); the explainer does not reproduce this model")
    return float(err.max()) if len(err) else 0.0


# Explainers built in a worker process, reused by later blocks of the same model (building a
# TreeExplainer converts every tree; doing it once per worker instead of once per block).
_EXPLAINERS: OrderedDict[str, Any] = OrderedDict()
_EXPLAINER_CACHE_SIZE = 4


def _cached_explainer(key: str, model, background: np.ndarray):
    if key in _EXPLAINERS:
        _EXPLAINERS.move_to_end(key)
        return _EXPLAINERS[key]
    explainer = build_explainer(model, background)
    _EXPLAINERS[key] = explainer
    while len(_EXPLAINERS) > _EXPLAINER_CACHE_SIZE:
        _EXPLAINERS.popitem(last=False)
    return explainer


def explain_block(key: str, model, background: np.ndarray, X: np.ndarray) -> dict:
    """The body of one Ray task: SHAP values for one block of one model.

    ``key`` must identify the model *and* the background: the worker reuses the explainer it
    built for the same key. ``cpu_s`` is the CPU time the block took in its worker (for the
    benchmark's efficiency figure)."""
    c0 = time.process_time()
    explainer = _cached_explainer(key, model, background)
    values, base, out = explain_rows(model, explainer, X)
    return {"values": values, "base": base, "output": out, "cpu_s": time.process_time() - c0}


_REMOTE_BLOCK = None


def submit_blocks(model, background: np.ndarray, blocks: list[np.ndarray], key: str,
                  cpus_per_task: float) -> list:
    """Put the model and background in the object store once; one task per block."""
    import ray

    global _REMOTE_BLOCK
    if _REMOTE_BLOCK is None:  # one remote function per process, exported to the cluster once
        _REMOTE_BLOCK = ray.remote(explain_block)
    # A worker that dies is retried (Ray's default); an exception in the block is not.
    task = _REMOTE_BLOCK.options(num_cpus=cpus_per_task)
    model_ref, bg_ref = ray.put(model), ray.put(background)
    return [task.remote(key, model_ref, bg_ref, X) for X in blocks]


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class ModelSpec:
    """One row of ``classifiers/models``."""

    model: str
    sampling: str
    trained_on: str
    cluster: int | None
    path: str
    features: tuple[str, ...]

    @property
    def label(self) -> str:
        return model_key(self.model, self.sampling, self.trained_on)


def _read_specs(cfg: Config) -> list[ModelSpec]:

    if not tables.exists(cfg, CLASSIFY_MODELS):
        from pipeline import runlog

        rec = runlog.stage_record(cfg, "classify") or {}
        if rec.get("status") == "skipped":  # e.g. the target is not annotated in this dataset
            raise StageSkipped("classify was skipped, so there is no classifier to explain ("
                               + str((rec.get("details") or {}).get("reason", "")) + ")")
        raise ExplainError(f"no {CLASSIFY_MODELS} table under {cfg.output.root}; run the "
                           "classify stage first (python -m jobs.classify)")
    try:
        t = read_models(cfg).to_pylist()
    except ValueError as exc:
        raise ExplainError(str(exc)) from None
    have_models = sorted({r["model"] for r in t})
    have_samplings = sorted({r["sampling"] for r in t})
    want_models = cfg.explain.models or have_models
    want_samplings = cfg.explain.samplings or have_samplings
    for what, want, have in (("models", want_models, have_models),
                             ("samplings", want_samplings, have_samplings)):
        missing = sorted(set(want) - set(have))
        if missing:
            raise ExplainError(f"explain.{what} names {missing}, but classifiers/models has only "
                               f"{have}; change explain.{what} or classify.{what}")
    specs = [ModelSpec(r["model"], r["sampling"], r["trained_on"],
                       None if r["cluster"] is None else int(r["cluster"]), r["path"],
                       tuple(r["features"]))
             for r in t if r["model"] in want_models and r["sampling"] in want_samplings]
    if not specs:
        raise StageSkipped("classifiers/models holds no model for explain.models × "
                           "explain.samplings")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ExplainError("classifiers/models lists a model × sampling × trained_on twice")
    return sorted(specs, key=lambda s: (s.model, s.sampling, s.cluster is not None,
                                        s.cluster or 0))


def load_model(cfg: Config, spec: ModelSpec) -> tuple[Any, str]:
    """Load a skops file through :func:`pipeline.modelfiles.load` (classify's exact allow-list;
    a path leaving the output root is refused); returns ``(estimator, sha256 of the file)``."""
    try:
        model, digest = modelfiles.load(cfg, spec.path)
    except modelfiles.UntrustedModelError as exc:
        raise ExplainError(f"model {spec.label}: {exc}") from None
    n_in = getattr(model, "n_features_in_", None)
    if n_in is not None and n_in != len(spec.features):
        raise ExplainError(f"model {spec.label} ({spec.path}) was fitted on {n_in} features but "
                           f"classifiers/models lists {len(spec.features)}; the table and the "
                           "model file disagree (rerun classify)")
    return model, digest


def _scope_mask(cluster_col: np.ndarray, has_cluster: np.ndarray, spec: ModelSpec) -> np.ndarray:
    if spec.cluster is None:
        return np.ones(len(cluster_col), dtype=bool)
    return has_cluster & (cluster_col == spec.cluster)


def _sample(idx: np.ndarray, n: int, seed: int, *names) -> np.ndarray:
    """A seeded sample of ``n`` of the rows ``idx`` (all of them when ``n`` is 0)."""
    return idx[sample_indices(len(idx), n, seed, "explain", *names)]


# ---------------------------------------------------------------------------------------------
# Aggregation as blocks arrive


@dataclass
class _Unit:
    """Running sums for one model (spec): per evaluated cluster (None = all rows)."""

    spec: ModelSpec
    output: str
    sums: dict = field(default_factory=dict)  # cluster -> sum |values| (f,)
    counts: dict = field(default_factory=dict)  # cluster -> rows
    plot: dict = field(default_factory=dict)  # cluster -> [values blocks, data blocks, base]

    def add(self, values: np.ndarray, X: np.ndarray, clusters: list, base: float,
            plot_rows: int) -> None:
        keys: list = [None] if self.spec.cluster is None else []
        keys += sorted({c for c in clusters if c is not None})
        cl = np.array([-1 if c is None else c for c in clusters])
        for key in keys:
            if self.spec.cluster is not None and key != self.spec.cluster:
                continue
            m = np.ones(len(cl), bool) if key is None else cl == key
            a = np.abs(values[m]).sum(axis=0)
            self.sums[key] = self.sums.get(key, 0) + a
            self.counts[key] = self.counts.get(key, 0) + int(m.sum())
            held = self.plot.setdefault(key, [[], [], base])
            room = plot_rows - sum(len(v) for v in held[0])
            if room > 0:
                held[0].append(values[m][:room])
                held[1].append(X[m][:room])

    def importance(self) -> dict:
        """cluster -> mean |SHAP| per feature."""
        return {k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}


def _importance_rows(units: list[_Unit]) -> list[dict]:
    from scipy.stats import rankdata

    rows = []
    for u in units:
        for cl, mean in u.importance().items():
            # Tied features share the best rank (a constant model ranks every feature 1).
            ranks = rankdata(-mean, method="min")
            for j, f in enumerate(u.spec.features):
                rows.append({"model": u.spec.model, "sampling": u.spec.sampling,
                             "trained_on": u.spec.trained_on, "cluster": cl, "output": u.output,
                             "feature": f, "mean_abs_shap": float(mean[j]),
                             "rank": int(ranks[j]), "n_rows": u.counts[cl]})
    return rows


def compare(left: dict[str, float], right: dict[str, float], top_k: int) -> dict:
    """Kendall's tau over the shared features and top-k overlap of two mean|SHAP| vectors."""
    from scipy.stats import kendalltau

    shared = [f for f in left if f in right]
    tau = p = None
    if len(shared) >= 2:
        res = kendalltau([left[f] for f in shared], [right[f] for f in shared])
        if np.isfinite(res.statistic):
            tau, p = float(res.statistic), float(res.pvalue)
    k = min(top_k, len(left), len(right))

    def top(v):  # the k largest, zeros left out: a feature with no effect is in no top-k
        return {f for f in sorted(v, key=lambda f: -v[f])[:k] if v[f] > 0}

    a, b = top(left), top(right)
    overlap = len(a & b) / k if k and a and b else None
    return {"n_features": len(shared), "kendall_tau": tau, "kendall_p": p, "k": k,
            "top_k_overlap": overlap}


def _comparison_pairs(vectors: dict) -> list[tuple[str, tuple, tuple]]:
    """Pairs of (trained_on, cluster) vectors of one model x sampling worth comparing.

    - ``global_model_between_clusters``: the global model on cluster a vs on cluster b
    - ``global_model_cluster_vs_all``: the global model on cluster c vs on all rows
    - ``cluster_models_between_clusters``: the cluster-a model vs the cluster-b model
    - ``cluster_model_vs_global``: the cluster-c model vs the global model on all rows
    - ``cluster_model_vs_global_same_cluster``: the cluster-c model vs the global model on c
    """
    g_all = ("global", None)
    g_cl = sorted(k for k in vectors if k[0] == "global" and k[1] is not None)
    c_models = sorted(k for k in vectors if k[0] != "global")
    pairs = []
    for i, a in enumerate(g_cl):
        pairs += [("global_model_between_clusters", a, b) for b in g_cl[i + 1:]]
    if g_all in vectors:
        pairs += [("global_model_cluster_vs_all", a, g_all) for a in g_cl]
    for i, a in enumerate(c_models):
        pairs += [("cluster_models_between_clusters", a, b) for b in c_models[i + 1:]]
    if g_all in vectors:
        pairs += [("cluster_model_vs_global", a, g_all) for a in c_models]
    pairs += [("cluster_model_vs_global_same_cluster", a, ("global", a[1])) for a in c_models
              if ("global", a[1]) in vectors]
    return pairs


def _comparison_rows(units: list[_Unit], top_k: int) -> list[dict]:
    groups: dict[tuple, dict] = {}
    for u in units:
        vecs = groups.setdefault((u.spec.model, u.spec.sampling), {})
        for cl, mean in u.importance().items():
            vecs[(u.spec.trained_on, cl)] = dict(zip(u.spec.features, map(float, mean)))
    rows = []
    for (model, sampling), vecs in sorted(groups.items()):
        for kind, a, b in _comparison_pairs(vecs):
            rows.append({"model": model, "sampling": sampling, "kind": kind,
                         "left_trained_on": a[0], "left_cluster": a[1],
                         "right_trained_on": b[0], "right_cluster": b[1],
                         **compare(vecs[a], vecs[b], top_k)})
    return rows


def _most_different(comparison: list[dict]) -> dict[str, list[dict]]:
    """Per model/sampling: clusters ordered from most to least different from the global model:
    each cluster model against the global model where there are cluster models, else the global
    model on the cluster against the global model on all rows. Order: Kendall's tau (the whole
    ranking; an undefined tau counts as -1), then top-k overlap."""
    out: dict[str, list[dict]] = {}
    for kind in ("cluster_model_vs_global", "global_model_cluster_vs_all"):
        found: dict[str, list[dict]] = {}
        for r in comparison:
            key = f"{r['model']}/{r['sampling']}"
            if r["kind"] == kind and key not in out:
                found.setdefault(key, []).append({
                    "kind": kind, "cluster": r["left_cluster"],
                    "kendall_tau": r["kendall_tau"], "top_k_overlap": r["top_k_overlap"]})
        out.update(found)
    for rows in out.values():
        rows.sort(key=lambda d: (d["kendall_tau"] if d["kendall_tau"] is not None else -1.0,
                                 d["top_k_overlap"] if d["top_k_overlap"] is not None else 0.0))
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _plots(units: list[_Unit], top_k: int) -> dict[str, bytes]:
    """name -> PNG: per model x sampling, a beeswarm for all rows and for each cluster (the
    report shows these; its importance bars it draws itself from ``shap/importance``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    out: dict[str, bytes] = {}
    groups: dict[tuple, list[_Unit]] = {}
    for u in units:
        groups.setdefault((u.spec.model, u.spec.sampling), []).append(u)
    show = max(top_k, 10)
    for (model, sampling), us in sorted(groups.items()):
        glob = next((u for u in us if u.spec.cluster is None), None)
        by_cluster = {u.spec.cluster: u for u in us if u.spec.cluster is not None}
        clusters = sorted(set(by_cluster) | {k for k in (glob.sums if glob else {}) if k is not None})
        # Beeswarms: the cluster's own model where there is one, else the global model there.
        for cl in [None] + clusters:
            u = by_cluster.get(cl) if cl is not None else None
            u = u or (glob if glob is not None and cl in glob.plot else None)
            if u is None or cl not in u.plot or not u.plot[cl][0]:
                continue
            vals, data, base = u.plot[cl]
            exp = shap.Explanation(values=np.vstack(vals), base_values=base,
                                   data=np.vstack(data), feature_names=list(u.spec.features))
            shap.plots.beeswarm(exp, max_display=show, show=False)
            fig = plt.gcf()
            where = "all rows" if cl is None else f"cluster {cl}"
            fig.axes[0].set_title(f"{model} ({sampling}, {u.spec.trained_on} model): {where}")
            out[beeswarm_name(model, sampling, u.spec.trained_on, cl)] = _png(fig)
    return out


# ---------------------------------------------------------------------------------------------
# The stage


# Rows of classifiers/dataset per streamed batch when reading the sampled rows' features.
_READ_BATCH_ROWS = 32768


def _read_rows(cfg: Config, ids: pa.Array, features: list[str]) -> np.ndarray:
    """float64 (len(ids), len(features)) values of ``features`` for the rows whose image_id is
    ``ids`` (in that order), streamed over classifiers/dataset batch by batch."""
    import pyarrow.dataset as pads

    loc = tables.location(cfg, CLASSIFY_DATASET)
    ds = pads.dataset(storage.parquet_files(loc), filesystem=loc.fs, format="parquet")
    out = np.full((len(ids), len(features)), np.nan)
    found = np.zeros(len(ids), dtype=bool)
    for batch in ds.to_batches(columns=["image_id", *features], batch_size=_READ_BATCH_ROWS):
        pos = pc.index_in(batch.column(0), value_set=ids)
        keep = pc.is_valid(pos)
        if not pc.any(keep).as_py():
            continue
        batch, p = batch.filter(keep), pos.filter(keep).to_numpy(zero_copy_only=False)
        out[p] = np.column_stack([batch.column(j + 1).to_numpy(zero_copy_only=False)
                                  for j in range(len(features))]).astype(np.float64)
        found[p] = True
    if not found.all():
        raise ExplainError(f"classifiers/dataset changed while it was read: "
                           f"{int((~found).sum())} sampled rows are gone; rerun the stage")
    return out


def _part_name(spec: ModelSpec, block: int) -> str:
    return f"{spec.label}__b{block:05d}"


def _existing_keys(cfg: Config) -> dict[str, tuple[str, str]]:
    """part name -> (path, content key) of the shap/values parts already written."""
    loc = tables.location(cfg, VALUES)
    out = {}
    for path in storage.parquet_files(loc):
        name = path.rsplit("/", 1)[-1][: -len(".parquet")]
        try:
            meta = pq.read_schema(path, filesystem=loc.fs).metadata or {}
        except (OSError, pa.ArrowException):
            meta = {}  # unreadable part: recomputed and replaced
        out[name] = (path, meta.get(b"explain_key", b"").decode())
    return out


def _read_part(path: str, fs) -> pa.Table:
    try:
        return pq.read_table(path, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise storage.StorageError(storage.describe_error(path, exc)) from None


def _content_key(model_digest: str, kind: dict, background: np.ndarray, X: np.ndarray,
                 schema: pa.Schema) -> str:
    import shap

    h = hashlib.sha256()
    h.update(json.dumps([model_digest, kind, shap.__version__, schema.names]).encode())
    h.update(np.ascontiguousarray(background).tobytes())
    h.update(np.ascontiguousarray(X).tobytes())
    return h.hexdigest()


def run(cfg: Config) -> dict:
    """Explain every selected model; write shap/values, importance, comparison and plots."""
    from pipeline.ray_runtime import cluster_cpus, ensure_ray

    t0 = time.time()
    specs = _read_specs(cfg)
    ds = _read_keys(cfg, specs)
    _read_samples(cfg, specs, ds)
    ensure_ray(cfg)
    existing = _existing_keys(cfg)
    plan = _Plan()
    for spec in specs:
        _plan_model(cfg, spec, ds, existing, plan)
    _drop_stale_parts(cfg, existing, plan.planned)
    worst, computed = _collect(cfg, ds, plan)
    shap_seconds = time.time() - t0
    importance, comparison = _write_summaries(cfg, plan.units)
    t_plots = time.time()
    plots = _write_plots(cfg, plan.units)

    units, kinds = plan.units, plan.kinds
    rows_explained = sum(u.counts.get(u.spec.cluster, 0) for u in units)
    seconds = time.time() - t0
    log.info("[explain] %d rows of %d models in %.1f s (SHAP %.1f s), %d plots", rows_explained,
             len(units), seconds, shap_seconds, len(plots))
    return {
        "models": len(units), "rows": rows_explained, "blocks": plan.blocks_total,
        "blocks_computed": computed, "blocks_reused": plan.reused,
        "importance_rows": len(importance), "comparison_rows": len(comparison),
        "plots": len(plots), "max_additivity_error": worst, "cpus": cluster_cpus(),
        "seconds": round(seconds, 2), "shap_seconds": round(shap_seconds, 2),
        "plot_seconds": round(time.time() - t_plots, 2),
        "explainers": {label: f"{k['explainer']}/{k['perturbation']}/{k['output']}"
                       for label, k in kinds.items()},
        "skipped": plan.skipped,
        "most_different_from_global": _most_different(comparison),
    }


@dataclass
class _Dataset:
    """``classifiers/dataset`` as the stage uses it: the row keys sorted by image_id, and the
    feature values of the sampled rows alone (filled by ``_read_samples``)."""

    features: list[str]
    schema: pa.Schema  # of shap/values
    image_ids: pa.Array
    is_test: np.ndarray
    is_train: np.ndarray
    has_cluster: np.ndarray
    cluster_col: np.ndarray  # -1 where no cluster
    # scope -> (test rows, train rows, explained rows, background rows)
    samples: dict = field(default_factory=dict)
    needed: np.ndarray | None = None  # sorted rows whose values X_needed holds
    X_needed: np.ndarray | None = None
    col_of: dict = field(default_factory=dict)

    def clusters_of(self, idx: np.ndarray) -> list:
        return [None if not self.has_cluster[i] else int(self.cluster_col[i]) for i in idx]

    def matrix(self, idx: np.ndarray, cols: list[str]) -> np.ndarray:
        """Feature values of the (sorted-table) rows ``idx``, columns ``cols``."""
        return self.X_needed[np.searchsorted(self.needed, idx)][:, [self.col_of[f] for f in cols]]


@dataclass
class _Plan:
    """What the models need: per model its running sums, the blocks submitted to Ray and how
    many blocks were reused from the last run."""

    units: list[_Unit] = field(default_factory=list)
    # (ref, unit, block index, rows index, part name, content key); results stream in later
    pending: list = field(default_factory=list)
    planned: set = field(default_factory=set)  # part names this run writes or keeps
    kinds: dict = field(default_factory=dict)  # model label -> explainer kind
    # model label -> why it was not explained (in run.json)
    skipped: dict = field(default_factory=dict)
    blocks_total: int = 0
    reused: int = 0


def _read_keys(cfg: Config, specs: list[ModelSpec]) -> _Dataset:
    """The row keys of ``classifiers/dataset`` (after checking it has every model's columns)."""
    if not tables.exists(cfg, CLASSIFY_DATASET):
        raise ExplainError(f"no {CLASSIFY_DATASET} table under {cfg.output.root}; run the "
                           "classify stage first")
    features: list[str] = []
    for s in specs:
        features += [f for f in s.features if f not in features]
    schema = values_schema(features)
    dschema = storage.read_schema(tables.location(cfg, CLASSIFY_DATASET))
    missing = [f for f in features + ["image_id", "split", "cluster"] if f not in dschema.names]
    if missing:
        raise ExplainError(f"classifiers/dataset lacks columns {missing} that the models use")
    # Only the row keys are read whole; feature values are read afterwards for the sampled
    # rows alone (see _read_rows): the whole matrix is rows x features float64 (63 MB at
    # 202,599 x 39) and explain uses at most max_rows + background_rows rows of each scope.
    data = tables.read(cfg, CLASSIFY_DATASET, columns=["image_id", "split", "cluster"])
    data = data.sort_by("image_id")
    return _Dataset(
        features=features, schema=schema, image_ids=data["image_id"].combine_chunks(),
        is_test=pc.equal(data["split"], "test").to_numpy(zero_copy_only=False),
        is_train=pc.equal(data["split"], "train").to_numpy(zero_copy_only=False),
        has_cluster=pc.is_valid(data["cluster"]).to_numpy(zero_copy_only=False),
        cluster_col=data["cluster"].fill_null(-1).to_numpy().astype(np.int64))


def _read_samples(cfg: Config, specs: list[ModelSpec], ds: _Dataset) -> None:
    """Each scope's explained rows and background, then their feature values in one pass."""
    ec = cfg.explain
    for spec in specs:
        if spec.trained_on in ds.samples:
            continue
        scope = _scope_mask(ds.cluster_col, ds.has_cluster, spec)
        test_idx = np.flatnonzero(scope & ds.is_test)
        train_idx = np.flatnonzero(scope & ds.is_train)
        # Shared by every model with the same scope, so their rows and background line up.
        ds.samples[spec.trained_on] = (
            len(test_idx), len(train_idx),
            _sample(test_idx, ec.max_rows, cfg.run.seed, "rows", spec.trained_on),
            _sample(train_idx, ec.background_rows, cfg.run.seed, "background", spec.trained_on))
    ds.needed = np.unique(np.concatenate([np.r_[r, b] for _, _, r, b in ds.samples.values()]
                                         or [np.zeros(0, np.int64)]).astype(np.int64))
    ds.X_needed = _read_rows(cfg, ds.image_ids.take(pa.array(ds.needed)), ds.features)
    ds.col_of = {f: j for j, f in enumerate(ds.features)}


def _plan_model(cfg: Config, spec: ModelSpec, ds: _Dataset, existing: dict, plan: _Plan) -> None:
    """One model: reuse the blocks the last run wrote with the same content key, submit the
    others to Ray (their refs go to ``plan.pending``)."""
    ec = cfg.explain
    n_test, n_train, rows, bg_idx = ds.samples[spec.trained_on]
    if n_train == 0:
        raise ExplainError(f"model {spec.label}: no train rows of its scope in "
                           "classifiers/dataset to draw a background from")
    if n_test == 0:
        # A small cluster can have train rows and no test rows: nothing to explain there.
        plan.skipped[spec.label] = "no test rows in its scope"
        log.warning("[explain] %s skipped: no test rows in its scope", spec.label)
        return
    cols = list(spec.features)
    background = ds.matrix(bg_idx, cols)
    model, digest = load_model(cfg, spec)
    kind = explainer_kind(model)
    plan.kinds[spec.label] = kind
    unit = _Unit(spec, kind["output"])
    plan.units.append(unit)
    todo_blocks, todo_meta = [], []
    for b, start in enumerate(range(0, len(rows), ec.block_rows)):
        idx = rows[start:start + ec.block_rows]
        part = _part_name(spec, b)
        plan.planned.add(part)
        X_idx = ds.matrix(idx, cols)
        key = _content_key(digest, kind, background, X_idx, ds.schema)
        plan.blocks_total += 1
        if part in existing and existing[part][1] == key:
            t = _read_part(existing[part][0], tables.location(cfg, VALUES).fs)
            vals = np.column_stack([t[f].to_numpy(zero_copy_only=False) for f in cols])
            unit.add(vals, X_idx, ds.clusters_of(idx),
                     float(t["base_value"][0].as_py()), ec.plot_rows)
            plan.reused += 1
            continue
        todo_blocks.append(X_idx)
        todo_meta.append((unit, b, idx, part, key))
    if todo_blocks:
        # The workers' explainer cache key: this model file with this background.
        cache_key = hashlib.sha256(digest.encode() + background.tobytes()).hexdigest()
        refs = submit_blocks(model, background, todo_blocks, cache_key, ec.cpus_per_task)
        plan.pending += [(r, *m) for r, m in zip(refs, todo_meta)]
    log.info("[explain] %s: %d rows in %d blocks (%s, %s), background %d", spec.label,
             len(rows), -(-len(rows) // ec.block_rows), kind["explainer"], kind["output"],
             len(bg_idx))


def _drop_stale_parts(cfg: Config, existing: dict, planned: set) -> None:
    """Remove parts a previous run planned and this one does not (other block size, models)."""
    vloc = tables.location(cfg, VALUES)
    for name, (path, _) in existing.items():
        if name not in planned:
            vloc.fs.delete_file(path)


def _collect(cfg: Config, ds: _Dataset, plan: _Plan) -> tuple[float, int]:
    """Write each block's values as it finishes and add it to its model's sums; returns the
    worst additivity error and the number of blocks computed."""
    import ray

    ec = cfg.explain
    worst = 0.0
    by_ref = {p[0]: p[1:] for p in plan.pending}
    waiting = [p[0] for p in plan.pending]
    computed = 0
    progress = Progress("explain", "SHAP blocks", len(waiting), unit="blocks")
    try:
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            ref = done[0]
            unit, b, idx, part, key = by_ref.pop(ref)
            res = ray.get(ref)
            worst = max(worst, check_additivity(res["values"], res["base"], res["output"],
                                                ec.additivity_tol, unit.spec.label, b))
            cl = ds.clusters_of(idx)
            _write_block(cfg, ds, unit, idx, cl, res, part, key, plan.kinds[unit.spec.label])
            unit.add(res["values"], ds.matrix(idx, list(unit.spec.features)), cl, res["base"],
                     ec.plot_rows)
            computed += 1
            progress.add()
    except BaseException:
        for ref in waiting:
            ray.cancel(ref)
        raise
    return worst, computed


def _write_block(cfg: Config, ds: _Dataset, unit: _Unit, idx: np.ndarray, cl: list, res: dict,
                 part: str, key: str, kind: dict) -> None:
    """One block's ``shap/values`` part, with its content key and explainer in the metadata."""
    schema = ds.schema
    row = {"image_id": ds.image_ids.take(pa.array(idx)), "model": [unit.spec.model] * len(idx),
           "sampling": [unit.spec.sampling] * len(idx),
           "trained_on": [unit.spec.trained_on] * len(idx), "cluster": cl,
           "output": [unit.output] * len(idx), "base_value": [res["base"]] * len(idx),
           "model_output": res["output"]}
    for j, f in enumerate(unit.spec.features):
        row[f] = res["values"][:, j]
    cols_ = {f.name: row.get(f.name, pa.nulls(len(idx), pa.float64())) for f in schema}
    tables.write(cfg, VALUES, pa.table(cols_, schema=schema), schema=schema, part=part,
                 metadata={"explain_key": key, "explainer": json.dumps(kind)})


def _write_summaries(cfg: Config, units: list[_Unit]) -> tuple[list[dict], list[dict]]:
    """``shap/importance`` and ``shap/comparison``; returns their rows."""
    importance = _importance_rows(units)
    tables.replace(cfg, IMPORTANCE, pa.Table.from_pylist(importance, schema=IMPORTANCE_SCHEMA),
                   schema=IMPORTANCE_SCHEMA)
    comparison = _comparison_rows(units, cfg.explain.top_k)
    tables.replace(cfg, COMPARISON, pa.Table.from_pylist(comparison, schema=COMPARISON_SCHEMA),
                   schema=COMPARISON_SCHEMA)
    return importance, comparison


def _write_plots(cfg: Config, units: list[_Unit]) -> dict[str, bytes]:
    """The beeswarm PNGs under ``shap/plots`` (a previous run's other plots removed)."""
    plots = _plots(units, cfg.explain.top_k)
    ploc = tables.location(cfg, PLOTS)
    for name, png in plots.items():
        storage.write_bytes(ploc.join(name), png)
    for info in storage.list_files(ploc):
        if info.path.rsplit("/", 1)[-1] not in plots:
            ploc.fs.delete_file(info.path)  # a plot of a model this run no longer explains
    return plots
