"""The selection report's statistics against hand-computed cases: picks, AUROC with ties, mixed
groups, within-prompt correlation, answer-token gap, the bootstrap, the decision rule."""
import math

import numpy as np
import pytest

from megatron_intuitor.evaluation import selection as sel
from megatron_intuitor.evaluation.selection import Response


def _r(score: float, correct: bool, answer="1", length: int = 10, gap=None) -> Response:
    parts = (None, None) if gap is None else (score + gap, score)
    return Response(score, length, answer, correct, *parts)


# prompt 0: mixed, the most certain is right; prompt 1: mixed, the most certain is wrong, the
# majority answer "7" is right; prompt 2: all wrong, two answer-less responses
GROUPS = [
    [_r(3.0, True, "4"), _r(1.0, False, "5"), _r(2.0, False, "5"), _r(2.0, True, "4")],
    [_r(1.0, True, "7"), _r(4.0, False, "8"), _r(1.0, True, "7"), _r(0.5, False, "9")],
    [_r(1.0, False, None), _r(2.0, False, "3"), _r(3.0, False, None), _r(0.0, False, "2")],
]


def test_picks_by_hand():
    assert sel.pick_accuracy(GROUPS, 4, "best")[0].tolist() == [1, 0, 0]
    # prompt 0: "4" and "5" tie at 2 votes, "4" is seen first
    assert sel.pick_accuracy(GROUPS, 4, "majority")[0].tolist() == [1, 1, 0]
    assert sel.pick_accuracy(GROUPS, 4, "mean")[0].tolist() == [0.5, 0.5, 0.0]
    assert sel.pick_accuracy(GROUPS, 4, "pass")[0].tolist() == [1, 1, 0]
    # the first 2 only: prompt 0 best is #0 (right), prompt 1 best is #1 (wrong)
    assert sel.pick_accuracy(GROUPS, 2, "best")[0].tolist() == [1, 0, 0]
    assert sel.pick_accuracy(GROUPS, 2, "mean")[0].tolist() == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="unknown pick 'first'"):
        sel.pick_accuracy(GROUPS, 2, "first")


def test_auroc_counts_pairs_within_prompts_and_ties_half():
    wins, pairs = sel.pairwise_wins(GROUPS, 4, lambda r: r.correct)
    # prompt 0: right {3, 2} vs wrong {1, 2}: 3>1, 3>2, 2>1, 2=2 -> 3.5 of 4
    # prompt 1: right {1, 1} vs wrong {4, 0.5}: each right beats 0.5 only -> 2 of 4
    # prompt 2: no right response, no pair
    assert wins.tolist() == [3.5, 2.0, 0.0] and pairs.tolist() == [4, 4, 0]
    assert sel.ratio((wins, pairs)) == pytest.approx(5.5 / 8)
    # answer-less (prompt 2: {1, 3}) vs answered ({2, 0}): 1>0, 3>2, 3>0 -> 3 of 4
    wins, pairs = sel.pairwise_wins(GROUPS, 4, lambda r: r.answer is None)
    assert wins.tolist() == [0, 0, 3.0] and pairs.tolist() == [0, 0, 4]


def test_auroc_equals_sklearn_style_rank_formula_on_one_group():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=12).round(1)  # rounding makes ties
    labels = rng.random(12) < 0.5
    group = [_r(float(s), bool(c)) for s, c in zip(scores, labels)]
    wins, pairs = sel.pairwise_wins([group], 12, lambda r: r.correct)
    # Mann-Whitney U from average ranks
    order = scores.argsort()
    ranks = np.empty(12)
    ranks[order] = np.arange(1, 13)
    for value in np.unique(scores):
        ranks[scores == value] = ranks[scores == value].mean()
    positives = labels.sum()
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    assert wins[0] == pytest.approx(u) and pairs[0] == positives * (12 - positives)


def test_mixed_share_and_within_prompt_correlation():
    assert sel.mixed_share(GROUPS, 4)[0].tolist() == [1, 1, 0]
    groups = [[_r(1.0, True, length=10), _r(3.0, True, length=30)],
              [_r(10.0, True, length=50), _r(8.0, True, length=30)]]
    # centred: scores (-1, 1, 1, -1), lengths (-10, 10, 10, -10): perfectly correlated within
    # prompts, although across prompts the longer group is not the more certain one
    assert sel.within_prompt_correlation(groups, 2, lambda r: r.length) == pytest.approx(1.0)
    flat = [[_r(1.0, True, length=10), _r(1.0, True, length=30)]]
    assert math.isnan(sel.within_prompt_correlation(flat, 2, lambda r: r.length))


