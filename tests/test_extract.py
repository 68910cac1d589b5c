"""The extract stage on a tiny generated dataset: real Ray Data pipeline, random-init models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import extract, storage, tables
from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.models import (AttributeModelInfo, WeightsError, build_attribute_model,
                             export_attribute_model)
from pipeline.schemas import manifest_schema
from tests.helpers import tiny_config, write_tiny_manifest


def export_random_attribute_model(cfg, image_size: int = 32, seed: int = 0) -> None:
    """What the train stage would export, with random weights (tests must not depend on train)."""
    torch.manual_seed(seed)
    model = build_attribute_model(len(CELEBA_ATTRIBUTES))
    info = AttributeModelInfo(arch="mobilenet_v2", attributes=list(CELEBA_ATTRIBUTES),
                              image_size=image_size, version="test-random")
    export_attribute_model(model, info, tables.location(cfg, "models/attributes"))


def small_cfg(tmp_path: Path, *overrides: str):
    # 4-row shards so that a 20-image run has several shards to resume between
    return tiny_config(tmp_path, "extract.rows_per_file=4", "extract.batch_size=8", *overrides)


def read_features(cfg) -> pa.Table:
    return tables.read(cfg, "features").sort_by("image_id")


def test_features_table_schema_rows_and_readers(tmp_path, ray_session):
    cfg = small_cfg(tmp_path)
    manifest = write_tiny_manifest(cfg, n=10)
    export_random_attribute_model(cfg)
    result = extract.run(cfg)
    assert result["images"] == 10 and result["features_rows"] == 10 and result["error_rows"] == 0
    assert result["shards"] == 3 and result["shards_resumed"] == 0

    feats = read_features(cfg)
    expected_schema = extract.features_schema(list(CELEBA_ATTRIBUTES), 2048)
    assert feats.schema.remove_metadata().equals(expected_schema)
    assert feats["image_id"].to_pylist() == sorted(manifest["image_id"].to_pylist())
    # content_hash is the hash of each file's bytes (the audit's exact-duplicate key)
    uri_of = dict(zip(manifest["image_id"].to_pylist(), manifest["uri"].to_pylist()))
    assert feats["content_hash"].to_pylist() == [
        extract.content_hash(open(uri_of[i], "rb").read()) for i in feats["image_id"].to_pylist()]
    probs = np.stack([feats[f"p_{a}"].to_numpy() for a in CELEBA_ATTRIBUTES], 1)
    assert probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    emb = np.stack(feats["embedding"].to_numpy(zero_copy_only=False))
    assert emb.shape == (10, 2048) and np.isfinite(emb).all()
    # different images give different embeddings (not a constant placeholder)
    assert np.unique(emb.round(5), axis=0).shape[0] == 10

    files = storage.parquet_files(tables.location(cfg, "features"))
    assert [f.rsplit("/", 1)[-1] for f in files] == [f"part-{i:05d}.parquet" for i in range(3)]
    meta = pq.read_schema(files[0]).metadata
    assert meta[b"faceaudit.embedding_model"] == b"resnet50"
    assert meta[b"faceaudit.attribute_model"] == b"mobilenet_v2"
    assert meta[b"faceaudit.attribute_model_version"] == b"test-random"
    assert meta[b"faceaudit.embedding_dim"] == b"2048"

    import duckdb
    import pandas as pd
    import polars as pl

    folder = tables.location(cfg, "features").path
    con = duckdb.connect()
    n, dim, lo = con.execute(
        f"select count(*), max(len(embedding)), min(p_Male) from read_parquet('{folder}/*.parquet')"
    ).fetchone()
    assert (n, dim) == (10, 2048) and 0 < lo < 1
    df = pl.read_parquet(folder)
    assert df.height == 10 and df.schema["embedding"] == pl.Array(pl.Float32, 2048)
    assert df.schema["p_Young"] == pl.Float32
    pdf = pd.read_parquet(folder)
    assert len(pdf) == 10 and len(pdf["embedding"].iloc[0]) == 2048
    # the fixed_size_list is stored as a standard Parquet LIST of FLOAT: what Spark reads as
    # array<float> (Spark is not installed here to read it directly)
    pschema = pq.ParquetFile(files[0]).schema
    emb_col = [c for c in pschema if c.path.startswith("embedding.")][0]
    assert emb_col.physical_type == "FLOAT" and emb_col.max_repetition_level == 1
    assert pschema.column(len(CELEBA_ATTRIBUTES) + 1).path == "embedding.list.element"


def _jpeg(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(buf, format=kw.pop("format", "JPEG"), **kw)
    return buf.getvalue()


def test_bad_images_are_converted_or_recorded(tmp_path, ray_session):
    # the attribute model's own features: one network, so the test spends its time on decoding
    cfg = small_cfg(tmp_path, "extract.embedding=attribute_backbone")
    manifest = write_tiny_manifest(cfg, n=4)
    export_random_attribute_model(cfg)
    img_dir = Path(cfg.data.root) / "img"
    rng = np.random.default_rng(1)
    face = rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)
    good_jpeg = _jpeg(face)
    files = {
        "gray.jpg": _jpeg(face[..., 0]),  # grayscale (L) JPEG
        "cmyk.jpg": _jpeg(face, mode="CMYK"),  # CMYK JPEG
        "png_named.jpg": _jpeg(face, format="PNG"),  # a PNG with a .jpg name
        "rgba_png.jpg": _jpeg(np.dstack([face[::-1], face[..., :1]]), format="PNG"),
        "odd_size.jpg": _jpeg(rng.integers(0, 255, (40, 500, 3), dtype=np.uint8)),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "zero.jpg": b"",
        "garbage.jpg": b"this is not an image at all" * 10,
        "tiny.jpg": _jpeg(face[:8, :8]),
    }
    for name, data in files.items():
        (img_dir / name).write_bytes(data)
    names = list(files) + ["missing.jpg"]  # listed in the manifest, absent on disk
    extra = pa.Table.from_pylist(
        [{"image_id": n, "uri": str(img_dir / n), "split": "test", "dataset": "celeba"}
         for n in names], schema=manifest_schema())
    full = pa.concat_tables([manifest, extra])
    tables.replace(cfg, "manifest", full, schema=manifest_schema())

    result = extract.run(cfg)
    feats = read_features(cfg)
    errs = tables.read_errors(cfg, "extract")
    reasons = dict(zip(errs["image_id"].to_pylist(), errs["reason"].to_pylist()))
    ok = set(feats["image_id"].to_pylist())
    assert {"gray.jpg", "cmyk.jpg", "png_named.jpg", "rgba_png.jpg", "odd_size.jpg"} <= ok
    assert set(manifest["image_id"].to_pylist()) <= ok
    assert set(reasons) == {"truncated.jpg", "zero.jpg", "garbage.jpg", "tiny.jpg", "missing.jpg"}
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert "not an image" in reasons["garbage.jpg"]
    assert "too small: 8x8" in reasons["tiny.jpg"]
    assert reasons["missing.jpg"] == "missing file"
    assert set(errs["stage"].to_pylist()) == {"extract"}
    assert errs["uri"].to_pylist()[0].startswith(str(img_dir))
    assert feats.num_rows + errs.num_rows == full.num_rows == result["images"]
    assert not ok & set(reasons)
    # converted images hold real features, not placeholders
    emb = np.stack(feats["embedding"].to_numpy(zero_copy_only=False))
    # random-init MobileNetV2 features are tiny (~1e-10): compare directions, not magnitudes
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.isfinite(unit).all() and np.unique(unit.round(4), axis=0).shape[0] == feats.num_rows


def test_decode_image_conversions():
    rng = np.random.default_rng(2)
    face = rng.integers(0, 255, (218, 178, 3), dtype=np.uint8)
    for data in (_jpeg(face[..., 0]), _jpeg(face, mode="CMYK"), _jpeg(face, format="PNG")):
        a, b = extract.decode_image(data, (32, 64))
        assert a.shape == (32, 32, 3) and b.shape == (64, 64, 3) and a.dtype == np.uint8
    # grayscale becomes three equal channels
    g = extract.decode_image(_jpeg(face[..., 0]), (32,))[0]
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    # 16-bit grayscale PNG is scaled to 8 bits, not clipped to white
    buf = io.BytesIO()
    Image.fromarray((face[..., 0].astype(np.uint16) * 200)).save(buf, format="PNG")
    g16 = extract.decode_image(buf.getvalue(), (32,))[0]
    assert 0 < g16.mean() < 250
    with pytest.raises(extract.BadImage, match="0 bytes"):
        extract.decode_image(b"", (32,))


def _equal_tables(a: pa.Table, b: pa.Table) -> None:
    assert a["image_id"].to_pylist() == b["image_id"].to_pylist()
    assert a.column_names == b.column_names
    for name in a.column_names:
        if name.startswith("p_"):
            np.testing.assert_allclose(a[name].to_numpy(), b[name].to_numpy(), rtol=1e-4,
                                       atol=1e-5)
        elif name not in ("image_id", "embedding"):  # content_hash, face_detected: exact
            assert a[name].to_pylist() == b[name].to_pylist(), name
    ea = np.stack(a["embedding"].to_numpy(zero_copy_only=False))
    eb = np.stack(b["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(ea, eb, rtol=1e-4, atol=1e-4)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, ray_session, monkeypatch):
    cfg = small_cfg(tmp_path, "extract.embedding=attribute_backbone")
    write_tiny_manifest(cfg, n=20)
    export_random_attribute_model(cfg)
    (Path(cfg.data.root) / "img" / "000007.jpg").write_bytes(b"")  # one error row, too

    # "kill" the run after two shards were committed: the third commit raises
    real_commit = extract.commit_shard
    calls = {"n": 0}

    def dying_commit(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(extract, "commit_shard", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg)
    monkeypatch.setattr(extract, "commit_shard", real_commit)
    parts = storage.parquet_files(tables.location(cfg, "features"))
    assert len(parts) == 2  # whole shards only, nothing half-written

    # also lose one committed shard's file, as if the kill came between its two writes
    storage.delete(storage.filesystem(parts[0]))
    resumed = extract.run(cfg)
    assert resumed["shards"] == 5 and resumed["shards_resumed"] == 1
    assert resumed["features_rows_new"] + resumed["error_rows_new"] == 16
    resumed_feats = read_features(cfg)
    errs = tables.read_errors(cfg, "extract")
    assert errs["image_id"].to_pylist() == ["000007.jpg"]
    assert resumed_feats.num_rows == 19 and len(set(resumed_feats["image_id"].to_pylist())) == 19
    assert not [i for i in storage.list_files(tables.location(cfg, "features"))
                if i.base_name.startswith(".")]

    # a rerun of a finished extract (a forced rerun) starts clean: it is the uninterrupted run,
    # and the resumed table must equal it; it decodes one task at a time (extract.decode_tasks),
    # which is not part of the fingerprint and changes nothing in the tables
    again = extract.run(small_cfg(tmp_path, "extract.embedding=attribute_backbone",
                                  "extract.decode_tasks=1"))
    assert again["shards_resumed"] == 0 and again["features_rows_new"] == 19
    _equal_tables(resumed_feats, read_features(cfg))
    assert tables.read_errors(cfg, "extract")["image_id"].to_pylist() == ["000007.jpg"]


def test_changed_settings_start_clean_and_attribute_backbone(tmp_path, ray_session):
    cfg = small_cfg(tmp_path)
    write_tiny_manifest(cfg, n=6)
    export_random_attribute_model(cfg)
    extract.run(cfg)
    # switch to the attribute model's own pooled features: new dim, nothing reused
    cfg2 = small_cfg(tmp_path, "extract.embedding=attribute_backbone")
    result = extract.run(cfg2)
    assert result["shards_resumed"] == 0 and result["embedding_dim"] == 1280
    feats = read_features(cfg2)
    assert feats.schema.field("embedding").type == pa.list_(pa.float32(), 1280)
    assert feats.num_rows == 6


def test_clear_errors_for_missing_inputs(tmp_path, ray_session):
    cfg = small_cfg(tmp_path)
    with pytest.raises(storage.StorageError, match="run the ingest stage"):
        extract.run(cfg)
    write_tiny_manifest(cfg, n=2)
    with pytest.raises(WeightsError, match="train_attributes"):
        extract.run(cfg)
    export_random_attribute_model(cfg)
    bad = small_cfg(tmp_path, f"extract.embedding_weights={tmp_path / 'nope.pt'}")
    with pytest.raises(WeightsError, match="does not exist"):
        extract.run(bad)
    face = small_cfg(tmp_path, "extract.embedding=facenet")
    # facenet-pytorch is not a dependency: its absence must be a clear error
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        with pytest.raises(WeightsError, match="facenet-pytorch"):
            extract.run(face)
    hog = small_cfg(tmp_path, "extract.cpus_per_actor=2")
    from pipeline.resources import ResourceError

    with pytest.raises(ResourceError, match=r"1 x \{CPU: 2\} \+ 1 x \{CPU: 0.5\}.*nodes hold "
                                            r"\{CPU: 2, GPU: 0\}"):
        extract.run(hog)


def test_pixel_rows_is_a_view_of_the_arrow_buffer_and_skips_error_rows():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    col = pa.array([imgs[0].tobytes(), None, imgs[2].tobytes(), imgs[3].tobytes(), None],
                   pa.binary())
    rows = extract.pixel_rows(col, 4)
    assert np.array_equal(rows, imgs[[0, 2, 3]])
    # zero copy: the array's memory is the Arrow value buffer itself
    assert rows.ctypes.data == col.buffers()[2].address
    # a slice (non-zero offset) and several chunks (Ray Data batches may have them)
    assert np.array_equal(extract.pixel_rows(col.slice(2), 4), imgs[[2, 3]])
    chunked = pa.chunked_array([col.slice(0, 2), col.slice(2)])
    assert np.array_equal(extract.pixel_rows(chunked, 4), imgs[[0, 2, 3]])
    assert extract.pixel_rows(pa.array([None], pa.binary()), 4).shape == (0, 4, 4, 3)
    with pytest.raises(ValueError, match="pixel row 1 has 3 bytes, expected 48"):
        extract.pixel_rows(pa.array([imgs[0].tobytes(), b"abc"], pa.binary()), 4)


def test_actor_inputs_match_the_reference_normalisation(tmp_path):
    """The actor's zero-copy chain gives the same tensors as (x / 255 - mean) / std."""
    cfg = small_cfg(tmp_path, "extract.embedding=attribute_backbone")
    export_random_attribute_model(cfg)
    inf = extract.AttributeInfer(cfg, use_gpu=False, threads=1)
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = pa.table({"image_id": ["a", "b", "c"], "uri": ["a", "b", "c"],
                      "shard": pa.array([0, 0, 0], pa.int32()),
                      "error": pa.array([None, "bad", None], pa.string()),
                      "content_hash": pa.array(["h0", None, "h2"], pa.string()),
                      "px32": pa.array([imgs[0].tobytes(), None, imgs[2].tobytes()])})
    xa, _ = inf.inputs(batch, np.array([0, 2]))
    m = torch.tensor(inf.info.mean).view(1, 3, 1, 1)
    s = torch.tensor(inf.info.std).view(1, 3, 1, 1)
    ref = (torch.from_numpy(imgs[[0, 2]]).permute(0, 3, 1, 2).float() / 255 - m) / s
    assert torch.allclose(xa, ref, atol=1e-5)
    assert xa.is_contiguous(memory_format=torch.channels_last)
    # the GPU path's staging buffer (pinned there, ordinary here): one per thread, reused, grown
    rows = extract.pixel_rows(batch["px32"], 32)
    first = inf._staged("attr", rows)
    assert np.array_equal(first.numpy(), rows)
    assert inf._staged("attr", rows[:1]).data_ptr() == first.data_ptr()
    assert np.array_equal(inf._staged("attr", np.concatenate([rows] * 3)).numpy()[4:],
                          rows)
    out = inf(batch)
    assert out["p_Male"].null_count == 1 and out["embedding"].null_count == 1
    assert out["p_Male"][1].as_py() is None and out["p_Male"][0].as_py() is not None


