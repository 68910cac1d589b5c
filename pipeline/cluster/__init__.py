"""Cluster the faces in up to three feature spaces, score, profile and map the clusters.

``run(cfg) -> dict`` is the stage (registered as ``cluster`` in :mod:`pipeline.run`).

Inputs: ``manifest/`` always; ``features/`` when the extract stage has written it. Spaces
(``cluster.spaces``) are built by :mod:`pipeline.cluster._spaces`; a space whose input is
missing is skipped and the reason recorded (``skipped_spaces`` in run.json), so the stage runs
on ``annotations`` alone before extract exists. With neither annotations nor features the stage
is skipped (:class:`pipeline.run.StageSkipped`).

Sweep: one Ray task per space x algorithm x k (``k_min..k_max``; HDBSCAN one task per space,
its k is what it finds), each space's matrix put in the object store once and passed by
reference (:func:`run_sweep`). Fitting rules and metric definitions: :mod:`pipeline.cluster._fit`.
k per space x algorithm: ``cluster.k`` when set, else the best ``cluster.k_rule`` value
(silhouette, by default; ties go to the smaller k).

Outputs (names, schemas and the :class:`Settings` recorded in their metadata: k rule, fixed k,
primary space / algorithm / k, profile source, map method; :mod:`pipeline.cluster._schemas`),
under ``<output.root>/clusters/``:

* ``sweep``: one row per space x algorithm x k; ``chosen`` marks the kept k; external metrics
  one column per reference attribute (``nmi_Male``, ``ari_Male``, ``purity_Male`` ...).
* ``assignments``: ``image_id, space, algorithm, k, cluster, x, y`` for the chosen k of every
  space x algorithm. ``x, y`` are the 2-D map (t-SNE, or UMAP with ``map_method = "umap"``) of
  a seeded sample of ``cluster.map_rows`` rows per space, the same rows for every algorithm of a
  space; rows outside the map sample have null ``x, y`` (t-SNE has no out-of-sample transform,
  and placing the rest would draw points the embedding never saw).
* ``profiles``: cluster x attribute prevalence, lift, size and a readable label.
* ``centroid_distances``: Euclidean distances between cluster means, in the space's units.
* ``conditional``: P(A | B) for every attribute pair over the whole dataset.
* ``demographics``: composition of each cluster by ``cluster.demographic_attributes`` (plus
  race / gender / age bins where the manifest has them, as UTKFace's does), with a chi-square
  test of independence per attribute.
* ``identity`` (only where the manifest names people: CelebA ``identity``, LFW ``person``):
  purity, NMI and identity consistency against chance per kept clustering
  (:mod:`pipeline.cluster._identity`).
* ``primary``: ``image_id, cluster`` — the one clustering downstream stages use: space
  ``cluster.primary_space`` (``annotations`` when that space is missing, else the first built
  one; the result's ``primary_space_used`` and the file metadata say which), algorithm
  ``cluster.primary_algorithm`` at its chosen k. HDBSCAN noise is cluster -1 there too.

Why published silhouettes differ so much (0.04 on PCA'd embeddings, 0.09 on ground-truth
attributes, 0.72 on a predicted attribute vector): see ``docs/clustering.md``.
"""

from pipeline.cluster._schemas import (ASSIGNMENTS, ASSIGNMENTS_SCHEMA, CENTROID_DISTANCES,
                                       CENTROID_DISTANCES_SCHEMA, CONDITIONAL, CONDITIONAL_SCHEMA,
                                       DEMOGRAPHICS, DEMOGRAPHICS_SCHEMA, EXTERNAL_METRICS,
                                       INTERNAL_METRICS, PRIMARY, PRIMARY_SCHEMA, PROFILES,
                                       PROFILES_SCHEMA, SWEEP, IDENTITY, IDENTITY_SCHEMA, Settings,
                                       read_settings,
                                       sweep_schema)
from pipeline.cluster._fit import SweepSpec, fit_predict
from pipeline.cluster._identity import identity_table
from pipeline.cluster._spaces import Space
from pipeline.cluster._stage import SpaceJob, run, run_sweep, sweep_specs

# Every table the stage writes, by name, with its schema (the sweep's depends on the run's
# reference attributes, hence a function); tests hold each written table to it.
SCHEMAS = {SWEEP: sweep_schema, ASSIGNMENTS: ASSIGNMENTS_SCHEMA, PROFILES: PROFILES_SCHEMA,
           CENTROID_DISTANCES: CENTROID_DISTANCES_SCHEMA, CONDITIONAL: CONDITIONAL_SCHEMA,
           DEMOGRAPHICS: DEMOGRAPHICS_SCHEMA, PRIMARY: PRIMARY_SCHEMA,
           IDENTITY: IDENTITY_SCHEMA}

# SweepSpec .. sweep_specs: the sweep's parts, public for pipeline.benchmarks.cluster
__all__ = ["run", "run_sweep", "SweepSpec", "fit_predict", "Space", "SpaceJob", "sweep_specs", "Settings", "read_settings", "SCHEMAS",
           "SWEEP", "ASSIGNMENTS", "PROFILES", "CENTROID_DISTANCES", "CONDITIONAL",
           "DEMOGRAPHICS", "PRIMARY", "IDENTITY", "IDENTITY_SCHEMA", "identity_table", "INTERNAL_METRICS", "EXTERNAL_METRICS",
           "ASSIGNMENTS_SCHEMA", "CENTROID_DISTANCES_SCHEMA", "CONDITIONAL_SCHEMA",
           "DEMOGRAPHICS_SCHEMA", "PRIMARY_SCHEMA", "PROFILES_SCHEMA", "sweep_schema"]
