"""Data quality: what the audit stage found in the collection itself (``audit/*`` tables).

Counts of exact / near duplicates and their label conflicts, leakage across splits, probable
label errors with their rate per cluster and per sensitive group (chi-square), the worst
examples as faces side by side with their labels, and what each defect could do to the
analysis. :func:`label_noise_findings` gives one sentence per significant label-noise disparity
(for a findings summary).
"""

from __future__ import annotations

import pandas as pd

from pipeline.audit import (DUPLICATES, ISSUE_RATES, LABEL_CONFLICTS, LABEL_ISSUES,
                            LEAKAGE_COUNTS, SUMMARY)
from pipeline.report import _plots as P
from pipeline.report._context import Context, ReportDataError, h, note, require, table_html
from pipeline.report._faces import FaceReader

TITLE = "Data quality"
# Duplicate groups and suspect labels drawn as faces.
MAX_GROUPS = 6
MAX_SUSPECTS = 8
# A label model within this much accuracy of the majority-class share is called weak.
WEAK_MARGIN = 0.05


def build(ctx: Context) -> list[str]:
    s = ctx.table(SUMMARY)
    if s is None:
        return [ctx.missing(SUMMARY)]
    reader = FaceReader(ctx)
    out = [note("The audit stage looks for defects in the data the rest of the report rests on: "
                "the same file under two labels, near-identical faces, people or images on both "
                "sides of the train/test split, and labels a model trained on the others calls "
                "wrong. Each table is under <code>audit/</code>.")]
    out.append(ctx.part("Counts", lambda: _counts(ctx, s)))
    out.append(ctx.part("Duplicates with conflicting labels", lambda: _conflicts(ctx, reader)))
    out.append(ctx.part("Leakage across splits", lambda: _leakage(ctx)))
    out.append(ctx.part("Probable label errors", lambda: _label_errors(ctx, reader)))
    if reader.failed:
        out.append(note(f"{len(reader.failed)} images could not be read for the thumbnails.",
                        "warn"))
    return out


def _metric(s: pd.DataFrame, metric: str, attribute: str | None = None) -> float | None:
    sel = s[(s["metric"] == metric) & ((s["attribute"].isna()) if attribute is None
                                       else (s["attribute"] == attribute))]
    return None if sel.empty else float(sel["value"].iloc[0])


def _counts(ctx: Context, s: pd.DataFrame) -> list[str]:
    require(s, ("metric", "attribute", "value"), SUMMARY)
    # the settings audit ran with, from its own tables: the threshold is a summary row, the
    # action is in the summary's metadata
    threshold = _metric(s, "near_threshold")
    action = ctx.table_metadata(SUMMARY).get("action")
    if threshold is None or action is None:
        raise ReportDataError(f"{SUMMARY} lacks the near_threshold row or the action metadata "
                              "(written by an older audit stage): rerun audit "
                              "(python -m jobs.audit --force)")

    def val(m, attr=None):
        v = _metric(s, m, attr)
        return "–" if v is None else f"{v:,.0f}"
    rows = [
        ("images audited", val("images_audited"), ""),
        ("exact-duplicate groups (images)", f"{val('exact_groups')} ({val('exact_images')})",
         "the same file under two ids: one face counted twice, with two sets of labels"),
        ("… of them with conflicting labels", val("exact_groups_conflicting"),
         "the race / age / attribute analysis is told two different things about one face"),
        ("near-duplicate groups (images)", f"{val('near_groups')} ({val('near_images')})",
         f"embedding cosine distance ≤ {threshold:g}: near-identical frames"),
        ("… of them with conflicting labels", val("near_groups_conflicting"),
         "frames of one moment labelled differently (noise, or the label is subjective)"),
        ("exact-duplicate groups across splits", val("leaking_groups", "exact_duplicate"),
         "a test image seen in training: inflated test scores"),
        ("near-duplicate groups across splits", val("leaking_groups", "near_duplicate"),
         "the same, for near-identical frames"),
        ("identities in more than one split", val("leaking_groups", "identity"),
         "a person seen in training: scores measure recognition, not the attribute"),
        ("images dropped (audit.action)", val("dropped_images"),
         f"audit.action = {action}; listed in errors/audit.parquet"),
    ]
    t = pd.DataFrame(rows, columns=["what", "count", "what it could do to the analysis"])
    p01, p50 = _metric(s, "nearest_distance_p01"), _metric(s, "nearest_distance_p50")
    extra = ""
    if p50 is not None:
        extra = (f"<p class=\"small\">Each image's nearest other image lies at cosine distance "
                 f"{p01:.4f} (1st percentile) / {p50:.4f} (median); the near-duplicate threshold "
                 f"is {threshold:g}. A threshold near the median means the embedding "
                 f"does not separate faces and the near groups are not meaningful.</p>")
    if p50 is not None and threshold >= p50:
        extra += note(f"The near-duplicate threshold ({threshold:g}) is at or above the "
                      f"median nearest-neighbour distance ({p50:.4f}): this embedding does not "
                      "tell faces apart at that scale, so the near-duplicate counts say little "
                      "(exact duplicates are unaffected). Use a face embedding or lower "
                      "audit.near_threshold.", "warn")
    return [table_html(t), extra]


