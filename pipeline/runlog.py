"""``run.json``: what each stage of a run did (config, versions, row counts, timings, status).

The driver is the only writer. A stage is *complete* when its record says ``done`` with the
fingerprint of the config it ran with; :mod:`pipeline.run` skips such stages unless forced.
"""

from __future__ import annotations

import contextlib
import platform
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from pipeline import storage, tables
from pipeline.config import Config, dump_toml


def _loc(cfg: Config) -> storage.Location:
    return tables.root(cfg).join("run.json")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    import importlib.metadata as md

    for pkg in ("faceaudit", "ray", "torch", "torchvision", "pyarrow", "polars", "scikit-learn",
                "shap", "fairlearn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load(cfg: Config) -> dict[str, Any]:
    loc = _loc(cfg)
    if not storage.exists(loc):
        return {"stages": {}}
    return storage.read_json(loc)


def _save(cfg: Config, doc: dict[str, Any]) -> None:
    doc["config"] = cfg.public_dict()
    doc["versions"] = versions()
    doc["updated"] = datetime.now(timezone.utc).isoformat()
    storage.write_json(_loc(cfg), doc)


def stage_record(cfg: Config, stage: str) -> dict[str, Any] | None:
    return load(cfg)["stages"].get(stage)


def is_complete(cfg: Config, stage: str, fingerprint: str) -> bool:
    rec = stage_record(cfg, stage)
    return bool(rec and rec.get("status") == "done" and rec.get("fingerprint") == fingerprint)


def update(cfg: Config, stage: str, **fields: Any) -> None:
    doc = load(cfg)
    doc["stages"].setdefault(stage, {}).update(fields)
    _save(cfg, doc)


@contextlib.contextmanager
def track(cfg: Config, stage: str, fingerprint: str) -> Iterator[dict[str, Any]]:
    """Record a stage's start, then its outcome; the yielded dict collects its details."""
    details: dict[str, Any] = {}
    t0 = time.time()
    update(cfg, stage, status="running", fingerprint=fingerprint,
           started=datetime.now(timezone.utc).isoformat(), error=None)
    # the config a stage ran with; written once per stage, not on every run.json update
    storage.write_bytes(tables.root(cfg).join("config.toml"), dump_toml(cfg).encode())
    try:
        yield details
    except BaseException as exc:
        update(cfg, stage, status="failed", seconds=round(time.time() - t0, 3),
               error=f"{type(exc).__name__}: {exc}"[:2000], **{"details": details})
        raise
    update(cfg, stage, status=details.pop("_status", "done"), seconds=round(time.time() - t0, 3),
           finished=datetime.now(timezone.utc).isoformat(), details=details)
