"""Tiny generated inputs for stage tests that should not depend on the ingest stage.

``write_tiny_manifest`` draws small JPEGs whose pixels depend on a few attributes (so a model
can learn something) and writes a ``manifest/`` table exactly as ingest would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import tables
from pipeline.config import CELEBA_ATTRIBUTES, Config, load_config
from pipeline.schemas import LANDMARKS, manifest_schema


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """A config whose output root is under ``tmp_path``, sized for seconds-long stages."""
    return load_config(None, [
        f"output.root={tmp_path / 'run'}", f"data.root={tmp_path / 'data'}",
        "ray.allow_cpu_fallback=true",
        "train.image_size=32", "train.epochs=1", "train.batch_size=16",
        "extract.embedding_image_size=32", "extract.batch_size=16",
        "cluster.k_max=4", "cluster.pca_components=5", "cluster.sample_rows=100",
        "cluster.silhouette_rows=100", "cluster.map_rows=100",
        "classify.bootstrap=20", "explain.max_rows=50", "explain.background_rows=20",
        "explain.block_rows=25", *overrides,
    ])


def write_tiny_manifest(cfg: Config, n: int = 48, seed: int = 0,
                        size: tuple[int, int] = (178, 218)) -> pa.Table:
    """Write ``n`` JPEGs under ``cfg.data.root/img`` and their manifest; returns the manifest."""
    rng = np.random.default_rng(seed)
    img_dir = Path(cfg.data.root) / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    attrs = rng.random((n, len(CELEBA_ATTRIBUTES))) < 0.3
    idx = {a: i for i, a in enumerate(CELEBA_ATTRIBUTES)}
    rows = []
    w, h = size
    for i in range(n):
        a = attrs[i]
        img = np.full((h, w, 3), 90, dtype=np.uint8)
        if a[idx["Male"]]:
            img[: h // 3] = (30, 30, 30)  # dark top band
        if a[idx["Smiling"]]:
            img[2 * h // 3:, w // 4: 3 * w // 4] = (220, 60, 60)
        if a[idx["Eyeglasses"]]:
            img[h // 3: h // 2] = (10, 10, 200)
        img = np.clip(img.astype(int) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(img).save(img_dir / name, quality=90)
        split = "train" if i < int(n * 0.6) else ("val" if i < int(n * 0.8) else "test")
        row = {"image_id": name, "uri": str((img_dir / name).resolve()), "split": split,
               "identity": int(i % 7), "dataset": "celeba"}
        row.update({name_: bool(a[j]) for j, name_ in enumerate(CELEBA_ATTRIBUTES)})
        row.update({c: 0 for c in LANDMARKS})
        rows.append(row)
    schema = manifest_schema()
    table = pa.Table.from_pylist(rows, schema=schema)
    tables.replace(cfg, "manifest", table, schema=schema,
                   metadata={"dataset": cfg.data.dataset, "data_root": cfg.data.root})  # as ingest
    return table
