"""Extract stage: every manifest image through the attribute model and an embedding backbone.

One Ray Data pipeline, streaming::

    manifest rows (image_id, uri, shard)            driver, blocks of extract.batch_size rows
      -> read + decode + resize   CPU tasks          decode_block: bytes through the storage
                                                     filesystem (local or s3://), PIL decode,
                                                     any mode -> RGB, centre crop, resize;
                                                     unusable files become rows with `error`
      -> infer                    ONE actor pool     AttributeInfer: loads both models once per actor,
                                                     runs both on the same batch (one decode)
      [-> dlib                    CPU actor pool     _DlibInfer, only for extract.embedding =
                                                     "dlib": HOG detection, 5-point alignment,
                                                     128-d descriptors of the ORIGINAL image;
                                                     its own pool (extract.dlib_*_actors), so a
                                                     GPU attribute pool and CPU dlib run side
                                                     by side in one streaming pipeline]
      -> commit per shard         driver, one        features/part-<shard>.parquet and
                                  writer thread      errors/extract-<shard>.parquet, atomically
                                                     (_ShardWriter: off the stream's path)

Batch fields between the steps (Arrow):

* decode out: ``image_id``, ``uri``, ``shard`` (int32), ``error`` (string, null when usable),
  ``content_hash`` (string: :func:`content_hash` of the file's bytes, null when unreadable) and
  one ``px<S>`` binary column per input size S (uint8 pixels, HWC, S*S*3 bytes; null on error).
  Pixels stay uint8 until the actor: 4x less object-store traffic than float32 and, on a GPU, the
  normalisation runs on the device instead of in Python.
* infer out: ``image_id``, ``uri``, ``shard``, ``error``, ``p_<Attribute>`` float32 and
  ``embedding`` fixed_size_list<float32>[D] (nulls on error rows) and ``content_hash``.
* with dlib, decode also emits ``orig`` (binary, the decoded RGB image at its own resolution,
  longer side capped at ``extract.dlib_max_side``), ``orig_h``, ``orig_w`` (int32); infer passes
  them on instead of ``embedding``; dlib out: infer's columns minus ``orig*``, plus ``embedding``
  fixed_size_list<float32>[128] and ``face_detected`` bool (false: the detector found no face
  and the fallback box of :func:`pipeline.dlib_face.fallback_box` was used).

Resume. The manifest, sorted by ``image_id``, is cut into shards of ``extract.rows_per_file``
rows. A shard is done when its ``features/part-<shard>.parquet`` exists (written after its error
file, each by a temp-name-then-move write), so a killed run leaves only whole shards and a rerun
processes only the missing ones. ``_state/extract.json`` under the output root holds a
fingerprint of everything that decides the output (manifest rows, model weights, embedding,
sizes, shard size); when it differs, or when the previous run had finished (a forced rerun),
the stage starts clean. Ray Data's ``CheckpointConfig`` (beta) was not used: it tracks rows by an
id column but offers no atomic pairing of a features file with its errors file.

Memory stays bounded: blocks stream through the object store under Ray Data's backpressure and
the driver holds at most the shards in flight (about one ``rows_per_file`` worth of features)
plus ``extract.commit_queue_shards`` finished shards waiting for the writer.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage, tables
from pipeline.config import Config, DataConfig, StorageConfig
# the decoders live in pipeline.images (train uses them too); re-exported here for the tests
from pipeline.images import (BadImage, decode_image, decode_rgb, original_pixels,  # noqa: F401
                             read_and_decode, square_crops)
from pipeline.progress import Progress

log = logging.getLogger(__name__)

STAGE = "extract"
FEATURES = "features"  # table: features_schema(attributes, dim)
# Bumped when the meaning of the features table changes (preprocessing, column layout).
FEATURES_FORMAT = "2"  # 2: content_hash column
STATE = "_state/extract.json"


# --------------------------------------------------------------------------- schema

def features_schema(attributes: list[str], dim: int, face_detected: bool = False,
                    face_geometry: bool = False) -> pa.Schema:
    """``features/``: one row per usable image (design.md, Tables).

    ``face_detected`` adds the boolean column of embeddings that detect the face first (dlib):
    false where the detector found none and the fallback box was used. ``face_geometry``
    (``extract.face_geometry``) adds ``attribute_logits`` (the attribute model's own logits, kept
    because the attribute_head stage rewrites the ``p_`` columns) and ``face_geometry``
    (:func:`pipeline.dlib_face.face_geometry` of the 68 landmarks).
    """
    fields = [pa.field("image_id", pa.string(), nullable=False)]
    # probabilities (sigmoid of the attribute model's logits), one column per attribute
    fields += [pa.field(f"p_{a}", pa.float32(), nullable=False) for a in attributes]
    # fixed_size_list is stored in Parquet as a plain LIST of FLOAT (the fixed size lives in the
    # Arrow schema metadata), so readers without fixed-size lists see array<float>
    fields.append(pa.field("embedding", pa.list_(pa.field("item", pa.float32()), dim),
                           nullable=False))
    # blake2b-128 of the image file's bytes (hex): equal hashes = byte-identical files (audit)
    fields.append(pa.field("content_hash", pa.string(), nullable=False))
    if face_detected:
        fields.append(pa.field("face_detected", pa.bool_(), nullable=False))
    if face_geometry:
        fields += _geometry_fields(len(attributes), nullable=False)
    return pa.schema(fields)


SCHEMAS = {FEATURES: features_schema}  # every table the stage writes (besides errors/)


def _geometry_fields(n_attributes: int, nullable: bool) -> list[pa.Field]:
    from pipeline import dlib_face

    return [pa.field("attribute_logits", pa.list_(pa.field("item", pa.float32()), n_attributes),
                     nullable=nullable),
            pa.field("face_geometry",
                     pa.list_(pa.field("item", pa.float32()), dlib_face.GEOMETRY_DIM),
                     nullable=nullable)]


_ROUTING = ("image_id", "uri", "shard", "error")
# the original decoded image, for the dlib pool: RGB uint8 HWC bytes and its size
_ORIGINAL = (pa.field("orig", pa.binary()), pa.field("orig_h", pa.int32()),
             pa.field("orig_w", pa.int32()))


def infer_schema(attributes: list[str], dim: int | None) -> pa.Schema:
    """The attribute actor's output: features plus the routing columns; nullable for error rows.

    ``dim`` None: the embedding runs in the dlib pool next, so the original image passes through
    instead of an embedding column.
    """
    fields = [pa.field("image_id", pa.string()), pa.field("uri", pa.string()),
              pa.field("shard", pa.int32()), pa.field("error", pa.string())]
    fields += [pa.field(f"p_{a}", pa.float32()) for a in attributes]
    if dim is None:
        fields += list(_ORIGINAL)
    else:
        fields.append(pa.field("embedding", pa.list_(pa.field("item", pa.float32()), dim)))
    fields.append(pa.field("content_hash", pa.string()))
    return pa.schema(fields)


def _dlib_schema(attributes: list[str], geometry: bool = False) -> pa.Schema:
    """The dlib actor's output: the attribute actor's columns, the embedding and face_detected
    (and with ``geometry`` the attribute logits and the face geometry)."""
    from pipeline import dlib_face

    fields = [f for f in infer_schema(attributes, dlib_face.DIM)]
    fields.append(pa.field("face_detected", pa.bool_()))
    if geometry:
        fields += _geometry_fields(len(attributes), nullable=True)
    return pa.schema(fields)


# --------------------------------------------------------------------------- decode

def content_hash(data: bytes) -> str:
    """The features table's ``content_hash``: blake2b (16-byte digest) of a file's bytes, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_block(block: pa.Table, *, storage_cfg: StorageConfig, sizes: tuple[int, ...],
                 min_side: int, read_threads: int, max_pixels: int = DataConfig().max_image_pixels,
                 max_bytes: int = DataConfig().max_image_bytes,
                 original_max_side: int | None = None) -> pa.Table:
    """Read and decode one block of manifest rows (a CPU task); never raises for a bad image.

    ``original_max_side`` not None also keeps the original decoded image (``orig`` columns, for
    the dlib pool), downscaled to that longer side when larger (0 = never).
    """
    uris = block.column("uri").to_pylist()
    keep = original_max_side is not None
    # the original is wanted at full resolution: no JPEG draft beyond its own size cap
    draft = (original_max_side or 0) if keep else max(sizes)
    errors: list[str | None] = []
    hashes: list[str | None] = []  # of every file read, so the audit sees even undecodable ones
    pixels: list[list[bytes | None]] = [[] for _ in sizes]
    orig: list[bytes | None] = []
    orig_hw: list[tuple[int | None, int | None]] = []

    def decode(data: bytes):
        im = decode_rgb(data, min_side, draft_side=draft, max_pixels=max_pixels)
        return square_crops(im, sizes), (original_pixels(im, original_max_side or 0) if keep else None)

    # decoding stays on this task's one core (decode_threads=1); reads overlap in threads
    for data, decoded, err in read_and_decode(uris, decode, storage_cfg=storage_cfg,
                                              max_bytes=max_bytes, read_threads=read_threads):
        hashes.append(None if data is None else content_hash(data))
        arrays, full = decoded if decoded is not None else (None, None)
        errors.append(err)
        for i in range(len(sizes)):
            pixels[i].append(arrays[i].tobytes() if arrays is not None else None)
        if keep:
            orig.append(None if full is None else full.tobytes())
            orig_hw.append((None, None) if full is None else full.shape[:2])
    out = block.select(["image_id", "uri", "shard"])
    out = out.append_column("error", pa.array(errors, pa.string()))
    out = out.append_column("content_hash", pa.array(hashes, pa.string()))
    for n, col in zip(sizes, pixels):
        out = out.append_column(f"px{n}", pa.array(col, pa.binary()))
    if keep:
        out = out.append_column(_ORIGINAL[0], pa.array(orig, pa.binary()))
        out = out.append_column(_ORIGINAL[1], pa.array([hw[0] for hw in orig_hw], pa.int32()))
        out = out.append_column(_ORIGINAL[2], pa.array([hw[1] for hw in orig_hw], pa.int32()))
    return out


