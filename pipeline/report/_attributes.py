"""Attribute model: test accuracy per attribute beside the majority baseline, and the training curve."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from pipeline import storage
from pipeline.report import _plots as P
from pipeline.report._context import (Context, ReportDataError, col, h, note, require,
                                      table_html)
# train owns these tables and the metrics table's mean row; imported, never re-declared
from pipeline.train import HISTORY, MEAN_ROW, METRICS, MODEL_DIR

TITLE = "Attribute model"


def build(ctx: Context) -> list[str]:
    out = [ctx.part("Model", lambda: _provenance(ctx) + _model_json(ctx))]
    m = ctx.table(METRICS)
    if m is None:
        out.append(ctx.missing(METRICS))
    else:
        out.append(ctx.part("Test accuracy per attribute", lambda: _accuracy(ctx, m)))
    hist = ctx.table(HISTORY)
    if hist is None:
        out.append(ctx.missing(HISTORY))
    else:
        out.append(ctx.part("Training curve", lambda: _history(ctx, hist)))
    return out


def _provenance(ctx: Context) -> list[str]:
    """Which model this run used and what it was trained on (trained here, or train.model_from)."""
    from pipeline.train import describe_training

    loc = ctx.root.join("models", "attributes", "model.json")
    if not storage.exists(loc):
        return []
    trained_on = json.loads(storage.read_bytes(loc)).get("trained_on") or {}
    rec = (ctx.run_doc.get("stages") or {}).get("train_attributes") or {}
    source = (rec.get("details") or {}).get("model_from")
    if source and rec.get("status") == "skipped":
        return [note(f"This run did not train its attribute model: it applied the model from "
                     f"<code>{h(source)}</code> (<code>train.model_from</code>), trained on "
                     f"{h(describe_training(trained_on))}. The accuracies below are that model's, "
                     f"measured on its own test split, not on this collection.")]
    return [note(f"Attribute model trained in this run on {h(describe_training(trained_on))}.")]


def _model_json(ctx: Context) -> list[str]:
    loc = ctx.root.join(*MODEL_DIR.split("/"), "model.json")
    if not storage.exists(loc):
        return [ctx.missing(MODEL_DIR, f"<code>{MODEL_DIR}/model.json</code>")]
    meta = json.loads(storage.read_bytes(loc))
    rows = [(k, v) for k, v in meta.items() if not isinstance(v, (list, dict))]
    attrs = meta.get("attributes")
    if isinstance(attrs, list):
        rows.append(("attributes", f"{len(attrs)} ({', '.join(map(str, attrs[:6]))}"
                     f"{' …' if len(attrs) > 6 else ''})"))
    return [table_html(pd.DataFrame(rows, columns=["key", "value"]))]


def _accuracy(ctx: Context, m: pd.DataFrame) -> list[str]:
    a, acc, base = "attribute", "accuracy", "majority_baseline"  # train.METRICS_SCHEMA's names
    require(m, (a, acc, base), METRICS)
    mean = m[m[a] == MEAN_ROW]
    per = m[m[a] != MEAN_ROW].copy()
    if per.empty:
        raise ReportDataError(f"{METRICS} has no per-attribute rows")
    per["gain"] = per[acc] - per[base]
    per = per.sort_values("gain")
    mean_acc = float(mean[acc].iloc[0]) if len(mean) else float(per[acc].mean())
    mean_base = float(mean[base].iloc[0]) if len(mean) else float(per[base].mean())
    bal = "balanced_accuracy"
    lead = (f"<p>Mean test accuracy over {len(per)} attributes: <b>{mean_acc:.2%}</b>, against a "
            f"majority-class baseline of <b>{mean_base:.2%}</b>")
    if len(mean):
        lead += f"; mean balanced accuracy <b>{float(mean[bal].iloc[0]):.2%}</b>"
    lead += (". CelebA's attributes are imbalanced, so accuracy is read against the baseline "
             "(what always answering the majority class would score).</p>")
    y = np.arange(len(per))
    fig, ax = P.plt.subplots(figsize=(7.5, 0.24 * len(per) + 1.3))
    ax.barh(y - 0.2, per[acc] * 100, height=0.4, color=P.OKABE_ITO[0], label="model")
    ax.barh(y + 0.2, per[base] * 100, height=0.4, color=P.OKABE_ITO[1], hatch="//",
            label="majority baseline")
    ax.set_yticks(y, labels=per[a])
    lo = max(0.0, min(per[acc].min(), per[base].min()) * 100 - 5)
    ax.set_xlim(lo, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.axvline(mean_acc * 100, color="black", lw=0.8, ls="--", label=f"mean {mean_acc:.1%}")
    ax.legend(loc="lower right")
    ax.set_title("Per-attribute test accuracy vs majority baseline (sorted by gain)")
    fig_html = ctx.figure(fig, "attributes-accuracy", "Test accuracy of the attribute model "
                          "per attribute (blue) beside the majority-class baseline (orange, "
                          "hatched); attributes sorted by gain over the baseline.")
    cols = [c for c in m.columns if c != a and pd.api.types.is_numeric_dtype(m[c])]
    tab = pd.concat([per.sort_values(a), mean])[[a, *cols]]
    return [lead, fig_html, "<details><summary>Metrics table</summary>",
            table_html(tab, max_rows=100), "</details>"]


def _history(ctx: Context, hist: pd.DataFrame) -> list[str]:
    ep = col(hist, "epoch", table=HISTORY)
    hist = hist.sort_values(ep)
    losses = [c for c in hist.columns if "loss" in c]
    accs = [c for c in hist.columns if "acc" in c]
    if not losses and not accs:
        raise ReportDataError(f"{HISTORY} has no loss or accuracy columns: {list(hist.columns)}")
    fig, axes = P.plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, cols, ylabel in ((axes[0], losses, "loss (BCE, mean over attributes)"),
                             (axes[1], accs, "accuracy (fraction)")):
        for i, c in enumerate(cols):
            ax.plot(hist[ep], hist[c], marker=P.marker(i), color=P.colour(i), label=c)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if cols:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", transform=ax.transAxes)
    fig.suptitle("Attribute model training")
    return [ctx.figure(fig, "attributes-history", "Training and validation loss (left) and "
                       "validation accuracy (right) per epoch."),
            table_html(hist, max_rows=50)]


