"""Probable label errors by confident learning, and their rate per cluster and per group.

For one audited attribute: out-of-sample predicted probabilities from a cross-validated
logistic regression (:func:`out_of_sample_probs`, every row scored by a model that never saw
its label), then cleanlab's ``find_label_issues`` (confident learning, prune by noise rate) and
``get_label_quality_scores`` (self-confidence) on them (:func:`label_issues`). The suspected
error rate per group and a chi-square test of whether it differs between groups:
:func:`issue_rates`.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.stats import chi2_contingency


def out_of_sample_probs(X: np.ndarray, labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``n x K`` probabilities of the ``K`` classes (codes 0..K-1 in ``labels``), each row from a
    model fitted on the other folds (stratified, seeded)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(model, X, labels, cv=cv, method="predict_proba")


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                  np.ndarray]:
    """(is_issue, quality, rank) per row; rank 1 = lowest quality (most suspect), ties by row."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # n_jobs=1: cleanlab would otherwise fork a pool of the (Ray driver) process per call
    is_issue = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    order = np.lexsort((np.arange(len(labels)), quality))
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(1, len(labels) + 1)
    return np.asarray(is_issue, bool), np.asarray(quality, np.float64), rank


def issue_rates(is_issue: np.ndarray, groupings: dict[str, np.ndarray], alpha: float
                ) -> pl.DataFrame:
    """Suspected-error rate overall and per group of each grouping, with a chi-square test of
    independence (issue x group) per grouping. Rows with a null group take no part in it."""
    n_all = len(is_issue)
    rows = [{"group_by": "overall", "group": "all", "n": n_all, "issues": int(is_issue.sum()),
             "rate": float(is_issue.mean()) if n_all else 0.0, "chi2": None, "dof": None,
             "p_value": None, "significant": None}]
    for name, groups in groupings.items():
        ok = np.array([g is not None for g in groups], bool)
        g = np.asarray(groups, dtype=object)[ok].astype(str)
        iss = is_issue[ok]
        cats = sorted(set(g.tolist()))
        if len(cats) < 2:
            continue
        n = np.array([(g == c).sum() for c in cats])
        k = np.array([iss[g == c].sum() for c in cats])
        chi2 = p = None
        dof = None
        if 0 < k.sum() < n.sum():
            res = chi2_contingency(np.stack([k, n - k]))
            chi2, p, dof = float(res.statistic), float(res.pvalue), int(res.dof)
        elif n.sum():  # no issue at all (or all issues): the rates are equal
            chi2, p, dof = 0.0, 1.0, len(cats) - 1
        for c, nc, kc in zip(cats, n, k):
            rows.append({"group_by": name, "group": c, "n": int(nc), "issues": int(kc),
                         "rate": float(kc / nc) if nc else 0.0, "chi2": chi2, "dof": dof,
                         "p_value": p, "significant": None if p is None else bool(p < alpha)})
    return pl.DataFrame(rows, schema={"group_by": pl.String, "group": pl.String, "n": pl.Int64,
                                      "issues": pl.Int64, "rate": pl.Float64, "chi2": pl.Float64,
                                      "dof": pl.Int32, "p_value": pl.Float64,
                                      "significant": pl.Boolean})


def age_groups(age: np.ndarray, edges: list[int]) -> np.ndarray:
    """UTKFace ages as group labels "20-29", "70+" from the lower ``edges`` (null stays null)."""
    edges = sorted(edges)
    names = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]
    out = np.empty(len(age), dtype=object)
    for r, a in enumerate(age):
        if a is None or (isinstance(a, float) and np.isnan(a)):
            out[r] = None
        else:
            out[r] = names[max(0, int(np.searchsorted(edges, a, side="right")) - 1)]
    return out
