"""One fit: sample the training rows, select features, fit, tune the threshold on val, save.

Everything here is a plain function of numpy arrays so that the same code runs inside a Ray
task and sequentially in the benchmark's baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import skops.io as sio
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_selection import mutual_info_classif
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import modelfiles, storage
from pipeline.classify._sampling import SamplingError, proportions, undersample
from pipeline.classify._tables import model_file, model_key
from pipeline.config import Config
from pipeline.seeds import derive_seed
from pipeline.thresholds import tune_threshold

MODEL_NAMES: tuple[str, ...] = ("random_forest", "logistic_regression", "hist_gradient_boosting")

# Defaults before classify.params overrides; chosen to be sensible on 1k..200k rows.
DEFAULT_PARAMS: dict[str, dict] = {
    # 200 trees; leaves of >= 5 rows keep the forest small and its probabilities smooth.
    "random_forest": {"n_estimators": 200, "min_samples_leaf": 5, "n_jobs": 1},
    # lbfgs on standardised inputs converges well inside 1000 iterations.
    "logistic_regression": {"C": 1.0, "max_iter": 1000},
    # early stopping uses an internal 10 % split of the (already sampled) training rows.
    "hist_gradient_boosting": {"max_iter": 200, "learning_rate": 0.1, "early_stopping": "auto"},
}

# Split codes in the shared arrays.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def build_estimator(model: str, params: dict, seed: int) -> Pipeline:
    """The sklearn Pipeline for ``model`` (last step is always named ``"model"``)."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {list(MODEL_NAMES)}")
    if "random_state" in params:
        raise ValueError(f"classify.params.{model}.random_state: seeds are derived from run.seed; "
                         "remove it and change run.seed instead")
    kw = {**DEFAULT_PARAMS[model], **params}
    if model == "random_forest":
        steps = [("model", RandomForestClassifier(random_state=seed))]
    elif model == "logistic_regression":
        # scaled inputs: the penalty treats every feature alike, and lbfgs converges
        steps = [("scale", StandardScaler()), ("model", LogisticRegression(random_state=seed))]
    else:
        steps = [("model", HistGradientBoostingClassifier(random_state=seed))]
    pipe = Pipeline(steps)
    try:
        pipe.named_steps["model"].set_params(**kw)
    except ValueError as exc:
        raise ValueError(f"classify.params.{model}: {exc}") from None
    return pipe


def select_features(method: str, k: int, X: np.ndarray, y: np.ndarray, names: list[str],
                    seed: int) -> list[int]:
    """Column indices kept (in the dataset's order). ``mutual_info``: the ``k`` features with the
    highest estimated mutual information with the target; ``importance``: the ``k`` with the
    highest impurity importance in a 100-tree random forest on the same rows."""
    if method == "none" or k >= len(names):
        return list(range(len(names)))
    if method == "mutual_info":
        score = mutual_info_classif(X, y, random_state=seed)
    elif method == "importance":
        rf = RandomForestClassifier(n_estimators=100, min_samples_leaf=5, random_state=seed,
                                    n_jobs=1).fit(X, y)
        score = rf.feature_importances_
    else:
        raise ValueError(f"unknown feature_selection {method!r}")
    top = np.argsort(-score, kind="stable")[:k]
    return sorted(int(i) for i in top)


@dataclass
class FitSpec:
    model: str
    sampling: str
    trained_on: str  # "global" or "cluster_<c>"
    cluster: int | None = None

    @property
    def key(self) -> str:
        return model_key(self.model, self.sampling, self.trained_on)


@dataclass
class FitResult:
    spec: FitSpec
    status: str  # "ok" or "skipped"
    reason: str = ""
    path: str = ""
    features: list[str] = field(default_factory=list)
    n_train: int = 0
    n_train_positive: int = 0
    threshold: float = 0.5
    threshold_note: str = ""
    train_proportions: dict = field(default_factory=dict)
    test_index: np.ndarray | None = None  # positions into the shared arrays
    test_score: np.ndarray | None = None
    fit_seconds: float = 0.0


def fit_one(data: dict, spec: FitSpec, cfg: Config, out_root: str) -> FitResult:
    """Fit ``spec`` on the shared ``data`` arrays and save it under ``out_root``.

    ``data``: X (n × f float64), y (bool), cluster (int32, -1 = none), split (int8 codes),
    feature_names. A fit that cannot be made (too few rows of a class, an impossible sampling)
    returns status "skipped" with the reason; it never substitutes another fit.
    """
    t0 = time.perf_counter()
    c = cfg.classify
    X, y, cl, split = data["X"], data["y"], data["cluster"], data["split"]
    names = list(data["feature_names"])
    in_scope = np.ones(len(y), bool) if spec.cluster is None else cl == spec.cluster
    train = np.flatnonzero(in_scope & (split == SPLIT_CODES["train"]))
    val = np.flatnonzero(in_scope & (split == SPLIT_CODES["val"]))
    test = np.flatnonzero(in_scope & (split == SPLIT_CODES["test"]))
    res = FitResult(spec=spec, status="skipped")
    rng = np.random.default_rng(derive_seed(cfg.run.seed, "classify", "sample", spec.sampling,
                                            spec.trained_on))
    try:
        keep = train[undersample(y[train], cl[train], spec.sampling, rng)]
    except SamplingError as exc:
        res.reason = f"sampling {spec.sampling}: {exc}"
        return res
    pos = int(y[keep].sum())
    if min(pos, len(keep) - pos) < c.min_class_rows:
        res.reason = (f"{len(keep)} training rows with {pos} positive: fewer than "
                      f"classify.min_class_rows={c.min_class_rows} of a class")
        return res
    fs_seed = derive_seed(cfg.run.seed, "classify", "select", spec.key)
    cols = select_features(c.feature_selection, c.select_k, X[keep], y[keep], names, fs_seed)
    est = build_estimator(spec.model, c.params.get(spec.model, {}),
                          derive_seed(cfg.run.seed, "classify", "fit", spec.key))
    est.fit(X[keep][:, cols], y[keep])
    val_score = est.predict_proba(X[val][:, cols])[:, 1] if len(val) else np.zeros(0)
    res.threshold, res.threshold_note = tune_threshold(y[val], val_score, c.threshold_metric)
    res.test_index = test
    res.test_score = est.predict_proba(X[test][:, cols])[:, 1] if len(test) else np.zeros(0)
    res.features = [names[i] for i in cols]
    res.n_train, res.n_train_positive = len(keep), pos
    res.train_proportions = proportions(y[keep], cl[keep])
    res.path = model_file(spec.key)
    storage.write_bytes(storage.filesystem(out_root, cfg.storage).join(*res.path.split("/")),
                        sio.dumps(est))
    res.status = "ok"
    res.fit_seconds = time.perf_counter() - t0
    return res


def load_model(cfg: Config, path: str, out_root: str | None = None) -> Pipeline:
    """Load a saved classifier (``path`` relative to the output root) without running code.

    Goes through :func:`pipeline.modelfiles.load`: only skops' built-in safe types and
    :data:`pipeline.modelfiles.TRUSTED_TYPES` are rebuilt, and a path leaving the output root is refused.
    """
    return modelfiles.load(cfg, path, out_root)[0]
