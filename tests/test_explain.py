"""The explain stage on generated classify outputs (tables + skops models written here, in the
layout the classify stage writes), on the session's 2-CPU Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import skops.io as sio
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline import explain, storage, tables
from pipeline.classify import MODELS_SCHEMA, dataset_schema, model_file, model_key
from tests.conftest import s3_overrides
from tests.helpers import tiny_config

FEATURES = [f"p_f{i}" for i in range(6)]
PLANTED, PLANTED_CLUSTER, OTHER = "p_f3", 2, "p_f0"

# classify's own schemas: these tables are what classify writes
DATASET_SCHEMA = dataset_schema(FEATURES)


def _estimator(name: str):
    """As the classify stage saves them: a Pipeline whose last step is the model."""
    if name == "random_forest":
        return Pipeline([("model", RandomForestClassifier(n_estimators=20, max_depth=4,
                                                          random_state=0))])
    if name == "hist_gradient_boosting":
        return Pipeline([("model", HistGradientBoostingClassifier(max_iter=20, random_state=0))])
    return Pipeline([("scale", StandardScaler()), ("model", LogisticRegression())])


def write_classify_outputs(cfg, n: int = 800, k: int = 4, seed: int = 0,
                           models=("random_forest", "logistic_regression"),
                           global_only=("hist_gradient_boosting",)) -> None:
    """Rows in ``k`` clusters; in cluster PLANTED_CLUSTER the label follows PLANTED only,
    elsewhere it follows OTHER (and a little p_f1). Fits global and per-cluster models."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, len(FEATURES)))
    cluster = np.arange(n) % k
    noise = 0.3 * rng.normal(size=n)
    y = np.where(cluster == PLANTED_CLUSTER, X[:, 3] + noise > 0,
                 X[:, 0] + 0.4 * X[:, 1] + noise > 0)
    split = np.array(["train", "train", "train", "val", "test"])[(np.arange(n) // k) % 5]
    cols = {"image_id": [f"{i:06d}.jpg" for i in range(n)], "split": split.tolist(),
            "cluster": cluster.astype(np.int32), "target": y}
    cols.update({f: X[:, j] for j, f in enumerate(FEATURES)})
    tables.replace(cfg, "classifiers/dataset", pa.table(cols, schema=DATASET_SCHEMA),
                   schema=DATASET_SCHEMA)
    rows = []
    scopes = [("global", None)] + [(f"cluster_{c}", c) for c in range(k)]
    for name in tuple(models) + tuple(global_only):
        for trained_on, c in scopes:
            if c is not None and name in global_only:
                continue
            m = (split == "train") & ((cluster == c) if c is not None else True)
            est = _estimator(name).fit(X[m], y[m])
            path = model_file(model_key(name, "none", trained_on))
            storage.write_bytes(tables.root(cfg).join(*path.split("/")), sio.dumps(est))
            rows.append({"model": name, "sampling": "none", "trained_on": trained_on,
                         "cluster": c, "path": path, "features": FEATURES,
                         "n_train": int(m.sum()), "target": "Attractive", "threshold": 0.5,
                         "n_train_positive": int(y[m].sum())})
    tables.replace(cfg, "classifiers/models", pa.Table.from_pylist(rows, schema=MODELS_SCHEMA),
                   schema=MODELS_SCHEMA)


@pytest.fixture(scope="module")
def explained(tmp_path_factory, ray_session):
    """One run shared by the tests that only read its outputs."""
    cfg = tiny_config(tmp_path_factory.mktemp("explain"))
    write_classify_outputs(cfg)
    return cfg, explain.run(cfg)


def test_tables_follow_their_schemas_and_values_add_up(explained):
    cfg, result = explained
    values = tables.read(cfg, "shap/values")
    assert values.schema.remove_metadata() == explain.values_schema(FEATURES)
    t = values.to_pandas()
    # global models: 50 of the 160 test rows (explain.max_rows); cluster models: their 40.
    sizes = t.groupby(["model", "trained_on"]).size().to_dict()
    assert sizes[("random_forest", "global")] == 50
    assert sizes[("hist_gradient_boosting", "global")] == 50
    assert sizes[("logistic_regression", "cluster_1")] == 40
    assert len(t) == 3 * 50 + 2 * 4 * 40 == result["rows"]
    assert result["blocks"] == 3 * 2 + 2 * 4 * 2  # block_rows = 25
    assert set(t["output"]) == {"probability", "log_odds"}
    assert set(t.loc[t.model == "random_forest", "output"]) == {"probability"}
    # Additivity, from the table, and the model output column is the model's real output.
    assert np.abs(t[FEATURES].sum(axis=1) + t["base_value"] - t["model_output"]).max() < 1e-6
    data = tables.read(cfg, "classifiers/dataset").to_pandas().set_index("image_id")
    for name, out in (("random_forest", "probability"), ("logistic_regression", "log_odds"),
                      ("hist_gradient_boosting", "log_odds")):
        rows = t[(t.model == name) & (t.trained_on == "global")]
        model, _ = explain.load_model(cfg, explain.ModelSpec(
            name, "none", "global", None,
            model_file(model_key(name, "none", "global")), tuple(FEATURES)))
        expect = explain.model_output(model, data.loc[rows.image_id, FEATURES].to_numpy(), out)
        np.testing.assert_allclose(rows["model_output"], expect, atol=1e-12)
        assert (rows["cluster"].to_numpy() == data.loc[rows.image_id, "cluster"].to_numpy()).all()
    # cluster models only explain their own cluster's test rows
    c3 = t[t.trained_on == "cluster_3"]
    assert set(c3["cluster"]) == {3} and set(data.loc[c3.image_id, "split"]) == {"test"}

    imp = tables.read(cfg, "shap/importance")
    assert imp.schema.remove_metadata() == explain.IMPORTANCE_SCHEMA
    imp = imp.to_pandas()
    g = imp[(imp.model == "random_forest") & (imp.trained_on == "global")]
    assert g["cluster"].isna().sum() == len(FEATURES)  # the all-rows vector
    assert sorted(g["cluster"].dropna().unique()) == [0, 1, 2, 3]
    for _, grp in imp.groupby(["model", "trained_on", "cluster"], dropna=False):
        assert sorted(grp["rank"]) == list(range(1, len(FEATURES) + 1))
    # mean |SHAP| recomputed from the values table
    rf = t[(t.model == "random_forest") & (t.trained_on == "global") & (t.cluster == 1)]
    want = rf[FEATURES].abs().mean()
    got = g[g.cluster == 1].set_index("feature")["mean_abs_shap"]
    np.testing.assert_allclose(got[FEATURES].to_numpy(), want.to_numpy(), rtol=1e-12)

    comp = tables.read(cfg, "shap/comparison")
    assert comp.schema.remove_metadata() == explain.COMPARISON_SCHEMA
    comp = comp.to_pandas()
    kinds = comp[comp.model == "random_forest"].groupby("kind").size().to_dict()
    assert kinds == {"global_model_between_clusters": 6, "global_model_cluster_vs_all": 4,
                     "cluster_models_between_clusters": 6, "cluster_model_vs_global": 4,
                     "cluster_model_vs_global_same_cluster": 4}
    assert comp["top_k_overlap"].between(0, 1).all() and comp["kendall_tau"].between(-1, 1).all()
    assert comp["top_k_overlap"].notna().all() and comp["kendall_tau"].notna().all()

    plots = {i.path.rsplit("/", 1)[-1] for i in storage.list_files(tables.location(cfg, "shap/plots"))}
    assert all(p.startswith("beeswarm__") for p in plots)  # the only figures the report uses
    assert {f"beeswarm__logistic_regression__none__cluster_{c}__cluster_{c}.png"
            for c in range(4)} <= plots
    png = storage.read_bytes(tables.location(cfg, "shap/plots").join(
        "beeswarm__random_forest__none__global__all.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["plots"] == len(plots)


def test_planted_feature_ranks_first_in_its_cluster_only(explained):
    cfg, result = explained
    imp = tables.read(cfg, "shap/importance").to_pandas()
    for model in ("random_forest", "logistic_regression"):
        own = imp[(imp.model == model) & (imp.trained_on != "global")]
        top = own[own["rank"] == 1].set_index("cluster")["feature"].to_dict()
        assert top[PLANTED_CLUSTER] == PLANTED, (model, top)
        assert all(top[c] == OTHER for c in top if c != PLANTED_CLUSTER), (model, top)
        # The global model cannot see the cluster: it ranks OTHER first everywhere.
        g = imp[(imp.model == model) & (imp.trained_on == "global") & (imp["rank"] == 1)]
        assert set(g["feature"]) == {OTHER}
    # ... and the comparison says which cluster differs most from the global model.
    for model in ("random_forest", "logistic_regression"):
        ranked = result["most_different_from_global"][f"{model}/none"]
        assert ranked[0]["cluster"] == PLANTED_CLUSTER
        assert ranked[0]["kind"] == "cluster_model_vs_global"


@pytest.mark.slow
def test_same_seed_same_values_and_rerun_reuses_blocks(tmp_path, ray_session):
    a = tiny_config(tmp_path / "a", 'explain.models=["random_forest"]')
    b = tiny_config(tmp_path / "b", 'explain.models=["random_forest"]')
    c = tiny_config(tmp_path / "c", 'explain.models=["random_forest"]', "run.seed=7")
    out = {}
    for name, cfg in (("a", a), ("b", b), ("c", c)):
        write_classify_outputs(cfg, models=("random_forest",), global_only=())
        explain.run(cfg)
        out[name] = tables.read(cfg, "shap/values").sort_by(
            [("trained_on", "ascending"), ("image_id", "ascending")])
    assert out["a"].equals(out["b"])
    ids = {k: set(v.filter(pa.compute.equal(v["trained_on"], "global"))["image_id"].to_pylist())
           for k, v in out.items()}
    assert ids["a"] != ids["c"]  # another run seed samples other rows

    again = explain.run(a)  # unchanged inputs: every block is reused, none recomputed
    assert again["blocks_computed"] == 0 and again["blocks_reused"] == again["blocks"]
    assert tables.read(a, "shap/values").sort_by(
        [("trained_on", "ascending"), ("image_id", "ascending")]).equals(out["a"])
    # Another block size replaces the parts instead of adding to them.
    a2 = tiny_config(tmp_path / "a", 'explain.models=["random_forest"]', "explain.block_rows=10")
    res = explain.run(a2)
    assert res["blocks_computed"] == res["blocks"] == 5 + 4 * 4
    assert tables.read(a2, "shap/values").num_rows == out["a"].num_rows


def test_compare_kendall_tau_and_top_k_overlap():
    left = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    same = explain.compare(left, dict(left), top_k=2)
    assert same["kendall_tau"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0
    rev = explain.compare(left, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, top_k=2)
    assert rev["kendall_tau"] == pytest.approx(-1.0) and rev["top_k_overlap"] == 0.0
    part = explain.compare(left, {"a": 4.0, "c": 3.0, "b": 2.0, "e": 9.0}, top_k=2)
    assert part["n_features"] == 3 and part["kendall_tau"] == pytest.approx(1 / 3)
    assert part["top_k_overlap"] == 0.5  # top-2 {a, b} vs {e, a}
    flat = explain.compare(left, {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.0}, top_k=2)
    # a constant model: tau is undefined and it has no top features; both stored as null
    assert flat["kendall_tau"] is None and flat["top_k_overlap"] is None


def test_additivity_check_raises_naming_model_and_block():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(10, 4))
    out = values.sum(1) + 0.25
    assert explain.check_additivity(values, 0.25, out, 1e-9, "rf__none__global", 3) < 1e-12
    tampered = values.copy()
    tampered[4, 2] += 0.01
    with pytest.raises(explain.AdditivityError, match=r"rf__none__global, block 3: 1 of 10"):
        explain.check_additivity(tampered, 0.25, out, 1e-3, "rf__none__global", 3)
    nan = values.copy()
    nan[0, 0] = np.nan
    with pytest.raises(explain.AdditivityError):
        explain.check_additivity(nan, 0.25, out, 1e-3, "m", 0)


def test_explainer_reproduces_each_model_kind():
    """Each supported kind, one block, no Ray: values add up to the model's own output."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 5))
    y = X[:, 0] - X[:, 1] > 0
    bare = {"bare_forest": RandomForestClassifier(n_estimators=10, random_state=0),
            "bare_logistic": LogisticRegression(),
            "scaled_forest": make_pipeline(StandardScaler(), RandomForestClassifier(
                n_estimators=10, random_state=0))}
    for name in ("random_forest", "logistic_regression", "hist_gradient_boosting", *bare):
        model = (bare[name] if name in bare else _estimator(name)).fit(X, y)
        res = explain.explain_block(f"test-kinds-{name}", model, X[:30], X[100:140])
        kind = explain.explainer_kind(model)
        assert res["values"].shape == (40, 5)
        explain.check_additivity(res["values"], res["base"], res["output"], 1e-6, name, 0)
        np.testing.assert_allclose(res["output"], explain.model_output(model, X[100:140],
                                                                       kind["output"]))
    with pytest.raises(explain.ExplainError, match="binary classifier"):
        explain.explainer_kind(RandomForestClassifier(n_estimators=2).fit(X, np.zeros(200)))


def test_model_file_that_disagrees_with_its_table_is_an_error(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, 'explain.models=["random_forest"]')
    write_classify_outputs(cfg, models=("random_forest",), global_only=())
    rng = np.random.default_rng(0)
    wrong = RandomForestClassifier(n_estimators=3).fit(rng.normal(size=(50, 3)), rng.random(50) > .5)
    path = model_file(model_key("random_forest", "none", "cluster_1"))
    storage.write_bytes(tables.root(cfg).join(*path.split("/")), sio.dumps(wrong))
    with pytest.raises(explain.ExplainError, match="random_forest__none__cluster_1.*3 features"):
        explain.run(cfg)


def test_unknown_model_name_in_config_is_an_error(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, 'explain.models=["svm"]')
    write_classify_outputs(cfg, models=("random_forest",), global_only=())
    with pytest.raises(explain.ExplainError, match=r"explain.models names \['svm'\]"):
        explain.run(cfg)


@pytest.mark.s3
@pytest.mark.slow
def test_runs_against_s3(tmp_path, ray_session, s3_server, s3_bucket):
    cfg = tiny_config(tmp_path, f"output.root=s3://{s3_bucket}/run", *s3_overrides(s3_server),
                      'explain.models=["random_forest"]')
    write_classify_outputs(cfg, models=("random_forest",), global_only=())
    first = explain.run(cfg)
    assert first["blocks_computed"] == first["blocks"] == 2 + 4 * 2
    assert tables.read(cfg, "shap/values").num_rows == 50 + 4 * 40
    assert tables.read(cfg, "shap/importance").num_rows == (5 + 4) * len(FEATURES)
    plots = storage.list_files(tables.location(cfg, "shap/plots"))
    assert len(plots) == first["plots"] > 0
    again = explain.run(cfg)  # part metadata is read back from S3: nothing recomputed
    assert again["blocks_reused"] == again["blocks"]


def test_cluster_model_without_test_rows_is_skipped_with_reason(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, 'explain.models=["random_forest"]')
    write_classify_outputs(cfg, models=("random_forest",), global_only=())
    data = tables.read(cfg, "classifiers/dataset")
    moved = pa.compute.if_else(pa.compute.and_(pa.compute.equal(data["cluster"], 3),
                                               pa.compute.equal(data["split"], "test")),
                               "val", data["split"])
    data = data.set_column(data.schema.get_field_index("split"), "split", moved)
    tables.replace(cfg, "classifiers/dataset", data, schema=DATASET_SCHEMA)
    result = explain.run(cfg)
    assert result["skipped"] == {"random_forest__none__cluster_3": "no test rows in its scope"}
    values = tables.read(cfg, "shap/values")
    assert set(values["trained_on"].to_pylist()) == {"global", "cluster_0", "cluster_1",
                                                     "cluster_2"}
    assert 3 not in set(values["cluster"].to_pylist())


def test_tree_values_add_up_for_rows_on_a_split_threshold():
    """Background rows within float32 rounding of a split threshold: sklearn's trees compare in
    float32, so the explainer must see them as the model does (this broke on real CelebA: the
    base value was off by one row's routing)."""
    from sklearn.tree import DecisionTreeClassifier

    X = np.array([[0.1], [0.2], [0.3], [0.4]])
    y = np.array([False, False, True, True])
    model = DecisionTreeClassifier(random_state=0).fit(X, y)
    t = model.tree_.threshold[0]
    # a float64 value above the threshold whose float32 rounding is at or below it
    v = next(x for x in (np.nextafter(t, 1.0) + i * 1e-17 for i in range(1, 10_000))
             if x > t and np.float32(x) <= t)
    background = np.array([[v], [v], [0.35]])  # shap walks the background in float64
    rows = np.array([[v], [0.35], [0.15]])
    res = explain.explain_block("test-threshold-row", model, background, rows)
    kind = explain.explainer_kind(model)
    np.testing.assert_allclose(res["output"], explain.model_output(model, rows, kind["output"]))
    explain.check_additivity(res["values"], res["base"], res["output"], 1e-9, "tree", 0)