# --------------------------------------------------------------------------- inference

def _embedding_seed(cfg: Config) -> int:
    from pipeline.seeds import derive_seed

    return derive_seed(cfg.run.seed, STAGE, "embedding_init")


def _autocast(torch, device):
    """bf16 autocast on GPUs that have bf16 (Ampere and later), fp16 on older ones; none on CPU
    (CPU autocast is slower than float32 on most CPUs)."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class AttributeInfer:
    """One inference actor: both models loaded once, run on the same decoded batch."""

    def __init__(self, cfg: Config, use_gpu: bool, threads: int):
        import torch

        from pipeline.embeddings import build_embedding
        from pipeline.models import load_attribute_model

        # match torch's intra-op threads to the CPUs Ray gave this actor: more threads than
        # cores just makes the actor fight the decode tasks for them
        torch.set_num_threads(max(1, threads))
        if use_gpu:  # a driver / torch build mismatch fails here, in one message
            from pipeline.resources import check_cuda

            check_cuda("extract inference actor")
        self.torch = torch
        self.device = torch.device("cuda" if use_gpu else "cpu")
        model, info = load_attribute_model(tables.location(cfg, "models/attributes"))
        self.info = info
        self.attributes = list(info.attributes)
        self.emb = build_embedding(cfg.extract.embedding, cfg.extract.embedding_weights,
                                   cfg.storage, attribute_info=info, seed=_embedding_seed(cfg),
                                   download=cfg.weights.download)
        # dlib: the embedding comes from the next actor pool; this one passes the original on
        self.separate = self.emb.separate_pool
        # channels_last: faster convolutions with cuDNN and oneDNN alike (measured ~1.4x on CPU)
        self.attr_model = model.to(self.device, memory_format=torch.channels_last).eval()
        self.emb_model = (None if self.emb.module is None else
                          self.emb.module.to(self.device, memory_format=torch.channels_last).eval())
        self.attr_size = int(info.image_size)
        self.emb_size = self.attr_size if self.emb_model is None else cfg.extract.embedding_image_size
        self.schema = infer_schema(self.attributes, None if self.separate else self.emb.dim)

        def norm(mean, std):
            # (x/255 - mean)/std as one multiply-add on 0..255 pixels, constants on the device
            m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
            return (1.0 / (255.0 * s)).to(self.device), (-m / s).to(self.device)

        self.attr_norm = norm(info.mean, info.std)
        self.emb_norm = norm(self.emb.mean, self.emb.std)
        self._local = threading.local()  # per-call-thread CUDA stream and pinned buffers
        # a fresh autocast context per call: one instance is not safe on two threads
        self.amp = lambda: _autocast(torch, self.device)
        if self.device.type == "cuda":
            # weights and constants were copied on the default stream; the calls use their own
            torch.cuda.synchronize(self.device)

    def _stream(self):
        """This thread's CUDA stream (calls run on two threads: each copies on its own stream,
        so one call's host-to-device copy overlaps the other call's compute)."""
        st = getattr(self._local, "stream", None)
        if st is None:
            st = self._local.stream = self.torch.cuda.Stream(device=self.device)
        return st

    def _staged(self, key: str, rows: np.ndarray):
        """Pinned host memory holding ``rows`` (one copy); the buffer is this thread's, reused
        across calls (a call ends with a sync on its stream, so the last copy from it is done)."""
        torch = self.torch
        bufs = self._local.__dict__.setdefault("pinned", {})
        buf = bufs.get(key)
        if buf is None or buf.numel() < rows.size:
            buf = bufs[key] = torch.empty(rows.size, dtype=torch.uint8,
                                          pin_memory=self.device.type == "cuda")
        host = buf[:rows.size].view(rows.shape)
        np.copyto(host.numpy(), rows)
        return host

    def _tensor(self, col: pa.ChunkedArray, size: int, normalise, key: str):
        """A binary ``px<S>`` column's usable rows -> normalised float NCHW on the device."""
        import warnings

        torch = self.torch
        rows = pixel_rows(col, size)  # a view of the Arrow buffer (no copy) in the usual case
        if self.device.type == "cuda":
            x = self._staged(key, rows).to(self.device, non_blocking=True)
        else:
            with warnings.catch_warnings():
                # the Arrow buffer is read-only; nothing writes to it (.float() below copies)
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(rows)
        # NHWC uint8 -> NCHW float: the permuted view is already channels_last, and the
        # elementwise ops keep that layout (no .contiguous() copy)
        scale, shift = normalise
        return torch.addcmul(shift, x.permute(0, 3, 1, 2).float(), scale)

    def inputs(self, batch: pa.Table, good: np.ndarray):
        """The normalised input tensors of the batch's usable rows (attribute, embedding)."""
        xa = self._tensor(batch.column(f"px{self.attr_size}"), self.attr_size, self.attr_norm,
                          "attr")
        if xa.shape[0] != len(good):
            raise RuntimeError(f"px{self.attr_size} holds {xa.shape[0]} images for {len(good)} "
                               f"rows without error (decode output is inconsistent)")
        if self.emb_model is None:
            return xa, None  # attribute_backbone (same forward pass) or a separate pool
        same = self.emb_size == self.attr_size and self.emb.mean == tuple(
            self.info.mean) and self.emb.std == tuple(self.info.std)
        xe = xa if same else self._tensor(batch.column(f"px{self.emb_size}"), self.emb_size,
                                          self.emb_norm, "emb")
        return xa, xe

    def forward(self, xa, xe):
        """Both models on one batch: (attribute probabilities, embeddings) as float32 numpy.

        The two results leave the device in one copy per batch, the call's only sync.
        """
        torch = self.torch
        with torch.inference_mode(), self.amp():
            feats = self.attr_model.embed(xa)
            logits = self.attr_model.head(feats)  # eval: dropout is the identity
            if self.separate:
                # dlib: the embedding comes from the next pool; only probabilities leave here
                out = torch.sigmoid(logits.float())
            else:
                # one embedding pass (attribute_backbone: the attribute pass's own features)
                e = feats if self.emb_model is None else self.emb_model(xe)
                out = torch.cat([torch.sigmoid(logits.float()), e.float()], dim=1)
        if self.device.type == "cuda":
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            out = host
        out = out.numpy()
        k = len(self.attributes)
        return out[:, :k], (None if self.separate else out[:, k:])

    def __call__(self, batch: pa.Table) -> pa.Table:
        good = np.flatnonzero(pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False))
        probs = np.zeros((len(good), len(self.attributes)), np.float32)
        emb = None if self.separate else np.zeros((len(good), self.emb.dim), np.float32)
        if len(good):
            if self.device.type == "cuda":
                with self.torch.cuda.stream(self._stream()):
                    probs, emb = self.forward(*self.inputs(batch, good))
            else:
                probs, emb = self.forward(*self.inputs(batch, good))
        return infer_output(batch, good, probs, emb, self.schema)


