"""Fit one clustering and score it: the body of one sweep task.

:func:`sweep_one` is the unit of work of the sweep. The Ray path runs it as a task with the
space's matrix passed by object reference; the benchmark's sequential path calls it directly,
so both paths run exactly the same code.

Which rows each algorithm is fitted on
--------------------------------------
* ``kmeans`` and ``gmm`` cost time linear in the rows, so they are fitted on every row of the
  space (``MiniBatchKMeans`` above ``cluster.minibatch_threshold`` rows). The sweep's fit *is*
  the all-rows fit of the chosen k, so it is not fitted a second time.
* ``agglomerative`` (Ward) needs O(n^2) memory and ``hdbscan`` O(n^2) time in the worst case,
  so they are fitted on a seeded sample of ``cluster.sample_rows`` rows (the same sample for
  every k and both algorithms of a space) and the other rows are labelled afterwards:

  - Ward clusters are the clusters of minimum within-cluster variance, i.e. compact groups
    around their means, so labelling a new row with the nearest cluster mean is the rule the
    clustering itself optimises (the same rule K-Means uses). That is sound as long as the
    sample is large enough that each cluster's mean is well estimated (hundreds of rows per
    cluster; ``sample_rows`` >= 50 * k_max is a safe floor).
  - HDBSCAN clusters are density-connected sets of any shape, with noise; their means can lie
    outside the cluster, so the nearest-centroid rule is *not* sound for them. A row outside the
    sample takes the label of its nearest sampled row instead (noise stays noise), which follows
    the cluster's shape.

Metrics (scikit-learn's definitions, so the numbers compare with published ones)
--------------------------------------------------------------------------------
* ``inertia``: sum over rows of the squared Euclidean distance to the mean of the row's cluster
  (K-Means' objective, computed the same way for every algorithm).
* ``silhouette``: ``sklearn.metrics.silhouette_score`` on the space's fixed seeded sample of
  ``cluster.silhouette_rows`` rows (its cost is quadratic in the rows).
* ``davies_bouldin`` / ``calinski_harabasz``: sklearn's, on every row (linear cost).
* Against a binary reference attribute A (e.g. ``Male``): ``nmi`` =
  ``normalized_mutual_info_score(A, labels)`` (arithmetic normalisation), ``ari`` =
  ``adjusted_rand_score(A, labels)`` — the attribute is treated as a 2-class partition of the
  rows and compared with the k-class partition of the clustering; ``purity`` = sum over clusters
  of the count of the cluster's majority class of A, divided by N (so purity >= max(P(A), 1-P(A))).
* HDBSCAN noise (label -1) is left out of the internal metrics (it is not a cluster) and kept as
  its own group in the external ones (every row is scored against the attribute).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

# K-Means restarts (k-means++ seeding each time; the best inertia is kept).
KMEANS_N_INIT = 3
# Rows per MiniBatchKMeans step: large enough that the centres settle in a few passes.
MINIBATCH_SIZE = 4096
# Covariance regulariser added to the GMM's diagonal: binary spaces have zero-variance
# dimensions inside a cluster, which sklearn's default (1e-6) turns into degenerate components.
GMM_REG_COVAR = 1e-3
# GMM EM iterations cap.
GMM_MAX_ITER = 200


@dataclass(frozen=True)
class SweepSpec:
    """What one sweep task fits: everything but the (shared) data."""

    space: str
    algorithm: str  # kmeans / gmm / agglomerative / hdbscan
    k: int  # clusters asked for; for hdbscan ignored (min_cluster_size decides)
    seed: int  # derived from run.seed, the space, the algorithm and k
    minibatch_threshold: int
    min_cluster_size: int = 0  # hdbscan only


def hdbscan_min_cluster_size(sample_n: int, k_max: int) -> int:
    """HDBSCAN's ``min_cluster_size``: a quarter of the mean cluster size at ``k_max``.

    Groups smaller than that are finer than anything the k-sweep looks at, so they are noise
    rather than clusters; at least 10 rows so that tiny runs still find dense groups.
    """
    return max(10, sample_n // (4 * k_max))


def fit_predict(X: np.ndarray, spec: SweepSpec, sample_idx: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Labels for every row of ``X`` and the number of rows the model was fitted on."""
    algo = spec.algorithm
    n = X.shape[0]
    if algo == "kmeans":
        from sklearn.cluster import KMeans, MiniBatchKMeans

        if n > spec.minibatch_threshold:
            model = MiniBatchKMeans(n_clusters=spec.k, batch_size=MINIBATCH_SIZE,
                                    n_init=KMEANS_N_INIT, random_state=spec.seed)
        else:
            model = KMeans(n_clusters=spec.k, n_init=KMEANS_N_INIT, random_state=spec.seed)
        return model.fit_predict(X).astype(np.int32), n
    if algo == "gmm":
        from sklearn.mixture import GaussianMixture

        model = GaussianMixture(n_components=spec.k, covariance_type="full",
                                reg_covar=GMM_REG_COVAR, max_iter=GMM_MAX_ITER,
                                random_state=spec.seed)
        return model.fit(X).predict(X).astype(np.int32), n
    if algo not in ("agglomerative", "hdbscan"):
        raise ValueError(f"unknown clustering algorithm {algo!r}; expected kmeans, gmm, "
                         "agglomerative or hdbscan")
    idx = np.arange(n) if sample_idx is None else sample_idx
    Xs = X[idx]
    if algo == "agglomerative":
        from sklearn.cluster import AgglomerativeClustering

        sample_labels = AgglomerativeClustering(n_clusters=spec.k, linkage="ward").fit_predict(Xs)
    else:
        from sklearn.cluster import HDBSCAN

        sample_labels = HDBSCAN(min_cluster_size=spec.min_cluster_size, copy=True).fit_predict(Xs)
    sample_labels = sample_labels.astype(np.int32)
    if len(idx) == n:
        out = np.empty(n, dtype=np.int32)
        out[idx] = sample_labels
        return out, n
    return _extend(X, idx, sample_labels, algo), len(idx)


