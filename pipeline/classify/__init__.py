"""Classify stage: classifiers for a subjective label (``classify.target``, default
"Attractive"), global and per cluster, with cluster-based undersampling, and a disaggregated
fairness evaluation.

Entry point: :func:`run` ``(cfg) -> dict``. Inputs: ``manifest/``, ``features/`` (when the
``semantic`` or ``embedding`` feature sources are used) and ``clusters/primary`` (optional:
without it the per-cluster models and the cluster-based samplings are skipped, with the reason
recorded in run.json; the global models still run).

Features (``classify.features``): see :mod:`pipeline.classify._data`. The target is never a
feature (asserted).

Models (``classify.models``): ``random_forest``, ``logistic_regression`` (StandardScaler +
LogisticRegression) and ``hist_gradient_boosting``, each an sklearn ``Pipeline`` whose last step
is named ``"model"``; hyper-parameters are ``_fit.DEFAULT_PARAMS`` overridden by
``classify.params.<model>``; ``random_state`` is derived from ``run.seed``.

What is trained (one Ray task per model × sampling × trained_on):

- ``trained_on = "global"``: one model on the whole training split;
- ``trained_on = "cluster_<c>"`` (``classify.per_cluster``): one model per cluster of
  ``clusters/primary``, on that cluster's training rows, with samplings ``none`` and ``class``
  only — inside a single cluster ``cluster`` equals ``none`` and ``cluster_class`` equals
  ``class``, so those fits would be duplicates and are skipped (recorded).

Undersampling of the training rows (``classify.samplings``; rows are only removed, drawn without
replacement from a seed derived from ``run.seed``, the sampling name and trained_on — every
model of a sampling sees the same rows). With ``K`` clusters, and ``n_s`` the size of stratum
``s`` in the training rows:

====================  ===========================  ==========================================
sampling              strata made equal            resulting proportions
====================  ===========================  ==========================================
``none``              —                            as in the training split
``class``             the two classes              exactly 50 % / 50 %; cluster shares
                                                   roughly as before (only the class mix moves)
``cluster``           the K clusters               exactly 1/K rows per cluster
                                                   (each cut to min_c n_c); class mix inside a
                                                   cluster as found there
``cluster_class``     the 2K (cluster, class)      exactly 1/(2K) per cell: 50/50 overall and
                      cells                        in every cluster, 1/K per cluster
====================  ===========================  ==========================================

Rows without a cluster (no assignment, or HDBSCAN noise) take no part in ``cluster`` and
``cluster_class``. ``cluster_class`` needs both classes in every cluster; otherwise that fit is
skipped with the empty cells named. A fit whose sampled rows hold fewer than
``classify.min_class_rows`` of a class is skipped likewise.

Train / choose / evaluate: models are fitted on the (sampled) ``train`` split; on the ``val``
split (never undersampled, restricted to the model's cluster for a per-cluster model) the
decision threshold is chosen that maximises ``classify.threshold_metric`` (candidates: 0.5 and
the val scores' 1st..99th percentiles; ties go to the one nearest 0.5; ``none`` keeps 0.5;
the one rule, :mod:`pipeline.thresholds`, that train uses too);
hyper-parameters are not searched. Optional feature selection (``classify.feature_selection``:
``mutual_info`` or forest ``importance``, keeping ``select_k``) runs on the sampled training
rows of each fit; the chosen columns are the model's ``features`` in ``classifiers/models``.
Everything is reported on the ``test`` split only.

Evaluation (:mod:`pipeline.classify._evaluate`): per model × sampling, for ``trained_on =
"global"`` and ``"per_cluster"`` (the per-cluster models stitched: each test row scored by its own
cluster's model), with ``fairlearn.metrics.MetricFrame`` over: overall, ``cluster`` and each
attribute of ``classify.sensitive`` present in the manifest (use ``["gender", "race"]`` for
UTKFace). Metrics: accuracy, balanced_accuracy, precision, recall (TPR), fpr, f1, roc_auc,
selection_rate, base_rate; per grouping the gaps ``<metric>_gap_difference`` (max − min over
groups), ``<metric>_gap_ratio`` (min / max), ``demographic_parity_difference`` and
``equalized_odds_difference``; all with ``classify.bootstrap`` percentile intervals at
``classify.ci_level``. With ``classify.intersections`` the groupings also include
``cluster×<A>`` and ``<A>×<B>`` (labels joined by :data:`SEP`), without their groups of fewer
than ``classify.min_group_size`` test rows. Every gap gets a permutation p-value
(``classify.permutations`` shuffles of the group labels, Ray tasks) and a correction across the
run (``classify.correction`` at ``classify.alpha``).

Outputs (under ``output.root``):

- ``classifiers/dataset``: :func:`dataset_schema` — image_id, split, cluster, target, then the
  features (float64) in the order the models were trained on (explain reads it as is);
- ``classifiers/models``: :data:`MODELS_SCHEMA` index (read with :func:`read_models`); its
  ``path`` points at one :func:`model_file` per fit, ``classifiers/model_files/<key>.skops`` with
  key :func:`model_key` = ``<model>__<sampling>__<trained_on>`` (load with :func:`load_model`; no
  pickle). The model files have their own folder so every table folder holds only Parquet;
- ``classifiers/metrics``: :data:`METRICS_SCHEMA`, long format;
- ``classifiers/predictions``: :data:`PREDICTIONS_SCHEMA`, test rows of every fit;
- ``classifiers/findings``: :data:`FINDINGS_SCHEMA`, one row per gap row of the metrics table
  with its permutation p-value, the corrected p-value over all gap rows of the run and the
  decision (``significant``), the two groups behind the gap and the too-small groups (see
  :mod:`pipeline.classify._significance`);
- ``errors/classify.parquet``: images that could not be used, with the reason.

The metrics and findings tables carry :class:`Settings` in their metadata (target, samplings,
CI level, bootstrap resamples, permutations, correction, alpha, minimum group size);
:func:`read_settings` reads them back, so a report describes the run that made the tables.

Reference configuration (global logistic regression on CelebA's ground-truth attributes, the
official partition; an earlier study reports accuracy 0.7817 for this model)::

    python -m jobs.classify --config jobs/configs/celeba.toml \\
        --set 'classify.features=["annotations"]' \\
        --set 'classify.models=["logistic_regression"]' \\
        --set 'classify.samplings=["none"]' --set classify.per_cluster=false \\
        --set classify.threshold_metric=none
"""

