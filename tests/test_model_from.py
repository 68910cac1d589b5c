"""A trained attribute model applied to another collection (``train.model_from``): train on a
small CelebA-format sample, apply the model to a tiny LFW-format sample (no labels) and run the
rest of the pipeline; the reason train was skipped, the model used and what it was trained on
are recorded; without a model and without labels the error names the option."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import ingest, runlog, tables, train
from pipeline.run import run_all, run_stage
from pipeline.sample import make_sample
from tests.conftest import s3_overrides
from tests.helpers import tiny_config


def _lfw(tmp: Path, *overrides: str):
    cfg = tiny_config(tmp, "data.dataset=lfw", "data.split_fractions=[0.5, 0.25]",
                      "cluster.k_max=3", 'cluster.algorithms=["kmeans"]', *overrides)
    make_sample(cfg.data.root, 40, seed=5, fmt="lfw")
    return cfg


@pytest.fixture(scope="module")
def celeba_model(tmp_path_factory, ray_session):
    """A CelebA-format sample trained for one short epoch; yields its models/attributes folder."""
    tmp = tmp_path_factory.mktemp("celeba")
    cfg = tiny_config(tmp, "train.max_steps_per_epoch=3")
    make_sample(cfg.data.root, 60, seed=4)
    run_stage(cfg, "ingest")
    run_stage(cfg, "train_attributes")
    return cfg, tables.location(cfg, train.MODEL_DIR)


@pytest.mark.slow
def test_a_celeba_model_runs_the_pipeline_on_lfw(tmp_path, celeba_model):
    src_cfg, src = celeba_model
    cfg = _lfw(tmp_path, f"train.model_from={src.uri}")
    run_all(cfg)
    doc = runlog.load(cfg)["stages"]
    rec = doc["train_attributes"]
    assert rec["status"] == "skipped"
    assert "taken from" in rec["details"]["reason"] and "train.model_from" in rec["details"]["reason"]
    assert rec["details"]["model_from"] == src.uri
    assert rec["details"]["trained_on"]["dataset"] == "celeba"
    assert rec["details"]["trained_on"]["data_root"] == src_cfg.data.root
    assert rec["details"]["copied_tables"] == ["metrics", "history"]
    # the copied model is the source's, byte for byte
    here = tables.location(cfg, train.MODEL_DIR)
    assert Path(here.path, "model.pt").read_bytes() == Path(src.path, "model.pt").read_bytes()
    # extract applied it: 40 attributes inferred for every LFW image
    feats = pq.read_table(tables.location(cfg, "features").path)
    assert feats.num_rows == 40
    assert sum(n.startswith("p_") for n in feats.column_names) == 40
    assert {doc[s]["status"] for s in ("extract", "cluster", "report")} == {"done"}
    # LFW has no labels: classify has no target, explain nothing to explain; both say why
    assert doc["classify"]["status"] == "skipped"
    assert "no annotated" in doc["classify"]["details"]["reason"]
    assert doc["explain"]["status"] == "skipped"
    page = Path(doc["report"]["details"]["report"]).read_text()
    assert "did not train its attribute model" in page and src.uri in page
    assert "celeba at " + src_cfg.data.root in page


def test_no_labels_and_no_model_names_the_option(tmp_path):
    cfg = _lfw(tmp_path)
    ingest.run(cfg)
    with pytest.raises(train.TrainInputError, match="set train.model_from to"):
        train.run(cfg)


def _fake_export(folder: Path, trained_on: dict | None = None) -> None:
    """A random-init model exported as train would (model.pt + model.json)."""
    from pipeline import storage
    from pipeline.models import AttributeModelInfo, build_attribute_model, export_attribute_model

    info = AttributeModelInfo(arch="mobilenet_v2", attributes=["Male", "Smiling"], image_size=32,
                              trained_on=trained_on or {"dataset": "celeba", "data_root": "x"})
    export_attribute_model(build_attribute_model(2), info, storage.filesystem(str(folder)))


def test_a_published_state_dict_with_its_model_json(tmp_path):
    pub = tmp_path / "published"
    _fake_export(pub)
    (pub / "model.pt").rename(pub / "celeba-attributes.pt")
    cfg = _lfw(tmp_path, f"train.model_from={pub / 'celeba-attributes.pt'}")
    got = train.adopt_model(cfg)
    here = Path(tables.location(cfg, train.MODEL_DIR).path)
    assert (here / "model.pt").read_bytes() == (pub / "celeba-attributes.pt").read_bytes()
    assert json.loads((here / "model.json").read_text())["attributes"] == ["Male", "Smiling"]
    assert got["copied_tables"] == [] and got["trained_on"]["dataset"] == "celeba"


def test_a_bad_source_is_a_clear_error(tmp_path):
    cfg = _lfw(tmp_path, f"train.model_from={tmp_path / 'nowhere'}")
    with pytest.raises(train.ModelSourceError, match="model.json is missing"):
        train.adopt_model(cfg)
    broken = tmp_path / "broken"
    _fake_export(broken)
    (broken / "model.pt").write_bytes(b"not a state dict")
    cfg.train.model_from = str(broken)
    with pytest.raises(train.ModelSourceError, match="does not load as an attribute model"):
        train.adopt_model(cfg)
    assert not (Path(tables.location(cfg, train.MODEL_DIR).path) / "model.json").exists()


def test_a_model_from_s3(tmp_path, s3_server, s3_bucket):
    local = tmp_path / "export"
    _fake_export(local)
    fs = s3_server["fs"]
    for name in ("model.pt", "model.json"):
        with fs.open_output_stream(f"{s3_bucket}/celeba/models/attributes/{name}") as f:
            f.write((local / name).read_bytes())
    cfg = _lfw(tmp_path, *s3_overrides(s3_server),
               f"train.model_from=s3://{s3_bucket}/celeba/models/attributes")
    train.adopt_model(cfg)
    here = Path(tables.location(cfg, train.MODEL_DIR).path)
    assert (here / "model.pt").read_bytes() == (local / "model.pt").read_bytes()


def test_the_small_cnn_round_trips_through_model_json(tmp_path):
    import torch

    from pipeline import storage
    from pipeline.models import (AttributeModelInfo, WeightsError, build_attribute_model,
                                 export_attribute_model, load_attribute_model)

    model = build_attribute_model(3, arch="small_cnn").eval()
    loc = storage.filesystem(str(tmp_path / "m"))
    export_attribute_model(model, AttributeModelInfo(arch="small_cnn", attributes=["a", "b", "c"],
                                                     image_size=32), loc)
    loaded, info = load_attribute_model(loc)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.embed(x).shape == (2, loaded.embedding_dim) and info.arch == "small_cnn"
    with pytest.raises(WeightsError, match="exists for mobilenet_v2 only"):
        build_attribute_model(3, "imagenet", arch="small_cnn")
