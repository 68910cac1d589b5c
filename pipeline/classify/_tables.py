"""The classify stage's tables, defined once: names, Arrow schemas, the model key, where model
files live, the settings recorded in the tables' metadata, and the readers other stages use.

Explain and the report import these instead of re-listing columns or re-building keys; the
report describes a run from :func:`read_settings`, never from the config it was started with.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from pipeline import tables
from pipeline.config import Config
from pipeline.settings import TableSettings

DATASET_TABLE = "classifiers/dataset"
MODELS_TABLE = "classifiers/models"
METRICS_TABLE = "classifiers/metrics"
PREDICTIONS_TABLE = "classifiers/predictions"
FINDINGS_TABLE = "classifiers/findings"
# Not a table: the .skops files the ``classifiers/models`` index points at. They live in a
# folder of their own so that every table folder holds only Parquet (Spark, DuckDB and polars
# read a table folder as a whole and fail on other files).
MODEL_FILES = "classifiers/model_files"
MODEL_FILE_SUFFIX = ".skops"
# ``trained_on`` values of the metrics, predictions and findings tables: one model on the whole
# training split, or the per-cluster models stitched (in the models table: "cluster_<c>").
GLOBAL, PER_CLUSTER = "global", "per_cluster"


def model_key(model: str, sampling: str, trained_on: str) -> str:
    """The one name of a fit: ``<model>__<sampling>__<trained_on>`` (model files, SHAP parts,
    run.json keys)."""
    return f"{model}__{sampling}__{trained_on}"


def model_file(key: str) -> str:
    """Path of a fit's model file, relative to the output root (the index's ``path``)."""
    return f"{MODEL_FILES}/{key}{MODEL_FILE_SUFFIX}"


MODELS_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),  # random_forest | logistic_regression | ...
    pa.field("sampling", pa.string(), nullable=False),  # none | class | cluster | cluster_class
    pa.field("trained_on", pa.string(), nullable=False),  # "global" or "cluster_<c>"
    pa.field("cluster", pa.int32()),  # c for "cluster_<c>", null for global
    pa.field("path", pa.string(), nullable=False),  # skops file under MODEL_FILES, relative to output.root
    pa.field("features", pa.list_(pa.string()), nullable=False),  # model input columns, in order
    pa.field("n_train", pa.int64(), nullable=False),  # training rows after undersampling
    pa.field("target", pa.string(), nullable=False),  # classify.target
    pa.field("threshold", pa.float64(), nullable=False),  # decision threshold chosen on val
    pa.field("n_train_positive", pa.int64(), nullable=False),  # positives among n_train
])

METRICS_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("trained_on", pa.string(), nullable=False),  # "global" or "per_cluster"
    pa.field("evaluated_on", pa.string(), nullable=False),  # overall | cluster=3 | Male=True | gap:Male
    pa.field("group_by", pa.string(), nullable=False),  # overall | cluster | <sensitive attribute>
    pa.field("group", pa.string()),  # the group's value ("all" for overall); null on gap rows
    pa.field("metric", pa.string(), nullable=False),  # accuracy ... / <m>_gap_difference ...
    pa.field("value", pa.float64()),  # null = undefined for this group (e.g. recall w/o positives)
    pa.field("ci_low", pa.float64()),  # percentile bootstrap interval; null without bootstrap
    pa.field("ci_high", pa.float64()),
    pa.field("n", pa.int64(), nullable=False),  # test rows in the group (all rows of the grouping for gaps)
])

PREDICTIONS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("trained_on", pa.string(), nullable=False),  # the model that scored the row
    pa.field("score", pa.float64(), nullable=False),  # predict_proba of the positive class
    pa.field("label", pa.bool_(), nullable=False),  # score >= the model's val-tuned threshold
    pa.field("split", pa.string(), nullable=False),  # always "test"
])


@dataclass(frozen=True)
class Settings(TableSettings):
    """What the metrics and findings were computed with; written into the metadata of
    ``classifiers/metrics`` and ``classifiers/findings`` (every value a string there)."""

    STAGE = "classify"  # not a field (no annotation): names the stage in the rerun hint

    target: str  # classify.target
    samplings: tuple[str, ...]  # classify.samplings, in the configured order
    ci_level: float  # classify.ci_level of the bootstrap intervals
    bootstrap: int  # classify.bootstrap resamples (0: no intervals)
    permutations: int  # classify.permutations shuffles per gap
    correction: str  # classify.correction: bh | holm
    alpha: float  # classify.alpha
    min_group_size: int  # classify.min_group_size (intersectional groups below it left out)

    @classmethod
    def from_config(cls, cfg: Config) -> "Settings":
        c = cfg.classify
        return cls(target=c.target, samplings=tuple(c.samplings), ci_level=float(c.ci_level),
                   bootstrap=int(c.bootstrap), permutations=int(c.permutations),
                   correction=c.correction, alpha=float(c.alpha),
                   min_group_size=int(c.min_group_size))



def read_settings(cfg: Config, table: str = METRICS_TABLE) -> Settings:
    """The settings ``table`` (``classifiers/metrics`` or ``classifiers/findings``) was made with."""
    return Settings.from_metadata(tables.metadata(cfg, table), table)


def read_models(cfg: Config) -> pa.Table:
    """The ``classifiers/models`` index, held to :data:`MODELS_SCHEMA` (a missing column is an
    error naming it)."""
    t = tables.read(cfg, MODELS_TABLE)
    missing = [n for n in MODELS_SCHEMA.names if n not in t.column_names]
    if missing:
        raise ValueError(f"{MODELS_TABLE} lacks the columns {missing} (its columns are "
                         f"{t.column_names}); rerun classify (python -m jobs.classify --force)")
    return t.select(MODELS_SCHEMA.names).cast(MODELS_SCHEMA)
