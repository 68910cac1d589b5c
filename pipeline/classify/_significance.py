"""Which gaps would survive a second sample: a permutation test for every gap row, a
multiple-comparison correction across all gap rows of a run, and the intersectional groupings.

Test (per model × sampling × trained_on × grouping, one Ray task per evaluation): the null
hypothesis is that group membership is exchangeable with the test rows' (truth, decision,
score) triples, i.e. the model treats the groups alike. The group labels of the grouping's test
rows are shuffled ``classify.permutations`` times (``Generator.permuted`` on a
``permutations × n`` matrix, seeded from ``run.seed`` and the grouping's name, so every model
of a grouping sees the same shuffles) and each gap statistic is recomputed on every shuffle at
once: per-group confusion counts are one ``np.bincount`` over (shuffle, group, cell), ROC AUC
one ``np.bincount`` over (shuffle, group, score level, class) or, when that has more bins than
~16 per row, midranks from one sort of (shuffle, group, score level) keys (both exact, tested
equal). The p-value of a gap is
``(1 + #shuffles at least as extreme) / (1 + #shuffles where the gap is defined)``: a
difference (``*_gap_difference``, ``demographic_parity_difference``,
``equalized_odds_difference``) is extreme when it is at least the observed one, a ratio
(``*_gap_ratio``, min / max) when it is at most the observed one. The smallest attainable
p-value is therefore ``1 / (1 + permutations)``.

The observed statistic is recomputed here from the same counts and must equal the ``value`` of
the metrics table's gap row (tests/test_significance.py holds it to that).

Correction (``classify.correction`` at ``classify.alpha``), over every gap row of the run with
a p-value: ``bh`` (Benjamini–Hochberg, false discovery rate; scipy's
``false_discovery_control``) or ``holm`` (Holm's step-down, family-wise error rate). Rows whose
gap is undefined (fewer than two groups with a value) have no p-value and are not counted.

Intersectional groupings (``classify.intersections``): ``cluster×<A>`` for each sensitive
attribute ``A`` and ``<A>×<B>`` for each pair, group labels ``"<a>×<b>"`` (e.g. ``"0×True"``).
A group with fewer than ``classify.min_group_size`` test rows is too small: its rows take no
part in that grouping (no metric rows, no gap) and the findings rows of the grouping list it in
``too_small`` as ``"<group> (n=<rows>)"``. Plain groupings are scored as they are.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
from scipy.stats import false_discovery_control

from pipeline.classify._evaluate import FAIRNESS_GAPS, METRICS

SEP = "×"  # joins the names of an intersectional grouping and the labels of its groups

# Gap rows of the metrics table, in evaluate()'s order.
GAP_METRICS: tuple[str, ...] = tuple(
    [f"{m}_gap_difference" for m in METRICS] + [f"{m}_gap_ratio" for m in METRICS]
    + list(FAIRNESS_GAPS))

FINDINGS_SCHEMA = pa.schema([
    pa.field("model", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("trained_on", pa.string(), nullable=False),  # "global" or "per_cluster"
    pa.field("group_by", pa.string(), nullable=False),  # cluster | <A> | cluster×<A> | <A>×<B>
    pa.field("metric", pa.string(), nullable=False),  # a gap metric, as in classifiers/metrics
    pa.field("value", pa.float64()),  # the gap (equals the metrics row); null = undefined
    pa.field("ci_low", pa.float64()),  # the metrics row's bootstrap interval
    pa.field("ci_high", pa.float64()),
    pa.field("n", pa.int64(), nullable=False),  # test rows of the grouping's scored groups
    pa.field("n_groups", pa.int32(), nullable=False),  # groups scored
    pa.field("high_group", pa.string()),  # group with the largest underlying metric
    pa.field("high_value", pa.float64()),  # its metric value (e.g. its selection rate)
    pa.field("low_group", pa.string()),  # group with the smallest underlying metric
    pa.field("low_value", pa.float64()),
    pa.field("p_value", pa.float64()),  # permutation p-value; null = gap undefined
    pa.field("permutations", pa.int64(), nullable=False),  # shuffles where the gap was defined
    pa.field("p_adjusted", pa.float64()),  # after the correction over all gap rows of the run
    pa.field("significant", pa.bool_(), nullable=False),  # p_adjusted <= alpha
    pa.field("correction", pa.string(), nullable=False),  # bh | holm
    pa.field("alpha", pa.float64(), nullable=False),
    pa.field("too_small", pa.list_(pa.string()), nullable=False),  # "<group> (n=<rows>)"
])


# -- intersectional groupings -------------------------------------------------------------------

def intersections(groupings: dict[str, np.ndarray], min_size: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """``cluster×A`` for each sensitive A and ``A×B`` for each pair of sensitive attributes.

    ``groupings`` maps a name to each row's label (None = no value); ``"cluster"`` (when present)
    pairs with every other name, and the other names pair with each other. Returns the new
    groupings (labels ``"a×b"``, None where either part is None or the group is too small) and,
    per new grouping, its too-small groups as ``"a×b (n=k)"``.
    """
    names = [g for g in groupings if g != "cluster"]
    pairs = [("cluster", a) for a in names if "cluster" in groupings]
    pairs += list(itertools.combinations(names, 2))
    out: dict[str, np.ndarray] = {}
    small: dict[str, list[str]] = {}
    for a, b in pairs:
        la, lb = np.asarray(groupings[a], dtype=object), np.asarray(groupings[b], dtype=object)
        ok = np.asarray((la != None) & (lb != None), dtype=bool)  # noqa: E711 (elementwise)
        lab = np.full(len(la), None, dtype=object)
        lab[ok] = np.char.add(np.char.add(la[ok].astype(str), SEP), lb[ok].astype(str))
        values, counts = np.unique(lab[ok].astype(str), return_counts=True)
        tiny = values[counts < min_size]
        lab[np.isin(lab.astype(str), tiny) & ok] = None
        name = f"{a}{SEP}{b}"
        out[name] = lab
        small[name] = [f"{v} (n={c})" for v, c in zip(values, counts) if c < min_size]
    return out, small


# -- the permutation test -----------------------------------------------------------------------

def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _rates(c: np.ndarray) -> dict[str, np.ndarray]:
    """Every count-based metric from confusion counts ``c`` (... × 4: tn, fp, fn, tp)."""
    tn, fp, fn, tp = (c[..., k].astype(np.float64) for k in range(4))
    tot = tn + fp + fn + tp
    tpr, tnr = _div(tp, tp + fn), _div(tn, tn + fp)
    present = (~np.isnan(tpr)).astype(float) + (~np.isnan(tnr)).astype(float)
    return {"accuracy": _div(tp + tn, tot),
            "balanced_accuracy": _div(np.nan_to_num(tpr) + np.nan_to_num(tnr), present),
            "precision": _div(tp, tp + fp), "recall": tpr, "fpr": _div(fp, fp + tn),
            "f1": _div(2 * tp, 2 * tp + fp + fn), "selection_rate": _div(tp + fp, tot),
            "base_rate": _div(tp + fn, tot)}


def _auc(codes: np.ndarray, y: np.ndarray, level: np.ndarray, n_groups: int,
         n_levels: int) -> np.ndarray:
    """ROC AUC per (shuffle, group) from group codes ``codes`` (shuffles × n), ties half."""
    p = codes.shape[0]
    idx = ((np.arange(p)[:, None] * n_groups + codes) * n_levels + level[None, :]) * 2 + y[None, :]
    h = np.bincount(idx.ravel(), minlength=p * n_groups * n_levels * 2)
    h = h.reshape(p, n_groups, n_levels, 2)
    neg, pos = h[..., 0], h[..., 1]
    below = np.cumsum(neg, axis=2) - neg  # negatives strictly below each score level
    # twice the Mann-Whitney count in integers (ties count half): no float copy of the bins
    num2 = np.einsum("pgl,pgl->pg", pos, 2 * below + neg)
    return _div(num2 / 2.0, (pos.sum(2) * neg.sum(2)).astype(np.float64))


def _auc_by_ranks(codes: np.ndarray, y: np.ndarray, level: np.ndarray, n_groups: int,
                  n_levels: int) -> np.ndarray:
    """The same AUC from midranks within each (shuffle, group): one flat sort of keys
    ``(shuffle, group, score level)``; costs ~n log n per shuffle whatever the group count."""
    p, n = codes.shape
    start_key = (np.arange(p, dtype=np.int64)[:, None] * (n_groups * n_levels)
                 + codes.astype(np.int64) * n_levels)
    key = (start_key + level[None, :]).ravel()
    flat = np.sort(key)
    below = np.searchsorted(flat, key, "left")
    upto = np.searchsorted(flat, key, "right")
    start = np.searchsorted(flat, start_key.ravel(), "left")
    midrank = (below - start) + (upto - below + 1) / 2.0  # 1-based, ties share their mean rank
    idx = (np.arange(p)[:, None] * n_groups + codes).ravel()
    pos = np.broadcast_to(y, (p, n)).ravel().astype(np.float64)
    m = p * n_groups
    rank_sum = np.bincount(idx, weights=midrank * pos, minlength=m)
    n_pos = np.bincount(idx, weights=pos, minlength=m)
    n_all = np.bincount(idx, minlength=m)
    u = rank_sum - n_pos * (n_pos + 1) / 2  # Mann-Whitney U of the positives
    return _div(u, n_pos * (n_all - n_pos)).reshape(p, n_groups)


def _spread(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """max − min and min / max over groups (last axis) where at least two groups have a value;
    plus the argmax and argmin (−1 where undefined)."""
    finite = np.isfinite(v)
    ok = finite.sum(-1) >= 2
    hi = np.where(finite, v, -np.inf).max(-1)
    lo = np.where(finite, v, np.inf).min(-1)
    diff = np.where(ok, hi - lo, np.nan)
    ratio = np.where(ok, _div(lo, hi), np.nan)
    ahi = np.where(ok, np.where(finite, v, -np.inf).argmax(-1), -1)
    alo = np.where(ok, np.where(finite, v, np.inf).argmin(-1), -1)
    return diff, ratio, ahi, alo


def gap_statistics(codes: np.ndarray, y: np.ndarray, label: np.ndarray, level: np.ndarray,
                   n_groups: int, n_levels: int) -> tuple[dict[str, np.ndarray], dict]:
    """Every gap of :data:`GAP_METRICS` for each row of ``codes`` (shuffles × n group codes).

    Returns ({gap metric: values per shuffle}, {gap metric: (per-group values, argmax, argmin)}
    of the underlying metric, used for the first row, the observed labelling)."""
    p = codes.shape[0]
    cell = 2 * y.astype(np.int64) + label.astype(np.int64)  # 0 tn, 1 fp, 2 fn, 3 tp
    idx = (np.arange(p)[:, None] * n_groups + codes) * 4 + cell[None, :]
    c = np.bincount(idx.ravel(), minlength=p * n_groups * 4).reshape(p, n_groups, 4)
    per = _rates(c)
    # histogram bins cost 2·groups·levels per shuffle, the rank sort ~n log n: take the cheaper
    auc = _auc if 2 * n_groups * n_levels <= 16 * codes.shape[1] else _auc_by_ranks
    per["roc_auc"] = auc(codes, y.astype(np.int64), level, n_groups, n_levels)
    stats: dict[str, np.ndarray] = {}
    where: dict[str, tuple] = {}
    for m in METRICS:
        d, r, ahi, alo = _spread(per[m])
        stats[f"{m}_gap_difference"], stats[f"{m}_gap_ratio"] = d, r
        where[f"{m}_gap_difference"] = where[f"{m}_gap_ratio"] = (per[m], ahi, alo)
    stats["demographic_parity_difference"] = stats["selection_rate_gap_difference"]
    where["demographic_parity_difference"] = where["selection_rate_gap_difference"]
    tpr, fpr = stats["recall_gap_difference"], stats["fpr_gap_difference"]
    stats["equalized_odds_difference"] = np.fmax(tpr, fpr)
    # the pair behind equalized odds is the pair of whichever rate differs more
    use_fpr = np.nan_to_num(fpr, nan=-1) > np.nan_to_num(tpr, nan=-1)
    where["equalized_odds_difference"] = tuple(
        np.where(use_fpr[..., None] if k == 0 else use_fpr, a, b)
        for k, (a, b) in enumerate(zip(where["fpr_gap_difference"],
                                       where["recall_gap_difference"])))
    return stats, where


def permutation_test(y: np.ndarray, label: np.ndarray, score: np.ndarray, groups: np.ndarray,
                     permutations: int, rng: np.random.Generator,
                     max_cells: int = 4_000_000) -> list[dict]:
    """Observed gap, its groups and its permutation p-value for every gap metric of one grouping.

    ``groups`` holds each row's label (None = not in the grouping). Shuffles are drawn in
    blocks so that no temporary exceeds ``max_cells`` entries. Returns one dict per
    :data:`GAP_METRICS` entry: metric, value, n, n_groups, high_group, high_value, low_group,
    low_value, p_value, permutations.
    """
    groups = np.asarray(groups, dtype=object)
    mask = np.asarray(groups != None, dtype=bool)  # noqa: E711 (elementwise)
    y = np.asarray(y).astype(bool)[mask]
    label = np.asarray(label).astype(bool)[mask]
    score = np.asarray(score, dtype=np.float64)[mask]
    names, codes = np.unique(groups[mask].astype(str), return_inverse=True)
    n, g = len(codes), len(names)
    if g < 2:  # no gap to test (evaluate() writes it as undefined)
        return [{"metric": m, "value": float("nan"), "n": int(n), "n_groups": int(g),
                 "high_group": None, "high_value": float("nan"), "low_group": None,
                 "low_value": float("nan"), "p_value": float("nan"), "permutations": 0}
                for m in GAP_METRICS]
    levels, level = np.unique(score, return_inverse=True)
    nl = len(levels)
    obs, where = gap_statistics(codes[None, :], y, label, level, g, nl)
    extreme = {m: 0 for m in GAP_METRICS}
    defined = {m: 0 for m in GAP_METRICS}
    block = max(1, int(max_cells // (n + 2 * g * nl)))  # entries per shuffle: codes, AUC bins
    done = 0
    while done < permutations:
        b = min(block, permutations - done)
        shuffled = rng.permuted(np.broadcast_to(codes, (b, n)), axis=1)
        stats, _ = gap_statistics(shuffled, y, label, level, g, nl)
        for m in GAP_METRICS:
            o, s = obs[m][0], stats[m]
            ok = np.isfinite(s)
            defined[m] += int(ok.sum())
            if not np.isfinite(o):
                continue
            tol = 1e-9 * max(1.0, abs(o))
            hit = (s <= o + tol) if m.endswith("_gap_ratio") else (s >= o - tol)
            extreme[m] += int((hit & ok).sum())
        done += b
    rows = []
    for m in GAP_METRICS:
        o = float(obs[m][0])
        vals, ahi, alo = where[m]
        hi, lo = int(ahi[0]), int(alo[0])
        p = ((1 + extreme[m]) / (1 + defined[m])
             if np.isfinite(o) and permutations > 0 and defined[m] > 0 else float("nan"))
        rows.append({"metric": m, "value": o, "n": int(n), "n_groups": int(g),
                     "high_group": str(names[hi]) if hi >= 0 else None,
                     "high_value": float(vals[0, hi]) if hi >= 0 else float("nan"),
                     "low_group": str(names[lo]) if lo >= 0 else None,
                     "low_value": float(vals[0, lo]) if lo >= 0 else float("nan"),
                     "p_value": float(p), "permutations": int(defined[m])})
    return rows


def permutation_tests(y: np.ndarray, label: np.ndarray, score: np.ndarray,
                   groupings: dict[str, np.ndarray], permutations: int,
                   seeds: dict[str, int]) -> list[dict]:
    """:func:`permutation_test` for every grouping (``seeds``: one seed per grouping name)."""
    rows = []
    for group_by, groups in groupings.items():
        rng = np.random.default_rng(seeds[group_by])
        rows += [{"group_by": group_by, **r}
                 for r in permutation_test(y, label, score, groups, permutations, rng)]
    return rows


# -- the correction -----------------------------------------------------------------------------

def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate), NaN kept as NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adj
    return out


def adjust(p: np.ndarray, method: str) -> np.ndarray:
    """Adjusted p-values over every finite entry of ``p`` (``"bh"`` or ``"holm"``)."""
    p = np.asarray(p, dtype=np.float64)
    if method == "holm":
        return holm(p)
    if method != "bh":
        raise ValueError(f"classify.correction must be 'bh' or 'holm', got {method!r}")
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = false_discovery_control(p[ok], method="bh")
    return out
