"""Stage ``train_attributes``: the facial-attribute model, trained with Ray Train.

Reads ``manifest/`` (train, val and test splits), trains :class:`pipeline.models.AttributeNet`
(MobileNetV2, one logit per attribute) with ``TorchTrainer`` and writes, under
``<output.root>/models/attributes/``:

* ``model.pt`` + ``model.json``: the best epoch's weights by val mean accuracy (what ``extract``
  loads through :func:`pipeline.models.load_attribute_model`);
* ``metrics/``: per-attribute test metrics beside the majority-class baseline (schema below);
* ``history/``: one row per epoch (the training curve);
* ``ray_train/run-<fingerprint>/``: Ray Train's checkpoints, one per epoch (best and latest kept).

Data flow (nothing holds the decoded collection in memory; Ray Data streams it):

    manifest rows (image_id, uri, labels)  --from_arrow, one block per ``rows_per_block`` rows-->
    decode task (CPU, ``decode_cpus``): read bytes from local disk / S3, decode, resize
        -> {"image_id": str, "image": uint8 (S, S, 3), "labels": float32 (A,)}
    --streaming_split--> training worker: ``iter_torch_batches`` + :class:`_Collate`
        (random flip / shift on the worker's CPU, seeded from run.seed, epoch and the batch's
        first image id, so augmentation differs every epoch yet a rerun sees the same pixels)

Images that cannot be read or decoded are dropped by the decode task and reported to a small
Ray actor; the driver writes them to ``errors/train_attributes.parquet`` at the end.

Resume (Ray Train 2.60 is "V2": ``TorchTrainer.restore`` / ``resume_from_checkpoint`` are
deprecated): a run is named by the stage's fingerprint, so starting the stage again with the same
config and storage finds Ray Train's checkpoint snapshot under the same ``storage_path``/``name``
and ``ray.train.get_checkpoint()`` in the workers returns the latest epoch; training continues
from the next epoch with the optimizer, schedule and history it had.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from ray.data.collate_fn import NumpyBatchCollateFn

from pipeline import storage, tables
from pipeline.config import Config
from pipeline.progress import LineRelay, relay_logs_to
from pipeline.seeds import derive_seed
from pipeline.stages import StageSkipped
from pipeline.thresholds import tune_thresholds

log = logging.getLogger(__name__)

STAGE = "train_attributes"
MODEL_DIR = "models/attributes"
RUNS_DIR = "models/attributes/ray_train"
CHECKPOINT_FILE = "state.pt"
SCORE = "val_mean_accuracy"  # what "best checkpoint" means
MEAN_ROW = "__mean__"  # the metrics table's row holding means over attributes
METRICS = f"{MODEL_DIR}/metrics"  # table: METRICS_SCHEMA
HISTORY = f"{MODEL_DIR}/history"  # table: HISTORY_SCHEMA

# models/attributes/metrics: one row per attribute on the test split, plus MEAN_ROW.
METRICS_SCHEMA = pa.schema([
    pa.field("attribute", pa.string(), nullable=False),  # CelebA spelling, or MEAN_ROW
    pa.field("n", pa.int64(), nullable=False),  # test images evaluated
    pa.field("accuracy", pa.float64()),  # at `threshold`
    pa.field("majority_baseline", pa.float64()),  # accuracy of always predicting test's majority
    pa.field("balanced_accuracy", pa.float64()),  # mean of sensitivity and specificity
    pa.field("f1", pa.float64()),  # of the positive class (0 when nothing is predicted positive)
    pa.field("roc_auc", pa.float64()),  # null when the test split holds only one class
    pa.field("predicted_positive_rate", pa.float64()),  # share of test images predicted positive
    pa.field("true_positive_rate", pa.float64()),  # share truly positive (prevalence), not recall
    pa.field("threshold", pa.float64()),  # decision threshold on the sigmoid probability
])

# models/attributes/history: the training curve, one row per epoch.
HISTORY_SCHEMA = pa.schema([
    pa.field("epoch", pa.int32(), nullable=False),  # 1-based
    pa.field("step", pa.int64(), nullable=False),  # optimizer steps so far (per worker)
    pa.field("train_loss", pa.float64()),  # mean BCE over the epoch's training images
    pa.field("val_loss", pa.float64()),  # mean BCE over the val split
    pa.field("val_mean_accuracy", pa.float64()),  # mean over attributes, threshold 0.5
    pa.field("images_per_s", pa.float64()),  # training images per second, all workers together
    pa.field("seconds", pa.float64()),  # wall time of the epoch (training + validation)
])

SCHEMAS = {METRICS: METRICS_SCHEMA, HISTORY: HISTORY_SCHEMA}  # every table the stage writes


class TrainInputError(ValueError):
    """The manifest or config cannot be trained on; raised before any training starts."""


class ModelSourceError(ValueError):
    """``train.model_from`` names no usable exported attribute model."""


NO_LABELS = ("the manifest has no attribute labels (dataset {dataset!r}), so there is nothing to "
             "train an attribute model on; set train.model_from to a model trained elsewhere: "
             "the models/attributes folder of another run (local or s3://, e.g. "
             "runs/celeba/models/attributes) or a model.pt with its model.json beside it")


def run(cfg: Config) -> dict:
    """Train, export the best model, evaluate on test; returns row counts and headline numbers."""
    return _run(cfg)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def _run(cfg: Config, *, fail_after_epoch: int | None = None) -> dict:
    """``run`` with a fault-injection hook: ``fail_after_epoch=k`` makes every worker raise right
    after epoch ``k`` was checkpointed (the resume test kills a run this way)."""
    import ray

    from pipeline.run import fingerprints

    t = cfg.train
    if t.model_from:
        adopted = adopt_model(cfg)
        raise StageSkipped(f"attribute model taken from {t.model_from} (train.model_from), "
                           f"trained on {describe_training(adopted['trained_on'])}; nothing is "
                           f"trained in this run", adopted)
    manifest, attributes, use_gpu, splits, label_errors = _checked_inputs(cfg)
    pos_weight = _pos_weight(t, splits["train"], attributes)
    world = worker_count(cfg, use_gpu)  # before anything is written or removed
    # the resolved device is part of the run's identity: "auto" may resolve differently on
    # another cluster, and a CPU run's checkpoint (float32, no scaler) is not a GPU run's
    fp = _run_fingerprint(fingerprints(cfg)[STAGE], use_gpu)
    name = f"run-{fp}"
    model_loc, runs_loc = tables.location(cfg, MODEL_DIR), tables.location(cfg, RUNS_DIR)
    resumed_from = _prepare_run_dir(cfg, model_loc, runs_loc, name, fp)
    n_train = splits["train"].num_rows
    steps_per_epoch, drop_last = _steps_per_epoch(t, n_train // world)

    error_log = ray.remote(num_cpus=0)(_ErrorLog).remote()
    lines = LineRelay()  # the workers' epoch and step lines to this console
    cache, datasets = _feeds(cfg, splits, attributes, error_log)
    loop_config = _loop_config(cfg, attributes, pos_weight, steps_per_epoch, drop_last, use_gpu,
                               fail_after_epoch, cache, lines.actor)
    trainer = _trainer(cfg, loop_config, datasets, name, runs_loc, world, use_gpu)
    log.info("[%s] %d attributes, %d/%d/%d train/val/test images, %d worker(s) on %s, "
             "%d epoch(s) of %d step(s); %s", STAGE, len(attributes), n_train,
             splits["val"].num_rows, splits["test"].num_rows, world, "GPU" if use_gpu else "CPU",
             t.epochs, steps_per_epoch,
             f"resuming after epoch {resumed_from}" if resumed_from else "starting fresh")
    t0 = time.time()
    try:
        result = trainer.fit()
        train_seconds = time.time() - t0
        latest, best, best_row, mean = _evaluate_and_export(
            cfg, result, manifest, splits, attributes, use_gpu, error_log, model_loc, fp)
    finally:
        errors = label_errors + ray.get(error_log.rows.remote())
        tables.write_errors(cfg, STAGE, errors)  # always: a rerun replaces older error rows
        ray.kill(error_log)
        lines.close()
    log.info("[%s] best epoch %d (val mean acc %.4f); test mean accuracy %.4f vs majority "
             "baseline %.4f; %d unusable image(s) in errors/", STAGE, best["epoch"],
             best_row[SCORE], mean["accuracy"], mean["majority_baseline"], len(errors))
    return {
        "attributes": len(attributes), "train_rows": n_train, "val_rows": splits["val"].num_rows,
        "test_rows": splits["test"].num_rows, "errors": len(errors), "num_workers": world,
        "use_gpu": use_gpu, "epochs": len(latest["history"]), "resumed_from_epoch": resumed_from,
        "best_epoch": int(best["epoch"]), SCORE: float(best_row[SCORE]),
        "test_mean_accuracy": mean["accuracy"],
        "test_mean_majority_baseline": mean["majority_baseline"],
        "images_per_s": float(np.mean([r["images_per_s"] for r in latest["history"]])),
        "train_seconds": round(train_seconds, 2), "model_uri": model_loc.uri,
    }


def _checked_inputs(cfg: Config):
    """Everything that can be wrong with the input, checked before any work starts; returns
    (manifest, attributes, use_gpu, rows per split, label error rows)."""
    from pipeline.ray_runtime import resolve_use_gpu

    manifest = tables.read(cfg, "manifest")
    attributes = resolve_attributes(cfg, manifest.schema)
    if not attributes:
        raise TrainInputError(NO_LABELS.format(dataset=cfg.data.dataset))
    use_gpu = resolve_use_gpu(cfg, cfg.train.use_gpu)
    splits, label_errors = split_rows(manifest, attributes)
    for split in ("train", "val", "test"):
        if splits[split].num_rows == 0:
            raise TrainInputError(
                f"the manifest's {split!r} split is empty (after dropping rows with missing "
                f"labels); training needs train, val (model selection) and test (evaluation) "
                f"rows — check data.split_fractions / data.limit or rerun ingest")
    return manifest, attributes, use_gpu, splits, label_errors


def _pos_weight(t, train_rows: pa.Table, attributes: list[str]) -> list[float] | None:
    """neg/pos per attribute, so a rare attribute's positives weigh as much as its negatives;
    clipped so a nearly absent attribute cannot dominate the loss (None: train.pos_weight_max
    is 0, no weighting)."""
    if t.pos_weight_max <= 0:
        return None
    train_prev = _prevalence(train_rows, attributes)
    pos = np.clip(train_prev, 1e-6, None)
    return np.minimum((1 - train_prev) / pos, t.pos_weight_max).tolist()


def _steps_per_epoch(t, per_worker: int) -> tuple[int, bool]:
    """Steps per epoch of one worker and whether its last partial batch is dropped."""
    steps_per_epoch = max(1, math.ceil(per_worker / t.batch_size))
    drop_last = per_worker >= t.batch_size  # a last batch of 1 breaks BatchNorm in training
    if drop_last:
        steps_per_epoch = max(1, per_worker // t.batch_size)
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    return steps_per_epoch, drop_last


def _feeds(cfg: Config, splits: dict[str, pa.Table], attributes: list[str], error_log):
    """(cache, datasets) of the train and val splits: decoded once into the object store when
    they fit (decoding overlaps Ray Train's start-up), else (None, a Ray Data pipeline per split
    that decodes again every epoch)."""
    cache = _cache_splits(cfg, {s: splits[s] for s in ("train", "val")}, attributes, error_log)
    datasets = None if cache else {s: _image_dataset(cfg, splits[s], attributes, error_log)
                                   for s in ("train", "val")}
    return cache, datasets


def _loop_config(cfg: Config, attributes: list[str], pos_weight, steps_per_epoch: int,
                 drop_last: bool, use_gpu: bool, fail_after_epoch: int | None, cache,
                 log_relay) -> dict:
    """What every training worker gets (plain values: it goes through Ray)."""
    t = cfg.train
    return {
        "attributes": attributes, "image_size": t.image_size, "epochs": t.epochs,
        "batch_size": t.batch_size, "lr": t.lr, "weight_decay": t.weight_decay,
        "schedule": t.schedule, "precision": t.precision, "pos_weight": pos_weight,
        "augment": t.augment, "pretrained": t.pretrained, "arch": t.arch,
        "storage": cfg.storage.model_dump(), "download_weights": cfg.weights.download,
        "seed": cfg.run.seed, "steps_per_epoch": steps_per_epoch,
        "max_steps_per_epoch": t.max_steps_per_epoch, "drop_last": drop_last,
        "shuffle_buffer": t.shuffle_buffer_batches * t.batch_size,
        "log_every": t.log_every_steps, "use_gpu": use_gpu, "fail_after_epoch": fail_after_epoch,
        "prefetch_batches": t.prefetch_batches, "cache": cache, "log_relay": log_relay,
    }


def _trainer(cfg: Config, loop_config: dict, datasets: dict | None, name: str, runs_loc,
             world: int, use_gpu: bool):
    """The TorchTrainer: ``world`` workers, checkpoints kept by val score under ``runs_loc``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    run_config = RunConfig(
        name=name, storage_path=runs_loc.path,
        storage_filesystem=runs_loc.fs if storage.is_s3(runs_loc.uri) else None,
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                           checkpoint_score_attribute=SCORE,
                                           checkpoint_score_order="max"),
        # controller_failure_limit: a worker group that cannot start (Ray Train's 60 s start
        # timeout) fails the run instead of being retried without end (Ray's default is -1)
        failure_config=FailureConfig(max_failures=t.max_failures,
                                     controller_failure_limit=t.max_failures),
    )
    return TorchTrainer(
        _train_loop, train_loop_config=loop_config, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=run_config,
    )