def _labels_of(ctx: Context) -> pd.DataFrame:
    m = ctx.table("manifest", columns=["image_id", "uri"])  # the faces' files only
    return m.set_index("image_id")


def _faces_rows(ctx: Context, reader: FaceReader, groups: list[tuple[str, list[str], list[str]]],
                name: str, caption: str) -> str:
    """One figure row per group: its faces side by side, each titled with its labels."""
    man = _labels_of(ctx)
    width = max(len(ids) for _, ids, _ in groups)
    fig, axes = P.plt.subplots(len(groups), width, figsize=(1.9 * width, 2.3 * len(groups)),
                               squeeze=False)
    for r, (title, ids, labels) in enumerate(groups):
        for c in range(width):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ids):
                continue
            uri = man.loc[ids[c], "uri"] if ids[c] in man.index else None
            faces = reader.load(pd.DataFrame({"image_id": [ids[c]], "uri": [uri]})) if uri else []
            if faces:
                ax.imshow(faces[0])
            ax.set_title(f"{ids[c][:22]}\n{labels[c]}", fontsize=7)
        axes[r][0].text(-0.08, 0.5, title, transform=axes[r][0].transAxes, rotation=90,
                        va="center", ha="right", fontsize=8)
    fig.tight_layout()
    return ctx.figure(fig, name, caption)


def _conflicts(ctx: Context, reader: FaceReader) -> list[str]:
    if not (ctx.has(LABEL_CONFLICTS) and ctx.has(DUPLICATES)):
        return [ctx.missing(LABEL_CONFLICTS)]
    # narrow reads: the list columns (members, values) are read for the groups drawn only; at
    # full CelebA they hold millions of strings (a DataFrame of them doubled the driver's peak)
    conf = ctx.table(LABEL_CONFLICTS, columns=("group", "kind", "attribute"))
    dups = ctx.table(DUPLICATES, columns=("group", "kind", "image_id", "split", "distance"))
    if conf.empty:
        return [note("No duplicate group has conflicting labels.")]
    per = conf.groupby(["kind", "attribute"]).size().rename("groups").reset_index()
    out = [table_html(per.sort_values(["kind", "groups"], ascending=[True, False]),
                      caption="Duplicate groups whose members' annotations differ, per attribute")]
    # worst first: exact groups, then near groups by distance, most conflicting attributes first
    d = dups.groupby(["kind", "group"]).agg(distance=("distance", "max")).reset_index()
    n_attr = conf.groupby(["kind", "group"])["attribute"].apply(list).rename("attrs").reset_index()
    d = d.merge(n_attr, on=["kind", "group"])
    d["exact_first"] = (d["kind"] != "exact").astype(int)
    d["n_attrs"] = -d["attrs"].str.len()
    d = d.sort_values(["exact_first", "distance", "n_attrs", "group"]).head(MAX_GROUPS)
    groups = []
    for r in d.itertuples():
        members = dups[(dups["kind"] == r.kind) & (dups["group"] == r.group)].sort_values("image_id")
        ids = members["image_id"].tolist()[:6]
        rows = ctx.rows_where(LABEL_CONFLICTS, ("attribute", "image_ids", "values"),
                              kind=r.kind, group=int(r.group))
        labels = []
        for i in ids:
            parts = []
            for c in rows.itertuples():
                idx = list(c.image_ids).index(i) if i in list(c.image_ids) else None
                if idx is not None:
                    parts.append(f"{c.attribute}={list(c.values)[idx]}")
            labels.append("\n".join(parts[:4]))
        splits = ", ".join(sorted(set(members["split"])))
        groups.append((f"{r.kind} #{r.group} ({splits})", ids, labels))
    if groups:
        out.append(_faces_rows(ctx, reader, groups, "quality-conflicts",
                               "The worst duplicate groups (exact first, then the closest near "
                               "groups): the faces side by side with the labels that differ."))
    return out


