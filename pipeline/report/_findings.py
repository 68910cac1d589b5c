"""Findings: the disparities that survive the multiple-comparison correction, in plain sentences,
first on the page; then, briefly, the large-looking gaps that do not survive.

Every number comes from a table: the gaps, p-values and decisions from ``classifiers/findings``
(pipeline.classify), each group's value and interval and the overall accuracies from
``classifiers/metrics``, SHAP from ``shap/values`` (pipeline.explain; the mean |SHAP| of each
group's explained rows, the groups read from ``manifest/`` and the rows' ``cluster`` column, so it
equals ``shap/importance`` for clusters).

What a sentence is about: the largest significant ``<metric>_gap_difference`` of each grouping
(over models, trained_on and metrics), ranked by size. Base-rate gaps (a property of the data,
the same for every model), ratios and the two fairlearn summaries (demographic parity = the
selection-rate difference; equalized odds = the larger of the recall and FPR differences) are
counted but not repeated as sentences. The reference row is the one without undersampling when it is
significant, else the largest significant one; the other samplings of the same key say which
narrows the gap most and at what overall accuracy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.audit import ISSUE_RATES as LABEL_ISSUE_RATES
from pipeline.classify import FINDINGS_TABLE as FINDINGS
from pipeline.classify import METRICS_TABLE as METRICS
from pipeline.classify import SEP, read_settings
from pipeline.explain import VALUES, values_schema
from pipeline.report._context import Context, h, note, require, table_html
from pipeline.report._quality import label_noise_findings

TITLE = "Findings"
MANIFEST = "manifest"
MAX_FINDINGS = 8  # sentences about surviving gaps
MAX_NOT_SURVIVING = 5  # large-looking gaps that do not survive
SHAP_FEATURES = 3  # features named per finding
RATES = ("selection_rate", "recall", "fpr")  # shown as percentages
MODEL_WORDS = {"random_forest": "random forest", "logistic_regression": "logistic regression",
               "hist_gradient_boosting": "gradient-boosted trees"}
METRIC_WORDS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy",
                "precision": "precision", "f1": "F1", "roc_auc": "ROC AUC",
                "selection_rate": "selection rate", "recall": "recall (TPR)",
                "fpr": "false-positive rate"}
CORRECTION_WORDS = {"bh": "Benjamini–Hochberg", "holm": "Holm"}


def build(ctx: Context) -> list[str]:
    f = ctx.table(FINDINGS)
    if f is None:
        return [ctx.missing(FINDINGS)]
    require(f, ("model", "sampling", "trained_on", "group_by", "metric", "value", "ci_low",
                "ci_high", "high_group", "low_group", "p_value", "p_adjusted", "significant",
                "correction", "alpha", "permutations", "too_small"), FINDINGS)
    m = ctx.table(METRICS)
    if m is None:
        return [ctx.missing(METRICS)]
    require(m, ("model", "sampling", "trained_on", "evaluated_on", "group_by", "group", "metric",
                "value", "ci_low", "ci_high", "n"), METRICS)
    writer = _Writer(ctx, f, m)
    out = [writer.summary(), ctx.part("Disparities that survive correction", writer.surviving)]
    if ctx.table(LABEL_ISSUE_RATES) is not None:
        out.append(ctx.part("Label-noise disparities (data audit)", lambda: _label_noise(ctx)))
    return out + [ctx.part("Large-looking gaps that do not survive", writer.not_surviving)]


def _label_noise(ctx: Context) -> list[str]:
    """The audit's significant differences in suspected label errors between groups: a model
    audited against labels that are wrong more often in one group measures the labels too."""
    sentences = label_noise_findings(ctx)
    if not sentences:
        return [note("The audit found no significant difference in suspected label errors "
                     "between groups (see Data quality).")]
    return ["<ul>" + "".join(f"<li>{h(s)}</li>" for s in sentences) + "</ul>"]


# -- words ----------------------------------------------------------------------------------------

def _part(name: str, value: str) -> str:
    if name == "cluster":
        return f"cluster {value}"
    if value == "True":
        return name
    if value == "False":
        return f"not-{name}"
    return f"{name} = {value}"


def group_words(group_by: str, group: str) -> str:
    """'cluster 0', 'Male faces', 'cluster 2 & not-Young faces' ..."""
    names, values = str(group_by).split(SEP), str(group).split(SEP)
    if len(names) != len(values):
        return f"{group_by} = {group}"
    words = " & ".join(_part(n, v) for n, v in zip(names, values))
    return words if names == ["cluster"] else f"{words} faces"


def _grouping_words(group_by: str) -> str:
    return " × ".join(str(group_by).split(SEP))


def _model_words(model: str, trained_on: str, sampling: str) -> str:
    name = MODEL_WORDS.get(model, model.replace("_", " "))
    how = "no undersampling" if sampling == "none" else f"undersampling by {sampling}"
    if trained_on == "global":
        return f"The global {name} ({how})"
    return f"The per-cluster {name} (each face scored by its own cluster's model; {how})"


def _num(v: float, rate: bool) -> str:
    return f"{100 * v:.0f} %" if rate else f"{v:.2f}"


def _ci(v: float, lo: float, hi: float, rate: bool) -> str:
    if pd.isna(v):
        return "–"
    if pd.isna(lo) or pd.isna(hi):
        return _num(v, rate)
    if rate:
        return f"{100 * v:.0f} % [{100 * lo:.0f}–{100 * hi:.0f}]"
    return f"{v:.2f} [{lo:.2f}–{hi:.2f}]"


def _p(v: float) -> str:
    return "–" if pd.isna(v) else (f"{v:.3f}" if v >= 0.001 else f"{v:.1e}")


def _base(metric: str) -> str:
    return metric.replace("_gap_difference", "").replace("_gap_ratio", "")


class _Writer:
    def __init__(self, ctx: Context, f: pd.DataFrame, m: pd.DataFrame):
        self.ctx, self.f, self.m = ctx, f, m
        self.run = ctx.recorded(read_settings, FINDINGS)  # what the findings were made with
        self.target = self.run.target
        per = m[~m["evaluated_on"].astype(str).str.startswith("gap:")]
        self.per = per.set_index(["model", "sampling", "trained_on", "group_by", "group",
                                  "metric"]).sort_index()
        self._shap: pd.DataFrame | None | bool = False  # False = not read yet
        first = f.iloc[0] if len(f) else None
        self.correction = CORRECTION_WORDS.get(first["correction"], first["correction"]) \
            if first is not None else "?"
        self.alpha = float(first["alpha"]) if first is not None else float("nan")

    # -- lookups
    def group(self, r, group: str, metric: str) -> tuple[float, float, float, int]:
        key = (r["model"], r["sampling"], r["trained_on"], r["group_by"], group, metric)
        if key not in self.per.index:
            return (np.nan, np.nan, np.nan, 0)
        x = self.per.loc[key]
        x = x.iloc[0] if isinstance(x, pd.DataFrame) else x
        return float(x["value"]), float(x["ci_low"]), float(x["ci_high"]), int(x["n"])

    def accuracy(self, model: str, sampling: str, trained_on: str) -> str:
        key = (model, sampling, trained_on, "overall", "all", "accuracy")
        if key not in self.per.index:
            return "–"
        x = self.per.loc[key]
        x = x.iloc[0] if isinstance(x, pd.DataFrame) else x
        return _ci(x["value"], x["ci_low"], x["ci_high"], False)

    # -- the parts
    def summary(self) -> str:
        f = self.f
        tested = f["p_value"].notna()
        sig = f["significant"].astype(bool)
        perms = self.run.permutations
        text = (f"Of {len(f):,} gap rows ({tested.sum():,} with a test), <b>{sig.sum():,}</b> "
                f"survive the {self.correction} correction at α = {self.alpha:g}. Each p-value "
                f"comes from {perms:,} random shuffles of the group labels on the test rows "
                f"(smallest possible p = {1 / (1 + perms):.1e}); [brackets] are "
                f"{self.run.ci_level:.0%} bootstrap intervals.")
        small = {}
        for gb, lst in zip(f["group_by"], f["too_small"]):
            if lst is not None and len(lst):
                small[gb] = list(lst)
        if small:
            listed = "; ".join(f"{h(_grouping_words(g))}: {h(', '.join(v[:4]))}"
                               + (f" and {len(v) - 4} more" if len(v) > 4 else "")
                               for g, v in sorted(small.items()))
            text += (f" Groups with fewer than {self.run.min_group_size} test rows "
                     f"were too small to score: {listed}.")
        return note(text)

    def _candidates(self, significant: bool) -> pd.DataFrame:
        f = self.f
        keep = (f["metric"].astype(str).str.endswith("_gap_difference")
                & ~f["metric"].astype(str).str.startswith("base_rate")
                & f["value"].notna() & (f["significant"].astype(bool) == significant))
        return f[keep]

    def surviving(self) -> list[str]:
        c = self._candidates(True)
        if c.empty:
            return [note(f"No disparity survives the {h(self.correction)} correction at "
                         f"α = {self.alpha:g}.")]
        key = ["model", "trained_on", "group_by", "metric"]
        refs = []
        for _, g in c.groupby(key, sort=False):
            none = g[g["sampling"] == "none"]
            refs.append(none.iloc[0] if len(none) else g.sort_values("value").iloc[-1])
        refs = sorted(refs, key=lambda r: -float(r["value"]))
        # the largest per grouping first, so that one grouping's variants do not fill the list
        firsts = list({r["group_by"]: r for r in reversed(refs)}.values())[::-1]
        firsts = sorted(firsts, key=lambda r: -float(r["value"]))[:MAX_FINDINGS]
        items = [f"<li>{self.sentence(r)}</li>" for r in firsts]
        more = len(refs) - len(firsts)
        out = [note("The largest surviving gap of each grouping, largest first."),
               f"<ol>{''.join(items)}</ol>"]
        if more > 0:
            out.append(f'<p class="small">{more} more surviving disparities (model × trained_on '
                       f"× grouping × metric) are in <code>{FINDINGS}</code> "
                       "(significant = true) and in the table below.</p>")
        t = self.f[self.f["significant"].astype(bool)].sort_values("value", ascending=False)
        t = t[["model", "sampling", "trained_on", "group_by", "metric", "value", "ci_low",
               "ci_high", "high_group", "low_group", "p_value", "p_adjusted"]]
        out += ["<details><summary>Every surviving gap row</summary>",
                table_html(t, max_rows=100), "</details>"]
        return out

    def sentence(self, r) -> str:
        base = _base(r["metric"])
        rate = base in RATES
        hi_g, lo_g = str(r["high_group"]), str(r["low_group"])
        hi, lo = self.group(r, hi_g, base), self.group(r, lo_g, base)
        g1, g2 = h(group_words(r["group_by"], hi_g)), h(group_words(r["group_by"], lo_g))
        who, t = h(_model_words(r["model"], r["trained_on"], r["sampling"])), h(self.target)
        a, b = _ci(*hi[:3], rate), _ci(*lo[:3], rate)
        if base == "selection_rate":
            br1, br2 = self.group(r, hi_g, "base_rate"), self.group(r, lo_g, "base_rate")
            s = (f"{who} labels {a} of {g1} {t} against {b} of {g2}, whose base rates are "
                 f"{_num(br1[0], True)} and {_num(br2[0], True)}")
        elif base == "recall":
            s = f"{who} recognises {a} of the {t} faces among {g1} against {b} among {g2}"
        elif base == "fpr":
            s = (f"{who} labels {a} of the not-{t} faces among {g1} {t}, against {b} among "
                 f"{g2}")
        else:
            s = f"{who} has {METRIC_WORDS.get(base, base)} {a} on {g1} against {b} on {g2}"
        gap = _ci(r["value"], r["ci_low"], r["ci_high"], rate)
        s += (f" (n = {hi[3]:,} and {lo[3]:,} faces; gap {gap}"
              f", p = {_p(r['p_value'])}, adjusted {_p(r['p_adjusted'])}).")
        return " ".join(x for x in (s, self.sampling_words(r), self.shap_words(r, hi_g, lo_g)) if x)

    def sampling_words(self, r) -> str:
        f = self.f
        same = f[(f["model"] == r["model"]) & (f["trained_on"] == r["trained_on"])
                 & (f["group_by"] == r["group_by"]) & (f["metric"] == r["metric"])
                 & (f["sampling"] != r["sampling"]) & f["value"].notna()]
        if same.empty:
            return ""
        rate = _base(r["metric"]) in RATES
        best = same.sort_values("value").iloc[0]
        if float(best["value"]) >= float(r["value"]):
            return (f"No undersampling strategy narrows it (the smallest, {h(best['sampling'])}, "
                    f"leaves {_ci(best['value'], best['ci_low'], best['ci_high'], rate)}).")
        still = "still significant" if bool(best["significant"]) else "no longer significant"
        return (f"Undersampling by {h(best['sampling'])} narrows it most, to "
                f"{_ci(best['value'], best['ci_low'], best['ci_high'], rate)} ({still}, adjusted "
                f"p = {_p(best['p_adjusted'])}), at overall accuracy "
                f"{self.accuracy(best['model'], best['sampling'], best['trained_on'])} against "
                f"{self.accuracy(r['model'], r['sampling'], r['trained_on'])}.")

    # -- SHAP
    def shap_table(self) -> tuple[pd.DataFrame, list[str]] | None:
        """shap/values with the manifest's columns beside it (prefixed ``m:``, since a feature
        may be named like an attribute) and the list of feature columns."""
        if self._shap is False:
            v = self.ctx.table(VALUES)
            self._shap = None
            if v is not None:
                base_cols = set(values_schema([]).names)
                feats = [c for c in v.columns if c not in base_cols]
                man = self.ctx.table(MANIFEST)
                if man is not None:
                    man = man.rename(columns={c: f"m:{c}" for c in man.columns if c != "image_id"})
                    v = v.merge(man, on="image_id", how="left")
                self._shap = (v, feats)
        return self._shap

    def shap_words(self, r, hi_g: str, lo_g: str) -> str:
        got = self.shap_table()
        if got is None:
            return ""
        v, feats = got
        names = str(r["group_by"]).split(SEP)
        if any(n != "cluster" and f"m:{n}" not in v.columns for n in names):
            return ""
        rows = v[v["model"] == r["model"]]
        rows = rows[(rows["trained_on"] == "global") if r["trained_on"] == "global"
                    else (rows["trained_on"] != "global")]
        if rows.empty:
            return ""
        sampling = r["sampling"] if (rows["sampling"] == r["sampling"]).any() else (
            "none" if (rows["sampling"] == "none").any() else rows["sampling"].iloc[0])
        rows = rows[rows["sampling"] == sampling]
        label = pd.Series([""] * len(rows), index=rows.index, dtype=object)
        ok = pd.Series(True, index=rows.index)
        for i, n in enumerate(names):
            col = rows["cluster"] if n == "cluster" else rows[f"m:{n}"]
            ok &= col.notna()
            is_cluster = n == "cluster"
            part = col.map(lambda x, c=is_cluster: str(int(x)) if c and pd.notna(x) else str(x))
            label = label + (SEP if i else "") + part
        rows, label = rows[ok], label[ok]
        a, b = rows[label == hi_g], rows[label == lo_g]
        if a.empty or b.empty:
            return ""
        ma, mb = a[feats].abs().mean(), b[feats].abs().mean()
        diff = (ma - mb).abs().dropna().sort_values(ascending=False).head(SHAP_FEATURES)
        if diff.empty:
            return ""
        unit = str(rows["output"].iloc[0]).replace("_", "-")
        listed = ", ".join(f"{h(x)} ({ma[x]:.3f} vs {mb[x]:.3f})" for x in diff.index)
        return (f"The features whose mean |SHAP| ({unit}; sampling {h(sampling)}, {len(a):,} and "
                f"{len(b):,} explained faces) differs most between the two groups: {listed}.")

    def not_surviving(self) -> list[str]:
        c = self._candidates(False)
        c = c[c["p_value"].notna()].sort_values("value", ascending=False).head(MAX_NOT_SURVIVING)
        if c.empty:
            return [note("Every tested gap survives the correction.")]
        items = []
        for _, r in c.iterrows():
            rate = _base(r["metric"]) in RATES
            hi, lo = self.group(r, str(r["high_group"]), _base(r["metric"])), \
                self.group(r, str(r["low_group"]), _base(r["metric"]))
            items.append(
                f"<li>{h(_model_words(r['model'], r['trained_on'], r['sampling']))}: "
                f"{h(METRIC_WORDS.get(_base(r['metric']), r['metric']))} {_num(hi[0], rate)} on "
                f"{h(group_words(r['group_by'], r['high_group']))} (n = {hi[3]:,}) against "
                f"{_num(lo[0], rate)} on {h(group_words(r['group_by'], r['low_group']))} "
                f"(n = {lo[3]:,}): gap {_ci(r['value'], r['ci_low'], r['ci_high'], rate)}, "
                f"p = {_p(r['p_value'])}, adjusted {_p(r['p_adjusted'])}.</li>")
        return [f"<ul>{''.join(items)}</ul>"]