def _extend(X: np.ndarray, idx: np.ndarray, sample_labels: np.ndarray, algo: str) -> np.ndarray:
    """Label the rows outside the fitted sample (see the module docstring for why two rules)."""
    from sklearn.metrics import pairwise_distances_argmin

    labels = np.empty(X.shape[0], dtype=np.int32)
    rest = np.setdiff1d(np.arange(X.shape[0]), idx, assume_unique=True)
    if algo == "agglomerative":
        ids = np.unique(sample_labels)
        centroids = np.stack([X[idx[sample_labels == c]].mean(axis=0) for c in ids])
        labels[rest] = ids[pairwise_distances_argmin(X[rest], centroids)]
    else:
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=1).fit(X[idx])
        labels[rest] = sample_labels[nn.kneighbors(X[rest], return_distance=False)[:, 0]]
    labels[idx] = sample_labels
    return labels


def cluster_means(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids >= 0, their mean rows)."""
    ids = np.unique(labels[labels >= 0])
    if len(ids) == 0:
        return ids, np.empty((0, X.shape[1]))
    return ids, np.stack([X[labels == c].mean(axis=0) for c in ids])


def inertia(X: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared distances to the cluster mean (noise rows left out)."""
    total = 0.0
    for c in np.unique(labels[labels >= 0]):
        diff = X[labels == c] - X[labels == c].mean(axis=0)
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


def purity(truth: np.ndarray, labels: np.ndarray) -> float:
    """Sum over clusters of the cluster's majority-class count, divided by N."""
    from sklearn.metrics.cluster import contingency_matrix

    cm = contingency_matrix(truth, labels)
    return float(cm.max(axis=0).sum() / cm.sum())


def score(X: np.ndarray, labels: np.ndarray, sil_idx: np.ndarray,
          references: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Internal metrics on ``X`` and external ones against each reference attribute."""
    from sklearn.metrics import (adjusted_rand_score, calinski_harabasz_score,
                                 davies_bouldin_score, normalized_mutual_info_score,
                                 silhouette_score)

    out: dict[str, float | None] = {}
    keep = labels >= 0
    Xk, lk = X[keep], labels[keep]
    n_clusters = len(np.unique(lk))
    ok = 2 <= n_clusters <= len(lk) - 1  # sklearn's validity range for the internal scores
    out["inertia"] = inertia(X, labels) if n_clusters >= 1 else None
    out["davies_bouldin"] = float(davies_bouldin_score(Xk, lk)) if ok else None
    out["calinski_harabasz"] = float(calinski_harabasz_score(Xk, lk)) if ok else None
    sil = sil_idx[keep[sil_idx]]
    n_sil = len(np.unique(labels[sil]))
    out["silhouette"] = (float(silhouette_score(X[sil], labels[sil]))
                         if 2 <= n_sil <= len(sil) - 1 else None)
    out["silhouette_rows"] = int(len(sil))
    for attr, truth in references.items():
        out[f"nmi_{attr}"] = float(normalized_mutual_info_score(truth, labels))
        out[f"ari_{attr}"] = float(adjusted_rand_score(truth, labels))
        out[f"purity_{attr}"] = purity(truth, labels)
    return out


def sweep_one(X: np.ndarray, spec: SweepSpec, sample_idx: np.ndarray | None,
              sil_idx: np.ndarray, references: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:
    """Fit ``spec`` on ``X`` and score it: (sweep row without ``chosen``, labels of every row)."""
    t0 = time.perf_counter()
    labels, fit_rows = fit_predict(X, spec, sample_idx)
    fit_s = time.perf_counter() - t0
    found = len(np.unique(labels[labels >= 0]))
    row = {
        "space": spec.space, "algorithm": spec.algorithm,
        "k": found if spec.algorithm == "hdbscan" else spec.k,
        "param": (f"min_cluster_size={spec.min_cluster_size}" if spec.algorithm == "hdbscan"
                  else f"n_clusters={spec.k}"),
        "n_rows": int(X.shape[0]), "fit_rows": int(fit_rows),
        "noise_fraction": float(np.mean(labels < 0)),
        "fit_seconds": fit_s,
    }
    row.update(score(X, labels, sil_idx, references))
    return row, labels


# Direction of each k rule: +1 = larger is better, -1 = smaller is better.
K_RULES = {"silhouette": +1, "calinski_harabasz": +1, "davies_bouldin": -1}


def choose_k(rows: list[dict], rule: str, fixed_k: int) -> tuple[int, str]:
    """The k kept for one space x algorithm, and why.

    ``fixed_k`` > 0 wins. Otherwise the best ``rule`` value (ties: the smallest k, the simpler
    model); rows where the metric is undefined are ignored; when it is undefined everywhere the
    smallest k is kept and the reason says so.
    """
    if not rows:
        raise ValueError("choose_k needs at least one sweep row")
    if fixed_k:
        if fixed_k not in {r["k"] for r in rows}:
            raise ValueError(f"cluster.k={fixed_k} could not be fitted (too few rows for "
                             f"{fixed_k} clusters); lower cluster.k or give the stage more rows")
        return fixed_k, f"cluster.k={fixed_k}"
    sign = K_RULES[rule]
    scored = [(sign * r[rule], -r["k"], r["k"]) for r in rows if r.get(rule) is not None]
    if not scored:
        k = min(r["k"] for r in rows)
        return k, f"{rule} undefined for every k; smallest k kept"
    best = max(scored)
    return best[2], f"best {rule}"
