"""Self-certainty and entropy of every sampled token, taken by the rollout engine from the very
logits it samples from (`rollout.score_at_sampling`): the trainer's separate scoring forward is
then not needed for the reward.

A vLLM logits processor (V1 interface) sees each decoding step's float32 logits before
temperature, penalties and top-k/top-p. For every tagged request in the batch it computes, over
the real vocabulary (the model config's `vocab_size` columns) at the request's temperature T,
z = logits / T:

    self_certainty = logsumexp(z) - mean(z),    entropy = logsumexp(z) - sum(softmax(z) * z)

with the trainer's own pass (`scoring.self_certainty_and_entropy`: each row shifted by its max
before the sums, so nothing cancels), and files them under the request's
position: the number of tokens it has produced so far, i.e. the index of the token about to be
sampled. A later pass over the same position (a preempted request recomputed, the last chunk of
a chunked prefill) overwrites an earlier one, so each position keeps the value of the logits its
token was actually drawn from. This needs the synchronous scheduler (`async_scheduling=False`):
the asynchronous one appends placeholder tokens ahead of the logits.

The processor runs inside the engine, which runs in this process (`rollout.engine`); it files
its values in a module-level table keyed by a per-`generate` call tag, from which the engine
takes them back. A request is tagged through `SamplingParams.extra_args`; with n > 1 vLLM fans it
out into children whose seeds are the request's seed + the child's index, which tells them apart.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

import torch

from megatron_intuitor.scoring import self_certainty_and_entropy

SCORES_KEY = "megatron_intuitor_sampling_scores"  # SamplingParams.extra_args: (call, prompt)

# call tag -> (prompt index, request seed) -> position -> (self-certainty, entropy)
_TABLE: dict[int, dict[tuple[int, int], dict[int, tuple[float, float]]]] = {}
_CALLS = itertools.count()


def new_call() -> int:
    """A tag for one `generate` call's requests; `take_call` returns and forgets its values."""
    call = next(_CALLS)
    _TABLE[call] = {}
    return call


def take_call(call: int) -> dict[tuple[int, int], dict[int, tuple[float, float]]]:
    return _TABLE.pop(call)


def per_token(values: dict[int, tuple[float, float]], num_tokens: int,
              where: str) -> tuple[list[float], list[float]]:
    """The (self-certainty, entropy) lists of a response of `num_tokens` tokens; every position
    must have been filed."""
    missing = [position for position in range(num_tokens) if position not in values]
    if missing:
        raise RuntimeError(f"sampling scores of {where}: no value for token positions "
                           f"{missing[:5]} of {num_tokens} (was the engine's asynchronous "
                           f"scheduler on?)")
    return ([values[position][0] for position in range(num_tokens)],
            [values[position][1] for position in range(num_tokens)])


def token_scores(logits: torch.Tensor, temperatures: Sequence[float],
                 vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(self-certainty, entropy) per row of `logits` [rows, >= vocab_size] at that row's
    temperature, over the first `vocab_size` columns, in float32: one
    `scoring.self_certainty_and_entropy` pass per distinct temperature (the batch's requests
    usually share one)."""
    if len(temperatures) != logits.shape[0]:
        raise ValueError(f"{len(temperatures)} temperatures for {logits.shape[0]} rows of logits")
    certainty = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(certainty)
    for temperature in sorted(set(temperatures)):
        rows = torch.tensor([row for row, value in enumerate(temperatures)
                             if value == temperature], device=logits.device)
        certainty[rows], entropy[rows] = self_certainty_and_entropy(
            logits[rows], temperature=temperature, vocab_size=vocab_size)
    return certainty, entropy


def processor_class():
    """The vLLM logits processor class (vllm imported only here)."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    class SamplingScores(LogitsProcessor):
        """Files each tagged request's self-certainty and entropy per position; the logits
        pass through unchanged."""

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
            self.vocab_size = vllm_config.model_config.get_vocab_size()
            # batch row -> (temperature, the request's live output token list, its values)
            self.rows: dict[int, tuple[float, list[int], dict]] = {}

        def is_argmax_invariant(self) -> bool:
            return False  # so that vLLM hands over the logits before temperature and top-k/p

        def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
            if batch_update is None:
                return
            for row in batch_update.removed:
                self.rows.pop(row, None)
            for row, params, _, output_token_ids in batch_update.added:
                tag = (params.extra_args or {}).get(SCORES_KEY)
                if tag is None or tag[0] not in _TABLE:
                    self.rows.pop(row, None)
                    continue
                call, prompt = tag
                values = _TABLE[call].setdefault((prompt, params.seed), {})
                self.rows[row] = (params.temperature, output_token_ids, values)
            for source, target, direction in batch_update.moved:
                moving = self.rows.pop(source, None)
                if direction == MoveDirectionality.SWAP:
                    swapped = self.rows.pop(target, None)
                    if swapped is not None:
                        self.rows[source] = swapped
                if moving is not None:
                    self.rows[target] = moving
                else:
                    self.rows.pop(target, None)

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            rows = sorted(self.rows)
            index = torch.tensor(rows, device=logits.device)
            certainty, entropy = token_scores(logits[index], [self.rows[row][0] for row in rows],
                                              self.vocab_size)
            for row, value, spread in zip(rows, certainty.tolist(), entropy.tolist()):
                _, output_token_ids, values = self.rows[row]
                values[len(output_token_ids)] = (value, spread)
            return logits

    return SamplingScores