def _evaluate_and_export(cfg: Config, result, manifest: pa.Table, splits: dict[str, pa.Table],
                         attributes: list[str], use_gpu: bool, error_log, model_loc, fp: str):
    """The best checkpoint's model: thresholds on val (optional), the test split's metrics,
    ``train/metrics`` and ``train/history``, then the exported model (model.json last).
    Returns (latest checkpoint, best checkpoint, best history row, the test mean row)."""
    from pipeline.models import IMAGENET_MEAN, IMAGENET_STD, AttributeModelInfo

    t = cfg.train
    latest = _load_checkpoint(result.checkpoint)
    best_ckpt = result.get_best_checkpoint(SCORE, "max") or result.checkpoint
    best = _load_checkpoint(best_ckpt)
    model = _model_from_state(attributes, best["model"], t.arch)

    # --- thresholds on val (optional), then the test split's metrics ---
    wanted = ("val", "test") if t.tune_thresholds else ("test",)
    preds = _predict(cfg, model, {s: splits[s] for s in wanted}, attributes, use_gpu,
                     error_log)  # one pass (one actor pool start) over val and test
    thresholds = tune_thresholds(*preds["val"]) if t.tune_thresholds \
        else np.full(len(attributes), 0.5)
    y_test, p_test = preds["test"]
    metrics = _test_metrics(attributes, y_test, p_test, thresholds)
    tables.replace(cfg, METRICS, metrics, schema=METRICS_SCHEMA)
    history = pa.Table.from_pylist(latest["history"], schema=HISTORY_SCHEMA)
    tables.replace(cfg, HISTORY, history, schema=HISTORY_SCHEMA)
    mean = metrics.filter(pc.equal(metrics["attribute"], MEAN_ROW)).to_pylist()[0]
    best_row = max(latest["history"], key=lambda r: r[SCORE])
    info = AttributeModelInfo(
        arch=t.arch, attributes=attributes, image_size=t.image_size, pretrained=t.pretrained,
        trained_on=_trained_on(cfg, manifest, splits),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, thresholds=[float(x) for x in thresholds],
        metrics={"best_epoch": int(best["epoch"]), SCORE: float(best_row[SCORE]),
                 "test_mean_accuracy": mean["accuracy"],
                 "test_mean_majority_baseline": mean["majority_baseline"],
                 "test_mean_balanced_accuracy": mean["balanced_accuracy"],
                 "test_mean_roc_auc": mean["roc_auc"]},
        version=fp)
    from pipeline.models import export_attribute_model

    export_attribute_model(model, info, model_loc)  # model.json last = export complete
    return latest, best, best_row, mean


