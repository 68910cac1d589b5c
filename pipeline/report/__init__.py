"""The report stage: one HTML page, readable offline, that shows what every stage found.

``run(cfg)`` reads the stage tables under ``cfg.output.root`` (local or s3://) and writes
``report/index.html`` with its figures in ``report/figures/*.png``, all through
:mod:`pipeline.storage` (atomic writes). Sections, one module each:

- Findings (``_findings``, first): the disparities that survive the multiple-comparison
  correction as plain sentences with their numbers and intervals, which undersampling narrows
  each most and at what accuracy, the features whose SHAP importance differs most between the
  two groups; then the large-looking gaps that do not survive.
- Data (``_data``): images, splits, attribute prevalence, rejected inputs.
- Data quality (``_quality``): duplicates, label conflicts, leakage, probable label errors.
- Attribute model (``_attributes``): accuracy vs majority baseline, training curve.
- Clusters (``_clusters``): per feature space the sweep, 2-D map, lift heatmap, attribute
  occurrence, mean faces, sample grids, centroid distances; P(A | B).
- Bias (``_bias``): demographic composition per cluster with chi-square.
- Classifiers (``_classifiers``): per-cluster / per-group metrics with CIs, gaps, undersampling.
- Explanations (``_explain``): SHAP importance per cluster vs global, rank agreement, beeswarms.
- Models and weights (``_models``): every network, its weights and their origin.
- Run (``_runinfo``): stage status, timings, row counts, versions, config.

The report never recomputes results: every number and plot comes from a stage table (the mean
faces average the pixels of images the cluster stage assigned). A stage that has not run gives
a short "not run" note; a table in an unexpected shape gives a visible warning and is listed in
the returned ``problems``.
"""

from __future__ import annotations

import logging

from pipeline import storage, tables
from pipeline.config import Config
from pipeline.report import (_attributes, _bias, _classifiers, _clusters, _data, _explain,
                             _findings, _models, _quality, _runinfo)
from pipeline.report._context import Context, ReportDataError, h, note, slug
from pipeline.report._faces import FACE_WIDTH, FaceReader, mean_face  # noqa: F401 - public
from pipeline.report._page import render

log = logging.getLogger(__name__)

SECTIONS = (_findings, _data, _quality, _models, _attributes, _clusters, _bias, _classifiers,
            _explain, _runinfo)
INDEX = "index.html"


def run(cfg: Config) -> dict:
    """Build ``<output.root>/report/index.html``; returns where it is and what it holds."""
    ctx = Context(cfg)
    # this run's unreadable faces replace the last run's (written by the Clusters section)
    tables.clear_errors(cfg, "report")
    built = []
    for module in SECTIONS:
        log.info("[report] %s", module.TITLE)
        try:
            body = "\n".join(module.build(ctx))
        except ReportDataError as exc:  # a table the whole section needs is malformed
            ctx.problems.append(f"{module.TITLE}: {exc}")
            log.warning("[report] %s: %s", module.TITLE, exc)
            body = note(f"Could not draw this section: {h(exc)}", "warn")
        except Exception as exc:  # noqa: BLE001 - any other failure costs this section only
            ctx.problems.append(f"{module.TITLE}: {type(exc).__name__}: {exc}")
            log.exception("[report] %s failed", module.TITLE)
            body = note(f"This section failed: {h(type(exc).__name__)}: {h(exc)}", "warn")
        built.append((slug(module.TITLE), module.TITLE, body))
    subtitle = _subtitle(ctx)
    page = render("faceaudit report", subtitle, built)
    index = ctx.out.join(INDEX)
    storage.write_bytes(index, page.encode("utf-8"))  # after every figure: no dangling links
    _remove_stale_figures(ctx)
    if ctx.problems:
        log.warning("[report] %d parts could not be drawn: %s", len(ctx.problems), ctx.problems)
    log.info("[report] written: %s", index.uri)
    return {"report": index.uri, "figures": len(ctx.figures), "sections": len(built),
            "not_run": sorted(set(ctx.not_run)), "problems": ctx.problems,
            "html_bytes": len(page.encode("utf-8"))}


def _subtitle(ctx: Context) -> str:
    """Dataset and data root as ingest recorded them in the manifest, and where the run is."""
    md = ctx.table_metadata("manifest")
    source = (f"{md['dataset']} · {md['data_root']}" if "dataset" in md and "data_root" in md
              else "data source not recorded (manifest written before it was)")
    return f"{source} → {ctx.cfg.output.root}"


def _remove_stale_figures(ctx: Context) -> None:
    """Figures of an earlier report that this one no longer shows."""
    loc = ctx.out.join("figures")
    keep = set(ctx.figures)
    for info in storage.list_files(loc, recursive=False):
        base = info.path.rsplit("/", 1)[-1]
        if (base.endswith(".png") and base not in keep
                and not base.startswith(storage.TEMP_PREFIX)):
            loc.fs.delete_file(info.path)