from pipeline.classify._data import dataset_schema, load_inputs
from pipeline.classify._evaluate import FAIRNESS_GAPS, METRICS
from pipeline.classify._fit import DEFAULT_PARAMS, load_model
from pipeline.classify._significance import FINDINGS_SCHEMA, SEP
from pipeline.classify._stage import execute, plan, run
from pipeline.classify._tables import (DATASET_TABLE, FINDINGS_TABLE, GLOBAL, METRICS_SCHEMA,
                                       METRICS_TABLE, MODEL_FILES, MODELS_SCHEMA, MODELS_TABLE,
                                       PER_CLUSTER, PREDICTIONS_SCHEMA, PREDICTIONS_TABLE,
                                       Settings, model_file, model_key, read_models,
                                       read_settings)
from pipeline.modelfiles import TRUSTED_TYPES  # the one allow-list of model-file types

# Every table the stage writes (the dataset's schema depends on the features, hence a function)
SCHEMAS = {DATASET_TABLE: dataset_schema, MODELS_TABLE: MODELS_SCHEMA,
           METRICS_TABLE: METRICS_SCHEMA, PREDICTIONS_TABLE: PREDICTIONS_SCHEMA,
           FINDINGS_TABLE: FINDINGS_SCHEMA}

__all__ = ["run", "SCHEMAS", "dataset_schema", "MODELS_SCHEMA", "METRICS_SCHEMA", "PREDICTIONS_SCHEMA",
           "FINDINGS_SCHEMA", "SEP", "DATASET_TABLE", "MODELS_TABLE", "METRICS_TABLE",
           "PREDICTIONS_TABLE", "FINDINGS_TABLE",
           "MODEL_FILES", "GLOBAL", "PER_CLUSTER", "model_key", "model_file", "read_models", "Settings", "read_settings",
           "METRICS", "FAIRNESS_GAPS", "TRUSTED_TYPES", "DEFAULT_PARAMS", "load_model", "execute",
           "load_inputs", "plan"]  # load_inputs -> plan -> execute: the stage's steps (benchmarks)
