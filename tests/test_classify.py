"""Classify stage: planted disparity found, sampling proportions, metric values against
scikit-learn / fairlearn, skops round trip, schemas, target never a feature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from fairlearn.metrics import (MetricFrame, demographic_parity_difference,
                               equalized_odds_difference, false_positive_rate, selection_rate)
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, precision_score,
                             recall_score, roc_auc_score)

from pipeline import classify, tables
from pipeline.classify import (FINDINGS_SCHEMA, METRICS_SCHEMA, MODELS_SCHEMA, PREDICTIONS_SCHEMA,
                               SEP, dataset_schema, load_model, run)
from pipeline.classify._evaluate import METRICS, bootstrap_weights, evaluate, weighted_metrics
from pipeline.classify._sampling import SamplingError, undersample
from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.schemas import LANDMARKS, manifest_schema
from tests.helpers import tiny_config

CLUSTERS_SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("cluster", pa.int32())])


def write_inputs(cfg, n=600, seed=0, noisy_group_flip=0.3, with_clusters=True,
                 with_features=True):
    """Manifest + features + clusters/primary with a planted disparity.

    Attractive = Heavy_Makeup OR Wavy_Hair, then flipped with probability ``noisy_group_flip``
    for Pale_Skin rows and 0.02 for the others: no model can be accurate on Pale_Skin faces,
    so the evaluation must show Pale_Skin=True with the lower accuracy. Clusters are
    2 * Male + Young (4 clusters); the p_* features are the attributes plus noise.
    """
    rng = np.random.default_rng(seed)
    A = {a: rng.random(n) < 0.4 for a in CELEBA_ATTRIBUTES}
    A["Pale_Skin"] = rng.random(n) < 0.3
    clean = A["Heavy_Makeup"] | A["Wavy_Hair"]
    flip = rng.random(n) < np.where(A["Pale_Skin"], noisy_group_flip, 0.02)
    A["Attractive"] = clean ^ flip
    ids = [f"{i:06d}.jpg" for i in range(n)]
    split = np.where(np.arange(n) % 10 < 6, "train", np.where(np.arange(n) % 10 < 8, "val", "test"))
    cols = {"image_id": ids, "uri": [f"/x/{i}" for i in ids], "split": split,
            "identity": np.zeros(n, np.int32), "dataset": ["celeba"] * n,
            **{a: A[a] for a in CELEBA_ATTRIBUTES}, **{c: np.zeros(n, np.int32) for c in LANDMARKS}}
    for c in ("age", "gender", "race", "person"):
        cols[c] = pa.nulls(n)
    schema = manifest_schema()
    tables.replace(cfg, "manifest", pa.table({f.name: cols[f.name] for f in schema}).cast(schema),
                   schema=schema)
    if with_features:
        feats = {"image_id": ids}
        for a in CELEBA_ATTRIBUTES:
            feats[f"p_{a}"] = np.clip(A[a] * 0.8 + 0.1 + rng.normal(0, 0.1, n), 0, 1).astype(np.float32)
        emb = rng.normal(size=(n, 8)).astype(np.float32)
        emb[:, 0] += 2 * A["Heavy_Makeup"]
        feats["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8)
        tables.replace(cfg, "features", pa.table(feats))
    if with_clusters:
        cl = (2 * A["Male"] + A["Young"]).astype(np.int32)
        tables.replace(cfg, "clusters/primary", pa.table({"image_id": ids, "cluster": cl}),
                       schema=CLUSTERS_SCHEMA)
    return A


def _metrics(cfg):
    return tables.read(cfg, "classifiers/metrics").to_pandas()


@pytest.fixture(scope="module")
def stage_run(ray_session, tmp_path_factory):
    """One full run on 600 rows: 2 models × 4 samplings, global + 4 clusters."""
    tmp = tmp_path_factory.mktemp("classify")
    cfg = tiny_config(tmp, 'classify.features=["semantic"]', "classify.bootstrap=100",
                      'classify.params={random_forest={n_estimators=30}}')
    A = write_inputs(cfg)
    return cfg, A, run(cfg)


@pytest.mark.slow  # shares the 24-fit module run (~30-90 s on a busy 2-core machine)
def test_planted_disparity_is_found(stage_run):
    cfg, _, result = stage_run
    m = _metrics(cfg)
    sel = m[(m.model == "logistic_regression") & (m.sampling == "none") & (m.trained_on == "global")]
    acc = sel[(sel.group_by == "Pale_Skin") & (sel.metric == "accuracy")].set_index("group")
    assert acc.loc["True", "value"] < acc.loc["False", "value"] - 0.15
    # the intervals of the two groups do not overlap, and the gap's interval excludes zero
    assert acc.loc["True", "ci_high"] < acc.loc["False", "ci_low"]
    gap = sel[(sel.evaluated_on == "gap:Pale_Skin") & (sel.metric == "accuracy_gap_difference")]
    assert len(gap) == 1 and gap.ci_low.iloc[0] > 0
    assert gap.value.iloc[0] == pytest.approx(acc.loc["False", "value"] - acc.loc["True", "value"])
    # an attribute with no planted effect: its accuracy gap interval covers zero
    young = sel[(sel.evaluated_on == "gap:Young") & (sel.metric == "accuracy_gap_difference")]
    assert young.ci_low.iloc[0] <= 0 <= young.ci_high.iloc[0]
    # the permutation test and the run-wide correction keep the planted gap, not Young's
    f = tables.read(cfg, "classifiers/findings").to_pandas()
    f = f[(f.model == "logistic_regression") & (f.sampling == "none") & (f.trained_on == "global")
          & (f.metric == "accuracy_gap_difference")].set_index("group_by")
    assert f.loc["Pale_Skin", "significant"] and f.loc["Pale_Skin", "low_group"] == "True"
    assert not f.loc["Young", "significant"]


@pytest.mark.slow  # shares the 24-fit module run (~30-90 s on a busy 2-core machine)
def test_outputs_follow_schemas_and_contract(stage_run):
    cfg, _, result = stage_run
    for name, schema in (("classifiers/metrics", METRICS_SCHEMA),
                         ("classifiers/models", MODELS_SCHEMA),
                         ("classifiers/predictions", PREDICTIONS_SCHEMA)):
        t = tables.read(cfg, name)
        assert t.schema.remove_metadata().equals(schema.remove_metadata()), name
        assert t.num_rows > 0
    ds = tables.read(cfg, "classifiers/dataset")
    models = tables.read(cfg, "classifiers/models").to_pandas()
    feats = [f for f in ds.column_names if f not in ("image_id", "split", "cluster", "target")]
    assert ds.schema.remove_metadata().equals(dataset_schema(feats))
    # 2 models × (4 global + 2 samplings × 4 clusters)
    assert len(models) == 2 * (4 + 2 * 4) == result["models"]
    assert set(models.trained_on) == {"global", "cluster_0", "cluster_1", "cluster_2", "cluster_3"}
    assert {r["reason"] for r in result["skipped"]} == {
        "inside one cluster this sampling equals none", "inside one cluster this sampling equals class"}
    m = _metrics(cfg)
    assert set(m.trained_on) == {"global", "per_cluster"}
    plain = ["cluster", "Male", "Young", "Pale_Skin"]
    crossed = {f"cluster{SEP}{a}" for a in plain[1:]} | {
        f"{a}{SEP}{b}" for i, a in enumerate(plain[1:]) for b in plain[i + 2:]}
    assert {"overall", *plain} <= set(m.group_by) <= {"overall", *plain} | crossed
    # a crossed grouping is scored, or has too-small groups (every one of them when it is absent)
    small_groups = result["significance"]["too_small"]
    assert crossed == (set(m.group_by) & crossed) | set(small_groups)
    assert all(g in small_groups for g in crossed - set(m.group_by))
    # the index folder holds only Parquet; every model file is in its own folder, named by key
    root = Path(cfg.output.root)
    assert sorted(p.suffix for p in (root / "classifiers/models").iterdir()) == [".parquet"]
    assert sorted(models.path) == sorted(
        classify.model_file(classify.model_key(r.model, r.sampling, r.trained_on))
        for r in models.itertuples())
    assert sorted(p.name for p in (root / classify.MODEL_FILES).iterdir()) == sorted(
        p.rsplit("/", 1)[-1] for p in models.path)
    # what the report reads back: the settings the stage ran with
    for name in (classify.METRICS_TABLE, classify.FINDINGS_TABLE):
        assert classify.read_settings(cfg, name) == classify.Settings.from_config(cfg)
    # intersectional groups below classify.min_group_size (30 test rows) are not scored
    small = m[m.group_by.isin(crossed) & ~m.evaluated_on.str.startswith("gap:")]
    assert (small.n >= 30).all()
    f = tables.read(cfg, "classifiers/findings")
    assert f.schema.remove_metadata().equals(FINDINGS_SCHEMA.remove_metadata())
    f = f.to_pandas()
    gap_rows = m[m.evaluated_on.str.startswith("gap:")]
    key = ["model", "sampling", "trained_on", "group_by", "metric"]
    joined = gap_rows.merge(f, on=key, suffixes=("", "_f"), validate="one_to_one")
    assert len(joined) == len(gap_rows) == len(f) == result["findings_rows"]
    assert np.allclose(joined.value, joined.value_f, equal_nan=True)
    assert (f.p_adjusted.dropna() >= f.p_value.dropna()).all()
    assert (f.significant == (f.p_adjusted <= 0.05)).all()
    gaps = set(m[m.evaluated_on.str.startswith("gap:")].metric)
    assert {f"{x}_gap_{k}" for x in METRICS for k in ("difference", "ratio")} \
        | {"demographic_parity_difference", "equalized_odds_difference"} == gaps
    preds = tables.read(cfg, "classifiers/predictions").to_pandas()
    n_test = int((ds.column("split").to_numpy(zero_copy_only=False) == "test").sum())
    g = preds[(preds.model == "random_forest") & (preds.sampling == "class")]
    assert (g.trained_on == "global").sum() == n_test
    assert (g.trained_on != "global").sum() == n_test  # every test row scored by its cluster's model
    assert set(preds.split) == {"test"}


@pytest.mark.slow  # shares the 24-fit module run (~30-90 s on a busy 2-core machine)
def test_target_never_a_feature(stage_run, tmp_path, ray_session):
    cfg, _, result = stage_run
    models = tables.read(cfg, "classifiers/models").to_pylist()
    for r in models:
        assert "Attractive" not in r["features"] and "p_Attractive" not in r["features"]
    assert "p_Attractive" not in tables.read(cfg, "classifiers/dataset").column_names
    # every source together: still no target, and the column order is the documented one
    cfg2 = tiny_config(tmp_path, 'classify.features=["semantic", "annotations", "embedding"]',
                       'classify.models=["logistic_regression"]', 'classify.samplings=["none"]',
                       "classify.per_cluster=false", "classify.bootstrap=0",
                       "classify.embedding_components=3")
    write_inputs(cfg2, n=200)
    out = run(cfg2)
    assert "Attractive" not in out["features"] and "p_Attractive" not in out["features"]
    assert out["features"][-3:] == ["pc_1", "pc_2", "pc_3"]
    assert len(out["features"]) == 39 + 39 + 3


@pytest.mark.slow  # shares the 24-fit module run (~30-90 s on a busy 2-core machine)
def test_saved_models_load_and_predict_the_same(stage_run):
    cfg, _, _ = stage_run
    ds = tables.read(cfg, "classifiers/dataset").to_pandas()
    preds = tables.read(cfg, "classifiers/predictions").to_pandas()
    for r in tables.read(cfg, "classifiers/models").to_pylist():
        if r["sampling"] != "class":
            continue
        est = load_model(cfg, r["path"])
        p = preds[(preds.model == r["model"]) & (preds.sampling == r["sampling"])
                  & (preds.trained_on == r["trained_on"])]
        X = ds.set_index("image_id").loc[p.image_id, r["features"]].to_numpy()
        np.testing.assert_allclose(est.predict_proba(X)[:, 1], p.score.to_numpy(), rtol=0, atol=1e-12)
        assert ((est.predict_proba(X)[:, 1] >= r["threshold"]) == p.label.to_numpy()).all()
        assert type(est).__name__ == "Pipeline"
        if r["model"] == "logistic_regression":
            assert list(est.named_steps) == ["scale", "model"]


def test_rerun_is_reproducible(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, 'classify.features=["annotations"]', "classify.bootstrap=20",
                      'classify.models=["logistic_regression"]',
                      'classify.samplings=["none", "cluster_class"]')
    write_inputs(cfg, n=240, with_features=False)
    first = run(cfg)
    before = {n: tables.read(cfg, f"classifiers/{n}").to_pandas() for n in ("metrics", "predictions")}
    second = run(cfg)
    for name, df in before.items():
        assert df.equals(tables.read(cfg, f"classifiers/{name}").to_pandas()), name
    assert first["thresholds"] == second["thresholds"]


@pytest.mark.parametrize("strategy", ["none", "class", "cluster", "cluster_class"])
def test_sampling_proportions(strategy):
    rng = np.random.default_rng(1)
    n = 2000
    cluster = rng.choice(4, size=n, p=[0.5, 0.3, 0.15, 0.05]).astype(np.int32)
    y = rng.random(n) < np.array([0.2, 0.5, 0.7, 0.4])[cluster]
    cluster[:10] = -1  # rows without a cluster
    idx = undersample(y, cluster, strategy, np.random.default_rng(7))
    assert len(np.unique(idx)) == len(idx)  # drawn without replacement
    ys, cs = y[idx], cluster[idx]
    if strategy == "none":
        assert len(idx) == n
    elif strategy == "class":
        assert ys.sum() == (~ys).sum() == min(y.sum(), (~y).sum())
    elif strategy == "cluster":
        assert (cs >= 0).all()
        counts = np.bincount(cs, minlength=4)
        assert (counts == np.bincount(cluster[cluster >= 0]).min()).all()
    else:
        assert (cs >= 0).all()
        cells = np.bincount(cs * 2 + ys, minlength=8)
        assert (cells == cells[0]).all() and cells[0] > 0
    # same seed, same rows
    assert np.array_equal(idx, undersample(y, cluster, strategy, np.random.default_rng(7)))


def test_cluster_class_needs_both_classes_everywhere():
    y = np.array([1, 0, 1, 1], bool)
    with pytest.raises(SamplingError, match=r"\(1, False\)"):
        undersample(y, np.array([0, 0, 1, 1]), "cluster_class", np.random.default_rng(0))


def test_metric_values_match_sklearn_and_fairlearn():
    rng = np.random.default_rng(3)
    n = 120
    y = rng.random(n) < 0.45
    score = np.round(rng.random(n) * 0.6 + 0.4 * y, 2)  # ties included
    label = score >= 0.5
    g = np.array(["a", "b", "c"], dtype=object)[rng.integers(0, 3, n)]
    ref = {"accuracy": accuracy_score(y, label), "balanced_accuracy": balanced_accuracy_score(y, label),
           "precision": precision_score(y, label), "recall": recall_score(y, label),
           "fpr": false_positive_rate(y, label), "f1": f1_score(y, label),
           "roc_auc": roc_auc_score(y, score), "selection_rate": selection_rate(y, label),
           "base_rate": y.mean()}
    # the bootstrap's weighted metrics with unit weights are the plain metrics
    np.testing.assert_allclose(weighted_metrics(y, label, score, np.ones(n))[:, 0],
                               [ref[k] for k in METRICS], rtol=1e-12)
    # integer weights equal the metric on the repeated rows (what a bootstrap resample is)
    w = rng.integers(0, 3, n)
    rep = np.repeat(np.arange(n), w)
    np.testing.assert_allclose(weighted_metrics(y, label, score, w)[[0, 6], 0],
                               [accuracy_score(y[rep], label[rep]), roc_auc_score(y[rep], score[rep])])
    rows = evaluate(y, score, label, {"grp": g}, bootstrap_weights(n, 50, rng), 0.9)
    got = {(r["evaluated_on"], r["metric"]): r for r in rows}
    for k, v in ref.items():
        assert got[("overall", k)]["value"] == pytest.approx(v)
        assert got[("overall", k)]["ci_low"] <= v <= got[("overall", k)]["ci_high"]
    mf = MetricFrame(metrics={"acc": accuracy_score, "rec": recall_score}, y_true=y, y_pred=label,
                     sensitive_features=g)
    for grp in ("a", "b", "c"):
        assert got[(f"grp={grp}", "accuracy")]["value"] == pytest.approx(mf.by_group.loc[grp, "acc"])
        assert got[(f"grp={grp}", "recall")]["value"] == pytest.approx(mf.by_group.loc[grp, "rec"])
        assert got[(f"grp={grp}", "accuracy")]["n"] == int((g == grp).sum())
    assert got[("gap:grp", "accuracy_gap_difference")]["value"] == pytest.approx(
        mf.difference()["acc"])
    assert got[("gap:grp", "accuracy_gap_ratio")]["value"] == pytest.approx(mf.ratio()["acc"])
    assert got[("gap:grp", "demographic_parity_difference")]["value"] == pytest.approx(
        demographic_parity_difference(y, label, sensitive_features=g))
    assert got[("gap:grp", "equalized_odds_difference")]["value"] == pytest.approx(
        equalized_odds_difference(y, label, sensitive_features=g))


def test_undefined_metrics_are_nan_not_zero():
    y = np.array([1, 1, 1, 0, 0, 0], bool)
    label = np.array([1, 0, 1, 0, 1, 0], bool)
    g = np.array(["pos", "pos", "pos", "neg", "neg", "neg"], dtype=object)
    rows = evaluate(y, label.astype(float), label, {"g": g}, bootstrap_weights(6, 0, None), 0.95)
    got = {(r["evaluated_on"], r["metric"]): r["value"] for r in rows}
    assert np.isnan(got[("g=pos", "fpr")]) and np.isnan(got[("g=neg", "recall")])
    assert np.isnan(got[("g=pos", "roc_auc")])
    assert got[("g=pos", "recall")] == pytest.approx(2 / 3)


@pytest.mark.parametrize("method", ["mutual_info", "importance"])
def test_feature_selection_keeps_the_informative_features(ray_session, tmp_path, method):
    cfg = tiny_config(tmp_path, 'classify.features=["annotations"]', "classify.bootstrap=0",
                      'classify.models=["logistic_regression"]', 'classify.samplings=["none"]',
                      "classify.per_cluster=false", f"classify.feature_selection={method}",
                      "classify.select_k=4")
    write_inputs(cfg, n=400, with_features=False, noisy_group_flip=0.02)
    out = run(cfg)
    (model,) = tables.read(cfg, "classifiers/models").to_pylist()
    assert len(model["features"]) == 4
    # the target was planted as Heavy_Makeup OR Wavy_Hair: both must be chosen
    assert {"Heavy_Makeup", "Wavy_Hair"} <= set(model["features"])
    assert out["selected_features"]["logistic_regression__none__global"] == model["features"]
    est = load_model(cfg, model["path"])
    assert est.n_features_in_ == 4


def test_noise_rows_have_no_cluster_and_are_left_out_of_cluster_sampling(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, 'classify.features=["annotations"]', "classify.bootstrap=0",
                      'classify.models=["logistic_regression"]', 'classify.samplings=["cluster"]',
                      "classify.per_cluster=false")
    A = write_inputs(cfg, n=300, with_features=False)
    cl = (2 * A["Male"] + A["Young"]).astype(np.int32)
    cl[:30] = -1  # HDBSCAN-style noise
    ids = [f"{i:06d}.jpg" for i in range(300)]
    tables.replace(cfg, "clusters/primary", pa.table({"image_id": ids, "cluster": cl}),
                   schema=CLUSTERS_SCHEMA)
    out = run(cfg)
    ds = tables.read(cfg, "classifiers/dataset").to_pandas()
    assert ds.cluster.isna().sum() == 30 and out["notes"]["rows_in_noise_cluster"] == 30
    train = ds[(ds.split == "train") & ds.cluster.notna()]
    (model,) = tables.read(cfg, "classifiers/models").to_pylist()
    assert model["n_train"] == 4 * train.cluster.value_counts().min()


def test_without_clusters_only_global_runs(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, 'classify.features=["annotations"]', "classify.bootstrap=10",
                      'classify.models=["logistic_regression"]')
    write_inputs(cfg, n=200, with_clusters=False, with_features=False)
    out = run(cfg)
    models = tables.read(cfg, "classifiers/models").to_pandas()
    assert set(models.trained_on) == {"global"} and set(models.sampling) == {"none", "class"}
    assert "clusters/primary missing" in out["notes"]["clusters"]
    assert "cluster" not in set(_metrics(cfg).group_by)


def test_semantic_without_features_table_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path)
    write_inputs(cfg, n=50, with_features=False)
    with pytest.raises(ValueError, match="run the extract stage first"):
        run(cfg)


def test_bad_params_are_rejected(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, 'classify.features=["annotations"]',
                      'classify.params={random_forest={random_state=3}}')
    write_inputs(cfg, n=60, with_features=False)
    with pytest.raises(ValueError, match="random_state"):
        run(cfg)
