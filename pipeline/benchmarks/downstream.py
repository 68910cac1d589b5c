"""`python -m jobs.benchmark downstream --config jobs/configs/scale.toml -- --features-from RUN
[--images 202599 --compare 20000 --stages cluster,classify,explain,report]`

The stages after extract at full CelebA size without extracting 202,599 images: does any of
cluster, classify, explain or report grow its driver's memory with the rows, or its time faster
than linearly?

Data (under ``$FACEAUDIT_REAL_DATA``, else ``../shared/real``): the scale benchmark's CelebA
folder (every official id a hard link to one of the real JPEGs, the official full annotation,
partition and identity files; see :mod:`pipeline.benchmarks.scale`), ingested by the ingest stage as a user would, and a
``features/`` table made by tiling a real run's features (``--features-from``, the output root
of any run whose extract stage finished): manifest row i gets the features of source row
i mod m, under its own image_id. The rows are real model outputs and the table has the
extract stage's schema and metadata, so the downstream stages read it exactly as their own;
their values repeat every m rows, so the numbers measure cost, not quality.

Each stage runs as its own job process (``python -m jobs.<stage> --force``) under the memory
sampler of :mod:`pipeline.benchmarks.memory`; the table compares the two sizes: wall time and
peak driver memory (PSS, and anonymous PSS: what the driver itself allocated, without the
pages of Ray's object store it maps).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.benchmarks import scale

log = logging.getLogger(__name__)

DOWNSTREAM = ("cluster", "classify", "explain", "report")
# Rows per written features part (the extract stage's rows_per_file in scale.toml).
PART_ROWS = 10000


def tile_features(source: Path, manifest: Path, dest: Path) -> int:
    """Write ``dest`` (a features/ folder): one row per manifest image_id, row i a copy of
    source row i mod m with the id replaced. Streams part by part; returns rows written."""
    src_ds = pads.dataset(str(source), format="parquet")
    src = src_ds.to_table().sort_by("image_id")
    if src.num_rows == 0:
        raise ValueError(f"{source}: the features table is empty; point --features-from at a run "
                         "whose extract stage wrote features")
    ids = pads.dataset(str(manifest), format="parquet").to_table(columns=["image_id"])
    ids = ids["image_id"].combine_chunks()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    schema = src.schema  # keeps the extract stage's metadata (model, fingerprint ...)
    col = schema.get_field_index("image_id")
    for part, start in enumerate(range(0, len(ids), PART_ROWS)):
        stop = min(start + PART_ROWS, len(ids))
        block = src.take(pa.array(np.arange(start, stop) % src.num_rows))
        block = block.set_column(col, schema.field(col), ids.slice(start, stop - start))
        pq.write_table(block.replace_schema_metadata(schema.metadata),
                       dest / f"part-{part:05d}.parquet")
    return len(ids)


def run(cfg, features_from: str, images: int = 202599, compare: int = 20000,
        stages: str = ",".join(DOWNSTREAM), workdir: str = "", annotations: str = "",
        images_from: str = "", keep: bool = True) -> dict:
    if not features_from:
        raise ValueError("--features-from RUN is needed: the output root of a run whose "
                         "extract stage wrote features/")
    source = Path(features_from) / "features"
    if not any(source.glob("*.parquet")):
        raise FileNotFoundError(f"{source}: no features parquet files to tile")
    names = [s.strip() for s in str(stages).split(",") if s.strip()]
    unknown = [s for s in names if s not in DOWNSTREAM]
    if unknown:
        raise ValueError(f"--stages {unknown}: expected some of {list(DOWNSTREAM)}")
    annotations_dir, images_dir, work = scale.source_dirs(annotations, images_from, workdir)
    sizes = sorted({int(compare), int(images)})
    results: dict[int, list[dict]] = {}
    for n in sizes:
        t = time.perf_counter()
        folder = scale.layout_celeba(work / f"celeba-{n}", n, annotations_dir, images_dir)
        out = work / f"downstream-{n}"
        if out.exists():
            shutil.rmtree(out)
        scale.run_size(cfg, folder, out, stages=["ingest"])
        rows = tile_features(source, out / "manifest", out / "features")
        log.info("[bench downstream] %d rows of upstream tables ready in %.1f s", rows,
                 time.perf_counter() - t)
        results[n] = scale.run_size(cfg, folder, out, stages=names)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    table = scale.compare_sizes(results, sizes)
    scale.print_sizes(table, sizes)
    return {"sizes": sizes, "features_from": str(source),
            "per_size": {str(n): r for n, r in results.items()}, "comparison": table,
            "workdir": str(work)}
