"""Label-free rewards and prompt filters next to self-certainty, from the group's own answers or
from nothing at all. Pure functions over one step's responses (no config, no model).

- `plurality_vote_rewards`: 1 for a response whose extracted answer is its group's most common
  one, else 0. Summed with self-certainty, each z-scored within the group
  (`algorithm.hybrid_advantages`), it is the "self-certainty + answer vote" reward of arXiv
  2605.22620.
- `answer_entropy` and `entropy_band_keep`: the entropy of each group's answer distribution, and
  which groups lie inside a band (EMPO, arXiv 2504.05812: groups that all agree carry no signal,
  groups that all disagree carry noise); `drop_groups` zeroes the advantages of the others.
- `random_rewards`: i.i.d. standard normal rewards, the control that moves the policy as much as
  a z-scored reward does without any direction (arXiv 2506.10947).

Answers are the strings `evaluation.best_of_n.extract_answer` reads (None: no answer). A
response without an answer never votes and is its own singleton in the entropy: it agrees with
nothing.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Optional

import torch

from megatron_intuitor.algorithm import GroupIndex, _group_ids


def plurality_vote_rewards(answers: Sequence[Optional[str]],
                           group_index: GroupIndex) -> torch.Tensor:
    """Per response: 1.0 if its answer is the most common answer of its group (ties: the one
    seen first in the group), else 0.0 (also for no answer, or a group without answers)."""
    ids, keys = _group_ids(group_index, len(answers))
    winners: list[Optional[str]] = []
    for group in range(len(keys)):
        group_answers = [a for a, g in zip(answers, ids.tolist()) if g == group and a is not None]
        counts = Counter(group_answers)
        top = max(counts.values(), default=0)
        winners.append(next((a for a in group_answers if counts[a] == top), None))
    return torch.tensor([float(a is not None and a == winners[g])
                         for a, g in zip(answers, ids.tolist())], dtype=torch.float32)


def answer_entropy(answers: Sequence[Optional[str]], group_index: GroupIndex) -> torch.Tensor:
    """Per group (in order of first appearance): the entropy, in nats, of its responses'
    answers, each answer-less response a distinct answer of its own."""
    ids, keys = _group_ids(group_index, len(answers))
    entropies = []
    for group in range(len(keys)):
        group_answers = [a for a, g in zip(answers, ids.tolist()) if g == group]
        counts = Counter(a for a in group_answers if a is not None)
        sizes = list(counts.values()) + [1] * sum(a is None for a in group_answers)
        total = len(group_answers)
        entropies.append(-sum(c / total * math.log(c / total) for c in sizes))
    return torch.tensor(entropies, dtype=torch.float64)


def entropy_band_keep(entropy: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per group: whether low <= entropy <= high."""
    if not 0 <= low <= high:
        raise ValueError(f"entropy band [{low}, {high}]: expected 0 <= low <= high")
    return (entropy >= low) & (entropy <= high)


def drop_groups(advantages: torch.Tensor, group_index: GroupIndex,
                keep: torch.Tensor) -> torch.Tensor:
    """The advantages with those of the groups not kept (`keep[g]` False, g in order of first
    appearance) set to 0: their responses still count in the token mean and the KL term, but
    move nothing."""
    ids, keys = _group_ids(group_index, advantages.numel())
    if keep.numel() != len(keys):
        raise ValueError(f"keep has {keep.numel()} entries for {len(keys)} groups")
    return advantages * keep.to(advantages.device)[ids.to(advantages.device)].to(advantages.dtype)


def entropy_band_filter(advantages: torch.Tensor, answers: Sequence[Optional[str]],
                        group_index: GroupIndex, low: float,
                        high: float) -> tuple[torch.Tensor, int]:
    """(the advantages with those of the groups whose answer entropy is outside [low, high]
    zeroed, the number of such groups)."""
    keep = entropy_band_keep(answer_entropy(answers, group_index), low, high)
    return drop_groups(advantages, group_index, keep), int((~keep).sum())


def random_rewards(count: int, seed: int) -> torch.Tensor:
    """`count` i.i.d. N(0, 1) rewards from a generator seeded with `seed` (one seed per step:
    reproducible, independent of the responses)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, generator=generator, dtype=torch.float32)
