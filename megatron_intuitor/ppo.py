"""The PPO forward/backward of one mini-batch on Megatron: a loss head on the vocab-parallel
logits (clipped surrogate + KL to the reference - entropy bonus), run through the pipeline
schedule, with its statistics reduced to token means over the whole mini-batch.

The model config has `calculate_per_token_loss`: the head returns a loss and a weight, and
Megatron divides the gradients by the weights summed over micro-batches and data-parallel ranks.
`loss_agg_mode`:
- "token-mean": the loss summed over the micro-batch's response tokens, weight = their count:
  the exact token mean of the mini-batch however it is cut and laid out (padded or packed);
- "micro-batch-token-mean" (the official INTUITOR code, verl's `token-mean` under gradient
  accumulation): the micro-batch's token mean times its rows, weight = its rows: the mean of the
  micro-batch token means over micro-batches and DP ranks (row-weighted, as verl weights
  token-budget micro-batches); short responses then weigh more than in the exact token mean.
The reported statistics are aggregated the same way.

Old log-probs: the pre-update policy's, recomputed by the scoring forward; or, on-policy (one
optimizer step per training step, `rollout.score_at_sampling`), this forward's own log-probs,
detached: the weights have not moved yet, so they are the same policy and the ratio is exactly
1. Then the forward also reports `rollout/logprob_diff` (engine vs Megatron), which the scoring
forward would otherwise have measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from megatron_intuitor import algorithm, metrics
from megatron_intuitor.batch import MicroBatching, TrainingBatch
from megatron_intuitor.models.forward import (ROUTED_EXPERTS, micro_batches, run_pipeline,
                                             token_scores)
from megatron_intuitor.platform import device
from megatron_intuitor.value_rules import Rule, choice, is_number

# Per-micro-batch weighted sums the head reports, reduced over micro-batches and DP, then divided
# by the summed weights (tokens or rows, per loss_agg_mode).
LOSS_METRICS = (metrics.PG_LOSS, metrics.KL_LOSS, metrics.PG_CLIPFRAC,
                metrics.PG_CLIPFRAC_LOWER, metrics.PPO_KL, metrics.ROLLOUT_LOGPROB_DIFF,
                metrics.BEHAVIOUR_KL, metrics.CORRECTION_TRUNCATED, metrics.CORRECTION_DROPPED)
# reported only when the behaviour correction is on (`rollout.tis_cap` or a band)
CORRECTION_METRICS = LOSS_METRICS[-3:]


# token-mean: the exact token mean of each mini-batch; micro-batch-token-mean: the official
# INTUITOR (verl) aggregation, each micro-batch's token mean averaged over micro-batches and
# data-parallel ranks (weighted by rows, as verl does for token-budget micro-batches).
LOSS_AGG_MODES = ("token-mean", "micro-batch-token-mean")


@dataclass(frozen=True)
class PPOSettings:
    """The loss of the update: PPO's clipped surrogate (or a covariance regulariser), the KL
    term, the entropy bonus and their aggregation, from `algorithm.*`, `actor.loss_agg_mode`
    and the rollout's sampling temperature and importance-sampling cap."""

    temperature: float  # rollout.temperature: the logits are scored as they were sampled
    clip_ratio: float  # PPO's clip below 1 (and above, unless clip_ratio_high)
    kl_coef: float
    kl_type: str  # algorithm.KL_KINDS
    entropy_coef: float
    tis_cap: Optional[float]
    # the masked correction: drop what leaves (low, high), per token or per response
    correction_band: Optional[tuple[float, float]] = None
    correction_level: str = "token"  # algorithm.CORRECTION_LEVELS
    policy_loss: str = "ppo"  # algorithm.COV_POLICY_LOSSES
    cov_select_ratio: float = 2e-4
    cov_clip_lower: float = 1.0
    cov_clip_upper: float = 5.0
    cov_kl_coef: float = 1.0
    loss_agg_mode: str = "token-mean"  # LOSS_AGG_MODES
    # DAPO's clip-higher (verl's clip_ratio_high): the ratio's upper clip 1 + clip_ratio_high;
    # None: 1 + clip_ratio, the symmetric PPO clip
    clip_ratio_high: Optional[float] = None

    RULES: ClassVar[tuple[Rule, ...]] = (
        ("rollout.temperature", lambda v: is_number(v) and v > 0, "a number > 0"),
        ("rollout.tis_cap", lambda v: v is None or (is_number(v) and v > 0),
         "null or a number > 0"),
        ("rollout.correction_band", lambda v: v is None or (
            len(v) == 2 and all(is_number(x) for x in v) and 0 <= v[0] < 1 < v[1]),
         "null or [low, high] with 0 <= low < 1 < high"),
        choice("rollout.correction_level", algorithm.CORRECTION_LEVELS),
        ("algorithm.kl_coef", lambda v: is_number(v) and v >= 0, "a number >= 0"),
        choice("algorithm.kl_type", algorithm.KL_KINDS),
        ("algorithm.clip_ratio", lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
        ("algorithm.clip_ratio_high", lambda v: v is None or (is_number(v) and v > 0),
         "null (algorithm.clip_ratio) or a number > 0"),
        ("algorithm.entropy_coef", lambda v: is_number(v) and v >= 0, "a number >= 0"),
        choice("algorithm.policy_loss", algorithm.COV_POLICY_LOSSES),
        ("algorithm.cov.select_ratio", lambda v: is_number(v) and 0 < v <= 1,
         "a number in (0, 1]"),
        ("algorithm.cov.clip_lower", is_number, "a number"),
        ("algorithm.cov.clip_upper", is_number, "a number"),
        ("algorithm.cov.kl_coef", lambda v: is_number(v) and v >= 0, "a number >= 0"),
        choice("actor.loss_agg_mode", LOSS_AGG_MODES),
    )

    @classmethod
    def consistency_problems(cls, cfg: DictConfig) -> list[str]:
        """What the rules of single keys cannot see (checked once every rule holds)."""
        cov = cfg.algorithm.cov
        if cov.clip_lower >= cov.clip_upper:
            return [f"algorithm.cov.clip_lower={cov.clip_lower} must be below "
                    f"algorithm.cov.clip_upper={cov.clip_upper}"]
        return []

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> PPOSettings:
        algo = cfg.algorithm
        return cls(temperature=cfg.rollout.temperature, clip_ratio=algo.clip_ratio,
                   clip_ratio_high=algo.clip_ratio_high, kl_coef=algo.kl_coef,
                   kl_type=algo.kl_type, entropy_coef=algo.entropy_coef,
                   tis_cap=cfg.rollout.tis_cap,
                   correction_band=(None if cfg.rollout.correction_band is None else
                                    tuple(float(x) for x in cfg.rollout.correction_band)),
                   correction_level=cfg.rollout.correction_level, policy_loss=algo.policy_loss,
                   cov_select_ratio=algo.cov.select_ratio, cov_clip_lower=algo.cov.clip_lower,
                   cov_clip_upper=algo.cov.clip_upper, cov_kl_coef=algo.cov.kl_coef,
                   loss_agg_mode=cfg.actor.loss_agg_mode)

    @property
    def clip_upper(self) -> float:
        """The upper clip's distance from 1."""
        return self.clip_ratio if self.clip_ratio_high is None else self.clip_ratio_high


def _ppo_head(settings: PPOSettings, vocab_size: int):
    if settings.loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode {settings.loss_agg_mode!r}: choose one of "
                         f"{list(LOSS_AGG_MODES)}")
    token_mean = settings.loss_agg_mode == "token-mean"

    def head(logits_shard: torch.Tensor, micro_batch: dict) -> tuple:
        scores = token_scores(logits_shard, micro_batch, temperature=settings.temperature,
                              vocab_size=vocab_size)
        mask = micro_batch["response_mask"]
        tokens = mask.sum()
        # loss terms are sum / divisor; Megatron divides their gradients by the summed weights
        if token_mean:
            weight, divisor = tokens, 1.0
        else:
            weight = torch.tensor(len(micro_batch.lengths), device=tokens.device)
            divisor = tokens.clamp(min=1) / weight
        on_policy = "old_log_probs" not in micro_batch.tokens  # see the module doc
        old = scores.log_probs.detach() if on_policy else micro_batch["old_log_probs"]
        tis, correction_sums = None, [weight * 0] * len(CORRECTION_METRICS)
        if _corrects(settings):  # decoupled PPO: old = proximal, the engine's = behaviour
            correction = algorithm.behaviour_correction(
                old, micro_batch["rollout_log_probs"], mask, cap=settings.tis_cap,
                band=settings.correction_band, level=settings.correction_level,
                sequence_ids=_sequence_ids(micro_batch, mask))
            tis = correction.weights
            correction_sums = [correction.kl * weight,
                               algorithm.masked_token_mean(correction.truncated.to(old.dtype),
                                                           mask) * weight,
                               algorithm.masked_token_mean(correction.dropped.to(old.dtype),
                                                           mask) * weight]
        pg_sum, stats = _policy_loss(settings, scores.log_probs, old, micro_batch, mask, tis,
                                     divisor)
        loss = pg_sum
        kl_sum = pg_sum.new_zeros(())
        if settings.kl_coef > 0:
            kl_sum = algorithm.kl_loss(scores.log_probs, micro_batch["ref_log_probs"], mask,
                                       settings.kl_type, num_tokens=divisor)
            loss = loss + settings.kl_coef * kl_sum
        if settings.entropy_coef > 0:
            loss = loss - settings.entropy_coef * algorithm.entropy_loss(scores.entropy, mask,
                                                                         num_tokens=divisor)
        weight = weight.to(torch.float32)
        logprob_diff = algorithm.masked_token_mean(
            (old - micro_batch["rollout_log_probs"]).abs(), mask) if on_policy else weight * 0
        sums = torch.stack([pg_sum.detach(), kl_sum.detach(), stats.clipfrac * weight,
                            stats.clipfrac_lower * weight, stats.approx_kl * weight,
                            logprob_diff * weight, *correction_sums, weight])
        return loss, weight.to(torch.int), {"sums": sums}
    return head


