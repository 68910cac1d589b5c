"""Describe a clustering: profiles, readable labels, centroid distances, P(A|B), demographics,
and the 2-D map.

Profiles use the ground-truth attributes of the manifest when it has any (``source =
"annotations"``), else the predicted ones thresholded at 0.5 (``source = "predicted"``), so a
cluster found in the ``semantic`` or ``embedding`` space is still described by what is *known*
about its faces.

Readable label
--------------
For each attribute (the classify target left out, since the clustering did not see it) the
term is "A" when the cluster's prevalence p exceeds the dataset's P, scored log(p / P), and
"not A" otherwise, scored log((1 - p) / (1 - P)). Terms that hold for at least
``MIN_TERM_SHARE`` of the cluster and whose lift is at least ``MIN_TERM_LIFT`` are ranked by
score and the best ``cluster.label_terms`` are joined with " · " ("Male · Goatee · not
Smiling"). The share floor keeps a rare attribute that only 5 % of a cluster has (lift 3 over a
1.7 % base rate) from naming the cluster.
"""

from __future__ import annotations

import math

import numpy as np

# A term must hold for at least this share of the cluster to appear in its label.
MIN_TERM_SHARE = 0.25
# A term must be at least this many times more common in the cluster than overall.
MIN_TERM_LIFT = 1.25


def _readable(attr: str) -> str:
    return attr.replace("_", " ")


def cluster_label(prev: np.ndarray, overall: np.ndarray, names: list[str], terms: int,
                  exclude: str | None) -> str:
    scored = []
    for p, P, name in zip(prev, overall, names):
        if name == exclude or not np.isfinite(p):
            continue
        if p >= P and P > 0:
            share, lift, term = p, p / P, _readable(name)
        elif p < P and P < 1:
            share, lift, term = 1 - p, (1 - p) / (1 - P), "not " + _readable(name)
        else:
            continue
        if share >= MIN_TERM_SHARE and lift >= MIN_TERM_LIFT:
            scored.append((math.log(lift), term))
    scored.sort(key=lambda t: (-t[0], t[1]))
    if not scored:
        return "typical (no distinctive attribute)"
    return " · ".join(t for _, t in scored[:terms])


def profiles(key: dict, labels: np.ndarray, M: np.ndarray, V: np.ndarray, names: list[str],
             source: str, terms: int, exclude: str | None) -> list[dict]:
    """One row per cluster x attribute. ``M``: bool (n, a) values; ``V``: bool (n, a) not-null.

    Counts per cluster come from one ``bincount`` per attribute column, so nothing of size
    rows x attributes is made (a float copy of M is 65 MB at 202,599 x 40).
    """
    clusters, code = np.unique(labels, return_inverse=True)
    nc = len(clusters)
    pos = np.stack([np.bincount(code, weights=M[:, j] & V[:, j], minlength=nc)
                    for j in range(M.shape[1])], axis=1).reshape(nc, M.shape[1])
    known = np.stack([np.bincount(code, weights=V[:, j], minlength=nc)
                      for j in range(M.shape[1])], axis=1).reshape(nc, M.shape[1])
    overall = pos.sum(0) / np.maximum(known.sum(0), 1)
    sizes = np.bincount(code, minlength=nc)
    n = len(labels)
    rows = []
    for i, c in enumerate(clusters):
        prev = pos[i] / np.maximum(known[i], 1)
        label = cluster_label(prev, overall, names, terms, exclude)
        if c < 0:
            label = "noise: " + label
        size = int(sizes[i])
        for j, name in enumerate(names):
            rows.append({**key, "cluster": int(c), "size": size, "share": size / n,
                         "attribute": name, "source": source, "prevalence": float(prev[j]),
                         "overall": float(overall[j]),
                         "lift": float(prev[j] / overall[j]) if overall[j] > 0 else None,
                         "label": label})
    return rows


