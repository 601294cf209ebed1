"""GSM8K and MATH500 answer checking with math-verify.

The model's final answer is the content of its last `\\boxed{...}`; without one, GSM8K falls back
to the last number in the response and MATH500 to math-verify's own extraction over the whole
response. Ground truths are wrapped in `$...$` before parsing: math-verify reads a bare LaTeX
answer only sometimes (`\\frac{14}{3}` parses bare, `\\left( 3, \\frac{\\pi}{2} \\right)` does
not: 108 of the 500 MATH500 answers fail to match their own `\\boxed{}` when left bare, none
when wrapped).

math-verify bounds each parse and comparison with `signal.alarm`, which only works on the main
thread (elsewhere it raises ValueError). On the main thread (the trainer's controller, a plain
synchronous Ray actor) we call it directly; from any other thread the check runs in a spawned
worker process, on that process's main thread, so the timeouts still hold.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from math_verify import parse, verify

DEFAULT_TIMEOUT_SECONDS = 5  # per parse and per comparison (math-verify's unit: whole seconds)

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last `\\boxed{...}` (or `\\fbox{...}`), braces
    balanced, stripped of surrounding spaces; None if none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                content = text[start:i]
                left = start + len(content) - len(content.lstrip())
                return left, max(left, start + len(content.rstrip()))
    return None  # only unclosed boxes


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none."""
    span = last_boxed_span(text)
    return None if span is None else text[span[0]:span[1]]


def last_number_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the last number in `text`; None if none."""
    match = None
    for match in _NUMBER.finditer(text):
        pass
    return None if match is None else match.span()


def last_number(text: str) -> str | None:
    """The last number in `text`, thousands separators removed ("1,234.5" -> "1234.5")."""
    span = last_number_span(text)
    return None if span is None else text[span[0]:span[1]].replace(",", "")


def gsm8k_ground_truth(answer: str) -> str:
    """The number after `####` in a GSM8K answer field (a bare number is returned as is)."""
    final = answer.rsplit("####", 1)[-1].strip().replace(",", "")
    if not final:
        raise ValueError(f"GSM8K answer has nothing after '####': {answer[-80:]!r}")
    return final


def grade_gsm8k(response: str, ground_truth: str,
                timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Whether the response's final answer equals the GSM8K ground truth (`n` or `... #### n`)."""
    answer = last_boxed(response)
    if answer is None:
        answer = last_number(response)
    if answer is None:
        return False
    return _check(_as_math(gsm8k_ground_truth(ground_truth)), f"\\boxed{{{answer}}}",
                  timeout_seconds)


def grade_math(response: str, ground_truth: str,
               timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS) -> bool:
    """Whether the response's final answer is equivalent to the LaTeX ground truth (MATH500)."""
    if not ground_truth.strip():
        raise ValueError("MATH ground truth is empty")
    answer = last_boxed(response)
    return _check(_as_math(ground_truth),
                  response if answer is None else f"\\boxed{{{answer}}}", timeout_seconds)


def _as_math(latex: str) -> str:
    return latex if _UNESCAPED_DOLLAR.search(latex) else f"${latex}$"


def _check(gold_text: str, answer_text: str, timeout_seconds: int) -> bool:
    if threading.current_thread() is threading.main_thread():
        return _verify_texts(gold_text, answer_text, timeout_seconds)
    return _worker_pool().submit(_verify_texts, gold_text, answer_text, timeout_seconds).result()


def _verify_texts(gold_text: str, answer_text: str, timeout_seconds: int) -> bool:
    gold = parse(gold_text, parsing_timeout=timeout_seconds)
    if not gold:
        raise ValueError(f"math-verify cannot read the ground truth {gold_text!r}")
    answer = parse(answer_text, parsing_timeout=timeout_seconds)
    return bool(answer) and verify(gold, answer, timeout_seconds=timeout_seconds)


_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_pool() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn: forking a threaded process (this one is) can deadlock the child.
            _pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
        return _pool
