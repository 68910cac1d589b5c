"""Clusters, one subsection per feature space: sweep, 2-D map, profiles, faces, distances.

Everything here is drawn from the ``clusters/`` tables (schemas in pipeline/cluster/_schemas.py);
the only computation is averaging the pixels of images already assigned to a cluster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.report import _plots as P
from pipeline.report._context import Context, require, ReportDataError, col, h, note, table_html
from pipeline.report._faces import FaceReader, mean_face, sample_rows
from pipeline.seeds import derive_seed

TITLE = "Clusters"
# The cluster stage owns these tables and the settings in their metadata.
from pipeline.cluster import ASSIGNMENTS as ASSIGN
from pipeline.cluster import CENTROID_DISTANCES as DIST
from pipeline.cluster import CONDITIONAL as COND
from pipeline.cluster import IDENTITY, PROFILES, SWEEP, Settings, read_settings


def build(ctx: Context) -> list[str]:
    # assignments: only which clusterings exist here; each one's rows are read when drawn
    sweep, assign = ctx.table(SWEEP), ctx.distinct(ASSIGN, ["space", "algorithm"])
    if sweep is None and assign is None:
        return [ctx.missing("clusters")]
    spaces: list[str] = []
    for df in (sweep, assign):
        if df is not None:
            spaces += [s for s in df["space"].unique() if s not in spaces]
    settings = _settings(ctx)
    order = {s: i for i, s in enumerate(settings.spaces)}
    spaces.sort(key=lambda s: order.get(s, 99))
    faces = FaceReader(ctx)
    out = [_intro(settings, spaces)]
    for space in spaces:
        out.append(f'<h3 id="space-{h(space)}">Feature space: {h(space)}</h3>')
        out.append(ctx.part(f"{space}: sweep", lambda: _sweep(ctx, space), level=4))
        algo = _primary_algorithm(ctx, settings, space)
        if algo is None:
            out.append(ctx.missing(ASSIGN, f"<code>{ASSIGN}/</code> for {h(space)}"))
            continue
        out.append(note(f"Figures below use the <b>{h(algo)}</b> clustering of this space "
                        f"at its chosen k."))
        out.append(ctx.part(f"{space}: labels", lambda: _labels(ctx, space, algo), level=4))
        out.append(ctx.part(f"{space}: 2-D map", lambda: _map(ctx, settings, space, algo),
                            level=4))
        out.append(ctx.part(f"{space}: profile heatmap", lambda: _lift(ctx, space, algo),
                            level=4))
        out.append(ctx.part(f"{space}: attributes per cluster",
                            lambda: _occurrence(ctx, space, algo), level=4))
        out.append(ctx.part(f"{space}: mean faces and samples",
                            lambda: _faces(ctx, faces, space, algo), level=4))
        out.append(ctx.part(f"{space}: centroid distances",
                            lambda: _distances(ctx, space, algo), level=4))
    out.append(ctx.part("Conditional probabilities P(A | B)", lambda: _conditional(ctx)))
    if ctx.has(IDENTITY):  # only collections that name people (CelebA identity, LFW person)
        out.append(ctx.part("Identity purity", lambda: _identity(ctx)))
    if faces.failed:
        from pipeline import tables

        tables.write_errors(ctx.cfg, "report", faces.failed)
        out.append(note(f"{len(faces.failed)} images could not be read for the faces; they are "
                        f"recorded in <code>errors/</code> (stage <code>report</code>).", "warn"))
    return out


def _settings(ctx: Context) -> Settings:
    """How the clusters were made, as the cluster stage recorded it in its tables."""
    return ctx.recorded(read_settings, SWEEP if ctx.has(SWEEP) else ASSIGN)


def _intro(settings: Settings, spaces: list[str]) -> str:
    links = ", ".join(f'<a href="#space-{h(s)}">{h(s)}</a>' for s in spaces)
    how = (f"k is fixed at {settings.k} (cluster.k)" if settings.k else
           f"k is chosen per space and algorithm by the <code>{h(settings.k_rule)}</code> rule")
    return (f"<p>Feature spaces clustered: {links}. {how}. Lift = P(attribute | cluster) / "
            f"P(attribute): above 1 the attribute is over-represented in the cluster.</p>")


def _primary_algorithm(ctx: Context, settings: Settings, space: str) -> str | None:
    a = ctx.distinct(ASSIGN, ["space", "algorithm"])
    if a is None:
        return None
    algos = list(a.loc[a["space"] == space, "algorithm"].unique())
    if not algos:
        return None
    return settings.primary_algorithm if settings.primary_algorithm in algos else sorted(algos)[0]


def _members(ctx: Context, space: str, algo: str) -> pd.DataFrame:
    return ctx.rows_where(ASSIGN, ["image_id", "k", "cluster", "x", "y"], space=space,
                          algorithm=algo)


def _profiles(ctx: Context, space: str, algo: str) -> pd.DataFrame:
    p = ctx.table(PROFILES)
    if p is None:
        raise ReportDataError(f"{PROFILES}/ is missing (the cluster stage writes it)")
    require(p, ("space", "algorithm", "cluster", "attribute", "prevalence", "lift", "label",
                "size"), PROFILES)
    p = p[(p["space"] == space) & (p["algorithm"] == algo)]
    if "source" in p.columns and (p["source"] == "annotations").any():
        p = p[p["source"] == "annotations"]  # ground truth where the dataset has it
    if p.empty:
        raise ReportDataError(f"{PROFILES} has no rows for space={space}, algorithm={algo}")
    return p


def _cluster_names(p: pd.DataFrame) -> dict[int, str]:
    lab = p.groupby("cluster").agg(label=("label", "first"), size=("size", "first"))
    return {int(c): f"c{c}: {r['label']} (n={int(r['size']):,})" for c, r in lab.iterrows()}


def _sweep(ctx: Context, space: str) -> list[str]:
    s = ctx.table(SWEEP)
    if s is None:
        return [ctx.missing(SWEEP)]
    s = s[s["space"] == space].sort_values(["algorithm", "k"])
    if s.empty:
        return [note(f"No sweep rows for {h(space)}.")]
    panels = [("inertia", "inertia (within-cluster SS)", "elbow: lower, flattening"),
              ("silhouette", "silhouette (−1…1)", "higher is better"),
              ("davies_bouldin", "Davies–Bouldin", "lower is better")]
    fig, axes = P.plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (metric, ylabel, hint) in zip(axes, panels):
        col(s, metric, table=SWEEP)
        for i, (algo, g) in enumerate(s.groupby("algorithm", sort=True)):
            g = g[g[metric].notna()]
            if g.empty:
                continue
            ax.plot(g["k"], g[metric], marker=P.marker(i), color=P.colour(i), label=algo, ms=4)
            if "chosen" in g.columns:
                ch = g[g["chosen"]]
                ax.scatter(ch["k"], ch[metric], s=140, facecolors="none", edgecolors="black",
                           linewidths=1.5, zorder=4)
        ax.set_xlabel("k (clusters)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{metric.replace('_', ' ')} — {hint}", fontsize=9)
    handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="o", ls="none", mfc="none", mec="black", ms=10))
        labels.append("chosen k")
        fig.legend(handles, labels, loc="upper center", ncol=len(labels),
                   bbox_to_anchor=(0.5, 1.08))
    fig_html = ctx.figure(fig, f"clusters-{space}-sweep",
                          f"Sweep over k for the {space} space: elbow (inertia), silhouette and "
                          f"Davies–Bouldin per algorithm; circled points are the chosen k.")
    keep = [c for c in ("algorithm", "k", "chosen", "inertia", "silhouette", "davies_bouldin",
                        "calinski_harabasz", "noise_fraction", "fit_seconds") if c in s.columns]
    ext = [c for c in s.columns if c.split("_", 1)[0] in ("nmi", "ari", "purity")]
    chosen = s[s["chosen"]] if "chosen" in s.columns else s
    return [fig_html,
            table_html(chosen[keep + ext], caption="Chosen k per algorithm, with NMI / ARI / "
                       "purity against the reference attributes", digits=3),
            "<details><summary>Whole sweep</summary>", table_html(s[keep], max_rows=200),
            "</details>"]


def _labels(ctx: Context, space: str, algo: str) -> list[str]:
    p = _profiles(ctx, space, algo)
    lab = (p.groupby("cluster").agg(label=("label", "first"), size=("size", "first"),
                                    share=("share", "first") if "share" in p.columns
                                    else ("size", "first"))
           .reset_index())
    if "share" in p.columns:
        lab["share"] = lab["share"] * 100
        lab = lab.rename(columns={"share": "share (%)"})
    else:
        lab = lab.drop(columns="share")
    return [table_html(lab, digits=1, caption="Each cluster's readable label (its most "
                       "distinctive attributes)")]


def _map(ctx: Context, settings: Settings, space: str, algo: str) -> list[str]:
    m = _members(ctx, space, algo)
    m = m[m["x"].notna() & m["y"].notna()]
    if m.empty:
        return [note("No rows carry 2-D map coordinates for this space.")]
    try:
        names = _cluster_names(_profiles(ctx, space, algo))
    except ReportDataError:
        names = {}
    fig, ax = P.plt.subplots(figsize=(7, 5.5))
    for i, (c, g) in enumerate(m.groupby("cluster", sort=True)):
        c = int(c)
        colour = P.NOISE_GREY if c < 0 else P.colour(c)
        ax.scatter(g["x"], g["y"], s=6, color=colour, marker=P.marker(max(c, 0)), alpha=0.7,
                   linewidths=0, label=P.wrap(names.get(c, "noise" if c < 0 else f"c{c}"), 40))
    ax.set_xlabel(f"{settings.map_method} 1 (arbitrary units)")
    ax.set_ylabel(f"{settings.map_method} 2 (arbitrary units)")
    ax.set_title(f"{space} space, {algo}, k={int(m['k'].iloc[0])}: {len(m):,} sampled rows")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2.5, frameon=False)
    return [ctx.figure(fig, f"clusters-{space}-map", f"2-D map of the {space} space coloured "
                       f"by cluster (a seeded sample of rows).")]


def _lift(ctx: Context, space: str, algo: str) -> list[str]:
    p = _profiles(ctx, space, algo)
    lift = p.pivot_table(index="cluster", columns="attribute", values="lift", aggfunc="first")
    names = _cluster_names(p)
    with np.errstate(divide="ignore"):
        mat = np.log2(lift.to_numpy(dtype=float))
    mat = np.where(np.isneginf(mat), -2.0, mat)  # absent attribute: show as the lowest shade
    fig, ax = P.plt.subplots(figsize=(0.24 * lift.shape[1] + 3, 0.45 * lift.shape[0] + 2))
    P.heatmap(ax, np.clip(mat, -2, 2), [P.wrap(names.get(int(c), str(c)), 45) for c in lift.index],
              list(lift.columns), P.DIVERGING, -2, 2, "lift, log2 (±1 = ×2 / ×½)",
              annotate=False)
    ax.set_title(f"{space}: attribute lift per cluster (purple = over-represented)")
    src = p["source"].iloc[0] if "source" in p.columns else "annotations"
    return [ctx.figure(fig, f"clusters-{space}-lift", f"Lift of each attribute ({src}) in each "
                       f"cluster over the whole dataset, on a log2 scale clipped to ×¼…×4.")]


def _occurrence(ctx: Context, space: str, algo: str, top: int = 8) -> list[str]:
    p = _profiles(ctx, space, algo)
    names = _cluster_names(p)
    clusters = sorted(p["cluster"].unique())
    ncol = min(4, len(clusters))
    nrow = -(-len(clusters) // ncol)
    fig, axes = P.plt.subplots(nrow, ncol, figsize=(3.3 * ncol, 2.6 * nrow), squeeze=False)
    overall = col(p, "overall", table=PROFILES, required=False)
    for ax, c in zip(axes.flat, clusters):
        g = p[p["cluster"] == c].sort_values("prevalence", ascending=False).head(top)[::-1]
        ax.barh(g["attribute"], g["prevalence"] * 100, color=P.colour(int(c)) if c >= 0
                else P.NOISE_GREY)
        if overall:
            ax.scatter(g[overall] * 100, g["attribute"], marker="|", s=120, color="black",
                       zorder=3, label="whole dataset")
        ax.set_xlim(0, 100)
        ax.set_title(P.wrap(names.get(int(c), str(c)), 38), fontsize=8)
        ax.set_xlabel("images with attribute (%)")
    for ax in list(axes.flat)[len(clusters):]:
        ax.axis("off")
    if overall:
        axes.flat[0].legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return [ctx.figure(fig, f"clusters-{space}-occurrence", f"The {top} most common attributes "
                       f"in each cluster (bars) against their share in the whole dataset "
                       f"(black ticks).")]


def _faces(ctx: Context, reader: FaceReader, space: str, algo: str) -> list[str]:
    man = ctx.table("manifest", columns=["image_id", "uri"])
    if man is None:
        return [ctx.missing("manifest", "<code>manifest/</code> (needed to find the images)")]
    m = _members(ctx, space, algo)[["image_id", "cluster"]].merge(man, on="image_id")
    if m.empty:
        raise ReportDataError(f"no image of {ASSIGN} ({space}, {algo}) is in the manifest")
    try:
        names = _cluster_names(_profiles(ctx, space, algo))
    except ReportDataError:
        names = {}
    clusters = sorted(int(c) for c in m["cluster"].unique())
    seed = ctx.cfg.run.seed
    n_mean, n_grid = ctx.cfg.report.mean_face_images, ctx.cfg.report.faces_per_cluster
    means, grids, used = {}, {}, {}
    for c in clusters:
        members = m[m["cluster"] == c]
        rows = sample_rows(members, n_mean, derive_seed(seed, "report", "mean_face", space,
                                                        algo, c))
        faces = reader.load(rows)
        means[c], used[c] = mean_face(faces), len(faces)
        grid_rows = sample_rows(members, n_grid, derive_seed(seed, "report", "grid", space,
                                                             algo, c))
        grids[c] = reader.load(grid_rows) if n_grid else []
    out = []
    ncol = min(6, len(clusters))
    nrow = -(-len(clusters) // ncol)
    fig, axes = P.plt.subplots(nrow, ncol, figsize=(1.9 * ncol, 2.7 * nrow), squeeze=False)
    for ax, c in zip(axes.flat, clusters):
        ax.axis("off")
        if means[c] is not None:
            ax.imshow(means[c])
        ax.set_title(P.wrap(f"{names.get(c, f'c{c}')}; mean of {used[c]}", 24), fontsize=7)
    for ax in list(axes.flat)[len(clusters):]:
        ax.axis("off")
    out.append(ctx.figure(fig, f"clusters-{space}-mean-faces",
                          f"Mean face of each {space} cluster: the pixel-wise average of up to "
                          f"{n_mean} of its aligned images (seeded sample)."))
    if n_grid:
        fig, axes = P.plt.subplots(len(clusters), n_grid,
                                   figsize=(0.75 * n_grid + 1.6, 0.95 * len(clusters)),
                                   squeeze=False)
        for r, c in enumerate(clusters):
            for j in range(n_grid):
                ax = axes[r, j]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.spines[:].set_visible(False)
                if j < len(grids[c]):
                    ax.imshow(grids[c][j])
            axes[r, 0].set_ylabel(P.wrap(names.get(c, f"c{c}"), 22), rotation=0, ha="right",
                                  va="center", fontsize=7)
        fig.subplots_adjust(wspace=0.03, hspace=0.08)
        out.append(ctx.figure(fig, f"clusters-{space}-samples",
                              f"{n_grid} sample faces per {space} cluster (seeded sample)."))
    return out


def _distances(ctx: Context, space: str, algo: str) -> list[str]:
    d = ctx.table(DIST)
    if d is None:
        return [ctx.missing(DIST)]
    require(d, ("cluster_a", "cluster_b", "distance"), DIST)
    d = d[(d["space"] == space) & (d["algorithm"] == algo)]
    if d.empty:
        return [note(f"No centroid distances for {h(space)} / {h(algo)}.")]
    mat = d.pivot_table(index="cluster_a", columns="cluster_b", values="distance",
                        aggfunc="first")
    n = len(mat)
    fig, ax = P.plt.subplots(figsize=(0.5 * n + 2.5, 0.45 * n + 1.5))
    P.heatmap(ax, mat.to_numpy(dtype=float), [f"c{c}" for c in mat.index],
              [f"c{c}" for c in mat.columns], "viridis", 0, float(np.nanmax(mat.to_numpy())),
              f"Euclidean distance ({space} coordinates)")
    ax.set_title(f"{space}: distance between cluster centroids")
    return [ctx.figure(fig, f"clusters-{space}-distances", f"Distances between the centroids "
                       f"of the {space} clusters ({algo}).")]


def _conditional(ctx: Context) -> list[str]:
    cp = ctx.table(COND)
    if cp is None:
        return [ctx.missing(COND)]
    a = col(cp, "attribute", table=COND)
    b = col(cp, "given", table=COND)
    v = col(cp, "p", table=COND)
    out = [note("Each cell is P(row attribute | column attribute) over the whole dataset: "
                "e.g. the row Male under the column Goatee is the share of Goatee faces that "
                "are Male.")]
    groups = cp.groupby("source") if "source" in cp.columns else [("annotations", cp)]
    for src, g in groups:
        mat = g.pivot_table(index=a, columns=b, values=v, aggfunc="first")
        n = max(mat.shape)
        fig, ax = P.plt.subplots(figsize=(0.22 * n + 3, 0.22 * n + 2))
        P.heatmap(ax, mat.to_numpy(dtype=float), list(mat.index), list(mat.columns),
                  P.SEQUENTIAL, 0, 1, "P(A | B)", annotate=n <= 12)
        ax.set_xlabel("B (given)")
        ax.set_ylabel("A")
        ax.set_title(f"P(A | B), {src}")
        out.append(ctx.figure(fig, f"clusters-conditional-{src}",
                              f"Conditional probability P(A | B) of the {src} attributes."))
    return out


def _identity(ctx: Context) -> list[str]:
    t = ctx.table(IDENTITY)
    require(t, ("space", "algorithm", "k", "purity", "nmi", "identity_consistency",
                "chance_consistency"), IDENTITY)
    shown = t[["space", "algorithm", "k", "n_rows", "n_identities", "purity", "nmi",
               "identity_consistency", "chance_consistency"]]
    return [note(f"How well each clustering keeps a person's faces together "
                 f"(people from the manifest's <code>{h(str(t['identity_column'].iloc[0]))}"
                 f"</code> column). With thousands of people and a few clusters, purity is small "
                 f"by construction; <b>identity consistency</b> is the share of the images of "
                 f"people with two or more images that fall in that person's most common "
                 f"cluster, next to what the same cluster sizes give by chance."),
            table_html(shown, caption="Clusters against identity")]
