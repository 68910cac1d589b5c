"""`python -m jobs.benchmark extract_dlib [-- --images N --root DIR]`: the dlib pool vs a bare loop.

Measures on the same machine, in one run, over the same N real images:

(a) a bare dlib loop: ``extract.dlib_max_actors`` Ray tasks with ``cpus_per_dlib_actor`` CPUs
    each (the cores the pipeline's dlib pool gets), each reading, decoding and embedding its
    share of the files with :class:`pipeline.dlib_face.FaceEmbedder` -- the simplest script that
    does dlib's part; run before and after (b), the mean is the baseline;
(b) the extract stage end to end with ``extract.embedding = "dlib"`` (read, decode, attribute
    actor, dlib actors, Parquet commits), images/s over the stage's wall time.

It prints both and the ratio (b)/(a); the goal is >= 0.9. The pipeline additionally runs the
attribute model and the decode tasks on cores of their own (``cpus_per_actor``,
``cpus_per_decode_task``), which the bare loop does not need.

Data: ``--images N`` images of a CelebA folder (``--root``, default ``../shared/real/celeba``),
ingested into a temporary root (``data.limit = N``, a seeded subset). The config's trained
attribute model is used when it exists, else a random-init one.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.benchmarks import headline, wait_until_quiet

log = logging.getLogger(__name__)


def _bare_loop(uris: list[str], upsample: int, max_side: int) -> dict:
    """Read, decode and embed ``uris`` with dlib; seconds after the models are loaded."""
    import resource

    import numpy as np
    from PIL import Image

    from pipeline.dlib_face import FaceEmbedder

    model = FaceEmbedder(upsample=upsample)
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    detected = 0
    for u in uris:
        im = Image.open(u).convert("RGB")
        if max_side and max(im.size) > max_side:
            f = max_side / max(im.size)
            im = im.resize((round(im.size[0] * f), round(im.size[1] * f)), Image.BILINEAR)
        _, d = model.embed([np.asarray(im)])
        detected += int(d[0])
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return {"images": len(uris), "seconds": wall, "cpu_seconds": cpu, "detected": detected}


def _bare(uris: list[str], e, ray) -> dict:
    wait_until_quiet()
    task = ray.remote(num_cpus=e.cpus_per_dlib_actor)(_bare_loop)
    k = e.dlib_max_actors
    t0 = time.perf_counter()
    parts = ray.get([task.remote(uris[i::k], e.dlib_upsample, e.dlib_max_side)
                     for i in range(k)])
    return {"images_per_s": len(uris) / max(p["seconds"] for p in parts),
            "wall_s": time.perf_counter() - t0,
            "cpu_per_wall": sum(p["cpu_seconds"] for p in parts) / sum(p["seconds"] for p in parts),
            "detected": sum(p["detected"] for p in parts)}


def run(cfg, images: int = 2000, root: str = "", keep: bool = False,
        bare_before: bool = False) -> dict:
    import ray

    from pipeline import extract, ingest, tables
    from pipeline.benchmarks.identity import real_data_root
    from pipeline.benchmarks.extract import place_attribute_model
    from pipeline.ray_runtime import ensure_ray

    base = Path(root) if root else (real_data_root() or Path("missing")) / "celeba"
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no CelebA folder; pass --root DIR")
    tmp = Path(tempfile.mkdtemp(prefix="faceaudit-bench-dlib-"))
    bcfg = cfg.model_copy(deep=True)
    bcfg.output.root = str(tmp / "run")
    bcfg.data.root, bcfg.data.dataset, bcfg.data.limit = str(base), "celeba", int(images)
    bcfg.extract.embedding, bcfg.extract.embedding_weights = "dlib", "none"
    try:
        ingest.run(bcfg)
        attr_source = place_attribute_model(cfg, bcfg)
        ensure_ray(bcfg)
        e = bcfg.extract
        man = tables.read(bcfg, "manifest", columns=["image_id", "uri"]).sort_by("image_id")
        uris = man["uri"].to_pylist()

        before = _bare(uris, e, ray) if bare_before else None
        t0 = time.perf_counter()
        result = extract.run(bcfg)
        wall = time.perf_counter() - t0
        after = _bare(uris, e, ray)
        runs = [r for r in (before, after) if r is not None]

        bare = sum(r["images_per_s"] for r in runs) / len(runs)
        pipe = len(uris) / wall
        out = {
            "images": len(uris), "root": str(base),
            "ray_cpus": ray.cluster_resources().get("CPU", 0.0),
            "dlib_pool": {"actors": [e.dlib_min_actors, e.dlib_max_actors],
                          "cpus_per_actor": e.cpus_per_dlib_actor, "batch": e.dlib_batch_size},
            "attribute_actor": {"cpus": e.cpus_per_actor, "model": attr_source},
            "a_bare_dlib_images_per_s": round(bare, 2),
            "a_bare_runs_images_per_s": [round(r["images_per_s"], 2) for r in runs],
            "a_bare_cpu_per_wall": round(after["cpu_per_wall"], 2),
            "b_pipeline_images_per_s": round(pipe, 2),
            "b_pipeline_wall_s": round(wall, 1),
            "ratio_b_over_a": round(pipe / bare, 3),
            "faces_detected": result.get("faces_detected"),
            "face_fallbacks": result.get("face_fallbacks"),
            "bare_faces_detected": after["detected"],
            "output_root": str(tmp / "run") if keep else None,
            "error_rows": result["error_rows"],
        }
        return headline(out, ("a_bare_dlib_images_per_s", "b_pipeline_images_per_s",
                              "ratio_b_over_a"))
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
