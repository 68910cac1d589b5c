"""Undersampling of the training rows (strategies and their exact proportions: see the package
docstring). Every strategy only removes rows, never duplicates them, and draws with the numpy
Generator it is given, so a strategy seeded from ``run.seed`` picks the same rows on every rerun.
"""

from __future__ import annotations

import numpy as np

SAMPLINGS: tuple[str, ...] = ("none", "class", "cluster", "cluster_class")

# Inside one cluster the cluster-based strategies equal the plain ones (a single cluster is
# already "balanced across clusters"), so per-cluster models only use these two.
PER_CLUSTER_SAMPLINGS: tuple[str, ...] = ("none", "class")


class SamplingError(ValueError):
    """The strategy cannot be applied to these rows (the message says why)."""


def strata(y: np.ndarray, cluster: np.ndarray, strategy: str) -> np.ndarray | None:
    """The stratum of each row that ``strategy`` equalises (None: keep every row).

    ``cluster`` uses -1 for rows without a cluster (e.g. HDBSCAN noise): the cluster-based
    strategies cannot place them in a stratum, so they give them -1 and drop them.
    """
    y = np.asarray(y).astype(np.int64)
    if strategy == "none":
        return None
    if strategy == "class":
        return y
    if strategy not in ("cluster", "cluster_class"):
        raise SamplingError(f"unknown sampling {strategy!r}; expected one of {list(SAMPLINGS)}")
    cluster = np.asarray(cluster).astype(np.int64)
    s = cluster if strategy == "cluster" else cluster * 2 + y
    return np.where(cluster >= 0, s, -1)  # rows without a cluster take no part (-1)


def undersample(y: np.ndarray, cluster: np.ndarray, strategy: str,
                rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of the rows kept by ``strategy``.

    Every stratum (class, cluster, or cluster × class cell) is reduced, by drawing without
    replacement, to the size of the smallest stratum present, so the strata end up equal.
    ``cluster_class`` requires every cluster to hold both classes: a cluster without positives
    would make "equal cells" impossible, and that is an error rather than a silent drop.
    """
    y = np.asarray(y)
    n = len(y)
    s = strata(y, cluster, strategy)
    if s is None:
        return np.arange(n)
    if n == 0:
        raise SamplingError("no training rows to sample from")
    values, counts = np.unique(s[s >= 0], return_counts=True)
    if len(values) == 0:
        raise SamplingError(f"sampling {strategy!r}: no training row has a cluster")
    if strategy in ("class", "cluster_class"):
        if strategy == "class" and len(values) < 2:
            raise SamplingError("class balancing needs both classes in the training rows")
        if strategy == "cluster_class":
            clusters = np.unique(np.asarray(cluster)[np.asarray(cluster) >= 0])
            have = set(values.tolist())
            missing = [(int(c), cls) for c in clusters for cls in (0, 1) if int(c) * 2 + cls not in have]
            if missing:
                raise SamplingError(
                    "cluster x class balancing needs both classes in every cluster; empty "
                    "(cluster, class) cells: " + ", ".join(f"({c}, {bool(k)})" for c, k in missing))
    m = int(counts.min())
    keep = [rng.choice(np.flatnonzero(s == v), size=m, replace=False) for v in values]
    return np.sort(np.concatenate(keep))


def proportions(y: np.ndarray, cluster: np.ndarray) -> dict:
    """Class and cluster shares of a set of rows (what the package docstring promises)."""
    y = np.asarray(y).astype(bool)
    cluster = np.asarray(cluster)
    n = len(y)
    out = {"n": int(n), "positive_share": float(y.mean()) if n else float("nan")}
    if n and (cluster >= 0).any():
        vals, cnt = np.unique(cluster[cluster >= 0], return_counts=True)
        out["cluster_share"] = {str(int(v)): float(c / n) for v, c in zip(vals, cnt)}
    return out
