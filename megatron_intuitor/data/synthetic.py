"""The embedded default's task: synthetic arithmetic prompts ("What is 12 + 7?") made by our own
code, deterministic by seed. The answers are kept for validation only: INTUITOR trains on the
model's self-certainty, never on them."""
from __future__ import annotations

import random
from typing import Optional

from megatron_intuitor.data.records import TASK_MATH, PromptRecord

OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def operators_problem(operators: str) -> Optional[str]:
    """What is wrong with `operators` (None: a non-empty string of OPERATORS' keys)."""
    if not isinstance(operators, str) or not operators or set(operators) - set(OPERATORS):
        return f"expected a non-empty string of operators from {''.join(OPERATORS)!r}"
    return None


def _record(a: int, op: str, b: int, source: str, location: str) -> PromptRecord:
    return PromptRecord(messages=[{"role": "user", "content": f"What is {a} {op} {b}?"}],
                        ground_truth=str(OPERATORS[op](a, b)), data_source=source,
                        task=TASK_MATH, location=location)


def _check_operators(operators: str) -> None:
    problem = operators_problem(operators)
    if problem:
        raise ValueError(f"operators {operators!r}: {problem}")


def arithmetic_records(size: int, seed: int = 0, max_operand: int = 99,
                       operators: str = "+-*",
                       name: Optional[str] = None) -> list[PromptRecord]:
    """`size` prompts "What is a <op> b?" with 0 <= a, b <= max_operand; ground truth a <op> b."""
    _check_operators(operators)
    rng = random.Random(seed)
    source = name or "synthetic_arithmetic"
    records = []
    for number in range(size):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice(operators)
        records.append(_record(a, op, b, source, f"{source}(seed={seed}) #{number}"))
    return records


def arithmetic_space(max_operand: int, operators: str,
                     name: Optional[str] = None) -> list[PromptRecord]:
    """Every prompt `arithmetic_records` can draw, once each: operator-major, then a, then b."""
    _check_operators(operators)
    source = name or "synthetic_arithmetic"
    return [_record(a, op, b, source, f"{source}(space) {a} {op} {b}")
            for op in operators for a in range(max_operand + 1)
            for b in range(max_operand + 1)]
