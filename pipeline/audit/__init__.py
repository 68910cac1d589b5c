"""Audit the collection itself: exact and near duplicates, the same image under conflicting
labels, images and people leaking across splits, and labels that are probably wrong.

Memory: the driver never holds the embedding: ``features/`` is streamed in ``audit.block_rows``
batches (the PCAs fitted on a seeded sample of at most ``PCA_FIT_ROWS`` = 20,000 rows), each
batch's projections go to Ray's object store, and the tasks assemble what they need.

Entry point: :func:`run` ``(cfg) -> dict`` (stage ``audit`` in :mod:`pipeline.run`, after
``cluster`` so that suspected-error rates can be given per cluster, before ``classify`` so that
the drop action can take effect there). Inputs: ``manifest/``, ``features/`` (its
``content_hash`` and ``embedding``), ``clusters/primary`` (optional).

What it finds:

- **Exact duplicates**: rows of ``features/`` with the same ``content_hash`` (blake2b of the
  file bytes, computed by extract where it reads them: no second pass over the images).
- **Near duplicates**: each image's ``audit.near_neighbours`` nearest others by cosine distance
  of the L2-normalised embedding (PCA to ``audit.near_dims`` first when wider), through a faiss
  inner-product index: exact (flat) up to ``EXACT_MAX_ROWS`` = 20,000 rows, approximate above
  (IVF, ~2 sqrt(n) lists, 32 probed; recall measured by ``jobs.benchmark audit``). One Ray task
  builds the index, one per block of ``audit.block_rows`` rows queries it. Pairs at or below
  ``audit.near_threshold`` form groups greedily, closest pair first, each group growing only
  through its leader (no chaining); byte-identical files count as one file, so a near group
  holds at least two different files.
- **Label conflicts**: a group whose members' annotations differ (every annotated boolean
  attribute, UTKFace's age / gender / race, identity), one row per group × attribute.
- **Leakage**: exact / near groups and identities (``identity``, or LFW's ``person``) present
  in more than one split; the rows and the counts per split pair.
- **Probable label errors** per attribute (``audit.label_attributes``; by default
  ``classify.target`` and ``classify.sensitive``, or UTKFace's gender / race / age group):
  out-of-sample probabilities from a ``audit.cv_folds``-fold cross-validated logistic regression
  on the embedding's PCs and the other annotations, then cleanlab's confident learning
  (``find_label_issues``, ``get_label_quality_scores``). Suspected-error rate overall, per
  cluster and per sensitive group, with a chi-square test of independence per grouping; a
  p-value below ``audit.alpha`` is a label-noise disparity.

Outputs (schemas in :mod:`pipeline.audit._schemas`, re-exported here): ``audit/duplicates``,
``audit/label_conflicts``, ``audit/leakage``, ``audit/leakage_counts``, ``audit/label_issues``,
``audit/label_issue_rates``, ``audit/summary`` (long: metric, attribute, value).

Action (``audit.action``): ``report`` only writes the tables; ``drop_conflicting_exact`` also
records every member of an exact-duplicate group with conflicting labels in
``errors/audit.parquet``, and classify leaves those images out of training and evaluation
(:func:`excluded_image_ids`). The attribute model (trained before extract) is not affected.
"""

from pipeline.audit._schemas import (DUPLICATES, DUPLICATES_SCHEMA, ISSUE_RATES,
                                     ISSUE_RATES_SCHEMA, LABEL_CONFLICTS, LABEL_CONFLICTS_SCHEMA,
                                     LABEL_ISSUES, LABEL_ISSUES_SCHEMA, LEAKAGE,
                                     LEAKAGE_COUNTS, LEAKAGE_COUNTS_SCHEMA, LEAKAGE_SCHEMA,
                                     SCHEMAS, SUMMARY, SUMMARY_SCHEMA)
from pipeline.audit._duplicates import (EXACT_MAX_ROWS, build_index, exact_groups,
                                        near_groups, near_pairs, neighbour_block, normalise,
                                        pairs_from_neighbours, search_method)
from pipeline.audit._labels import issue_rates, label_issues, out_of_sample_probs
from pipeline.audit._stage import excluded_image_ids, run

__all__ = ["run", "excluded_image_ids", "exact_groups", "near_pairs", "near_groups",
           "normalise", "build_index", "neighbour_block", "pairs_from_neighbours",
           "search_method", "EXACT_MAX_ROWS",
           "out_of_sample_probs", "label_issues", "issue_rates", "SCHEMAS",
           "neighbour_block", "normalise",  # the near-duplicate search's steps (benchmarks)
           "DUPLICATES", "LABEL_CONFLICTS", "LEAKAGE", "LEAKAGE_COUNTS", "LABEL_ISSUES",
           "ISSUE_RATES", "SUMMARY", "DUPLICATES_SCHEMA", "LABEL_CONFLICTS_SCHEMA",
           "LEAKAGE_SCHEMA", "LEAKAGE_COUNTS_SCHEMA", "LABEL_ISSUES_SCHEMA",
           "ISSUE_RATES_SCHEMA", "SUMMARY_SCHEMA"]