def infer_output(batch: pa.Table, good: np.ndarray, probs: np.ndarray,
                 emb: np.ndarray | None, schema: pa.Schema) -> pa.Table:
    """The actor's results scattered back to the batch's rows (error rows keep nulls); ``emb``
    None passes the original image on to the dlib pool instead."""
    n = batch.num_rows
    dim = 0 if emb is None else emb.shape[1]
    mask = None
    if len(good) < n:
        mask = np.ones(n, bool)
        mask[good] = False
        full = np.zeros((n, probs.shape[1]), np.float32)
        full[good] = probs
        probs = full
    probs = np.ascontiguousarray(probs.T)  # one contiguous row per attribute column
    cols = [pa.array(probs[j], pa.float32(), mask=mask) for j in range(probs.shape[0])]
    if emb is None:
        # dlib runs next: the original image passes through instead of an embedding
        tail = [batch.column(f.name) for f in _ORIGINAL]
    else:
        flat = emb
        if mask is not None:
            flat = np.zeros((n, dim), np.float32)
            flat[good] = emb
        tail = [pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(flat).ravel(), pa.float32()), dim,
            mask=None if mask is None else pa.array(mask))]
    arrays = [batch.column("image_id"), batch.column("uri"), batch.column("shard"),
              batch.column("error")] + cols + tail + [batch.column("content_hash")]
    return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
                                 for a in arrays], schema=schema)


