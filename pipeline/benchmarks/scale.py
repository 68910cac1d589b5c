"""`python -m jobs.benchmark scale --config jobs/configs/scale.toml [-- --images N --compare M]`

Every stage at full CelebA size and at a tenth of it, side by side on the same machine: does any
stage's driver memory grow with the images, or its time faster than linearly?

Data: a full-size CelebA folder laid out from what a developer has, not downloaded. Every id of
the official annotation files (``--annotations``, default ``../shared/real/celeba-full``) becomes
a hard link to one of the real JPEGs under ``--images-from`` (default
``../shared/real/celeba/img_align_celeba``), cycling over them (ext4 allows about 65,000 links
per file; 202,599 ids over 10,000 files is ~20 each). The smaller run takes every (N/M)-th id,
so both keep the official train/val/test proportions. The folder is kept in ``--workdir`` and
reused by later runs.

Each stage runs as its own job process (``python -m jobs.<stage> --force``, as a user runs it),
so one stage's imports and heap never count for the next. Per stage and size it records: the
stage's own seconds from run.json, the stage's row counts, peak PSS and anonymous PSS of the
driver and of the driver plus every Ray process, the peak size of Ray's object-store spill
folder, and the bytes the stage wrote. Then the ratios (big / small) against the goals: driver
peak <= 1.5x, time <= 12x for 10x the images. It also sizes the report's HTML and times a headless Chromium opening it.

Images and ids are real but identities are not (an image is filed under ~20 ids of different
people), so the pixel-based numbers here measure cost, not quality.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHARED_REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real"
ANNOTATION_FILES = ("list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt")
DRIVER_GOAL, TIME_GOAL = 1.5, 12.0


def layout_celeba(dest: Path, n: int, annotations: Path, images_from: Path) -> Path:
    """A CelebA folder of ``n`` ids (all of them when ``n`` >= the files' count) under ``dest``."""
    done = dest / ".complete"
    if done.exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    img = dest / "img_align_celeba"
    img.mkdir(parents=True)
    attr_lines = (annotations / "list_attr_celeba.txt").read_text().splitlines()
    header, rows = attr_lines[1], attr_lines[2:]
    total = len(rows)
    if n >= total:
        keep = list(range(total))
    else:
        step = total / n
        keep = [int(i * step) for i in range(n)]
    ids = [rows[i].split(maxsplit=1)[0] for i in keep]
    keep_ids = set(ids)
    (dest / "list_attr_celeba.txt").write_text(
        "\n".join([str(len(ids)), header] + [rows[i] for i in keep]) + "\n")
    for name in ANNOTATION_FILES[1:]:
        lines = (annotations / name).read_text().splitlines()
        (dest / name).write_text(
            "\n".join(ln for ln in lines if ln.split(maxsplit=1)[0] in keep_ids) + "\n")
    sources = sorted(p for p in images_from.iterdir() if p.suffix.lower() == ".jpg")
    if not sources:
        raise FileNotFoundError(f"no .jpg files under {images_from} to link")
    for i, image_id in enumerate(ids):
        os.link(sources[i % len(sources)], img / image_id)
    done.write_text(f"{len(ids)} ids linked to {len(sources)} files\n")
    return dest


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _browser_open_s(index: Path) -> float | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None or not index.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp}", "--window-size=1280,4000",
             f"--screenshot={tmp}/page.png", index.resolve().as_uri()],
            capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
    return round(took, 2) if proc.returncode == 0 else None


def _stage_command(name: str, config: Path) -> list[str]:
    if importlib.util.find_spec(f"jobs.{name}") is None:
        raise RuntimeError(f"stage {name!r} has no job module jobs.{name}")
    return [sys.executable, "-m", f"jobs.{name}", "--config", str(config), "--force"]


def run_size(cfg, root: Path, out: Path, stages: list[str] | None = None) -> list[dict]:
    """Every stage (or those named in ``stages``, in pipeline order) on the folder ``root``,
    each as its own job process (as a user runs ``python -m jobs.<stage>``), so one stage's
    imports and heap never count for the next.

    Times are the stage's own ``seconds`` from run.json (not the process's start-up or Ray's);
    memory is sampled over the job's process tree (the driver and the Ray it starts).
    """
    from pipeline import runlog
    from pipeline.benchmarks.memory import MemorySampler
    from pipeline.config import dump_toml
    from pipeline.run import STAGES

    scfg = cfg.model_copy(deep=True)
    scfg.data.root, scfg.data.dataset, scfg.data.limit = str(root), "celeba", 0
    scfg.output.root = str(out)
    out.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}.toml"
    config.write_text(dump_toml(scfg))
    rows = []
    for stage in STAGES:
        if stages is not None and stage.name not in stages:
            continue
        spill = out.parent / f"{out.name}-spill" / stage.name
        spill.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RAY_object_spilling_config": json.dumps(
            {"type": "filesystem", "params": {"directory_path": str(spill)}})}
        # a busy machine can miss Ray's 30 s node-registration window at each job's start
        env.setdefault("RAY_raylet_start_wait_time_s", "180")
        before_bytes = _tree_bytes(out)
        t0 = time.perf_counter()
        proc = subprocess.Popen(_stage_command(stage.name, config), env=env)
        with MemorySampler(0.25, pid=proc.pid, watch_dir=str(spill)) as mem:
            rc = proc.wait()
        wall = time.perf_counter() - t0
        record = runlog.stage_record(scfg, stage.name) or {}
        if rc != 0:
            raise RuntimeError(f"[bench scale] {stage.name} failed (exit {rc}) on {root}; "
                               f"run.json says: {record.get('error')}")
        details = record.get("details") or {}
        row = {"stage": stage.name, "status": record.get("status"),
               "seconds": round(float(record.get("seconds") or wall), 1),
               "process_seconds": round(wall, 1), **mem.mib(),
               "spilled_mib": round(mem.peak_dir / 2**20, 1),
               "written_mib": round((_tree_bytes(out) - before_bytes) / 2**20, 1),
               "counts": {k: v for k, v in details.items()
                          if isinstance(v, int) and not isinstance(v, bool)}}
        rows.append(row)
        log.info("[bench scale] %s: %s", stage.name, row)
    index = out / "report" / "index.html"
    if index.exists():
        html_mib = _tree_bytes(out / "report") / 2**20
        rows.append({"stage": "report (page)", "html_and_figures_mib": round(html_mib, 2),
                     "chromium_open_s": _browser_open_s(index)})
    return rows


