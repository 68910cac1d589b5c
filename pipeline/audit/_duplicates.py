"""Exact and near duplicates, the labels they disagree on, and leakage across splits.

Pure functions on one frame ``rows`` (one row per audited image: ``image_id``, ``split``,
``identity``, ``content_hash`` and the annotation columns) and, for near duplicates, the
embedding matrix aligned with it. The neighbour search is cut into blocks of query rows so that
a caller can run the blocks as Ray tasks (:func:`near_pairs` takes the block runner).
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable

import numpy as np
import polars as pl

from pipeline.schemas import SPLITS

# --------------------------------------------------------------------------- exact


def exact_groups(hashes: np.ndarray) -> np.ndarray:
    """Group id per row for byte-identical files (same ``content_hash``); -1 = no twin.

    Groups are numbered 0, 1, ... in the order of their first row (rows are sorted by image_id
    upstream, so the numbering is stable across reruns).
    """
    df = pl.DataFrame({"h": hashes.astype(str)}).with_row_index("i")
    first = df.group_by("h").agg(pl.col("i").min().alias("first"), pl.len().alias("n"))
    dup = first.filter(pl.col("n") > 1).sort("first").with_row_index("g")
    out = df.join(dup.select("h", "g"), on="h", how="left").sort("i")
    return out["g"].fill_null(-1).cast(pl.Int64).to_numpy()


# --------------------------------------------------------------------------- near

def normalise(E: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); a zero row stays zero."""
    E = np.asarray(E, dtype=np.float32)
    norms = np.linalg.norm(E, axis=1, keepdims=True)
    return E / np.maximum(norms, 1e-12)