def _embedding_array(emb: np.ndarray, good: np.ndarray, mask: np.ndarray, dim: int
                     ) -> pa.FixedSizeListArray:
    """Embeddings of the usable rows scattered to the batch's rows; error rows are null."""
    flat = np.zeros((len(mask), dim), np.float32)
    flat[good] = emb
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim,
                                             mask=pa.array(mask))


class _DlibInfer:
    """One dlib actor (CPU): detect, align and describe the original image of each usable row."""

    def __init__(self, attributes: list[str], upsample: int, geometry: bool = False):
        from pipeline.dlib_face import FaceEmbedder

        self.model = FaceEmbedder(upsample=upsample, geometry=geometry)
        self.geometry = geometry
        self.schema = _dlib_schema(attributes, geometry)
        self.attributes = list(attributes)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline import dlib_face

        n = batch.num_rows
        good = np.flatnonzero(pc.is_null(batch.column("error")).to_numpy(zero_copy_only=False))
        mask = np.ones(n, bool)
        mask[good] = False
        idx = pa.array(good)
        data = batch.column("orig").take(idx).to_pylist()
        hs = batch.column("orig_h").take(idx).to_pylist()
        ws = batch.column("orig_w").take(idx).to_pylist()
        images = [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b, h, w in zip(data, hs, ws)]
        if self.geometry:
            emb, detected, geom = self.model.embed_geometry(images)
        else:
            emb, detected = self.model.embed(images)
        found = np.zeros(n, bool)
        found[good] = detected
        keep = [batch.column(c) for c in _ROUTING]
        keep += [batch.column(f"p_{a}") for a in self.attributes]
        arrays = keep + [_embedding_array(emb, good, mask, dlib_face.DIM),
                         batch.column("content_hash"), pa.array(found, pa.bool_(), mask=mask)]
        if self.geometry:
            probs = np.stack([batch.column(f"p_{a}").take(idx).to_numpy(zero_copy_only=False)
                              for a in self.attributes], axis=1).astype(np.float64)
            # the model's logits back from its float32 sigmoid (clipped where it saturated)
            probs = np.clip(probs, 1e-6, 1 - 1e-6)
            logits = np.log(probs / (1 - probs)).astype(np.float32)
            arrays += [_embedding_array(logits, good, mask, len(self.attributes)),
                       _embedding_array(geom, good, mask, dlib_face.GEOMETRY_DIM)]
        return pa.Table.from_arrays([a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
                                     for a in arrays], schema=self.schema)


def pixel_rows(col: pa.ChunkedArray | pa.Array, size: int) -> np.ndarray:
    """The non-null rows of a binary ``px<S>`` column as one ``(n, S, S, 3)`` uint8 array.

    Decode writes every usable row as exactly S*S*3 bytes and error rows as zero-length nulls,
    so a chunk's usable rows lie back to back in its value buffer: the result is a read-only
    view of that buffer (no copy) when the column has one chunk, one copy when it has several.
    Rows with another length (a producer that is not ``decode_block``) are an error.
    """
    row = size * size * 3
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    views = []
    for ch in chunks:
        if len(ch) == 0:
            continue
        if ch.type != pa.binary():
            raise TypeError(f"pixel column has type {ch.type}, expected binary")
        _, off_buf, val_buf = ch.buffers()
        offsets = np.frombuffer(off_buf, np.int32, count=len(ch) + 1, offset=ch.offset * 4)
        lengths = np.diff(offsets)
        valid = ch.is_valid().to_numpy(zero_copy_only=False)
        if (lengths[valid] != row).any() or (lengths[~valid] != 0).any():
            bad = int(np.flatnonzero(valid & (lengths != row))[0]) if (
                lengths[valid] != row).any() else int(np.flatnonzero(~valid & (lengths != 0))[0])
            raise ValueError(f"pixel row {bad} has {lengths[bad]} bytes, expected {row} "
                             f"({size}x{size}x3) or 0 for an error row")
        n_valid = int(valid.sum())
        if n_valid == 0:
            continue
        views.append(np.frombuffer(val_buf, np.uint8, count=n_valid * row,
                                   offset=int(offsets[0])).reshape(n_valid, size, size, 3))
    if not views:
        return np.zeros((0, size, size, 3), np.uint8)
    return views[0] if len(views) == 1 else np.concatenate(views)


