"""What every report section shares: reading the stage tables, writing figures, small HTML pieces.

A section never crashes on a missing table: :meth:`Context.missing` turns it into a short
"not run" note that says what run.json knows about the stage. A table that is present but not in
the shape the report expects raises :class:`ReportDataError`; :meth:`Context.part` shows that as a
visible warning box in the page and records it in ``problems`` (returned by ``run``), so a
schema drift is never silent and never takes the whole report down.
"""

from __future__ import annotations

import html
import io
import logging
import re
from typing import Callable, Iterable, TypeVar

import pandas as pd

from pipeline import runlog, storage, tables
from pipeline.config import Config

log = logging.getLogger(__name__)
T = TypeVar("T")

# Which stage writes which table (for the "not run" notes).
TABLE_STAGE = {
    "manifest": "ingest", "errors": "ingest", "models/attributes": "train_attributes",
    "features": "extract", "clusters": "cluster", "classifiers": "classify", "shap": "explain",
    "audit": "audit",
}


class ReportDataError(Exception):
    """A stage table exists but lacks what a figure needs (names the table and its columns)."""


def h(text: object) -> str:
    """HTML-escape anything."""
    return html.escape(str(text), quote=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def col(df: pd.DataFrame, *candidates: str, table: str, required: bool = True) -> str | None:
    """The first of ``candidates`` that ``df`` has; a clear error naming the table otherwise."""
    for c in candidates:
        if c in df.columns:
            return c
    if required:
        raise ReportDataError(f"{table} has none of the columns {list(candidates)}; "
                              f"its columns are {list(df.columns)}")
    return None


def require(df: pd.DataFrame, columns: Iterable[str], table: str) -> None:
    """Every one of ``columns`` must be in ``df``; the error lists all that are missing."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ReportDataError(f"{table} lacks the columns {missing}; its columns are "
                              f"{list(df.columns)}")


def fmt(v: object, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table_html(df: pd.DataFrame, max_rows: int = 60, digits: int = 3, caption: str = "") -> str:
    """A plain HTML table; long tables are cut with a note saying how many rows were left out."""
    shown = df.head(max_rows)
    head = "".join(f"<th>{h(c)}</th>" for c in shown.columns)
    rows = []
    for rec in shown.itertuples(index=False):
        cells = []
        for v in rec:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{h(fmt(v, digits))}</td>' if num
                         else f"<td>{h(fmt(v, digits))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{h(caption)}</caption>" if caption else ""
    more = (f'<p class="small">{len(df) - max_rows} more rows not shown (read the table itself).</p>'
            if len(df) > max_rows else "")
    return (f'<div class="tablewrap"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>{more}")


def note(text: str, kind: str = "info") -> str:
    return f'<p class="note {kind}">{text}</p>'


class Context:
    """The run being reported on: its tables, run.json, and the figures written so far."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.root = tables.root(cfg)
        self.out = self.root.join("report")
        self.figures: list[str] = []
        self.problems: list[str] = []
        self.not_run: list[str] = []
        self._cache: dict[str, pd.DataFrame | None] = {}
        self.run_doc = runlog.load(cfg)

    # ---- tables -------------------------------------------------------------------------
    def table(self, name: str, columns: Iterable[str] | None = None) -> pd.DataFrame | None:
        """Table ``name`` as a DataFrame, or None when no stage has written it."""
        key = name if columns is None else f"{name}:{','.join(columns)}"
        if key not in self._cache:
            if not tables.exists(self.cfg, name):
                self._cache[key] = None
            else:
                if columns:
                    self._require_columns(name, columns)
                t = tables.read(self.cfg, name, columns=list(columns) if columns else None)
                self._cache[key] = t.to_pandas()
        return self._cache[key]

    def _require_columns(self, name: str, columns: Iterable[str]) -> None:
        """A narrow read of a table lacking a column is a :class:`ReportDataError` naming what
        is missing (as :func:`require` says of a table read whole), not Arrow's error."""
        schema = storage.read_schema(tables.location(self.cfg, name))
        missing = [c for c in columns if schema is not None and c not in schema.names]
        if missing:
            raise ReportDataError(f"{name} lacks the columns {missing}; its columns are "
                                  f"{schema.names}")

    def rows_where(self, name: str, columns: Iterable[str], **equal: object
                   ) -> pd.DataFrame | None:
        """Rows of ``name`` whose columns equal the given values, ``columns`` only; filtered
        while reading, so a table holding every clustering's rows (1.8 M rows at 202,599
        images) is never a DataFrame whole. None when no stage has written it."""
        import pyarrow.dataset as pads

        key = f"{name}:{','.join(columns)}:" + ",".join(f"{k}={v}" for k, v in equal.items())
        if key not in self._cache:
            if not tables.exists(self.cfg, name):
                self._cache[key] = None
            else:
                self._require_columns(name, [*columns, *equal])
                loc = tables.location(self.cfg, name)
                ds = pads.dataset(storage.parquet_files(loc), filesystem=loc.fs,
                                  format="parquet")
                expr = None
                for k, v in equal.items():
                    term = pads.field(k) == v
                    expr = term if expr is None else expr & term
                self._cache[key] = ds.to_table(columns=list(columns), filter=expr).to_pandas()
        return self._cache[key]

    def distinct(self, name: str, columns: Iterable[str]) -> pd.DataFrame | None:
        """The distinct value combinations of ``columns`` in ``name`` (grouped in Arrow)."""
        key = f"{name}:distinct:{','.join(columns)}"
        if key not in self._cache:
            if not tables.exists(self.cfg, name):
                self._cache[key] = None
            else:
                t = tables.read(self.cfg, name, columns=list(columns))
                self._cache[key] = t.group_by(list(columns)).aggregate([]).to_pandas()
        return self._cache[key]

    def has(self, name: str) -> bool:
        return tables.exists(self.cfg, name)

    def table_metadata(self, name: str) -> dict[str, str]:
        """Key-value metadata of a table's first Parquet file (model names, versions ...)."""
        return tables.metadata(self.cfg, name)

    def recorded(self, read: Callable[[Config, str], T], name: str) -> T:
        """The settings the owning stage recorded in table ``name``'s metadata, through that
        stage's own reader ``read`` (e.g. :func:`pipeline.cluster.read_settings`). The report
        describes a run from these, never from the config it was started with; a table
        written without them is a :class:`ReportDataError` saying what to rerun."""
        try:
            return read(self.cfg, name)
        except KeyError as exc:
            raise ReportDataError(exc.args[0] if exc.args else str(exc)) from None

    def stage_of(self, name: str) -> str:
        parts = name.split("/")
        for i in range(len(parts), 0, -1):  # longest known prefix: models/attributes/metrics
            stage = TABLE_STAGE.get("/".join(parts[:i]))
            if stage:
                return stage
        return "?"

    def missing(self, name: str, what: str = "") -> str:
        """The "not run" note for a table no stage has written, with run.json's word on why."""
        stage = self.stage_of(name)
        rec = self.run_doc.get("stages", {}).get(stage)
        if rec is None:
            why = f"the <code>{h(stage)}</code> stage has not run for this output root"
        else:
            status = rec.get("status", "?")
            extra = rec.get("error") or (rec.get("details") or {}).get("reason") or ""
            why = f"run.json records the <code>{h(stage)}</code> stage as <b>{h(status)}</b>"
            if extra:
                why += f": {h(str(extra)[:300])}"
        self.not_run.append(name)
        subject = what or f"<code>{h(name)}/</code>"
        return note(f"Not run: {subject} is not in the output root ({why}).", "notrun")

    # ---- sections -----------------------------------------------------------------------
    def part(self, title: str, build: Callable[[], list[str] | str], level: int = 3) -> str:
        """A titled subsection; a ReportDataError or any other failure becomes a visible
        warning, not a crash."""
        try:
            body = build()
            body = body if isinstance(body, str) else "\n".join(body)
        except ReportDataError as exc:
            self.problems.append(f"{title}: {exc}")
            log.warning("report: %s: %s", title, exc)
            body = note(f"Could not draw this part: {h(exc)}", "warn")
        except Exception as exc:  # noqa: BLE001 - a figure that fails (e.g. a label matplotlib
            # cannot typeset) costs this part only; the rest of the report is still written
            import matplotlib.pyplot as plt

            plt.close("all")
            self.problems.append(f"{title}: {type(exc).__name__}: {exc}")
            log.exception("report: %s failed", title)
            body = note(f"This part failed: {h(type(exc).__name__)}: {h(exc)}", "warn")
        return f"<h{level} id=\"{slug(title)}\">{h(title)}</h{level}>\n{body}"

    # ---- figures ------------------------------------------------------------------------
    def figure(self, fig, name: str, caption: str, alt: str = "") -> str:
        """Save a matplotlib figure as report/figures/<name>.png and return its <figure> HTML."""
        import matplotlib.pyplot as plt

        base = slug(name)
        fname, i = f"{base}.png", 2
        while fname in self.figures:
            fname, i = f"{base}-{i}.png", i + 1
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.cfg.report.dpi, bbox_inches="tight",
                    facecolor="white")
        plt.close(fig)
        storage.write_bytes(self.out.join("figures", fname), buf.getvalue())
        self.figures.append(fname)
        return self.image(fname, caption, alt)

    def copy_image(self, data: bytes, name: str, caption: str) -> str:
        """Put an image another stage drew (e.g. a SHAP beeswarm) beside the page."""
        fname = f"{slug(name)}.png"
        storage.write_bytes(self.out.join("figures", fname), data)
        self.figures.append(fname)
        return self.image(fname, caption, caption)

    @staticmethod
    def image(fname: str, caption: str, alt: str = "") -> str:
        return (f'<figure><img src="figures/{h(fname)}" alt="{h(alt or caption)}" loading="lazy">'
                f"<figcaption>{h(caption)}</figcaption></figure>")
