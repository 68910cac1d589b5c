"""Ingest benchmark: parse CelebA-sized annotation files (202,599 rows) and build the manifest.

`python -m jobs.benchmark ingest [-- --rows 202599 --baseline true]`

Writes the four CelebA annotation files for ``rows`` synthetic images (labels only, no pictures)
into a temporary folder and times the ingest stage's parsing + joins + schema conformance against
a synthetic image listing (so 202,599 image files need not exist), then the manifest write. The
baseline is the obvious pure-Python reader (``line.split()`` per line, then
``pa.Table.from_pylist``) of ``list_attr_celeba.txt`` alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow as pa

from pipeline import ingest, tables
from pipeline.config import Config
from pipeline.sample import sample_labels, write_annotations


def _python_baseline(path: Path) -> tuple[float, float, int]:
    t0, c0 = time.perf_counter(), time.process_time()
    lines = path.read_text().splitlines()
    names = lines[1].split()
    rows = []
    for line in lines[2:]:
        tok = line.split()
        row = {"image_id": tok[0]}
        row.update({n: v == "1" for n, v in zip(names, tok[1:])})
        rows.append(row)
    table = pa.Table.from_pylist(rows)
    return time.perf_counter() - t0, time.process_time() - c0, table.num_rows


def run(cfg: Config, rows: int = 202599, baseline: bool = True, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp) / "celeba"
        t0 = time.perf_counter()
        write_annotations(root, sample_labels(rows, seed))
        t_write_ann = time.perf_counter() - t0

        cfg = cfg.model_copy(deep=True)
        cfg.data.dataset = "celeba"
        cfg.data.root = str(root)
        cfg.data.limit = 0
        cfg.output.root = str(Path(tmp) / "run")
        # The real listing of the annotation files plus a synthetic listing of the images.
        real = ingest.list_root(ingest.storage.filesystem(str(root)))
        ids = [f"{i + 1:06d}.jpg" for i in range(rows)]
        fake = pl.DataFrame({"rel": [f"img_align_celeba/{i}" for i in ids],
                             "path": [f"{root}/img_align_celeba/{i}" for i in ids],
                             "size": [9000] * rows}, schema=real.schema)
        listing = pl.concat([real, fake])

        # CPU time is reported next to wall time: on a shared machine the wall clock mostly
        # measures the neighbours.
        t0, c0 = time.perf_counter(), time.process_time()
        manifest, errors, _ = ingest.build_manifest(cfg, listing=listing)
        t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        tables.replace(cfg, "manifest", manifest, schema=manifest.schema)
        t_write = time.perf_counter() - t0
        out = {"rows": rows, "manifest_rows": manifest.num_rows, "errors": errors.num_rows,
               "annotation_bytes": sum(p.stat().st_size for p in root.glob("*.txt")),
               "write_annotations_s": round(t_write_ann, 3),
               "parse_and_build_s": round(t_build, 3), "parse_and_build_cpu_s": round(c_build, 3),
               "manifest_write_s": round(t_write, 3), "rows_per_s": round(rows / t_build)}
        if baseline:
            t_base, c_base, n = _python_baseline(root / "list_attr_celeba.txt")
            out.update({"baseline_python_attr_only_s": round(t_base, 3),
                        "baseline_python_attr_only_cpu_s": round(c_base, 3), "baseline_rows": n,
                        "speedup_vs_baseline_wall": round(t_base / t_build, 2),
                        "speedup_vs_baseline_cpu": round(c_base / c_build, 2)})
        return out
