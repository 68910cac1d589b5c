import pytest

from pipeline.config import ConfigError, load_config
from pipeline.run import fingerprints

REPO_CONFIGS = ["jobs/configs/demo.toml", "jobs/configs/celeba.toml"]


def test_overrides_parse_as_toml_or_string():
    cfg = load_config(None, ["train.epochs=2", "data.root=s3://faces/celeba",
                             'cluster.spaces=["annotations"]', "run.seed=7"])
    assert cfg.train.epochs == 2
    assert cfg.data.root == "s3://faces/celeba"
    assert cfg.cluster.spaces == ["annotations"]
    assert cfg.run.seed == 7


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        load_config(None, ["train.epoch=2"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match="'train.epochs'"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="'data.dataset'"):
        load_config(None, ["data.dataset=imagenet"])


def test_unknown_section_is_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nepochs = 1\n")
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(p)


def test_missing_file_is_clear():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.toml")


@pytest.mark.parametrize("path", REPO_CONFIGS)
def test_shipped_configs_validate(path):
    load_config(path)


def test_secrets_are_blanked():
    cfg = load_config(None, ["storage.secret_access_key=hunter2"])
    assert "hunter2" not in str(cfg.public_dict())
    assert "hunter2" not in repr(cfg)


def test_changed_section_reruns_dependants_only():
    a = fingerprints(load_config(None, []))
    b = fingerprints(load_config(None, ["cluster.k_max=5"]))
    assert a["ingest"] == b["ingest"] and a["extract"] == b["extract"]
    assert a["cluster"] != b["cluster"] and a["report"] != b["report"]


def test_cluster_reruns_when_the_target_changes():
    a = fingerprints(load_config(None, []))
    b = fingerprints(load_config(None, ["classify.target=Smiling"]))
    assert a["extract"] == b["extract"] and a["cluster"] != b["cluster"]
