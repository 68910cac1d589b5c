"""The scale benchmark's full-size folder: every id of the annotation files, hard-linked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.benchmarks.scale import compare_sizes, layout_celeba


def _annotations(d: Path, n: int) -> None:
    d.mkdir()
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    (d / "list_attr_celeba.txt").write_text(
        "\n".join([str(n), "Male Young "] + [f"{x}  1 -1" for x in names]) + "\n")
    parts = [0] * (n * 8 // 10) + [1] * (n // 10)
    parts += [2] * (n - len(parts))
    (d / "list_eval_partition.txt").write_text(
        "\n".join(f"{x} {p}" for x, p in zip(names, parts)) + "\n")
    (d / "identity_CelebA.txt").write_text(
        "\n".join(f"{x} {i // 3}" for i, x in enumerate(names)) + "\n")


def test_layout_links_every_id_and_a_stride_keeps_the_splits(tmp_path):
    ann, imgs = tmp_path / "ann", tmp_path / "imgs"
    _annotations(ann, 100)
    imgs.mkdir()
    for i in range(7):
        (imgs / f"{i:06d}.jpg").write_bytes(bytes([i]) * 10)
    full = layout_celeba(tmp_path / "full", 1000, ann, imgs)  # more than there are: all 100
    files = sorted((full / "img_align_celeba").iterdir())
    assert len(files) == 100
    assert {os.stat(f).st_ino for f in files} == {os.stat(f).st_ino for f in imgs.iterdir()}
    assert (full / "list_attr_celeba.txt").read_text().splitlines()[0] == "100"

    small = layout_celeba(tmp_path / "small", 20, ann, imgs)
    attr = (small / "list_attr_celeba.txt").read_text().splitlines()
    assert attr[0] == "20" and len(attr) == 22 and attr[1] == "Male Young "
    parts = [ln.split()[1] for ln in (small / "list_eval_partition.txt").read_text().splitlines()]
    assert len(parts) == 20 and {"0", "1", "2"} <= set(parts)  # every official split kept
    ids = [ln.split()[0] for ln in (small / "identity_CelebA.txt").read_text().splitlines()]
    assert ids == [ln.split()[0] for ln in attr[2:]]
    assert sorted(p.name for p in (small / "img_align_celeba").iterdir()) == sorted(ids)
    # a second call reuses the finished folder
    assert layout_celeba(tmp_path / "small", 20, ann, imgs) == small


def test_ratios_flag_what_grows():
    row = {"stage": "cluster", "driver_pss_mib": 500.0, "driver_anon_mib": 400.0,
           "all_anon_mib": 900.0}
    small = [{**row, "seconds": 10.0}]
    big = [{**row, "seconds": 200.0, "driver_pss_mib": 1000.0, "driver_anon_mib": 500.0}]
    (r,) = compare_sizes({20000: small, 202599: big}, [20000, 202599])
    assert r["time_ratio"] == 20.0 and not r["time_ok"]
    assert r["driver_ratio"] == 2.0 and not r["driver_ok"]
    assert r["driver_anon_ratio"] == 1.25 and r["driver_anon_ok"]
    (ok,) = compare_sizes({20000: small, 202599: [{**row, "seconds": 100.0}]}, [20000, 202599])
    assert ok["time_ok"] and ok["driver_ok"] and ok["driver_anon_ok"]


def test_tiled_features_give_every_manifest_id_a_source_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.benchmarks.downstream import tile_features

    (tmp_path / "src").mkdir()
    (tmp_path / "man").mkdir()
    src = pa.table({"image_id": ["b", "a", "c"], "p_Male": pa.array([0.2, 0.1, 0.3], pa.float32())},
                   metadata={"faceaudit.features_format": "2"})
    pq.write_table(src, tmp_path / "src" / "part-00000.parquet")
    ids = [f"{i:06d}.jpg" for i in range(7)]
    pq.write_table(pa.table({"image_id": ids}), tmp_path / "man" / "part-00000.parquet")
    assert tile_features(tmp_path / "src", tmp_path / "man", tmp_path / "out") == 7
    out = pq.read_table(tmp_path / "out")
    assert out["image_id"].to_pylist() == ids
    # row i is source row i mod 3 of the id-sorted source (a, b, c)
    assert out["p_Male"].to_pylist() == pytest.approx([0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1])
    assert out.schema.metadata[b"faceaudit.features_format"] == b"2"
