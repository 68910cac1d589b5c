"""`python -m jobs.benchmark extract [--images N] [--memory true]`: is I/O hidden behind inference?

Measures on the same machine, in one run:

(a) bare model throughput: both models' forward passes on pre-decoded, pre-normalised tensors in
    a loop, inside a Ray actor with exactly the inference actor's resources (same torch threads,
    or the same GPU) -- the ceiling the pipeline can reach; measured before and after (b) (with
    ``--bare-before false`` only after), each once the machine is quiet, the mean is the baseline;
(b) the extract pipeline end to end from image files (read, decode, both models, Parquet commits),
    images/s over the stage's wall time, and the steady-state rate after the first shard
    (excluding the actor's start-up and model loading).

It prints both and the ratio (b)/(a); the goal is >= 0.9. With ``--memory true`` it also samples
the proportional set size (PSS: shared pages split among the processes sharing them) of the driver
plus every Ray process it started, and reports the peak, to check that memory does not grow with
the number of images.

Data: ``--images N`` draws N synthetic CelebA-format faces (pipeline.sample) and ingests them;
without it the config's existing manifest is used. Outputs go to a temporary root, never to the
config's; the config's trained attribute model is used when it exists, else a random-init one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.benchmarks import headline, wait_until_quiet
from pipeline.benchmarks.memory import MemorySampler

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- bare models

def _bare_throughput(cfg, use_gpu: bool, threads: int, batch, seconds: float) -> dict:
    """Inside an actor: both models on one pre-decoded batch, repeated for ``seconds``."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.extract import AttributeInfer

    inf = AttributeInfer(cfg, use_gpu, threads)
    good = np.flatnonzero(pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False))
    xa, xe = inf.inputs(batch, good)  # decoded + normalised once, outside the timed loop
    inf.forward(xa, xe)  # warm-up (oneDNN / cuDNN kernel selection)
    if use_gpu:
        inf.torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n == 0:
        inf.forward(xa, xe)  # .cpu().numpy() inside synchronises on GPU
        n += len(good)
    return {"images_per_s": n / (time.perf_counter() - t0), "batch": len(good),
            "threads": inf.torch.get_num_threads()}


# --------------------------------------------------------------------------- entry

