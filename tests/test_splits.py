"""Ingest's splits: an official partition is kept only when it gives train, val and test rows;
otherwise a split is drawn from run.seed, identity-disjoint where identities are known and by
image where they are not, and the rule that made it is recorded."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline import ingest, runlog, tables
from pipeline.run import run_stage
from pipeline.sample import make_sample
from tests.helpers import tiny_config


def _manifest(cfg) -> pl.DataFrame:
    return pl.from_arrow(tables.read(cfg, "manifest"))


def _train_only_partition(cfg) -> None:
    """Rewrite list_eval_partition.txt as a subset of the official train partition would be."""
    part = Path(cfg.data.root) / "list_eval_partition.txt"
    rows = [ln.split()[0] for ln in part.read_text().splitlines() if ln.strip()]
    part.write_text("".join(f"{r} 0\r\n" for r in rows))


def _spread(m: pl.DataFrame) -> int:
    """Identities found in more than one split."""
    per = m.group_by("identity").agg(pl.col("split").n_unique().alias("n"))
    return per.filter(pl.col("n") > 1).height


@pytest.fixture
def celeba(tmp_path):
    cfg = tiny_config(tmp_path, "data.split_fractions=[0.6, 0.2]")
    make_sample(cfg.data.root, 150, seed=2)
    return cfg


def test_official_partition_with_all_three_splits_is_kept(celeba):
    part = dict(ln.split() for ln in
                (Path(celeba.data.root) / "list_eval_partition.txt").read_text().splitlines())
    result = ingest.run(celeba)
    m = _manifest(celeba)
    assert result["split_rule"].startswith("official")
    assert m["split"].to_list() == [("train", "val", "test")[int(part[i])] for i in m["image_id"]]


def test_train_only_partition_gets_an_identity_disjoint_split(celeba):
    _train_only_partition(celeba)
    run_stage(celeba, "ingest")
    m = _manifest(celeba)
    assert set(m["split"]) == {"train", "val", "test"}
    assert _spread(m) == 0
    details = runlog.stage_record(celeba, "ingest")["details"]
    assert details["split_rule"].startswith(ingest.SPLIT_BY_IDENTITY)
    assert "lacks a val or test split" in details["split_rule"]
    assert details["identities_in_two_splits"] == 0
    assert details["split_groups"] == m["identity"].n_unique()
    # the train share is close to the asked fraction (whole identities move together)
    assert abs((m["split"] == "train").mean() - 0.6) < 0.15
    # same seed, same split; another seed, another split
    first = m.select("image_id", "split")
    ingest.run(celeba)
    assert _manifest(celeba).select("image_id", "split").equals(first)
    celeba.run.seed = 1
    ingest.run(celeba)
    assert not _manifest(celeba).select("image_id", "split").equals(first)


def test_no_partition_file_draws_by_identity_too(celeba):
    (Path(celeba.data.root) / "list_eval_partition.txt").unlink()
    result = ingest.run(celeba)
    assert result["split_rule"].startswith(ingest.SPLIT_BY_IDENTITY)
    assert "no official partition" in result["split_rule"]
    assert _spread(_manifest(celeba)) == 0


def test_without_identities_the_split_is_by_image_and_says_so(celeba):
    _train_only_partition(celeba)
    (Path(celeba.data.root) / "identity_CelebA.txt").unlink()
    result = ingest.run(celeba)
    assert result["split_rule"].startswith(ingest.SPLIT_BY_IMAGE)
    assert "no identities known" in result["split_rule"]
    assert result["identities_in_two_splits"] is None
    assert set(_manifest(celeba)["split"]) == {"train", "val", "test"}


def test_utkface_is_split_by_image_and_lfw_by_person(tmp_path):
    utk = tiny_config(tmp_path / "u", "data.dataset=utkface")
    make_sample(utk.data.root, 40, seed=0, fmt="utkface")
    assert ingest.run(utk)["split_rule"].startswith(ingest.SPLIT_BY_IMAGE)
    lfw = tiny_config(tmp_path / "l", "data.dataset=lfw", "data.split_fractions=[0.5, 0.25]")
    make_sample(lfw.data.root, 120, seed=0, fmt="lfw")
    result = ingest.run(lfw)
    assert result["split_rule"].startswith(ingest.SPLIT_BY_IDENTITY + " by person")
    m = _manifest(lfw)
    assert m.group_by("person").agg(pl.col("split").n_unique())["split"].max() == 1


def test_check_split_refuses_a_person_in_two_splits():
    df = pl.DataFrame({"image_id": ["a", "b", "c"], "identity": [1, 1, 2],
                       "split": ["train", "test", "val"]})
    details = {"split_rule": ingest.SPLIT_BY_IDENTITY + " by identity"}
    with pytest.raises(ingest.SplitError, match="1 identities"):
        ingest.check_split(df, details)
    # an official split is only counted (CelebA's own partition is the user's call)
    details = {"split_rule": "official (list_eval_partition.txt)"}
    assert ingest.check_split(df, details) == 1 and details["identities_in_two_splits"] == 1


def test_report_says_which_rule_made_the_split(celeba):
    from pipeline import report

    _train_only_partition(celeba)
    (Path(celeba.data.root) / "identity_CelebA.txt").unlink()
    run_stage(celeba, "ingest")
    page = Path(report.run(celeba)["report"]).read_text()
    assert "Split: <b>seeded, by image" in page
    assert "The same person may be in train and test" in page