def test_forward_runs_each_model_once_per_batch(tmp_path):
    """One batch is one pass of the attribute model and one of the embedding model, and the
    outputs are theirs (a merge once left a second embedding pass and a second sync in)."""
    cfg = small_cfg(tmp_path, "extract.embedding=resnet50", "extract.embedding_image_size=32")
    export_random_attribute_model(cfg)
    inf = extract.AttributeInfer(cfg, use_gpu=False, threads=1)
    calls = {"attr": 0, "emb": 0}
    # the actor calls the attribute model as embed + head, the embedding model as a module
    inf.attr_model.embed = _counted(inf.attr_model.embed, calls, "attr")
    inf.emb_model.register_forward_hook(lambda *_: calls.__setitem__("emb", calls["emb"] + 1))
    rng = np.random.default_rng(2)
    xa = torch.from_numpy(rng.standard_normal((2, 3, 32, 32), np.float32))
    xe = torch.from_numpy(rng.standard_normal((2, 3, 32, 32), np.float32))
    probs, emb = inf.forward(xa, xe)
    assert calls == {"attr": 1, "emb": 1}
    with torch.inference_mode():
        want_emb = inf.emb_model(xe).numpy()
        want_probs = torch.sigmoid(inf.attr_model.head(inf.attr_model.embed(xa))).numpy()
    assert np.allclose(emb, want_emb, atol=1e-5) and np.allclose(probs, want_probs, atol=1e-6)
    assert probs.shape == (2, len(inf.attributes))


