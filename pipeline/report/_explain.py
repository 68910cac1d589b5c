"""Explanations: per-cluster SHAP importance beside the global model's, how much the rankings
agree (Kendall's tau, top-k overlap), and the beeswarm plots the explain stage drew.

From ``shap/importance``, ``shap/comparison`` and the beeswarms under ``shap/plots/`` (all owned
by pipeline/explain.py; a beeswarm is found from its importance row through
:func:`pipeline.explain.beeswarm_name`, never by parsing file names).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import storage, tables
from pipeline.explain import COMPARISON, IMPORTANCE, PLOTS, beeswarm_name
from pipeline.report import _plots as P
from pipeline.report._context import Context, note, require, table_html

TITLE = "Explanations"
# Features shown side by side (the union of each column's top features, capped).
MAX_FEATURES = 15


def build(ctx: Context) -> list[str]:
    imp = ctx.table(IMPORTANCE)
    if imp is None:
        return [ctx.missing(IMPORTANCE)]
    require(imp, ("model", "sampling", "trained_on", "cluster", "feature", "mean_abs_shap",
                  "rank"), IMPORTANCE)
    out = [note("Mean |SHAP| is the average absolute contribution of a feature to the model's "
                "output (probability or log-odds, as stated on each axis). Clusters whose "
                "ranking differs from the global model's are where the classifier relies on "
                "different cues.")]
    comp = ctx.table(COMPARISON)
    for (model, sampling), g in imp.groupby(["model", "sampling"], sort=True):
        title = f"{model}, sampling = {sampling}"
        out.append(ctx.part(f"{title}: importance by cluster",
                            lambda: _side_by_side(ctx, model, sampling, g, comp)))
        if comp is None:
            out.append(ctx.missing(COMPARISON))
        else:
            c = comp[(comp["model"] == model) & (comp["sampling"] == sampling)]
            out.append(ctx.part(f"{title}: rank agreement", lambda: _agreement(ctx, model,
                                                                                sampling, c)))
    out.append(ctx.part("Beeswarms", lambda: _beeswarms(ctx, imp)))
    return out


def _column_name(trained_on: str, cluster) -> str:
    where = "all rows" if pd.isna(cluster) else f"c{int(cluster)}"
    return f"global, {where}" if trained_on == "global" else f"{trained_on} model"


def _columns(g: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Global model on all rows first; then per cluster its own model, else the global model."""
    cols = []
    glob = g[g["trained_on"] == "global"]
    allrows = glob[glob["cluster"].isna()]
    if len(allrows):
        cols.append(("global model, all rows", allrows))
    clusters = sorted(int(c) for c in g["cluster"].dropna().unique())
    for c in clusters:
        own = g[(g["trained_on"] != "global") & (g["cluster"] == c)]
        if len(own):
            cols.append((f"cluster {c} model", own))
        gl = glob[glob["cluster"] == c]
        if len(gl):
            cols.append((f"global model on c{c}", gl))
    return cols


