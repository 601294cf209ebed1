"""The float64 oracle of the per-token scores that every test holds the package's arithmetic
against (`megatron_intuitor.scoring`'s fused pass, the rollout engine's sampling scores, the PPO
head, best-of-N): the definitions as written, with nothing fused, shifted or chunked.

For the logits `z` over the real vocabulary (the first `vocab_size` columns), divided by the
temperature T, in float64:

    log_prob       = log_softmax(z)[target]
    entropy        = -sum(softmax(z) * log_softmax(z))
    self_certainty = logsumexp(z) - mean(z)

It lives in tests/ (importable from any test: pytest.ini puts tests/ on sys.path), not in the
package, so that no change to the production formulas can move the reference with them.
Gradients flow through it (float64 autograd is the reference for the fused backward).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch


class ReferenceScores(NamedTuple):
    log_probs: Optional[torch.Tensor]  # None when no targets were given
    entropy: torch.Tensor
    self_certainty: torch.Tensor


def reference_token_scores(logits: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                           temperature: Union[float, torch.Tensor] = 1.0,
                           vocab_size: Optional[int] = None) -> ReferenceScores:
    """float64 scores of every row of `logits` [..., V]: row i predicts `targets[i]` [...].
    `temperature` is a number or a tensor broadcasting against [..., 1]; `vocab_size` None
    means every column is real."""
    z = logits[..., :vocab_size].double() / temperature
    log_softmax = torch.log_softmax(z, dim=-1)
    log_probs = (None if targets is None
                 else log_softmax.gather(-1, targets[..., None]).squeeze(-1))
    return ReferenceScores(log_probs=log_probs,
                           entropy=-(log_softmax.exp() * log_softmax).sum(dim=-1),
                           self_certainty=torch.logsumexp(z, dim=-1) - z.mean(dim=-1))


def reference_shifted_scores(logits: torch.Tensor, input_ids: torch.Tensor, *,
                             temperature: float = 1.0,
                             vocab_size: Optional[int] = None) -> ReferenceScores:
    """The model's layout (`models.forward.shifted_token_scores`): `logits` [b, s, V] of a
    causal LM over `input_ids` [b, s]; entry t scores token t from the logits at t - 1, and
    column 0 (no logits predict it) is 0."""
    scores = reference_token_scores(logits[:, :-1], input_ids[:, 1:], temperature=temperature,
                                    vocab_size=vocab_size)
    return ReferenceScores(*(torch.nn.functional.pad(values, (1, 0)) for values in scores))
