"""Hostile and broken inputs (issue #12): no planted file runs code, nothing hangs or exhausts
memory, one bad line never sinks a whole file, two runs never destroy each other.

One test (or a small group, ``test_<item>_...``) per item of the issue; each failed on the main
branch before the fix.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import explain, ingest, runlog, storage, tables
from pipeline.classify import load_model as classify_load_model
from pipeline.config import ConfigError, load_config
from pipeline.extract import BadImage, decode_image
from pipeline.sample import make_sample
from pipeline.schemas import manifest_schema
from tests.conftest import s3_overrides
from tests.helpers import tiny_config

# ---------------------------------------------------------------------------------------------
# 1. A planted model file runs code


def _savetxt_payload(target: Path) -> bytes:
    """A .skops file whose tree calls ``numpy.savetxt(target, [[1, 2]])`` when loaded.

    skops' LossNode calls the class named in the file with the file's arguments; a loader that
    trusts whatever ``get_untrusted_types`` lists (or any ``numpy.*`` name) runs it.
    """
    import skops.io as sio

    def tree(obj) -> dict:
        doc = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps(obj))).read("schema.json"))
        doc.pop("protocol"), doc.pop("_skops_version")
        return doc

    proto = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps({}))).read("schema.json"))
    schema = {"__class__": "savetxt", "__module__": "numpy", "__loader__": "LossNode",
              "__reduce__": {"args": tree((str(target), [[1.0, 2.0]]))}, "content": tree({}),
              "__id__": 1, "protocol": proto["protocol"], "_skops_version": proto["_skops_version"]}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("schema.json", json.dumps(schema))
    return buf.getvalue()


def test_1_planted_model_file_runs_no_code_and_paths_stay_inside(tmp_path):
    cfg = tiny_config(tmp_path)
    target = tmp_path / "pwned.txt"
    rel = "classifiers/model_files/random_forest__none__global.skops"
    model_file = Path(cfg.output.root) / rel
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(_savetxt_payload(target))
    spec = explain.ModelSpec("random_forest", "none", "global", None, rel, ("a", "b"))

    with pytest.raises(explain.ExplainError, match=r"untrusted types \['numpy.savetxt'\]"):
        explain.load_model(cfg, spec)
    assert not target.exists()
    with pytest.raises(ValueError, match="numpy.savetxt"):
        classify_load_model(cfg, rel)
    assert not target.exists()

    # a path in the classifiers/models index that leaves the output root is refused, symlinks
    # included
    outside = tmp_path / "outside.skops"
    outside.write_bytes(model_file.read_bytes())
    (Path(cfg.output.root) / "classifiers/model_files/link.skops").symlink_to(outside)
    for bad in ("../outside.skops", str(outside), "classifiers/../../outside.skops",
                "classifiers/model_files/link.skops"):
        with pytest.raises(explain.ExplainError, match="refusing it"):
            explain.load_model(cfg, explain.ModelSpec("m", "none", "global", None, bad, ()))
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# 2. Listing follows symlinks


@pytest.mark.timeout(60)
def test_2_listing_never_leaves_the_root_nor_loops(tmp_path):
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "private.jpg").write_bytes(b"not yours")
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("RGB", (32, 32)).save(root / "a" / "face.jpg")
    (root / "a" / "loop").symlink_to("..")  # one such link gave 48,438 entries
    (root / "b" / "loop").symlink_to("..")  # two hung the listing
    (root / "etc").symlink_to(secret)  # a link out of the root
    (root / "b" / "again.jpg").symlink_to("../a/face.jpg")  # the same file twice

    t0 = time.perf_counter()
    files, skipped = storage.list_tree(storage.filesystem(str(root)))
    assert time.perf_counter() - t0 < 2
    assert [f.path for f in files] == [str(root / "a" / "face.jpg")]
    assert {s.uri for s in skipped} == {str(root / "a" / "loop"), str(root / "b" / "loop"),
                                       str(root / "etc"), str(root / "b" / "again.jpg")}

    cfg = tiny_config(tmp_path, "data.dataset=folder", f"data.root={root}")
    ingest.run(cfg)
    assert tables.read(cfg, "manifest")["image_id"].to_pylist() == ["a/face.jpg"]
    errs = tables.read_errors(cfg, "ingest").to_pylist()
    assert {e["uri"] for e in errs} == {s.uri for s in skipped}
    assert all(e["reason"].startswith("not listed: ") for e in errs)
    assert any("outside the listed root" in e["reason"] for e in errs)


# ---------------------------------------------------------------------------------------------
# 3. Memory is unbounded


def _huge_grey_png(path: Path, side: int = 9500) -> None:
    """A ~90 KB greyscale PNG of ``side`` x ``side`` pixels, written without the pixels in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + one row of black pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_3_size_limits_are_checked_before_decoding(tmp_path):
    from pipeline.report._context import Context
    from pipeline.report._faces import FaceReader

    big = tmp_path / "data" / "img" / "huge.png"
    big.parent.mkdir(parents=True)
    _huge_grey_png(big)
    assert big.stat().st_size < 200_000
    data = big.read_bytes()
    with pytest.raises(BadImage, match=r"9500x9500 = 90,250,000 pixels, over data.max_image_pixels"):
        decode_image(data, (32,))

    cfg = tiny_config(tmp_path, "data.dataset=folder")
    reader = FaceReader(Context(cfg))  # the report's face thumbnails
    assert reader.load(pl.DataFrame({"image_id": ["huge.png"], "uri": [str(big)]})
                       .to_pandas()) == []
    assert "data.max_image_pixels" in reader.failed[0]["reason"]

    # file-size limit: from the listing at ingest (no read), and again on read
    Image.new("RGB", (40, 40)).save(big.parent / "ok.jpg")
    cfg = tiny_config(tmp_path, "data.dataset=folder", "data.max_image_bytes=50000")
    ingest.run(cfg)
    assert tables.read(cfg, "manifest")["image_id"].to_pylist() == ["img/ok.jpg"]
    (err,) = tables.read_errors(cfg, "ingest").to_pylist()
    assert err["uri"] == str(big) and "over data.max_image_bytes = 50000" in err["reason"]
    from pipeline.images import ImageRejected, read_limited

    with pytest.raises(ImageRejected, match="data.max_image_bytes"):
        read_limited(str(big), cfg.storage, 50_000)