def _side_by_side(ctx: Context, model: str, sampling: str, g: pd.DataFrame,
                  comp: pd.DataFrame | None) -> list[str]:
    cols = _columns(g)
    # top-k as explain compared the rankings (shap/comparison's k); without comparison rows
    # there is at most one column, and MAX_FEATURES of it are shown
    ks = comp.loc[(comp["model"] == model) & (comp["sampling"] == sampling), "k"] \
        if comp is not None and "k" in comp.columns else pd.Series(dtype=int)
    k = int(ks.iloc[0]) if len(ks) else MAX_FEATURES
    feats: list[str] = []
    for _, d in cols:
        for f in d.sort_values("rank")["feature"].head(k):
            if f not in feats:
                feats.append(f)
    first = cols[0][1].set_index("feature")["mean_abs_shap"]
    feats = sorted(feats[:MAX_FEATURES], key=lambda f: first.get(f, 0.0))
    n = len(cols)
    ncol = min(n, 5)
    nrow = -(-n // ncol)
    fig, axes = P.plt.subplots(nrow, ncol, figsize=(2.3 * ncol + 1.5, (0.22 * len(feats) + 1.2) * nrow),
                               sharey=True, squeeze=False)
    output = g["output"].iloc[0] if "output" in g.columns else "model output"
    vmax = max(float(d["mean_abs_shap"].max()) for _, d in cols) * 1.05
    for ax, (name, d) in zip(axes.flat, cols):
        v = d.set_index("feature")["mean_abs_shap"].reindex(feats)
        # blue: the global model (on all rows or on one cluster); orange: a cluster's own model
        ax.barh(range(len(feats)), v.fillna(0).values,
                color=P.OKABE_ITO[0] if name.startswith("global") else P.OKABE_ITO[1],
                hatch="" if name.startswith("global") else "//", edgecolor="white")
        ax.set_yticks(range(len(feats)), labels=feats)
        ax.set_xlim(0, vmax)
        ax.set_title(P.wrap(name, 22), fontsize=8)
        ax.set_xlabel(f"mean |SHAP| ({output})", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{model} ({sampling}): top features, global vs per cluster")
    fig.tight_layout()
    fig_html = ctx.figure(fig, f"shap-{model}-{sampling}-importance",
                          f"{model} ({sampling}): mean |SHAP| of the top-{k} features of every "
                          f"column, global model first, then each cluster.")
    ranks = g.assign(column=[_column_name(t, c) for t, c in zip(g["trained_on"], g["cluster"])])
    ranks = ranks.pivot_table(index="feature", columns="column", values="rank",
                              aggfunc="first").loc[lambda d: d.index.isin(feats)]
    ranks = ranks.reindex(feats[::-1]).reset_index()
    return [fig_html, "<details><summary>Ranks (1 = most important)</summary>",
            table_html(ranks, max_rows=60, digits=0), "</details>"]


def _node(trained_on: str, cluster) -> str:
    where = "all" if pd.isna(cluster) else f"c{int(cluster)}"
    return f"global@{where}" if trained_on == "global" else f"{trained_on.replace('cluster_', 'model c')}"


def _agreement(ctx: Context, model: str, sampling: str, c: pd.DataFrame) -> list[str]:
    if c.empty:
        return [note("No comparison rows (fewer than two importance vectors).")]
    require(c, ("left_trained_on", "left_cluster", "right_trained_on", "right_cluster",
                 "kendall_tau", "top_k_overlap"), COMPARISON)
    c = c.copy()
    c["left"] = [_node(t, cl) for t, cl in zip(c["left_trained_on"], c["left_cluster"])]
    c["right"] = [_node(t, cl) for t, cl in zip(c["right_trained_on"], c["right_cluster"])]
    nodes = list(dict.fromkeys(sorted(set(c["left"]) | set(c["right"]),
                                      key=lambda s: (not s.startswith("global@all"),
                                                     not s.startswith("global"), s))))
    idx = {n: i for i, n in enumerate(nodes)}
    fig, axes = P.plt.subplots(1, 2, figsize=(0.55 * len(nodes) * 2 + 4, 0.5 * len(nodes) + 2))
    for ax, (metric, label, vmin, cmap) in zip(axes, (
            ("kendall_tau", "Kendall's tau of mean |SHAP|", -1, P.DIVERGING),
            ("top_k_overlap", f"top-{int(c['k'].iloc[0]) if 'k' in c.columns else '?'} overlap "
                              "(fraction)", 0, P.SEQUENTIAL))):
        mat = np.full((len(nodes), len(nodes)), np.nan)
        np.fill_diagonal(mat, 1.0)
        for r in c.itertuples():
            v = getattr(r, metric)
            mat[idx[r.left], idx[r.right]] = mat[idx[r.right], idx[r.left]] = v
        P.heatmap(ax, mat, nodes, nodes, cmap, vmin, 1, label, annotate=len(nodes) <= 12,
                  fig=fig)
        ax.set_title(label)
    fig.suptitle(f"{model} ({sampling}): agreement of feature rankings "
                 "(global@cX = global model on cluster X; model cX = cluster X's own model)")
    fig.tight_layout()
    fig_html = ctx.figure(fig, f"shap-{model}-{sampling}-agreement",
                          f"{model} ({sampling}): rank correlation and top-k overlap between "
                          f"every pair of importance vectors; blank = pair not compared.")
    vs = c[c["kind"].isin(("cluster_model_vs_global", "global_model_cluster_vs_all"))] \
        if "kind" in c.columns else c
    vs = vs.sort_values(["top_k_overlap", "kendall_tau"])
    keep = [x for x in ("kind", "left", "right", "n_features", "kendall_tau", "kendall_p",
                        "top_k_overlap") if x in vs.columns]
    return [fig_html, table_html(vs[keep], caption="Against the global model, most different "
                                 "first")]


def _beeswarms(ctx: Context, imp: pd.DataFrame) -> list[str]:
    loc = tables.location(ctx.cfg, PLOTS)
    have = {i.path.rsplit("/", 1)[-1] for i in storage.list_files(loc)}
    keys = imp[["model", "sampling", "trained_on", "cluster"]].drop_duplicates()
    figs = []
    for r in keys.sort_values(["model", "sampling", "trained_on", "cluster"],
                              na_position="first").itertuples(index=False):
        cluster = None if pd.isna(r.cluster) else int(r.cluster)
        name = beeswarm_name(r.model, r.sampling, r.trained_on, cluster)
        if name not in have:  # e.g. the global model on a cluster that has its own model
            continue
        where = "all rows" if cluster is None else f"cluster {cluster}"
        caption = f"{r.model} · {r.sampling} · {r.trained_on} model · {where}"
        data = storage.read_bytes(loc.join(name))
        figs.append(ctx.copy_image(data, f"shap-{name[:-4]}", f"SHAP beeswarm: {caption}"))
    if not figs:
        return [ctx.missing(PLOTS, "<code>shap/plots/beeswarm*.png</code>")]
    return [note("Drawn by the explain stage (each dot is one test image; colour = the "
                 "feature's value, position = its SHAP value)."),
            f'<div class="gallery">{"".join(figs)}</div>']
