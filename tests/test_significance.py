"""Significance of the gap rows: the permutation test recomputes evaluate()'s gaps exactly, finds
a planted disparity, keeps its false-positive rate on null data, and the corrections are right."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.classify._evaluate import evaluate
from pipeline.classify._significance import (GAP_METRICS, SEP, adjust, holm, intersections,
                                             permutation_test, permutation_tests)
from pipeline.seeds import derive_seed


def _labels(rng, n, k):
    return np.array([str(v) for v in rng.integers(0, k, n)], dtype=object)


def _null_data(rng, n):
    """Truth, scores and decisions that no grouping below is related to."""
    y = rng.random(n) < 0.4
    score = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 2)  # ties on purpose
    return y, score, score >= 0.5


def test_observed_gaps_equal_the_metrics_rows():
    rng = np.random.default_rng(3)
    n = 240
    y, score, label = _null_data(rng, n)
    groups = _labels(rng, n, 3)
    groups[:7] = None  # rows without a value take no part in the grouping
    rows = evaluate(y, score, label, {"g": groups}, np.zeros((n, 0), np.int32), 0.95)
    gaps = {r["metric"]: r["value"] for r in rows if r["evaluated_on"] == "gap:g"}
    assert set(gaps) == set(GAP_METRICS)
    per = {(r["group"], r["metric"]): r["value"] for r in rows if r["group_by"] == "g"}
    tested = permutation_test(y, label, score, groups, 50, np.random.default_rng(0))
    for t in tested:
        assert t["value"] == pytest.approx(gaps[t["metric"]], nan_ok=True), t["metric"]
        assert t["n"] == n - 7 and t["n_groups"] == 3 and 0 < t["p_value"] <= 1
        base = t["metric"].replace("_gap_difference", "").replace("_gap_ratio", "")
        if base in ("accuracy", "roc_auc", "selection_rate"):  # the pair behind the gap
            assert t["high_value"] == pytest.approx(per[(t["high_group"], base)])
            assert t["low_value"] == pytest.approx(per[(t["low_group"], base)])


def test_same_seed_same_p_values_and_different_seed_differs():
    rng = np.random.default_rng(4)
    y, score, label = _null_data(rng, 150)
    g = {"a": _labels(rng, 150, 2)}
    one = permutation_tests(y, label, score, g, 300, {"a": derive_seed(0, "x")})
    two = permutation_tests(y, label, score, g, 300, {"a": derive_seed(0, "x")})
    other = permutation_tests(y, label, score, g, 300, {"a": derive_seed(1, "x")})
    assert [r["p_value"] for r in one] == [r["p_value"] for r in two]
    assert [r["p_value"] for r in one] != [r["p_value"] for r in other]


def test_planted_disparity_is_found_and_null_groupings_are_not():
    """Decisions are wrong for 30 % of group B's rows and 5 % of group A's: the accuracy gap
    between A and B survives the correction; two unrelated groupings give nothing."""
    rng = np.random.default_rng(7)
    n = 400
    planted = np.where(rng.random(n) < 0.5, "A", "B").astype(object)
    y = rng.random(n) < 0.5
    wrong = rng.random(n) < np.where(planted == "B", 0.30, 0.05)
    label = y ^ wrong
    score = np.clip(np.where(label, 0.75, 0.25) + rng.normal(0, 0.1, n), 0, 1)
    groupings = {"planted": planted, "noise2": _labels(rng, n, 2), "noise3": _labels(rng, n, 3)}
    seeds = {g: derive_seed(0, "classify", "permutation", g) for g in groupings}
    rows = permutation_tests(y, label, score, groupings, 999, seeds)
    adj = adjust(np.array([r["p_value"] for r in rows]), "bh")
    sig = {(r["group_by"], r["metric"]) for r, a in zip(rows, adj) if a <= 0.05}
    acc = next(r for r in rows if (r["group_by"], r["metric"]) ==
               ("planted", "accuracy_gap_difference"))
    assert acc["high_group"] == "A" and acc["low_group"] == "B" and acc["value"] > 0.15
    assert ("planted", "accuracy_gap_difference") in sig
    assert ("planted", "accuracy_gap_ratio") in sig
    assert ("planted", "equalized_odds_difference") in sig
    assert not {s for s in sig if s[0] != "planted"}, sig


@pytest.mark.slow  # ~10-30 s: 200 null runs × 2 groupings × 999 shuffles
def test_null_control_keeps_the_share_of_runs_with_a_finding_within_alpha():
    """200 runs (seeds 0..199) on data where no grouping matters, 40 gap rows each, corrected
    within the run. Benjamini–Hochberg under the global null and Holm both bound the chance of
    any significant row by alpha = 0.05; the tolerance is three binomial standard errors for 200
    runs (3 × sqrt(0.05 × 0.95 / 200) = 0.046). 999 shuffles make a single rejection possible
    (smallest p = 0.001 <= 0.05 / 40). Without correction the share must be far above alpha,
    which shows the test can tell the difference; and the uncorrected row-level rate must be
    near alpha (the p-values themselves are valid)."""
    alpha, runs, n = 0.05, 200, 200
    tol = 3 * np.sqrt(alpha * (1 - alpha) / runs)
    any_bh = any_holm = any_raw = 0
    raw_hits = raw_total = 0
    for seed in range(runs):
        rng = np.random.default_rng(derive_seed(seed, "null-control"))
        y, score, label = _null_data(rng, n)
        groupings = {"two": _labels(rng, n, 2), "three": _labels(rng, n, 3)}
        seeds = {g: derive_seed(seed, "classify", "permutation", g) for g in groupings}
        p = np.array([r["p_value"] for r in permutation_tests(y, label, score, groupings, 999,
                                                               seeds)])
        assert len(p) == 2 * len(GAP_METRICS)
        any_bh += bool((adjust(p, "bh") <= alpha).any())
        any_holm += bool((adjust(p, "holm") <= alpha).any())
        ok = np.isfinite(p)
        any_raw += bool((p[ok] <= alpha).any())
        raw_hits += int((p[ok] <= alpha).sum())
        raw_total += int(ok.sum())
    assert any_bh / runs <= alpha + tol, any_bh / runs
    assert any_holm / runs <= alpha + tol, any_holm / runs
    assert any_raw / runs > 0.3, any_raw / runs  # uncorrected: many runs "find" something
    assert abs(raw_hits / raw_total - alpha) < 0.02, raw_hits / raw_total


def test_holm_matches_the_step_down_by_hand_and_bh_keeps_nan():
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert np.allclose(holm(p)[:4], [0.03, 0.06, 0.06, 0.02]) and np.isnan(holm(p)[4])
    bh = adjust(p, "bh")
    # BH: 0.005*4/1 = 0.02, 0.01*4/2 = 0.02, 0.03*4/3 = 0.04, 0.04*4/4 = 0.04
    assert np.allclose(bh[:4], [0.02, 0.04, 0.04, 0.02]) and np.isnan(bh[4])
    with pytest.raises(ValueError, match="bh' or 'holm"):
        adjust(p, "bonferroni")


def test_intersections_pair_cluster_and_attributes_and_mark_small_groups():
    cluster = np.array(["0"] * 50 + ["1"] * 50, dtype=object)
    male = np.array(["True"] * 45 + ["False"] * 5 + ["True"] * 25 + ["False"] * 25, dtype=object)
    young = np.array(["True", "False"] * 50, dtype=object)
    young[0] = None
    out, small = intersections({"cluster": cluster, "Male": male, "Young": young}, 10)
    assert list(out) == [f"cluster{SEP}Male", f"cluster{SEP}Young", f"Male{SEP}Young"]
    cm = out[f"cluster{SEP}Male"]
    assert small[f"cluster{SEP}Male"] == [f"0{SEP}False (n=5)"]
    assert (cm[45:50] == None).all() and cm[0] == f"0{SEP}True"  # noqa: E711
    assert set(cm[cm != None]) == {f"0{SEP}True", f"1{SEP}True", f"1{SEP}False"}  # noqa: E711
    assert out[f"Male{SEP}Young"][0] is None  # a missing part leaves the row out
    assert small[f"cluster{SEP}Young"] == []


def test_both_permuted_auc_paths_agree_with_ties_and_missing_classes():
    from pipeline.classify._significance import _auc, _auc_by_ranks

    rng = np.random.default_rng(5)
    n, g = 300, 5
    y = (rng.random(n) < 0.3).astype(np.int64)
    levels, level = np.unique(np.round(rng.random(n), 1), return_inverse=True)  # many ties
    groups = rng.choice(g, n, p=[0.3, 0.3, 0.3, 0.09, 0.01])  # group 4: a row or three
    codes = rng.permuted(np.broadcast_to(groups, (40, n)), axis=1)
    a = _auc(codes, y, level, g, len(levels))
    b = _auc_by_ranks(codes, y, level, g, len(levels))
    assert np.allclose(a, b, equal_nan=True)
    assert np.isfinite(a).any() and np.isnan(a).any()  # undefined where a class is missing