def neighbour_block(E: np.ndarray, start: int, stop: int, k: int, working_memory_mib: int = 256
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows (cosine distance) of rows ``start:stop`` of unit-norm ``E``.

    Exact brute-force search through scikit-learn, distances computed in chunks of at most
    ``working_memory_mib`` so one block's memory stays bounded whatever ``n`` is. Returns
    (indices, distances), each ``(stop - start) x k``.
    """
    import sklearn
    from sklearn.neighbors import NearestNeighbors

    k = min(k + 1, len(E))
    with sklearn.config_context(working_memory=working_memory_mib):
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(E)
        dist, idx = nn.kneighbors(E[start:stop])
    return idx, np.maximum(dist, 0.0)


def near_pairs(E: np.ndarray, *, k: int, threshold: float, block_rows: int,
               run_blocks: Callable[[list[tuple[int, int]]], list] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows within cosine ``threshold`` among each row's ``k`` neighbours.

    ``run_blocks`` maps a list of (start, stop) blocks to their :func:`neighbour_block` results
    (the stage passes a Ray runner); by default the blocks run here, one after the other.
    Returns (i, j, distance, nearest) where ``nearest`` is each row's distance to its nearest
    other row (the distribution the threshold is judged against).
    """
    n = len(E)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.full(n, np.nan)
    blocks = [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]
    results = (run_blocks(blocks) if run_blocks is not None
               else [neighbour_block(E, s, t, k) for s, t in blocks])
    ii, jj, dd = [], [], []
    nearest = np.full(n, np.nan)
    for (s, t), (idx, dist) in zip(blocks, results):
        q = np.repeat(np.arange(s, t), idx.shape[1])
        j, d = idx.ravel(), dist.ravel()
        other = j != q
        qo, jo, do = q[other], j[other], d[other]
        # nearest other row of each query (the first non-self neighbour; -inf-safe via minimum)
        near = np.full(t - s, np.inf)
        np.minimum.at(near, qo - s, do)
        nearest[s:t] = np.where(np.isinf(near), np.nan, near)
        keep = do <= threshold
        qo, jo, do = qo[keep], jo[keep], do[keep]
        ii.append(np.minimum(qo, jo))
        jj.append(np.maximum(qo, jo))
        dd.append(do)
    i, j, d = np.concatenate(ii), np.concatenate(jj), np.concatenate(dd)
    if len(i):  # each pair found from both ends: keep one, with the smaller distance
        order = np.lexsort((d, j, i))
        i, j, d = i[order], j[order], d[order]
        first = np.ones(len(i), bool)
        first[1:] = (i[1:] != i[:-1]) | (j[1:] != j[:-1])
        i, j, d = i[first], j[first], d[first]
    return i.astype(np.int64), j.astype(np.int64), d.astype(np.float64), nearest


def near_groups(n: int, i: np.ndarray, j: np.ndarray, d: np.ndarray, exact: np.ndarray
                ) -> np.ndarray:
    """Group id per row for near duplicates; -1 = none.

    Byte-identical rows count as one file (their exact group). Groups are formed greedily over
    the near pairs in order of distance, closest first: two ungrouped files start a group, led
    by the first; a later pair adds an ungrouped file only through the group's leader. Every
    member is thus within the threshold of its leader, so the groups cannot chain (connected
    components over a loose threshold do: one pair links to the next until half the collection
    is one "group"). Each group has at least two different files; exact twins of a member join
    it. Numbered by first row.
    """
    # one node per file: exact members map to their group's first row
    rep = np.arange(n)
    if (exact >= 0).any():
        first = {}
        for r in np.flatnonzero(exact >= 0):
            rep[r] = first.setdefault(int(exact[r]), int(r))
    a, b = rep[i], rep[j]
    keep = a != b
    a, b, dd = a[keep], b[keep], d[keep]
    group = np.full(n, -1, np.int64)
    leader: list[int] = []
    for r in np.lexsort((b, a, dd)):
        x, y = int(a[r]), int(b[r])
        gx, gy = group[x], group[y]
        if gx < 0 and gy < 0:
            group[x] = group[y] = len(leader)
            leader.append(x)
        elif gx >= 0 and gy < 0 and leader[gx] == x:
            group[y] = gx
        elif gy >= 0 and gx < 0 and leader[gy] == y:
            group[x] = gy
    out = group[rep]  # exact twins follow their file
    # renumber by first row
    ids = out[out >= 0]
    order = {g: k for k, g in enumerate(dict.fromkeys(ids.tolist()))}
    return np.array([order[g] if g >= 0 else -1 for g in out.tolist()], np.int64)


def member_distance(n: int, i: np.ndarray, j: np.ndarray, d: np.ndarray, exact: np.ndarray
                    ) -> np.ndarray:
    """Each row's distance to the closest other member of its group (0 with an exact twin)."""
    out = np.full(n, np.inf)
    if len(i):
        np.minimum.at(out, i, d)
        np.minimum.at(out, j, d)
    out[exact >= 0] = 0.0
    return out


# --------------------------------------------------------------------------- tables

def _as_text(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    return df.with_columns([pl.col(c).cast(pl.String) for c in cols])


def duplicate_tables(rows: pl.DataFrame, kind: str, group: np.ndarray, distance: np.ndarray,
                     label_cols: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(duplicates, label_conflicts) rows of one kind of group (schemas in ``_schemas``)."""
    df = rows.with_columns(pl.Series("group", group), pl.Series("distance", distance)).filter(
        pl.col("group") >= 0)
    if df.height == 0:
        return pl.DataFrame(), pl.DataFrame()
    df = _as_text(df, label_cols)
    agg = df.group_by("group").agg(
        pl.len().cast(pl.Int32).alias("group_size"),
        *[pl.col(c).drop_nulls().n_unique().alias(f"__n_{c}") for c in label_cols])
    conflicting = [pl.when(pl.col(f"__n_{c}") > 1).then(pl.lit(c)) for c in label_cols]
    agg = agg.with_columns(pl.concat_list(conflicting).list.drop_nulls().alias("conflicting")
                           if label_cols else pl.lit([], pl.List(pl.String)).alias("conflicting"))
    agg = agg.with_columns((pl.col("conflicting").list.len() == 0).alias("labels_agree"))
    dups = df.join(agg.select("group", "group_size", "labels_agree", "conflicting"), on="group")
    dups = dups.with_columns(pl.lit(kind).alias("kind")).sort("group", "image_id")
    conflicts = []
    for c in label_cols:
        bad = agg.filter(pl.col(f"__n_{c}") > 1).select("group", pl.col(f"__n_{c}")
                                                         .cast(pl.Int32).alias("n_values"))
        if bad.height == 0:
            continue
        members = (df.join(bad, on="group").sort("group", "image_id").group_by(
            "group", maintain_order=True).agg(
            pl.len().cast(pl.Int32).alias("n_images"), pl.first("n_values"),
            pl.col("image_id").alias("image_ids"),
            pl.col(c).fill_null("(missing)").alias("values"), pl.col("split").alias("splits")))
        conflicts.append(members.with_columns(pl.lit(kind).alias("kind"),
                                              pl.lit(c).alias("attribute")))
    conflicts_df = pl.concat(conflicts) if conflicts else pl.DataFrame()
    return dups, conflicts_df


def _split_pairs(splits: list[str]) -> list[tuple[str, str]]:
    order = {s: i for i, s in enumerate(SPLITS)}
    uniq = sorted(set(splits), key=lambda s: (order.get(s, 99), s))
    return list(combinations(uniq, 2))


def leakage(members: pl.DataFrame, kind: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Groups (``key``, ``image_id``, ``split``) that span more than one split.

    Returns (rows: every member of a leaking group, counts per split pair).
    """
    spans = members.group_by("key").agg(pl.col("split").n_unique().alias("n_splits"))
    leaking = members.join(spans.filter(pl.col("n_splits") > 1).select("key"), on="key")
    rows = leaking.select(pl.lit(kind).alias("kind"), pl.col("key").cast(pl.String),
                          "image_id", "split").sort("key", "image_id")
    counts: dict[tuple[str, str], list[int]] = {}
    for key, split in (leaking.group_by("key").agg(pl.col("split")).iter_rows()):
        for a, b in _split_pairs(split):
            c = counts.setdefault((a, b), [0, 0])
            c[0] += 1
            c[1] += sum(1 for s in split if s in (a, b))
    count_rows = [{"kind": kind, "split_a": a, "split_b": b, "groups": g, "images": n}
                  for (a, b), (g, n) in sorted(counts.items())]
    return rows, pl.DataFrame(count_rows, schema={"kind": pl.String, "split_a": pl.String,
                                                  "split_b": pl.String, "groups": pl.Int64,
                                                  "images": pl.Int64})