def _corrects(settings: PPOSettings) -> bool:
    return bool(settings.tis_cap) or settings.correction_band is not None


def _sequence_ids(micro_batch, mask: torch.Tensor) -> torch.Tensor:
    """Each token's row of the micro-batch, in its layout ([b, s] padded, [1, t] packed)."""
    if micro_batch.packed_seq_params is None:  # rows, padding rows included
        return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    rows = torch.arange(len(micro_batch.lengths), device=mask.device)
    ids = rows.repeat_interleave(micro_batch.lengths.to(mask.device))
    # the pack's padding tail (never under the mask) joins the last row
    return torch.nn.functional.pad(ids, (0, mask.shape[-1] - ids.numel()),
                                   value=len(rows) - 1)[None]


def _policy_loss(settings: PPOSettings, log_probs: torch.Tensor, old: torch.Tensor,
                 micro_batch: dict, mask: torch.Tensor, tis: Optional[torch.Tensor],
                 divisor: float | torch.Tensor) -> tuple[torch.Tensor, algorithm.PolicyLossStats]:
    """The micro-batch's surrogate (`settings.policy_loss`) summed over its tokens and divided
    by `divisor`, and its statistics; `old` are the old log-probs."""
    advantages = micro_batch["advantages"]
    if settings.policy_loss == "kl_cov":
        loss, _ = algorithm.kl_cov_loss(log_probs, old, advantages, mask,
                                        select_ratio=settings.cov_select_ratio,
                                        kl_coef=settings.cov_kl_coef, num_tokens=divisor)
        zero = loss.new_zeros(()).detach()
        approx_kl = algorithm.masked_token_mean((old - log_probs).detach(), mask)
        return loss, algorithm.PolicyLossStats(zero, zero, approx_kl)
    if settings.policy_loss == "clip_cov":
        # Every TP rank holds the same log-probs and must drop the same tokens: the draw is
        # seeded by the micro-batch's content, not by a rank's generator.
        seed = int(micro_batch["input_ids"].sum()) % (2**31)
        weights = algorithm.clip_cov_weights(
            log_probs, old, advantages, mask, clip_ratio_low=settings.clip_ratio,
            clip_ratio_high=settings.clip_upper, select_ratio=settings.cov_select_ratio,
            cov_lower=settings.cov_clip_lower, cov_upper=settings.cov_clip_upper,
            generator=torch.Generator().manual_seed(seed))
        tis = weights if tis is None else tis * weights
    return algorithm.ppo_clip_loss(log_probs, old, advantages, mask,
                                   clip_ratio_low=settings.clip_ratio,
                                   clip_ratio_high=settings.clip_upper, tis_weights=tis,
                                   num_tokens=divisor)


