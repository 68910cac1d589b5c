"""Run the stages in order, skipping the complete ones.

Each stage is a module with one public ``run(cfg) -> dict`` (its row counts and details). A
stage is complete when ``run.json`` records it ``done`` with the same fingerprint: a hash of the
config sections it reads plus its upstream stage's fingerprint, so a changed setting reruns that
stage and everything after it. ``run.force`` / ``--force STAGE`` reruns a stage and its
dependants.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import time
from dataclasses import dataclass

from pipeline import runlock, runlog
from pipeline.config import Config
from pipeline.stages import StageSkipped  # noqa: F401 - re-exported (run_stage catches it)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str  # as in `jobs.<name>` and run.json
    module: str  # module with the `run(cfg)` entry
    sections: tuple[str, ...]  # config sections whose change reruns the stage
    needs_ray: bool = True  # pure-driver stages skip Ray's start-up (tens of seconds on 2 cores)
    needs_lock: bool = True  # holds <output.root>/run.lock while it runs (pipeline.runlock)


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "pipeline.ingest", ("data",), needs_ray=False),
    Stage("train_attributes", "pipeline.train", ("train",)),
    Stage("extract", "pipeline.extract", ("extract",)),
    # after extract: it reads the dlib descriptor and landmarks only extract computes
    Stage("attribute_head", "pipeline.attribute_head", ("head",), needs_ray=False),
    Stage("cluster", "pipeline.cluster", ("cluster", "classify.target")),
    Stage("audit", "pipeline.audit", ("audit", "classify.target", "classify.sensitive")),
    Stage("classify", "pipeline.classify", ("classify",)),
    Stage("explain", "pipeline.explain", ("explain",)),
    Stage("report", "pipeline.report", ("report",), needs_ray=False, needs_lock=False),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def _available() -> list[Stage]:
    out = []
    for s in STAGES:
        if importlib.util.find_spec(s.module) is not None:
            out.append(s)
    return out


def fingerprints(cfg: Config) -> dict[str, str]:
    """Each stage's fingerprint, chained so upstream changes propagate downstream."""
    out: dict[str, str] = {}
    upstream = str(cfg.run.seed)
    for s in STAGES:
        link = f"{upstream}|{cfg.fingerprint(*s.sections)}"
        upstream = out[s.name] = hashlib.sha256(link.encode()).hexdigest()[:16]
    return out


def _forced(cfg: Config, extra: list[str]) -> set[str]:
    names = list(cfg.run.force) + list(extra)
    unknown = [n for n in names if n not in STAGE_NAMES and n != "all"]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in --force; stages are {list(STAGE_NAMES)}")
    if "all" in names:
        return set(STAGE_NAMES)
    forced: set[str] = set()
    for i, s in enumerate(STAGES):
        if s.name in names:
            forced.update(t.name for t in STAGES[i:])  # dependants rerun too
    return forced


def run_stage(cfg: Config, name: str, force: bool = False) -> dict:
    """Run one stage through run.json tracking (skips it when complete and not forced).

    A writing stage holds the output root's run lock (:mod:`pipeline.runlock`) throughout; a
    second run on the same root stops at once with a message naming the holder.
    """
    stage = next((s for s in STAGES if s.name == name), None)
    if stage is None:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGE_NAMES)}")
    lock = runlock.held(cfg, name) if stage.needs_lock else contextlib.nullcontext()
    with lock as held:
        result = _run_stage(cfg, stage, force)
        if held is not None and held.lost:
            raise runlock.RunLocked(f"[{name}] another run took over this run's lock on "
                                    f"{cfg.output.root} while it ran; its outputs may be mixed, "
                                    "rerun it once the other run is done")
        return result


def _run_stage(cfg: Config, stage: Stage, force: bool) -> dict:
    from pipeline.ray_runtime import ensure_ray

    name = stage.name
    fp = fingerprints(cfg)[name]
    if not force and name not in _forced(cfg, []) and runlog.is_complete(cfg, name, fp):
        log.info("[%s] complete, skipped (use --force %s to rerun)", name, name)
        return {"skipped": True}
    module = importlib.import_module(stage.module)
    if stage.needs_ray:
        ensure_ray(cfg)
    t0 = time.time()
    log.info("[%s] starting", name)
    with runlog.track(cfg, name, fp) as details:
        try:
            result = module.run(cfg) or {}
        except StageSkipped as why:
            details["_status"] = "skipped"
            details.update(why.details)
            details["reason"] = str(why)
            log.warning("[%s] skipped: %s", name, why)
            return {**why.details, "skipped": True, "reason": str(why)}
        except Exception as exc:
            # One line that names the stage in `ray job logs`, above the traceback.
            log.error("[%s] failed after %.1f s: %s: %s", name, time.time() - t0,
                      type(exc).__name__, exc)
            raise
        details.update(result)
    log.info("[%s] done in %.1f s: %s", name, time.time() - t0,
             {k: v for k, v in result.items() if isinstance(v, (int, float, str))})
    return result


def run_all(cfg: Config, force: list[str] | None = None) -> dict[str, dict]:
    """Every available stage in order; returns each stage's result."""
    forced = _forced(cfg, force or [])
    results = {}
    with runlock.held(cfg, "run"):  # one lock for the whole chain
        for s in _available():
            results[s.name] = run_stage(cfg, s.name, force=s.name in forced)
    return results