def centroid_distances(key: dict, X: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Euclidean distances between cluster means (noise left out), the full k x k matrix."""
    from sklearn.metrics import pairwise_distances

    from pipeline.cluster._fit import cluster_means

    ids, C = cluster_means(X, labels)
    D = pairwise_distances(C) if len(ids) else np.empty((0, 0))
    return [{**key, "cluster_a": int(a), "cluster_b": int(b), "distance": float(D[i, j])}
            for i, a in enumerate(ids) for j, b in enumerate(ids)]


# Rows per block of the P(A | B) counts: a block's float copies are 2 x 16,384 x 40 x 4 bytes.
CONDITIONAL_BLOCK_ROWS = 16384


def conditional(M: np.ndarray, V: np.ndarray, names: list[str], source: str) -> list[dict]:
    """P(A | B) for every ordered pair, over the rows where both A and B are known."""
    return conditional_batched(lambda lo, hi: (M[lo:hi], V[lo:hi]), len(M), names, source)


def conditional_batched(block, n: int, names: list[str], source: str) -> list[dict]:
    """:func:`conditional` over ``n`` rows given block by block: ``block(lo, hi)`` returns the
    (values, known) bool matrices of rows lo..hi. The pair counts are summed over blocks of
    ``CONDITIONAL_BLOCK_ROWS`` (float32 products are exact below 2**24 rows per block)."""
    a = len(names)
    both = np.zeros((a, a))  # [a, b] = rows with A and B
    given = np.zeros((a, a))  # [a, b] = rows with A known and B true
    for lo in range(0, n, CONDITIONAL_BLOCK_ROWS):
        M, V = block(lo, min(n, lo + CONDITIONAL_BLOCK_ROWS))
        A = (M & V).astype(np.float32)
        both += A.T @ A
        given += V.astype(np.float32).T @ A
    rows = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            ng = int(given[i, j])
            rows.append({"attribute": a, "given": b, "p": float(both[i, j] / ng) if ng else None,
                         "n_given": ng, "source": source})
    return rows


def demographics(key: dict, labels: np.ndarray, columns: dict[str, np.ndarray]) -> list[dict]:
    """Per demographic attribute: the cluster x category composition and a chi-square test.

    ``columns`` maps a name to an object array of category strings (None = unknown, left out).
    The test is scipy's ``chi2_contingency`` on the cluster x category count table (empty
    rows/columns dropped; Yates' correction only applies to 2 x 2 tables, as in scipy).
    """
    from scipy.stats import chi2_contingency

    rows = []
    for attr, values in columns.items():
        known = np.asarray(values != None, dtype=bool)  # noqa: E711 (elementwise, object array)
        if not known.any():
            continue
        cats, g = np.unique(values[known].astype(str), return_inverse=True)
        cats = cats.tolist()
        clusters, c = np.unique(labels[known], return_inverse=True)
        # cluster x category counts in one bincount (no per-row or per-cell pass over the rows)
        table = np.bincount(c * len(cats) + g, minlength=len(clusters) * len(cats)
                            ).reshape(len(clusters), len(cats))
        sub = table[table.sum(1) > 0][:, table.sum(0) > 0]
        chi2 = dof = p = None
        if sub.shape[0] >= 2 and sub.shape[1] >= 2:
            res = chi2_contingency(sub)
            chi2, p, dof = float(res.statistic), float(res.pvalue), int(res.dof)
        overall = table.sum(0) / table.sum()
        for i, c in enumerate(clusters):
            size = table[i].sum()
            for j, g in enumerate(cats):
                rows.append({**key, "attribute": attr, "cluster": int(c), "category": g,
                             "count": int(table[i, j]), "share": float(table[i, j] / size),
                             "overall": float(overall[j]), "chi2": chi2, "dof": dof,
                             "p_value": p})
    return rows


def embed_2d(X: np.ndarray, method: str, seed: int) -> np.ndarray:
    """2-D coordinates of ``X``'s rows: t-SNE (PCA init), or UMAP when asked for."""
    if method == "umap":
        import umap  # checked for at stage start, so a missing package is a clear error there

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(X).astype(np.float32)
    from sklearn.manifold import TSNE

    m = X.shape[0]
    spread = float(np.ptp(X, axis=0).max()) if m else 0.0
    if spread <= 1e-5 * max(1e-30, float(np.abs(X).max()) if m else 1.0):
        # Rows identical up to float32 noise (a barely trained model's probabilities) carry no
        # map, and sklearn's Barnes-Hut t-SNE divides by their zero spread, then crashes its
        # worker (SIGSEGV in the quad tree, seen at scale): draw them at one point instead.
        return np.zeros((m, 2), np.float32)
    perplexity = float(min(30.0, max(2.0, (m - 1) / 3)))  # sklearn needs perplexity < rows
    return TSNE(n_components=2, init="pca", perplexity=perplexity,
                random_state=seed).fit_transform(X).astype(np.float32)
