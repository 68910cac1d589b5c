import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage, tables
from pipeline.config import StorageConfig, load_config
from pipeline.schemas import ERRORS_SCHEMA


def test_write_table_is_atomic_and_leaves_no_temp_files(tmp_path):
    loc = storage.filesystem(str(tmp_path / "t"))
    storage.write_table(pa.table({"a": [1, 2, 3]}), loc, metadata={"model": "x"})
    names = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert names == ["part-00000.parquet"]
    f = pq.ParquetFile(tmp_path / "t" / "part-00000.parquet")
    assert f.schema_arrow.metadata[b"model"] == b"x"
    assert storage.read_table(loc).column("a").to_pylist() == [1, 2, 3]


def test_hidden_and_temporary_files_are_not_read(tmp_path):
    loc = storage.filesystem(str(tmp_path / "t"))
    storage.write_table(pa.table({"a": [1]}), loc)
    (tmp_path / "t" / ".tmp-abc-part-00001.parquet").write_bytes(b"half written")
    (tmp_path / "t" / "_SUCCESS").write_bytes(b"")
    assert storage.read_table(loc).num_rows == 1


def test_conform_casts_and_rejects_missing_columns():
    schema = pa.schema([("a", pa.int32()), ("b", pa.string())])
    t = storage.conform(pa.table({"b": ["x"], "a": [1], "extra": [0]}), schema)
    assert t.schema == schema
    with pytest.raises(ValueError, match=r"lacks columns \['b'\]"):
        storage.conform(pa.table({"a": [1]}), schema)


def test_missing_table_is_a_clear_error(tmp_path):
    with pytest.raises(storage.StorageError, match="no table here"):
        storage.read_table(storage.filesystem(str(tmp_path / "nothing")))


def test_unsupported_scheme():
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.filesystem("gs://bucket/x")


def test_errors_table_per_stage_replace(tmp_path):
    cfg = load_config(None, [f"output.root={tmp_path}"])
    tables.write_errors(cfg, "ingest", [{"image_id": "1.jpg", "uri": "u", "reason": "zero bytes"}])
    tables.write_errors(cfg, "extract", [{"image_id": "2.jpg", "uri": "u", "reason": "truncated"}])
    tables.write_errors(cfg, "ingest", [])  # a rerun with no errors replaces the old file
    t = tables.read_errors(cfg)
    assert t.schema == ERRORS_SCHEMA
    assert t.column("stage").to_pylist() == ["extract"]
    tables.clear_errors(cfg, "extract")
    assert tables.read_errors(cfg).num_rows == 0


@pytest.mark.s3
def test_s3_round_trip_and_clear_errors(s3_server, s3_bucket):
    good = StorageConfig(endpoint_url=s3_server["endpoint"], access_key_id=s3_server["key"],
                         secret_access_key=s3_server["secret"])
    loc = storage.filesystem(f"s3://{s3_bucket}/run/t", good)
    storage.write_table(pa.table({"a": list(range(1000))}), loc)
    assert storage.read_table(loc).num_rows == 1000
    assert storage.parquet_files(loc) == [f"{s3_bucket}/run/t/part-00000.parquet"]

    bad = good.model_copy(update={"secret_access_key": "wrong"})
    with pytest.raises(storage.StorageError, match=rf"s3://{s3_bucket}/run: access denied"):
        storage.check_readable(storage.filesystem(f"s3://{s3_bucket}/run", bad))
    anon = StorageConfig(endpoint_url=s3_server["endpoint"], anonymous=True)
    with pytest.raises(storage.StorageError, match="access denied"):
        storage.check_readable(storage.filesystem(f"s3://{s3_bucket}/run", anon))
    with pytest.raises(storage.StorageError, match="not found"):
        storage.check_readable(storage.filesystem("s3://no-such-bucket-xyz/run", good))
    down = good.model_copy(update={"endpoint_url": "http://127.0.0.1:9", "connect_timeout_s": 1})
    with pytest.raises(storage.StorageError, match="unreachable"):
        storage.check_readable(storage.filesystem(f"s3://{s3_bucket}/run", down))
