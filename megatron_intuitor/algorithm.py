"""INTUITOR / GRPO algorithm: sequence rewards, group-normalised advantages, PPO and KL losses.

Pure tensor functions: no Ray, no config, no parallel state. The semantics follow verl's
`core_algos` (which the INTUITOR reference implementation runs on) so that curves compare:
GRPO z-scores with the unbiased `torch.std` and `eps` added to the std, the PPO ratio's log is
clamped to [-20, 20], dual-clip for negative advantages, k3 KL clamped to [-10, 10].

Token tensors are `[batch, response_len]` with a 0/1 response mask. Token-mean losses divide the
masked sum by `num_tokens`, which defaults to this call's mask sum. To get the token mean of a
whole mini-batch under gradient accumulation (and data parallelism), pass the mini-batch's total
response-token count as `num_tokens` in every micro-batch: the per-micro-batch losses then add up
to the mini-batch token mean (a caller whose framework averages rather than sums over micro-batches
or DP ranks multiplies by that count to undo it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from megatron_intuitor import scoring

GroupIndex = Union[torch.Tensor, Sequence[Hashable]]

# `kl_penalty`'s estimators (algorithm.kl_type), INTUITOR's first
KL_KINDS = ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2")

# verl's numerical guards: exp() of a log-ratio beyond +-20 overflows fp16/bf16 ranges.
_MAX_LOG_RATIO = 20.0
_MAX_K3 = 10.0


class PolicyLossStats(NamedTuple):
    """Detached scalars of one `ppo_clip_loss` call (token means over its mask)."""

    clipfrac: torch.Tensor  # fraction of tokens where the clipped term was the active one
    clipfrac_lower: torch.Tensor  # fraction where dual-clip bounded a negative-advantage token
    approx_kl: torch.Tensor  # mean of old_log_prob - log_prob (k1 estimate of KL(old || new))


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor,
                      num_tokens: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """sum(values * mask) / num_tokens, `num_tokens` defaulting to mask.sum() (at least 1)."""
    _check_same_shape(values=values, mask=mask)
    mask = mask.bool()
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1).to(values.dtype)
    # where(), not a product: NaN/inf at padded positions must not leak into the mean
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype,
                                                 device=values.device)).sum() / num_tokens


def sequence_rewards_from_self_certainty(token_self_certainty: torch.Tensor,
                                         response_mask: torch.Tensor) -> torch.Tensor:
    """INTUITOR's reward: each response's self-certainty averaged over its tokens -> [b]."""
    return scoring.masked_mean_per_sequence(token_self_certainty.detach(), response_mask)


def _group_ids(group_index: GroupIndex, batch: int) -> tuple[torch.Tensor, list[Hashable]]:
    """Map prompt ids (tensor, ints or strings such as uuids) to 0..G-1 per response; also
    return the distinct ids in order of first appearance."""
    keys = group_index.flatten().tolist() if isinstance(group_index, torch.Tensor) \
        else list(group_index)
    if len(keys) != batch:
        raise ValueError(f"group_index has {len(keys)} entries for {batch} rewards")
    ids: dict[Hashable, int] = {}
    dense = torch.tensor([ids.setdefault(key, len(ids)) for key in keys], dtype=torch.long)
    return dense, list(ids)


@torch.no_grad()
def grpo_advantages(rewards: torch.Tensor, group_index: GroupIndex,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: z-score each reward within its prompt's group, (r - mean) / (std + eps) -> [b].

    `group_index[i]` identifies the prompt response i answers. std is unbiased (as verl's
    `torch.std`); a group of one response has no z-score and raises (rollout n must be >= 2).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [batch], got shape {tuple(rewards.shape)}")
    ids, keys = _group_ids(group_index, rewards.numel())
    ids = ids.to(rewards.device)
    values = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    num_groups = len(keys)
    counts = torch.bincount(ids, minlength=num_groups)
    if (counts < 2).any():
        single = [keys[g] for g in (counts < 2).nonzero().flatten().tolist()]
        raise ValueError(
            f"GRPO needs at least 2 responses per prompt (rollout n >= 2); groups {single[:10]} "
            f"have a single response, which has no z-score")
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    mean = sums.index_add(0, ids, values) / counts
    centred = values - mean[ids]
    var = sums.index_add(0, ids, centred.square()) / (counts - 1)
    return centred / (var.sqrt()[ids] + eps)


@torch.no_grad()
def hybrid_advantages(components: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                      group_index: GroupIndex, eps: float = 1e-6) -> torch.Tensor:
    """Weighted sum of separately group-normalised advantages, e.g. INTUITOR's self-certainty
    plus a verifiable reward: sum_k weights[k] * grpo_advantages(components[k]) -> [b]."""
    if not components:
        raise ValueError("hybrid_advantages needs at least one reward component")
    if set(components) != set(weights):
        raise ValueError(f"reward components {sorted(components)} and weights {sorted(weights)} "
                         f"must name the same rewards")
    return sum(weights[name] * grpo_advantages(rewards, group_index, eps)
               for name, rewards in components.items())


# ------------------------------------------------------------------ advantage estimators
# `algorithm.name` picks one; config takes its list of names from here. Registering one:
#
#     @register_advantage_estimator("mine", needs_verifiable=False)
#     def _mine(rewards: ResponseRewards, group_index: GroupIndex, settings) -> torch.Tensor:
#         return grpo_advantages(rewards.self_certainty * 2, group_index)
#
# `settings` is the run's `algorithm` config group (attribute access, e.g. hybrid_weights).


class ResponseRewards(NamedTuple):
    """The rewards of a step's responses, one number per response [b]."""

    self_certainty: torch.Tensor
    verifiable: Optional[torch.Tensor]  # 0/1 answer grades: None unless the estimator needs them
    # extracted final answers (None: no answer): None unless the estimator needs them
    answers: Optional[Sequence[Optional[str]]] = None
    seed: int = 0  # the step's seed, for estimators that draw (random)


