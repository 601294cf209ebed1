"""Algorithm functions against hand-computed values (expected numbers written from the formulas
with plain Python floats)."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from megatron_intuitor import algorithm as alg

EPS = 1e-6


def test_sequence_reward_is_masked_mean_of_self_certainty():
    sc = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rewards = alg.sequence_rewards_from_self_certainty(sc, mask)
    assert rewards.tolist() == pytest.approx([1.5, 4.0])
    assert not rewards.requires_grad  # a reward is a constant for the policy gradient


def test_each_algorithm_z_scores_its_own_reward():
    """Two prompts of two responses: intuitor z-scores the self-certainty, grpo the 0/1 answer
    reward, hybrid weighs the two z-scores (unbiased std, eps 1e-6)."""
    self_certainty = torch.tensor([1.0, 3.0, 2.0, 2.0])
    verifiable = torch.tensor([1.0, 0.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 1, 1])
    # (x - mean) / (std + eps): |x - mean| = 1, std = sqrt(2) for {1, 3}; 0.5 and sqrt(0.5)
    # for {1, 0}; {2, 2} has no spread and gives 0
    z_sc, z_v = 1 / (2 ** 0.5 + 1e-6), 0.5 / (0.5 ** 0.5 + 1e-6)
    expected = {"intuitor": [-z_sc, z_sc, 0.0, 0.0], "grpo": [z_v, -z_v, -z_v, z_v]}
    expected["hybrid"] = [0.25 * a + 0.75 * b for a, b in zip(expected["intuitor"],
                                                             expected["grpo"])]
    for name, want in expected.items():
        settings = OmegaConf.create({"name": name, "hybrid_weights": {
            "self_certainty": 0.25, "verifiable": 0.75}})
        got = alg.response_advantages(settings, self_certainty, verifiable, group)
        assert got.tolist() == pytest.approx(want, rel=1e-6), name


def test_registered_estimator_becomes_an_algorithm_name_with_its_grading_need(monkeypatch):
    """Registering an estimator is the whole of adding an algorithm: the registry says whether
    the rollout grades answers, `response_advantages` dispatches to it by `algorithm.name`; a
    name registered twice is refused. The config accepts exactly the registered names."""
    from megatron_intuitor.config import ALGORITHMS

    assert ALGORITHMS == tuple(alg.ADVANTAGE_ESTIMATORS) == ("intuitor", "grpo", "hybrid",
                                                             "intuitor_vote", "random")
    assert [alg.advantage_estimator(name).needs_verifiable for name in ALGORITHMS] == [
        False, True, True, False, False]
    monkeypatch.setattr(alg, "ADVANTAGE_ESTIMATORS", dict(alg.ADVANTAGE_ESTIMATORS))

    @alg.register_advantage_estimator("negated_certainty", needs_verifiable=False)
    def negated(rewards, group_index, settings):
        return alg.grpo_advantages(-rewards.self_certainty, group_index)

    got = alg.response_advantages(OmegaConf.create({"name": "negated_certainty"}),
                                  torch.tensor([1.0, 3.0]), None, torch.tensor([0, 0]))
    z = 1 / (2 ** 0.5 + EPS)  # |x - mean| = 1, unbiased std sqrt(2)
    assert got.tolist() == pytest.approx([z, -z], rel=1e-6)
    assert not alg.advantage_estimator("negated_certainty").needs_verifiable
    with pytest.raises(ValueError, match="'negated_certainty' is already registered"):
        alg.register_advantage_estimator("negated_certainty", needs_verifiable=True)(negated)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; choose one of "
                                         "intuitor, grpo, hybrid, intuitor_vote, random, "
                                         "negated_certainty"):
        alg.advantage_estimator("ppo")


def test_grpo_z_scores_within_interleaved_groups():
    # group "a": 1, 2, 3 (mean 2, unbiased std 1); group "b": 4, 8 (mean 6, std sqrt(8))
    rewards = torch.tensor([1.0, 4.0, 2.0, 8.0, 3.0])
    adv = alg.grpo_advantages(rewards, ["a", "b", "a", "b", "a"], eps=EPS)
    sb = math.sqrt(8.0)
    expected = [-1 / (1 + EPS), -2 / (sb + EPS), 0.0, 2 / (sb + EPS), 1 / (1 + EPS)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_grpo_tensor_index_int_rewards_and_constant_group():
    adv = alg.grpo_advantages(torch.tensor([0, 1, 1, 1]), torch.tensor([7, 7, 3, 3]))
    assert adv.dtype == torch.float32
    half = 0.5 / (math.sqrt(0.5) + EPS)  # [0, 1]: mean 0.5, std sqrt(0.5)
    assert adv.tolist() == pytest.approx([-half, half, 0.0, 0.0], rel=1e-6)


def test_grpo_single_response_group_is_an_error():
    with pytest.raises(ValueError, match=r"at least 2 responses per prompt.*\['p2'\]"):
        alg.grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), ["p1", "p1", "p2"])


def test_grpo_index_length_mismatch():
    with pytest.raises(ValueError, match="group_index has 2 entries for 3 rewards"):
        alg.grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), [0, 0])


def test_hybrid_is_weighted_sum_of_separately_normalised_advantages():
    groups = [0, 0, 1, 1]
    components = {"self_certainty": torch.tensor([1.0, 2.0, 3.0, 4.0]),
                  "accuracy": torch.tensor([0.0, 1.0, 1.0, 1.0])}
    adv = alg.hybrid_advantages(components, {"self_certainty": 1.0, "accuracy": 0.5}, groups)
    a = 0.5 / (math.sqrt(0.5) + EPS)  # z-score of a two-element group with a gap of 1
    expected = [-a - 0.5 * a, a + 0.5 * a, -a + 0.0, a + 0.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_hybrid_weights_must_match_components():
    with pytest.raises(ValueError, match="must name the same rewards"):
        alg.hybrid_advantages({"a": torch.ones(2)}, {"b": 1.0}, [0, 0])


def test_token_advantages_broadcast_over_response_mask():
    out = alg.token_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [0, 1, 1]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]


# Six tokens, old log-prob 0 so the ratio r = exp(log_prob). With clip 0.2 and dual clip 3:
#  1: A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)
#  2: A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5
#  3: A=-1, r=1.5 -> max( 1.5,  1.2) =  1.5
#  4: A=-1, r=0.5 -> max( 0.5,  0.8) =  0.8 (clipped)
#  5: A=-1, r=5.0 -> max( 5.0,  1.2) =  5.0, dual clip -> min(5, 3) = 3 (lower-clipped)
#  6: masked out
RATIOS = [1.5, 0.5, 1.5, 0.5, 5.0, 10.0]
ADVS = [1.0, 1.0, -1.0, -1.0, -1.0, 1.0]
MASK = [1, 1, 1, 1, 1, 0]


def _ppo_inputs():
    log_probs = torch.tensor([math.log(r) for r in RATIOS], dtype=torch.float64).view(2, 3)
    log_probs.requires_grad_(True)
    return (log_probs, torch.zeros(2, 3, dtype=torch.float64),
            torch.tensor(ADVS, dtype=torch.float64).view(2, 3), torch.tensor(MASK).view(2, 3))


def test_ppo_clip_loss_regions_and_stats():
    log_probs, old, adv, mask = _ppo_inputs()
    loss, stats = alg.ppo_clip_loss(log_probs, old, adv, mask, 0.2, 0.2, dual_clip_ratio=3.0)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 3.0) / 5)
    assert stats.clipfrac.item() == pytest.approx(2 / 5)
    assert stats.clipfrac_lower.item() == pytest.approx(1 / 5)
    assert stats.approx_kl.item() == pytest.approx(
        -(math.log(1.5) + math.log(0.5) + math.log(1.5) + math.log(0.5) + math.log(5.0)) / 5)
    loss.backward()
    # d/dlogp of -A r is -A r where the unclipped term is active, 0 where clipped or masked
    expected_grad = [0.0, -1 * 0.5 / 5, 1 * 1.5 / 5, 0.0, 0.0, 0.0]
    assert log_probs.grad.flatten().tolist() == pytest.approx(expected_grad)


def test_ppo_clip_loss_without_dual_clip_and_asymmetric_range():
    log_probs, old, adv, mask = _ppo_inputs()
    loss, stats = alg.ppo_clip_loss(log_probs, old, adv, mask, dual_clip_ratio=None)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 5.0) / 5)
    assert stats.clipfrac_lower.item() == 0.0
    loss, _ = alg.ppo_clip_loss(log_probs, old, adv, mask, clip_ratio_low=0.2,
                                clip_ratio_high=0.28)
    assert loss.item() == pytest.approx((-1.28 - 0.5 + 1.5 + 0.8 + 3.0) / 5)


def test_ppo_tis_weights_scale_token_losses():
    log_probs, old, adv, mask = _ppo_inputs()
    weights = torch.tensor([2.0, 1.0, 1.0, 1.0, 0.5, 7.0], dtype=torch.float64).view(2, 3)
    loss, _ = alg.ppo_clip_loss(log_probs, old, adv, mask, tis_weights=weights)
    assert loss.item() == pytest.approx((-1.2 * 2 - 0.5 + 1.5 + 0.8 + 3.0 * 0.5) / 5)


def test_ppo_global_token_count_makes_micro_batches_add_up():
    log_probs, old, adv, mask = _ppo_inputs()
    full, _ = alg.ppo_clip_loss(log_probs, old, adv, mask)
    assert alg.ppo_clip_loss(log_probs, old, adv, mask, num_tokens=10)[0].item() == \
        pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 + 3.0) / 10)
    # two micro-batches of one row each (3 and 2 real tokens), normalised by the 5 in total
    parts = [alg.ppo_clip_loss(log_probs[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                               num_tokens=5)[0] for i in range(2)]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item())
    # whereas averaging per-micro-batch token means weights the 2-token row too much
    means = [alg.ppo_clip_loss(log_probs[i:i + 1], old[i:i + 1], adv[i:i + 1],
                               mask[i:i + 1])[0].item() for i in range(2)]
    assert (means[0] + means[1]) / 2 != pytest.approx(full.item())


def test_ppo_sequence_advantages_broadcast():
    log_probs = torch.log(torch.tensor([[1.1, 0.9], [1.5, 1.0]]))
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    per_seq, _ = alg.ppo_clip_loss(log_probs, old, torch.tensor([1.0, -2.0]), mask)
    # tokens: -1.1, -0.9, A=-2 r=1.5 -> max(3.0, 2.4) = 3.0, A=-2 r=1 -> 2.0
    assert per_seq.item() == pytest.approx((-1.1 - 0.9 + 3.0 + 2.0) / 4)


def test_ppo_packed_tokens_and_nan_padding():
    log_probs, old, adv, mask = _ppo_inputs()
    full, _ = alg.ppo_clip_loss(log_probs, old, adv, mask)
    packed, _ = alg.ppo_clip_loss(log_probs.flatten(), old.flatten(), adv.flatten(),
                                  mask.flatten())
    assert packed.item() == pytest.approx(full.item())
    padded = log_probs.detach().clone()
    padded[1, 2] = float("nan")  # the masked-out token
    assert alg.ppo_clip_loss(padded, old, adv, mask)[0].item() == pytest.approx(full.item())


def test_ppo_shape_and_dual_clip_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        alg.ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3),
                          torch.ones(2, 3))
    with pytest.raises(ValueError, match="dual_clip_ratio must be > 1"):
        alg.ppo_clip_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2),
                          torch.ones(1, 2), dual_clip_ratio=0.5)


def test_kl_kinds_by_hand():
    lp = torch.tensor([[-1.0, -2.0, 0.0, -30.0]])
    ref = torch.tensor([[-2.0, -1.0, 30.0, 0.0]])
    e = math.e
    assert alg.kl_penalty(lp, ref, "kl").tolist() == [[1.0, -1.0, -30.0, -30.0]]
    assert alg.kl_penalty(lp, ref, "k1").tolist() == [[1.0, -1.0, -30.0, -30.0]]
    assert alg.kl_penalty(lp, ref, "abs").tolist() == [[1.0, 1.0, 30.0, 30.0]]
    assert alg.kl_penalty(lp, ref, "mse").tolist() == [[0.5, 0.5, 450.0, 450.0]]
    assert alg.kl_penalty(lp, ref, "k2").tolist() == [[0.5, 0.5, 450.0, 450.0]]
    # k3 = exp(d) - d - 1, d = ref - lp: d=-1 -> 1/e; d=1 -> e - 2; |d| large -> clamped at 10
    k3 = alg.kl_penalty(lp, ref, "low_var_kl")
    assert k3.tolist()[0] == pytest.approx([1 / e, e - 2, 10.0, 10.0], rel=1e-6)
    assert alg.kl_penalty(lp, ref, "k3").tolist() == k3.tolist()


def test_k3_is_exact_for_small_differences():
    """d = ref - lp down to 1e-7 in fp32: k3 equals float64's expm1(d) - d (~d^2/2) to fp32
    rounding, where the textbook exp(d) - d - 1 in fp32 gives exactly 0; the gradient with
    respect to lp is -expm1(d), as for the textbook form."""
    ds = [1e-7, -1e-6, 3e-5, -2e-4, 1e-3, 0.5]
    ref = torch.tensor(ds, dtype=torch.float32)
    lp = torch.zeros(len(ds), requires_grad=True)
    k3 = alg.kl_penalty(lp, ref, "k3")
    assert k3.dtype == torch.float32
    exact = [math.expm1(d) - d for d in ref.double().tolist()]  # the fp32 d, in float64
    assert k3.tolist() == pytest.approx(exact, rel=1e-6)
    textbook = (ref.exp() - ref - 1.0).tolist()
    assert textbook[:4] == [0.0, 0.0, 0.0, 0.0]  # what the fp32 textbook form loses
    k3.sum().backward()
    assert lp.grad.tolist() == pytest.approx([-math.expm1(d) for d in ref.double().tolist()],
                                             rel=1e-6)


def test_k3_gradient_is_finite_when_clamped():
    lp = torch.tensor([0.0, -1.0], requires_grad=True)
    alg.kl_penalty(lp, torch.tensor([30.0, -2.0])).sum().backward()
    # clamped token: no gradient; other: d/dlp [exp(ref - lp) - (ref - lp) - 1] = 1 - exp(ref-lp)
    assert lp.grad.tolist() == pytest.approx([0.0, 1 - math.exp(-1.0)])


def test_kl_loss_masked_token_mean_and_unknown_kind():
    lp = torch.tensor([[-1.0, -2.0, 5.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0]])
    loss = alg.kl_loss(lp, ref, torch.tensor([[1, 1, 0]]))
    assert loss.item() == pytest.approx((1 / math.e + math.e - 2) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="unknown KL kind 'full'"):
        alg.kl_penalty(lp, ref, "full")


def test_entropy_loss_token_mean():
    ent = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    assert alg.entropy_loss(ent, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(3.0)
    assert alg.entropy_loss(ent, torch.tensor([[1, 1], [1, 0]]), num_tokens=6).item() == \
        pytest.approx(1.5)


def test_tis_weights_truncate_ratio():
    w = alg.tis_weights(torch.tensor([-1.0, -2.0, -1.0]), torch.tensor([-2.0, -1.0, -1.0]), cap=2.0)
    assert w.tolist() == pytest.approx([2.0, math.exp(-1.0), 1.0])
    with pytest.raises(ValueError, match="cap must be > 0"):
        alg.tis_weights(torch.zeros(1), torch.zeros(1), cap=0.0)


# Clip-Cov / KL-Cov: two responses of two tokens, advantages +1 and -1, log-probs -1 -3 | -2 -2:
# means 0 and -2, so the token covariances are (1)(1), (1)(-1), (-1)(0), (-1)(0) = 1, -1, 0, 0.
_COV_LOG_PROBS = [[-1.0, -3.0], [-2.0, -2.0]]
_COV_ADV = torch.tensor([1.0, -1.0])
_COV_MASK = torch.ones(2, 2, dtype=torch.bool)


def test_token_covariance_by_hand():
    cov = alg.token_covariance(torch.tensor(_COV_LOG_PROBS), _COV_ADV, _COV_MASK)
    assert cov.tolist() == [[1.0, -1.0], [0.0, 0.0]]
    masked = alg.token_covariance(torch.tensor([[-1.0, 9.0]]), torch.tensor([[2.0, 7.0]]),
                                  torch.tensor([[1, 0]]))
    assert masked.tolist() == [[0.0, 0.0]]  # one token: its own mean; off-mask token ignored


def _clip_cov(log_probs, old, adv, **overrides):
    options = dict(clip_ratio_low=0.2, clip_ratio_high=0.2, select_ratio=0.25, cov_lower=0.5,
                   cov_upper=5.0)
    options.update(overrides)
    return alg.clip_cov_weights(log_probs, old, adv, torch.ones_like(log_probs, dtype=torch.bool),
                                **options)


def test_clip_cov_drops_the_high_covariance_token_and_its_gradient():
    log_probs = torch.tensor(_COV_LOG_PROBS, requires_grad=True)
    old = log_probs.detach().clone()
    weights = _clip_cov(log_probs, old, _COV_ADV)
    assert weights.tolist() == [[0.0, 1.0], [1.0, 1.0]]  # only token 0 has cov in (0.5, 5)
    loss, _ = alg.ppo_clip_loss(log_probs, old, _COV_ADV, _COV_MASK, tis_weights=weights)
    # ratio 1 everywhere: per-token loss -A, token 0 dropped, mean over all 4 tokens
    assert loss.item() == pytest.approx((-1.0 + 1.0 + 1.0) / 4)
    loss.backward()
    assert log_probs.grad.flatten().tolist() == pytest.approx([0.0, -0.25, 0.25, 0.25])


def test_clip_cov_leaves_ppo_clipped_and_out_of_band_tokens_alone():
    log_probs = torch.tensor(_COV_LOG_PROBS)
    old = log_probs.clone()
    old[0, 0] = -1.5  # ratio e^0.5 > 1.2 with A = +1: PPO's clip is active there already
    assert _clip_cov(log_probs, old, _COV_ADV).tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert _clip_cov(log_probs, log_probs, _COV_ADV, cov_upper=0.9).tolist() == \
        [[1.0, 1.0], [1.0, 1.0]]  # cov 1 is not below the upper bound


def test_clip_cov_draws_the_token_count_among_candidates():
    # A 2 2 2 -6 (mean 0), log p 0 0 0 -3 (mean -0.75): cov 1.5 1.5 1.5 13.5; band (1, 5) holds
    # tokens 0-2, and 0.5 x 4 tokens = 2 of them are dropped
    log_probs = torch.tensor([[0.0, 0.0, 0.0, -3.0]])
    adv = torch.tensor([[2.0, 2.0, 2.0, -6.0]])
    drawn = set()
    for seed in range(6):
        weights = _clip_cov(log_probs, log_probs, adv, select_ratio=0.5, cov_lower=1.0,
                            generator=torch.Generator().manual_seed(seed))[0].tolist()
        assert sorted(weights[:3]) == [0.0, 0.0, 1.0] and weights[3] == 1.0
        drawn.add(tuple(weights))
    assert len(drawn) > 1  # a random draw, not a fixed choice


def test_kl_cov_penalises_the_top_covariance_token():
    log_probs = torch.tensor(_COV_LOG_PROBS)
    d = torch.tensor([[0.1, 0.2], [-0.3, 0.0]])
    loss, share = alg.kl_cov_loss(log_probs, log_probs - d, _COV_ADV, _COV_MASK,
                                  select_ratio=0.25, kl_coef=2.0)
    expected = (-math.exp(0.1) + 2.0 * 0.1 - math.exp(0.2) + math.exp(-0.3) + 1.0) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert share.item() == 0.25
    loss_no_kl, _ = alg.kl_cov_loss(log_probs, log_probs - d, _COV_ADV, _COV_MASK,
                                    select_ratio=0.25, kl_coef=0.0)
    assert loss_no_kl.item() == pytest.approx(expected - 2.0 * 0.1 / 4, rel=1e-6)


def test_cov_select_ratio_is_checked():
    with pytest.raises(ValueError, match="KL-Cov select_ratio must be in"):
        alg.kl_cov_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2),
                        select_ratio=0.0, kl_coef=1.0)