# --------------------------------------------------------------------------------------------
# a model trained elsewhere (train.model_from)
# --------------------------------------------------------------------------------------------

def _trained_on(cfg: Config, manifest: pa.Table, splits: dict[str, pa.Table]) -> dict[str, Any]:
    """What model.json records about the data a model was trained on."""
    from pipeline import runlog

    ingest = (runlog.stage_record(cfg, "ingest") or {}).get("details") or {}
    out: dict[str, Any] = {"dataset": cfg.data.dataset, "data_root": cfg.data.root,
                           "output_root": cfg.output.root,
                           "split_rule": ingest.get("split_rule", "not recorded"),
                           **{f"{s}_rows": splits[s].num_rows for s in ("train", "val", "test")}}
    if "identity" in manifest.column_names:
        train_ids = manifest.filter(pc.equal(manifest["split"], "train"))["identity"]
        out["train_identities"] = int(pc.count_distinct(train_ids, mode="only_valid").as_py())
    return out


def describe_training(trained_on: dict[str, Any]) -> str:
    """One line for a model's ``trained_on`` record (run.json, the report)."""
    if not trained_on:
        return "data its model.json does not describe"
    text = f"{trained_on.get('dataset', '?')} at {trained_on.get('data_root', '?')}"
    if "train_rows" in trained_on:
        text += f" ({trained_on['train_rows']:,} training images"
        if trained_on.get("train_identities"):
            text += f" of {trained_on['train_identities']:,} identities"
        text += f"; split {trained_on.get('split_rule', 'not recorded')})"
    return text


def _model_source(cfg: Config) -> tuple[storage.Location, storage.Location, storage.Location]:
    """(folder, model.pt, model.json) that ``train.model_from`` names."""
    import posixpath

    spec = cfg.train.model_from.rstrip("/")
    if spec.endswith(".pt"):
        folder = storage.filesystem(posixpath.dirname(spec) or ".", cfg.storage)
        pt = storage.filesystem(spec, cfg.storage)
    else:
        folder = storage.filesystem(spec, cfg.storage)
        pt = folder.join("model.pt")
    meta = folder.join("model.json")
    for loc, what in ((meta, "model.json"), (pt, "the state dict")):
        if not storage.exists(loc):
            raise ModelSourceError(
                f"train.model_from = {cfg.train.model_from!r}: {what} is missing ({loc.uri}); "
                f"expected the models/attributes folder of a finished run (model.pt + model.json) "
                f"or a model.pt with the model.json it was exported with beside it")
    return folder, pt, meta


