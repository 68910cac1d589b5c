"""``run.json``: what each stage of a run did (config, versions, row counts, timings, status).

The driver is the only writer. A stage is *complete* when its record says ``done`` with the
fingerprint of the config it ran with; :mod:`pipeline.run` skips such stages unless forced.
"""

from __future__ import annotations

import contextlib
import json
import platform
import random
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


def _stamp(cfg: Config, doc: dict[str, Any]) -> bytes:
    doc["config"] = cfg.public_dict()
    doc["versions"] = versions()
    doc["updated"] = datetime.now(timezone.utc).isoformat()
    return json.dumps(doc, indent=2, sort_keys=True, default=str).encode()


def stage_record(cfg: Config, stage: str) -> dict[str, Any] | None:
    return load(cfg)["stages"].get(stage)


def is_complete(cfg: Config, stage: str, fingerprint: str) -> bool:
    rec = stage_record(cfg, stage)
    return bool(rec and rec.get("status") == "done" and rec.get("fingerprint") == fingerprint)


def update(cfg: Config, stage: str, **fields: Any) -> None:
    """Merge ``fields`` into ``stage``'s record.

    Read-modify-write with a replace-if-unchanged write (:func:`storage.replace_if`), retried
    on a conflict: a writer that runs beside the lock holder (the report) never loses, nor
    makes the other lose, an update.
    """
    loc = _loc(cfg)
    for attempt in range(_UPDATE_TRIES):
        current = storage.read_versioned(loc, cfg.storage)
        doc = json.loads(current[0]) if current is not None else {"stages": {}}
        doc.setdefault("stages", {}).setdefault(stage, {}).update(fields)
        data = _stamp(cfg, doc)
        if current is None:
            if storage.create_exclusive(loc, data, cfg.storage):
                return
        elif storage.replace_if(loc, data, current[1], cfg.storage):
            return
        time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # someone wrote in between
    raise storage.StorageError(f"{loc.uri}: could not update it after {_UPDATE_TRIES} tries "
                               "(other writers kept changing it)")


_UPDATE_TRIES = 50


@contextlib.contextmanager
def track(cfg: Config, stage: str, fingerprint: str) -> Iterator[dict[str, Any]]:
    """Record a stage's start, then its outcome; the yielded dict collects its details."""
    details: dict[str, Any] = {}
    t0 = time.time()
    update(cfg, stage, status="running", fingerprint=fingerprint,
           started=datetime.now(timezone.utc).isoformat(), error=None)
    # the config a stage ran with; written once per stage, not on every run.json update. Not by
    # the report: it only describes the tables, so config.toml stays the config that made them.
    if stage != "report":
        storage.write_bytes(tables.root(cfg).join("config.toml"), dump_toml(cfg).encode())
    try:
        yield details
    except BaseException as exc:
        update(cfg, stage, status="failed", seconds=round(time.time() - t0, 3),
               error=f"{type(exc).__name__}: {exc}"[:2000], **{"details": details})
        raise
    update(cfg, stage, status=details.pop("_status", "done"), seconds=round(time.time() - t0, 3),
           finished=datetime.now(timezone.utc).isoformat(), details=details)
