"""What a dataset row becomes: a `PromptRecord`, the dataset formats, and the record tasks
(a record's task picks its grader in `evaluation/registry.py`). Imports nothing heavy, so that
`config` can validate `data.format` without loading the readers or the graders."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

FORMAT_ALIASES = {"math500": "math", "arc_challenge": "arc"}
FORMATS = ("auto", "gsm8k", "math", "math500", "arc", "arc_challenge", "humaneval", "prompt",
           "synthetic")
TASK_MATH, TASK_MULTIPLE_CHOICE, TASK_CODE = "math", "multiple_choice", "code"


@dataclass
class PromptRecord:
    """One prompt as read from a dataset, before the chat template."""

    messages: list[dict[str, str]]  # chat messages; the configured system prompt is added later
    ground_truth: Optional[str]  # reference answer for the grader; None: no verifiable answer
    data_source: str  # dataset name: validation metrics are `val/<data_source>/acc`
    task: Optional[str]  # TASK_MATH / TASK_MULTIPLE_CHOICE / TASK_CODE; None: no grader
    location: str  # "<file>:<line>" (JSONL) or "<file> row <n>" (parquet), for messages
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific grader fields
