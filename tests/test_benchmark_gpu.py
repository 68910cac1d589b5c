"""The GPU benchmark (`python -m jobs.benchmark gpu`): its whole code path on CPU at tiny sizes."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest

from pipeline.benchmarks import gpu
from tests.helpers import tiny_config


def test_resplit_by_identity_is_identity_disjoint_and_seeded():
    ident = np.repeat(np.arange(200), 3).astype(np.int32)
    m = pa.table({"image_id": np.arange(len(ident)), "split": ["train"] * len(ident),
                  "identity": ident})
    a, b = gpu._resplit_by_identity(m, 7), gpu._resplit_by_identity(m, 7)
    assert a.equals(b)
    by_person = {}
    for i, s in zip(a["identity"].to_pylist(), a["split"].to_pylist()):
        by_person.setdefault(i, set()).add(s)
    assert all(len(s) == 1 for s in by_person.values())  # nobody in two splits
    counts = {s: a["split"].to_pylist().count(s) for s in ("train", "val", "test")}
    assert counts["val"] > 0 and counts["test"] > 0 and counts["train"] > counts["val"] * 4


def test_sampler_window_summarises_only_its_window():
    s = gpu.GpuSampler(0.01)
    s.available = True
    s.samples = [(1.0, 10.0), (2.0, 50.0), (3.0, 90.0)]
    assert s.window(1.5, 3.0) == {"mean_pct": 70.0, "max_pct": 90.0, "samples": 2}
    assert s.window(5.0, 6.0)["samples"] == 0
    s.available = False
    assert s.window(0.0, 9.0) is None


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu_at_tiny_sizes(tmp_path, ray_session):
    import torch

    from pipeline.sample import make_sample

    make_sample(str(tmp_path / "faces"), 160, seed=0)
    cfg = tiny_config(tmp_path, "train.batch_size=8", "train.num_workers=1",
                      "train.cpus_per_worker=1", "extract.max_actors=1",
                      "extract.cpus_per_actor=1")
    t0 = time.time()
    out = gpu.run(cfg, images=160, data_root=str(tmp_path / "faces"), steps=2,
                  bare_seconds=0.5, sample_s=0.2)
    assert time.time() - t0 < 600
    assert out["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    whats = [(r["what"], r["precision"]) for r in out["rows"]]
    if out["device"] == "cpu":
        assert whats == [("train stage", "fp32"), ("bare training loop", "fp32"),
                         ("extract stage", "fp32"), ("bare extract models", "fp32")]
        assert all(r["gpu_util"] is None for r in out["rows"])
    assert all(r["images_per_s"] > 0 for r in out["rows"])
    assert out["images"] == 160 and 0 < out["train_images"] < 160  # re-split by identity
    p = out["projection_celeba"]
    train_ips = out["rows"][0]["images_per_s"]
    expect = cfg.train.epochs * 202599 * out["train_images"] / out["images"] / train_ips
    assert p["train_s"] == pytest.approx(expect, rel=1e-3)
    assert p["extract_s"] == pytest.approx(202599 / out["rows"][2]["images_per_s"], rel=1e-3)
    text = gpu.table(out)
    assert text.count("\n| ") == 1 + len(out["rows"]) and "projection to 202,599" in text
