"""The training batch: rollouts as right-padded token tensors, and how it is cut into
data-parallel shards and micro-batches (fixed sizes or a token budget; padded or packed).

Layout, row i = prompt_i + response_i then padding: position t holds token t; a response token at
t is scored by the logits at t-1 (the scoring shifts). `response_mask[i, t]` is True where token t
is a response token, so every per-token tensor here is aligned on token positions.
Right padding keeps causal attention exact for the real tokens without an attention mask.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional, Sequence

import torch

# RolloutBatch.routed_experts of a token the engine routed to no expert: the router's own top-k
NO_ROUTING = -1


@dataclass(frozen=True)
class RolloutBatch:
    """The step's sampled responses as token tensors, before anything is scored."""

    input_ids: torch.Tensor  # [B, L] long, pad-filled after the last real token
    response_mask: torch.Tensor  # [B, L] bool: token t is a response token
    lengths: torch.Tensor  # [B] long: prompt + response tokens
    group_index: torch.Tensor  # [B] long: the prompt a response answers (GRPO group)
    rollout_log_probs: torch.Tensor  # [B, L] float: engine log-prob of token t (0 off-response)
    # [B, L] float, from the engine's logits at sampling time (rollout.score_at_sampling)
    sampling_self_certainty: Optional[torch.Tensor] = None
    sampling_entropy: Optional[torch.Tensor] = None
    # [B, L, layers, top_k] int16: the engine's experts for token t (global ids; -1 where the
    # engine routed none: a sequence's last token, padding), for routing replay
    routed_experts: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]):
        return type(self)(**{f.name: None if getattr(self, f.name) is None
                             else fn(f.name, getattr(self, f.name)) for f in fields(self)})

    def select(self, index: torch.Tensor | slice):
        """The rows `index`, as a batch of the same kind."""
        return self._map(lambda _, tensor: tensor[index])

    def trimmed(self):
        """Drop the padding columns no row needs (after selecting a subset of rows)."""
        width = int(self.lengths.max())
        return self._map(lambda name, tensor: tensor[:, :width] if name in _TOKEN_FIELDS
                         else tensor)

    def for_update(self, advantages: torch.Tensor, old_log_probs: Optional[torch.Tensor],
                   ref_log_probs: Optional[torch.Tensor]) -> "TrainingBatch":
        """These rollouts with what the PPO update needs besides them (old log-probs None: the
        update's own forward, detached, on-policy)."""
        return TrainingBatch(**{f.name: getattr(self, f.name) for f in fields(RolloutBatch)},
                             advantages=advantages, old_log_probs=old_log_probs,
                             ref_log_probs=ref_log_probs)


@dataclass(frozen=True, kw_only=True)
class TrainingBatch(RolloutBatch):
    """Rollouts plus their advantages and pre-update log-probs: what one PPO update reads."""

    advantages: torch.Tensor  # [B]
    # [B, L] the rollout-time policy; None: on-policy, the update's own forward (detached)
    old_log_probs: Optional[torch.Tensor]
    ref_log_probs: Optional[torch.Tensor]  # [B, L] the reference model; None without a KL term


_TOKEN_FIELDS = {"input_ids", "response_mask", "rollout_log_probs", "sampling_self_certainty",
                 "sampling_entropy", "old_log_probs", "ref_log_probs", "routed_experts"}


def batch_from_rollouts(samples: Sequence, pad_token_id: int) -> RolloutBatch:
    """Pack `RolloutSample`s (prompt/response ids, per-token log-probs and, when every sample
    has them, the engine's routed experts) into a RolloutBatch."""
    if not samples:
        raise ValueError("no rollouts to train on")
    lengths = [len(s.prompt_token_ids) + len(s.response_token_ids) for s in samples]
    batch, width = len(samples), max(lengths)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    scored = all(s.self_certainty is not None for s in samples)
    per_token = {name: torch.zeros((batch, width), dtype=torch.float32) for name in
                 ("log_probs", *(("self_certainty", "entropy") if scored else ()))}
    for row, sample in enumerate(samples):
        prompt_len, end = len(sample.prompt_token_ids), lengths[row]
        input_ids[row, :end] = torch.tensor(sample.prompt_token_ids + sample.response_token_ids)
        response_mask[row, prompt_len:end] = True
        for name, values in per_token.items():
            values[row, prompt_len:end] = torch.tensor(getattr(sample, name),
                                                       dtype=torch.float32)
    return RolloutBatch(input_ids=input_ids, response_mask=response_mask,
                        lengths=torch.tensor(lengths),
                        group_index=torch.tensor([s.prompt_index for s in samples]),
                        rollout_log_probs=per_token["log_probs"],
                        sampling_self_certainty=per_token.get("self_certainty"),
                        sampling_entropy=per_token.get("entropy"),
                        routed_experts=_routed_experts(samples, width))