def adopt_model(cfg: Config) -> dict[str, Any]:
    """Copy the model ``train.model_from`` names into this run's models/attributes and check it.

    Copies ``model.pt``, its ``model.json`` (written last: its presence marks a complete model) and,
    when the source folder has them, its ``metrics/`` (the source's own test split) and
    ``history/``; then loads the copy as extract will, so a bad file fails here. Returns what
    run.json records: where the model came from and what it was trained on.
    """
    from pipeline.models import AttributeModelInfo, load_attribute_model

    folder, pt, meta = _model_source(cfg)
    dest = tables.location(cfg, MODEL_DIR)
    info = AttributeModelInfo.from_json(storage.read_bytes(meta).decode())
    copied = []
    if folder.uri.rstrip("/") != dest.uri.rstrip("/"):
        for name in ("model.json", "model.pt", "metrics", "history", "head.json", "head.npz",
                     "head_metrics"):
            storage.delete(dest.join(name))  # nothing of an earlier model in this run survives
        storage.write_bytes(dest.join("model.pt"), storage.read_bytes(pt))
        # the attribute_head stage's head (pipeline.attribute_head), when the source fitted one:
        # its arrays first, its head.json (the completeness marker) after them
        if storage.exists(folder.join("head.json")):
            storage.write_bytes(dest.join("head.npz"), storage.read_bytes(folder.join("head.npz")))
            storage.write_bytes(dest.join("head.json"), storage.read_bytes(folder.join("head.json")))
            copied.append("head")
        for table in ("metrics", "history", "head_metrics"):
            files = storage.parquet_files(folder.join(table))
            for path in files:
                base = path.rsplit("/", 1)[-1]
                src = storage.Location(folder.fs, path, folder.join(table, base).uri)
                storage.write_bytes(dest.join(table, base), storage.read_bytes(src))
            if files:
                copied.append(table)
        storage.write_bytes(dest.join("model.json"), storage.read_bytes(meta))
    try:
        load_attribute_model(dest)
    except Exception as exc:  # any unreadable file (bad pickle, wrong shapes): one clear error
        storage.delete(dest.join("model.json"))
        raise ModelSourceError(f"train.model_from = {cfg.train.model_from!r} does not load as "
                               f"an attribute model: {exc}") from None
    log.info("[%s] attribute model taken from %s (%d attributes, trained on %s)", STAGE,
             cfg.train.model_from, len(info.attributes), describe_training(info.trained_on))
    return {"model_from": cfg.train.model_from, "model_uri": dest.uri,
            "model_version": info.version, "attributes": len(info.attributes),
            "trained_on": info.trained_on, "copied_tables": copied,
            "source_test_mean_accuracy": info.metrics.get("test_mean_accuracy")}


def _run_fingerprint(stage_fp: str, use_gpu: bool) -> str:
    """The run's name and model version: the stage's fingerprint plus the resolved device."""
    return f"{stage_fp}-{'gpu' if use_gpu else 'cpu'}"


def worker_count(cfg: Config, use_gpu: bool) -> int:
    """``train.num_workers`` resolved ("auto") and checked against the nodes (bounded wait).

    The request is the workers plus one decode task: without a CPU left for decoding, training
    would wait on Ray Data forever. "auto": on GPU, every worker bundle the nodes hold; on CPU,
    one worker per node that holds one (on one node, DDP over its cores gains nothing over
    torch's intra-op threads).
    """
    from pipeline import resources

    t = cfg.train
    worker = {"CPU": t.cpus_per_worker, "GPU": 1.0 if use_gpu else 0.0}
    decode = {"CPU": t.decode_cpus}
    world = t.num_workers
    if world == "auto":
        nodes = resources.node_totals()
        if use_gpu:
            world = resources.fit_count(worker, nodes, reserve=decode)
        else:
            world = sum(1 for n in nodes if resources.fit_count(worker, [n]) > 0)
        world = max(1, world)  # none fits: the check below waits for one or says why not
        log.info("[%s] train.num_workers = auto -> %d", STAGE, world)
    resources.ensure_fits(
        cfg, f"{STAGE}: {world} worker(s) + one decode task", [worker] * world + [decode],
        "lower train.num_workers (or \"auto\"), train.cpus_per_worker or train.decode_cpus, "
        "or add nodes")
    return int(world)


def resolve_attributes(cfg: Config, schema: pa.Schema) -> list[str]:
    from pipeline.schemas import manifest_attributes

    have = manifest_attributes(schema)
    wanted = list(cfg.train.attributes) or have
    missing = [a for a in wanted if a not in have]
    if missing:
        raise TrainInputError(
            f"train.attributes asks for {missing}, which the manifest does not have; it has "
            f"{have or 'no attribute columns'} (spelling as in CelebA, e.g. 'Eyeglasses')")
    if len(set(wanted)) != len(wanted):
        raise TrainInputError(f"train.attributes lists an attribute twice: {wanted}")
    return wanted


def split_rows(manifest: pa.Table, attributes: list[str]) -> tuple[dict[str, pa.Table], list]:
    """The columns training needs, per split; rows with a missing label become error rows."""
    cols = manifest.select(["image_id", "uri", "split", *attributes])
    complete = pc.is_valid(cols[attributes[0]])
    for a in attributes[1:]:
        complete = pc.and_(complete, pc.is_valid(cols[a]))
    bad = cols.filter(pc.invert(complete))
    errors = [{"image_id": r["image_id"], "uri": r["uri"],
               "reason": "missing label for at least one of train.attributes"}
              for r in bad.select(["image_id", "uri"]).to_pylist()]
    cols = cols.filter(complete)
    out = {s: cols.filter(pc.equal(cols["split"], s)).drop(["split"])
           for s in ("train", "val", "test")}
    return out, errors


def _prevalence(table: pa.Table, attributes: list[str]) -> np.ndarray:
    return np.array([pc.mean(table[a].cast(pa.float64())).as_py() for a in attributes])


