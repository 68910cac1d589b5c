"""Disaggregated evaluation: point values from scikit-learn / fairlearn metrics inside
``fairlearn.metrics.MetricFrame``, percentile bootstrap intervals from the same MetricFrame
grouping applied to a bootstrap weight matrix.

Bootstrap: the test rows are resampled jointly (``B`` multinomial draws of ``n`` rows, the
counts kept as an ``n × B`` weight matrix drawn once from a seed derived from ``run.seed`` and
shared by every model, so that models are compared on the same resamples). A group's value in
replicate ``b`` is the metric on that group's rows weighted by column ``b`` — exactly the
metric on the resampled rows that fall in the group. MetricFrame does the grouping; one metric
callable returns all metrics for all ``B`` replicates at once (a ``9 × B`` array), which keeps a
200-replicate bootstrap in tens of milliseconds instead of 200 MetricFrame builds.

A metric that is undefined for a group (recall without positives, FPR without negatives, ROC
AUC with a single class, precision with no positive predictions) is NaN, never 0; intervals
ignore NaN replicates.
"""

from __future__ import annotations

import warnings

import numpy as np
from fairlearn.metrics import (MetricFrame, count, demographic_parity_difference,
                               equalized_odds_difference, false_positive_rate, selection_rate)
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score,
                             recall_score, roc_auc_score)

# The metrics reported per group, in output order.
METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "precision", "recall", "fpr", "f1",
                            "roc_auc", "selection_rate", "base_rate")
# Gap rows per grouping: "<metric>_gap_difference" (max − min over groups), "<metric>_gap_ratio"
# (min / max), plus these two fairlearn summaries.
FAIRNESS_GAPS: tuple[str, ...] = ("demographic_parity_difference", "equalized_odds_difference")


def _quiet(fn):
    """sklearn warns on single-class groups; the NaN conventions below already cover them."""
    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    wrapped.__name__ = getattr(fn, "__name__", "metric")
    return wrapped


def _has_both(y_true) -> bool:
    y = np.asarray(y_true)
    return bool(y.any()) and bool((~y.astype(bool)).any())


@_quiet
def _roc_auc(y_true, y_pred, y_score):
    return float(roc_auc_score(y_true, y_score)) if _has_both(y_true) else float("nan")


@_quiet
def _fpr(y_true, y_pred):
    return float(false_positive_rate(y_true, y_pred, pos_label=1)) \
        if (np.asarray(y_true) == 0).any() else float("nan")


@_quiet
def _recall(y_true, y_pred):
    return float(recall_score(y_true, y_pred, zero_division=np.nan))


@_quiet
def _precision(y_true, y_pred):
    return float(precision_score(y_true, y_pred, zero_division=np.nan))


@_quiet
def _f1(y_true, y_pred):
    return float(f1_score(y_true, y_pred, zero_division=np.nan))


@_quiet
def _balanced_accuracy(y_true, y_pred):
    return float(balanced_accuracy_score(y_true, y_pred))


def _base_rate(y_true, y_pred):
    return float(np.mean(np.asarray(y_true)))


POINT_METRICS = {
    "accuracy": accuracy_score, "balanced_accuracy": _balanced_accuracy,
    "precision": _precision, "recall": _recall, "fpr": _fpr, "f1": _f1, "roc_auc": _roc_auc,
    "selection_rate": _quiet(selection_rate), "base_rate": _base_rate, "n": count,
}


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def weighted_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC per column of the weight matrix ``w`` (n × B), ties counted half (as sklearn)."""
    levels, inv = np.unique(score, return_inverse=True)
    pos = np.zeros((len(levels), w.shape[1]))
    neg = np.zeros_like(pos)
    np.add.at(pos, inv, w * y[:, None])
    np.add.at(neg, inv, w * (~y)[:, None])
    below = np.cumsum(neg, axis=0) - neg  # negative weight strictly below each level
    num = (pos * (below + 0.5 * neg)).sum(0)
    return _div(num, pos.sum(0) * neg.sum(0))


def weighted_metrics(y_true, y_pred, score, w) -> np.ndarray:
    """All :data:`METRICS` for each weight column: an array ``len(METRICS) × B``.

    With ``w`` a column of ones this equals the point metrics (tested against scikit-learn).
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(y_pred).astype(bool)
    w = np.asarray(w, dtype=np.float64)
    if w.ndim == 1:
        w = w[:, None]
    tp = (w * (y & p)[:, None]).sum(0)
    fp = (w * (~y & p)[:, None]).sum(0)
    fn = (w * (y & ~p)[:, None]).sum(0)
    tn = (w * (~y & ~p)[:, None]).sum(0)
    tot = tp + fp + fn + tn
    tpr, tnr = _div(tp, tp + fn), _div(tn, tn + fp)
    # balanced accuracy averages the recalls of the classes present (as scikit-learn does)
    present = (~np.isnan(tpr)).astype(float) + (~np.isnan(tnr)).astype(float)
    bal = _div(np.nan_to_num(tpr) + np.nan_to_num(tnr), present)
    return np.vstack([
        _div(tp + tn, tot), bal, _div(tp, tp + fp), tpr, _div(fp, fp + tn),
        _div(2 * tp, 2 * tp + fp + fn), weighted_auc(y, np.asarray(score, float), w),
        _div(tp + fp, tot), _div(tp + fn, tot),
    ])


