"""The orchestrator: skip complete stages, rerun on config change or --force, record run.json."""

import sys
import types

import pytest

from pipeline import run as runmod
from pipeline import runlog
from pipeline.config import load_config


@pytest.fixture
def fake_stages(monkeypatch):
    calls = []

    def make(name, fail=False):
        mod = types.ModuleType(f"fake_{name}")

        def run(cfg):
            calls.append(name)
            if fail:
                raise RuntimeError("boom")
            return {"rows": 3}

        mod.run = run
        monkeypatch.setitem(sys.modules, f"fake_{name}", mod)
        return runmod.Stage(name, f"fake_{name}", (name if name in ("train",) else "data",))

    monkeypatch.setattr(runmod, "STAGES", (make("ingest"), make("train")))
    monkeypatch.setattr(runmod, "STAGE_NAMES", ("ingest", "train"))
    monkeypatch.setattr(runmod, "_available", lambda: list(runmod.STAGES))
    monkeypatch.setattr("pipeline.ray_runtime.ensure_ray", lambda cfg: None)
    return calls


def test_complete_stages_are_skipped(tmp_path, fake_stages):
    cfg = load_config(None, [f"output.root={tmp_path}"])
    runmod.run_all(cfg)
    runmod.run_all(cfg)
    assert fake_stages == ["ingest", "train"]
    doc = runlog.load(cfg)
    assert doc["stages"]["ingest"]["status"] == "done"
    assert doc["stages"]["train"]["details"] == {"rows": 3}
    assert (tmp_path / "config.toml").exists()


def test_changed_config_reruns_stage_and_dependants(tmp_path, fake_stages):
    runmod.run_all(load_config(None, [f"output.root={tmp_path}"]))
    runmod.run_all(load_config(None, [f"output.root={tmp_path}", "train.epochs=9"]))
    assert fake_stages == ["ingest", "train", "train"]


def test_force_reruns_stage_and_dependants(tmp_path, fake_stages):
    cfg = load_config(None, [f"output.root={tmp_path}"])
    runmod.run_all(cfg)
    runmod.run_all(cfg, force=["ingest"])
    assert fake_stages == ["ingest", "train", "ingest", "train"]
    with pytest.raises(ValueError, match="unknown stage"):
        runmod.run_all(cfg, force=["nope"])


def test_failure_is_recorded_with_stage_name(tmp_path, monkeypatch, fake_stages):
    cfg = load_config(None, [f"output.root={tmp_path}"])
    mod = sys.modules["fake_train"]
    monkeypatch.setattr(mod, "run", lambda cfg: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        runmod.run_all(cfg)
    rec = runlog.stage_record(cfg, "train")
    assert rec["status"] == "failed" and "boom" in rec["error"]
