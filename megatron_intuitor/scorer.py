"""Which model's self-certainty is INTUITOR's reward (`algorithm.scorer`).

- `online` (the default): the policy that generated the step, as INTUITOR's paper.
- `ema`: a slowly updated copy of the policy (Co-rewarding-II, arXiv 2508.00410), after every
  training step moved towards the policy: ema <- (1 - a) * ema + a * policy, where the policy's
  weight `a` follows the paper's cosine annealing from `alpha_start` to `alpha_end` over the run
  (their code, tmlr-group/Co-rewarding, `Co-rewarding-II/verl/workers/sharding_manager/
  fsdp_vllm.py::update_alpha`; their run script sets alpha_start=0.01, alpha_end=1e-5, one
  update per training step). `alpha_start == alpha_end` gives a constant decay 1 - a.
- `frozen`: the start weights (the reference model when the KL term keeps one).

Co-rewarding-II's teacher labels answers by majority vote; here it scores self-certainty, the
same slowly moving model in INTUITOR's reward. The copy is sharded exactly like the policy
(same TP/PP chunks, replicated over DP), so the update is shard-local: no communication.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch
from omegaconf import DictConfig

from megatron_intuitor.value_rules import Rule, choice, is_number

SCORERS = ("online", "ema", "frozen")
# the `reward/scorer` metric's value for each scorer (a number, so loggers can plot it)
SCORER_IDS = {name: float(index) for index, name in enumerate(SCORERS)}


@dataclass(frozen=True)
class ScorerSettings:
    """The reward's scorer and, for `ema`, the cosine schedule of the policy's weight."""

    scorer: str = "online"  # SCORERS
    alpha_start: float = 0.01  # the policy's weight in the first update
    alpha_end: float = 1e-5  # ... and in the last (training step `total_steps`)

    RULES: ClassVar[tuple[Rule, ...]] = (
        choice("algorithm.scorer", SCORERS),
        ("algorithm.scorer_ema.alpha_start", lambda v: is_number(v) and 0 <= v <= 1,
         "a number in [0, 1] (the policy's weight in the EMA update)"),
        ("algorithm.scorer_ema.alpha_end", lambda v: is_number(v) and 0 <= v <= 1,
         "a number in [0, 1] (the policy's weight in the EMA update)"),
    )

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> ScorerSettings:
        algorithm = cfg.algorithm
        return cls(scorer=algorithm.scorer, alpha_start=float(algorithm.scorer_ema.alpha_start),
                   alpha_end=float(algorithm.scorer_ema.alpha_end))

    def policy_weight(self, step: int, total_steps: int) -> float:
        """The policy's weight `a` in the EMA update after training step `step` (1-based):
        a(t) = end + (start - end) * (1 + cos(pi * t / T)) / 2, t = min(step, T). The paper
        updates at the start of step s with t = s - 1 and the policy of s - 1 updates, which is
        this update, made at the end of step s - 1."""
        t = min(max(step, 0), total_steps)
        return self.alpha_end + 0.5 * (self.alpha_start - self.alpha_end) * (
            1.0 + math.cos(math.pi * t / max(total_steps, 1)))


def _named_parameters(chunks: Sequence[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    from megatron.core.utils import unwrap_model  # DDP's "module." prefix off

    return {f"{index}.{name}": param for index, chunk in enumerate(chunks)
            for name, param in unwrap_model(chunk).named_parameters()}


@torch.no_grad()
def ema_update_(ema_chunks: Sequence[torch.nn.Module], policy_chunks: Sequence[torch.nn.Module],
                policy_weight: float) -> None:
    """ema <- (1 - policy_weight) * ema + policy_weight * policy, in place, tensor by tensor on
    this rank's shards (the policy's values cast to the EMA's dtype). The two must be built
    alike (same chunks, names and shapes): else a ValueError naming the tensor."""
    ema, policy = _named_parameters(ema_chunks), _named_parameters(policy_chunks)
    if ema.keys() != policy.keys():
        differ = sorted(ema.keys() ^ policy.keys())
        raise ValueError(f"EMA scorer and policy have different parameters: {differ[:3]}")
    for name, target in ema.items():
        source = policy[name]
        if source.shape != target.shape:
            raise ValueError(f"EMA scorer tensor {name} has shape {tuple(target.shape)}, the "
                             f"policy's {tuple(source.shape)}")
        target.lerp_(source.to(target.dtype), policy_weight)
