"""The cluster stage on tiny generated data: planted clusters, determinism, metric definitions,
annotations-only runs, schemas, skips and errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import (adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score,
                             normalized_mutual_info_score, silhouette_score)

from pipeline import tables
from pipeline.cluster import (ASSIGNMENTS_SCHEMA, CENTROID_DISTANCES_SCHEMA, CONDITIONAL_SCHEMA,
                              DEMOGRAPHICS_SCHEMA, PRIMARY_SCHEMA, PROFILES_SCHEMA, sweep_schema)
from pipeline.cluster import run as run_cluster
from pipeline.cluster._describe import cluster_label
from pipeline.cluster._fit import SweepSpec, choose_k, fit_predict, purity, score
from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.stages import StageSkipped
from pipeline.schemas import manifest_schema
from tests.helpers import tiny_config, write_tiny_manifest

N, K_TRUE, EMB_DIM = 150, 3, 24


def _write_planted_features(cfg, manifest: pa.Table, seed: int = 0, nan_rows: int = 0) -> np.ndarray:
    """A features table whose embeddings and p_* have K_TRUE well-separated planted clusters."""
    r = np.random.default_rng(seed)
    ids = manifest["image_id"].to_pylist()
    truth = np.arange(len(ids)) % K_TRUE
    r.shuffle(truth)
    centres = r.normal(0, 6, (K_TRUE, EMB_DIM))
    emb = (centres[truth] + r.normal(0, 1, (len(ids), EMB_DIM))).astype(np.float32)
    # Each planted cluster has its own typical probability profile (near 0 or near 1).
    profile = r.random((K_TRUE, len(CELEBA_ATTRIBUTES))) < 0.5
    probs = np.clip(np.where(profile[truth], 0.85, 0.15) + r.normal(0, 0.05, (len(ids), len(CELEBA_ATTRIBUTES))), 0, 1)
    cols = {"image_id": pa.array(ids, pa.string())}
    for j, a in enumerate(CELEBA_ATTRIBUTES):
        cols[f"p_{a}"] = pa.array(probs[:, j].astype(np.float32))
    if nan_rows:
        emb[:nan_rows] = np.nan
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), EMB_DIM)
    tables.replace(cfg, "features", pa.table(cols))
    return truth


def _planted_cfg(root):
    return tiny_config(root, "cluster.spaces=[\"embedding\", \"semantic\", \"annotations\"]",
                       "cluster.sample_rows=60",  # < N: exercises the out-of-sample labelling
                       "cluster.pca_fit_rows=80", "cluster.silhouette_rows=120")


@pytest.fixture(scope="module")
def planted(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    cfg = _planted_cfg(root)
    manifest = write_tiny_manifest(cfg, n=N, size=(32, 32))
    truth = _write_planted_features(cfg, manifest, nan_rows=2)
    result = run_cluster(cfg)
    return cfg, manifest, truth, result


def _truth_by_id(manifest, truth):
    return dict(zip(manifest["image_id"].to_pylist(), truth))


def test_planted_clusters_are_recovered(planted):
    cfg, manifest, truth, result = planted
    by_id = _truth_by_id(manifest, truth)
    a = tables.read(cfg, "clusters/assignments").to_pandas()
    for space in ("embedding", "semantic"):
        for algo in ("kmeans", "gmm", "agglomerative", "hdbscan"):
            part = a[(a.space == space) & (a.algorithm == algo)]
            assert result["chosen"][f"{space}/{algo}"]["k"] == K_TRUE, (space, algo)
            planted_labels = [by_id[i] for i in part.image_id]
            ari = adjusted_rand_score(planted_labels, part.cluster)
            assert ari > 0.9, (space, algo, ari)


def test_nonfinite_rows_go_to_errors(planted):
    cfg, _, _, result = planted
    err = tables.read_errors(cfg, "cluster").to_pylist()
    assert result["spaces"]["embedding"]["rows"] == N - 2
    assert result["spaces"]["semantic"]["rows"] == N
    assert len(err) == 2 and all("non-finite embedding" in e["reason"] for e in err)


def test_every_table_matches_its_schema(planted):
    cfg, _, _, result = planted
    expected = {
        "clusters/assignments": ASSIGNMENTS_SCHEMA, "clusters/profiles": PROFILES_SCHEMA,
        "clusters/sweep": sweep_schema(cfg.cluster.reference_attributes),
        "clusters/centroid_distances": CENTROID_DISTANCES_SCHEMA,
        "clusters/conditional": CONDITIONAL_SCHEMA, "clusters/demographics": DEMOGRAPHICS_SCHEMA,
        "clusters/primary": PRIMARY_SCHEMA,
    }
    for name, schema in expected.items():
        t = tables.read(cfg, name)
        assert t.schema.remove_metadata().equals(schema.remove_metadata()), name
        assert t.num_rows == result["rows"][name] > 0, name


def test_sweep_rows_and_outputs_are_consistent(planted):
    cfg, manifest, _, result = planted
    sweep = tables.read(cfg, "clusters/sweep").to_pandas()
    n_k = cfg.cluster.k_max - cfg.cluster.k_min + 1
    assert len(sweep) == 3 * (3 * n_k + 1)  # 3 spaces x (3 algorithms x k + one hdbscan row)
    chosen = sweep[sweep.chosen]
    assert len(chosen) == 3 * 4  # one chosen k per space x algorithm
    hd = sweep[sweep.algorithm == "hdbscan"]
    assert hd.param.str.startswith("min_cluster_size=").all()
    # Silhouette picks k: the chosen kmeans row has the best silhouette of its space.
    for space in ("embedding", "semantic"):
        km = sweep[(sweep.space == space) & (sweep.algorithm == "kmeans")]
        assert km.loc[km.silhouette.idxmax(), "chosen"]
    # x/y only for the map sample, identical across algorithms of a space.
    a = tables.read(cfg, "clusters/assignments").to_pandas()
    sem = a[a.space == "semantic"]
    assert sem.groupby("algorithm").x.count().eq(cfg.cluster.map_rows).all()
    assert result["primary_space_used"] == "semantic"
    prim = tables.read(cfg, "clusters/primary").to_pandas()
    km = sem[sem.algorithm == "kmeans"].set_index("image_id").cluster
    assert (prim.set_index("image_id").cluster == km.loc[prim.image_id]).all()
    prof = tables.read(cfg, "clusters/profiles").to_pandas()
    one = prof[(prof.space == "semantic") & (prof.algorithm == "kmeans")]
    assert len(one) == K_TRUE * len(CELEBA_ATTRIBUTES)
    assert one.drop_duplicates("cluster")["size"].sum() == N
    assert (one.label.str.len() > 0).all()
    assert np.allclose(one.lift.dropna(), (one.prevalence / one.overall)[one.lift.notna()])
    demo = tables.read(cfg, "clusters/demographics").to_pandas()
    assert set(demo.attribute) == set(cfg.cluster.demographic_attributes)
    cond = tables.read(cfg, "clusters/conditional").to_pandas()
    assert len(cond) == len(CELEBA_ATTRIBUTES) ** 2
    same = cond[cond.attribute == cond.given]
    assert np.allclose(same.p.dropna(), 1.0)


def test_same_seed_gives_same_assignments(planted, tmp_path):
    cfg, manifest, _, _ = planted
    cfg2 = _planted_cfg(tmp_path)
    tables.replace(cfg2, "manifest", tables.read(cfg, "manifest"), schema=manifest_schema())
    tables.replace(cfg2, "features", tables.read(cfg, "features"))
    run_cluster(cfg2)
    for name in ("clusters/assignments", "clusters/sweep", "clusters/profiles"):
        t1 = tables.read(cfg, name).drop_columns(["fit_seconds"] if name.endswith("sweep") else [])
        t2 = tables.read(cfg2, name).drop_columns(["fit_seconds"] if name.endswith("sweep") else [])
        assert t1.equals(t2), name


def test_metrics_equal_sklearn():
    r = np.random.default_rng(3)
    X = np.concatenate([r.normal(0, 1, (30, 4)), r.normal(3, 1, (30, 4))]).astype(np.float32)
    spec = SweepSpec("s", "kmeans", 3, seed=7, minibatch_threshold=10_000)
    labels, fit_rows = fit_predict(X, spec, None)
    truth = (X[:, 0] > 1.5).astype(int)
    got = score(X, labels, np.arange(60), {"A": truth})
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=3, n_init=3, random_state=7).fit(X)
    assert (km.labels_ == labels).all() and fit_rows == 60
    assert got["inertia"] == pytest.approx(km.inertia_, rel=1e-4)
    assert got["silhouette"] == pytest.approx(silhouette_score(X, labels))
    assert got["davies_bouldin"] == pytest.approx(davies_bouldin_score(X, labels))
    assert got["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(X, labels))
    assert got["nmi_A"] == pytest.approx(normalized_mutual_info_score(truth, labels))
    assert got["ari_A"] == pytest.approx(adjusted_rand_score(truth, labels))
    # purity by hand: majority class count per cluster, summed, over N
    manual = sum(np.bincount(truth[labels == c], minlength=2).max() for c in set(labels)) / 60
    assert got["purity_A"] == pytest.approx(manual)
    assert purity(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx(0.75)


def test_noise_is_left_out_of_internal_metrics():
    X = np.array([[0.0], [0.1], [5.0], [5.1], [100.0]])
    labels = np.array([0, 0, 1, 1, -1])
    got = score(X, labels, np.arange(5), {})
    assert got["silhouette"] == pytest.approx(silhouette_score(X[:4], labels[:4]))
    assert got["inertia"] == pytest.approx(0.005 * 2)


def test_choose_k_rules():
    rows = [{"k": 2, "silhouette": 0.3, "davies_bouldin": 1.0},
            {"k": 3, "silhouette": 0.5, "davies_bouldin": 0.8},
            {"k": 4, "silhouette": 0.5, "davies_bouldin": 1.2}]
    assert choose_k(rows, "silhouette", 0)[0] == 3  # ties -> smaller k
    assert choose_k(rows, "davies_bouldin", 0)[0] == 3
    assert choose_k(rows, "silhouette", 4)[0] == 4
    assert choose_k([{"k": 2, "silhouette": None}, {"k": 3, "silhouette": None}],
                    "silhouette", 0)[0] == 2


def test_cluster_label_names_distinctive_attributes():
    names = ["Male", "Goatee", "Smiling", "Bald"]
    overall = np.array([0.4, 0.06, 0.5, 0.02])
    prev = np.array([0.95, 0.5, 0.1, 0.05])  # Bald: lift 2.5 but only 5 % of the cluster
    assert cluster_label(prev, overall, names, 3, None) == "Goatee · Male · not Smiling"
    assert cluster_label(overall, overall, names, 3, None).startswith("typical")


def test_annotations_alone_without_features(ray_session, tmp_path):
    cfg = tiny_config(tmp_path, "cluster.algorithms=[\"kmeans\", \"agglomerative\"]",
                      "cluster.k=3")
    m = write_tiny_manifest(cfg, n=40, size=(32, 32))
    # UTKFace-style demographic columns: profiled as race and age bins with a chi-square test.
    races = ["white", "black", "asian", "indian", "others"]
    m = m.set_column(m.schema.get_field_index("race"), "race",
                     pa.array([races[i % 5] for i in range(40)], pa.string()))
    m = m.set_column(m.schema.get_field_index("age"), "age",
                     pa.array([10 + 2 * i for i in range(40)], pa.int16()))
    tables.replace(cfg, "manifest", m, schema=manifest_schema())
    result = run_cluster(cfg)
    assert set(result["skipped_spaces"]) == {"embedding", "semantic"}
    assert "no features table" in result["skipped_spaces"]["semantic"]
    assert result["primary_space_used"] == "annotations"
    a = tables.read(cfg, "clusters/assignments")
    assert set(a["space"].to_pylist()) == {"annotations"}
    assert a.num_rows == 2 * 40
    sweep = tables.read(cfg, "clusters/sweep")
    assert sweep.schema.remove_metadata().equals(
        sweep_schema(cfg.cluster.reference_attributes).remove_metadata())
    prim = tables.read(cfg, "clusters/primary")
    assert prim.num_rows == 40 and prim.schema.metadata[b"primary_space"] == b"annotations"
    assert result["chosen"]["annotations/kmeans"] == {**result["chosen"]["annotations/kmeans"],
                                                      "k": 3, "rule": "cluster.k=3"}
    demo = tables.read(cfg, "clusters/demographics").to_pandas()
    assert {"race", "age_bin", "Male"} <= set(demo.attribute)
    race = demo[(demo.attribute == "race") & (demo.algorithm == "kmeans")]
    assert race["count"].sum() == 40 and race.chi2.notna().all() and race.dof.eq(2 * 4).all()
    # The target (Attractive) is not a dimension of the annotations space.
    assert result["spaces"]["annotations"]["dims"] == len(CELEBA_ATTRIBUTES) - 1


def test_skipped_without_attributes_or_features(tmp_path):
    cfg = tiny_config(tmp_path)
    schema = manifest_schema([])
    row = {n: None for n in schema.names}
    row.update(image_id="a.jpg", uri="/x/a.jpg", split="train", dataset="folder")
    tables.replace(cfg, "manifest", pa.Table.from_pylist([row], schema=schema), schema=schema)
    with pytest.raises(StageSkipped, match="nothing to cluster"):
        run_cluster(cfg)


def test_bad_config_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, "cluster.algorithms=[\"gmm\"]")
    with pytest.raises(ValueError, match="primary_algorithm"):
        run_cluster(cfg)
    if importlib.util.find_spec("umap") is None:
        cfg = tiny_config(tmp_path, "cluster.map_method=umap")
        with pytest.raises(ValueError, match="umap-learn"):
            run_cluster(cfg)


def test_ward_tasks_reserve_memory_for_their_distance_matrix():
    import numpy as np

    from pipeline.cluster._fit import SweepSpec
    from pipeline.cluster._stage import _memory_request

    def spec(algo):
        fields = {f: None for f in SweepSpec.__dataclass_fields__}
        fields.update(algorithm=algo, k=3, seed=0)
        return SweepSpec(**fields)

    big, small = np.arange(20_000), np.arange(1_000)
    assert _memory_request(spec("agglomerative"), big) == 20_000 ** 2 * 8
    assert _memory_request(spec("agglomerative"), small) == 0  # below the floor: no reservation
    assert _memory_request(spec("kmeans"), big) == 0


def test_sweep_chunks_partition_the_specs_and_ray_matches_the_loop(ray_session):
    from pipeline.cluster._spaces import Space
    from pipeline.cluster._stage import SpaceJob, _chunks, run_sweep, sweep_specs
    from pipeline.seeds import sample_indices

    cfg = tiny_config(__import__("pathlib").Path("/nonexistent"), "cluster.k_max=5")
    r = np.random.default_rng(0)
    X = r.normal(0, 3, (3, 4))[r.integers(0, 3, 300)] + r.normal(0, 1, (300, 4))
    X = X.astype(np.float32)
    job = SpaceJob(Space("s", np.arange(300).astype(str).astype(object), X, list("abcd")),
                   {"t": r.integers(0, 2, 300).astype(np.int8)},
                   sample_indices(300, 100, 0, "cluster", "sample", "s"),
                   sample_indices(300, 100, 0, "cluster", "sil", "s"))
    specs, _ = sweep_specs(cfg, job)
    chunks = _chunks(job, specs, 3)
    assert len(chunks) == 3 and sorted(map(id, sum(chunks, []))) == sorted(map(id, specs))
    seq = run_sweep([job], {"s": specs}, parallel=False)
    par = run_sweep([job], {"s": specs}, parallel=True)
    assert [a[0]["k"] for a in seq] == [b[0]["k"] for b in par]  # spec order kept
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(seq, par))
def test_map_of_identical_rows_does_not_crash_the_worker():
    """sklearn's Barnes-Hut t-SNE divides by a zero spread and segfaults on identical rows
    (seen with a barely trained attribute model at scale); the map must draw them at one point."""
    import subprocess
    import sys

    code = ("import numpy as np; from pipeline.cluster._describe import embed_2d\n"
            "same = np.ones((300, 5), np.float32)\n"  # crashed sklearn outright
            "ulp = np.full((300, 39), 0.37, np.float32)\n"  # float32 noise only, as observed
            "ulp[::7, 3] = np.nextafter(np.float32(0.37), np.float32(1))\n"
            "for X in (same, ulp):\n"
            "    xy = embed_2d(X, 'tsne', 0)\n"
            "    assert xy.shape == (300, 2) and (xy == 0).all()\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_identity_purity_of_a_clustering_that_keeps_people_together():
    """Three people with four images each: clusters that follow the people are consistent
    (1.0), a clustering that splits each person is not, and the chance level sits between."""
    from pipeline.cluster._identity import identity_metrics

    people = np.repeat(["ann", "bob", "cid"], 4)
    together = identity_metrics(np.repeat([0, 1, 1], 4), people)
    assert together["identity_consistency"] == 1.0
    assert together["purity"] == pytest.approx(8 / 12)  # bob and cid share a cluster
    split = identity_metrics(np.tile([0, 1], 6), people)
    assert split["identity_consistency"] == 0.5 and split["nmi"] == pytest.approx(0.0, abs=1e-9)
    assert together["nmi"] > 0.5
    assert together["n_identities"] == 3 and together["identities_with_two_or_more"] == 3


def test_features_rows_without_a_manifest_row_are_left_out_with_a_reason(tmp_path):
    from pipeline.cluster._spaces import load_inputs

    cfg = _planted_cfg(tmp_path)
    manifest = write_tiny_manifest(cfg, n=12, size=(32, 32))
    _write_planted_features(cfg, manifest)
    feats = tables.read(cfg, "features")
    orphan = feats.slice(0, 2).set_column(0, "image_id", pa.array(["zz_orphan_1.jpg",
                                                                    "zz_orphan_0.jpg"]))
    tables.replace(cfg, "features", pa.concat_tables([feats, orphan]))
    inp = load_inputs(cfg, need_embedding=True)
    assert sorted(inp.features["image_id"].to_pylist()) == sorted(manifest["image_id"].to_pylist())
    assert sorted(e["image_id"] for e in inp.errors) == ["zz_orphan_0.jpg", "zz_orphan_1.jpg"]
    assert all("no manifest row" in e["reason"] for e in inp.errors)