# --------------------------------------------------------------------------- driver

def _read_manifest(cfg: Config) -> pa.Table:
    if not tables.exists(cfg, "manifest"):
        raise storage.StorageError(f"{tables.location(cfg, 'manifest').uri}: no manifest table; "
                                   f"run the ingest stage first")
    m = tables.read(cfg, "manifest", columns=["image_id", "uri"])
    m = m.sort_by("image_id")
    if cfg.data.limit:
        m = m.slice(0, cfg.data.limit)
    if pc.count_distinct(m["image_id"]).as_py() != m.num_rows:
        vc = pc.value_counts(m["image_id"])
        dup = [d["values"] for d in vc.to_pylist() if d["counts"] > 1][:3]
        raise ValueError(f"manifest has duplicate image_id values (e.g. {dup}); features are "
                         f"keyed by image_id, so fix the ingest stage's output first")
    if m["uri"].null_count:
        raise ValueError("manifest has rows without a uri; rerun the ingest stage")
    return m.combine_chunks()


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode() if not isinstance(p, bytes) else p)
        h.update(b"\0")
    return h.hexdigest()


def _manifest_digest(m: pa.Table) -> str:
    h = hashlib.sha256()
    for name in ("image_id", "uri"):
        arr = m[name].combine_chunks()
        for buf in arr.buffers():
            if buf is not None:
                h.update(memoryview(buf))
    return h.hexdigest()


def gpus_per_actor(cfg: Config) -> float:
    from pipeline.ray_runtime import resolve_use_gpu

    want = cfg.extract.gpus_per_actor
    if want == "auto":
        return 1.0 if resolve_use_gpu(cfg, "auto") else 0.0
    if float(want) <= 0:
        return 0.0
    return float(want) if resolve_use_gpu(cfg, True) else 0.0


def _check_resources(cfg: Config, gpus: float, dlib: bool = False) -> tuple[int, int]:
    """The actor pool's (min, max) size, "auto" resolved, checked per node (bounded wait).

    The request is ``min_actors`` actors (plus ``dlib_min_actors`` dlib actors when the
    embedding is dlib) plus one decode task: an actor pool whose decode tasks
    find no CPU, or whose actors find no GPU, waits forever. "auto" = the actor bundles the
    nodes hold (on CPU, after one decode task's CPUs); ``min_actors = "auto"`` = that number
    too (capped by an explicit ``max_actors``).
    """
    from pipeline import resources

    e = cfg.extract
    actor = {"CPU": e.cpus_per_actor, "GPU": gpus}
    decode = {"CPU": e.cpus_per_decode_task}
    lo, hi = e.min_actors, e.max_actors
    if "auto" in (lo, hi):
        fit = max(1, resources.fit_count(actor, resources.node_totals(), reserve=decode))
        hi = fit if hi == "auto" else hi
        lo = min(fit, hi) if lo == "auto" else lo
        log.info("[extract] actor pool %s..%s -> %d..%d", e.min_actors, e.max_actors, lo, hi)
    if hi < lo:
        raise ValueError(f"extract.max_actors ({hi}) < min_actors ({lo})")
    dlib_actors: list[dict] = []
    if dlib:
        if e.dlib_max_actors < e.dlib_min_actors:
            raise ValueError(f"extract.dlib_max_actors ({e.dlib_max_actors}) < dlib_min_actors "
                             f"({e.dlib_min_actors})")
        dlib_actors = [{"CPU": e.cpus_per_dlib_actor}] * e.dlib_min_actors
    what = f"extract: {lo} inference actor(s)" + (
        f" + {e.dlib_min_actors} dlib actor(s)" if dlib else "") + " + one decode task"
    resources.ensure_fits(
        cfg, what, [actor] * lo + dlib_actors + [decode],
        "lower extract.min_actors (or \"auto\"), cpus_per_actor, gpus_per_actor or "
        "cpus_per_decode_task" + (", dlib_min_actors or cpus_per_dlib_actor" if dlib else "")
        + ", or add nodes")
    return int(lo), int(hi)


def _actor_pool(cfg: Config, lo: int, hi: int, gpus: float):
    """The inference actors' pool; a GPU actor runs ``extract.calls_per_gpu_actor`` batches at
    once on their own threads and CUDA streams, so one batch's host-to-device copy and Arrow
    work overlap the other's compute (a CPU actor runs one: its cores are already busy)."""
    import ray.data

    calls = cfg.extract.calls_per_gpu_actor if gpus > 0 else 1
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi,
                                      max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=calls > 1)


def commit_shard(cfg: Config, shard: int, parts: list[pa.Table], schema: pa.Schema,
                 metadata: dict[str, str]) -> tuple[int, int]:
    """Write one shard: its errors file first, then its features file (the 'done' marker)."""
    t = pa.concat_tables(parts).sort_by("image_id")
    bad = pc.is_valid(t["error"])
    errs = t.filter(bad)
    feats = t.filter(pc.invert(bad))
    name = f"{shard:05d}"
    if errs.num_rows:
        et = pa.table({"image_id": errs["image_id"], "uri": errs["uri"],
                       "stage": pa.array([STAGE] * errs.num_rows, pa.string()),
                       "reason": errs["error"]})
        tables.write_errors(cfg, STAGE, et, part=name)
    else:
        # a rerun whose inputs were fixed meanwhile must not keep the old attempt's errors
        storage.delete(tables.location(cfg, "errors").join(f"{STAGE}-{name}.parquet"))
    tables.write(cfg, "features", feats, schema=schema, part=f"part-{name}", metadata=metadata)
    return feats.num_rows, errs.num_rows


