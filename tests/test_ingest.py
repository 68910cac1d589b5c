"""Ingest: parsers (txt and Kaggle csv), each bad-input case, every adapter, limit and splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import ingest, tables
from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.sample import make_sample
from pipeline.schemas import ERRORS_SCHEMA, LANDMARKS, manifest_schema
from tests.helpers import tiny_config

N = 12


def _cfg(tmp_path, *overrides):
    return tiny_config(tmp_path, *overrides)


@pytest.fixture
def celeba(tmp_path):
    """A 12-image CelebA-format sample at data.root, and its config."""
    cfg = _cfg(tmp_path)
    make_sample(cfg.data.root, N, seed=1)
    return cfg


def _attr_lines(cfg) -> list[str]:
    return (Path(cfg.data.root) / "list_attr_celeba.txt").read_text().splitlines()


def _write_attr(cfg, lines):
    (Path(cfg.data.root) / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")


def _reasons(cfg) -> list[str]:
    return tables.read_errors(cfg, "ingest")["reason"].to_pylist()


def _manifest(cfg) -> pl.DataFrame:
    return pl.from_arrow(tables.read(cfg, "manifest"))


def _expected_attrs(lines: list[str]) -> dict[str, list[bool]]:
    return {ln.split()[0]: [v == "1" for v in ln.split()[1:]] for ln in lines[2:]}


# --- parsers ------------------------------------------------------------------------------


def test_parse_txt_whitespace_and_crlf():
    text = ("3\r\nA B \r\n"
            "1.jpg -1  1\r\n"
            "2.jpg  1 -1\r\n"
            "\r\n"
            "3.jpg\t1\t1\r\n").encode()
    p = ingest.parse_annotation(text, "/x/list_attr_celeba.txt", csv=False, count_line=True,
                                header=True)
    assert p.names == ["A", "B"] and p.declared == 3 and p.errors.height == 0
    assert p.rows.select("image_id", "A", "B").rows() == [("1.jpg", False, True),
                                                           ("2.jpg", True, False),
                                                           ("3.jpg", True, True)]


def test_parse_kaggle_csv():
    text = b"image_id,A,B\n1.jpg,-1,1\n2.jpg,1,-1\n"
    p = ingest.parse_annotation(text, "s3://b/list_attr_celeba.csv", csv=True, count_line=True,
                                header=True)
    assert p.names == ["A", "B"] and p.declared is None and p.errors.height == 0
    assert p.rows["A"].to_list() == [False, True]


def test_parse_each_bad_line_is_reported_and_good_rows_kept():
    text = ("5\nA B\n"
            "1.jpg -1 1\n"
            "2.jpg 1\n"           # too few columns
            "3.jpg 1 0\n"         # value other than +-1
            "1.jpg 1 1\n"         # duplicate id
            "4.jpg 1 -1 1\n"      # too many columns
            "5.jpg 1 -1\n").encode()
    p = ingest.parse_annotation(text, "/d/list_attr_celeba.txt", csv=False, count_line=True,
                                header=True)
    assert sorted(p.rows["image_id"].to_list()) == ["1.jpg", "5.jpg"]
    assert p.rows.filter(pl.col("image_id") == "1.jpg")["A"].item() is False  # first kept
    reasons = p.errors["reason"].to_list()
    assert "list_attr_celeba.txt line 1 declares 5 images but the file has 6 annotation rows; all valid rows kept" in reasons
    assert "list_attr_celeba.txt line 4: expected 3 columns (image id + 2 values), found 2" in reasons
    assert "list_attr_celeba.txt line 5: B = '0', expected 1 or -1" in reasons
    assert "list_attr_celeba.txt line 6: duplicate image id (first on line 3, which is kept)" in reasons
    assert "list_attr_celeba.txt line 7: expected 3 columns (image id + 2 values), found 4" in reasons
    assert len(reasons) == 5


@pytest.mark.parametrize("kind", ["txt", "non-utf8"])
def test_parse_in_pieces_gives_the_same_rows_and_errors(kind):
    """The body is parsed in pieces cut after a newline: every piece size (down to one byte, one
    line per piece) gives the same rows, errors and line numbers as one piece for the whole
    file, with a BOM, CRLF and a lone CR, blank lines, a duplicate id in another piece, bad
    values and bad field counts (and, for a file that is not all UTF-8, its undecodable lines)."""
    body = [f"{i}.jpg {'1' if i % 3 else '-1'}  -1" for i in range(1, 40)]
    body[4] = "5.jpg 1"                       # too few columns
    body[9] = "10.jpg 1 0"                    # value other than +-1
    body[30] = body[2]                        # duplicate of line 5's id, pieces later
    body.insert(20, "")
    text = ("\ufeff41\r\nA B\r\n" + "\r\n".join(body[:25]) + "\r" + "\n".join(body[25:])
            + "\n").encode()
    if kind == "non-utf8":
        text = text.replace(b"11.jpg 1", b"11.jpg \xff1").replace(b"33.jpg", b"33\xfe.jpg")
    whole = ingest.parse_annotation(text, "/d/list_attr_celeba.txt", csv=False, count_line=True,
                                    header=True, chunk_bytes=len(text) + 1)
    assert whole.rows.height > 30 and whole.errors.height >= 4
    if kind == "non-utf8":
        assert sum("not valid UTF-8" in r for r in whole.errors["reason"]) == 2
    for size in (1, 7, 64, 200):
        piece = ingest.parse_annotation(text, "/d/list_attr_celeba.txt", csv=False,
                                        count_line=True, header=True, chunk_bytes=size)
        assert piece.rows.equals(whole.rows) and piece.errors.equals(whole.errors), size
        assert (piece.declared, piece.data_lines) == (whole.declared, whole.data_lines)


def test_parse_rejects_a_file_whose_header_is_wrong():
    with pytest.raises(ValueError, match="expected a CSV header starting with 'image_id'"):
        ingest.parse_annotation(b"id,A\n1.jpg,1\n", "/d/list_attr_celeba.csv", csv=True,
                                count_line=True, header=True)
    with pytest.raises(ValueError, match="expected columns"):
        ingest.parse_annotation(b"1\nx y\n1.jpg 1 2\n", "/d/lm.txt", csv=False, count_line=True,
                                header=True, kind="int", columns=list(LANDMARKS))


def test_seeded_splits_are_deterministic_and_follow_fractions():
    keys = np.array([f"{i:05d}" for i in range(2000)])
    a = ingest.seeded_splits(keys, np.ones(2000), (0.8, 0.1), seed=3)
    b = ingest.seeded_splits(keys, np.ones(2000), (0.8, 0.1), seed=3)
    c = ingest.seeded_splits(keys, np.ones(2000), (0.8, 0.1), seed=4)
    assert (a == b).all() and (a != c).any()
    assert abs((a == "train").mean() - 0.8) < 0.01 and abs((a == "val").mean() - 0.1) < 0.01
    with pytest.raises(ValueError, match="split_fractions"):
        ingest.seeded_splits(keys, np.ones(2000), (0.8, 0.3), seed=3)


# --- CelebA end to end ------------------------------------------------------------------------


def test_celeba_manifest_equals_annotation_files(celeba):
    result = ingest.run(celeba)
    assert result["rows"] == N and result["errors"] == 0
    table = tables.read(celeba, "manifest")
    assert table.schema.remove_metadata() == manifest_schema(CELEBA_ATTRIBUTES)
    m = _manifest(celeba)
    want = _expected_attrs(_attr_lines(celeba))
    assert m["image_id"].to_list() == sorted(want)
    assert {r[0]: list(r[1:]) for r in m.select("image_id", *CELEBA_ATTRIBUTES).rows()} == want
    root = Path(celeba.data.root).resolve()
    assert m["uri"].to_list() == [str(root / "img_align_celeba" / i) for i in m["image_id"]]
    part = dict(ln.split() for ln in (root / "list_eval_partition.txt").read_text().splitlines())
    assert m["split"].to_list() == [("train", "val", "test")[int(part[i])] for i in m["image_id"]]
    ident = dict(ln.split() for ln in (root / "identity_CelebA.txt").read_text().splitlines())
    assert m["identity"].to_list() == [int(ident[i]) for i in m["image_id"]]
    lm = {ln.split()[0]: [int(v) for v in ln.split()[1:]]
          for ln in (root / "list_landmarks_align_celeba.txt").read_text().splitlines()[2:]}
    assert [list(r[1:]) for r in m.select("image_id", *LANDMARKS).rows()] == [lm[i] for i in m["image_id"]]
    assert set(m["dataset"]) == {"celeba"}
    errors = pq.read_table(tables.location(celeba, "errors").join("ingest.parquet").path)
    assert errors.num_rows == 0 and errors.schema.remove_metadata() == ERRORS_SCHEMA


def _to_kaggle(root: Path) -> None:
    """Rewrite a txt sample in the Kaggle layout: CSV files, images nested twice."""
    attr = (root / "list_attr_celeba.txt").read_text().splitlines()
    rows = [",".join(["image_id"] + attr[1].split())] + [",".join(ln.split()) for ln in attr[2:]]
    (root / "list_attr_celeba.csv").write_text("\n".join(rows) + "\n")
    part = (root / "list_eval_partition.txt").read_text().splitlines()
    (root / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "\n".join(",".join(ln.split()) for ln in part) + "\n")
    lm = (root / "list_landmarks_align_celeba.txt").read_text().splitlines()
    (root / "list_landmarks_align_celeba.csv").write_text(
        ",".join(["image_id"] + lm[1].split()) + "\n"
        + "\n".join(",".join(ln.split()) for ln in lm[2:]) + "\n")
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "list_landmarks_align_celeba.txt"):
        (root / name).unlink()
    nested = root / "img_align_celeba" / "img_align_celeba"
    nested.mkdir()
    for f in sorted((root / "img_align_celeba").glob("*.jpg")):
        f.rename(nested / f.name)


def test_kaggle_csv_layout_gives_the_same_manifest(tmp_path):
    txt = _cfg(tmp_path / "txt")
    csv = _cfg(tmp_path / "csv")
    make_sample(txt.data.root, N, seed=2)
    make_sample(csv.data.root, N, seed=2)
    _to_kaggle(Path(csv.data.root))
    ingest.run(txt)
    result = ingest.run(csv)
    assert result["files"]["attr"] == "list_attr_celeba.csv"
    assert result["files"]["images"] == "img_align_celeba/img_align_celeba/"
    a, b = _manifest(txt).drop("uri"), _manifest(csv).drop("uri")
    assert a.equals(b)
    assert _manifest(csv)["uri"][0].endswith("img_align_celeba/img_align_celeba/000001.jpg")


def test_missing_image_is_an_error_row(celeba):
    (Path(celeba.data.root) / "img_align_celeba" / "000003.jpg").unlink()
    result = ingest.run(celeba)
    assert result["rows"] == N - 1
    assert "000003.jpg" not in _manifest(celeba)["image_id"].to_list()
    errors = pl.from_arrow(tables.read_errors(celeba, "ingest"))
    row = errors.filter(pl.col("image_id") == "000003.jpg").row(0, named=True)
    assert row["reason"] == "annotated in list_attr_celeba.txt but the image is missing from storage"
    assert row["uri"].endswith("img_align_celeba/000003.jpg") and row["stage"] == "ingest"


def test_image_without_annotation_is_an_error_row(celeba):
    img = Path(celeba.data.root) / "img_align_celeba"
    shutil.copy(img / "000001.jpg", img / "999999.jpg")
    result = ingest.run(celeba)
    assert result["rows"] == N
    assert _reasons(celeba) == ["image has no row in list_attr_celeba.txt (not annotated)"]


def test_zero_byte_image_is_an_error_row(celeba):
    (Path(celeba.data.root) / "img_align_celeba" / "000005.jpg").write_bytes(b"")
    assert ingest.run(celeba)["rows"] == N - 1
    assert _reasons(celeba) == ["zero-byte file (empty image; re-copy it)"]


def test_bad_annotation_lines_keep_the_good_rows(celeba):
    lines = _attr_lines(celeba)
    lines[3] = lines[3].rsplit(" ", 1)[0]  # 000002.jpg: one value short
    toks = lines[4].split()
    toks[5] = "2"  # 000003.jpg: Bald = 2
    lines[4] = " ".join(toks)
    lines.append(lines[6])  # 000005.jpg twice
    _write_attr(celeba, lines)
    result = ingest.run(celeba)
    assert result["rows"] == N - 2
    reasons = _reasons(celeba)
    assert "list_attr_celeba.txt line 4: expected 41 columns (image id + 40 values), found 40" in reasons
    assert "list_attr_celeba.txt line 5: Bald = '2', expected 1 or -1" in reasons
    assert f"list_attr_celeba.txt line {N + 3}: duplicate image id (first on line 7, which is kept)" in reasons
    assert f"list_attr_celeba.txt line 1 declares {N} images but the file has {N + 1} annotation rows; all valid rows kept" in reasons
    # the two images whose lines were bad are now images without a (valid) annotation row
    assert reasons.count("image has no row in list_attr_celeba.txt (not annotated)") == 2
    assert len(reasons) == 6


def test_count_line_disagreeing_keeps_all_rows(celeba):
    lines = _attr_lines(celeba)
    lines[0] = "202599"
    _write_attr(celeba, lines)
    assert ingest.run(celeba)["rows"] == N
    assert _reasons(celeba) == [f"list_attr_celeba.txt line 1 declares 202599 images but the "
                                f"file has {N} annotation rows; all valid rows kept"]


def test_no_annotation_file_is_a_clear_error(celeba):
    (Path(celeba.data.root) / "list_attr_celeba.txt").unlink()
    with pytest.raises(ValueError, match="no CelebA attribute file; expected one of"):
        ingest.run(celeba)


def test_missing_partition_file_falls_back_to_seeded_splits_and_says_so(celeba):
    (Path(celeba.data.root) / "list_eval_partition.txt").unlink()
    result = ingest.run(celeba)
    assert result["split_source"] == "seeded (no list_eval_partition file)"
    assert set(_manifest(celeba)["split"]) <= {"train", "val", "test"}


def test_limit_keeps_a_seeded_subset_across_splits(tmp_path):
    cfg = _cfg(tmp_path, f"data.limit={N // 2}")
    make_sample(cfg.data.root, N, seed=1)
    assert ingest.run(cfg)["rows"] == N // 2
    first = _manifest(cfg)
    ids = first["image_id"].to_list()
    assert ids == sorted(ids) and len(set(ids)) == N // 2
    assert ids != [f"{i:06d}.jpg" for i in range(1, N // 2 + 1)]  # not simply the head
    assert set(first["split"]) == {"train", "val", "test"}  # contiguous splits all survive
    ingest.run(cfg)
    assert _manifest(cfg)["image_id"].to_list() == ids  # same seed, same subset


def test_all_images_unusable_is_an_error(celeba):
    for f in (Path(celeba.data.root) / "img_align_celeba").glob("*.jpg"):
        f.write_bytes(b"")
    with pytest.raises(ValueError, match="no usable images"):
        ingest.run(celeba)
    assert len(_reasons(celeba)) == N  # ... and each one is recorded


def test_missing_root_is_a_storage_error(tmp_path):
    from pipeline.storage import StorageError

    cfg = _cfg(tmp_path)
    with pytest.raises(StorageError, match="not found"):
        ingest.run(cfg)


# --- UTKFace, LFW, folder ----------------------------------------------------------------------


def test_utkface_labels_come_from_file_names(tmp_path):
    cfg = _cfg(tmp_path, "data.dataset=utkface")
    make_sample(cfg.data.root, 20, seed=0, fmt="utkface")
    utk = Path(cfg.data.root) / "UTKFace"
    (utk / "39_1_20170116174525125.jpg.chip.jpg").write_bytes(b"x")  # real UTKFace has these
    (utk / "61_3_20170109150557335.jpg.chip.jpg").write_bytes(b"x")
    (utk / "25_0_2_20170116174525125.jpg.chip.jpg").write_bytes(b"jpeg-ish")
    result = ingest.run(cfg)
    assert result["rows"] == 22  # the name without a race field keeps its age and gender
    m = _manifest(cfg)
    row = m.filter(pl.col("image_id") == "25_0_2_20170116174525125.jpg.chip.jpg").row(0, named=True)
    assert (row["age"], row["gender"], row["race"], row["Male"], row["Young"]) == (
        25, "male", "asian", True, True)
    assert m.schema["age"] == pl.Int16 and set(m["dataset"]) == {"utkface"}
    for name, age, gender in [(n, int(n.split("_")[0]), n.split("_")[1]) for n in m["image_id"]]:
        r = m.filter(pl.col("image_id") == name).row(0, named=True)
        assert r["age"] == age and r["Male"] == (gender == "0")
    no_race = m.filter(pl.col("image_id") == "39_1_20170116174525125.jpg.chip.jpg").row(0, named=True)
    assert (no_race["age"], no_race["gender"], no_race["race"]) == (39, "female", None)
    reasons = sorted(_reasons(cfg))
    assert len(reasons) == 2 and "does not parse as age_gender_race_date" in reasons[0]
    assert reasons[1].startswith("warning: UTKFace file name has no race field")
    # seeded split: same seed, same split
    first = m.select("image_id", "split")
    ingest.run(cfg)
    assert _manifest(cfg).select("image_id", "split").equals(first)


def test_lfw_keeps_each_person_in_one_split(tmp_path):
    cfg = _cfg(tmp_path, "data.dataset=lfw", "data.split_fractions=[0.5, 0.25]")
    make_sample(cfg.data.root, 120, seed=0, fmt="lfw")
    result = ingest.run(cfg)
    m = _manifest(cfg)
    assert result["rows"] == 120 and result["people"] == m["person"].n_unique()
    per_person = m.group_by("person").agg(pl.col("split").n_unique().alias("s"),
                                          pl.col("identity").n_unique().alias("i"))
    assert per_person["s"].max() == 1 and per_person["i"].max() == 1
    assert set(m["split"]) == {"train", "val", "test"}
    assert all(i.startswith(p + "_") for i, p in zip(m["image_id"], m["person"]))
    assert manifest_schema([]).names == m.columns


def test_folder_has_no_labels(tmp_path):
    cfg = _cfg(tmp_path, "data.dataset=folder")
    make_sample(str(tmp_path / "src"), 6, seed=0)
    root = Path(cfg.data.root)
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for k, f in enumerate(sorted((tmp_path / "src" / "img_align_celeba").glob("*.jpg"))):
        shutil.copy(f, root / ("a" if k % 2 else "b") / "same.jpg" if k < 2 else root / "a" / f.name)
    (root / "notes.txt").write_text("not an image")
    result = ingest.run(cfg)
    m = _manifest(cfg)
    assert result["rows"] == 6 and "b/same.jpg" in m["image_id"].to_list()
    assert m.columns == manifest_schema([]).names


def test_bad_partition_and_identity_lines(celeba):
    root = Path(celeba.data.root)
    part = (root / "list_eval_partition.txt").read_text().splitlines()
    part[1] = "000002.jpg 3"  # not 0/1/2: the image has no split and is left out
    (root / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    ident = (root / "identity_CelebA.txt").read_text().splitlines()
    ident[2] = "000003.jpg abc"  # identity is optional: the image stays, identity null
    (root / "identity_CelebA.txt").write_text("\n".join(ident) + "\n")
    assert ingest.run(celeba)["rows"] == N - 1
    reasons = _reasons(celeba)
    assert "list_eval_partition.txt line 2: partition = 3, expected 0, 1 or 2" in reasons
    assert "no valid row in list_eval_partition.txt (no split)" in reasons
    assert "identity_CelebA.txt line 3: identity = 'abc', expected an integer" in reasons
    m = _manifest(celeba)
    assert "000002.jpg" not in m["image_id"].to_list()
    assert m.filter(pl.col("image_id") == "000003.jpg")["identity"].item() is None