def _leakage(ctx: Context) -> list[str]:
    c = ctx.table(LEAKAGE_COUNTS)
    if c is None:
        return [ctx.missing(LEAKAGE_COUNTS)]
    if c.empty:
        return [note("No duplicate group and no identity spans two splits.")]
    return [table_html(c, caption="Groups (or identities) present in both splits, and their "
                                  "images in either; the rows are in audit/leakage."),
            note("Leakage inflates every test-split score in the classifier section: the model "
                 "has seen the same face (or person) in training.")]


def _label_errors(ctx: Context, reader: FaceReader) -> list[str]:
    rates = ctx.table(ISSUE_RATES)
    issues = ctx.table(LABEL_ISSUES)
    if rates is None or issues is None:
        return [ctx.missing(ISSUE_RATES)]
    if rates.empty:
        return [note("No attribute was audited for label errors (none annotated).")]
    require(rates, ("attribute", "group_by", "group", "n", "issues", "rate", "p_value",
                    "significant"), ISSUE_RATES)
    out = [note("Out-of-sample probabilities (cross-validated logistic regression on the "
                "embedding and the other annotations) judged by confident learning (cleanlab). "
                "A suspected-error rate that differs between groups is itself a finding: a "
                "classifier audited against labels that are wrong more often in one group "
                "measures the labels, not the model. A rate can also differ because the label "
                "model itself is worse on one group (faces it sees rarely): read the rates beside "
                "the worst examples.")]
    overall = rates[rates["group_by"] == "overall"][["attribute", "n", "issues", "rate"]].copy()
    summary = ctx.table(SUMMARY)
    for metric, column in (("label_model_accuracy", "label model accuracy"),
                           ("label_majority_share", "majority share")):
        overall[column] = [_metric(summary, metric, a) for a in overall["attribute"]]
    out.append(table_html(overall, caption="Suspected label errors per attribute, beside how well "
                                           "the out-of-sample label model predicts the labels"))
    weak = overall[overall["label model accuracy"].notna()
                   & (overall["label model accuracy"] < overall["majority share"] + WEAK_MARGIN)]
    if not weak.empty:
        out.append(note("The label model barely beats always answering the majority class for "
                        f"{', '.join(h(a) for a in weak['attribute'])}: its verdicts there mostly "
                        "say the features cannot predict the label, not that the label is wrong.",
                        "warn"))
    per = rates[rates["group_by"] != "overall"].copy()
    if not per.empty:
        per = per.sort_values(["significant", "p_value"], ascending=[False, True],
                              na_position="last")
        out.append(table_html(per[["attribute", "group_by", "group", "n", "issues", "rate",
                                   "chi2", "p_value", "significant"]], max_rows=40, digits=4,
                              caption="Suspected-error rate per cluster and per sensitive group "
                                      "(chi-square test of independence per grouping)"))
    for s in label_noise_findings(ctx):
        out.append(note(h(s), "warn"))
    groups = []
    for attr in issues["attribute"].unique():
        worst = issues[issues["attribute"] == attr].sort_values("rank").head(MAX_SUSPECTS)
        groups.append((attr, worst["image_id"].tolist(),
                       [f"given {g}\nmodel {p} ({q:.2f})" for g, p, q in
                        zip(worst["given"], worst["predicted"], worst["p_given"])]))
    if groups:
        out.append(_faces_rows(ctx, reader, groups, "quality-suspects",
                               "The most suspect labels per attribute: the given label, the "
                               "out-of-sample model's label and its probability of the given "
                               "one."))
    return out


def label_noise_findings(ctx: Context) -> list[str]:
    """One sentence per attribute × grouping whose suspected-error rates differ significantly."""
    rates = ctx.table(ISSUE_RATES)
    if rates is None or rates.empty or "significant" not in rates.columns:
        return []
    out = []
    sig = rates[rates["significant"].fillna(False).astype(bool)]
    for (attr, by), g in sig.groupby(["attribute", "group_by"], sort=True):
        hi, lo = g.loc[g["rate"].idxmax()], g.loc[g["rate"].idxmin()]
        out.append(f"Label noise in {attr} differs by {by} (χ² p = {hi['p_value']:.2g}): "
                   f"{100 * hi['rate']:.1f} % suspected errors in {by} = {hi['group']} against "
                   f"{100 * lo['rate']:.1f} % in {by} = {lo['group']}.")
    return out