class _ShardWriter:
    """Commits finished shards on one background thread, off the stream's critical path.

    Same guarantees as committing inline: each shard is written by :func:`commit_shard`
    (errors file, then features file), shards one at a time in completion order; after the
    first failure nothing else is written (a run that failed, like a killed one, leaves only
    whole shards) and the failure is raised in the driver at its next ``submit`` or at
    ``close``. Bounded: ``submit`` waits while ``max_pending`` shards are queued, so the driver
    holds at most that many shards' rows beyond the ones still being filled.
    """

    def __init__(self, cfg: Config, schema: pa.Schema, metadata: dict[str, str],
                 max_pending: int):
        self.cfg, self.schema, self.metadata = cfg, schema, metadata
        self.max_pending = max(1, max_pending)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-commit")
        self.pending: list = []
        self.failed = threading.Event()
        self.counts = {"features_rows_new": 0, "error_rows_new": 0}
        self.stall_s = 0.0  # time the stream waited for the writer (a full queue)
        self.drain_s = 0.0  # time the end of the stream waited for the last commits

    def _write(self, shard: int, parts: list[pa.Table]) -> tuple[int, int]:
        if self.failed.is_set():
            return 0, 0  # an earlier shard failed: write nothing more
        try:
            f_rows, e_rows = commit_shard(self.cfg, shard, parts, self.schema, self.metadata)
        except BaseException:
            self.failed.set()
            raise
        log.info("[extract] shard %d committed: %d features, %d errors", shard, f_rows, e_rows)
        return f_rows, e_rows

    def _collect(self, fut) -> None:
        f_rows, e_rows = fut.result()  # re-raises the writer's exception here, in the driver
        self.counts["features_rows_new"] += f_rows
        self.counts["error_rows_new"] += e_rows

    def submit(self, shard: int, parts: list[pa.Table]) -> None:
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.max_pending):
            t = time.perf_counter()
            fut = self.pending.pop(0)
            if not fut.done():
                fut.exception()  # wait for room; result collected just below
            self.stall_s += time.perf_counter() - t
            self._collect(fut)
        self.pending.append(self.pool.submit(self._write, shard, parts))

    def close(self) -> dict[str, int]:
        """Wait for every queued shard; raise the first failure."""
        t = time.perf_counter()
        try:
            while self.pending:
                self._collect(self.pending.pop(0))
            self.drain_s = time.perf_counter() - t
        finally:
            self.failed.set()  # on an error in the driver: queued shards are not written
            self.pool.shutdown(wait=True)
        return self.counts


def _shard_of(path: str) -> int | None:
    base = path.rsplit("/", 1)[-1]
    if base.startswith("part-") and base.endswith(".parquet"):
        try:
            return int(base[len("part-"):-len(".parquet")])
        except ValueError:
            return None
    return None


def _start_clean(cfg: Config) -> None:
    storage.delete(tables.location(cfg, "features"))
    tables.clear_errors(cfg, STAGE)


def run(cfg: Config) -> dict:
    """Write ``features/`` (and ``errors/`` rows of stage ``extract``) for every manifest image."""
    t0 = time.time()
    e = cfg.extract
    manifest = _read_manifest(cfg)
    n = manifest.num_rows
    models = _load_models(cfg)
    emb = models.embedding
    fingerprint = _digest(FEATURES_FORMAT, _manifest_digest(manifest), models.model_sha,
                          emb.name, emb.version, models.sizes, e.rows_per_file, e.min_image_side,
                          cfg.data.max_image_pixels, cfg.data.max_image_bytes,
                          *models.dlib_settings)
    metadata = _features_metadata(cfg, models, fingerprint)
    state_loc, n_shards, done, todo = _resume(cfg, fingerprint, n)
    work, expected = _work_rows(cfg, manifest, done, todo)

    gpus = gpus_per_actor(cfg)
    counts = {"features_rows_new": 0, "error_rows_new": 0}
    actors = [e.min_actors, e.max_actors]
    if work.num_rows:
        actors = list(_check_resources(cfg, gpus, dlib=emb.separate_pool))
        ds = _dataset(cfg, work, models, gpus, *actors)
        counts.update(_stream_to_shards(cfg, ds, expected, models.schema, metadata))

    feats_ids, err_ids = _check_every_image_accounted_for(cfg, n)
    storage.write_json(state_loc, {"fingerprint": fingerprint, "complete": True,
                                   "shards": n_shards, "images": n})
    faces = _face_counts(cfg, emb)
    seconds = time.time() - t0
    return {
        "images": n,
        "features_rows": len(feats_ids),
        "error_rows": len(err_ids),
        "shards": n_shards,
        "shards_resumed": len(done),
        **counts,
        "embedding": emb.name,
        "embedding_dim": emb.dim,
        **faces,
        "device": "cuda" if gpus > 0 else "cpu",
        "actors": actors,
        **({"dlib_actors": [e.dlib_min_actors, e.dlib_max_actors]} if emb.separate_pool else {}),
        "seconds": round(seconds, 2),
        "images_per_s": round(sum(expected.values()) / seconds, 2) if expected else 0.0,
    }


@dataclass
class _Models:
    """The trained attribute model's description and the embedding, checked on the driver."""

    info: Any  # pipeline.models.AttributeModelInfo
    model_loc: Any  # storage location of models/attributes
    model_sha: str  # of model.pt
    embedding: Any  # pipeline.embeddings.Embedding, its module dropped (the actors build it)
    emb_size: int  # the square size the embedding model reads
    sizes: tuple[int, ...]  # every square size decode makes
    geometry: bool  # extract.face_geometry (the config allows it with the dlib embedding only)
    schema: pa.Schema  # of features/
    dlib_settings: tuple  # dlib's own settings change its output (part of the fingerprint)


