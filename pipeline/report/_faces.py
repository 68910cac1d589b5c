"""Mean faces and sample grids: pixel averages of the images the manifest lists for a cluster.

This is the one place the report touches images rather than tables. It only averages pixels
of files the stages already assigned to clusters (no model runs). Images are read through
:mod:`pipeline.images` (local or s3://, refused over ``data.max_image_bytes`` /
``data.max_image_pixels`` before decoding; JPEGs decoded at reduced scale) with a small thread
pool, since reads are I/O-bound; an image that cannot be read is recorded in ``errors/`` under
the ``report`` stage.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.images import open_limited, read_limited
from pipeline.report._context import Context

# Width in pixels of each face after resizing (height follows the collection's aspect ratio).
FACE_WIDTH = 64
# Concurrent image reads; I/O-bound, so more threads than cores is right.
READ_THREADS = 16


class FaceReader:
    """Reads, decodes and resizes faces once per report (mean faces and grids share them)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.size: tuple[int, int] | None = None  # (width, height), fixed by the first image
        self._cache: dict[str, np.ndarray | None] = {}
        self.failed: list[dict] = []

    def _read(self, image_id: str, uri: str) -> np.ndarray | None:
        try:
            d = self.ctx.cfg.data
            data = read_limited(uri, self.ctx.cfg.storage, d.max_image_bytes)
            with open_limited(data, d.max_image_pixels) as im:
                if im.format == "JPEG":  # decode at 1/2..1/8 scale: faces are drawn 64 px wide
                    im.draft("RGB", (2 * FACE_WIDTH, 2 * FACE_WIDTH))
                im = im.convert("RGB")
                if self.size is None:
                    w, h = im.size
                    self.size = (FACE_WIDTH, max(8, round(FACE_WIDTH * h / w)))
                return np.asarray(im.resize(self.size, Image.BILINEAR), dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is recorded with its cause
            self.failed.append({"image_id": image_id, "uri": uri,
                                "reason": f"report: cannot read image: {type(exc).__name__}: "
                                          f"{str(exc)[:200]}"})
            return None

    def load(self, rows: pd.DataFrame) -> list[np.ndarray]:
        """Faces for ``rows`` (image_id, uri), in order, skipping unreadable ones."""
        todo = [(i, u) for i, u in zip(rows["image_id"], rows["uri"]) if i not in self._cache]
        if todo:
            if self.size is None:  # the first image fixes the size before threads race on it
                i0, u0 = todo.pop(0)
                self._cache[i0] = self._read(i0, u0)
            with ThreadPoolExecutor(READ_THREADS) as pool:
                for (i, _), arr in zip(todo, pool.map(lambda t: self._read(*t), todo)):
                    self._cache[i] = arr
        faces = [self._cache.get(i) for i in rows["image_id"]]
        return [f for f in faces if f is not None]


def mean_face(faces: list[np.ndarray]) -> np.ndarray | None:
    """The pixel-wise average of aligned faces (float, 0..1)."""
    if not faces:
        return None
    return np.mean(np.stack(faces).astype(np.float32), axis=0) / 255.0


def sample_rows(members: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A seeded sample of at most ``n`` rows (all rows when fewer), in image_id order."""
    members = members.sort_values("image_id")
    if len(members) <= n:
        return members
    idx = np.random.default_rng(seed).choice(len(members), size=n, replace=False)
    return members.iloc[np.sort(idx)]
