"""Resource checks: per-node packing, "auto" sizes, bounded waits, the autoscaler request, and
the GPU start-up check (its failure path runs on CPU)."""

from __future__ import annotations

import time

import pytest

from pipeline import resources
from pipeline.config import load_config
from pipeline.resources import GPUStartupError, ResourceError, ensure_fits, fit_count, unplaced

ONE_GPU_NODE = [{"CPU": 16, "GPU": 1}]


def test_packing_is_per_node_not_total():
    two_half_nodes = [{"CPU": 2, "GPU": 0}, {"CPU": 2, "GPU": 0}]
    # 4 CPUs in total, but no node holds a 3-CPU bundle
    assert unplaced([{"CPU": 3}], two_half_nodes) == [{"CPU": 3}]
    assert unplaced([{"CPU": 2}, {"CPU": 2}], two_half_nodes) == []
    # celeba.toml's 4 x {CPU 4, GPU 1} on a 1-GPU node: three bundles cannot be placed
    assert len(unplaced([{"CPU": 4, "GPU": 1}] * 4, ONE_GPU_NODE)) == 3
    assert fit_count({"CPU": 4, "GPU": 1}, ONE_GPU_NODE) == 1
    assert fit_count({"CPU": 4, "GPU": 1}, [{"CPU": 16, "GPU": 8}]) == 4  # CPU-bound
    assert fit_count({"CPU": 1, "GPU": 0}, [{"CPU": 2}], reserve={"CPU": 0.5}) == 1
    assert fit_count({"CPU": 0.5, "GPU": 0.5}, [{"CPU": 16, "GPU": 2}]) == 4


def test_in_process_ray_fails_at_once_naming_request_and_nodes():
    cfg = load_config(None, ["ray.resource_wait_s=60"])
    t0 = time.monotonic()
    with pytest.raises(ResourceError) as err:
        ensure_fits(cfg, "train_attributes: 4 worker(s)", [{"CPU": 4, "GPU": 1}] * 4,
                    "lower train.num_workers", nodes_fn=lambda: ONE_GPU_NODE)
    assert time.monotonic() - t0 < 1  # no address: nothing can join, so no wait
    msg = str(err.value)
    assert "4 x {CPU: 4, GPU: 1}" in msg and "{CPU: 16, GPU: 1}" in msg
    assert "3 x {CPU: 4, GPU: 1} cannot be placed" in msg and "lower train.num_workers" in msg


def test_remote_cluster_waits_bounded_then_fails(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    cfg = load_config(None, ["ray.resource_wait_s=0.6"])
    calls = []
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"after waiting 1 s \(ray.resource_wait_s\)"):
        ensure_fits(cfg, "extract", [{"CPU": 4}], "x",
                    nodes_fn=lambda: calls.append(1) or [{"CPU": 2}], poll_s=0.1)
    assert 0.5 < time.monotonic() - t0 < 3 and len(calls) > 2


def test_autoscaling_cluster_asks_the_autoscaler_and_waits_for_nodes(monkeypatch, caplog):
    asked = []
    import ray.autoscaler.sdk as sdk

    monkeypatch.setattr(sdk, "request_resources", lambda bundles=None, **_: asked.append(bundles))
    cfg = load_config(None, ["ray.autoscaling=true", "ray.resource_wait_s=10"])
    arrived = time.monotonic() + 0.3
    nodes = lambda: [{"CPU": 2}] + ([{"CPU": 8, "GPU": 1}] if time.monotonic() > arrived else [])
    with caplog.at_level("INFO", logger="pipeline.resources"):
        got = ensure_fits(cfg, "extract", [{"CPU": 4, "GPU": 1}], "x", nodes_fn=nodes,
                          poll_s=0.05)
    assert len(got) == 2
    assert asked[0] == [{"CPU": 4, "GPU": 1}] and asked[-1] == []  # asked, then withdrawn
    assert "asked the autoscaler" in caplog.text


def test_autoscaling_lets_an_explicit_gpu_request_through(ray_session):
    from pipeline.ray_runtime import resolve_use_gpu

    cfg = load_config(None, ["ray.autoscaling=true"])
    assert resolve_use_gpu(cfg, "true") is True  # GPUs may come from the autoscaler
    assert resolve_use_gpu(cfg, "auto") is False


def test_auto_sizes_fit_the_session_cluster(ray_session, tmp_path):
    """On the 2-CPU test Ray: auto sizes resolve to what fits; too much fails within seconds."""
    from pipeline import extract, train

    cfg = load_config(None, ["extract.min_actors=auto", "extract.max_actors=auto",
                             "extract.cpus_per_actor=1", "extract.cpus_per_decode_task=0.5"])
    assert extract._check_resources(cfg, 0.0) == (1, 1)
    cfg = load_config(None, ["train.num_workers=auto", "train.cpus_per_worker=0.5"])
    assert train.worker_count(cfg, False) == 1  # one per node on CPU
    cfg = load_config(None, ["train.num_workers=4", "train.cpus_per_worker=1"])
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"4 worker.*4 x \{CPU: 1\}.*\{CPU: 2, GPU: 0\}"):
        train.worker_count(cfg, False)
    assert time.monotonic() - t0 < 5
    cfg = load_config(None, ["extract.min_actors=3", "extract.max_actors=3"])
    with pytest.raises(ResourceError, match="extract: 3 inference actor"):
        extract._check_resources(cfg, 0.0)


def test_gpu_startup_check_names_build_and_driver(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(resources, "driver_version", lambda: "535.104.05")
    with pytest.raises(GPUStartupError) as err:
        resources.check_cuda("extract inference actor")
    msg = str(err.value)
    assert "extract inference actor" in msg and "is_available() is False" in msg
    assert f"torch {torch.__version__}" in msg and "driver 535.104.05" in msg
    assert f"needs NVIDIA driver >= {resources.min_driver(torch.version.cuda)}" in msg


def test_min_driver_table():
    assert resources.min_driver("12.8") == "525.60.13"
    assert resources.min_driver("13.0") == "580.65.06"
    assert "CPU build" in resources.min_driver(None)