def _prepare_run_dir(cfg: Config, model_loc: storage.Location, runs_loc: storage.Location,
                     name: str, fp: str) -> int:
    """Decide between resuming and starting fresh; returns the epoch resumed after (0 = fresh).

    ``run_stage`` only calls the stage when it is not recorded complete, so a ``model.json``
    carrying this fingerprint means the previous run of this very config finished and this call
    is a forced rerun: its checkpoints are removed and training starts over. Checkpoints of other
    fingerprints belong to an older config and are removed too. Without such a ``model.json``,
    checkpoints under this run's name come from a run that was killed, and Ray Train resumes it.
    """
    from pipeline.models import AttributeModelInfo

    meta = model_loc.join("model.json")
    finished = False
    if storage.exists(meta):
        try:
            finished = AttributeModelInfo.from_json(storage.read_bytes(meta).decode()).version == fp
        except (TypeError, ValueError):
            finished = False
        # the old export no longer describes this run: remove it now, so a run killed from here
        # on leaves no model.json that a reader could take for this run's result
        storage.delete(meta)
        storage.delete(model_loc.join("model.pt"))
    for info in runs_loc.fs.get_file_info(pafs.FileSelector(runs_loc.path, allow_not_found=True)):
        base = info.path.rstrip("/").rsplit("/", 1)[-1]
        if base != name or finished:
            storage.delete(storage.Location(runs_loc.fs, info.path, runs_loc.join(base).uri))
    return _latest_epoch(runs_loc.join(name))


def _latest_epoch(run_loc: storage.Location) -> int:
    """The epoch of the run's latest checkpoint in storage (0 when there is none)."""
    if not storage.exists(run_loc):
        return 0
    from ray.train import Result

    try:
        result = Result.from_path(run_loc.path, storage_filesystem=run_loc.fs)
    except (RuntimeError, ValueError, FileNotFoundError, OSError):
        return 0  # no checkpoint snapshot yet: the run died before its first epoch ended
    return int((result.metrics or {}).get("epoch", 0)) if result.checkpoint else 0


class _ErrorLog:
    """Collects images the decode tasks could not use (one row per image, first reason kept)."""

    def __init__(self):
        self._rows: dict[str, dict] = {}

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self._rows.setdefault(r["image_id"], r)

    def rows(self) -> list[dict]:
        return [self._rows[k] for k in sorted(self._rows)]


def _row_blocks(cfg: Config, rows: pa.Table) -> list[pa.Table]:
    """The split's manifest rows, shuffled once (seeded), in blocks of ``rows_per_block``: blocks
    then mix attributes and identities instead of following image_id order."""
    order = np.random.default_rng(derive_seed(cfg.run.seed, STAGE, "block_order")) \
        .permutation(rows.num_rows)
    rows = rows.take(pa.array(order))
    k = cfg.train.rows_per_block
    return [rows.slice(i, k) for i in range(0, rows.num_rows, k)]


def _decode_kwargs(cfg: Config, attributes: list[str], error_log) -> dict:
    return {"size": cfg.train.image_size, "attributes": attributes, "storage_cfg": cfg.storage,
            "error_log": error_log, "max_pixels": cfg.data.max_image_pixels,
            "max_bytes": cfg.data.max_image_bytes,
            "decode_threads": _decode_threads(cfg.train.decode_cpus)}


def _image_dataset(cfg: Config, rows: pa.Table, attributes: list[str], error_log):
    """A Ray Dataset of decoded, resized images and their labels (lazy; streamed per epoch)."""
    import ray.data

    return ray.data.from_arrow(_row_blocks(cfg, rows)).map_batches(
        _decode_batch, batch_format="pyarrow", batch_size=None,
        num_cpus=cfg.train.decode_cpus, fn_kwargs=_decode_kwargs(cfg, attributes, error_log))


def _cache_splits(cfg: Config, splits: dict[str, pa.Table], attributes: list[str],
                  error_log) -> dict[str, list] | None:
    """Decode every split once into Ray's object store, when it fits; else None (stream).

    Returns, per split, the ObjectRefs of its decoded blocks (``_decode_batch``'s dicts), in block
    order. The tasks are started here and not waited for: they decode while Ray Train starts its
    workers, and a worker waits for what is left when its first epoch begins (inside the epoch's
    timing). Fits = the decoded pixels are at most ``train.cache_decoded_mb`` and at most half the
    object store, so training's own objects and a spill-free margin remain.
    """
    import ray

    t = cfg.train
    need = sum(r.num_rows for r in splits.values()) * t.image_size * t.image_size * 3
    store = ray.cluster_resources().get("object_store_memory", 0)
    if need > t.cache_decoded_mb * 2**20 or need > store / 2:
        log.info("[%s] decoded images (%.0f MiB) do not fit train.cache_decoded_mb = %d MiB / "
                 "half the object store (%.0f MiB): streamed through Ray Data every epoch",
                 STAGE, need / 2**20, t.cache_decoded_mb, store / 2**21)
        return None
    decode = ray.remote(num_cpus=t.decode_cpus)(_decode_batch)
    kwargs = _decode_kwargs(cfg, attributes, error_log)
    out = {s: [decode.remote(b, **kwargs) for b in _row_blocks(cfg, rows)]
           for s, rows in splits.items()}
    log.info("[%s] decoding %s images once into the object store (%.0f MiB)", STAGE,
             " + ".join(f"{r.num_rows} {s}" for s, r in splits.items()), need / 2**20)
    return out


READ_THREADS = 8  # files a decode task reads at once (I/O, so more than its CPUs)


def _decode_threads(cpus: float) -> int:
    """Decoding threads of a task that reserves ``cpus`` CPUs: as many as it reserved (>= 1), so
    decode tasks do not take the cores Ray gave the training workers."""
    return max(1, int(cpus + 1e-9))


def _decode_batch(batch: pa.Table, *, size: int, attributes: list[str], storage_cfg,
                  error_log, max_pixels: int, max_bytes: int,
                  decode_threads: int = 1) -> dict[str, np.ndarray]:
    """Manifest rows -> decoded images; unusable images go to the error log, not downstream."""
    import ray

    # the extract stage's decoder: the model must see at training time exactly the pixels it
    # will be given at extraction time (centre square crop, bilinear resize, any mode -> RGB)
    from pipeline.images import decode_image, read_and_decode

    ids = batch["image_id"].to_pylist()
    uris = batch["uri"].to_pylist()
    labels = np.stack([batch[a].to_numpy(zero_copy_only=False) for a in attributes], axis=1) \
        .astype(np.float32)
    # READ_THREADS reads overlap S3 round trips; decoding gets the CPUs the task reserved
    results = [(img, err) for _, img, err in read_and_decode(
        uris, lambda data: decode_image(data, (size,), max_pixels=max_pixels)[0],
        storage_cfg=storage_cfg, max_bytes=max_bytes, read_threads=READ_THREADS,
        decode_threads=decode_threads)]
    keep = [i for i, (img, _) in enumerate(results) if img is not None]
    bad = [{"image_id": ids[i], "uri": uris[i], "reason": results[i][1]}
           for i in range(len(ids)) if results[i][0] is None]
    if bad:
        ray.get(error_log.add.remote(bad))  # wait: the driver reads the log right after training
    images = np.stack([results[i][0] for i in keep]) if keep \
        else np.zeros((0, size, size, 3), np.uint8)
    return {"image_id": np.array([ids[i] for i in keep], dtype=object), "image": images,
            "labels": labels[keep]}


