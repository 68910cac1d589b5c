"""Stage train_attributes: a tiny Ray Train run end to end, two workers (gloo) on S3, resume after
a killed run, bad input refused before any work, and the metric helpers on fixed arrays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from pipeline import storage, tables
from pipeline.models import load_attribute_model
from pipeline.ray_runtime import NoGPUError
from pipeline.schemas import manifest_schema
from tests.conftest import s3_overrides
from tests.helpers import tiny_config, write_tiny_manifest

from pipeline import train  # noqa: E402  (after the helpers: same import order as the stage)

N_IMAGES = 40  # 24 train / 8 val / 8 test (write_tiny_manifest's 60/20/20 split)


def _model_dir(cfg) -> storage.Location:
    return tables.location(cfg, train.MODEL_DIR)


def _checkpoints(cfg) -> list[str]:
    runs = tables.location(cfg, train.RUNS_DIR)
    return sorted(i.path.rsplit("/", 2)[-2] for i in storage.list_files(runs)
                  if i.path.endswith("/" + train.CHECKPOINT_FILE))


# ---------------------------------------------------------------- end to end (Ray Train)

@pytest.mark.slow
def test_tiny_run_exports_a_loadable_model_metrics_history_and_errors(tmp_path, ray_session):
    from pipeline.run import run_stage

    cfg = tiny_config(tmp_path, "train.attributes=[\"Male\", \"Smiling\", \"Eyeglasses\"]",
                      "train.tune_thresholds=true")
    manifest = write_tiny_manifest(cfg, N_IMAGES)
    broken = manifest.filter(pc.equal(manifest["split"], "train"))["uri"][0].as_py()
    Path(broken).write_bytes(b"not a jpeg at all")

    result = run_stage(cfg, "train_attributes")
    assert result["train_rows"] == 24 and result["errors"] == 1 and result["epochs"] == 1

    model, info = load_attribute_model(_model_dir(cfg))
    assert info.attributes == ["Male", "Smiling", "Eyeglasses"] and info.image_size == 32
    assert len(info.thresholds) == 3 and all(0 <= t <= 1 for t in info.thresholds)
    state = torch.load(io.BytesIO(storage.read_bytes(_model_dir(cfg).join("model.pt"))),
                       weights_only=True)
    assert set(state) == set(model.state_dict())
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)

    metrics = tables.read(cfg, f"{train.MODEL_DIR}/metrics")
    assert metrics.schema.remove_metadata() == train.METRICS_SCHEMA
    assert metrics["attribute"].to_pylist() == ["Male", "Smiling", "Eyeglasses", train.MEAN_ROW]
    assert metrics["n"].to_pylist() == [8] * 4
    acc = metrics["accuracy"].to_pylist()
    assert all(0 <= a <= 1 for a in acc) and acc[-1] == pytest.approx(np.mean(acc[:3]))
    history = tables.read(cfg, f"{train.MODEL_DIR}/history")
    assert history.schema.remove_metadata() == train.HISTORY_SCHEMA
    assert history["epoch"].to_pylist() == [1] and history["images_per_s"][0].as_py() > 0

    errors = tables.read_errors(cfg, "train_attributes")
    assert errors["uri"].to_pylist() == [broken]
    # the one decoder's reason (pipeline.images), the same extract gives for this file
    assert errors["reason"][0].as_py() == "not an image (unknown or corrupt format)"

    assert run_stage(cfg, "train_attributes") == {"skipped": True}  # complete: not redone


@pytest.mark.slow
@pytest.mark.s3
def test_two_cpu_workers_with_gloo_on_s3_storage(tmp_path, ray_session, s3_server, s3_bucket):
    cfg = tiny_config(tmp_path, f"output.root=s3://{s3_bucket}/run", *s3_overrides(s3_server),
                      "train.num_workers=2", "train.cpus_per_worker=0.5",
                      "train.attributes=[\"Male\", \"Smiling\"]", "train.batch_size=8")
    write_tiny_manifest(cfg, N_IMAGES)

    result = train.run(cfg)
    assert result["num_workers"] == 2 and result["use_gpu"] is False
    history = tables.read(cfg, f"{train.MODEL_DIR}/history")
    # 24 train rows split equally over 2 workers: 12 each, one full batch of 8 per worker
    assert history["step"].to_pylist() == [1]
    _, info = load_attribute_model(_model_dir(cfg))
    assert info.attributes == ["Male", "Smiling"]
    assert len(_checkpoints(cfg)) == 1  # the checkpoint went to S3 through Ray Train


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(tmp_path, ray_session):
    from ray.train import Result

    # streamed through Ray Data (no object-store cache): the path splits too big to cache take
    cfg = tiny_config(tmp_path, "train.epochs=2", "train.attributes=[\"Male\", \"Eyeglasses\"]",
                      "train.cache_decoded_mb=0")
    write_tiny_manifest(cfg, N_IMAGES)

    with pytest.raises(Exception, match="injected failure after epoch 1"):
        train._run(cfg, fail_after_epoch=1)
    first = _checkpoints(cfg)
    assert len(first) == 1
    run_dir = tables.location(cfg, train.RUNS_DIR)
    (name,) = {i.path.rsplit("/", 3)[-3] for i in storage.list_files(run_dir)
               if i.path.endswith(train.CHECKPOINT_FILE)}
    epoch1 = Result.from_path(run_dir.join(name).path).metrics
    assert epoch1["epoch"] == 1

    result = train.run(cfg)  # same config, same storage: picks up after epoch 1
    assert result["resumed_from_epoch"] == 1 and result["epochs"] == 2
    history = tables.read(cfg, f"{train.MODEL_DIR}/history").to_pylist()
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1]["step"] == 2 * history[0]["step"]  # the step counter went on
    # epoch 1 was not trained again: its row is the killed run's, timing included
    assert history[0]["seconds"] == pytest.approx(epoch1["seconds"])
    assert history[0]["train_loss"] == pytest.approx(epoch1["train_loss"])
    assert set(first) < set(_checkpoints(cfg))  # epoch 1's checkpoint kept, epoch 2's added


def test_cached_split_gives_every_rank_an_equal_disjoint_reshuffled_share(ray_session):
    # 3 blocks of 7, 0 (all images dropped by decoding) and 6 rows; pixel value = row number
    sizes, blocks, row = [7, 0, 6], [], 0
    for n in sizes:
        ids = np.array([f"{i:03d}.jpg" for i in range(row, row + n)], dtype=object)
        images = np.arange(row, row + n, dtype=np.uint8)[:, None, None, None] \
            * np.ones((1, 4, 4, 3), np.uint8)
        labels = np.arange(row, row + n, dtype=np.float32)[:, None]
        blocks.append(ray_session.put({"image_id": ids, "image": images, "labels": labels}))
        row += n
    collate, cpu = train._Collate(0, augment=False), torch.device("cpu")

    def epoch(seed, rank, world=2, **kw):
        out = list(train._CachedSplit(blocks).batches(4, rank, world, collate, cpu,
                                                      order_seed=seed, prefetch=2, **kw))
        for b in out:  # image, label and id stay together; images arrive NCHW
            assert b["image"].shape[1:] == (3, 4, 4)
            assert torch.equal(b["image"][:, 0, 0, 0].float(), b["labels"][:, 0])
        return [int(v) for b in out for v in b["labels"][:, 0]], [len(b["labels"]) for b in out]

    r0, n0 = epoch(1, 0, drop_last=False)
    r1, n1 = epoch(1, 1, drop_last=False)
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 6  # 13 rows: one left out
    assert n0 == n1 == [4, 2]
    assert epoch(2, 0, drop_last=False)[0] != r0  # another epoch, another order
    assert epoch(1, 0, drop_last=False)[0] == r0  # the same seed, the same order
    assert epoch(1, 0, drop_last=True)[1] == [4]  # the short last batch dropped
    assert epoch(None, 0, world=1, drop_last=False)[0] == list(range(13))  # val: file order


# ---------------------------------------------------------------- bad input, before any work

def _assert_no_work(cfg):
    assert not storage.exists(_model_dir(cfg))


def test_attribute_missing_from_manifest_is_refused(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, "train.attributes=[\"Male\", \"Has_Wings\"]")
    write_tiny_manifest(cfg, 10)
    with pytest.raises(train.TrainInputError, match="Has_Wings"):
        train.run(cfg)
    _assert_no_work(cfg)


def test_empty_train_split_is_refused(tmp_path, ray_session):
    cfg = tiny_config(tmp_path)
    m = write_tiny_manifest(cfg, 10)
    m = m.set_column(m.schema.get_field_index("split"), "split",
                     pa.array(["val"] * 5 + ["test"] * 5))
    tables.replace(cfg, "manifest", m, schema=manifest_schema())
    with pytest.raises(train.TrainInputError, match="'train' split is empty"):
        train.run(cfg)
    _assert_no_work(cfg)


def test_gpu_requested_without_gpu_is_refused(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, "train.use_gpu=true", "ray.allow_cpu_fallback=false")
    write_tiny_manifest(cfg, 10)
    with pytest.raises(NoGPUError, match="no GPU"):
        train.run(cfg)
    _assert_no_work(cfg)


def test_more_workers_than_the_nodes_hold_fails_fast_naming_both(tmp_path, ray_session):
    """issue 21's reproduction: 4 workers on a 2-CPU Ray used to retry forever."""
    import time

    from pipeline.resources import ResourceError

    cfg = tiny_config(tmp_path, "train.num_workers=4", "train.cpus_per_worker=1")
    write_tiny_manifest(cfg, 10)
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"4 x \{CPU: 1\}.*nodes hold \{CPU: 2, GPU: 0\}"):
        train.run(cfg)
    assert time.monotonic() - t0 < 60
    _assert_no_work(cfg)


