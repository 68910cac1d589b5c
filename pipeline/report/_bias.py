"""Bias: the demographic composition of each cluster and the chi-square test of independence.

From ``clusters/demographics`` (one row per space × algorithm × attribute × cluster × category,
with the chi-square statistic repeated on every row of an attribute). For UTKFace the stage
adds race and age bins as attributes, so they appear here as panels like Male or Young.
"""

from __future__ import annotations

import re

import pandas as pd

from pipeline.cluster import DEMOGRAPHICS as DEMO
from pipeline.cluster import read_settings
from pipeline.report import _plots as P
from pipeline.report._context import Context, note, require, table_html

TITLE = "Bias"
# Hatches double the colour coding so stacked categories stay apart in greyscale print.
HATCHES = ("", "//", "..", "xx", "\\\\", "--", "++", "oo")


def build(ctx: Context) -> list[str]:
    d = ctx.table(DEMO)
    if d is None:
        return [ctx.missing(DEMO)]
    out = [note("Share of each demographic category inside every cluster, beside its share in "
                "the whole dataset (bar “all”). The chi-square test asks whether cluster "
                "membership and the category are independent; a small p-value means the "
                "clusters split the demographic unevenly.")]
    require(d, ("space", "algorithm", "attribute", "cluster", "category", "share"), DEMO)
    man = ctx.table("manifest", columns=["race"]) if ctx.has("manifest") else None
    if man is not None and man["race"].notna().any() and not (d["attribute"] == "race").any():
        out.append(note("The manifest has UTKFace race labels but clusters/demographics has "
                        "no race rows.", "warn"))
    primary = ctx.recorded(read_settings, DEMO).primary_algorithm  # as the run clustered
    for space in d["space"].unique():
        g = d[d["space"] == space]
        algo = primary if primary in set(g["algorithm"]) else sorted(g["algorithm"].unique())[0]
        g = g[g["algorithm"] == algo]
        out.append(ctx.part(f"Demographics: {space} ({algo})",
                            lambda: _space(ctx, space, algo, g)))
    return out


def _natural(s: str):
    """Sort key that puts "20-29" before "100+" and "false" before "true"."""
    m = re.match(r"\s*(\d+)", str(s))
    return (0, int(m.group(1)), str(s)) if m else (1, 0, str(s))


def _space(ctx: Context, space: str, algo: str, g: pd.DataFrame) -> list[str]:
    attrs = list(dict.fromkeys(g["attribute"]))
    ncol = min(3, len(attrs))
    nrow = -(-len(attrs) // ncol)
    clusters = sorted(g["cluster"].unique())
    fig, axes = P.plt.subplots(nrow, ncol, figsize=(4.2 * ncol, (0.32 * len(clusters) + 1.6) * nrow),
                               squeeze=False)
    tests = []
    for ax, attr in zip(axes.flat, attrs):
        a = g[g["attribute"] == attr]
        cats = sorted(a["category"].unique(), key=_natural)
        share = a.pivot_table(index="cluster", columns="category", values="share",
                              aggfunc="first").reindex(columns=cats).fillna(0.0)
        share.index = [f"c{c}" for c in share.index]
        if "overall" in a.columns:
            overall = a.groupby("category")["overall"].first().reindex(cats).fillna(0.0)
            share.loc["all"] = overall.values
        left = pd.Series(0.0, index=share.index)
        for i, cat in enumerate(cats):
            ax.barh(list(share.index), share[cat] * 100, left=left * 100, color=P.colour(i),
                    hatch=HATCHES[i % len(HATCHES)], edgecolor="white", linewidth=0.4,
                    label=str(cat))
            left += share[cat]
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of cluster (%)")
        title = str(attr)
        if "chi2" in a.columns and a["chi2"].notna().any():
            r = a[a["chi2"].notna()].iloc[0]
            pv = r.get("p_value")
            title += f": χ²={r['chi2']:.1f}, dof={int(r['dof']) if pd.notna(r.get('dof')) else '?'}, p={pv:.2g}"
            tests.append({"attribute": attr, "chi2": r["chi2"], "dof": r.get("dof"),
                          "p_value": pv})
        else:
            tests.append({"attribute": attr, "chi2": None, "dof": None, "p_value": None})
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right", ncol=1 if len(cats) < 5 else 2,
                  bbox_to_anchor=(1.0, 1.12) if len(cats) > 4 else None)
    for ax in list(axes.flat)[len(attrs):]:
        ax.axis("off")
    fig.tight_layout()
    fig_html = ctx.figure(fig, f"bias-{space}", f"Demographic composition of each {space} "
                          f"cluster ({algo}) with the chi-square test of independence.")
    t = pd.DataFrame(tests)
    return [fig_html, table_html(t, digits=4, caption="Chi-square test of independence, cluster "
                                 "× category")]