# ---------------------------------------------------------------------------------------------
# 4. One bad line sinks the whole annotation file


def test_4_damaged_annotation_file_keeps_every_good_row(tmp_path):
    cfg = tiny_config(tmp_path)
    make_sample(cfg.data.root, 12, seed=1)
    attr = Path(cfg.data.root) / "list_attr_celeba.txt"
    lines = attr.read_bytes().split(b"\n")
    lines.insert(1, b"")  # a blank line between the count line and the header
    lines[5] = lines[5].replace(b" ", b" \xff", 1)  # one non-UTF-8 byte in one row
    attr.write_bytes(b"\n".join(lines))
    result = ingest.run(cfg)
    assert result["rows"] == 11
    reasons = tables.read_errors(cfg, "ingest")["reason"].to_pylist()
    assert any("line 6: not valid UTF-8" in r for r in reasons), reasons

    # Kaggle CSV: a header field with a space, and an empty one
    csv_cfg = tiny_config(tmp_path / "csv")
    make_sample(csv_cfg.data.root, 12, seed=1)
    root = Path(csv_cfg.data.root)
    txt = (root / "list_attr_celeba.txt").read_text().splitlines()
    names = txt[1].split()
    rows = [ln.split() for ln in txt[2:]]
    header = ["image_id", "Big Nose", *names[1:5], ""]
    body = [",".join([r[0], *r[1:6], "1"]) for r in rows]
    (root / "list_attr_celeba.txt").unlink()
    (root / "list_attr_celeba.csv").write_text("\n".join([",".join(header), *body]) + "\n")
    result = ingest.run(csv_cfg)
    assert result["rows"] == 12
    m = tables.read(csv_cfg, "manifest")
    assert "Big Nose" in m.column_names and m.column_names.count("") == 0
    assert any("header field(s) [7] are empty" in r
               for r in tables.read_errors(csv_cfg, "ingest")["reason"].to_pylist())


def test_4_non_utf8_file_name_is_an_errors_row(tmp_path):
    cfg = tiny_config(tmp_path, "data.dataset=folder")
    root = Path(cfg.data.root)
    root.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(root / "good.jpg")
    with open(os.fsencode(root) + b"/bad-\xff.jpg", "wb") as f:
        f.write(b"x")
    ingest.run(cfg)
    assert tables.read(cfg, "manifest")["image_id"].to_pylist() == ["good.jpg"]
    (err,) = tables.read_errors(cfg, "ingest").to_pylist()
    assert err["uri"] == f"{root}/bad-\\xff.jpg" and "not valid UTF-8" in err["reason"]


