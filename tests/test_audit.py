"""The audit stage: duplicates, conflicts and leakage on real faces; planted label errors.

The real-face tests read ``../shared/real`` in place. Their features table is written here from
the real files: ``content_hash`` exactly as extract computes it (its public function on the
file bytes), and as embedding the faces' 16 x 16 grey pixels (real image content, so
byte-identical files get identical vectors) instead of running the CNNs, to keep them fast.
The expected groups come from an independent oracle (md5 of the files, labels parsed here).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image

from pipeline import audit, ingest, tables
from pipeline import run as pipeline_run
from pipeline.extract import content_hash, features_schema
from pipeline.schemas import manifest_attributes
from tests.helpers import tiny_config

REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
if not REAL.exists():  # a worktree under /work/wt/<name>: shared/ is beside the main checkout
    REAL = Path("/work/shared/real")
UTK = REAL / "utkface"
CELEBA = REAL / "celeba"
needs_real = pytest.mark.skipif(not UTK.exists(), reason="../shared/real is not checked out")


# --------------------------------------------------------------------------- helpers

def _write_real_features(cfg, manifest: pa.Table) -> None:
    attrs = manifest_attributes(manifest.schema)
    dim = 256
    ids, hashes, emb = [], [], []
    for image_id, uri in zip(manifest["image_id"].to_pylist(), manifest["uri"].to_pylist()):
        data = Path(uri).read_bytes()
        ids.append(image_id)
        hashes.append(content_hash(data))
        with Image.open(uri) as im:
            emb.append(np.asarray(im.convert("L").resize((16, 16)), np.float32).ravel() / 255)
    n = len(ids)
    cols = {"image_id": ids, **{f"p_{a}": np.full(n, 0.5, np.float32) for a in attrs},
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.stack(emb).ravel(), pa.float32()), dim),
            "content_hash": hashes}
    schema = features_schema(attrs, dim)
    tables.replace(cfg, "features", pa.table(cols).cast(schema), schema=schema)


def _md5_groups(paths: list[Path]) -> list[set[str]]:
    by: dict[str, set[str]] = {}
    for p in paths:
        by.setdefault(hashlib.md5(p.read_bytes()).hexdigest(), set()).add(p.name)
    return sorted((g for g in by.values() if len(g) > 1), key=sorted)


def _audit_tables(cfg) -> dict[str, pl.DataFrame]:
    out = {}
    for name, schema in audit.SCHEMAS.items():
        t = tables.read(cfg, name)
        assert t.schema.remove_metadata().equals(schema), name  # held to its declared schema
        out[name] = pl.from_arrow(t)
    return out


# --------------------------------------------------------------------------- real faces

@needs_real
@pytest.mark.slow
def test_utkface_byte_identical_groups_and_their_label_conflicts(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, "data.dataset=utkface", f"data.root={UTK}",
                      "audit.cv_folds=3", "audit.near_threshold=0.0005")
    ingest.run(cfg)
    manifest = tables.read(cfg, "manifest")
    _write_real_features(cfg, manifest)
    result = audit.run(cfg)

    oracle = _md5_groups(sorted((UTK / "UTKFace").glob("*.jpg")))
    assert len(oracle) == 4  # as ../shared/real/README.md says
    t = _audit_tables(cfg)
    exact = t[audit.DUPLICATES].filter(pl.col("kind") == "exact")
    found = sorted((set(g["image_id"].to_list()) for _, g in exact.group_by("group")), key=sorted)
    assert found == oracle and result["exact_groups"] == 4

    # conflicts per attribute, from the labels in the file names (age_gender_race_date)
    def labels(name):
        age, g, r = re.match(r"(\d+)_(\d)_(\d)_", name).groups()
        return {"age": int(age), "gender": g, "race": r}
    want = set()
    for i, group in enumerate(oracle):
        lab = [labels(x) for x in sorted(group)]
        for key in ("age", "gender", "race"):
            if len({x[key] for x in lab}) > 1:
                want.add((frozenset(group), key))
    conf = t[audit.LABEL_CONFLICTS].filter(pl.col("kind") == "exact")
    got = {(frozenset(r["image_ids"]), r["attribute"]) for r in conf.iter_rows(named=True)
           if r["attribute"] in ("age", "gender", "race")}
    assert got == want and len(want) == 3  # one age conflict, two race conflicts
    agree = exact.group_by("group").agg(pl.col("labels_agree").first())
    assert agree["labels_agree"].sum() == 1  # 60_1_0 filed twice with the same labels

    # label issues for UTKFace's raw labels, rates per group with a test
    assert set(t[audit.LABEL_ISSUES]["attribute"].unique()) == {"gender", "race", "age"}
    rates = t[audit.ISSUE_RATES]
    assert {"overall", "race"} <= set(rates.filter(pl.col("attribute") == "gender")["group_by"])

    # the drop action records every member of a conflicting group in errors/audit
    cfg.audit.action = "drop_conflicting_exact"
    audit.run(cfg)
    dropped = set(audit.excluded_image_ids(cfg))
    assert dropped == set().union(*(g for g in oracle if any(g == set(w) for w, _ in want)))
    assert len(dropped) == 6

    # the tables open in DuckDB and polars as they are
    root = cfg.output.root
    n = duckdb.sql(f"SELECT count(DISTINCT \"group\") FROM read_parquet('{root}/audit/duplicates/"
                   f"*.parquet') WHERE kind = 'exact'").fetchall()[0][0]
    assert n == 4
    assert pl.scan_parquet(f"{root}/audit/label_conflicts/*.parquet").collect().height >= 3


@needs_real
@pytest.mark.slow
def test_celeba_image_filed_under_two_ids_is_found(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, "data.dataset=celeba", f"data.root={CELEBA}",
                      "audit.cv_folds=3", 'audit.label_attributes=["Male"]')
    ingest.run(cfg)
    # a slice of the 10,000 images around the pair keeps the test fast
    keep = [f"{i:06d}.jpg" for i in list(range(12560, 12620)) + list(range(14340, 14400))]
    m = tables.read(cfg, "manifest")
    m = m.filter(pa.compute.is_in(m["image_id"], pa.array(keep)))
    tables.replace(cfg, "manifest", m, schema=m.schema)
    _write_real_features(cfg, m)
    audit.run(cfg)
    t = _audit_tables(cfg)
    exact = t[audit.DUPLICATES].filter(pl.col("kind") == "exact")
    assert sorted(exact["image_id"]) == ["012589.jpg", "014364.jpg"]
    assert exact["distance"].to_list() == [0.0, 0.0]
    # filed under two identities, with one attribute annotated differently
    conf = set(t[audit.LABEL_CONFLICTS]["attribute"].to_list())
    ident = {int(x.split()[1]) for x in (CELEBA / "identity_CelebA.txt").read_text().splitlines()
             if x.split()[0] in ("012589.jpg", "014364.jpg")}
    assert ("identity" in conf) == (len(ident) == 2)


# --------------------------------------------------------------------------- generated

def test_planted_label_flips_rank_high_and_raise_their_groups_rate():
    rng = np.random.default_rng(0)
    n, d = 1200, 6
    X = rng.normal(size=(n, d))
    y = (X @ np.array([2.0, -1.5, 1.0, 0, 0, 0]) + 0.3 * rng.normal(size=n) > 0).astype(int)
    group = np.where(rng.random(n) < 0.5, "a", "b").astype(object)
    flip = np.flatnonzero(group == "b")
    flip = rng.choice(flip, size=int(0.12 * len(flip)), replace=False)  # 12 % of group b only
    noisy = y.copy()
    noisy[flip] = 1 - noisy[flip]

    probs = audit.out_of_sample_probs(X, noisy, folds=5, seed=1)
    is_issue, quality, rank = audit.label_issues(noisy, probs)
    top = set(np.flatnonzero(rank <= len(flip)).tolist())
    precision = len(top & set(flip.tolist())) / len(flip)
    assert precision > 0.7, precision  # the flipped rows are ranked at the top
    recall = is_issue[flip].mean()
    assert recall > 0.7, recall

    rates = audit.issue_rates(is_issue, {"group": group}, alpha=0.05)
    by = {r["group"]: r for r in rates.filter(pl.col("group_by") == "group").iter_rows(named=True)}
    assert by["b"]["rate"] > 3 * by["a"]["rate"]
    assert by["b"]["p_value"] < 1e-6 and by["b"]["significant"]

    # without planted flips the two groups' rates do not differ significantly
    is_clean, _, _ = audit.label_issues(y, audit.out_of_sample_probs(X, y, folds=5, seed=1))
    clean = audit.issue_rates(is_clean, {"group": group}, alpha=0.05)
    assert not clean.filter(pl.col("group_by") == "group")["significant"].any()


def test_near_pairs_same_in_any_block_size_and_groups_exclude_pure_copies():
    rng = np.random.default_rng(1)
    E = rng.normal(size=(300, 16)).astype(np.float32)
    E[10] = E[3] + 0.001  # a near duplicate
    E[20] = E[3]  # an exact copy (in embedding space)
    E[40] = E[30]  # a pair of exact copies only
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    one = audit.near_pairs(E, k=3, threshold=1e-3, block_rows=1000)
    many = audit.near_pairs(E, k=3, threshold=1e-3, block_rows=7)
    for a, b in zip(one[:3], many[:3]):
        np.testing.assert_allclose(a, b, atol=1e-6)
    pairs = set(zip(one[0].tolist(), one[1].tolist()))
    assert pairs == {(3, 10), (3, 20), (10, 20), (30, 40)}
    hashes = np.array([f"h{i}" for i in range(300)], dtype=object)
    hashes[20], hashes[40] = hashes[3], hashes[30]  # byte-identical files
    exact = audit.exact_groups(hashes)
    assert exact[3] == exact[20] >= 0 and exact[30] == exact[40] >= 0 and exact[10] == -1
    near = audit.near_groups(300, one[0], one[1], one[2], exact)
    assert near[3] == near[10] == near[20] >= 0
    assert near[30] == near[40] == -1  # copies of one file only: an exact group, not a near one
    assert (near >= 0).sum() == 3


@pytest.mark.parametrize("exact_max_rows", [10**6, 0], ids=["flat", "ivf"])
def test_near_search_finds_the_brute_force_groups(exact_max_rows):
    """Planted near copies (groups of 2-3, below k) and byte-identical twins among 4,000 random
    rows: the faiss search, exact (flat) or approximate (IVF), gives brute force's pairs and
    groups (brute force here: the whole cosine matrix, every pair within the threshold)."""
    rng = np.random.default_rng(7)
    n, dim, threshold = 4000, 32, 0.02
    E = rng.normal(size=(n, dim)).astype(np.float32)
    rows = rng.choice(n, size=300, replace=False)
    for s, c1, c2 in rows.reshape(-1, 3)[:60]:  # a source and two near copies
        E[c1] = E[s] + 0.05 * rng.normal(size=dim)
        E[c2] = E[s] + 0.05 * rng.normal(size=dim)
    for s, c, _ in rows.reshape(-1, 3)[60:]:  # a source and one near copy
        E[c] = E[s] + 0.05 * rng.normal(size=dim)
    E = audit.normalise(E)
    hashes = np.array([f"h{i}" for i in range(n)], dtype=object)
    twins = rng.choice(np.setdiff1d(np.arange(n), rows), size=20, replace=False)
    for a_, b_ in twins.reshape(-1, 2):  # byte-identical files: equal hash, equal embedding
        E[b_], hashes[b_] = E[a_], hashes[a_]
    D = np.maximum(1.0 - E @ E.T, 0.0)
    bi, bj = np.nonzero(np.triu(D <= threshold, k=1))
    exact = audit.exact_groups(hashes)
    want = audit.near_groups(n, bi, bj, D[bi, bj], exact)
    i, j, d, nearest = audit.near_pairs(E, k=5, threshold=threshold, block_rows=512,
                                        exact_max_rows=exact_max_rows, seed=3)
    assert set(zip(i.tolist(), j.tolist())) == set(zip(bi.tolist(), bj.tolist()))
    np.testing.assert_allclose(d, D[i, j], atol=1e-5)
    got = audit.near_groups(n, i, j, d, exact)
    np.testing.assert_array_equal(got, want)
    assert (want >= 0).sum() == 60 * 3 + 40 * 2  # every planted group, twins apart
    np.fill_diagonal(D, np.inf)
    np.testing.assert_allclose(nearest[list(rows)], D[rows].min(1), atol=1e-5)


def test_near_groups_do_not_chain():
    """A line of points each 0.9 thresholds from the next is one connected component, but no
    member of a group may be farther than the threshold from its leader."""
    n = 10
    i, j = np.arange(n - 1), np.arange(1, n)
    d = np.full(n - 1, 0.9)
    d[4] = 0.5  # the closest pair leads
    groups = audit.near_groups(n, i, j, d, np.full(n, -1))
    sizes = np.bincount(groups[groups >= 0])
    assert sizes.max() <= 3 and groups[4] == groups[5] >= 0  # the closest pair is one group


def test_audit_runs_after_cluster_and_before_classify():
    names = list(pipeline_run.STAGE_NAMES)
    assert names.index("cluster") < names.index("audit") < names.index("classify")


@pytest.mark.slow
def test_drop_action_keeps_conflicting_copies_out_of_classify(tmp_path, ray_session):
    """Two byte-identical files under conflicting labels: with the drop action they are in
    errors/audit and errors/classify and in neither classify's training nor its test rows."""
    import shutil

    from pipeline.run import run_stage
    from tests.helpers import write_tiny_manifest

    cfg = tiny_config(tmp_path, 'classify.features=["annotations"]',
                      'classify.models=["logistic_regression"]', 'classify.samplings=["none"]',
                      "classify.per_cluster=false", "classify.bootstrap=0",
                      "audit.action=drop_conflicting_exact", "audit.cv_folds=3",
                      'audit.label_attributes=["Male"]')
    man = write_tiny_manifest(cfg, n=60)
    ids, uris = man["image_id"].to_pylist(), man["uri"].to_pylist()
    shutil.copyfile(uris[0], uris[-1])  # one photo filed twice (train and test) ...
    smiling = man["Smiling"].to_pylist()
    smiling[-1] = not smiling[0]  # ... under different labels
    man = man.set_column(man.schema.get_field_index("Smiling"), "Smiling",
                         pa.array(smiling, pa.bool_()))
    tables.replace(cfg, "manifest", man, schema=man.schema)
    _write_real_features(cfg, man)
    run_stage(cfg, "audit")
    dup = pl.from_arrow(tables.read(cfg, audit.DUPLICATES))
    conflicting = set(dup.filter(~pl.col("labels_agree") & (pl.col("kind") == "exact"))
                      ["image_id"])
    assert conflicting == {ids[0], ids[-1]}
    assert set(audit.excluded_image_ids(cfg)) == conflicting
    run_stage(cfg, "classify")
    used = set(tables.read(cfg, "classifiers/dataset", columns=["image_id"])["image_id"]
               .to_pylist())
    assert not used & conflicting and len(used) == 60 - len(conflicting)
    reasons = tables.read_errors(cfg, "classify").to_pylist()
    assert {r["image_id"] for r in reasons if "audit" in r["reason"]} == conflicting


@pytest.mark.slow
def test_audit_tables_open_in_spark(tmp_path):
    """Every audit table, as written (schemas from the stage), reads in Spark as it is."""
    pyspark = pytest.importorskip("pyspark", reason="pyspark is in the dev extra")
    from pyspark.sql import SparkSession

    from tests.report_tables import write_audit, write_manifest_and_errors

    cfg = tiny_config(tmp_path)
    man = write_manifest_and_errors(cfg, 20)
    write_audit(cfg, man, None, np.random.default_rng(0))
    spark = (SparkSession.builder.master("local[1]").appName("faceaudit-audit-test")
             .config("spark.ui.enabled", "false").getOrCreate())
    try:
        for name, schema in audit.SCHEMAS.items():
            df = spark.read.parquet(f"{cfg.output.root}/{name}")
            assert df.columns == schema.names, name
            assert df.count() == tables.read(cfg, name).num_rows, name
        conflicts = spark.read.parquet(f"{cfg.output.root}/{audit.LABEL_CONFLICTS}").collect()
        assert conflicts[0]["attribute"] == "Male" and len(conflicts[0]["image_ids"]) == 2
    finally:
        spark.stop()
    assert pyspark.__version__
