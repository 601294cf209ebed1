"""Label-free rewards and filters against hand-computed values."""
import math

import pytest
import torch

from megatron_intuitor import algorithm as alg
from megatron_intuitor import label_free as lf

EPS = 1e-6


def test_plurality_vote_by_hand():
    # group "a": 4, 4, 5, None -> 4 wins; group "b": 7, 9 tie -> 7 (seen first); group "c": none
    answers = ["4", "7", "4", "9", "5", None, None, None]
    groups = ["a", "b", "a", "b", "a", "a", "c", "c"]
    assert lf.plurality_vote_rewards(answers, groups).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]


def test_self_certainty_plus_vote_is_the_weighted_sum_of_both_z_scores():
    groups = [0, 0, 0]
    certainty = torch.tensor([1.0, 2.0, 3.0])  # mean 2, unbiased std 1
    vote = lf.plurality_vote_rewards(["8", "8", "6"], groups)  # [1, 1, 0]: mean 2/3
    adv = alg.hybrid_advantages({"self_certainty": certainty, "vote": vote},
                                {"self_certainty": 1.0, "vote": 0.5}, groups, eps=EPS)
    vote_std = math.sqrt(((1 / 3) ** 2 * 2 + (2 / 3) ** 2) / 2)  # sqrt(1/3)
    expected = [-1 / (1 + EPS) + 0.5 * (1 / 3) / (vote_std + EPS),
                0.0 + 0.5 * (1 / 3) / (vote_std + EPS),
                1 / (1 + EPS) - 0.5 * (2 / 3) / (vote_std + EPS)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_answer_entropy_by_hand():
    # group 0: 4, 4, 5, 5 -> ln 2; group 1: 3, 3, 3, 3 -> 0; group 2: 1, None, None, 1 ->
    # {1: 2, None: 1, None: 1} -> -(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2
    answers = ["4", "3", "1", "4", "3", None, "5", "3", None, "5", "3", "1"]
    groups = [0, 1, 2] * 4
    assert lf.answer_entropy(answers, groups).tolist() == pytest.approx(
        [math.log(2), 0.0, 1.5 * math.log(2)])


def test_entropy_band_drops_groups_outside_it():
    entropy = torch.tensor([math.log(2), 0.0, 1.5 * math.log(2)], dtype=torch.float64)
    keep = lf.entropy_band_keep(entropy, 0.1, 1.0)
    assert keep.tolist() == [True, False, False]
    advantages = torch.tensor([0.5, -1.0, 2.0, -0.5, 1.0, -2.0])
    dropped = lf.drop_groups(advantages, [0, 1, 2, 0, 1, 2], keep)
    assert dropped.tolist() == [0.5, 0.0, 0.0, -0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="expected 0 <= low <= high"):
        lf.entropy_band_keep(entropy, 1.0, 0.5)
    with pytest.raises(ValueError, match="keep has 2 entries for 3 groups"):
        lf.drop_groups(advantages, [0, 1, 2, 0, 1, 2], keep[:2])


def test_random_rewards_are_seeded_standard_normal():
    first = lf.random_rewards(4000, seed=3)
    assert torch.equal(first, lf.random_rewards(4000, seed=3))
    assert not torch.equal(first, lf.random_rewards(4000, seed=4))
    # mean 0 and variance 1 within 4 standard errors of 4000 draws
    assert abs(first.mean().item()) < 4 / math.sqrt(4000)
    assert abs(first.var().item() - 1) < 4 * math.sqrt(2 / 4000)
    # the same normalisation as any reward: z-scored within each group
    adv = alg.grpo_advantages(first[:8], [0, 0, 0, 0, 1, 1, 1, 1])
    assert adv[:4].mean().item() == pytest.approx(0, abs=1e-6)


def test_entropy_band_filter_zeroes_and_counts_groups_outside():
    # group 0: answers 4, 4 (entropy 0, outside [0.5, 1]); group 1: 4, 5 (ln 2, inside)
    advantages = torch.tensor([0.7, -0.7, 0.3, -0.3])
    filtered, dropped = lf.entropy_band_filter(advantages, ["4", "4", "4", "5"], [0, 0, 1, 1],
                                               0.5, 1.0)
    assert filtered.tolist() == pytest.approx([0.0, 0.0, 0.3, -0.3]) and dropped == 1


def test_registered_estimators_intuitor_vote_and_random_by_hand():
    settings = type("Settings", (), {"name": "intuitor_vote", "vote_weight": 2.0})()
    certainty = torch.tensor([1.0, 3.0, 5.0, 7.0])  # groups [0, 0, 1, 1]
    # group 0: answers 2, 3 tie -> 2 wins: votes [1, 0]; group 1: 9, 9 -> votes [1, 1] (no spread)
    adv = alg.response_advantages(settings, certainty, None, [0, 0, 1, 1],
                                  answers=["2", "3", "9", "9"])
    z = 1.0 / (math.sqrt(2.0) + EPS)  # [1, 3]: mean 2, unbiased std sqrt(2)
    vote_z = 0.5 / (math.sqrt(0.5) + EPS)  # votes [1, 0]: gap 1
    assert adv.tolist() == pytest.approx([-z + 2 * vote_z, z - 2 * vote_z, -z, z], rel=1e-6)
    assert alg.advantage_estimator("intuitor_vote").needs_answers
    assert not alg.advantage_estimator("intuitor_vote").needs_verifiable
    settings.name = "random"
    drawn = alg.response_advantages(settings, certainty, None, [0, 0, 1, 1], seed=11)
    assert drawn.tolist() == pytest.approx(
        alg.grpo_advantages(lf.random_rewards(4, 11), [0, 0, 1, 1]).tolist())
    # the self-certainty plays no part: another one gives the same advantages
    assert torch.equal(drawn, alg.response_advantages(settings, -certainty, None, [0, 0, 1, 1],
                                                      seed=11))
