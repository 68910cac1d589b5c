"""The extract stage with images and outputs on S3 (the local SeaweedFS server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import extract, storage, tables
from pipeline.schemas import manifest_schema
from tests.conftest import s3_overrides
from tests.helpers import tiny_config, write_tiny_manifest
from tests.test_extract import export_random_attribute_model


def test_extract_reads_and_writes_s3(tmp_path, ray_session, s3_server, s3_bucket):
    cfg = tiny_config(tmp_path, *s3_overrides(s3_server), f"output.root=s3://{s3_bucket}/run",
                      "extract.rows_per_file=5", "extract.batch_size=4")
    manifest = write_tiny_manifest(cfg, n=8)  # JPEGs on local disk, manifest already on S3
    fs = s3_server["fs"]
    # move the images to S3 and point the manifest at them
    for name in manifest["image_id"].to_pylist():
        data = (Path(cfg.data.root) / "img" / name).read_bytes()
        with fs.open_output_stream(f"{s3_bucket}/img/{name}") as f:
            f.write(data)
    uris = pa.array([f"s3://{s3_bucket}/img/{n}" for n in manifest["image_id"].to_pylist()])
    manifest = manifest.set_column(manifest.schema.get_field_index("uri"),
                                   manifest.schema.field("uri"), uris)
    gone = pa.Table.from_pylist([{"image_id": "zz-missing.jpg", "split": "test",
                                  "uri": f"s3://{s3_bucket}/img/zz-missing.jpg",
                                  "dataset": "celeba"}], schema=manifest_schema())
    tables.replace(cfg, "manifest", pa.concat_tables([manifest, gone]), schema=manifest_schema())
    export_random_attribute_model(cfg)

    result = extract.run(cfg)
    assert result["images"] == 9 and result["features_rows"] == 8 and result["error_rows"] == 1

    loc = tables.location(cfg, "features")
    assert loc.uri.startswith("s3://")
    files = storage.parquet_files(loc)
    assert len(files) == 2  # 9 rows in shards of 5
    feats = tables.read(cfg, "features").sort_by("image_id")
    assert feats["image_id"].to_pylist() == sorted(manifest["image_id"].to_pylist())
    emb = np.stack(feats["embedding"].to_numpy(zero_copy_only=False))
    assert emb.shape == (8, 2048) and np.isfinite(emb).all()
    with loc.fs.open_input_file(files[0]) as f:
        assert pq.read_schema(f).metadata[b"faceaudit.embedding_model"] == b"resnet50"
    errs = tables.read_errors(cfg, "extract")
    assert errs["image_id"].to_pylist() == ["zz-missing.jpg"]
    assert errs["reason"].to_pylist() == ["missing file"]

    # the same table is readable by polars straight from S3
    import polars as pl

    opts = {"aws_endpoint_url": s3_server["endpoint"], "aws_access_key_id": s3_server["key"],
            "aws_secret_access_key": s3_server["secret"], "aws_region": "us-east-1",
            "aws_allow_http": "true"}
    df = pl.read_parquet(f"s3://{s3_bucket}/run/features/*.parquet", storage_options=opts)
    assert df.height == 8
    assert df.schema["embedding"] == pl.Array(pl.Float32, 2048)
    assert pc.all(pc.is_valid(feats["p_Male"])).as_py()
