"""`python -m jobs.benchmark train [--config FILE] [-- --epochs E --steps N --rows N
--threaded false]`

Training throughput of the train_attributes stage (Ray Train workers fed from images decoded once
into the object store, or by Ray Data decode tasks when they do not fit) against the plainest
PyTorch loop on the same machine: one process (a Ray worker, so that it runs at the same OS
priority as the stage's workers), a ``torch.utils.data.DataLoader`` with
``num_workers=0`` over the same image files, the same decoder, augmentation, model, loss,
optimizer and batch size, reshuffled every epoch.

Both run ``epochs`` epochs of ``steps`` optimizer steps (``steps`` 0 = whole epochs) over the same
``rows`` training images, from a cold start, so each side pays its own per-epoch costs (the plain
loop decodes every image every epoch; the stage, before the cache, restarted a Ray Data pipeline
every epoch). The loop's images/s counts from asking for the first batch to the end of the last
step. The stage's counts the training part of each epoch (its history table; the first epoch
includes waiting for the decodes still running when the workers start), summed over epochs; its
whole wall time (Ray Train start, validation, checkpoints, evaluation) is reported beside it.
The loop runs on as many torch threads as the stage's training workers hold CPUs (the same
compute budget; the stage gives the rest of the machine to decoding), right before and right after
the stage, and the mean of the two is the baseline (the load of a shared machine moves by several
x within minutes); then, unless ``--threaded false``, once more on all of torch's threads (the
same machine).
Needs the config's manifest (run ingest first).
"""

from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage, tables, train
from pipeline.config import Config
from pipeline.seeds import derive_seed

log = logging.getLogger(__name__)


def run(cfg: Config, steps: int = 0, epochs: int = 3, rows: int = 0, eval_rows: int = 64,
        threaded: bool = True) -> dict:
    import os

    import ray

    from pipeline.ray_runtime import ensure_ray, resolve_use_gpu

    manifest = tables.read(cfg, "manifest")
    if rows:  # the same first `rows` training images for both sides
        train_rows = manifest.filter(pc.equal(manifest["split"], "train")).slice(0, rows)
        others = manifest.filter(pc.not_equal(manifest["split"], "train"))
        manifest = pa.concat_tables([train_rows, others])
    attributes = train.resolve_attributes(cfg, manifest.schema)
    splits, _ = train.split_rows(manifest, attributes)
    ensure_ray(cfg)
    use_gpu = resolve_use_gpu(cfg, cfg.train.use_gpu)
    world = train.worker_count(cfg, use_gpu)  # "auto" resolved as the stage resolves it
    per_epoch = splits["train"].num_rows // world // cfg.train.batch_size
    if steps:
        per_epoch = min(per_epoch, steps)
    if per_epoch < 1:
        raise ValueError(f"the benchmark needs at least {cfg.train.batch_size * world} train "
                         f"images (batch {cfg.train.batch_size} x {world} worker(s)); the "
                         f"manifest has {splits['train'].num_rows}")
    load = os.getloadavg()
    # the loop on the stage's thread count runs right before and right after the stage and its
    # mean is the baseline: on a shared machine the load moves by several x within minutes
    all_threads = max(1, int(ray.cluster_resources().get("CPU", 1)))
    same = max(1, int(world * cfg.train.cpus_per_worker))

    def loop(threads: int) -> dict:
        # in a worker of the stage's Ray instance: the same niceness (Ray starts workers at
        # +15) and the same scheduler group (Linux autogroup: one per session, and each Ray
        # instance's raylet is its own) as the stage's training worker
        task = ray.remote(num_cpus=threads, num_gpus=1 if use_gpu else 0)(_loop_task)
        return ray.get(task.remote(cfg, splits["train"], attributes, per_epoch, use_gpu,
                                   epochs, threads))

    before = loop(same)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        stage = stage_throughput(cfg, manifest, per_epoch, eval_rows, tmp, epochs=epochs)
    after = loop(same)
    base_same = {"images_per_s": round((before["images_per_s"] + after["images_per_s"]) / 2, 2),
                 "before_stage": before, "after_stage": after, "torch_threads": same}
    ratio_same = stage["images_per_s"] / base_same["images_per_s"]
    base = loop(all_threads) if threaded else None  # --threaded false: skipped (time)
    ratio = stage["images_per_s"] / base["images_per_s"] if base else None
    load = [round(x, 1) for x in (*load, *os.getloadavg())]
    print(f"train: batch {cfg.train.batch_size}, {epochs} epoch(s) x {per_epoch} step(s) over "
          f"{splits['train'].num_rows} images: stage {stage['images_per_s']:.1f} img/s "
          f"({world} Ray Train worker(s), {cfg.train.cpus_per_worker:g} CPU each, feed "
          f"{stage['feed']}; per epoch {stage['epoch_images_per_s']})"
          + (f" vs plain DataLoader loop {base['images_per_s']:.1f} img/s "
             f"({base['torch_threads']} torch threads): ratio {ratio:.2f};" if base else "")
          + f" vs the plain loop on {same} thread(s) {base_same['images_per_s']:.1f} img/s: "
          f"ratio {ratio_same:.2f} (loop before / after the stage: {before['images_per_s']:.1f}"
          f" / {after['images_per_s']:.1f}); load average before {load[:3]}, after {load[3:]}",
          flush=True)
    return {"epochs": epochs, "steps_per_epoch": per_epoch, "train_images": splits["train"].num_rows,
            "batch_size": cfg.train.batch_size, "image_size": cfg.train.image_size,
            "stage": stage, "baseline": base, "ratio": round(ratio, 3) if base else None,
            "baseline_same_cpus": base_same, "ratio_same_cpus": round(ratio_same, 3),
            "load_average_before_after": load}


