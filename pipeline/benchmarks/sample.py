"""Sample generator benchmark: images/s of the synthetic face generator, labels/s.

`python -m jobs.benchmark sample [-- --n 1000 --workers 1 --fmt celeba]`

Draws ``n`` images into a temporary folder (JPEG encoding and file writes included) and samples
202,599 label rows without pictures. The baseline figure the issue asks for is 20,000 images in
"a few minutes" on one core, i.e. >= ~100 images/s.
"""

from __future__ import annotations

import tempfile
import time

from pipeline.config import Config
from pipeline.sample import make_sample, sample_labels


def run(cfg: Config, n: int = 1000, workers: int = 1, fmt: str = "celeba", seed: int = 0) -> dict:
    t0 = time.perf_counter()
    sample_labels(202599, seed)
    t_labels = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as tmp:
        c0 = time.process_time()  # this process only: meaningful for workers=1
        res = make_sample(tmp, int(n), int(seed), fmt=fmt, workers=int(workers))
        cpu = time.process_time() - c0
    return {"images": res["images"], "format": fmt, "workers": workers,
            "image_seconds": res["image_seconds"], "images_per_s": res["images_per_s"],
            "minutes_for_20000_images": round(20000 / res["images_per_s"] / 60, 2),
            "cpu_seconds_this_process": round(cpu, 3),
            "images_per_cpu_s": round(int(n) / cpu, 1) if int(workers) == 1 else None,
            "label_rows": 202599, "label_seconds": round(t_labels, 3),
            "label_rows_per_s": round(202599 / t_labels)}