def _load_checkpoint(checkpoint) -> dict:
    import torch

    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location="cpu", weights_only=True)


def _model_from_state(attributes: list[str], state: dict, arch: str):
    from pipeline.models import AttributeNet

    model = AttributeNet(len(attributes), arch=arch)
    model.load_state_dict(state)
    return model.eval()


class _Predictor:
    """Ray Data actor: images -> per-attribute probabilities (batch inference on CPU or GPU)."""

    def __init__(self, state_ref: list, n_attributes: int, use_gpu: bool, arch: str):
        import ray
        import torch

        from pipeline.models import AttributeNet

        if use_gpu:
            from pipeline.resources import check_cuda

            check_cuda("train_attributes predictor")
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = AttributeNet(n_attributes, arch=arch)
        self.model.load_state_dict(ray.get(state_ref[0]))
        self.model.to(self.device, memory_format=torch.channels_last).eval()
        self.normalize = _Normalize(self.device)
        self.amp_dtype, _ = amp_policy(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.array(batch["image"], dtype=np.uint8))
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # channels_last view
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                    enabled=self.amp_dtype is not None):
            probs = torch.sigmoid(self.model(self.normalize(x)).float()).cpu().numpy()
        return {"image_id": batch["image_id"], "labels": batch["labels"], "probs": probs}


def _predict(cfg: Config, model, splits: dict[str, pa.Table], attributes: list[str],
             use_gpu: bool, error_log) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Labels and probabilities per split (unreadable images are skipped and logged)."""
    import ray
    import ray.data

    split_of = {i: s for s, rows in splits.items() for i in rows["image_id"].to_pylist()}
    state_ref = ray.put({k: v.detach().cpu() for k, v in model.state_dict().items()})
    ds = _image_dataset(cfg, pa.concat_tables(splits.values()), attributes, error_log) \
        .map_batches(_Predictor, batch_size=cfg.train.batch_size, batch_format="numpy",
                     fn_constructor_kwargs={"state_ref": [state_ref],
                                            "n_attributes": len(attributes), "use_gpu": use_gpu,
                                            "arch": cfg.train.arch},
                     compute=ray.data.ActorPoolStrategy(size=1),
                     num_gpus=1 if use_gpu else 0, num_cpus=cfg.train.cpus_per_worker)
    ys: dict[str, list] = {s: [] for s in splits}
    ps: dict[str, list] = {s: [] for s in splits}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        which = np.array([split_of[i] for i in b["image_id"]])
        for s in splits:
            ys[s].append(b["labels"][which == s])
            ps[s].append(b["probs"][which == s])
    out = {}
    for s in splits:
        y = np.concatenate(ys[s]) if ys[s] else np.zeros((0, len(attributes)))
        if len(y) == 0:
            raise TrainInputError(f"no image of the {s!r} split could be decoded; see errors/")
        out[s] = (y.astype(bool), np.concatenate(ps[s]))
    return out


def _test_metrics(attributes: list[str], y: np.ndarray, p: np.ndarray,
                  thresholds: np.ndarray) -> pa.Table:
    """Per-attribute metrics at ``thresholds``; the baseline always predicts the evaluated
    split's own majority class (the usual, stricter CelebA baseline: it knows test prevalence)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    rows = []
    for j, a in enumerate(attributes):
        yt, pred = y[:, j], p[:, j] >= thresholds[j]
        with warnings.catch_warnings():
            # one class only in y_true/y_pred: the metric is still defined (sklearn warns)
            warnings.simplefilter("ignore", UserWarning)
            bal = float(balanced_accuracy_score(yt, pred))
        two_classes = 0 < yt.sum() < len(yt)
        rows.append({
            "attribute": a, "n": int(len(yt)), "accuracy": float((pred == yt).mean()),
            "majority_baseline": float(max(yt.mean(), 1 - yt.mean())), "balanced_accuracy": bal,
            "f1": float(f1_score(yt, pred, zero_division=0)),
            "roc_auc": float(roc_auc_score(yt, p[:, j])) if two_classes else None,
            "predicted_positive_rate": float(pred.mean()), "true_positive_rate": float(yt.mean()),
            "threshold": float(thresholds[j]),
        })
    mean_row: dict[str, Any] = {"attribute": MEAN_ROW, "n": int(len(y))}
    for f in METRICS_SCHEMA.names[2:]:
        vals = [r[f] for r in rows if r[f] is not None]
        mean_row[f] = float(np.mean(vals)) if vals else None
    return pa.Table.from_pylist(rows + [mean_row], schema=METRICS_SCHEMA)


# --------------------------------------------------------------------------------------------
# training workers
# --------------------------------------------------------------------------------------------

class _Collate(NumpyBatchCollateFn):
    """numpy batch -> {"image": uint8 NCHW (a channels_last view), "labels": float32} tensors,
    plus, when training, the batch's augmentation parameters ("flip", "shift").

    Runs on the training worker's CPU (Ray's prefetch threads), where the epoch is known, so the
    random flip and shift change every epoch. The generator is seeded from run.seed, the epoch and
    the batch's first image id (not a counter: prefetch threads may collate out of order). Only
    the parameters are drawn here; the pixels move on the device (:func:`_augment_on_device`).
    """

    def __init__(self, seed: int, augment: bool):
        self.seed, self.augment, self.epoch = seed, augment, 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        import torch

        images = np.array(batch["image"], dtype=np.uint8)  # a writable copy for torch
        # no .contiguous(): the permuted NHWC memory is channels_last, what the model runs in
        out = {"image": torch.from_numpy(images).permute(0, 3, 1, 2),
               "labels": torch.from_numpy(np.asarray(batch["labels"], dtype=np.float32))}
        if self.augment and len(images):
            rng = np.random.default_rng(derive_seed(self.seed, STAGE, "augment", self.epoch,
                                                    str(batch["image_id"][0])))
            flip, shift = _augment_params(len(images), images.shape[1], rng)
            out["flip"], out["shift"] = torch.from_numpy(flip), torch.from_numpy(shift)
        return out