def _load_models(cfg: Config) -> _Models:
    """The trained attribute model (its sha256) and the embedding, built here once so that bad
    weights fail before any work starts (and to learn its dim and version)."""
    from pipeline.embeddings import build_embedding
    from pipeline.models import AttributeModelInfo, WeightsError

    e = cfg.extract
    model_loc = tables.location(cfg, "models/attributes")
    if not storage.exists(model_loc.join("model.json")):
        raise WeightsError(f"no trained attribute model at {model_loc.uri} (model.json missing); "
                           f"run the train_attributes stage first")
    info = AttributeModelInfo.from_json(storage.read_bytes(model_loc.join("model.json")).decode())
    model_sha = hashlib.sha256(storage.read_bytes(model_loc.join("model.pt"))).hexdigest()
    emb = build_embedding(e.embedding, e.embedding_weights, cfg.storage, attribute_info=info,
                          seed=_embedding_seed(cfg), download=cfg.weights.download)
    emb.module = None  # the actors build their own; the driver only needed dim and version
    # the square size the embedding model reads; attribute_backbone and dlib read none of their own
    emb_size = (info.image_size if e.embedding == "attribute_backbone" or emb.separate_pool
                else e.embedding_image_size)
    sizes = tuple(sorted({int(info.image_size), int(emb_size)}))
    geometry = e.face_geometry  # the config allows it with the dlib embedding only
    schema = features_schema(list(info.attributes), emb.dim, face_detected=emb.separate_pool,
                             face_geometry=geometry)
    # dlib's own settings change its output; other embeddings keep their earlier fingerprint
    dlib_settings = (e.dlib_upsample, e.dlib_max_side) if emb.separate_pool else ()
    if geometry:  # only then, so runs without it keep their earlier fingerprint
        from pipeline import dlib_face

        dlib_settings += ("face_geometry", dlib_face.landmarks68_sha256())
    return _Models(info, model_loc, model_sha, emb, emb_size, sizes, geometry, schema,
                   dlib_settings)


def _features_metadata(cfg: Config, models: _Models, fingerprint: str) -> dict[str, str]:
    """The provenance ``features/`` files carry: models, versions, sizes, the fingerprint."""
    import torch
    import torchvision

    e = cfg.extract
    info, emb, model_sha = models.info, models.embedding, models.model_sha
    metadata = {
        "faceaudit.features_format": FEATURES_FORMAT,
        "faceaudit.attribute_model": info.arch,
        "faceaudit.attribute_model_version": info.version or f"sha256:{model_sha[:16]}",
        "faceaudit.attribute_model_sha256": model_sha,
        "faceaudit.attribute_image_size": str(info.image_size),
        "faceaudit.embedding_model": emb.name,
        "faceaudit.embedding_version": emb.version,
        "faceaudit.embedding_weights": emb.weights,
        "faceaudit.embedding_dim": str(emb.dim),
        "faceaudit.embedding_image_size": str(models.emb_size),
        "faceaudit.embedding_origin": emb.origin,
        "faceaudit.attribute_model_origin": (f"trained by this run's train_attributes stage "
                                             f"({models.model_loc.join('model.pt').uri})"),
        "faceaudit.torch": torch.__version__,
        "faceaudit.torchvision": torchvision.__version__,
        "faceaudit.fingerprint": fingerprint,
    }
    if emb.separate_pool:
        from pipeline import dlib_face

        metadata.update({f"faceaudit.embedding_sha256.{name}": digest
                         for name, digest in dlib_face.weights_sha256().items()})
        metadata["faceaudit.embedding_image_size"] = (
            f"original (longer side <= {e.dlib_max_side} px), {dlib_face.CHIP_SIZE} px chips"
            if e.dlib_max_side else f"original, {dlib_face.CHIP_SIZE} px chips")
        metadata["faceaudit.dlib_upsample"] = str(e.dlib_upsample)
    if models.geometry:
        from pipeline import dlib_face

        metadata["faceaudit.face_geometry"] = (
            f"dlib 68-point landmarks, {dlib_face.GEOMETRY_DIM} values "
            f"(sha256 {dlib_face.landmarks68_sha256()[:16]})")
    return metadata


