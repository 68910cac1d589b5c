"""Data: how many images, in which splits, how common each attribute is, and what was rejected."""

from __future__ import annotations

import pandas as pd

from pipeline import storage, tables
from pipeline.report import _plots as P
from pipeline.report._context import Context, h, note, table_html
from pipeline.schemas import manifest_attributes

TITLE = "Data"


def build(ctx: Context) -> list[str]:
    out = []
    m = _manifest(ctx)
    if m is None:
        out.append(ctx.missing("manifest"))
    else:
        out.append(ctx.part("Images and splits", lambda: _splits(m) + _split_rule(ctx)))
        out.append(ctx.part("Attribute prevalence", lambda: _prevalence(ctx, m)))
        if "age" in m.columns and m["age"].notna().any():
            out.append(ctx.part("Age, gender and race (UTKFace)", lambda: _utk(ctx, m)))
    out.append(ctx.part("Rejected inputs (errors/)", lambda: _errors(ctx, m is not None)))
    return out


# Manifest columns this section shows, besides the boolean attributes (not uris, landmarks ...).
_SHOWN = ("split", "dataset", "identity", "person", "age", "gender", "race")


def _manifest(ctx: Context) -> pd.DataFrame | None:
    if not ctx.has("manifest"):
        return None
    schema = storage.read_schema(tables.location(ctx.cfg, "manifest"))
    return ctx.table("manifest", columns=[c for c in schema.names if c in _SHOWN]
                     + manifest_attributes(schema))


def _splits(m: pd.DataFrame) -> list[str]:
    by = ["dataset", "split"] if "dataset" in m.columns else ["split"]
    counts = m.groupby(by, dropna=False).size().rename("images").reset_index()
    counts["share (%)"] = 100.0 * counts["images"] / len(m)
    extra = []
    if "identity" in m.columns and m["identity"].notna().any():
        extra.append(f"{m['identity'].nunique():,} identities")
    if "person" in m.columns and m["person"].notna().any():
        extra.append(f"{m['person'].nunique():,} people")
    lead = f"<p><b>{len(m):,}</b> images in <code>manifest/</code>"
    lead += (" (" + ", ".join(extra) + ")" if extra else "") + ".</p>"
    return [lead, table_html(counts, digits=1)]


def _split_rule(ctx: Context) -> list[str]:
    """Which rule made the split (ingest's run.json details), and the identity check's count."""
    details = ((ctx.run_doc.get("stages") or {}).get("ingest") or {}).get("details") or {}
    rule = details.get("split_rule")
    if not rule:
        return []
    text = f"Split: <b>{h(rule)}</b>."
    spread = details.get("identities_in_two_splits")
    if spread is not None:
        text += f" Identities found in more than one split: <b>{spread:,}</b>."
    if str(rule).startswith("seeded, by image"):
        text += (" The same person may be in train and test, so test scores can be inflated by "
                 "faces of people seen in training.")
    return [note(text)]


def _attributes(m: pd.DataFrame) -> list[str]:
    return [c for c in m.columns if m[c].dtype == bool or str(m[c].dtype) == "boolean"]


def _prevalence(ctx: Context, m: pd.DataFrame) -> list[str]:
    attrs = _attributes(m)
    if not attrs:
        return [note("The manifest has no boolean attribute columns (an unlabelled folder).")]
    splits = [s for s in ("train", "val", "test") if (m["split"] == s).any()]
    prev = pd.DataFrame({s: m.loc[m["split"] == s, attrs].astype(float).mean() * 100
                         for s in splits})
    prev["all"] = m[attrs].astype(float).mean() * 100
    prev = prev.sort_values("all")
    fig, ax = P.plt.subplots(figsize=(7.5, 0.22 * len(attrs) + 1.2))
    y = range(len(prev))
    ax.barh(y, prev["all"], color=P.OKABE_ITO[0], label="all images")
    for i, s in enumerate(splits):
        ax.scatter(prev[s], y, s=14, marker=P.marker(i + 1), color=P.colour(i + 1),
                   label=f"{s} split", zorder=3)
    ax.set_yticks(list(y), labels=prev.index)
    ax.set_xlabel("images with the attribute (%)")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title("Attribute prevalence (annotations)")
    fig_html = ctx.figure(fig, "data-prevalence", "Share of images carrying each annotated "
                          "attribute, overall (bars) and per split (markers).")
    tab = prev[["all", *splits]].sort_values("all", ascending=False).reset_index(
        names="attribute")
    return [fig_html, "<details><summary>Prevalence table (%)</summary>",
            table_html(tab, max_rows=200, digits=1), "</details>"]


def _utk(ctx: Context, m: pd.DataFrame) -> list[str]:
    fig, axes = P.plt.subplots(1, 3, figsize=(10, 3))
    axes[0].hist(m["age"].dropna(), bins=range(0, 121, 5), color=P.OKABE_ITO[0])
    axes[0].set_xlabel("age (years)")
    axes[0].set_ylabel("images")
    for ax, c in zip(axes[1:], ("gender", "race")):
        vc = m[c].fillna("unknown").value_counts()
        ax.bar(vc.index.astype(str), vc.values, color=[P.colour(i) for i in range(len(vc))])
        ax.set_xlabel(c)
        ax.set_ylabel("images")
        ax.tick_params(axis="x", rotation=30)
    return [ctx.figure(fig, "data-utk", "Age, gender and race as annotated in UTKFace.")]


def _errors(ctx: Context, have_manifest: bool) -> list[str]:
    e = ctx.table("errors")
    if e is None or e.empty:
        if not have_manifest:
            return [ctx.missing("errors")]
        return [note("No input was rejected: <code>errors/</code> is empty.")]
    by_stage = e.groupby("stage").size().sort_values()
    fig, ax = P.plt.subplots(figsize=(6, 0.35 * len(by_stage) + 1))
    ax.barh(by_stage.index, by_stage.values, color=P.OKABE_ITO[5])
    ax.set_xlabel("rejected inputs (rows in errors/)")
    ax.set_title("Rejected inputs per stage")
    fig_html = ctx.figure(fig, "data-errors", "Inputs each stage could not use.")
    reasons = (e.groupby(["stage", "reason"], dropna=False)
               .agg(rows=("reason", "size"), example=("image_id", "first"))
               .reset_index().sort_values("rows", ascending=False))
    lead = f"<p><b>{len(e):,}</b> inputs were rejected; every one is a row of <code>errors/</code>.</p>"
    return [lead, fig_html, table_html(reasons, max_rows=30,
                                       caption="Reasons, most frequent first")]