AdvantageFunction = Callable[[ResponseRewards, GroupIndex, Any], torch.Tensor]


@dataclass(frozen=True)
class AdvantageEstimator:
    name: str
    advantages: AdvantageFunction  # (rewards, group_index, algorithm settings) -> [b]
    needs_verifiable: bool  # the rollout grades the answers (datasets with ground truth only)
    needs_answers: bool = False  # the rollout reads each response's final answer (no labels)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str, *, needs_verifiable: bool, needs_answers: bool = False
                                 ) -> Callable[[AdvantageFunction], AdvantageFunction]:
    """Decorator: the function becomes `algorithm.name=<name>`."""
    def register(function: AdvantageFunction) -> AdvantageFunction:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = AdvantageEstimator(name, function, needs_verifiable,
                                                        needs_answers)
        return function
    return register


def advantage_estimator(name: str) -> AdvantageEstimator:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of "
                         f"{', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


@register_advantage_estimator("intuitor", needs_verifiable=False)
def _intuitor(rewards: ResponseRewards, group_index: GroupIndex, settings: Any) -> torch.Tensor:
    """The self-certainty z-scored within each prompt's group."""
    return grpo_advantages(rewards.self_certainty, group_index)


@register_advantage_estimator("grpo", needs_verifiable=True)
def _grpo(rewards: ResponseRewards, group_index: GroupIndex, settings: Any) -> torch.Tensor:
    """The verifiable 0/1 reward z-scored within each prompt's group."""
    return grpo_advantages(rewards.verifiable, group_index)


@register_advantage_estimator("hybrid", needs_verifiable=True)
def _hybrid(rewards: ResponseRewards, group_index: GroupIndex, settings: Any) -> torch.Tensor:
    """The two z-scores weighted by `settings.hybrid_weights`."""
    weights = settings.hybrid_weights
    return hybrid_advantages(
        {"self_certainty": rewards.self_certainty, "verifiable": rewards.verifiable},
        {"self_certainty": weights.self_certainty, "verifiable": weights.verifiable},
        group_index)


@register_advantage_estimator("intuitor_vote", needs_verifiable=False, needs_answers=True)
def _intuitor_vote(rewards: ResponseRewards, group_index: GroupIndex,
                   settings: Any) -> torch.Tensor:
    """Self-certainty plus `settings.vote_weight` times the plurality vote over the group's
    answers, each z-scored within the group (arXiv 2605.22620)."""
    from megatron_intuitor.label_free import plurality_vote_rewards  # it imports this module

    return hybrid_advantages(
        {"self_certainty": rewards.self_certainty,
         "vote": plurality_vote_rewards(rewards.answers, group_index)},
        {"self_certainty": 1.0, "vote": settings.vote_weight}, group_index)


@register_advantage_estimator("random", needs_verifiable=False)
def _random(rewards: ResponseRewards, group_index: GroupIndex, settings: Any) -> torch.Tensor:
    """i.i.d. N(0, 1) rewards drawn with the step's seed, z-scored like any reward: movement
    without direction (arXiv 2506.10947)."""
    from megatron_intuitor.label_free import random_rewards  # it imports this module

    return grpo_advantages(random_rewards(rewards.self_certainty.numel(), rewards.seed),
                           group_index)


