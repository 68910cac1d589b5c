"""The attribute head (``pipeline.attribute_head``) and the face geometry it reads, on small
fixed arrays and tiny tables: no Ray, no dlib models, no images decoded."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline import attribute_head, dlib_face, storage, tables, train
from pipeline.config import CELEBA_ATTRIBUTES
from pipeline.extract import features_schema
from tests.helpers import tiny_config, write_tiny_manifest


def _face() -> np.ndarray:
    """68 plausible landmarks: a jaw arc, brows, nose, eyes and a closed mouth (pixels)."""
    rng = np.random.default_rng(0)
    p = np.zeros((68, 2))
    t = np.linspace(-1.2, 1.2, 17)
    p[0:17] = np.c_[60 * np.sin(t), 20 + 60 * np.cos(t) * 0.9]
    p[17:27] = np.c_[np.r_[np.linspace(-45, -10, 5), np.linspace(10, 45, 5)], np.full(10, -25)]
    p[27:36] = np.c_[np.r_[np.zeros(4), np.linspace(-12, 12, 5)], np.r_[np.linspace(-10, 15, 4),
                                                                       np.full(5, 20)]]
    for k, cx in ((36, -30), (42, 30)):  # eye contours around their centres
        ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        p[k:k + 6] = np.c_[cx + 10 * np.cos(ang), 5 * np.sin(ang)]
    ang = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    p[48:60] = np.c_[22 * np.cos(ang + np.pi), 42 + 8 * np.sin(ang + np.pi)]
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    p[60:68] = np.c_[15 * np.cos(ang + np.pi), 42 + 1 * np.sin(ang + np.pi)]
    return p + rng.normal(0, 0.3, p.shape) + (100, 110)


def test_face_geometry_ignores_where_the_face_is_its_size_and_roll():
    p = _face()
    g = dlib_face.face_geometry(p, 200, True)
    assert g.shape == (dlib_face.GEOMETRY_DIM,) == (len(dlib_face.GEOMETRY_NAMES),)
    a = 0.3
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    moved = (p - p.mean(0)) @ rot.T * 1.7 + (40, 70)
    h = dlib_face.face_geometry(moved, 200, True)
    shape = [i for i, n in enumerate(dlib_face.GEOMETRY_NAMES)
             if n not in ("roll", "eye_distance")]
    np.testing.assert_allclose(g[shape], h[shape], atol=1e-4)
    name = dlib_face.GEOMETRY_NAMES.index
    assert h[name("roll")] == pytest.approx(g[name("roll")] + a, abs=1e-4)
    assert h[name("eye_distance")] == pytest.approx(1.7 * g[name("eye_distance")], rel=1e-4)


def test_face_geometry_measures_an_open_mouth_and_lifted_corners():
    p = _face()
    name = dlib_face.GEOMETRY_NAMES.index
    closed = dlib_face.face_geometry(p, 200, True)
    opened = p.copy()
    opened[[65, 66, 67], 1] += 12  # lower inner lip drops
    smile = p.copy()
    smile[[48, 54], 1] -= 6  # both corners up
    assert (dlib_face.face_geometry(opened, 200, True)[name("mouth_inner_open")]
            > closed[name("mouth_inner_open")] + 0.1)
    assert (dlib_face.face_geometry(smile, 200, True)[name("mouth_corner_lift")]
            > closed[name("mouth_corner_lift")] + 0.05)
    assert dlib_face.face_geometry(p, 200, False)[name("face_detected")] == 0.0


def _synthetic(n: int, seed: int):
    """Face features where attribute 0 is a face-feature rule the noisy CNN half-sees, and
    attribute 1 is what the CNN already knows."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    Y = np.c_[X[:, 0] + 0.5 * X[:, 1] > 0, rng.random(n) < 0.5]
    cnn = np.c_[0.5 * (Y[:, 0] * 2 - 1) + rng.normal(0, 1.5, n), 4 * (Y[:, 1] * 2 - 1.0)]
    return X, cnn, Y


def test_head_adds_what_the_face_features_know_and_round_trips():
    X, cnn, Y = _synthetic(600, 1)
    Xv, cv, Yv = _synthetic(200, 2)
    Xt, ct, Yt = _synthetic(400, 3)
    head = attribute_head.AttributeHead(l2=1.0).fit(X, cnn, Y, Xv, cv, Yv)
    acc = ((head.predict_proba(Xt, ct) >= head.thresholds_) == Yt).mean(axis=0)
    cnn_acc = ((ct >= 0) == Yt).mean(axis=0)
    assert acc[0] > cnn_acc[0] + 0.15 and acc[0] > 0.9  # the face rule is learnt
    assert acc[1] >= cnn_acc[1] - 0.01  # what the CNN knew is kept (its own logit, free weight)
    again = attribute_head.AttributeHead.from_bytes(head.to_bytes())
    np.testing.assert_array_equal(again.predict_proba(Xt, ct), head.predict_proba(Xt, ct))
    np.testing.assert_array_equal(again.thresholds_, head.thresholds_)
    # fitting twice gives the same head
    twice = attribute_head.AttributeHead(l2=1.0).fit(X, cnn, Y, Xv, cv, Yv)
    np.testing.assert_allclose(twice.coef_, head.coef_)


