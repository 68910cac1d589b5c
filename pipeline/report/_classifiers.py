"""Classifiers: per-cluster and per-group metrics with bootstrap intervals, the gaps between
groups, and what each undersampling strategy changed.

From ``classifiers/metrics`` (long format, written by pipeline.classify): one row per model ×
sampling × trained_on × evaluated_on × metric with ``value``, ``ci_low``, ``ci_high``, ``n``;
``group_by`` is ``overall``, ``cluster`` or a sensitive attribute, ``evaluated_on`` is
``overall``, ``<group_by>=<group>`` or ``gap:<group_by>`` for the gap rows.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pipeline.classify import GLOBAL, SEP, read_settings
from pipeline.classify import METRICS_TABLE as METRICS
from pipeline.report import _plots as P
from pipeline.report._context import Context, ReportDataError, h, note, require, table_html

TITLE = "Classifiers"
# Metrics drawn per cluster / per group: overall quality, then the error rates fairness compares.
SHOWN = ("accuracy", "balanced_accuracy", "recall", "fpr")
GAPS = ("accuracy_gap_difference", "equalized_odds_difference", "demographic_parity_difference")


def build(ctx: Context) -> list[str]:
    m = ctx.table(METRICS)
    if m is None:
        return [ctx.missing(METRICS)]
    require(m, ("model", "sampling", "trained_on", "evaluated_on", "group_by", "group", "metric",
              "value", "ci_low", "ci_high"), METRICS)
    m = m.copy()
    m["is_gap"] = m["evaluated_on"].astype(str).str.startswith("gap:")
    m["global"] = m["trained_on"] == GLOBAL
    run = ctx.recorded(read_settings, METRICS)  # what the metrics were computed with
    intervals = (f"Error bars and [brackets] are {run.ci_level:.0%} bootstrap intervals "
                 f"({run.bootstrap} resamples); small clusters have wide ones."
                 if run.bootstrap else "No bootstrap intervals (classify.bootstrap = 0).")
    out = [note(f"Target: <b>{h(run.target)}</b>, evaluated on the test split. {intervals}")]
    out.append(ctx.part("Overall", lambda: _overall(m)))
    out.append(ctx.part("Per cluster", lambda: _by(ctx, m, ["cluster"], "per-cluster")))
    # plain sensitive attributes only; the intersectional groupings are in the findings table
    groups = [g for g in m["group_by"].unique() if g not in ("overall", "cluster")
              and SEP not in str(g)]
    out.append(ctx.part("Per sensitive group", lambda: _by(ctx, m, groups, "per-group")))
    out.append(ctx.part("Gaps between groups", lambda: _gaps(ctx, m)))
    out.append(ctx.part("What undersampling changed", lambda: _sampling(ctx, m)))
    out.append(ctx.part("Per-cluster models against the global model",
                        lambda: _per_cluster_models(ctx, m)))
    return out


def _ci(r) -> str:
    if pd.isna(r["value"]):
        return "–"
    if pd.isna(r["ci_low"]):
        return f"{r['value']:.3f}"
    return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def _overall(m: pd.DataFrame) -> list[str]:
    o = m[m["evaluated_on"] == "overall"]
    if o.empty:
        raise ReportDataError(f"{METRICS} has no overall rows")
    o = o[o["metric"].isin(("accuracy", "balanced_accuracy", "precision", "recall", "f1",
                            "roc_auc", "selection_rate"))].copy()
    o["cell"] = o.apply(_ci, axis=1)
    t = o.pivot_table(index=["model", "sampling", "trained_on"], columns="metric", values="cell",
                      aggfunc="first").reset_index()
    return [table_html(t, caption="Whole test split: value [CI]; trained_on = per_cluster scores "
                       "each test row with its own cluster's model")]


def _models(m: pd.DataFrame) -> list[str]:
    return sorted(m["model"].unique())


def _dotplot(ctx: Context, d: pd.DataFrame, series: str, name: str, caption: str,
             groupings: list[str], metrics=SHOWN) -> str:
    """Rows: groupings; columns: metrics; x: groups; one colour per ``series`` value, CI bars."""
    fig, axes = P.plt.subplots(len(groupings), len(metrics),
                               figsize=(3.2 * len(metrics), 2.7 * len(groupings)), squeeze=False)
    order = {s: i for i, s in enumerate(("none", "class", "cluster", "cluster_class",
                                         "global model"))}
    keys = sorted(d[series].unique(), key=lambda k: (order.get(k, 99), str(k)))
    for r, gb in enumerate(groupings):
        dg = d[d["group_by"] == gb]
        groups = sorted(dg["group"].astype(str).unique(), key=_natural)
        for c, metric in enumerate(metrics):
            ax = axes[r, c]
            for i, key in enumerate(keys):
                s = dg[(dg["metric"] == metric) & (dg[series] == key)].copy()
                s["gi"] = s["group"].astype(str).map({g: j for j, g in enumerate(groups)})
                s = s.sort_values("gi")
                x = s["gi"] + (i - (len(keys) - 1) / 2) * 0.8 / max(len(keys), 1)
                err = np.vstack([(s["value"] - s["ci_low"]).clip(lower=0).fillna(0),
                                 (s["ci_high"] - s["value"]).clip(lower=0).fillna(0)])
                ax.errorbar(x, s["value"], yerr=err, fmt=P.marker(i), color=P.colour(i), ms=4,
                            capsize=2, lw=1, label=str(key))
            ax.set_xticks(range(len(groups)), labels=[_short(gb, g) for g in groups],
                          rotation=45 if len(groups) > 4 else 0)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlim(-0.6, len(groups) - 0.4)
            if r == 0:
                ax.set_title(metric.replace("_", " ") + (" (TPR)" if metric == "recall" else
                                                         " (false-positive rate)" if metric == "fpr"
                                                         else ""))
            if c == 0:
                ax.set_ylabel(f"by {gb} (fraction)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.tight_layout()
    # above the panels (bbox_inches="tight" keeps it in the image), never over a title
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
               bbox_to_anchor=(0.5, 1.0), title=series, frameon=False)
    return ctx.figure(fig, name, caption)


def _natural(s: str):
    m = re.match(r"-?\d+", str(s))
    return (0, int(m.group()), str(s)) if m else (1, 0, str(s))


def _short(group_by: str, group: str) -> str:
    return f"c{group}" if group_by == "cluster" else str(group)


def _by(ctx: Context, m: pd.DataFrame, groupings: list[str], name: str) -> list[str]:
    d = m[~m["is_gap"] & m["global"] & m["group_by"].isin(groupings)]
    if d.empty:
        return [note(f"No {h(name)} rows in <code>{METRICS}</code>.")]
    groupings = [g for g in groupings if g in set(d["group_by"])]
    base = d[d["sampling"] == "none"] if (d["sampling"] == "none").any() else d
    samp = base["sampling"].iloc[0]
    out = [_dotplot(ctx, base, "model", f"classifiers-{name}",
                    f"{name.capitalize()} test metrics of the global models (sampling = {samp}),"
                    f" with bootstrap intervals; one colour per model.", groupings)]
    t = base[base["metric"].isin(SHOWN)].copy()
    t["cell"] = t.apply(_ci, axis=1)
    t = t.pivot_table(index=["model", "group_by", "group", "n"], columns="metric",
                      values="cell", aggfunc="first").reset_index()
    out += ["<details><summary>Table</summary>", table_html(t, max_rows=200), "</details>"]
    return out


def _gaps(ctx: Context, m: pd.DataFrame) -> list[str]:
    g = m[m["is_gap"] & m["global"]]
    if g.empty:
        return [note(f"No gap rows in <code>{METRICS}</code>.")]
    t = g[g["metric"].isin(GAPS + ("balanced_accuracy_gap_difference", "recall_gap_difference",
                                   "fpr_gap_difference"))].copy()
    t["cell"] = t.apply(_ci, axis=1)
    t = t.pivot_table(index=["model", "sampling", "group_by"], columns="metric", values="cell",
                      aggfunc="first").reset_index()
    return [note("A gap is max − min of a metric over the groups; demographic parity and "
                 "equalized odds differences are fairlearn's. An interval that excludes 0 "
                 "means the gap is not resampling noise."),
            table_html(t, max_rows=200)]


def _sampling(ctx: Context, m: pd.DataFrame) -> list[str]:
    out = []
    samplings = list(dict.fromkeys(s for s in ctx.recorded(read_settings, METRICS).samplings
                                   if s in set(m["sampling"])))
    samplings += [s for s in sorted(m["sampling"].unique()) if s not in samplings]
    if len(samplings) < 2:
        return [note("Only one sampling strategy was run; nothing to compare.")]
    g = m[m["is_gap"] & m["global"] & m["metric"].isin(GAPS)]
    for model in _models(m):
        gm = g[g["model"] == model]
        if gm.empty:
            continue
        groupings = sorted((g for g in gm["group_by"].unique() if SEP not in str(g)),
                           key=lambda x: (x != "cluster", x))
        fig, axes = P.plt.subplots(1, len(GAPS), figsize=(3.8 * len(GAPS), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], GAPS):
            for i, s in enumerate(samplings):
                d = gm[(gm["metric"] == metric) & (gm["sampling"] == s)].set_index("group_by")
                d = d.reindex(groupings)
                x = np.arange(len(groupings)) + (i - (len(samplings) - 1) / 2) * 0.8 / len(samplings)
                err = np.vstack([(d["value"] - d["ci_low"]).clip(lower=0).fillna(0),
                                 (d["ci_high"] - d["value"]).clip(lower=0).fillna(0)])
                ax.bar(x, d["value"], width=0.8 / len(samplings), color=P.colour(i),
                       hatch=("", "//", "..", "xx", "--")[i % 5], edgecolor="white",
                       yerr=err, capsize=2, label=s, error_kw={"lw": 0.8})
            ax.set_xticks(range(len(groupings)), labels=groupings, rotation=30)
            ax.set_title(metric.replace("_", " "))
            ax.set_ylabel("gap (fraction, lower is fairer)")
        axes[0, 0].legend(title="undersampling", fontsize=7)
        if gm["value"].isna().all():
            P.plt.close(fig)
            out.append(note(f"{h(model)}: every gap is undefined (no grouping has two groups "
                            f"with test rows)."))
            continue
        fig.suptitle(f"{model}: gaps between groups under each undersampling strategy")
        fig.tight_layout()
        out.append(ctx.figure(fig, f"classifiers-sampling-gaps-{model}",
                              f"{model}: accuracy gap, equalized-odds and demographic-parity "
                              f"differences per grouping, one bar per undersampling strategy "
                              f"(bootstrap intervals)."))
    d = m[~m["is_gap"] & m["global"] & (m["group_by"] == "cluster")]
    for model in _models(d):
        dm = d[d["model"] == model]
        out.append(_dotplot(ctx, dm, "sampling", f"classifiers-sampling-clusters-{model}",
                            f"{model}: per-cluster test metrics under each undersampling "
                            f"strategy (colour), with bootstrap intervals.", ["cluster"],
                            metrics=("balanced_accuracy", "recall", "fpr", "selection_rate")))
    o = m[(m["evaluated_on"] == "overall") & m["global"]
          & m["metric"].isin(("accuracy", "balanced_accuracy", "f1"))].copy()
    o["cell"] = o.apply(_ci, axis=1)
    t = o.pivot_table(index=["model", "metric"], columns="sampling", values="cell",
                      aggfunc="first").reset_index()
    out.append(table_html(t[["model", "metric", *[s for s in samplings if s in t.columns]]],
                          caption="Overall test metrics per undersampling strategy"))
    return out


def _cluster_of(trained_on: str) -> str | None:
    m = re.search(r"(-?\d+)$", str(trained_on))
    return m.group(1) if m else None


def _per_cluster_models(ctx: Context, m: pd.DataFrame) -> list[str]:
    pc = m[~m["global"] & ~m["is_gap"] & (m["group_by"] == "cluster")].copy()
    if pc.empty:
        return [note("No per-cluster models (classify.per_cluster is off or none fitted).")]
    # trained_on is "per_cluster" (each cluster scored by its own model) or "cluster_<c>"
    pc["own"] = pc["trained_on"].map(_cluster_of)
    pc = pc[pc["own"].isna() | (pc["own"] == pc["group"].astype(str))]
    pc = pc.assign(kind="cluster's own model")
    gl = m[m["global"] & ~m["is_gap"] & (m["group_by"] == "cluster")].assign(kind="global model")
    keep = pc[["model", "sampling"]].drop_duplicates()
    gl = gl.merge(keep, on=["model", "sampling"])
    d = pd.concat([pc, gl], ignore_index=True)
    d = d[d["sampling"] == ("none" if (d["sampling"] == "none").any() else d["sampling"].iloc[0])]
    out = []
    for model in _models(d):
        out.append(_dotplot(ctx, d[d["model"] == model], "kind",
                            f"classifiers-per-cluster-models-{model}",
                            f"{model}: each cluster scored by its own model and by the global "
                            f"model.", ["cluster"]))
    return out
