"""The one run configuration.

A run is described by a TOML file (``jobs/configs/*.toml``) plus ``--set section.key=value``
overrides. It is validated once, here, into :class:`Config`; every stage receives the same
object and the resolved config is written next to the outputs (``<output.root>/config.toml``).

Every section forbids unknown keys so that a typo is an error naming the key, not a silently
ignored setting. Every default carries a one-line comment: what it means and its unit.

Stage owners: add keys only to your own section class below.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

CELEBA_ATTRIBUTES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class DataConfig(_Section):
    # Which adapter reads the collection: celeba, utkface, lfw or folder (no labels).
    dataset: Literal["celeba", "utkface", "lfw", "folder"] = "celeba"
    # Where images and annotation files live: a local path or s3://bucket/prefix.
    root: str = "data/sample"
    # Fractions of images put in train/val for datasets without an official split (sum < 1).
    split_fractions: tuple[float, float] = (0.8, 0.1)
    # Keep a seeded random subset of N images (splits keep their proportions); 0 keeps all.
    limit: int = Field(default=0, ge=0)
    # Largest image accepted, in pixels (width x height, read from the file header before any
    # decoding); larger ones are an errors row. 40 M is far above any face photo (8K is 33 M).
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    # Largest image file accepted, in bytes (from the listing, before any read); larger ones
    # are an errors row. 50 MB is far above any face photo.
    max_image_bytes: int = Field(default=50_000_000, ge=1)


class OutputConfig(_Section):
    # Where this run's tables go: a local path or s3://bucket/prefix.
    root: str = "runs/demo"


class RunConfig(_Section):
    # The one seed every random step derives its own seed from.
    seed: int = 0
    # Stages rerun even when complete (names as in jobs.run; "all" reruns every stage).
    force: list[str] = Field(default_factory=list)
    # Seconds between heartbeats of the run lock (<output.root>/run.lock) a running job holds.
    lock_heartbeat_s: float = Field(default=30.0, gt=0)
    # A lock whose heartbeat is older than this many seconds belongs to a dead run and is taken
    # over (a lock of a dead process on this host is taken over at once).
    lock_stale_s: float = Field(default=300.0, gt=0)


class StorageConfig(_Section):
    # S3 endpoint URL (http://host:port for MinIO/SeaweedFS); empty uses AWS's default.
    endpoint_url: str = ""
    # S3 region name; empty lets the AWS chain decide.
    region: str = ""
    # Access key id; empty means the standard AWS credential chain (env, profile, role).
    access_key_id: str = Field(default="", repr=False)
    # Secret access key; empty means the standard AWS credential chain.
    secret_access_key: str = Field(default="", repr=False)
    # Allow anonymous (unsigned) access when no credentials are found; off = error instead.
    anonymous: bool = False
    # Seconds to wait for a connection before calling the endpoint unreachable.
    connect_timeout_s: float = Field(default=5.0, gt=0)


class RayConfig(_Section):
    # Cluster address ("auto", "ray://host:10001"); empty uses RAY_ADDRESS or starts Ray in-process.
    address: str = ""
    # CPUs for an in-process Ray started by this job; 0 lets Ray use all cores.
    num_cpus: int = Field(default=0, ge=0)
    # GPUs for an in-process Ray started by this job; -1 lets Ray detect them.
    num_gpus: int = Field(default=-1, ge=-1)
    # Object store size for an in-process Ray, in MiB; 0 lets Ray choose.
    object_store_mib: int = Field(default=0, ge=0)
    # Allow running on CPU when the config asks for GPUs and the cluster has none.
    allow_cpu_fallback: bool = False
    # The cluster autoscales: unmet requests go to the autoscaler and are awaited (not refused).
    autoscaling: bool = False
    # Seconds a stage waits for a request the nodes cannot hold yet (nodes joining, autoscaler)
    # before failing with what was asked and what exists; a Ray started in-process never waits.
    resource_wait_s: float = Field(default=120.0, ge=0)


class TrainConfig(_Section):
    # Attributes the model predicts; empty means every boolean attribute in the manifest.
    attributes: list[str] = Field(default_factory=list)
    # Backbone: mobilenet_v2 (torchvision) or small_cnn (4 conv blocks; learns from few images on CPU).
    arch: Literal["mobilenet_v2", "small_cnn"] = "mobilenet_v2"
    # Initial weights: "imagenet" (torch cache only), "none" (random), or a path/URI to a state dict.
    pretrained: str = "none"
    # Square input size in pixels after resize.
    image_size: int = Field(default=64, ge=16)
    # Passes over the training split.
    epochs: int = Field(default=3, ge=1)
    # Images per training step per worker.
    batch_size: int = Field(default=64, ge=1)
    # Peak learning rate for AdamW.
    lr: float = Field(default=2e-3, gt=0)
    # AdamW weight decay.
    weight_decay: float = Field(default=1e-4, ge=0)
    # Learning-rate schedule over the run.
    schedule: Literal["cosine", "constant"] = "cosine"
    # Weight rare attributes' positives by (neg/pos) clipped to this value; 0 disables.
    pos_weight_max: float = Field(default=0.0, ge=0)
    # Random horizontal flips / small crops during training.
    augment: bool = True
    # Ray Train workers (DDP ranks); "auto" = one per GPU that fits (GPU), one per node (CPU).
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    # Use GPUs for training: "auto" uses them when the cluster has any.
    use_gpu: Literal["auto", "true", "false"] = "auto"
    # CPUs each training worker requests (fractional so Ray Data tasks are not starved).
    cpus_per_worker: float = Field(default=1.0, gt=0)
    # Tune a per-attribute decision threshold on the val split for accuracy (else 0.5); the
    # rule is classify's, pipeline.thresholds.
    tune_thresholds: bool = False
    # Stop after this many training steps per epoch; 0 = full epoch (for smoke tests).
    max_steps_per_epoch: int = Field(default=0, ge=0)
    # CPUs each Ray Data decode/resize task requests (small, so decoding and training share cores).
    decode_cpus: float = Field(default=0.25, gt=0)
    # Manifest rows per Ray Data block (one decode task's unit of work).
    rows_per_block: int = Field(default=256, ge=1)
    # Decode the train and val images once and keep them in Ray's object store (each epoch then
    # draws batches from memory, no per-epoch Ray Data pipeline) when their decoded size is at
    # most this many MiB and at most half the object store; 0 = always stream through Ray Data.
    cache_decoded_mb: int = Field(default=4096, ge=0)
    # Local shuffle buffer on each training worker, in batches (0 = no shuffling within the buffer).
    shuffle_buffer_batches: int = Field(default=4, ge=0)
    # Checkpoints kept in storage: the best ones by val mean accuracy (the latest is always kept).
    keep_checkpoints: int = Field(default=2, ge=1)
    # Worker-group restarts from the latest checkpoint after a failure, within one run.
    max_failures: int = Field(default=0, ge=0)
    # Log progress (step, loss, images/s) every N training steps on rank 0 (the only host sync
    # of the training loop between epochs).
    log_every_steps: int = Field(default=20, ge=1)
    # Apply this attribute model instead of training one: another run's models/attributes folder,
    # or a model.pt with its model.json beside it (local or s3://); empty = train here.
    model_from: str = ""
    # Batches each training worker's Ray Data iterator prepares ahead of the step (collate, pin).
    prefetch_batches: int = Field(default=4, ge=1)
    # Training arithmetic: "auto" = bf16 autocast on GPUs that have it (fp16 with a loss scaler
    # on older ones, float32 on CPU); "fp32" = float32 everywhere (the GPU benchmark's reference).
    precision: Literal["auto", "fp32"] = "auto"

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_bool(cls, v: Any) -> Any:
        # `--set train.use_gpu=true` arrives as a TOML boolean; accept it as the string form
        return str(v).lower() if isinstance(v, bool) else v


class ExtractConfig(_Section):
    # Embedding backbone: resnet50 (2048-d), attribute_backbone (trained model's pooled features), facenet, dlib (128-d face descriptor).
    embedding: Literal["resnet50", "attribute_backbone", "facenet", "dlib"] = "resnet50"
    # Embedding weights: "imagenet", "none" (random init) or a path/URI to a state dict.
    embedding_weights: str = "none"
    # Input size in pixels for the embedding model.
    embedding_image_size: int = Field(default=224, ge=16)
    # Images per inference batch.
    batch_size: int = Field(default=64, ge=1)
    # Inference actor pool lower bound; "auto" = as many as the nodes hold (see max_actors).
    min_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    # Inference actor pool upper bound; "auto" = actors fitting the nodes' GPUs (GPU) or CPUs
    # left after one decode task (CPU).
    max_actors: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    # GPUs each inference actor requests; "auto" = 1 when the cluster has GPUs, else 0.
    gpus_per_actor: float | Literal["auto"] = "auto"
    # CPUs each inference actor requests.
    cpus_per_actor: float = Field(default=1.0, gt=0)
    # Batches a GPU actor runs at once, each on its own thread and CUDA stream (copy overlaps
    # compute); CPU actors always run one.
    calls_per_gpu_actor: int = Field(default=2, ge=1)
    # CPUs each decode task requests.
    cpus_per_decode_task: float = Field(default=0.5, gt=0)
    # Most decode tasks running at once (0 = as many as the CPUs left allow); on a CPU node one
    # task out-decodes a CPU actor, and each extra one is a process starting beside its model load.
    decode_tasks: int = Field(default=0, ge=0)
    # Rows per output Parquet file; also the unit of resume (one shard = one file). Driver memory
    # holds about one shard's features (rows_per_file x embedding dim x 4 bytes: 40 MiB at 5000).
    rows_per_file: int = Field(default=5000, ge=1)
    # Finished shards queued for the background writer before the stream waits for it (driver
    # memory: each holds rows_per_file rows of features).
    commit_queue_shards: int = Field(default=2, ge=1)
    # Images whose shorter side is below this many pixels go to errors/ instead of being upscaled.
    min_image_side: int = Field(default=16, ge=1)
    # Concurrent file reads inside one decode task (hides S3 latency; local disk barely needs it).
    read_threads: int = Field(default=16, ge=1)
    # dlib embedding only: its CPU actor pool's lower bound (actors).
    dlib_min_actors: int = Field(default=1, ge=1)
    # dlib embedding only: its CPU actor pool's upper bound (autoscaling, actors).
    dlib_max_actors: int = Field(default=1, ge=1)
    # dlib embedding only: CPUs each dlib actor requests (dlib runs one thread per actor).
    cpus_per_dlib_actor: float = Field(default=1.0, gt=0)
    # dlib embedding only: images per dlib batch (one compute_face_descriptor call).
    dlib_batch_size: int = Field(default=32, ge=1)
    # dlib embedding only: times the HOG detector upsamples first (finds faces below ~80 px, ~4x cost each).
    dlib_upsample: int = Field(default=0, ge=0, le=3)
    # dlib embedding only: larger originals are downscaled so their longer side is this many px (0 = never).
    dlib_max_side: int = Field(default=1024, ge=0)
    # dlib embedding only: also run dlib's 68-point landmark model in the same box and write the
    # face_geometry and attribute_logits columns (what the attribute_head stage reads; ~3 ms/image).
    face_geometry: bool = False


class HeadConfig(_Section):
    # Fit (or, with train.model_from, apply) the logistic head on CNN logits + dlib descriptor +
    # face geometry after extract, and rewrite features' probabilities with it (attribute_head stage).
    enabled: bool = False
    # Feature blocks the head reads: cnn (the attribute model's logits), embedding, geometry.
    inputs: list[Literal["cnn", "embedding", "geometry"]] = Field(
        default_factory=lambda: ["cnn", "embedding", "geometry"])
    # L2 penalty on the face-feature weights (the CNN logit's own weight is free); 1 was best of
    # 1 / 3 / 10 / 100 on real CelebA (docs/train.md).
    l2: float = Field(default=1.0, gt=0)
    # L-BFGS iterations of the head's fit (all attributes at once).
    max_iter: int = Field(default=200, ge=1)


class WeightsConfig(_Section):
    # Let stages download standard weights (torchvision "imagenet", facenet "vggface2"/"casia-webface") into the torch cache, hash-checked; off = a missing file is an error.
    download: bool = False


class ClusterConfig(_Section):
    # Feature spaces to cluster: embedding, semantic, annotations.
    spaces: list[Literal["embedding", "semantic", "annotations"]] = Field(
        default_factory=lambda: ["embedding", "semantic", "annotations"]
    )
    # Algorithms swept.
    algorithms: list[Literal["kmeans", "gmm", "agglomerative", "hdbscan"]] = Field(
        default_factory=lambda: ["kmeans", "gmm", "agglomerative", "hdbscan"]
    )
    # Smallest k tried.
    k_min: int = Field(default=2, ge=2)
    # Largest k tried.
    k_max: int = Field(default=8, ge=2)
    # Fixed k for the final model; 0 chooses k by `k_rule`.
    k: int = Field(default=0, ge=0)
    # Rule that picks k from the sweep.
    k_rule: Literal["silhouette", "davies_bouldin", "calinski_harabasz"] = "silhouette"
    # Algorithm whose chosen model defines the cluster column used downstream.
    primary_algorithm: Literal["kmeans", "gmm", "agglomerative", "hdbscan"] = "kmeans"
    # Feature space whose clusters the classify/explain stages use.
    primary_space: Literal["embedding", "semantic", "annotations"] = "semantic"
    # PCA components for the embedding space.
    pca_components: int = Field(default=50, ge=2)
    # Rows PCA is fitted on (seeded sample).
    pca_fit_rows: int = Field(default=20000, ge=10)
    # Semantic space uses 0/1 (threshold 0.5) instead of probabilities.
    binarize_semantic: bool = False
    # Above this many rows K-Means becomes MiniBatchKMeans.
    minibatch_threshold: int = Field(default=50000, ge=1)
    # Rows agglomerative / HDBSCAN are fitted on (rest assigned to nearest centroid).
    sample_rows: int = Field(default=5000, ge=10)
    # Rows silhouette is computed on (quadratic cost).
    silhouette_rows: int = Field(default=5000, ge=10)
    # Attributes NMI / ARI / purity are measured against.
    reference_attributes: list[str] = Field(
        default_factory=lambda: ["Male", "Smiling", "Young", "Eyeglasses", "Blond_Hair"]
    )
    # Attributes whose per-cluster composition is tested (chi-square).
    demographic_attributes: list[str] = Field(
        default_factory=lambda: ["Male", "Young", "Pale_Skin"]
    )
    # Rows embedded in the 2-D map.
    map_rows: int = Field(default=3000, ge=10)
    # 2-D map method: tsne, or umap when installed.
    map_method: Literal["tsne", "umap"] = "tsne"
    # Attributes named in each cluster's readable label.
    label_terms: int = Field(default=3, ge=1)
    # CPUs each sweep task requests.
    cpus_per_task: float = Field(default=1.0, gt=0)


class ClassifyConfig(_Section):
    # The subjective label classified.
    target: str = "Attractive"
    # Feature sources: semantic (predicted attributes), annotations (ground truth), embedding (PCs).
    features: list[Literal["semantic", "annotations", "embedding"]] = Field(
        default_factory=lambda: ["semantic"]
    )
    # Models trained.
    models: list[Literal["random_forest", "logistic_regression", "hist_gradient_boosting"]] = Field(
        default_factory=lambda: ["random_forest", "logistic_regression"]
    )
    # Undersampling strategies of the training split.
    samplings: list[Literal["none", "class", "cluster", "cluster_class"]] = Field(
        default_factory=lambda: ["none", "class", "cluster", "cluster_class"]
    )
    # Train one model per cluster as well as the global one.
    per_cluster: bool = True
    # Hyper-parameters per model name, passed to the estimator (validated by it).
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Feature selection: none, mutual_info or model importance; keeps `select_k` features.
    feature_selection: Literal["none", "mutual_info", "importance"] = "none"
    # Features kept by feature selection.
    select_k: int = Field(default=20, ge=1)
    # Sensitive attributes for disaggregated metrics.
    sensitive: list[str] = Field(default_factory=lambda: ["Male", "Young", "Pale_Skin"])
    # Bootstrap resamples for confidence intervals.
    bootstrap: int = Field(default=200, ge=0)
    # Confidence level of the intervals.
    ci_level: float = Field(default=0.95, gt=0, lt=1)
    # CPUs each fit task requests.
    cpus_per_task: float = Field(default=1.0, gt=0)
    # Principal components of the embedding used as features (PCA fitted on the train split).
    embedding_components: int = Field(default=10, ge=1)
    # Decision threshold chosen on val to maximise this metric; "none" keeps 0.5.
    threshold_metric: Literal["none", "accuracy", "balanced_accuracy"] = "balanced_accuracy"
    # A fit needs at least this many training rows of each class (else skipped, reason recorded).
    min_class_rows: int = Field(default=5, ge=1)
    # Shuffles of the group labels per gap's permutation test (smallest p-value: 1/(1+this)).
    permutations: int = Field(default=2000, ge=1)
    # Correction across all gap rows of a run: bh (Benjamini-Hochberg, FDR) or holm (FWER).
    correction: Literal["bh", "holm"] = "bh"
    # Level at which a corrected p-value counts as significant (FDR for bh, FWER for holm).
    alpha: float = Field(default=0.05, gt=0, lt=1)
    # Also score cluster x each sensitive attribute and each pair of sensitive attributes.
    intersections: bool = True
    # Intersectional groups with fewer test rows than this are reported as too small, not scored.
    min_group_size: int = Field(default=30, ge=1)


class ExplainConfig(_Section):
    # Models explained (names as in classify.models); empty = all.
    models: list[str] = Field(default_factory=list)
    # Sampling strategies explained; empty = all.
    samplings: list[str] = Field(default_factory=lambda: ["none"])
    # Test rows explained per model; 0 = all.
    max_rows: int = Field(default=2000, ge=0)
    # Background rows for the explainers.
    background_rows: int = Field(default=100, ge=1)
    # Rows per Ray task.
    block_rows: int = Field(default=250, ge=1)
    # Additivity tolerance (absolute, in the explained output's units).
    additivity_tol: float = Field(default=1e-3, gt=0)
    # Features compared in top-k overlap.
    top_k: int = Field(default=5, ge=1)
    # CPUs each SHAP task requests.
    cpus_per_task: float = Field(default=1.0, gt=0)
    # Rows per model x cluster kept in memory for the beeswarm plots (the first ones explained).
    plot_rows: int = Field(default=1000, ge=1)
    # Depth cap for forests is classify.params.random_forest.max_depth (set at training time).


class AuditConfig(_Section):
    # What to do with exact duplicates whose labels conflict: "report" only, or
    # "drop_conflicting_exact" = keep them out of classify's training and evaluation (errors/audit).
    action: Literal["report", "drop_conflicting_exact"] = "report"
    # Near duplicates: cosine distance between L2-normalised embeddings at or below this value.
    near_threshold: float = Field(default=0.02, ge=0, le=2)
    # Nearest neighbours searched per image for near duplicates (bounds the output: n x k pairs).
    near_neighbours: int = Field(default=5, ge=1)
    # Embeddings wider than this are reduced by PCA (seeded) before the neighbour search; 0 = never.
    near_dims: int = Field(default=128, ge=0)
    # Query rows per neighbour-search Ray task (each task holds block_rows x n distances in chunks).
    block_rows: int = Field(default=8192, ge=1)
    # Attributes audited for label errors; empty = classify.target, classify.sensitive and
    # UTKFace's gender / race / age group, those the manifest annotates.
    label_attributes: list[str] = Field(default_factory=list)
    # Inputs of the out-of-sample label model: embedding (PCA) and the other annotations.
    label_features: list[Literal["embedding", "annotations"]] = Field(
        default_factory=lambda: ["embedding", "annotations"])
    # Principal components of the embedding given to the label model.
    embedding_components: int = Field(default=32, ge=1)
    # Cross-validation folds for the out-of-sample predicted probabilities.
    cv_folds: int = Field(default=5, ge=2)
    # Lower edges (years) of the age groups UTKFace's age is audited as.
    age_bins: list[int] = Field(default_factory=lambda: [0, 3, 10, 20, 30, 40, 50, 60, 70])
    # Significance level for calling a suspected-error-rate difference between groups a finding.
    alpha: float = Field(default=0.05, gt=0, lt=1)
    # CPUs each audit Ray task (a neighbour block, one attribute's label model) requests.
    cpus_per_task: float = Field(default=1.0, gt=0)


class ReportConfig(_Section):
    # Sample faces shown per cluster.
    faces_per_cluster: int = Field(default=12, ge=0)
    # Images averaged into each cluster's mean face.
    mean_face_images: int = Field(default=200, ge=1)
    # Figure resolution in dots per inch.
    dpi: int = Field(default=110, ge=50)


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    @model_validator(mode="after")
    def _head_needs_geometry(self) -> "Config":
        if self.extract.face_geometry and self.extract.embedding != "dlib":
            raise ValueError(f'extract.face_geometry = true needs extract.embedding = "dlib" (the '
                             f"landmarks come from dlib's pool); got {self.extract.embedding!r}")
        if self.head.enabled and not (self.extract.embedding == "dlib"
                                      and self.extract.face_geometry):
            raise ValueError('head.enabled = true reads dlib\'s descriptor and face geometry: set '
                             'extract.embedding = "dlib" and extract.face_geometry = true')
        return self

    @field_validator("cluster")
    @classmethod
    def _k_range(cls, v: ClusterConfig) -> ClusterConfig:
        if v.k_max < v.k_min:
            raise ValueError(f"k_max ({v.k_max}) must be >= k_min ({v.k_min})")
        return v

    def public_dict(self) -> dict[str, Any]:
        """The config as plain data, with secrets blanked (what is written next to outputs)."""
        d = self.model_dump(mode="json")
        for key in ("access_key_id", "secret_access_key"):
            if d["storage"].get(key):
                d["storage"][key] = "***"
        return d

    def fingerprint(self, *sections: str) -> str:
        """A short stable hash of the named sections (or ``section.key``s); drives stage reruns."""
        d = self.model_dump(mode="json")
        picked = {}
        for s in sections:  # "section" or "section.key"
            head, _, key = s.partition(".")
            picked[s] = d[head][key] if key else d[head]
        blob = json.dumps(picked, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise ConfigError(f"--set key must look like section.key, got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # design.md: a value that is not valid TOML is a plain string
    return path, value


# Fields whose values are never printed (error messages, run.json, config.toml).
SECRET_KEYS = frozenset({"access_key_id", "secret_access_key"})


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key {loc!r}")
        elif e["loc"] and e["loc"][-1] in SECRET_KEYS:  # never echo a secret, even a bad one
            lines.append(f"bad value for {loc!r}: {e['msg']} (value not shown: it is a secret)")
        else:
            lines.append(f"bad value for {loc!r}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config, apply ``section.key=value`` overrides, validate once."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None
    cfg.data.root = _local_root("data.root", cfg.data.root)
    cfg.output.root = _local_root("output.root", cfg.output.root)
    return cfg


# Set by Ray's job supervisor in the environment of every `ray job submit` driver.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _local_root(key: str, value: str) -> str:
    """A relative local root made absolute against the directory the command was run from.

    A driver started by ``ray job submit`` runs in Ray's unpacked copy of the working dir on the
    head, not where the user typed the command, so a relative path there cannot mean what the
    user meant: it is refused with the fix. URIs with a scheme (``s3://``) pass unchanged.
    """
    path = value[len("file://"):] if value.startswith("file://") else value
    if "://" in path or os.path.isabs(path):
        return value
    if os.environ.get(RAY_JOB_ENV):
        raise ConfigError(
            f"{key} = {value!r} is a relative path, but this driver runs under `ray job submit` "
            f"in {os.getcwd()} (Ray's copy of the working dir), not where the job was submitted: "
            f"pass an absolute path that every node can read (for a head on this machine: "
            f"--set {key}=$PWD/{path}) or an s3:// URI")
    return os.path.abspath(os.path.expanduser(path))


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML, secrets blanked."""
    import tomli_w

    return tomli_w.dumps(cfg.public_dict())
