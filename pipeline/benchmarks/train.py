"""`python -m jobs.benchmark train [--config FILE] [-- --steps N --eval-rows N]`

Training throughput of the train_attributes stage (Ray Train workers fed by Ray Data decode
tasks) against the plainest PyTorch baseline on the same machine: one process, a
``torch.utils.data.DataLoader`` with ``num_workers=0`` over the same image files, the same decoder,
augmentation, model, loss, optimizer and batch size.

Both run ``steps`` optimizer steps from a cold start; images/s counts from asking for the first
batch to the end of the last step, so each side pays its own data-loading start-up (Ray Data's
pipeline start, the DataLoader's first reads). The stage's number is the one its history table
records; its whole wall time (Ray Train start, checkpoint, evaluation) is reported beside it.
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


def run(cfg: Config, steps: int = 20, eval_rows: int = 64) -> dict:
    import torch

    from pipeline.ray_runtime import ensure_ray, resolve_use_gpu

    manifest = tables.read(cfg, "manifest")
    attributes = train._resolve_attributes(cfg, manifest.schema)
    splits, _ = train._split_rows(manifest, attributes)
    ensure_ray(cfg)
    use_gpu = resolve_use_gpu(cfg, cfg.train.use_gpu)
    world = train._workers(cfg, use_gpu)  # "auto" resolved as the stage resolves it
    need = steps * cfg.train.batch_size * world
    if splits["train"].num_rows < need:
        raise ValueError(f"the benchmark needs {need} train images ({steps} steps x batch "
                         f"{cfg.train.batch_size} x {world} worker(s)); the "
                         f"manifest has {splits['train'].num_rows}: lower --steps")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        stage = stage_throughput(cfg, manifest, steps, eval_rows, tmp)
    # the baseline runs where the stage's workers run (a CPU baseline says nothing on a GPU node)
    device = torch.device("cuda" if use_gpu else "cpu")
    base = baseline_loop(cfg, splits["train"], attributes, steps, device)
    ratio = stage["images_per_s"] / base["images_per_s"]
    # A second baseline with as many torch threads as the stage's training workers hold CPUs:
    # the stage reserves the rest of the machine for Ray Data decoding, so this one compares
    # the same compute budget (the first compares the same machine).
    all_threads = torch.get_num_threads()
    same = max(1, int(world * cfg.train.cpus_per_worker))
    torch.set_num_threads(same)
    try:
        base_same = baseline_loop(cfg, splits["train"], attributes, steps, device)
    finally:
        torch.set_num_threads(all_threads)
    ratio_same = stage["images_per_s"] / base_same["images_per_s"]
    print(f"train: stage {stage['images_per_s']:.1f} img/s ({world} Ray Train "
          f"worker(s), {cfg.train.cpus_per_worker:g} CPU each) vs plain DataLoader loop "
          f"{base['images_per_s']:.1f} img/s ({base['torch_threads']} torch threads): "
          f"ratio {ratio:.2f}; vs the loop on {same} thread(s) {base_same['images_per_s']:.1f} "
          f"img/s: ratio {ratio_same:.2f}", flush=True)
    return {"steps": steps, "batch_size": cfg.train.batch_size,
            "image_size": cfg.train.image_size, "stage": stage, "baseline": base,
            "ratio": round(ratio, 3), "baseline_same_cpus": base_same,
            "ratio_same_cpus": round(ratio_same, 3)}


def stage_throughput(cfg: Config, manifest: pa.Table, steps: int, eval_rows: int, tmp: str) -> dict:
    """One epoch of ``steps`` steps through the real stage, in a scratch output root (public:
    the GPU benchmark reuses it)."""
    data = cfg.model_dump(mode="json")
    data["output"]["root"] = tmp
    data["train"].update(epochs=1, max_steps_per_epoch=steps, tune_thresholds=False)
    bench_cfg = Config.model_validate(data)
    # all training rows, but only a few val/test rows: evaluation is not what is measured
    parts = [manifest.filter(pc.equal(manifest["split"], "train"))]
    for s in ("val", "test"):
        parts.append(manifest.filter(pc.equal(manifest["split"], s)).slice(0, eval_rows))
    tables.replace(bench_cfg, "manifest", pa.concat_tables(parts), schema=manifest.schema)
    t0 = time.time()
    result = train.run(bench_cfg)
    wall = time.time() - t0
    storage.delete(tables.location(bench_cfg, train.RUNS_DIR))
    return {"images_per_s": round(result["images_per_s"], 2), "wall_s": round(wall, 2),
            "num_workers": result["num_workers"], "use_gpu": result["use_gpu"]}


def baseline_loop(cfg: Config, rows: pa.Table, attributes: list[str], steps: int,
              device=None) -> dict:
    """The same work in one process: Dataset over the files, DataLoader(num_workers=0), the
    model on ``device`` (the stage's) with the stage's precision policy (``train.precision``).
    Public: the GPU benchmark reuses it."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from pipeline.extract import decode_image
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
    amp_dtype, use_scaler = train._amp_policy(device, t.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(derive_seed(cfg.run.seed, "benchmark", "augment"))
    model.train()
    seen = 0
    t0 = time.time()
    for i, (images, y) in enumerate(loader):
        arr = images.numpy()
        if t.augment:
            arr = train._augment(arr, rng)
        x = normalize_images(torch.from_numpy(arr).to(device).permute(0, 3, 1, 2))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = loss_fn(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        seen += len(y)
        if i + 1 >= steps:
            break
    float(loss.detach())  # wait for the device's queued work before stopping the clock
    seconds = time.time() - t0
    return {"images_per_s": round(seen / seconds, 2), "seconds": round(seconds, 2),
            "torch_threads": torch.get_num_threads(), "device": device.type}