def _routed_experts(samples: Sequence, width: int) -> Optional[torch.Tensor]:
    """[B, width, layers, top_k] of the samples' `routed_experts` (each [tokens - 1, layers,
    top_k]: the engine routes every token it feeds to the model, all but the last sampled one),
    NO_ROUTING elsewhere; None unless every sample has them."""
    if not samples or any(s.routed_experts is None for s in samples):
        return None
    per_token = samples[0].routed_experts.shape[1:]
    routed = torch.full((len(samples), width, *per_token), NO_ROUTING, dtype=torch.int16)
    for row, sample in enumerate(samples):
        experts = torch.from_numpy(sample.routed_experts.astype("int16"))
        tokens = len(sample.prompt_token_ids) + len(sample.response_token_ids)
        if experts.shape[1:] != per_token or len(experts) > tokens:
            raise ValueError(f"rollout sample {row}: routed experts of shape "
                             f"{tuple(experts.shape)} for {tokens} tokens (expected at most "
                             f"{tokens} x {tuple(per_token)})")
        routed[row, :len(experts)] = experts
    return routed


def data_parallel_shard(batch: RolloutBatch, dp_rank: int, dp_size: int) -> RolloutBatch:
    """This DP rank's contiguous share of the rows (the controller checks divisibility)."""
    if len(batch) % dp_size:
        raise ValueError(f"batch of {len(batch)} rollouts does not split over {dp_size} "
                         f"data-parallel ranks")
    share = len(batch) // dp_size
    return batch.select(slice(dp_rank * share, (dp_rank + 1) * share))


@dataclass(frozen=True)
class MicroBatching:
    """How a data-parallel rank cuts its rows into micro-batches and lays them out for the model.

    Fixed: `micro_batch_size` rows per micro-batch, in order. Dynamic (`max_tokens` > 0): rows
    sorted by length, longest first, and grouped greedily under a token budget; the budget counts
    what the model computes on: the real tokens with `packed` (sequence packing, THD), rows x
    longest row without. A row longer than the budget gets a micro-batch of its own (a sequence
    cannot be split). Callers scatter results back through the row indices."""

    micro_batch_size: int = 0
    max_tokens: int = 0
    packed: bool = True

    def __post_init__(self) -> None:
        if min(self.micro_batch_size, self.max_tokens) < 0 or not (
                self.micro_batch_size or self.max_tokens):
            raise ValueError(f"MicroBatching needs micro_batch_size > 0 or a token budget "
                             f"max_tokens > 0, got micro_batch_size={self.micro_batch_size}, "
                             f"max_tokens={self.max_tokens}")

    def tokens(self, lengths: Sequence[int]) -> int:
        """What one micro-batch of rows of these lengths costs the model, in tokens."""
        return sum(lengths) if self.packed else len(lengths) * max(lengths)

    def partition(self, lengths: torch.Tensor) -> list[torch.Tensor]:
        """Row indices of each micro-batch for rows of `lengths` real tokens."""
        if not self.max_tokens:
            return list(torch.arange(len(lengths)).split(self.micro_batch_size))
        groups: list[list[int]] = []
        group_lengths: list[int] = []
        for row in torch.argsort(lengths, descending=True, stable=True).tolist():
            length = int(lengths[row])
            if groups and self.tokens(group_lengths + [length]) <= self.max_tokens:
                groups[-1].append(row)
                group_lengths.append(length)
            else:
                groups.append([row])
                group_lengths = [length]
        return [torch.tensor(rows) for rows in groups]


def group_mini_batches(batch: RolloutBatch, prompts_per_mini_batch: int,
                       generator: Optional[torch.Generator]) -> list[torch.Tensor]:
    """Row indices of the PPO mini-batches: whole prompt groups (a group's responses share one
    z-score), `prompts_per_mini_batch` groups each, in a random order drawn from `generator`, or
    in prompt order without one (verl's unshuffled split)."""
    groups = batch.group_index.unique(sorted=True)
    order = groups if generator is None else groups[torch.randperm(len(groups),
                                                                   generator=generator)]
    return [torch.isin(batch.group_index, chosen).nonzero().squeeze(-1)
            for chosen in order.split(prompts_per_mini_batch)]