def stage_throughput(cfg: Config, manifest: pa.Table, steps: int, eval_rows: int, tmp: str,
                     epochs: int = 1) -> dict:
    """``epochs`` epochs of ``steps`` steps through the real stage, in a scratch output root
    (public: the GPU benchmark reuses it)."""
    data = cfg.model_dump(mode="json")
    data["output"]["root"] = tmp
    data["train"].update(epochs=epochs, max_steps_per_epoch=steps, tune_thresholds=False)
    bench_cfg = Config.model_validate(data)
    # all training rows, but only a few val/test rows: evaluation is not what is measured
    parts = [manifest.filter(pc.equal(manifest["split"], "train"))]
    for s in ("val", "test"):
        parts.append(manifest.filter(pc.equal(manifest["split"], s)).slice(0, eval_rows))
    tables.replace(bench_cfg, "manifest", pa.concat_tables(parts), schema=manifest.schema)
    t0 = time.time()
    result = train.run(bench_cfg)
    wall = time.time() - t0
    history = tables.read(bench_cfg, f"{train.MODEL_DIR}/history").to_pylist()
    storage.delete(tables.location(bench_cfg, train.RUNS_DIR))
    # each epoch's training images (all workers) from its step count; its training seconds from
    # the rate the stage recorded for it
    images, seconds, prev = 0, 0.0, 0
    for h in history:
        n = (h["step"] - prev) * bench_cfg.train.batch_size * result["num_workers"]
        images, seconds, prev = images + n, seconds + n / h["images_per_s"], h["step"]
    feed = "object-store cache" if _fits_cache(bench_cfg, manifest) else "Ray Data streaming"
    return {"images_per_s": round(images / seconds, 2), "wall_s": round(wall, 2),
            "epoch_images_per_s": [round(h["images_per_s"], 1) for h in history],
            "num_workers": result["num_workers"], "use_gpu": result["use_gpu"], "feed": feed}


def _loop_task(cfg: Config, rows: pa.Table, attributes: list[str], steps: int, use_gpu: bool,
               epochs: int, threads: int) -> dict:
    import os

    import torch

    torch.set_num_threads(threads)
    out = baseline_loop(cfg, rows, attributes, steps,
                        torch.device("cuda" if use_gpu else "cpu"), epochs=epochs)
    return {**out, "niceness": os.nice(0)}


def _fits_cache(cfg: Config, manifest: pa.Table) -> bool:
    """Whether the stage cached its decoded images (its log says so too); for the printout."""
    import ray

    t = cfg.train
    n = sum(manifest.filter(pc.equal(manifest["split"], s)).num_rows for s in ("train", "val"))
    need = n * t.image_size ** 2 * 3
    return need <= t.cache_decoded_mb * 2**20 and \
        need <= ray.cluster_resources().get("object_store_memory", 0) / 2


def baseline_loop(cfg: Config, rows: pa.Table, attributes: list[str], steps: int,
                  device=None, epochs: int = 1) -> dict:
    """The same work in one process: Dataset over the files, DataLoader(num_workers=0), the
    model on ``device`` (the stage's) with the stage's precision policy (``train.precision``);
    ``epochs`` passes of ``steps`` steps, reshuffled each. Public: the GPU benchmark reuses it."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from pipeline.images import decode_image
    from pipeline.models import build_attribute_model, normalize_images

    t = cfg.train
    labels = np.stack([rows[a].to_numpy(zero_copy_only=False) for a in attributes], 1) \
        .astype(np.float32)
    uris = rows["uri"].to_pylist()

    class Files(Dataset):
        def __len__(self):
            return len(uris)

        def __getitem__(self, i):
            data = storage.read_bytes(storage.filesystem(uris[i], cfg.storage))
            return np.array(decode_image(data, (t.image_size,))[0]), labels[i]  # writable

    gen = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "benchmark", "train"))
    loader = DataLoader(Files(), batch_size=t.batch_size, shuffle=True, num_workers=0,
                        drop_last=True, generator=gen)
    torch.manual_seed(derive_seed(cfg.run.seed, train.STAGE, "init"))
    device = device or torch.device("cpu")
    model = build_attribute_model(len(attributes), t.pretrained, cfg.storage) \
        .to(device, memory_format=torch.channels_last)
    amp_dtype, use_scaler = train.amp_policy(device, t.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(derive_seed(cfg.run.seed, "benchmark", "augment"))
    model.train()
    seen = 0
    t0 = time.time()
    def batches():  # `steps` batches per epoch; the loader reshuffles at each new iteration
        for _ in range(epochs):
            for i, batch in enumerate(loader):
                yield batch
                if i + 1 >= steps:
                    break  # stop before the loader decodes the next batch

    for images, y in batches():
        arr = images.numpy()
        if t.augment:
            arr = train.augment(arr, rng)
        x = normalize_images(torch.from_numpy(arr).to(device).permute(0, 3, 1, 2))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += len(y)
    float(loss.detach())  # wait for the device's queued work before stopping the clock
    seconds = time.time() - t0
    return {"images_per_s": round(seen / seconds, 2), "seconds": round(seconds, 2),
            "torch_threads": torch.get_num_threads(), "device": device.type}
