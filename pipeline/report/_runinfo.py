"""Run: what ran, how long it took, how many rows each stage wrote, with which versions and config."""

from __future__ import annotations

import pandas as pd

from pipeline import storage
from pipeline.report import _plots as P
from pipeline.report._context import Context, h, note, table_html

TITLE = "Run"


def build(ctx: Context) -> list[str]:
    doc = ctx.run_doc
    out = [ctx.part("Stages", lambda: _stages(ctx, doc))]
    out.append(ctx.part("Versions", lambda: _versions(ctx, doc)))
    out.append(ctx.part("Configuration", lambda: _config(ctx)))
    return out


def _counts(details: dict) -> str:
    """The numeric details a stage reported (row counts, headline numbers), one line."""
    items = [f"{k}={v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v:.4g}"
             for k, v in sorted((details or {}).items())
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(items[:12]) + (" …" if len(items) > 12 else "")


def _stages(ctx: Context, doc: dict) -> list[str]:
    stages = doc.get("stages") or {}
    if not stages:
        return [note("No <code>run.json</code> in the output root: no stage has run through "
                     "<code>jobs.run</code> / <code>jobs.&lt;stage&gt;</code>.", "notrun")]
    from pipeline.run import STAGE_NAMES

    rows = []
    for name in STAGE_NAMES:
        rec = stages.get(name)
        if rec is None:
            rows.append({"stage": name, "status": "not run", "seconds": None, "finished": "",
                         "rows / details": ""})
            continue
        rows.append({"stage": name, "status": rec.get("status", "?"),
                     "seconds": rec.get("seconds"), "finished": rec.get("finished", ""),
                     "rows / details": _counts(rec.get("details") or {})
                     or str(rec.get("error") or (rec.get("details") or {}).get("reason", ""))})
    t = pd.DataFrame(rows)
    timed = t[t["seconds"].notna()]
    out = []
    if len(timed):
        fig, ax = P.plt.subplots(figsize=(6.5, 0.35 * len(timed) + 1))
        ax.barh(timed["stage"][::-1], timed["seconds"][::-1].astype(float),
                color=P.OKABE_ITO[0])
        ax.set_xlabel("wall time (s)")
        ax.set_title(f"Stage timings (total {timed['seconds'].astype(float).sum():,.0f} s)")
        out.append(ctx.figure(fig, "run-timings", "Wall time of each stage's last run."))
    out.append(table_html(t, digits=1))
    return out


def _versions(ctx: Context, doc: dict) -> list[str]:
    v = dict(doc.get("versions") or {})
    if not v:
        from pipeline.runlog import versions

        v = versions()
    out = [table_html(pd.DataFrame(sorted(v.items()), columns=["package", "version"]))]
    meta = ctx.table_metadata("features") if ctx.has("features") else {}
    if meta:
        out.append(table_html(pd.DataFrame(sorted(meta.items()), columns=["key", "value"]),
                              caption="features/ file metadata (models and versions)"))
    return out


def _config(ctx: Context) -> list[str]:
    loc = ctx.root.join("config.toml")
    if storage.exists(loc):
        text = storage.read_bytes(loc).decode(errors="replace")
        src = ("<code>config.toml</code> as written next to the outputs by the last stage that "
               "wrote tables (the report never rewrites it)")
    else:
        from pipeline.config import dump_toml

        text = dump_toml(ctx.cfg)
        src = "the config this report was built with (no config.toml in the output root)"
    return [f"<p>{src}:</p><pre>{h(text)}</pre>"]