def response_advantages(settings: Any, self_certainty: torch.Tensor,
                        verifiable: Optional[torch.Tensor], group_index: GroupIndex,
                        answers: Optional[Sequence[Optional[str]]] = None,
                        seed: int = 0) -> torch.Tensor:
    """Advantages per response [b] by the estimator `settings.name` (`settings`: the
    `algorithm` config group)."""
    return advantage_estimator(settings.name).advantages(
        ResponseRewards(self_certainty, verifiable, answers, seed), group_index, settings)


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per response [b] to its response tokens [b, s] (0 elsewhere)."""
    if advantages.dim() != 1 or advantages.shape[0] != response_mask.shape[0]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [batch] for a response "
                         f"mask of shape {tuple(response_mask.shape)}")
    return advantages.unsqueeze(-1) * response_mask.to(advantages.dtype)


@torch.no_grad()
def tis_weights(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling: min(pi_old / pi_rollout, cap) per token, detached.

    Corrects for the rollout engine sampling from a slightly different distribution (other
    kernels, precision) than the trainer's policy that scores the same tokens."""
    _check_same_shape(old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs)
    if cap <= 0:
        raise ValueError(f"truncated importance sampling cap must be > 0, got {cap}")
    log_ratio = (old_log_probs - rollout_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return log_ratio.exp().clamp(max=cap)


def ppo_clip_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    dual_clip_ratio: Optional[float] = 3.0,
    tis_weights: Optional[torch.Tensor] = None,
    num_tokens: Optional[Union[float, torch.Tensor]] = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """PPO clipped surrogate, token-mean over `mask` -> (loss, stats).

    Per token: max(-A r, -A clip(r, 1 - low, 1 + high)) with r = exp(log_probs - old_log_probs);
    for A < 0 additionally bounded by -A * dual_clip_ratio (dual-clip PPO; None disables it).
    `advantages` is per token (shaped like `log_probs`: [b, s], or [t] for packed sequences) or
    per response ([b], broadcast over [b, s] tokens); `tis_weights` per token multiplies the
    per-token loss. See the module docstring for `num_tokens`.
    """
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, mask=mask)
    if advantages.dim() == log_probs.dim() - 1:
        advantages = token_advantages(advantages, mask)
    _check_same_shape(log_probs=log_probs, advantages=advantages)
    if dual_clip_ratio is not None and dual_clip_ratio <= 1.0:
        raise ValueError(f"dual_clip_ratio must be > 1 (or None), got {dual_clip_ratio}")

    log_ratio = (log_probs - old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    losses = torch.maximum(unclipped, clipped)
    if dual_clip_ratio is not None:
        dual_bound = -advantages * dual_clip_ratio
        losses_dual = torch.where(advantages < 0, torch.minimum(losses, dual_bound), losses)
    else:
        losses_dual = losses
    if tis_weights is not None:
        _check_same_shape(log_probs=log_probs, tis_weights=tis_weights)
        losses_dual = losses_dual * tis_weights
    loss = masked_token_mean(losses_dual, mask, num_tokens)

    with torch.no_grad():
        clipfrac = masked_token_mean((clipped > unclipped).to(log_probs.dtype), mask)
        if dual_clip_ratio is not None:
            lower = (losses > dual_bound) & (advantages < 0)
            clipfrac_lower = masked_token_mean(lower.to(log_probs.dtype), mask)
        else:
            clipfrac_lower = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
        approx_kl = masked_token_mean(-log_ratio, mask)
    return loss, PolicyLossStats(clipfrac, clipfrac_lower, approx_kl)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor,
               kind: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's
    k1/k2/k3, http://joschu.net/blog/kl-approx.html):

    - "kl"/"k1": log p - log p_ref
    - "abs": |log p - log p_ref|
    - "mse"/"k2": 0.5 (log p - log p_ref)^2
    - "low_var_kl"/"k3": exp(d) - d - 1 with d = log p_ref - log p, clamped to [-10, 10]
      (non-negative and unbiased; INTUITOR's choice). Computed as expm1(d) - d in float64, then
      cast back: the same value and gradient, but exact for small d, where exp(d) - d - 1
      cancels to 0 in fp32 for |d| up to ~3e-4 (a policy close to its reference then reads a KL
      of exactly 0) and fp32 expm1(d) - d still loses most digits below ~1e-5.
    """
    _check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    diff = log_probs - ref_log_probs
    if kind in ("kl", "k1"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("mse", "k2"):
        return 0.5 * diff.square()
    if kind in ("low_var_kl", "k3"):
        d = (-diff).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        wide = d.to(torch.float64)  # elementwise over tokens: cheap next to the model
        return (torch.expm1(wide) - wide).clamp(-_MAX_K3, _MAX_K3).to(d.dtype)
    raise ValueError(f"unknown KL kind {kind!r}; choose one of {list(KL_KINDS)}")


def kl_loss(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, mask: torch.Tensor,
            kind: str = "low_var_kl",
            num_tokens: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """Token-mean of `kl_penalty` over `mask` (the coefficient is applied by the caller)."""
    return masked_token_mean(kl_penalty(log_probs, ref_log_probs, kind), mask, num_tokens)


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor,
                 num_tokens: Optional[Union[float, torch.Tensor]] = None) -> torch.Tensor:
    """Token-mean entropy over `mask`; the caller subtracts coefficient * this from the loss."""
    return masked_token_mean(entropy, mask, num_tokens)


# ------------------------------------------------------------------ covariance regularisers
# Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
# Reasoning Language Models", arXiv 2505.22617; verl's entropy recipe): entropy collapses through
# the few tokens whose log-probability and advantage covary most, so only those are restrained.
# The covariance is taken over the tokens of one call (a micro-batch), as in the reference.

COV_POLICY_LOSSES = ("ppo", "clip_cov", "kl_cov")


@torch.no_grad()
def token_covariance(log_probs: torch.Tensor, advantages: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """Per token (A - mean A) * (log p - mean log p), the means over the `mask` tokens; 0 off the
    mask. `advantages` per token (shaped like `log_probs`) or per response ([b])."""
    if advantages.dim() == log_probs.dim() - 1:
        advantages = token_advantages(advantages, mask)
    _check_same_shape(log_probs=log_probs, advantages=advantages, mask=mask)
    mask = mask.bool()
    centred_adv = advantages - masked_token_mean(advantages, mask)
    centred_log_probs = log_probs.detach() - masked_token_mean(log_probs.detach(), mask)
    return torch.where(mask, centred_adv * centred_log_probs, torch.zeros_like(log_probs))


@torch.no_grad()
def clip_cov_weights(log_probs: torch.Tensor, old_log_probs: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, *, clip_ratio_low: float,
                     clip_ratio_high: float, select_ratio: float, cov_lower: float,
                     cov_upper: float, generator: Optional[torch.Generator] = None
                     ) -> torch.Tensor:
    """Clip-Cov: per-token weights for `ppo_clip_loss` (its `tis_weights` slot, multiplied into
    any truncated-IS weights): 0 on max(1, int(select_ratio * tokens)) tokens drawn at random
    among those with covariance strictly inside (cov_lower, cov_upper) that PPO's clip has not
    already cut (all of them when fewer), 1 elsewhere. A weight-0 token has no gradient."""
    if not 0 < select_ratio <= 1:
        raise ValueError(f"Clip-Cov select_ratio must be in (0, 1], got {select_ratio}")
    if advantages.dim() == log_probs.dim() - 1:
        advantages = token_advantages(advantages, mask)
    mask = mask.bool()
    covariance = token_covariance(log_probs, advantages, mask)
    ratio = (log_probs - old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO).exp()
    clipped_by_ppo = (-advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
                      > -advantages * ratio)
    candidates = (mask & ~clipped_by_ppo & (covariance > cov_lower)
                  & (covariance < cov_upper)).flatten().nonzero().flatten()
    count = max(int(select_ratio * int(mask.sum())), 1)
    if candidates.numel() > count:
        order = torch.randperm(candidates.numel(), generator=generator)
        candidates = candidates[order[:count].to(candidates.device)]
    weights = torch.ones(log_probs.numel(), dtype=log_probs.dtype, device=log_probs.device)
    weights[candidates] = 0.0
    return weights.view_as(log_probs)


def kl_cov_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, select_ratio: float, kl_coef: float,
                num_tokens: Optional[Union[float, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """KL-Cov: the unclipped surrogate -A * r on every token plus kl_coef * |log r| on the
    max(1, int(select_ratio * tokens)) tokens of largest covariance, token mean over `mask`
    -> (loss, share of tokens penalised). r = exp(log_probs - old_log_probs)."""
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, mask=mask)
    if not 0 < select_ratio <= 1:
        raise ValueError(f"KL-Cov select_ratio must be in (0, 1], got {select_ratio}")
    if advantages.dim() == log_probs.dim() - 1:
        advantages = token_advantages(advantages, mask)
    mask = mask.bool()
    tokens = int(mask.sum())
    log_ratio = (log_probs - old_log_probs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    losses = -advantages * log_ratio.exp()
    selected = torch.zeros(log_probs.numel(), dtype=torch.bool, device=log_probs.device)
    if tokens:
        covariance = token_covariance(log_probs, advantages, mask).flatten()
        covariance = torch.where(mask.flatten(), covariance,
                                 torch.full_like(covariance, float("-inf")))
        selected[covariance.topk(max(int(select_ratio * tokens), 1)).indices] = True
    selected = selected.view_as(log_probs) & mask
    losses = torch.where(selected, losses + kl_coef * log_ratio.abs(), losses)
    share = selected.sum().to(log_probs.dtype) / max(tokens, 1)
    return masked_token_mean(losses, mask, num_tokens), share