# ---------------------------------------------------------------- helpers on fixed arrays

def test_metrics_against_hand_computed_values():
    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=bool)
    p = np.array([[0.9, 0.1], [0.4, 0.7], [0.2, 0.2], [0.6, 0.3]])
    t = train._test_metrics(["A", "B"], y, p, np.array([0.5, 0.5]))
    a, b, mean = t.to_pylist()
    assert a["accuracy"] == 0.5 and a["majority_baseline"] == 0.5
    assert a["balanced_accuracy"] == 0.5 and a["f1"] == 0.5 and a["roc_auc"] == 0.75
    assert a["predicted_positive_rate"] == 0.5 and a["true_positive_rate"] == 0.5
    assert b["accuracy"] == 0.75 and b["majority_baseline"] == 1.0  # all negative on test
    assert b["roc_auc"] is None  # one class only on test
    assert mean["attribute"] == train.MEAN_ROW and mean["accuracy"] == 0.625
    assert mean["roc_auc"] == 0.75  # mean over the attributes where it is defined
    assert t.schema == train.METRICS_SCHEMA


def test_thresholds_tuned_for_val_accuracy():
    from pipeline.thresholds import tune_thresholds

    y = np.array([[1], [1], [0], [0]], dtype=bool)
    p = np.array([[0.35], [0.30], [0.20], [0.10]])  # separable at 0.25, not at 0.5
    (thr,) = tune_thresholds(y, p)
    assert 0.20 < thr <= 0.30
    assert tune_thresholds(y, np.array([[0.9], [0.8], [0.2], [0.1]]))[0] == 0.5