def test_4_lfw_strays_and_irregular_utkface_names(tmp_path):
    cfg = tiny_config(tmp_path, "data.dataset=lfw")
    make_sample(cfg.data.root, 6, seed=0, fmt="lfw")
    lfw = Path(cfg.data.root) / "lfw"
    person = next(p for p in lfw.iterdir() if p.is_dir())
    Image.new("RGB", (40, 40)).save(lfw / "top.jpg")
    (person / "deeper").mkdir()
    Image.new("RGB", (40, 40)).save(person / "deeper" / "x.jpg")
    ingest.run(cfg)
    errs = {e["uri"]: e["reason"] for e in tables.read_errors(cfg, "ingest").to_pylist()}
    assert set(errs) == {str(lfw / "top.jpg"), str(person / "deeper" / "x.jpg")}
    assert all("not in a <person>/ folder" in r for r in errs.values())

    cfg = tiny_config(tmp_path / "utk", "data.dataset=utkface")
    utk = Path(cfg.data.root) / "UTKFace"
    utk.mkdir(parents=True)
    names = {"24_0_1_20170116220224657 .jpg.chip.jpg": (24, "male", "black"),
             "55_0_0_20170116232725357jpg.chip.jpg": (55, "male", "white"),
             "39_1_20170116174525125.jpg.chip.jpg": (39, "female", None)}
    for n in names:
        Image.new("RGB", (40, 40)).save(utk / n, format="JPEG")
    ingest.run(cfg)
    m = pl.from_arrow(tables.read(cfg, "manifest"))
    got = {r["image_id"]: (r["age"], r["gender"], r["race"]) for r in m.iter_rows(named=True)}
    assert got == names
    reasons = tables.read_errors(cfg, "ingest")["reason"].to_pylist()
    assert len(reasons) == 3 and all(r.startswith("warning: ") for r in reasons)


# ---------------------------------------------------------------------------------------------
# 5. Attribute names collide with the manifest's own columns


@pytest.mark.parametrize("column", ["path", "image_id", "uri", "split", "identity", "age", "_ok"])
def test_5_reserved_attribute_names_are_a_clear_error(tmp_path, column):
    cfg = tiny_config(tmp_path)
    make_sample(cfg.data.root, 4, seed=1)
    attr = Path(cfg.data.root) / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[1] = lines[1].replace("Smiling", column)
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"header column\(s\) \['{column}'\] use a reserved name"):
        ingest.run(cfg)


# ---------------------------------------------------------------------------------------------
# 6. Two runs on one output.root destroy each other


def _plant_lock(cfg, **info) -> Path:
    from pipeline import runlock

    path = Path(cfg.output.root) / runlock.LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat()
    path.write_text(json.dumps({"owner": "someone", "host": "elsewhere", "pid": 1, "job": "extract",
                                "token": "theirs", "started": now, "heartbeat": now, **info}))
    return path