def test_answer_minus_rest_skips_responses_without_parts():
    groups = [[_r(1.0, True, gap=0.5), _r(1.0, True)], [_r(2.0, False, gap=-1.5)]]
    sums, counts = sel.answer_minus_rest(groups, 2)
    assert sums.tolist() == [0.5, -1.5] and counts.tolist() == [1, 1]
    assert sel.ratio((sums, counts)) == pytest.approx(-0.5)


def test_bootstrap_interval_against_a_direct_resampling_loop():
    numerators = np.array([1.0, 0.0, 3.0, 2.0, 0.0])
    denominators = np.array([2.0, 1.0, 4.0, 2.0, 0.0])
    low, high = sel.bootstrap_interval((numerators, denominators), resamples=500, seed=7)
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 5, size=(500, 5))
    ratios = [numerators[d].sum() / denominators[d].sum() for d in draws
              if denominators[d].sum() > 0]
    assert (low, high) == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])))
    # one repeated value: no spread
    assert sel.bootstrap_interval((np.ones(4), np.ones(4))) == (1.0, 1.0)


def test_report_and_decision_by_hand():
    result = sel.report(GROUPS, [True, False, False], ns=(2, 4), resamples=200)
    assert result["prompts"] == 3 and result["greedy"] == pytest.approx(1 / 3)
    assert result["best@4"] == pytest.approx(1 / 3) and result["mean@4"] == pytest.approx(1 / 3)
    assert result["maj@4"] == pytest.approx(2 / 3) and result["pass@4"] == pytest.approx(2 / 3)
    assert result["best_minus_mean@4"] == pytest.approx(0.0)
    assert result["auroc@4"] == pytest.approx(5.5 / 8) and result["auroc_pairs@4"] == 8
    assert result["answerless_auroc@4"] == pytest.approx(0.75)
    assert result["answerless_share@4"] == pytest.approx(2 / 12)
    assert result["mixed@4"] == pytest.approx(2 / 3)
    assert result["auroc@4_low"] <= result["auroc@4"] <= result["auroc@4_high"]
    verdict = sel.decision(result, 4)
    assert verdict == {"best_minus_mean": False, "auroc": False,
                       "no_answerless_preference": False, "passes": False}
    good = {"best_minus_mean@8": 0.06, "best_minus_mean@8_low": 0.01, "auroc@8": 0.61,
            "auroc@8_low": 0.55, "answerless_auroc@8_low": 0.4}
    assert sel.decision(good) == {"best_minus_mean": True, "auroc": True,
                                  "no_answerless_preference": True, "passes": True}
    # nothing truncated: the AUROC among finished responses is the AUROC
    assert result["auroc_finished@4"] == result["auroc@4"] and result["truncated_share@4"] == 0
    with pytest.raises(ValueError, match=r"prompts \[0, 1, 2\]: fewer than 8 responses"):
        sel.report(GROUPS, [True, False, False], ns=(8,))


def test_responses_from_rows_keeps_complete_prompts_in_order():
    def row(prompt, sample, correct, score=1.0):
        return {"prompt": prompt, "sample": sample, "correct": correct, "self_certainty": score,
                "length": 5, "answer": "1", "answer_self_certainty": None,
                "rest_self_certainty": None}

    rows = [row(1, "greedy", True), row(1, 1, False, 2.0), row(1, 0, True, 3.0),
            row(0, "greedy", False), row(0, 0, False), row(0, 1, True),
            row(2, "greedy", True), row(2, 0, True)]  # prompt 2 cut short: one sample of two
    groups, greedy = sel.responses_from_rows(rows, 2)
    assert greedy == [False, True]
    assert [[r.correct for r in g] for g in groups] == [[False, True], [True, False]]
    assert [r.self_certainty for r in groups[1]] == [3.0, 2.0]  # by sample number


def test_auroc_among_finished_responses_leaves_the_truncated_out():
    # right {3 (finished), 2 (truncated)} vs wrong {1 (truncated), 2.5 (finished)}: among the
    # finished only 3 > 2.5 -> 1 of 1 pair; with all, 3>1, 3>2.5, 2>1, 2<2.5 -> 3 of 4
    group = [Response(3.0, 5, "4", True), Response(2.0, 9, "4", True, truncated=True),
             Response(1.0, 9, "5", False, truncated=True), Response(2.5, 5, "5", False)]
    result = sel.report([group], [True], ns=(4,), resamples=50)
    assert result["auroc@4"] == pytest.approx(0.75) and result["auroc_finished@4"] == 1.0
    assert result["truncated_share@4"] == 0.5
