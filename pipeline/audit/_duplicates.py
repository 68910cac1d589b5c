"""Exact and near duplicates, the labels they disagree on, and leakage across splits.

Pure functions on one frame ``rows`` (one row per audited image: ``image_id``, ``split``,
``identity``, ``content_hash`` and the annotation columns) and, for near duplicates, the
embedding matrix aligned with it. The neighbour search is one faiss index queried in blocks of
rows, so that a caller can run the blocks as Ray tasks (:func:`build_index`,
:func:`neighbour_block`, :func:`pairs_from_neighbours`; :func:`near_pairs` runs them here).
"""

from __future__ import annotations

from itertools import combinations
import numpy as np
import polars as pl

from pipeline.schemas import SPLITS

# --------------------------------------------------------------------------- exact


def exact_groups(hashes: np.ndarray | pl.Series) -> np.ndarray:
    """Group id per row for byte-identical files (same ``content_hash``); -1 = no twin.

    Groups are numbered 0, 1, ... in the order of their first row (rows are sorted by image_id
    upstream, so the numbering is stable across reruns).
    """
    h = hashes if isinstance(hashes, pl.Series) else pl.Series(np.asarray(hashes).astype(str))
    df = pl.DataFrame({"h": h.cast(pl.String)}).with_row_index("i")
    first = df.group_by("h").agg(pl.col("i").min().alias("first"), pl.len().alias("n"))
    dup = first.filter(pl.col("n") > 1).sort("first").with_row_index("g")
    out = df.join(dup.select("h", "g"), on="h", how="left").sort("i")
    return out["g"].fill_null(-1).cast(pl.Int64).to_numpy()


# --------------------------------------------------------------------------- near

# Up to this many rows the neighbour search is exact (faiss IndexFlatIP: brute force in BLAS
# blocks, 20,000^2 x 128 is a few seconds); above it an inverted-file index (IndexIVFFlat),
# approximate: exact search is quadratic, 202,599 x 128 took over 13 minutes on 2 cores.
EXACT_MAX_ROWS = 20_000
# Inverted lists probed per query. Near duplicates sit a few degrees apart, so they almost
# always share a list or a neighbouring one; the audit benchmark measures the recall.
IVF_NPROBE = 32
# Training rows per inverted list for the coarse k-means (faiss warns under 39).
IVF_TRAIN_PER_LIST = 64