def ppo_forward_backward(model_chunks: list, shard: TrainingBatch, batching: MicroBatching,
                         settings: PPOSettings, vocab_size: int) -> dict[str, float]:
    """Accumulate this DP rank's gradients for one mini-batch (its share `shard`, cut and laid
    out by `batching`); returns the mini-batch's token-mean loss statistics, identical on every
    rank. With `shard.routed_experts` the routers replay them (routing replay)."""
    from megatron.core import parallel_state

    # Every column per token, so that packing lays them out like the logits.
    columns = {"input_ids": shard.input_ids, "response_mask": shard.response_mask,
               "advantages": shard.advantages[:, None].expand_as(shard.input_ids),
               "rollout_log_probs": shard.rollout_log_probs}
    if shard.old_log_probs is not None:
        columns["old_log_probs"] = shard.old_log_probs
    if settings.kl_coef > 0:
        columns["ref_log_probs"] = shard.ref_log_probs
    if shard.routed_experts is not None:  # routing replay: the routers take the engine's experts
        columns[ROUTED_EXPERTS] = shard.routed_experts
    stats = run_pipeline(model_chunks,
                         micro_batches(columns, shard.lengths, batching.partition(shard.lengths)),
                         _ppo_head(settings, vocab_size), forward_only=False,
                         packed=batching.packed, logits_at="response_mask")
    # Only the last stage's first TP rank contributes, so the world sum counts each DP shard once.
    reporting = (parallel_state.is_pipeline_last_stage()
                 and parallel_state.get_tensor_model_parallel_rank() == 0)
    sums = torch.stack([item["sums"] for item in stats]).sum(0) if reporting \
        else torch.zeros(len(LOSS_METRICS) + 1, device=device())
    dist.all_reduce(sums)
    weight = max(float(sums[-1]), 1.0)
    result = {name: float(value) / weight for name, value in zip(LOSS_METRICS, sums[:-1])}
    if shard.old_log_probs is not None:  # measured by the scoring forward instead
        del result[metrics.ROLLOUT_LOGPROB_DIFF]
    if not _corrects(settings):
        for name in CORRECTION_METRICS:
            del result[name]
    return result