def run(cfg, images: int = 0, memory: bool = False, bare_seconds: float = 20.0,
        keep: bool = False, bare_before: bool = True) -> dict:
    import numpy as np
    import pyarrow as pa
    import ray

    from pipeline import extract, storage, tables
    from pipeline.models import AttributeModelInfo
    from pipeline.ray_runtime import ensure_ray

    tmp = Path(tempfile.mkdtemp(prefix="faceaudit-bench-extract-"))
    # a copy of the config pointed at the temporary root (sections validate assignments)
    bcfg = cfg.model_copy(deep=True)
    bcfg.output.root = str(tmp / "run")
    try:
        if images:
            from pipeline import ingest
            from pipeline.sample import make_sample

            t = time.perf_counter()
            make_sample(str(tmp / "data"), int(images), cfg.run.seed,
                        workers=max(1, min(4, os.cpu_count() or 1)))
            bcfg.data.root, bcfg.data.dataset, bcfg.data.limit = str(tmp / "data"), "celeba", 0
            ingest.run(bcfg)
            log.info("[bench] %d synthetic images written and ingested in %.1f s", images,
                     time.perf_counter() - t)
        else:
            man = tables.read(cfg, "manifest")
            tables.replace(bcfg, "manifest", man, schema=man.schema)
        attr_source = place_attribute_model(cfg, bcfg)
        dst = tables.location(bcfg, "models/attributes")

        ensure_ray(bcfg)
        n_images = tables.read(bcfg, "manifest", columns=["image_id"]).num_rows
        e = bcfg.extract

        # (a) the bare models, in an actor with the inference actor's resources, measured
        # before and after (b): this machine's speed drifts by 10-20 % over minutes (shared
        # host), so one measurement on one side of the pipeline biases the ratio
        gpus = extract.gpus_per_actor(bcfg)
        threads = max(1, int(round(e.cpus_per_actor)))
        man = tables.read(bcfg, "manifest", columns=["image_id", "uri"]).sort_by("image_id")
        sample = man.slice(0, e.batch_size)
        sample = sample.append_column("shard", pa.array(np.zeros(sample.num_rows, np.int32)))
        info = AttributeModelInfo.from_json(
            storage.read_bytes(dst.join("model.json")).decode())
        emb_size = info.image_size if e.embedding == "attribute_backbone" \
            else e.embedding_image_size
        sizes = tuple(sorted({int(info.image_size), int(emb_size)}))
        batch = extract.decode_block(sample, storage_cfg=bcfg.storage, sizes=sizes,
                                     min_side=e.min_image_side, read_threads=e.read_threads)
        bare_fn = ray.remote(num_cpus=e.cpus_per_actor, num_gpus=gpus)(_bare_throughput)

        def bare_once() -> dict:
            return ray.get(bare_fn.remote(bcfg, gpus > 0, threads, batch, float(bare_seconds)))

        quiet_s = [wait_until_quiet()] if bare_before else []
        bare_runs = [bare_once()] if bare_before else []

        # (b) the pipeline, end to end from files
        sampler = MemorySampler() if memory else None
        if sampler:
            sampler.start()
        t0 = time.perf_counter()
        result = extract.run(bcfg)
        wall = time.perf_counter() - t0
        if sampler:
            sampler.stop()
        first_commit = _first_commit_time(bcfg, t0)
        quiet_s.append(wait_until_quiet())  # the pipeline's workers wind down
        bare_runs.append(bare_once())
        bare = {"images_per_s": sum(r["images_per_s"] for r in bare_runs) / len(bare_runs),
                "threads": bare_runs[-1]["threads"]}

        e2e = n_images / wall
        steady = None
        if first_commit is not None and result["shards"] > 1:
            done_after_first = n_images - min(n_images, e.rows_per_file)
            steady = done_after_first / max(1e-9, wall - first_commit)
        out = {
            "images": n_images,
            "device": result["device"],
            "embedding": f"{e.embedding} ({e.embedding_weights}) @ {emb_size}px",
            "attribute_model": f"{info.arch} @ {info.image_size}px, {attr_source}",
            "batch_size": e.batch_size,
            "actor": {"cpus": e.cpus_per_actor, "gpus": gpus, "torch_threads": bare["threads"]},
            "ray_cpus": ray.cluster_resources().get("CPU", 0.0),
            "a_bare_models_images_per_s": round(bare["images_per_s"], 1),
            "a_bare_runs_images_per_s": [round(r["images_per_s"], 1) for r in bare_runs],
            "waited_for_quiet_s": quiet_s,
            "b_pipeline_images_per_s": round(e2e, 1),
            "b_pipeline_wall_s": round(wall, 1),
            "ratio_b_over_a": round(e2e / bare["images_per_s"], 3),
            "error_rows": result["error_rows"],
        }
        if steady is not None:
            out["b_steady_images_per_s_after_first_shard"] = round(steady, 1)
            out["ratio_steady_over_a"] = round(steady / bare["images_per_s"], 3)
        if result["device"] == "cuda":
            out["projected_celeba_202599_s"] = round(202599 / e2e, 1)
        if sampler:
            out["peak_pss_driver_mib"] = round(sampler.peak_driver / 2**20, 1)
            out["peak_pss_driver_plus_ray_mib"] = round(sampler.peak_total / 2**20, 1)
            out["peak_anon_pss_driver_plus_ray_mib"] = round(sampler.peak_anon / 2**20, 1)
        return headline(out, ("a_bare_models_images_per_s", "b_pipeline_images_per_s",
                              "ratio_b_over_a"))
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def place_attribute_model(cfg, bcfg, random_init: bool = False) -> str:
    """Put an attribute model under the benchmark's root ``bcfg``: the config's trained one when
    it exists (and ``random_init`` is off), else a seeded random-init MobileNetV2 for the
    manifest's attributes. Returns where it came from, for the benchmark's output."""
    import pyarrow as pa

    from pipeline import storage, tables
    from pipeline.models import AttributeModelInfo, build_attribute_model, export_attribute_model

    src = tables.location(cfg, "models/attributes")
    dst = tables.location(bcfg, "models/attributes")
    if not random_init and storage.exists(src.join("model.json")):
        for name in ("model.pt", "model.json"):
            storage.write_bytes(dst.join(name), storage.read_bytes(src.join(name)))
        return src.uri
    import torch

    torch.manual_seed(cfg.run.seed)
    attrs = [f.name for f in tables.read(bcfg, "manifest").schema if pa.types.is_boolean(f.type)]
    export_attribute_model(
        build_attribute_model(len(attrs)),
        AttributeModelInfo(arch="mobilenet_v2", attributes=attrs, image_size=cfg.train.image_size,
                           version="random-init"), dst)
    return "random-init (no trained model under the config's output root)"


def _first_commit_time(cfg, t0: float) -> float | None:
    """Seconds from ``t0`` (perf_counter) until the first features file appeared."""
    from pipeline import storage, tables

    files = storage.list_files(tables.location(cfg, "features"))
    if not files:
        return None
    first = min(f.mtime.timestamp() for f in files if f.mtime is not None)
    now_wall, now_perf = time.time(), time.perf_counter()
    return first - (now_wall - (now_perf - t0))