def test_augmentation_is_seeded_and_keeps_shape():
    imgs = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    a = train.augment(imgs, np.random.default_rng(1))
    b = train.augment(imgs, np.random.default_rng(1))
    assert a.shape == imgs.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, imgs)


def _reference_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The CPU augmentation the stage had before it moved to the device (issue 21)."""
    n, h, w, _ = images.shape
    out = images.copy()
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    pad = max(1, h // 16)
    padded = np.pad(out, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    return out


def test_device_augmentation_equals_the_cpu_reference_pixel_for_pixel():
    imgs = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    for seed in range(3):
        ref = _reference_augment(imgs, np.random.default_rng(seed))
        assert np.array_equal(train.augment(imgs, np.random.default_rng(seed)), ref)
    # on a channels_last uint8 NCHW batch, as the training loop has it, the layout is kept
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    flip, shift = train._augment_params(16, 32, np.random.default_rng(0))
    out = train._augment_on_device(x, torch.from_numpy(flip), torch.from_numpy(shift))
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_cached_normalisation_and_precision_policy_on_cpu():
    from pipeline.models import normalize_images

    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3),
                                                           dtype=np.uint8)).permute(0, 3, 1, 2)
    norm = train._Normalize(torch.device("cpu"))
    assert torch.allclose(norm(x), normalize_images(x), atol=1e-5)
    assert norm(x).is_contiguous(memory_format=torch.channels_last)
    assert train.amp_policy(torch.device("cpu")) == (None, False)


def test_gpu_resume_of_a_checkpoint_without_scaler_state():
    """A CPU or bf16 run saves an empty scaler state; an fp16 run resuming it must not raise."""
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        scaler.load_state_dict({})  # what the stage did before
    train._restore_scaler(scaler, {"scaler": {}})
    donor = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0)
    train._restore_scaler(scaler, {"scaler": donor.state_dict()})
    assert scaler.get_scale() == 8.0


def test_device_is_part_of_the_run_identity_and_decode_threads_match_cpus():
    assert train._run_fingerprint("abc", True) != train._run_fingerprint("abc", False)
    assert [train._decode_threads(c) for c in (0.25, 1.0, 2.5, 4.0)] == [1, 1, 2, 4]


def test_benchmark_baseline_runs_on_the_device_it_is_given(tmp_path):
    from pipeline.benchmarks import train as bench

    cfg = tiny_config(tmp_path, "train.batch_size=4")
    m = write_tiny_manifest(cfg, 8)
    res = bench.baseline_loop(cfg, m, ["Male", "Smiling"], steps=1, device=torch.device("cpu"))
    assert res["device"] == "cpu" and res["images_per_s"] > 0
    with pytest.raises((RuntimeError, AssertionError, ValueError)):
        bench.baseline_loop(cfg, m, ["Male"], steps=1, device=torch.device("meta"))
