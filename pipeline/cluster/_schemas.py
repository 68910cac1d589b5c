"""The ``clusters/`` tables, defined once: names, Arrow schemas and the settings every table's
metadata records (design.md, "Stages, owners, tables").

Every table the stage writes is cast to one of these before it is written
(:func:`pipeline.storage.conform`), so a missing column or a wrong type is an error at write
time, not a surprise for the reader. Readers (classify, audit, the report) import the names and
:func:`read_settings` from here; the report describes the clustering from the tables, never
from the config it was started with.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline import tables
from pipeline.config import Config
from pipeline.settings import TableSettings

SWEEP = "clusters/sweep"
ASSIGNMENTS = "clusters/assignments"
PROFILES = "clusters/profiles"
CENTROID_DISTANCES = "clusters/centroid_distances"
CONDITIONAL = "clusters/conditional"
DEMOGRAPHICS = "clusters/demographics"
PRIMARY = "clusters/primary"  # the one clustering downstream stages use
IDENTITY = "clusters/identity"  # identity purity, where the manifest names people


@dataclass(frozen=True)
class Settings(TableSettings):
    """How the clusters were made; written into the metadata of every ``clusters/`` table but
    ``centroid_distances`` (every value a string there)."""

    STAGE = "cluster"  # not a field (no annotation): names the stage in the rerun hint

    spaces: tuple[str, ...]  # cluster.spaces, in the configured order (built or not)
    k_rule: str  # cluster.k_rule: the internal metric that chose k
    k: int  # cluster.k: a fixed k, 0 = chosen by k_rule
    primary_space: str  # the space clusters/primary uses (after any fallback)
    primary_algorithm: str  # cluster.primary_algorithm
    primary_k: int  # the chosen k of that clustering
    profile_source: str  # annotations (ground truth) or predicted attributes
    map_method: str  # cluster.map_method of the 2-D map (tsne / umap)



def read_settings(cfg: Config, table: str = SWEEP) -> Settings:
    """The settings the ``clusters/`` table ``table`` was made with."""
    return Settings.from_metadata(tables.metadata(cfg, table), table)

# Internal (label-free) metrics of one sweep row, in column order.
INTERNAL_METRICS: tuple[str, ...] = ("inertia", "silhouette", "davies_bouldin", "calinski_harabasz")
# External metrics, one column per reference attribute: ``nmi_Male``, ``ari_Male``, ``purity_Male``.
EXTERNAL_METRICS: tuple[str, ...] = ("nmi", "ari", "purity")

_KEY = [
    pa.field("space", pa.string(), nullable=False),  # embedding / semantic / annotations
    pa.field("algorithm", pa.string(), nullable=False),  # kmeans / gmm / agglomerative / hdbscan
    pa.field("k", pa.int32(), nullable=False),  # clusters asked for; for hdbscan: clusters found
]

ASSIGNMENTS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    *_KEY,
    pa.field("cluster", pa.int32(), nullable=False),  # 0..k-1; -1 = HDBSCAN noise
    pa.field("x", pa.float32()),  # 2-D map coordinate; null for rows outside the map sample
    pa.field("y", pa.float32()),
])


def sweep_schema(reference_attributes: list[str]) -> pa.Schema:
    """One row per space x algorithm x k; external metrics one column per reference attribute."""
    fields = _KEY + [
        pa.field("param", pa.string(), nullable=False),  # "n_clusters=5" or "min_cluster_size=41"
        pa.field("n_rows", pa.int64(), nullable=False),  # rows labelled (the whole space)
        pa.field("fit_rows", pa.int64(), nullable=False),  # rows the model was fitted on
        pa.field("noise_fraction", pa.float64(), nullable=False),  # share labelled -1 (hdbscan)
        pa.field("inertia", pa.float64()),  # within-cluster sum of squares about cluster means
        pa.field("silhouette", pa.float64()),  # on the space's fixed silhouette sample
        pa.field("silhouette_rows", pa.int64(), nullable=False),  # size of that sample
        pa.field("davies_bouldin", pa.float64()),  # all non-noise rows; lower is better
        pa.field("calinski_harabasz", pa.float64()),  # all non-noise rows; higher is better
        pa.field("fit_seconds", pa.float64(), nullable=False),  # fit + assign wall time
        pa.field("chosen", pa.bool_(), nullable=False),  # the k kept for this space x algorithm
    ]
    for attr in reference_attributes:
        for m in EXTERNAL_METRICS:
            fields.append(pa.field(f"{m}_{attr}", pa.float64()))  # null: attribute missing
    return pa.schema(fields)


PROFILES_SCHEMA = pa.schema(_KEY + [
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),  # rows in the cluster
    pa.field("share", pa.float64(), nullable=False),  # size / rows in the space
    pa.field("attribute", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # annotations (ground truth) / predicted (p>=0.5)
    pa.field("prevalence", pa.float64(), nullable=False),  # P(attribute | cluster)
    pa.field("overall", pa.float64(), nullable=False),  # P(attribute) over the space's rows
    pa.field("lift", pa.float64()),  # prevalence / overall; null when overall == 0
    pa.field("label", pa.string(), nullable=False),  # readable cluster label, repeated per row
])

CENTROID_DISTANCES_SCHEMA = pa.schema(_KEY + [
    pa.field("cluster_a", pa.int32(), nullable=False),
    pa.field("cluster_b", pa.int32(), nullable=False),
    pa.field("distance", pa.float64(), nullable=False),  # Euclidean, in the space's coordinates
])

CONDITIONAL_SCHEMA = pa.schema([
    pa.field("attribute", pa.string(), nullable=False),  # A
    pa.field("given", pa.string(), nullable=False),  # B
    pa.field("p", pa.float64()),  # P(A | B) over the dataset; null when B never holds
    pa.field("n_given", pa.int64(), nullable=False),  # rows where B holds
    pa.field("source", pa.string(), nullable=False),  # annotations / predicted
])

DEMOGRAPHICS_SCHEMA = pa.schema(_KEY + [
    pa.field("attribute", pa.string(), nullable=False),  # Male, Young, race, age_bin ...
    pa.field("cluster", pa.int32(), nullable=False),
    pa.field("category", pa.string(), nullable=False),  # "true"/"false", a race, an age bin
    pa.field("count", pa.int64(), nullable=False),
    pa.field("share", pa.float64(), nullable=False),  # count / cluster size
    pa.field("overall", pa.float64(), nullable=False),  # category share over the space's rows
    pa.field("chi2", pa.float64()),  # chi-square test of independence cluster x category;
    pa.field("dof", pa.int32()),  # repeated on every row of the attribute; null when the
    pa.field("p_value", pa.float64()),  # table has fewer than 2 non-empty rows or columns
])

PRIMARY_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("cluster", pa.int32(), nullable=False),  # the cluster downstream stages use
])

# clusters/identity: one row per space x algorithm x chosen k, where the manifest names people
# (pipeline.cluster._identity; absent for collections without identities).
IDENTITY_SCHEMA = pa.schema(_KEY + [
    pa.field("identity_column", pa.string(), nullable=False),  # manifest column: identity/person
    pa.field("n_rows", pa.int64(), nullable=False),  # clustered rows whose identity is known
    pa.field("n_identities", pa.int64(), nullable=False),
    pa.field("identities_with_two_or_more", pa.int64(), nullable=False),
    pa.field("clusters", pa.int64(), nullable=False),  # distinct labels (HDBSCAN noise counts as one)
    pa.field("purity", pa.float64(), nullable=False),  # rows in their cluster's top identity / rows
    pa.field("nmi", pa.float64(), nullable=False),  # normalised mutual information with identity
    pa.field("identity_consistency", pa.float64()),  # people's images in their top cluster / images
    pa.field("chance_consistency", pa.float64()),  # the same under a random permutation of labels
])