def _counted(fn, calls, name):
    def wrapped(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapped


def test_host_chain_benchmark_runs_and_both_chains_agree():
    """`python -m jobs.benchmark extract_host` at tiny sizes: it checks the old and new chains
    give the same pixels and outputs before timing them."""
    from pipeline.benchmarks import extract_host

    res = extract_host.run(tiny_config(Path("/nonexistent")), batch=8, size=16, attr_size=8,
                           errors=2, dim=4, attributes=3, seconds=0.01)
    assert res["batch"] == 8 and res["sizes_px"] == [8, 16]
    assert res["now_images_per_s"] > 0 and res["before_images_per_s"] > 0


def test_shard_writer_runs_off_the_stream_bounded_and_stops_after_a_failure(monkeypatch):
    import time

    written = []

    def slow_commit(cfg, shard, parts, schema, metadata):
        time.sleep(0.2)
        if shard == 3:
            raise OSError("S3 said no")
        written.append(shard)
        return sum(p.num_rows for p in parts), 0

    monkeypatch.setattr(extract, "commit_shard", slow_commit)
    part = pa.table({"x": [1, 2]})
    w = extract._ShardWriter(None, None, {}, max_pending=2)
    t0 = time.perf_counter()
    w.submit(0, [part])
    w.submit(1, [part])
    assert time.perf_counter() - t0 < 0.15  # queued, not written inline
    w.submit(2, [part])  # the queue is full: waits for shard 0
    assert 0.15 < time.perf_counter() - t0 and w.stall_s > 0.1
    assert w.close() == {"features_rows_new": 6, "error_rows_new": 0}
    assert written == [0, 1, 2]

    written.clear()
    w = extract._ShardWriter(None, None, {}, max_pending=4)
    for s in (3, 4, 5):
        w.submit(s, [part])
    with pytest.raises(OSError, match="S3 said no"):
        w.close()
    assert written == []  # nothing after the failed shard is written


@pytest.mark.slow
def test_extract_benchmark_measures_the_bare_models_on_both_sides(tmp_path, ray_session):
    """`python -m jobs.benchmark extract -- --images N` at a tiny size: the pipeline's rate, the
    bare models measured before and after it, and the ratio to their mean."""
    from pipeline.benchmarks import extract as bench

    cfg = small_cfg(tmp_path, "extract.max_actors=1", "extract.cpus_per_actor=1",
                    "extract.embedding=attribute_backbone")
    out = bench.run(cfg, images=24, bare_seconds=0.2)
    assert out["images"] == 24 and out["error_rows"] == 0
    runs = out["a_bare_runs_images_per_s"]
    assert len(runs) == 2 and all(r > 0 for r in runs)
    assert out["a_bare_models_images_per_s"] == pytest.approx(sum(runs) / 2, abs=0.1)
    assert out["ratio_b_over_a"] == pytest.approx(
        out["b_pipeline_images_per_s"] / out["a_bare_models_images_per_s"], abs=2e-3)