def _run_with_features(tmp_path, name: str, *overrides: str):
    """A tiny run whose features/ looks like extract's with face_geometry: labels Smiling and
    Male follow the geometry / descriptor; the CNN logits are noise."""
    from pipeline.models import AttributeModelInfo, AttributeNet, export_attribute_model

    cfg = tiny_config(tmp_path / name, 'extract.embedding="dlib"', "extract.face_geometry=true",
                      "head.enabled=true", *overrides)
    man = write_tiny_manifest(cfg, n=200, seed=3)
    attrs = list(CELEBA_ATTRIBUTES)
    rng = np.random.default_rng(7)
    n = man.num_rows
    y = np.stack([man[a].to_numpy(zero_copy_only=False) for a in attrs], 1).astype(float)
    emb = rng.normal(size=(n, dlib_face.DIM)).astype(np.float32)
    emb[:, :4] += 4 * (y[:, attrs.index("Male")] - 0.5)[:, None]
    geo = rng.normal(size=(n, dlib_face.GEOMETRY_DIM)).astype(np.float32)
    geo[:, :4] += 4 * (y[:, attrs.index("Smiling")] - 0.5)[:, None]
    logits = rng.normal(size=(n, len(attrs))).astype(np.float32)
    cols = {"image_id": man["image_id"]}
    cols.update({f"p_{a}": 1 / (1 + np.exp(-logits[:, j])) for j, a in enumerate(attrs)})
    schema = features_schema(attrs, dlib_face.DIM, face_detected=True, face_geometry=True)

    def fsl(a):
        return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel(), pa.float32()), a.shape[1])

    cols.update({"embedding": fsl(emb), "content_hash": pa.array([str(i) for i in range(n)]),
                 "face_detected": np.ones(n, bool), "attribute_logits": fsl(logits),
                 "face_geometry": fsl(geo)})
    feats = pa.table({f.name: cols[f.name] for f in schema})
    half = n // 2  # two shards, as extract writes them
    for i, part in enumerate((feats.slice(0, half), feats.slice(half))):
        tables.write(cfg, "features", part, schema=schema, part=f"part-{i:05d}",
                     metadata={"faceaudit.embedding_model": "dlib"})
    model_loc = tables.location(cfg, train.MODEL_DIR)
    if not cfg.train.model_from:
        info = AttributeModelInfo(arch="small_cnn", attributes=attrs, image_size=32,
                                  thresholds=[0.5] * len(attrs), version="tiny-v1")
        export_attribute_model(AttributeNet(len(attrs), arch="small_cnn"), info, model_loc)
    return cfg, y


def test_stage_fits_saves_the_head_beside_the_model_and_model_from_applies_it(tmp_path):
    cfg, y = _run_with_features(tmp_path, "celeba")
    out = attribute_head.run(cfg)
    assert out["mode"] == "fitted" and out["features_rows"] == 200
    m = tables.read(cfg, attribute_head.METRICS_DIR).to_pandas().set_index("attribute")
    assert m.loc["Smiling", "accuracy"] > m.loc["Smiling", "cnn_accuracy"] + 0.2
    assert m.loc["Male", "accuracy"] > m.loc["Male", "majority_baseline"] + 0.05
    feats = tables.read(cfg, "features")
    assert feats.schema.metadata[b"faceaudit.attribute_head"].decode() == out["head_version"]
    assert feats.schema.metadata[b"faceaudit.embedding_model"] == b"dlib"  # extract's kept
    first = feats["p_Smiling"].to_numpy()
    # a rerun reads the CNN's logits, not its own rewritten probabilities: same table
    attribute_head.run(cfg)
    np.testing.assert_array_equal(tables.read(cfg, "features")["p_Smiling"].to_numpy(), first)

    src = tables.location(cfg, train.MODEL_DIR)
    other, _ = _run_with_features(tmp_path, "lfw", f"train.model_from={src.uri}")
    adopted = train.adopt_model(other)
    assert "head" in adopted["copied_tables"] and "head_metrics" in adopted["copied_tables"]
    applied = attribute_head.run(other)
    assert applied["mode"] == "applied" and applied["head_version"] == out["head_version"]
    np.testing.assert_array_equal(tables.read(other, "features")["p_Smiling"].to_numpy(), first)


def test_model_from_without_a_head_says_what_to_set(tmp_path):
    cfg, _ = _run_with_features(tmp_path, "celeba")
    src = tables.location(cfg, train.MODEL_DIR)  # no head fitted there
    other, _ = _run_with_features(tmp_path, "lfw", f"train.model_from={src.uri}")
    train.adopt_model(other)
    with pytest.raises(attribute_head.HeadInputError, match="head.enabled = false"):
        attribute_head.run(other)


def test_features_without_geometry_are_refused_with_the_setting(tmp_path):
    cfg, _ = _run_with_features(tmp_path, "celeba")
    feats = tables.read(cfg, "features").drop_columns(["face_geometry"])
    with pytest.raises(attribute_head.HeadInputError, match="extract.face_geometry = true"):
        attribute_head.head_inputs(feats, ["cnn", "geometry"])
    assert storage.exists(tables.location(cfg, train.MODEL_DIR).join("model.json"))


def test_config_refuses_the_head_or_the_geometry_without_dlib(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match='extract.embedding = "dlib"'):
        tiny_config(tmp_path, "extract.face_geometry=true")
    with pytest.raises(ConfigError, match="extract.face_geometry = true"):
        tiny_config(tmp_path, 'extract.embedding="dlib"', "head.enabled=true")
