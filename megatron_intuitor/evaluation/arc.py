"""ARC-Challenge grading: which choice label (A-E, or 1-5 in some rows) did the response pick?

Evidence, strongest first; within each kind the last occurrence wins (models restate and
correct themselves before concluding):
1. the last `\\boxed{...}`: a bare label (`B`, `(B)`, `\\text{B}`), a label opening the choice
   (`B. Planetary days...`), or the exact text of one choice;
2. an answer phrase: "the answer is (B)", "Answer: B", "the correct option is **B**" (not a bare
   "option B", which also introduces options being ruled out);
3. a response that opens with a label: "C", "(C)", "C. Planetary days ...";
4. a parenthesised label anywhere: "... so (C) holds".
Letters count only in upper case: a lowercase "a" is an English word.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from megatron_intuitor.evaluation.math import last_boxed

_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_ANSWER_PHRASE = re.compile(
    r"(?i:answer|correct\s+option|correct\s+choice)\s*(?i:is|would be|should be)?\s*[:\-]?"
    r"\s*(?i:option|choice)?\s*[*(\[]*\s*([A-Z]|\d)\s*[*)\]]*(?![\w])")
_OPENING_LABEL = re.compile(r"^\s*[*(\[]*([A-Z]|\d)(?:[*)\].:]|\s*$)")
_PARENTHESISED_LABEL = re.compile(r"\(([A-Z]|\d)\)")
_STRIP = " \t\n$*.:()[]"


def arc_row_answer(row: Mapping) -> tuple[str, list[str], list[str]]:
    """(answerKey, choice labels, choice texts) of an ARC row."""
    try:
        key, labels = str(row["answerKey"]).strip(), list(row["choices"]["label"])
        texts = list(row["choices"].get("text", []))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"ARC row lacks answerKey or choices.label: {dict(row)!r:.200}") from e
    return key, labels, texts


def extract_choice(response: str, labels: Sequence[str],
                   choice_texts: Sequence[str] = ()) -> str | None:
    """The label the response chose, or None when it names none of `labels`."""
    boxed = last_boxed(response)
    if boxed is not None:
        label = _label_in_box(boxed, labels, choice_texts)
        if label is not None:
            return label
    for pattern in (_ANSWER_PHRASE, _OPENING_LABEL, _PARENTHESISED_LABEL):
        found = [m.group(1) for m in pattern.finditer(response) if m.group(1) in labels]
        if found:
            return found[-1]
    return None


def grade_arc(response: str, answer_key: str, labels: Sequence[str] | None = None,
              choice_texts: Sequence[str] = ()) -> bool:
    """Whether the response picked `answer_key` among `labels` (default: A-E, or 1-5 for a
    numeric key)."""
    key = answer_key.strip()
    if labels is None:
        labels = list("12345") if key.isdigit() else list("ABCDE")
    if key not in labels:
        raise ValueError(f"ARC answer key {key!r} is not one of the labels {list(labels)}")
    return extract_choice(response, labels, choice_texts) == key


def _label_in_box(boxed: str, labels: Sequence[str], choice_texts: Sequence[str]) -> str | None:
    content = _LATEX_WRAPPER.sub(r"\1", boxed).strip(_STRIP)
    if content in labels:
        return content
    opening = _OPENING_LABEL.match(boxed) or _OPENING_LABEL.match(content)
    if opening and opening.group(1) in labels:
        return opening.group(1)
    normalised = content.casefold()
    for label, text in zip(labels, choice_texts):
        if normalised == text.strip(_STRIP).casefold():
            return label
    return None