def source_dirs(annotations: str = "", images_from: str = "", workdir: str = "",
                shared: Path | None = None) -> tuple[Path, Path, Path]:
    """(official annotation files, real JPEGs to link, work folder (created)) for a full-size
    CelebA layout; defaults under ``shared`` (../shared/real or $FACEAUDIT_REAL_DATA)."""
    shared = shared or Path(os.environ.get("FACEAUDIT_REAL_DATA") or SHARED_REAL)
    annotations_dir = Path(annotations) if annotations else shared / "celeba-full"
    images_dir = Path(images_from) if images_from else shared / "celeba" / "img_align_celeba"
    work = Path(workdir) if workdir else Path(tempfile.gettempdir()) / "faceaudit-scale"
    work.mkdir(parents=True, exist_ok=True)
    return annotations_dir, images_dir, work


def run(cfg, images: int = 202599, compare: int = 20000, workdir: str = "",
        annotations: str = "", images_from: str = "", keep: bool = True,
        stages: str = "") -> dict:
    """``stages`` (comma-separated stage names): run only those, on each size's existing run
    folder (the earlier stages' outputs kept), e.g. to rerun the stages after a fix."""
    annotations_dir, images_dir, work = source_dirs(annotations, images_from, workdir)
    only = [s.strip() for s in stages.split(",") if s.strip()] or None
    sizes = sorted({int(compare), int(images)})
    results: dict[int, list[dict]] = {}
    for n in sizes:
        t = time.perf_counter()
        folder = layout_celeba(work / f"celeba-{n}", n, annotations_dir, images_dir)
        log.info("[bench scale] %d-image folder ready in %.1f s", n, time.perf_counter() - t)
        out = work / f"run-{n}"
        if out.exists() and only is None:
            shutil.rmtree(out)
        results[n] = run_size(cfg, folder, out, only)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    table = compare_sizes(results, sizes)
    print_sizes(table, sizes)
    return {"sizes": sizes, "per_size": {str(n): r for n, r in results.items()},
            "comparison": table, "workdir": str(work)}


def compare_sizes(results: dict[int, list[dict]], sizes: list[int]) -> list[dict]:
    if len(sizes) < 2:
        return []
    small, big = sizes[0], sizes[-1]
    by_small = {r["stage"]: r for r in results[small]}
    out = []
    for r in results[big]:
        s = by_small.get(r["stage"])
        if s is None or "seconds" not in r:
            continue
        t_ratio = r["seconds"] / max(s["seconds"], 1e-9)
        d_ratio = r["driver_pss_mib"] / max(s["driver_pss_mib"], 1e-9)
        a_ratio = r["driver_anon_mib"] / max(s["driver_anon_mib"], 1e-9)
        out.append({"stage": r["stage"], "seconds_small": s["seconds"], "seconds_big": r["seconds"],
                    "time_ratio": round(t_ratio, 2),
                    "driver_mib_small": s["driver_pss_mib"], "driver_mib_big": r["driver_pss_mib"],
                    "driver_ratio": round(d_ratio, 2),
                    "driver_anon_mib_small": s["driver_anon_mib"],
                    "driver_anon_mib_big": r["driver_anon_mib"],
                    "driver_anon_ratio": round(a_ratio, 2),
                    "all_anon_mib_small": s["all_anon_mib"], "all_anon_mib_big": r["all_anon_mib"],
                    "time_ok": t_ratio <= TIME_GOAL * (big / small) / 10,
                    "driver_ok": d_ratio <= DRIVER_GOAL,
                    "driver_anon_ok": a_ratio <= DRIVER_GOAL})
    return out


def print_sizes(table: list[dict], sizes: list[int]) -> None:
    if not table:
        return
    print(f"{'stage':<18}{'s@' + str(sizes[0]):>10}{'s@' + str(sizes[-1]):>12}{'x':>7}"
          f"{'drvMiB small':>14}{'drvMiB big':>12}{'x':>7}{'anon small':>12}{'anon big':>10}"
          f"{'x':>7}  ok (time, PSS, anon)")
    for r in table:
        ok = " ".join("yes" if r[k] else "NO" for k in ("time_ok", "driver_ok", "driver_anon_ok"))
        print(f"{r['stage']:<18}{r['seconds_small']:>10}{r['seconds_big']:>12}{r['time_ratio']:>7}"
              f"{r['driver_mib_small']:>14}{r['driver_mib_big']:>12}{r['driver_ratio']:>7}"
              f"{r['driver_anon_mib_small']:>12}{r['driver_anon_mib_big']:>10}"
              f"{r['driver_anon_ratio']:>7}  {ok}")
