"""Self-certainty best-of-N at evaluation: sample N responses per prompt, keep the one the model
is most certain of, and report it next to greedy accuracy, majority vote and pass@N.

Per validation dataset (`val/<data_source>/...`):

    acc_sc_best_of_<N>  the response with the highest self-certainty, graded (first on ties)
    maj@<N>             the response whose extracted final answer is the most common, graded
                        (first of the answers tied for most common; a response without an
                        answer does not vote); left out for code, which has no short answer
    pass@<N>            any of the N responses graded correct

Self-certainty of a response is its token mean of `logsumexp(z) - mean(z)` over the real
vocabulary, z = logits / temperature: the INTUITOR reward, from the same scorer
(`scoring.vocab_parallel_token_scores`). Answers are compared as strings after the grader's own
extraction (`\\boxed{}` or the last number for math, the chosen label for multiple choice), so
equivalent but differently written math answers ("0.5", "\\frac{1}{2}") vote apart.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

import torch

from megatron_intuitor import scoring
from megatron_intuitor.evaluation.arc import extract_choice
from megatron_intuitor.evaluation.math import (last_boxed, last_boxed_span, last_number,
                                               last_number_span)
from megatron_intuitor.evaluation.registry import (TASK_CODE, TASK_MATH, TASK_MULTIPLE_CHOICE,
                                                   grade_record)


def metric_names(dataset: str, n: int) -> dict[str, str]:
    """{"best", "majority", "pass"} -> the metric names of one dataset at N samples."""
    return {"best": f"val/{dataset}/acc_sc_best_of_{n}", "majority": f"val/{dataset}/maj@{n}",
            "pass": f"val/{dataset}/pass@{n}"}


def most_certain(self_certainty: Sequence[float]) -> int:
    """Index of the highest self-certainty (the first on ties)."""
    if not self_certainty:
        raise ValueError("no responses to choose from")
    return max(range(len(self_certainty)), key=lambda i: (self_certainty[i], -i))


def extract_answer(record: Any, response: str) -> Optional[str]:
    """The final answer a grader would read from `response`, as a string; None when there is
    none or the task has no short answer (code)."""
    if record.task == TASK_MATH:
        answer = last_boxed(response)
        answer = last_number(response) if answer is None else answer
        return None if answer is None else "".join(answer.split())
    if record.task == TASK_MULTIPLE_CHOICE:
        labels = record.extra.get("labels") or (list("12345") if record.ground_truth.isdigit()
                                                else list("ABCDE"))
        return extract_choice(response, labels)
    if record.task == TASK_CODE:
        return None
    raise ValueError(f"{record.location}: no answer extraction for task {record.task!r}")


def answer_token_mask(record: Any, response: str,
                      token_ends: Sequence[int]) -> Optional[list[bool]]:
    """Per response token, whether it overlaps the characters of the final answer
    `extract_answer` reads (math only: the last box's content, else the last number); token i
    covers characters token_ends[i - 1]..token_ends[i] of `response`. None: no answer, or a task
    other than math."""
    if record.task != TASK_MATH:
        return None
    span = last_boxed_span(response) or last_number_span(response)
    if span is None or span[0] == span[1]:
        return None
    starts = [0, *token_ends[:-1]]
    return [start < span[1] and end > span[0] for start, end in zip(starts, token_ends)]


def majority_index(answers: Sequence[Optional[str]]) -> Optional[int]:
    """Index of the first response giving the most common answer (ties: the answer seen
    first); None when no response has an answer."""
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, answer in enumerate(answers)
                if answer is not None and counts[answer] == top)


def best_of_n_metrics(records: Sequence[Any], responses: Sequence[Sequence[str]],
                      self_certainty: Sequence[Sequence[float]]) -> dict[str, float]:
    """acc_sc_best_of_N, maj@N and pass@N per data source over prompts `records[i]` with their
    N `responses[i]` and the responses' sequence self-certainty `self_certainty[i]`."""
    if not (len(records) == len(responses) == len(self_certainty)) or not records:
        raise ValueError(f"best-of-N needs one entry per prompt: {len(records)} records, "
                         f"{len(responses)} response lists, {len(self_certainty)} score lists")
    n = len(responses[0])
    for index, (texts, scores) in enumerate(zip(responses, self_certainty)):
        if len(texts) != n or len(scores) != n:
            raise ValueError(f"prompt {index}: {len(texts)} responses and {len(scores)} scores, "
                             f"expected N={n} of each")
    totals: dict[str, dict[str, float]] = {}
    for record, texts, scores in zip(records, responses, self_certainty):
        correct = [grade_record(record, text) for text in texts]
        entry = totals.setdefault(record.data_source, Counter())
        entry["prompts"] += 1
        entry["best"] += correct[most_certain(scores)]
        entry["pass"] += any(correct)
        if record.task != TASK_CODE:
            voted = majority_index([extract_answer(record, text) for text in texts])
            entry["majority"] += voted is not None and correct[voted]
            entry["voting_prompts"] += 1
    result = {}
    for source, entry in totals.items():
        names = metric_names(source, n)
        result[names["best"]] = entry["best"] / entry["prompts"]
        result[names["pass"]] = entry["pass"] / entry["prompts"]
        if entry["voting_prompts"]:
            result[names["majority"]] = entry["majority"] / entry["voting_prompts"]
    return result


@torch.no_grad()
def hf_sequence_self_certainty(model: torch.nn.Module, prompt_ids: Sequence[int],
                               responses: Sequence[Sequence[int]], temperature: float,
                               vocab_size: int) -> list[float]:
    """Sequence self-certainty of each response to one prompt under a transformers causal LM,
    through the trainer's scorer (`scoring.vocab_parallel_token_scores`, one shard). Responses
    are right-padded into one batch; an empty response scores 0."""
    if not responses:
        return []
    prompt_len = len(prompt_ids)
    width = prompt_len + max(len(ids) for ids in responses)
    input_ids = torch.zeros(len(responses), width, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for row, ids in enumerate(responses):
        end = prompt_len + len(ids)
        input_ids[row, :end] = torch.tensor(list(prompt_ids) + list(ids), dtype=torch.long)
        attention[row, :end] = 1
        mask[row, prompt_len:end] = True
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device),
                   attention_mask=attention.to(device)).logits.float().cpu()
    # the logits at t - 1 predict token t; position 0 predicts nothing a response holds
    scores = scoring.vocab_parallel_token_scores(
        logits[:, :-1], input_ids[:, 1:], temperature=temperature, vocab_size=vocab_size)
    return scoring.masked_mean_per_sequence(scores.self_certainty, mask[:, 1:]).tolist()
