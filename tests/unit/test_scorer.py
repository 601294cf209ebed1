"""`algorithm.scorer`: the EMA update against its float64 recursion, the paper's cosine schedule
by hand, and the config keys' rules."""
import math

import pytest
import torch

from megatron_intuitor.config import ActorSettings, ConfigError, load, training_schedule
from megatron_intuitor.scorer import ScorerSettings, ema_update_


class _TwoTensors(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())


def test_ema_weights_follow_the_float64_recursion_over_k_steps():
    """Five updates with changing policy weights and the schedule's changing policy weight `a`:
    the fp32 EMA equals e_k = (1 - a_k) e_{k-1} + a_k p_k computed in float64."""
    generator = torch.Generator().manual_seed(0)
    start_w, start_b = torch.randn(3, 4, generator=generator), torch.randn(4, generator=generator)
    ema = [_TwoTensors(start_w, start_b)]
    policy = [_TwoTensors(start_w, start_b)]
    settings = ScorerSettings("ema", alpha_start=0.3, alpha_end=0.01)
    expected = {"weight": start_w.double(), "bias": start_b.double()}
    for step in range(1, 6):
        with torch.no_grad():  # the policy moves (as an optimizer step would)
            for param in policy[0].parameters():
                param.add_(torch.randn(param.shape, generator=generator))
        a = settings.policy_weight(step, total_steps=5)
        ema_update_(ema, policy, a)
        for name in expected:
            expected[name] = (1 - a) * expected[name] + a * getattr(policy[0], name).double()
    for name, value in expected.items():
        torch.testing.assert_close(getattr(ema[0], name).double(), value, rtol=0, atol=1e-6)
    assert not torch.allclose(ema[0].weight, policy[0].weight)  # it lags the policy


def test_policy_weight_is_the_papers_cosine_annealing():
    """a(t) = end + (start - end)(1 + cos(pi t / T)) / 2 (Co-rewarding-II's update_alpha):
    start at t=0, the midpoint at T/2, end from T on; the defaults are the paper's script's."""
    settings = ScorerSettings("ema", alpha_start=0.01, alpha_end=1e-5)
    assert settings.policy_weight(0, 100) == pytest.approx(0.01, rel=1e-12)
    assert settings.policy_weight(50, 100) == pytest.approx((0.01 + 1e-5) / 2, rel=1e-12)
    assert settings.policy_weight(25, 100) == pytest.approx(
        1e-5 + (0.01 - 1e-5) * (1 + math.sqrt(0.5)) / 2, rel=1e-12)
    assert settings.policy_weight(100, 100) == pytest.approx(1e-5, rel=1e-12)
    assert settings.policy_weight(130, 100) == pytest.approx(1e-5, rel=1e-12)
    constant = ScorerSettings("ema", alpha_start=0.02, alpha_end=0.02)
    assert all(constant.policy_weight(s, 10) == pytest.approx(0.02) for s in range(12))


def test_ema_update_names_a_tensor_that_does_not_match():
    ema = [_TwoTensors(torch.zeros(3, 4), torch.zeros(4))]
    policy = [_TwoTensors(torch.zeros(3, 5), torch.zeros(4))]
    with pytest.raises(ValueError, match=r"0\.weight has shape \(3, 4\), the policy's \(3, 5\)"):
        ema_update_(ema, policy, 0.5)


def test_scorer_keys_reach_the_ranks_settings_and_bad_values_are_named():
    assert ActorSettings.from_cfg(load([]), training_schedule(load([]), 1000),
                                  pad_token_id=0).scorer == ScorerSettings("online", 0.01, 1e-5)
    cfg = load(["algorithm.scorer=ema", "algorithm.scorer_ema.alpha_start=0.05",
                "algorithm.scorer_ema.alpha_end=0.05"])
    assert ScorerSettings.from_cfg(cfg) == ScorerSettings("ema", 0.05, 0.05)
    with pytest.raises(ConfigError) as error:
        load(["algorithm.scorer=teacher", "algorithm.scorer_ema.alpha_end=1.5"])
    assert any(p.startswith("algorithm.scorer='teacher': expected one of online, ema, frozen")
               for p in error.value.problems)
    assert any(p.startswith("algorithm.scorer_ema.alpha_end=1.5: expected a number in [0, 1]")
               for p in error.value.problems)
