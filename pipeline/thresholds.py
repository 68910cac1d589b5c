"""The one decision-threshold rule of the pipeline (train's per-attribute thresholds, classify's
per-model threshold).

Candidates are 0.5 and the val scores' 1st..99th percentiles, so the rule works on any score
scale (probabilities, margins) and adapts its resolution to where the scores lie, which a fixed
probability grid (train used 0.05..0.95 in steps of 0.01) does not; ties go to the candidate
nearest 0.5, and val rows of a single class keep 0.5.
"""

from __future__ import annotations

import numpy as np


def tune_threshold(y: np.ndarray, score: np.ndarray, metric: str) -> tuple[float, str]:
    """The decision threshold that maximises ``metric`` on the val rows given.

    Candidates are 0.5 and the val scores' percentiles 1..99; ties go to the candidate closest
    to 0.5. Returns (threshold, note).
    """
    if metric == "none":
        return 0.5, "fixed at 0.5 (classify.threshold_metric = none)"
    y = np.asarray(y, bool)
    if len(y) == 0 or y.all() or (~y).all():
        return 0.5, "fixed at 0.5: val rows hold a single class"
    cands = np.unique(np.concatenate([[0.5], np.quantile(score, np.linspace(0.01, 0.99, 99))]))
    # every candidate at once: an n × T matrix of decisions (cheap even for CelebA's 20k val rows)
    pred = score[:, None] >= cands[None, :]
    pos, neg = int(y.sum()), int((~y).sum())
    tp = (pred & y[:, None]).sum(0)
    tn = neg - (pred & ~y[:, None]).sum(0)
    vals = (tp + tn) / len(y) if metric == "accuracy" else (tp / pos + tn / neg) / 2
    best = np.flatnonzero(vals >= vals.max() - 1e-12)
    t = float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])
    return t, f"max val {metric} = {vals.max():.4f}"


def tune_thresholds(y: np.ndarray, p: np.ndarray, metric: str = "accuracy") -> np.ndarray:
    """:func:`tune_threshold` per column of ``y`` / ``p`` (rows x attributes)."""
    return np.array([tune_threshold(y[:, j], p[:, j], metric)[0] for j in range(y.shape[1])])