def _resume(cfg: Config, fingerprint: str, n: int):
    """Resume a run with the same fingerprint or start clean; returns (state file, shard
    count, shards already written, shards to do)."""
    e = cfg.extract
    state_loc = tables.root(cfg).join(*STATE.split("/"))
    state = storage.read_json(state_loc) if storage.exists(state_loc) else None
    n_shards = max(1, -(-n // e.rows_per_file))
    if state is None or state.get("fingerprint") != fingerprint or state.get("complete"):
        if state is not None:
            log.info("[extract] %s: starting clean", "previous run finished (forced rerun)"
                     if state.get("fingerprint") == fingerprint else "inputs or settings changed")
        _start_clean(cfg)
        storage.write_json(state_loc, {"fingerprint": fingerprint, "complete": False,
                                       "shards": n_shards, "images": n})
    feat_loc = tables.location(cfg, "features")
    # temp files of a killed run's unfinished writes (hidden from readers) are garbage now
    for info_ in storage.list_files(feat_loc, recursive=False):
        if info_.base_name.startswith(storage.TEMP_PREFIX):
            feat_loc.fs.delete_file(info_.path)
    done = {s for s in (_shard_of(p) for p in storage.parquet_files(feat_loc)) if s is not None}
    todo = [s for s in range(n_shards) if s not in done]
    log.info("[extract] %d images in %d shards; %d done, %d to do", n, n_shards, len(done),
             len(todo))
    return state_loc, n_shards, done, todo


def _work_rows(cfg: Config, manifest: pa.Table, done: set, todo: list[int]
               ) -> tuple[pa.Table, dict[int, int]]:
    """The manifest rows of the shards to do, with their shard; rows expected per shard."""
    shard_ids = (np.arange(manifest.num_rows) // cfg.extract.rows_per_file).astype(np.int32)
    work = manifest.append_column("shard", pa.array(shard_ids, pa.int32()))
    if done:
        work = work.filter(pc.is_in(work["shard"], pa.array(todo, pa.int32())))
    expected = {int(s): int(c) for s, c in
                zip(*np.unique(work["shard"].to_numpy(), return_counts=True))}
    return work, expected


def _dataset(cfg: Config, work: pa.Table, models: _Models, gpus: float, lo: int, hi: int):
    """The Ray Data stream: decode tasks, then the attribute (and embedding) actor pool, then
    dlib's own pool when the embedding is dlib."""
    import ray
    import ray.data

    e = cfg.extract
    emb = models.embedding
    # blocks of batch_size rows: one decode task per inference batch, and enough blocks
    # that decoding runs ahead of the actors
    blocks = [work.slice(i, e.batch_size) for i in range(0, work.num_rows, e.batch_size)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        decode_block, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
        num_cpus=e.cpus_per_decode_task,
        compute=ray.data.TaskPoolStrategy(size=e.decode_tasks or None),
        fn_kwargs={"storage_cfg": cfg.storage, "sizes": models.sizes,
                   "min_side": e.min_image_side, "read_threads": e.read_threads,
                   "max_pixels": cfg.data.max_image_pixels,
                   "max_bytes": cfg.data.max_image_bytes,
                   "original_max_side": e.dlib_max_side if emb.separate_pool else None})
    ds = ds.map_batches(
        AttributeInfer, batch_format="pyarrow", batch_size=e.batch_size, zero_copy_batch=True,
        compute=_actor_pool(cfg, lo, hi, gpus),
        num_cpus=e.cpus_per_actor, num_gpus=gpus,
        fn_constructor_kwargs={"cfg": cfg, "use_gpu": gpus > 0,
                               "threads": max(1, int(round(e.cpus_per_actor)))})
    if emb.separate_pool:
        # dlib on CPU in its own autoscaled pool: a GPU attribute pool never waits on it
        # beyond what the slower pool dictates (Ray Data's backpressure between the two)
        ds = ds.map_batches(
            _DlibInfer, batch_format="pyarrow", batch_size=e.dlib_batch_size,
            zero_copy_batch=True,
            compute=ray.data.ActorPoolStrategy(min_size=e.dlib_min_actors,
                                               max_size=e.dlib_max_actors),
            num_cpus=e.cpus_per_dlib_actor,
            fn_constructor_kwargs={"attributes": list(models.info.attributes),
                                   "upsample": e.dlib_upsample, "geometry": models.geometry})
    return ds


def _stream_to_shards(cfg: Config, ds, expected: dict[int, int], schema: pa.Schema,
                      metadata: dict[str, str]) -> dict:
    """Run the stream; commit each shard once all its rows are back. Returns the new feature
    and error rows and the time the stream waited for the writer."""
    pending: dict[int, list[pa.Table]] = {}
    got: dict[int, int] = {}
    counts: dict = {}
    writer = _ShardWriter(cfg, schema, metadata, cfg.extract.commit_queue_shards)
    progress = Progress(STAGE, "images", sum(expected.values()), unit="images")
    ok = False
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            progress.add(batch.num_rows)
            # blocks may arrive out of order; buffer per shard, commit a shard once complete
            for s in pc.unique(batch["shard"]).to_pylist():
                part = batch.filter(pc.equal(batch["shard"], s))
                pending.setdefault(s, []).append(part)
                got[s] = got.get(s, 0) + part.num_rows
                if got[s] == expected[s]:
                    writer.submit(s, pending.pop(s))
                elif got[s] > expected[s]:
                    raise RuntimeError(f"shard {s}: {got[s]} rows came back, expected "
                                       f"{expected[s]} (duplicated blocks)")
        ok = True
    finally:
        if ok:
            counts.update(writer.close())
        else:  # the stream failed: stop writing, keep the stream's error
            writer.failed.set()
            writer.pool.shutdown(wait=True, cancel_futures=True)
    counts["commit_stall_s"] = round(writer.stall_s, 2)
    counts["commit_drain_s"] = round(writer.drain_s, 2)
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their rows "
                           f"({ {s: got[s] for s in pending} } of "
                           f"{ {s: int(expected[s]) for s in pending} })")
    return counts


def _check_every_image_accounted_for(cfg: Config, n: int) -> tuple[pa.ChunkedArray,
                                                                   pa.ChunkedArray]:
    """The finished table must account for every manifest image exactly once; returns the
    feature and error rows' image ids."""
    feats_ids = tables.read(cfg, "features", columns=["image_id"])["image_id"]
    err_ids = tables.read_errors(cfg, STAGE)["image_id"]
    all_ids = pa.chunked_array(feats_ids.chunks + err_ids.chunks, pa.string())
    if len(all_ids) != n or pc.count_distinct(all_ids).as_py() != n:
        raise RuntimeError(f"extract output does not match the manifest: {len(feats_ids)} feature "
                           f"rows + {len(err_ids)} error rows for {n} images")
    return feats_ids, err_ids


def _face_counts(cfg: Config, emb) -> dict[str, int]:
    """With dlib: how many rows had a detected face and how many used the fallback box."""
    if not emb.separate_pool:
        return {}
    det = tables.read(cfg, "features", columns=["face_detected"])["face_detected"]
    found = int(pc.sum(det).as_py() or 0)
    # rows whose embedding came from the fallback box, not a detected face
    return {"faces_detected": found, "face_fallbacks": len(det) - found}
