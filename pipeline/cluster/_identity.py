"""How pure the clusters are in identity, for collections that know who is in each image
(CelebA's ``identity``, LFW's ``person``): S3's question, one row per clustering.

With thousands of people and k <= 8 clusters, ``purity`` (share of rows in their cluster's most
common identity) is necessarily tiny; what says whether the space groups a person's faces
together is ``identity_consistency``: over the people with at least two images, the share of
their images that fall in the person's most common cluster (1 = every person in one cluster;
``chance_consistency`` is what the same cluster sizes give under random assignment, in
expectation over one draw of a person's images, so the two read side by side).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# the manifest columns that name a person, in the order they are looked for
IDENTITY_COLUMNS = ("identity", "person")


def identity_column(manifest: pa.Table) -> str | None:
    """The first of :data:`IDENTITY_COLUMNS` the manifest holds with at least one value."""
    for name in IDENTITY_COLUMNS:
        if name in manifest.column_names and manifest[name].null_count < manifest.num_rows:
            return name
    return None


def identity_metrics(clusters: np.ndarray, people: np.ndarray, seed: int = 0) -> dict:
    """Purity, NMI, identity consistency (and its chance level) of one clustering."""
    from sklearn.metrics import normalized_mutual_info_score

    clusters, people = np.asarray(clusters), np.asarray(people)
    _, pid = np.unique(people, return_inverse=True)
    _, cid = np.unique(clusters, return_inverse=True)
    table = np.zeros((pid.max() + 1, cid.max() + 1), np.int64)
    np.add.at(table, (pid, cid), 1)
    sizes = table.sum(axis=1)
    multi = sizes >= 2
    consistency = (float(table[multi].max(axis=1).sum() / sizes[multi].sum())
                   if multi.any() else None)
    chance = None
    if multi.any():  # the same people's images dealt into clusters of the same sizes at random
        rng = np.random.default_rng(seed)
        shuffled = np.zeros_like(table)
        np.add.at(shuffled, (pid, rng.permutation(cid)), 1)
        chance = float(shuffled[multi].max(axis=1).sum() / sizes[multi].sum())
    return {"n_rows": int(len(people)), "n_identities": int(table.shape[0]),
            "identities_with_two_or_more": int(multi.sum()), "clusters": int(table.shape[1]),
            "purity": float(table.max(axis=0).sum() / len(people)),
            "nmi": float(normalized_mutual_info_score(pid, cid)),
            "identity_consistency": consistency, "chance_consistency": chance}


def identity_table(assignments: pa.Table, manifest: pa.Table, seed: int = 0
                   ) -> tuple[pa.Table | None, str | None]:
    """One row per space x algorithm x k of ``assignments`` (schema ``IDENTITY_SCHEMA``), over
    the rows whose identity is known; ``(None, None)`` when the manifest knows none."""
    import pyarrow.compute as pc

    from pipeline.cluster._schemas import IDENTITY_SCHEMA

    col = identity_column(manifest)
    if col is None:
        return None, None
    import polars as pl

    # an Arrow join, not a per-row dict and a pandas copy: assignments hold every row once per
    # kept clustering (2.4 M rows for 202,599 images x 12 clusterings)
    known = manifest.filter(pc.is_valid(manifest[col]))
    who = pl.from_arrow(known.select(["image_id", col])).select(
        "image_id", pl.col(col).cast(pl.String).alias("person"))
    df = pl.from_arrow(assignments.select(["image_id", "space", "algorithm", "k", "cluster"])
                       ).join(who, on="image_id", how="inner")
    rows = []
    for (space, algo, k), g in sorted(df.partition_by(["space", "algorithm", "k"],
                                                       as_dict=True).items()):
        rows.append({"space": space, "algorithm": algo, "k": int(k), "identity_column": col,
                     **identity_metrics(g["cluster"].to_numpy(), g["person"].to_numpy(), seed)})
    return pa.Table.from_pylist(rows, schema=IDENTITY_SCHEMA), col
