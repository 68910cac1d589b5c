"""Relative local data.root / output.root: made absolute where the command runs, refused in a Ray job.

A driver started by ``ray job submit`` runs in Ray's unpacked copy of the working dir, so a
relative path there would silently point inside that copy (issue #19); see docs/design.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import RAY_JOB_ENV, ConfigError, load_config

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.toml"


def test_the_env_var_is_the_one_ray_sets_for_job_drivers():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert RAY_JOB_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR


def test_relative_roots_resolve_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO)  # data.root = "data/sample", output.root = "runs/demo"
    assert cfg.data.root == str(tmp_path / "data" / "sample")
    assert cfg.output.root == str(tmp_path / "runs" / "demo")
    cfg = load_config(None, ["data.root=../faces", "output.root=file://out"])
    assert cfg.data.root == str(tmp_path.parent / "faces")
    assert cfg.output.root == str(tmp_path / "out")
    assert load_config(None, ["data.root=~/faces"]).data.root == os.path.expanduser("~/faces")


def test_absolute_paths_and_uris_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    cfg = load_config(None, [f"data.root={tmp_path}/d", "output.root=s3://b/runs/demo"])
    assert cfg.data.root == f"{tmp_path}/d" and cfg.output.root == "s3://b/runs/demo"
    cfg = load_config(None, ["data.root=s3://b/faces", f"output.root=file://{tmp_path}"])
    assert cfg.output.root == f"file://{tmp_path}"


@pytest.mark.parametrize("key,value", [("data.root", "data/sample"), ("output.root", "runs/demo"),
                                       ("data.root", "~/faces")])
def test_relative_roots_in_a_ray_job_driver_are_refused_naming_the_fix(monkeypatch, key, value):
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.root=/abs/data", "output.root=/abs/out", f"{key}={value}"])
    msg = str(err.value)
    assert f"{key} = {value!r} is a relative path" in msg
    assert "ray job submit" in msg and os.getcwd() in msg
    assert f"--set {key}=$PWD/{value}" in msg and "s3://" in msg


def test_the_demo_config_in_a_ray_job_is_refused(monkeypatch):
    """The README's failing command before #19: demo.toml's relative roots under `ray job submit`."""
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    with pytest.raises(ConfigError, match="data.root = 'data/sample' is a relative path"):
        load_config(DEMO)