def bootstrap_weights(n: int, b: int, rng: np.random.Generator) -> np.ndarray:
    """``n × b`` counts: column j says how often each row appears in resample j."""
    if b == 0:
        return np.zeros((n, 0), dtype=np.int32)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=b).T.astype(np.int32)


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    s = np.asarray(samples, float)
    s = s[~np.isnan(s)]
    if s.size == 0:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    lo, hi = np.quantile(s, [a, 1 - a])
    return float(lo), float(hi)


def _gap_samples(point: np.ndarray, boot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap samples of a gap: (groups × B) replicate values in, max − min and min / max out.

    The pair compared is fixed by the point estimate (its best and worst group), and each
    replicate takes that pair's signed difference. Re-picking max and min inside every replicate
    would give a gap that is never below zero, so its interval would "exclude zero" even for
    groups that do not differ; with the pair fixed, the interval covers zero when the ordering
    of the two groups is not reliable.
    """
    point = np.asarray(point, float)
    b = boot.shape[1]
    if int(np.isfinite(point).sum()) < 2:
        return np.full(b, np.nan), np.full(b, np.nan)
    hi, lo = boot[int(np.nanargmax(point))], boot[int(np.nanargmin(point))]
    return hi - lo, _div(lo, hi)


def evaluate(y: np.ndarray, score: np.ndarray, label: np.ndarray,
             groupings: dict[str, np.ndarray], weights: np.ndarray, ci_level: float) -> list[dict]:
    """Metric rows for one model's test predictions.

    ``groupings`` maps a grouping name (``"cluster"``, ``"Male"`` ...) to each row's group label
    (strings; None where a row has no value — such rows are left out of that grouping only).
    ``weights`` is the bootstrap matrix (n × B) over these same rows. Returns dicts with
    evaluated_on, group_by, group, metric, value, ci_low, ci_high, n.
    """
    y = np.asarray(y).astype(bool)
    label = np.asarray(label).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_all = len(y)
    rows: list[dict] = []
    all_groups = {"overall": np.full(n_all, "all", dtype=object), **groupings}
    for group_by, groups in all_groups.items():
        groups = np.asarray(groups, dtype=object)
        mask = np.array([g is not None for g in groups], dtype=bool)
        if not mask.any():
            continue
        yt, yp, ys, gs = y[mask].astype(int), label[mask].astype(int), score[mask], groups[mask]
        w = weights[mask]
        point = MetricFrame(metrics=POINT_METRICS, y_true=yt, y_pred=yp, sensitive_features=gs,
                            sample_params={"roc_auc": {"y_score": ys}})
        row_idx = np.arange(len(yt))
        boot = None
        if w.shape[1]:
            def _all(y_true, y_pred, rows_):
                r = np.asarray(rows_)
                return weighted_metrics(y_true, y_pred, ys[r], w[r])
            boot = MetricFrame(metrics={"all": _all}, y_true=yt, y_pred=yp, sensitive_features=gs,
                               sample_params={"all": {"rows_": row_idx}})
        by_group = point.by_group
        names = [str(g) for g in by_group.index]
        boot_stack = None
        if boot is not None:
            boot_stack = np.stack([np.asarray(boot.by_group.loc[g, "all"], float)
                                   for g in by_group.index])  # groups × metrics × B
        for gi, g in enumerate(by_group.index):
            evaluated_on = "overall" if group_by == "overall" else f"{group_by}={names[gi]}"
            for mi, m in enumerate(METRICS):
                lo, hi = _interval(boot_stack[gi, mi], ci_level) if boot_stack is not None \
                    else (float("nan"), float("nan"))
                rows.append({"evaluated_on": evaluated_on, "group_by": group_by,
                             "group": names[gi], "metric": m,
                             "value": float(by_group.loc[g, m]), "ci_low": lo, "ci_high": hi,
                             "n": int(by_group.loc[g, "n"])})
        if group_by == "overall":
            continue
        n = int(mask.sum())
        diff, ratio = point.difference(method="between_groups"), point.ratio(method="between_groups")
        gaps = {}
        for mi, m in enumerate(METRICS):
            d_s = r_s = None
            if boot_stack is not None:
                d_s, r_s = _gap_samples(by_group[m].to_numpy(float), boot_stack[:, mi, :])
            defined = int(np.isfinite(by_group[m].to_numpy(float)).sum()) >= 2
            gaps[f"{m}_gap_difference"] = (float(diff[m]) if defined else float("nan"), d_s)
            gaps[f"{m}_gap_ratio"] = (float(ratio[m]) if defined else float("nan"), r_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dpd = float(demographic_parity_difference(yt, yp, sensitive_features=gs))
            eod = float(equalized_odds_difference(yt, yp, sensitive_features=gs))
        sel, tpr, fpr = (METRICS.index(k) for k in ("selection_rate", "recall", "fpr"))
        if boot_stack is not None:
            def _d(k):
                return _gap_samples(by_group[METRICS[k]].to_numpy(float), boot_stack[:, k, :])[0]
            dp_s = _d(sel)
            eo_s = np.fmax(_d(tpr), _d(fpr))
        else:
            dp_s = eo_s = None
        gaps["demographic_parity_difference"] = (dpd, dp_s)
        gaps["equalized_odds_difference"] = (eod, eo_s)
        for metric, (value, samples) in gaps.items():
            lo, hi = _interval(samples, ci_level) if samples is not None \
                else (float("nan"), float("nan"))
            rows.append({"evaluated_on": f"gap:{group_by}", "group_by": group_by, "group": None,
                         "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": n})
    return rows
