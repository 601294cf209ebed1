"""Which grader a dataset uses, and accuracy over a validation set.

By dataset name: `grade("gsm8k", response, ground_truth)`, where the ground truth is the
dataset's row (a mapping) or its bare answer: GSM8K `answer` (`... #### n`) or `n`; MATH500
`answer` (LaTeX); ARC the row (`choices`, `answerKey`) or the key alone; HumanEval the problem
row or its `task_id`.

By record: `grade_record(record, response)` takes a `data.PromptRecord` (`data_source`, `task`,
`ground_truth`, `extra`) and grades by its task, so datasets of any name work: multiple choice
(ARC), code (HumanEval), math (GSM8K / MATH500 by name; otherwise a numeric ground truth, as in
the synthetic arithmetic set, is graded like GSM8K and any other like MATH).
`validation_metrics(records, responses)` gives `{"val/<data_source>/acc": ...}` for the trainer.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from megatron_intuitor.data.records import TASK_CODE, TASK_MATH, TASK_MULTIPLE_CHOICE
from megatron_intuitor.evaluation.arc import arc_row_answer, grade_arc
from megatron_intuitor.evaluation.code import grade_humaneval
from megatron_intuitor.evaluation.math import grade_gsm8k, grade_math
from megatron_intuitor.metrics import val_accuracy as metric_name

GroundTruth = Mapping | str
Grader = Callable[[str, GroundTruth], bool]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _answer_field(dataset: str, grader: Callable[[str, str], bool]) -> Grader:
    def grade_row(response: str, ground_truth: GroundTruth) -> bool:
        if isinstance(ground_truth, str):
            return grader(response, ground_truth)
        if "answer" not in ground_truth:
            raise ValueError(f"{dataset} row has no 'answer' field: {dict(ground_truth)!r:.200}")
        return grader(response, str(ground_truth["answer"]))
    return grade_row


def _arc(response: str, ground_truth: GroundTruth) -> bool:
    if isinstance(ground_truth, str):
        return grade_arc(response, ground_truth)
    return grade_arc(response, *arc_row_answer(ground_truth))


_GRADERS: dict[str, Grader] = {
    "gsm8k": _answer_field("gsm8k", grade_gsm8k),
    "math500": _answer_field("math500", grade_math),
    "arc_challenge": _arc,
    "humaneval": grade_humaneval,
}
DATASETS = tuple(_GRADERS)
# Program runs wait on subprocesses, so threads overlap them; the math graders' signal
# timeouts want the calling (main) thread.
_THREADED = {"humaneval", TASK_CODE}


def grade(dataset: str, response: str, ground_truth: GroundTruth) -> bool:
    """Whether `response` answers the `dataset` row `ground_truth` correctly."""
    if dataset not in _GRADERS:
        raise ValueError(f"no grader for dataset {dataset!r}; known: {', '.join(DATASETS)}")
    return _GRADERS[dataset](response, ground_truth)


def accuracy(dataset: str, responses: Sequence[str], ground_truths: Sequence[GroundTruth],
             max_workers: int = 4) -> float:
    """Fraction of responses graded correct (pass@1 for HumanEval with one greedy response)."""
    _check_lengths(dataset, responses, ground_truths)
    correct = _map(lambda r, g: grade(dataset, r, g), responses, ground_truths,
                   threaded=dataset in _THREADED, max_workers=max_workers)
    return sum(correct) / len(correct)


def grade_record(record: Any, response: str) -> bool:
    """Grade against a `data.PromptRecord` by its task (and its data_source for math)."""
    if record.task == TASK_MULTIPLE_CHOICE:
        return grade_arc(response, record.ground_truth, record.extra.get("labels"))
    if record.task == TASK_CODE:
        return grade_humaneval(response, record.extra)
    if record.task == TASK_MATH:
        if record.data_source in ("gsm8k", "math500"):
            return grade(record.data_source, response, record.ground_truth)
        numeric = _NUMBER.fullmatch(record.ground_truth.replace(",", "").strip())
        return (grade_gsm8k if numeric else grade_math)(response, record.ground_truth)
    raise ValueError(f"{record.location}: no grader for task {record.task!r} "
                     f"(data_source {record.data_source!r})")


def validation_metrics(records: Sequence[Any], responses: Sequence[str],
                       max_workers: int = 4) -> dict[str, float]:
    """`{"val/<data_source>/acc": accuracy}` over records and their (greedy) responses."""
    _check_lengths("validation", responses, records)
    by_source: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_source[record.data_source].append(index)
    metrics = {}
    for source, indices in by_source.items():
        picked = [records[i] for i in indices]
        correct = _map(grade_record, picked, [responses[i] for i in indices],
                       threaded=picked[0].task in _THREADED, max_workers=max_workers)
        metrics[metric_name(source)] = sum(correct) / len(correct)
    return metrics


def _check_lengths(what: str, responses: Sequence, rows: Sequence) -> None:
    if len(responses) != len(rows):
        raise ValueError(f"{what}: {len(responses)} responses for {len(rows)} rows")
    if not responses:
        raise ValueError(f"{what}: no responses to grade")


def _map(fn: Callable[[Any, Any], bool], xs: Sequence, ys: Sequence, *, threaded: bool,
         max_workers: int) -> list[bool]:
    if threaded and max_workers > 1:
        with ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(fn, xs, ys))
    return [fn(x, y) for x, y in zip(xs, ys)]
