"""Disaggregated evaluation: one ``fairlearn.metrics.MetricFrame`` per grouping computes every
metric for every group, both the point value and its bootstrap replicates.

Bootstrap: the test rows are resampled jointly (``B`` multinomial draws of ``n`` rows, the
counts kept as an ``n × B`` weight matrix drawn once from a seed derived from ``run.seed`` and
shared by every model, so that models are compared on the same resamples). A group's value in
replicate ``b`` is the metric on that group's rows weighted by column ``b`` — exactly the
metric on the resampled rows that fall in the group. MetricFrame does the grouping; one metric
callable returns all metrics for unit weights (the point value) and all ``B`` replicates at once
(a ``9 × (1 + B)`` array), which keeps a 200-replicate bootstrap in tens of milliseconds instead of
200 MetricFrame builds. The metric formulas are checked against scikit-learn's and fairlearn's
functions in tests/test_classify.py.

A metric that is undefined for a group (recall without positives, FPR without negatives, ROC
AUC with a single class, precision with no positive predictions) is NaN, never 0; intervals
ignore NaN replicates.
"""

from __future__ import annotations

import warnings

import numpy as np
from fairlearn.metrics import MetricFrame, count

# The metrics reported per group, in output order.
METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "precision", "recall", "fpr", "f1",
                            "roc_auc", "selection_rate", "base_rate")
# Gap rows per grouping: "<metric>_gap_difference" (max − min over groups), "<metric>_gap_ratio"
# (min / max), plus these two fairlearn summaries (tests/report_tables.py imports this name).
FAIRNESS_GAPS: tuple[str, ...] = ("demographic_parity_difference", "equalized_odds_difference")


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def weighted_auc(y: np.ndarray, score: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC per column of the weight matrix ``w`` (n × B), ties counted half (as sklearn)."""
    order = np.argsort(score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first row of each distinct score
    wo, yo = w[order], y[order][:, None]
    pos = np.add.reduceat(wo * yo, starts, axis=0)  # positive weight per score level
    neg = np.add.reduceat(wo * ~yo, starts, axis=0)
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
    # confusion counts per weight column as matrix-vector products (BLAS, no n × B temporaries)
    tp, fp, fn, tn = (m.astype(np.float64) @ w for m in (y & p, ~y & p, y & ~p, ~y & ~p))
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
    rows: list[dict] = []
    all_groups = {"overall": np.full(len(y), "all", dtype=object), **groupings}
    for group_by, groups in all_groups.items():
        groups = np.asarray(groups, dtype=object)
        mask = np.asarray(groups != None, dtype=bool)  # noqa: E711 (elementwise)
        if not mask.any():
            continue
        ys = score[mask]
        # column 0: unit weights (the point value); columns 1..B: the bootstrap resamples
        w = np.column_stack([np.ones(int(mask.sum())), weights[mask]])

        def _all(y_true, y_pred, rows_):
            r = np.asarray(rows_)
            return weighted_metrics(y_true, y_pred, ys[r], w[r])

        mf = MetricFrame(metrics={"all": _all, "n": count}, y_true=y[mask].astype(int),
                         y_pred=label[mask].astype(int), sensitive_features=groups[mask],
                         sample_params={"all": {"rows_": np.arange(int(mask.sum()))}})
        by_group = mf.by_group
        names = [str(g) for g in by_group.index]
        stack = np.stack([np.asarray(v, float) for v in by_group["all"]])  # groups × metrics × (1+B)
        point, boot = stack[:, :, 0], stack[:, :, 1:]
        has_boot = boot.shape[2] > 0
        for gi, name in enumerate(names):
            evaluated_on = "overall" if group_by == "overall" else f"{group_by}={name}"
            for mi, m in enumerate(METRICS):
                lo, hi = _interval(boot[gi, mi], ci_level) if has_boot else (np.nan, np.nan)
                rows.append({"evaluated_on": evaluated_on, "group_by": group_by, "group": name,
                             "metric": m, "value": float(point[gi, mi]), "ci_low": lo,
                             "ci_high": hi, "n": int(by_group["n"].iloc[gi])})
        if group_by == "overall":
            continue
        gaps: dict[str, tuple[float, np.ndarray]] = {}
        for mi, m in enumerate(METRICS):
            # as MetricFrame.difference / .ratio(method="between_groups"): max − min, min / max
            d, r = _gap_samples(point[:, mi], point[:, mi][:, None])
            d_s, r_s = _gap_samples(point[:, mi], boot[:, mi, :])
            gaps[f"{m}_gap_difference"] = (float(d[0]), d_s)
            gaps[f"{m}_gap_ratio"] = (float(r[0]), r_s)
        # fairlearn's definitions: demographic parity = selection-rate difference; equalized
        # odds = the larger of the TPR and FPR differences (tests compare with fairlearn's own)
        gaps["demographic_parity_difference"] = gaps["selection_rate_gap_difference"]
        tpr, fpr = gaps["recall_gap_difference"], gaps["fpr_gap_difference"]
        gaps["equalized_odds_difference"] = (float(np.fmax(tpr[0], fpr[0])),
                                             np.fmax(tpr[1], fpr[1]))
        n = int(mask.sum())
        for metric, (value, samples) in gaps.items():
            lo, hi = _interval(samples, ci_level) if has_boot else (np.nan, np.nan)
            rows.append({"evaluated_on": f"gap:{group_by}", "group_by": group_by, "group": None,
                         "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": n})
    return rows
