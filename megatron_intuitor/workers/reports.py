"""What the actor ranks report to the controller each step: one number per response, never a
per-token tensor. Per-token tensors (token ids, old / reference / rollout log-probs, entropy,
self-certainty) stay on the ranks; the controller turns these figures into advantages and
metrics. Pure functions of tensors, so `bench/controller_traffic.py` measures the very objects
the ranks send."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_intuitor import algorithm
from megatron_intuitor.collapse import distinct_ngram_ratio
from megatron_intuitor.batch import RolloutBatch
from megatron_intuitor.rollout.engine import RolloutSample


@dataclass(frozen=True)
class RolloutReport:
    """The step's responses, in batch order: [responses] each."""

    group_index: torch.Tensor  # the prompt each response answers (its GRPO group)
    lengths: torch.Tensor  # prompt + response tokens
    response_lengths: torch.Tensor
    verifiable: Optional[torch.Tensor]  # graded 0/1 answer reward, when the algorithm uses it
    # collapse signals' inputs (megatron_intuitor.collapse), from the token ids on the ranks
    distinct_ngram: Optional[torch.Tensor] = None  # distinct n-gram ratio of each response
    truncated: Optional[torch.Tensor] = None  # bool: cut at max_tokens
    # each response's extracted final answer (None: none), when the algorithm uses them
    answers: Optional[list[Optional[str]]] = None


@dataclass(frozen=True)
class ScoreReport:
    """The pre-update policy's scores of some responses: [responses] each."""

    self_certainty: torch.Tensor  # INTUITOR's reward: response-mean self-certainty
    entropy_sum: torch.Tensor  # summed over the response tokens
    # |engine - Megatron| log-prob, summed over response tokens; None: scored at sampling (the
    # update's forward measures it)
    logprob_diff_sum: Optional[torch.Tensor]

    @staticmethod
    def concatenate(reports: Sequence["ScoreReport"]) -> "ScoreReport":
        """Reports of consecutive row ranges (the data-parallel shards, in order) as one."""
        return ScoreReport(*(None if getattr(reports[0], name) is None
                             else torch.cat([getattr(r, name) for r in reports])
                             for name in ("self_certainty", "entropy_sum", "logprob_diff_sum")))


def rollout_report(rollouts: RolloutBatch, verifiable: Optional[Sequence[float]],
                   samples: Optional[Sequence[RolloutSample]] = None,
                   ngram: int = 3,
                   answers: Optional[Sequence[Optional[str]]] = None) -> RolloutReport:
    """The per-response figures of `rollouts`; with its `samples` (in batch order) also each
    response's distinct `ngram`-gram ratio and whether it was cut at max_tokens."""
    return RolloutReport(
        group_index=rollouts.group_index, lengths=rollouts.lengths,
        response_lengths=rollouts.response_mask.sum(-1),
        verifiable=None if verifiable is None else torch.tensor(verifiable, dtype=torch.float32),
        distinct_ngram=None if samples is None else torch.tensor(
            [distinct_ngram_ratio(s.response_token_ids, ngram) for s in samples]),
        truncated=None if samples is None else torch.tensor(
            [s.finish_reason == "length" for s in samples]),
        answers=None if answers is None else list(answers))


def score_report(scores: dict[str, torch.Tensor], shard: RolloutBatch) -> ScoreReport:
    """Reduce a shard's per-token `entropy`, `self_certainty` and, unless they are the engine's
    own (scored at sampling), `log_probs` [rows, L] (aligned with `shard`'s token positions) to
    per-response figures."""
    mask = shard.response_mask

    def response_sum(values: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, values, torch.zeros((), dtype=values.dtype)).sum(-1)

    return ScoreReport(
        self_certainty=algorithm.sequence_rewards_from_self_certainty(scores["self_certainty"],
                                                                      mask),
        entropy_sum=response_sum(scores["entropy"]),
        logprob_diff_sum=response_sum((scores["log_probs"] - shard.rollout_log_probs).abs())
        if "log_probs" in scores else None)


def sampling_score_report(shard: RolloutBatch) -> ScoreReport:
    """The per-response figures of the engine's own per-token scores, taken at sampling."""
    return score_report({"self_certainty": shard.sampling_self_certainty,
                         "entropy": shard.sampling_entropy}, shard)
