"""`python -m jobs.benchmark gpu --config jobs/configs/celeba.toml [-- --images N --steps N]`

The GPU run in one command, on real faces (``--data-root``, default ``../shared/real/celeba``:
10,000 CelebA images). In one process it measures, on whatever device the config's stages get:

- train: the train_attributes stage (Ray Train, Ray Data decoding) and a bare training loop
  (one process, a DataLoader over the same files, same model, loss, optimizer and batch), each in
  bf16 autocast and in float32 on a GPU (``train.precision`` "auto" and "fp32"), float32 on CPU;
- extract: the extract stage end to end from the files and the bare models (both forward passes
  on pre-decoded tensors in an actor holding the inference actor's resources), images/s;
- GPU utilisation sampled every ``sample_s`` during each measurement (NVML through
  ``torch.cuda.utilization`` when pynvml is installed, else ``nvidia-smi``; null without a GPU);

then prints one table and the projection of the stages' rates to all 202,599 CelebA images
(``train.epochs`` passes over the train share of them, plus one extract pass).

It reuses the train and extract benchmarks' functions (``pipeline.benchmarks.train`` /
``extract``), so the numbers mean what theirs mean. Weights are random-init (``pretrained`` and
``embedding_weights`` = "none": same arithmetic, no download). The real images sit in one official
partition, so the benchmark re-splits them by identity (seeded, about 10 % of the rows to val
and 10 % to test) in its scratch manifest; outputs go to a temporary root, never the config's.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

CELEBA_IMAGES = 202599


class GpuSampler(threading.Thread):
    """Samples device-wide GPU utilisation (%, all processes) every ``interval_s`` seconds, with
    timestamps so a window of the run can be summarised. ``available`` is False without a GPU."""

    def __init__(self, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._read = self._reader()
        self.available = self._read is not None

    @staticmethod
    def _reader():
        try:
            import torch

            if not torch.cuda.is_available():
                return None
            try:
                torch.cuda.utilization(0)  # needs pynvml
                return lambda: float(torch.cuda.utilization(0))
            except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi instead
                pass
        except ImportError:
            return None
        if shutil.which("nvidia-smi") is None:
            return None

        def smi() -> float:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10, check=True)
            return float(out.stdout.strip().splitlines()[0])
        return smi

    def run(self) -> None:
        while self._read is not None and not self._halt.is_set():
            try:
                self.samples.append((time.perf_counter(), self._read()))
            except Exception as e:  # noqa: BLE001 - report, keep the measurement going
                log.warning("[gpu-bench] GPU utilisation sample failed: %s", e)
            self._halt.wait(self.interval_s)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def window(self, t0: float, t1: float) -> Optional[dict]:
        """Mean and max utilisation of the samples taken in [t0, t1]; None without a GPU."""
        if not self.available:
            return None
        vals = [u for t, u in self.samples if t0 <= t <= t1]
        if not vals:
            return {"mean_pct": None, "max_pct": None, "samples": 0}
        return {"mean_pct": round(float(np.mean(vals)), 1), "max_pct": round(max(vals), 1),
                "samples": len(vals)}


def _resplit_by_identity(manifest: pa.Table, seed: int) -> pa.Table:
    """Seeded identity-disjoint split: identities in a seeded order go to val until it holds
    10 % of the rows, then to test until 20 %, the rest to train (at least one identity each)."""
    ident = manifest["identity"].to_numpy(zero_copy_only=False)
    people, counts = np.unique(ident, return_counts=True)
    if len(people) < 3:
        raise ValueError(f"{len(people)} identities cannot make identity-disjoint "
                         "train/val/test splits: give the benchmark more images")
    order = np.random.default_rng(seed).permutation(len(people))
    before = np.cumsum(counts[order]) - counts[order]  # rows already assigned
    n = len(ident)
    where = np.where(before < 0.1 * n, 0, np.where(before < 0.2 * n, 1, 2))
    where[0], where[-1] = 0, 2
    if not (where == 1).any():
        where[1] = 1
    part = dict(zip(people[order].tolist(), where.tolist()))
    names = np.array(["val", "test", "train"])
    split = names[[part[i] for i in ident.tolist()]]
    col = manifest.schema.get_field_index("split")
    return manifest.set_column(col, manifest.schema.field(col), pa.array(split, pa.string()))


def run(cfg, images: int = 10000, data_root: str = "../shared/real/celeba", steps: int = 0,
        eval_rows: int = 64, bare_seconds: float = 20.0, sample_s: float = 0.5) -> dict:
    import torch

    from pipeline import ingest, tables, train
    from pipeline.benchmarks import extract as bench_extract
    from pipeline.benchmarks import train as bench_train
    from pipeline.ray_runtime import ensure_ray, resolve_use_gpu
    from pipeline.seeds import derive_seed

    tmp = Path(tempfile.mkdtemp(prefix="faceaudit-bench-gpu-"))
    bcfg = cfg.model_copy(deep=True)
    bcfg.output.root = str(tmp / "run")
    bcfg.data.root, bcfg.data.dataset, bcfg.data.limit = data_root, "celeba", int(images)
    bcfg.train.pretrained, bcfg.extract.embedding_weights = "none", "none"
    bcfg.train.tune_thresholds = False
    sampler = GpuSampler(sample_s)
    sampler.start()
    rows: list[dict] = []
    try:
        ingest.run(bcfg)
        man = _resplit_by_identity(tables.read(bcfg, "manifest"),
                                   derive_seed(cfg.run.seed, "benchmark", "gpu-split"))
        tables.replace(bcfg, "manifest", man, schema=man.schema)
        attributes = train.resolve_attributes(bcfg, man.schema)
        splits, _ = train.split_rows(man, attributes)
        ensure_ray(bcfg)
        use_gpu = resolve_use_gpu(bcfg, bcfg.train.use_gpu)
        world = train.worker_count(bcfg, use_gpu)
        n_train = splits["train"].num_rows
        per_step = bcfg.train.batch_size * world
        steps = int(steps) or n_train // per_step  # default: one epoch of the train split
        if steps < 1 or steps * per_step > n_train:
            raise ValueError(f"{steps} step(s) x batch {bcfg.train.batch_size} x {world} "
                             f"worker(s) do not fit the {n_train} train images of {images}")
        device = torch.device("cuda" if use_gpu else "cpu")
        bf16 = use_gpu and torch.cuda.is_bf16_supported()
        precisions = (["auto"] if use_gpu else []) + ["fp32"]
        train_ips = {}
        for p in precisions:
            pcfg = bcfg.model_copy(deep=True)
            pcfg.train.precision = p
            label = "fp32" if p == "fp32" else ("bf16" if bf16 else "fp16")
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=tmp) as stage_tmp:
                st = bench_train.stage_throughput(pcfg, man, steps, eval_rows, stage_tmp)
            t1 = time.perf_counter()
            rows.append({"what": "train stage", "precision": label,
                         "images_per_s": st["images_per_s"], "wall_s": st["wall_s"],
                         "gpu_util": sampler.window(t0, t1)})
            train_ips[label] = st["images_per_s"]
            base = bench_train.baseline_loop(pcfg, splits["train"], attributes, steps, device)
            t2 = time.perf_counter()
            rows.append({"what": "bare training loop", "precision": label,
                         "images_per_s": base["images_per_s"], "wall_s": base["seconds"],
                         "gpu_util": sampler.window(t1, t2)})
        # extract: its benchmark runs the stage first, then the bare models for bare_seconds
        t0 = time.perf_counter()
        ex = bench_extract.run(bcfg, bare_seconds=float(bare_seconds))
        t1 = time.perf_counter()
        amp = "bf16" if bf16 else ("fp16" if use_gpu else "fp32")
        rows.append({"what": "extract stage", "precision": amp,
                     "images_per_s": ex["b_pipeline_images_per_s"],
                     "wall_s": ex["b_pipeline_wall_s"],
                     "gpu_util": sampler.window(t0, t0 + ex["b_pipeline_wall_s"])})
        rows.append({"what": "bare extract models", "precision": amp,
                     "images_per_s": ex["a_bare_models_images_per_s"],
                     "wall_s": float(bare_seconds),
                     "gpu_util": sampler.window(t1 - float(bare_seconds), t1)})
    finally:
        sampler.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    # projection to all of CelebA: train.epochs over its train share, plus one extract pass
    train_share = n_train / man.num_rows
    best = train_ips.get("bf16") or train_ips.get("fp16") or train_ips["fp32"]
    train_s = bcfg.train.epochs * CELEBA_IMAGES * train_share / best
    extract_s = CELEBA_IMAGES / ex["b_pipeline_images_per_s"]
    projection = {"images": CELEBA_IMAGES, "train_epochs": bcfg.train.epochs,
                  "train_s": round(train_s, 1), "extract_s": round(extract_s, 1),
                  "train_plus_extract_min": round((train_s + extract_s) / 60, 1)}
    out = {"device": "cuda" if use_gpu else "cpu",
           "gpu_name": torch.cuda.get_device_name(0) if use_gpu else None,
           "images": man.num_rows, "train_images": n_train, "steps": steps,
           "train": {"batch_size": bcfg.train.batch_size, "image_size": bcfg.train.image_size,
                     "arch": bcfg.train.arch, "workers": world},
           "extract": {"embedding": ex["embedding"], "attribute_model": ex["attribute_model"],
                       "batch_size": bcfg.extract.batch_size},
           "gpu_util_source": "NVML / nvidia-smi (device-wide)" if sampler.available else None,
           "rows": rows, "projection_celeba": projection}
    print(table(out), flush=True)
    return out


def table(out: dict) -> str:
    """The benchmark's one table (Markdown), then the projection line."""
    def util(u):
        if u is None:
            return "n/a (no GPU)"
        return "-" if u["mean_pct"] is None else f"{u['mean_pct']:.0f} % (max {u['max_pct']:.0f})"
    lines = [f"GPU benchmark on {out['device']}"
             + (f" ({out['gpu_name']})" if out["gpu_name"] else "")
             + f": {out['images']} real faces, train {out['train']['arch']} @ "
             f"{out['train']['image_size']} px batch {out['train']['batch_size']}; extract "
             f"{out['extract']['embedding']} + {out['extract']['attribute_model']}",
             "", "| measurement | precision | images/s | wall s | GPU utilisation |",
             "|---|---|---:|---:|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['what']} | {r['precision']} | {r['images_per_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {util(r['gpu_util'])} |")
    p = out["projection_celeba"]
    lines += ["", f"projection to {p['images']:,} images: train {p['train_epochs']} epoch(s) "
              f"{p['train_s'] / 60:.1f} min + extract {p['extract_s'] / 60:.1f} min = "
              f"{p['train_plus_extract_min']} min"]
    return "\n".join(lines)