class _CachedSplit:
    """A split decoded once into the object store (:func:`_cache_splits`), on a training worker.

    The blocks are fetched on the first call (the wait for decodes still running falls inside
    the first epoch) and kept as zero-copy views of the object store. Each epoch takes a seeded
    permutation of all rows (one for every rank, so the shards are disjoint) and gives this rank
    every ``world``-th row of it: a full shuffle, not a local buffer, and the same number of rows
    on every rank, as DDP needs (``world`` - 1 rows at most are left out per epoch, as
    ``streaming_split(equal=True)`` does).
    """

    def __init__(self, refs: list):
        self.refs, self.images = refs, None

    def _load(self) -> int:
        import ray

        if self.images is None:
            blocks = [b for b in ray.get(self.refs) if len(b["image"])]
            self.images = [b["image"] for b in blocks]
            self.ids = np.concatenate([b["image_id"] for b in blocks]) if blocks \
                else np.zeros(0, dtype=object)
            self.labels = np.concatenate([b["labels"] for b in blocks]) if blocks \
                else np.zeros((0, 0), dtype=np.float32)
            self.starts = np.cumsum([0] + [len(b) for b in self.images])
        return int(self.starts[-1])

    def _batch(self, rows: np.ndarray, collate: _Collate) -> dict:
        block = np.searchsorted(self.starts, rows, side="right") - 1
        images = np.stack([self.images[b][r - self.starts[b]] for b, r in zip(block, rows)])
        out = collate({"image": images, "labels": self.labels[rows], "image_id": self.ids[rows]})
        return {k: v.pin_memory() for k, v in out.items()} if self.pin else out

    def batches(self, batch_size: int, rank: int, world: int, collate: _Collate, device, *,
                order_seed: int | None, drop_last: bool, prefetch: int):
        """This rank's batches of the epoch, on ``device``; ``order_seed`` None = file order.
        ``prefetch`` batches are gathered and collated ahead on a thread, overlapping the step."""
        from collections import deque

        n = self._load()
        used = n - n % world
        order = np.arange(used) if order_seed is None \
            else np.random.default_rng(order_seed).permutation(n)[:used]
        mine = order[rank::world]
        if drop_last and len(mine) >= batch_size:
            mine = mine[:len(mine) - len(mine) % batch_size]
        chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        self.pin = device.type == "cuda"
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead = deque(pool.submit(self._batch, ch, collate) for ch in chunks[:prefetch])
            for i in range(len(chunks)):
                batch = ahead.popleft().result()
                if i + prefetch < len(chunks):
                    ahead.append(pool.submit(self._batch, chunks[i + prefetch], collate))
                yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _augment_params(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per image: a horizontal flip (p=0.5) and a (dy, dx) shift of up to 1/16 of the size."""
    flip = rng.random(n) < 0.5
    pad = max(1, size // 16)
    shift = rng.integers(0, 2 * pad + 1, size=(2, n)) - pad  # (dy, dx) in [-pad, pad]
    return flip, shift


def _augment_on_device(x, flip, shift):
    """Flip and shift a uint8 NCHW batch where it lies (GPU or CPU), edge pixels repeated.

    Output pixel (y, x) of image i is input (clamp(y + dy_i), clamp(x + dx_i)), read mirrored
    when flipped: two gathers, no Python loop, the layout (channels_last) kept.
    """
    import torch

    n, c, h, w = x.shape
    dev = x.device
    shift = shift.to(dev, non_blocking=True)
    flip = flip.to(dev, non_blocking=True)
    ys = (torch.arange(h, device=dev)[None, :] + shift[0][:, None]).clamp_(0, h - 1)
    xs = (torch.arange(w, device=dev)[None, :] + shift[1][:, None]).clamp_(0, w - 1)
    xs = torch.where(flip[:, None], w - 1 - xs, xs)
    out = torch.gather(x, 2, ys[:, None, :, None].expand(n, c, h, w))
    return torch.gather(out, 3, xs[:, None, None, :].expand(n, c, h, w))


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """NHWC numpy form of the training augmentation (same parameters and pixels)."""
    import torch

    flip, shift = _augment_params(len(images), images.shape[1], rng)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return _augment_on_device(x, torch.from_numpy(flip), torch.from_numpy(shift)) \
        .permute(0, 2, 3, 1).numpy()


class _Normalize:
    """uint8 NCHW -> normalised float, as (x/255 - mean)/std in one multiply-add; the constants
    live on the device, built once (not two blocking host-to-device copies per batch)."""

    def __init__(self, device, mean=None, std=None):
        import torch

        from pipeline.models import IMAGENET_MEAN, IMAGENET_STD

        m = torch.tensor(mean or IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std or IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * s)).to(device)
        self.shift = (-m / s).to(device)

    def __call__(self, x):
        import torch

        return torch.addcmul(self.shift, x.float(), self.scale)


def amp_policy(device, precision: str = "auto") -> tuple[Any, bool]:
    """(autocast dtype or None, use a GradScaler): bf16 without a scaler on GPUs that have it
    (Ampere and later), fp16 with a scaler on older GPUs, float32 on CPU or when ``precision``
    is "fp32"."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False
    return torch.float16, True


def _restore_scaler(scaler, state: dict) -> None:
    """Load a checkpoint's GradScaler state unless it has none (saved by a disabled scaler: a
    bf16 or CPU run); ``load_state_dict({})`` raises on an enabled scaler."""
    saved = state.get("scaler") or {}
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def _lr_factor(step: int, total: int, schedule: str) -> float:
    """Linear warm-up over the first 5% of steps, then constant or cosine decay to 2%."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _all_sum(values: list[float], device) -> list[float]:
    """Sum ``values`` over the workers (identity with one worker)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _train_loop(c: dict) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train, validate, report per epoch."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from pipeline.config import StorageConfig
    from pipeline.models import build_attribute_model

    relay_logs_to(c.get("log_relay"))  # this worker's [train_attributes] lines to the console
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if c["use_gpu"]:  # before anything touches CUDA: a driver / build mismatch, one message
        from pipeline.resources import check_cuda

        check_cuda(f"train_attributes worker {rank}")
    device = ray.train.torch.get_device()
    n_attr = len(c["attributes"])
    torch.manual_seed(derive_seed(c["seed"], STAGE, "init"))
    model = build_attribute_model(n_attr, c["pretrained"], StorageConfig(**c["storage"]),
                                  download=c.get("download_weights", False), arch=c["arch"])

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted run (same storage path + name): pick up from it
        state = _load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
    # channels_last: the batches arrive in that layout (NHWC memory seen as NCHW); cuDNN and
    # oneDNN run convolutions faster in it
    model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # to device; DDP when world > 1
    total_steps = c["epochs"] * c["steps_per_epoch"]
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total_steps, c["schedule"]))
    amp_dtype, use_scaler = amp_policy(device, c["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, step, history = 1, 0, []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _restore_scaler(scaler, state)
        start_epoch, step, history = state["epoch"] + 1, state["step"], list(state["history"])
        if rank == 0:
            log.info("[%s] resuming from the checkpoint of epoch %d", STAGE, state["epoch"])
    pos_weight = torch.tensor(c["pos_weight"], device=device) if c["pos_weight"] else None
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    cache = c.get("cache")
    if cache:  # decoded once (_cache_splits): batches come from memory, no pipeline per epoch
        train_feed, val_feed = _CachedSplit(cache["train"]), _CachedSplit(cache["val"])
    else:
        train_shard = ray.train.get_dataset_shard("train")
        val_shard = ray.train.get_dataset_shard("val")
    train_collate, val_collate = _Collate(c["seed"], c["augment"]), _Collate(c["seed"], False)
    amp = dict(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    normalize = _Normalize(device)
    feed = dict(prefetch_batches=c["prefetch_batches"], pin_memory=device.type == "cuda")

    for epoch in range(start_epoch, c["epochs"] + 1):
        if c["fail_after_epoch"] is not None and epoch > c["fail_after_epoch"]:
            raise RuntimeError(f"injected failure after epoch {c['fail_after_epoch']}")
        t0, cpu0 = time.time(), time.process_time()
        train_collate.epoch = epoch
        model.train()
        # the loss is summed on the device: no host sync per step (only every log_every steps)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        seen, epoch_steps, t_log, seen_log = 0, 0, time.time(), 0
        if cache:
            batches = train_feed.batches(
                c["batch_size"], rank, world, train_collate, device,
                order_seed=derive_seed(c["seed"], STAGE, "order", epoch),
                drop_last=c["drop_last"], prefetch=c["prefetch_batches"])
        else:
            batches = train_shard.iter_torch_batches(
                batch_size=c["batch_size"], collate_fn=train_collate, drop_last=c["drop_last"],
                local_shuffle_buffer_size=c["shuffle_buffer"] or None,
                local_shuffle_seed=derive_seed(c["seed"], STAGE, "shuffle", epoch, rank),
                **feed)
        for batch in batches:
            x, y = batch["image"], batch["labels"]
            if "flip" in batch:
                x = _augment_on_device(x, batch["flip"], batch["shift"])
            x = normalize(x).contiguous(memory_format=torch.channels_last)  # no-op when it is
            with torch.autocast(**amp):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            epoch_steps += 1
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            if rank == 0 and epoch_steps % c["log_every"] == 0:
                now = time.time()
                log.info("[%s] epoch %d/%d step %d/%d loss %.4f %.1f img/s lr %.2e", STAGE,
                         epoch, c["epochs"], epoch_steps, c["steps_per_epoch"], float(loss),
                         (seen - seen_log) * world / (now - t_log), sched.get_last_lr()[0])
                t_log, seen_log = now, seen
            if c["max_steps_per_epoch"] and epoch_steps >= c["max_steps_per_epoch"]:
                break
        loss_sum = float(loss_sum)  # the epoch's one sync: queued GPU work is done before timing
        train_time = time.time() - t0
        if seen == 0:
            raise RuntimeError(f"epoch {epoch}: no training image could be decoded on worker "
                               f"{rank}; see the errors/ table")

        # validation: sums over every worker's shard, so all ranks report the same numbers
        model.eval()
        v_loss = torch.zeros((), dtype=torch.float64, device=device)
        v_correct = torch.zeros(n_attr, dtype=torch.float64, device=device)
        v_n = 0
        with torch.no_grad():
            if cache:
                batches = val_feed.batches(c["batch_size"], rank, world, val_collate, device,
                                           order_seed=None, drop_last=False,
                                           prefetch=c["prefetch_batches"])
            else:
                batches = val_shard.iter_torch_batches(batch_size=c["batch_size"],
                                                       collate_fn=val_collate, **feed)
            for batch in batches:
                x, y = normalize(batch["image"]), batch["labels"]
                with torch.autocast(**amp):
                    logits = model(x.contiguous(memory_format=torch.channels_last)).float()
                v_loss += loss_fn(logits, y).double() * len(y)
                v_n += len(y)
                v_correct += ((logits >= 0) == (y >= 0.5)).sum(0).double()
        v_loss, v_correct = float(v_loss), v_correct.cpu().numpy()
        sums = _all_sum([loss_sum, seen, train_time, v_loss, v_n, *v_correct], device)
        loss_sum, seen_all, _, v_loss, v_n = sums[:5]
        v_correct = np.array(sums[5:])
        row = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(seen_all, 1),
               "val_loss": v_loss / max(v_n, 1),
               SCORE: float((v_correct / max(v_n, 1)).mean()),
               "images_per_s": seen_all / max(train_time, 1e-9),
               "seconds": time.time() - t0}
        history.append(row)
        if rank == 0:
            log.info("[%s] epoch %d/%d done: train loss %.4f val loss %.4f val mean acc %.4f "
                     "%.1f img/s %.1f s (%.1f s CPU in this worker)", STAGE, epoch, c["epochs"],
                     row["train_loss"], row["val_loss"], row[SCORE], row["images_per_s"],
                     row["seconds"], time.process_time() - cpu0)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:  # one copy of the (replicated) state is enough
                net = model.module if hasattr(model, "module") else model
                torch.save({"model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                            "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                            "history": history}, os.path.join(tmp, CHECKPOINT_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(dict(row), checkpoint=checkpoint)