def test_6_run_lock_stops_a_second_run_and_takes_over_a_dead_one(tmp_path):
    from pipeline import runlock

    from pipeline.run import run_stage

    cfg = tiny_config(tmp_path)
    make_sample(cfg.data.root, 12, seed=1)
    import socket

    # a live holder on this host: the second run stops at once, naming it
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = _plant_lock(cfg, host=socket.gethostname(), pid=holder.pid)
        with pytest.raises(runlock.RunLocked, match=rf"job 'extract' of someone@.* pid {holder.pid}"):
            run_stage(cfg, "ingest")
        assert not (Path(cfg.output.root) / "manifest").exists()
        # the report only reads: it runs beside the holder
        assert run_stage(cfg, "report")["report"].endswith("index.html")
    finally:
        holder.kill()
        holder.wait()
    # the holder died: its lock is taken over, and released when the stage ends
    assert run_stage(cfg, "ingest")["rows"] == 12
    assert not lock.exists()
    # a holder elsewhere whose heartbeat stopped long ago is taken over too
    old = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()
    _plant_lock(cfg, heartbeat=old)
    assert run_stage(cfg, "ingest", force=True)["rows"] == 12
    # ... but not one whose heartbeat is fresh
    _plant_lock(cfg)
    with pytest.raises(runlock.RunLocked, match="someone@elsewhere"):
        run_stage(cfg, "ingest", force=True)

    # the holder's heartbeat keeps a lock fresh; a lost lock is noticed
    cfg2 = tiny_config(tmp_path / "hb", "run.lock_heartbeat_s=0.05", "run.lock_stale_s=1")
    with runlock.held(cfg2, "ingest") as held:
        first = json.loads((Path(cfg2.output.root) / runlock.LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((Path(cfg2.output.root) / runlock.LOCK_NAME).read_text())[
            "heartbeat"] > first
    assert not held.lost and not (Path(cfg2.output.root) / runlock.LOCK_NAME).exists()


def test_6_run_json_updates_are_never_lost(tmp_path):
    cfg = tiny_config(tmp_path)
    names = [f"stage{i}" for i in range(6)]

    def work(name: str) -> None:
        for k in range(6):
            runlog.update(cfg, name, **{f"k{k}": k})

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    doc = runlog.load(cfg)
    assert sorted(doc["stages"]) == names
    assert all(doc["stages"][n] == {f"k{k}": k for k in range(6)} for n in names)


@pytest.mark.s3
def test_6_run_lock_on_s3_is_create_if_absent(tmp_path, s3_server, s3_bucket):
    from pipeline import runlock

    cfg = tiny_config(tmp_path, f"output.root=s3://{s3_bucket}/run", *s3_overrides(s3_server))
    loc = tables.root(cfg).join("probe")
    assert storage.create_exclusive(loc, b"first", cfg.storage)
    assert not storage.create_exclusive(loc, b"second", cfg.storage)
    data, version = storage.read_versioned(loc, cfg.storage)
    assert data == b"first"
    assert storage.replace_if(loc, b"third", version, cfg.storage)
    assert not storage.replace_if(loc, b"fourth", version, cfg.storage)  # stale version

    lock_loc = tables.root(cfg).join(runlock.LOCK_NAME)
    with runlock.held(cfg, "extract"):
        info = json.loads(storage.read_bytes(lock_loc))
        assert info["job"] == "extract" and info["pid"] == os.getpid()
    assert not storage.exists(lock_loc)
    # another run's live lock (another host, fresh heartbeat) stops this one
    now = datetime.now(timezone.utc).isoformat()
    storage.write_bytes(lock_loc, json.dumps({"owner": "someone", "host": "elsewhere", "pid": 1,
                                              "job": "train_attributes", "token": "theirs",
                                              "started": now, "heartbeat": now}).encode())
    with pytest.raises(runlock.RunLocked, match="in use by another run .*someone@elsewhere"):
        runlock.acquire(cfg, "extract")
    storage.delete_file(lock_loc, cfg.storage)
    runlog.update(cfg, "ingest", status="done")
    runlog.update(cfg, "extract", status="done")
    assert sorted(runlog.load(cfg)["stages"]) == ["extract", "ingest"]


# ---------------------------------------------------------------------------------------------
# 7. Smaller leaks


def test_7_write_bytes_leaves_no_temp_file_when_the_rename_fails(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_text("a directory is in the way")
    with pytest.raises(storage.StorageError):
        storage.write_bytes(storage.filesystem(str(tmp_path / "target")), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_7_a_bad_secret_value_is_never_echoed():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["storage.secret_access_key=12345678"])
    assert "12345678" not in str(exc.value) and "secret_access_key" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["storage.access_key_id=[1, 2]"])
    assert "[1, 2]" not in str(exc.value)


def test_7_describe_error_reads_the_cause_not_the_path():
    uri = "/data/img_align_celeba/000403.jpg"
    msg = storage.describe_error(uri, OSError(f"Cannot open for reading: path '{uri}' is a "
                                              "directory"))
    assert "access denied" not in msg and "is a directory" in msg
    assert storage.describe_error("/x/forbidden_timeout.jpg", OSError("bad")) == \
        "/x/forbidden_timeout.jpg: bad"
    s3 = OSError("When reading information for key 'a/000403.jpg' in bucket 'b': AWS Error "
                 "ACCESS_DENIED during HeadObject operation: No response body.")
    assert "access denied (check the credentials" in storage.describe_error("s3://b/a", s3)
    down = OSError("When listing objects under key 'run/' in bucket 'b': AWS Error "
                   "NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7")
    assert "unreachable" in storage.describe_error("s3://b/run", down)
    assert "permission denied" in storage.describe_error(uri, PermissionError(13, "denied"))


def test_7_a_failing_report_section_costs_only_itself(tmp_path):
    from pipeline import report

    cfg = tiny_config(tmp_path)
    bad = r"$\foo$"  # matplotlib's mathtext rejects it when the figure is drawn
    schema = manifest_schema(["Smiling", bad])
    n = 10
    rows = [{"image_id": f"{i}.jpg", "uri": f"/nowhere/{i}.jpg", "split": "train",
             "Smiling": i % 2 == 0, bad: i % 3 == 0, "dataset": "celeba"} for i in range(n)]
    tables.replace(cfg, "manifest", pa.Table.from_pylist(rows, schema=schema), schema=schema)
    stale = [{"image_id": "old.jpg", "uri": "/old.jpg", "reason": "from an earlier report"}]
    tables.write_errors(cfg, "report", stale)
    result = report.run(cfg)
    assert any(p.startswith("Attribute prevalence: ValueError") for p in result["problems"])
    page = (Path(cfg.output.root) / "report" / "index.html").read_text()
    assert "This part failed: ValueError" in page and "Images and splits" in page
    assert "Run" in page  # later sections are still there
    assert tables.read_errors(cfg, "report").num_rows == 0  # replaced, not accumulated
    assert np.isfinite(result["html_bytes"])
