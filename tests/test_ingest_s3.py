"""Ingest from a real (local SeaweedFS) S3 server: same manifest as from disk, clear errors."""

from __future__ import annotations

import polars as pl
import pyarrow.fs as pafs
import pytest

from pipeline import ingest, tables
from pipeline.sample import make_sample
from pipeline.storage import StorageError
from tests.conftest import free_port, s3_overrides
from tests.helpers import tiny_config

pytestmark = pytest.mark.s3

N = 10


@pytest.fixture
def sample_on_s3(tmp_path, s3_server, s3_bucket):
    """A 10-image CelebA sample on disk, and the same files uploaded under s3://bucket/celeba."""
    local = tiny_config(tmp_path)
    make_sample(local.data.root, N, seed=4)
    pafs.copy_files(local.data.root, f"{s3_bucket}/celeba",
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_server["fs"])
    return local, s3_bucket


def _s3_cfg(tmp_path, s3_server, bucket, *extra):
    return tiny_config(tmp_path, f"data.root=s3://{bucket}/celeba",
                       f"output.root=s3://{bucket}/run", "storage.connect_timeout_s=2",
                       *s3_overrides(s3_server), *extra)


def test_s3_gives_the_same_manifest_as_local(tmp_path, s3_server, sample_on_s3):
    local, bucket = sample_on_s3
    remote = _s3_cfg(tmp_path, s3_server, bucket)
    r_local = ingest.run(local)
    r_remote = ingest.run(remote)
    assert r_local["rows"] == r_remote["rows"] == N and r_remote["errors"] == 0
    a, b = pl.from_arrow(tables.read(local, "manifest")), pl.from_arrow(tables.read(remote, "manifest"))
    assert a.drop("uri").equals(b.drop("uri"))
    assert b["uri"].to_list() == [f"s3://{bucket}/celeba/img_align_celeba/{i}" for i in b["image_id"]]
    # the tables really are on S3
    info = s3_server["fs"].get_file_info(f"{bucket}/run/manifest/part-00000.parquet")
    assert info.type == pafs.FileType.File
    assert tables.read_errors(remote, "ingest").num_rows == 0


def test_s3_bad_input_is_recorded_like_local(tmp_path, s3_server, sample_on_s3):
    _, bucket = sample_on_s3
    fs = s3_server["fs"]
    fs.delete_file(f"{bucket}/celeba/img_align_celeba/000002.jpg")
    with fs.open_output_stream(f"{bucket}/celeba/img_align_celeba/000003.jpg") as f:
        f.write(b"")
    remote = _s3_cfg(tmp_path, s3_server, bucket)
    assert ingest.run(remote)["rows"] == N - 2
    errors = pl.from_arrow(tables.read_errors(remote, "ingest")).sort("image_id")
    assert errors["image_id"].to_list() == ["000002.jpg", "000003.jpg"]
    assert errors["uri"][1] == f"s3://{bucket}/celeba/img_align_celeba/000003.jpg"


def test_wrong_keys_give_one_clear_line(tmp_path, s3_server, sample_on_s3):
    _, bucket = sample_on_s3
    cfg = _s3_cfg(tmp_path, s3_server, bucket, "storage.secret_access_key=not-the-secret")
    with pytest.raises(StorageError, match=rf"^s3://{bucket}/celeba: access denied") as exc:
        ingest.run(cfg)
    assert "\n" not in str(exc.value)


def test_missing_bucket_gives_one_clear_line(tmp_path, s3_server):
    cfg = _s3_cfg(tmp_path, s3_server, "no-such-bucket-here")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket-here/celeba: .*(bucket|not found)"):
        ingest.run(cfg)


def test_unreachable_endpoint_gives_one_clear_line(tmp_path, s3_server):
    port = free_port()  # nothing listens there
    cfg = tiny_config(tmp_path, "data.root=s3://faces/celeba", f"output.root={tmp_path / 'run'}",
                      *s3_overrides(s3_server), f"storage.endpoint_url=http://127.0.0.1:{port}",
                      "storage.connect_timeout_s=1")
    with pytest.raises(StorageError, match=r"^s3://faces/celeba: the endpoint is unreachable"):
        ingest.run(cfg)