def normalise(E: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); a zero row stays zero."""
    E = np.asarray(E, dtype=np.float32)
    norms = np.linalg.norm(E, axis=1, keepdims=True)
    return E / np.maximum(norms, 1e-12)


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` rows: about 2 sqrt(n) (900 at 202,599), so a query scans
    ``IVF_NPROBE`` lists of ~sqrt(n) / 2 rows plus the list centroids."""
    return max(1, min(int(2 * np.sqrt(n)), n // IVF_TRAIN_PER_LIST))


def search_method(n: int, exact_max_rows: int = EXACT_MAX_ROWS) -> str:
    """How :func:`build_index` searches ``n`` rows, in words (for the tables' metadata)."""
    if n <= exact_max_rows:
        return "exact (faiss IndexFlatIP)"
    return (f"approximate (faiss IndexIVFFlat, {ivf_lists(n)} lists, nprobe "
            f"{min(IVF_NPROBE, ivf_lists(n))}; exact up to {exact_max_rows} rows)")


def build_index(E: np.ndarray, *, exact_max_rows: int = EXACT_MAX_ROWS, seed: int = 0):
    """A faiss inner-product index over the unit-norm rows of ``E`` (cosine = inner product).

    Exact (flat) for at most ``exact_max_rows`` rows, else IVF with spherical k-means lists
    trained on a seeded sample of ``IVF_TRAIN_PER_LIST`` rows per list.
    """
    import faiss

    E = np.ascontiguousarray(E, dtype=np.float32)
    n, d = E.shape
    if n <= exact_max_rows:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed) % 2**31
        index.cp.spherical = True  # centroids on the unit sphere, as the rows are
        train = np.random.default_rng(seed).choice(n, size=min(n, IVF_TRAIN_PER_LIST * nlist),
                                                   replace=False)
        index.train(E[np.sort(train)])
        index.nprobe = min(IVF_NPROBE, nlist)
    index.add(E)
    return index


def serialise_index(index) -> np.ndarray:
    """The index as a uint8 array (what goes to Ray's object store once for all blocks)."""
    import faiss

    return faiss.serialize_index(index)


def deserialise_index(blob: np.ndarray):
    import faiss

    return faiss.deserialize_index(np.asarray(blob))


def neighbour_block(index, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest other rows (cosine distance) of the unit-norm query rows ``Q``.

    ``index`` is a :func:`build_index` index (or its :func:`serialise_index` bytes) that holds
    the queries themselves, so ``k + 1`` are asked for and the caller drops each row's self.
    Returns (indices into the index, distances), each ``len(Q) x (k + 1)``; an index of -1 is
    no result (an IVF search can come back short).
    """
    if isinstance(index, np.ndarray):
        index = deserialise_index(index)
    k = min(k + 1, index.ntotal)
    sim, idx = index.search(np.ascontiguousarray(Q, dtype=np.float32), k)
    dist = np.where(idx >= 0, np.maximum(1.0 - sim, 0.0), np.inf)
    return idx.astype(np.int64), dist.astype(np.float64)


def pairs_from_neighbours(n: int, results, threshold: float
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) within cosine ``threshold`` from per-block neighbour lists.

    ``results``: (query rows, neighbour rows, distances) per block, rows in one numbering of
    ``n`` (neighbour -1 = no result). Returns (i, j, distance, nearest) where ``nearest`` is
    each row's distance to its nearest other row (the distribution the threshold is judged
    against; NaN for a row never queried or without any neighbour).
    """
    ii, jj, dd = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    nearest = np.full(n, np.inf)
    for rows, idx, dist in results:
        q = np.repeat(np.asarray(rows, np.int64), idx.shape[1])
        j, d = idx.ravel(), dist.ravel()
        other = (j != q) & (j >= 0)
        qo, jo, do = q[other], j[other], d[other]
        np.minimum.at(nearest, qo, do)
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
    nearest[np.isinf(nearest)] = np.nan
    return i.astype(np.int64), j.astype(np.int64), d.astype(np.float64), nearest


def near_pairs(E: np.ndarray, *, k: int, threshold: float, block_rows: int,
               exact_max_rows: int = EXACT_MAX_ROWS, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows of unit-norm ``E`` within cosine ``threshold`` among each row's
    ``k`` nearest others, in this process: one index, queried ``block_rows`` rows at a time
    (the stage runs the same steps as Ray tasks). Returns (i, j, distance, nearest) as
    :func:`pairs_from_neighbours`."""
    n = len(E)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0), np.full(n, np.nan)
    index = build_index(E, exact_max_rows=exact_max_rows, seed=seed)
    results = []
    for s in range(0, n, block_rows):
        t = min(s + block_rows, n)
        results.append((np.arange(s, t), *neighbour_block(index, E[s:t], k)))
    return pairs_from_neighbours(n, results, threshold)


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
    members = np.flatnonzero(exact >= 0)
    if len(members):  # exact groups are numbered by first row: the first member of each
        g = exact[members]
        first = np.full(g.max() + 1, n, np.int64)
        np.minimum.at(first, g, members)
        rep[members] = first[g]
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
    if not len(leader):
        return out
    first = np.full(len(leader), n, np.int64)
    np.minimum.at(first, out[out >= 0], np.flatnonzero(out >= 0))
    rank = np.empty(len(leader), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(leader))
    return np.where(out >= 0, rank[np.maximum(out, 0)], -1)


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
