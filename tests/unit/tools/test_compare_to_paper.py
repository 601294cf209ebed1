"""tools/compare_to_paper.py on a hand-written metrics.jsonl: the run's step 0 / 10 / last
validations against the paper's numbers, differences in points by hand."""
import json
import subprocess
import sys

import pytest

from repo_paths import REPO

sys.path.insert(0, str(REPO / "tools"))
import compare_to_paper as compare  # noqa: E402


def _run_dir(tmp_path, rows):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


ROWS = [{"step": 0, "val/math500/acc": 0.10, "val/gsm8k/acc": 0.01},
        {"step": 1, "actor/entropy": 0.5},  # a training row: no validation
        {"step": 10, "val/math500/acc": 0.30, "val/gsm8k/acc": 0.20},
        {"step": 58, "val/math500/acc": 0.50, "val/gsm8k/acc": 0.75}]


def test_comparison_by_hand(tmp_path):
    result = compare.comparison(compare.validations(_run_dir(tmp_path, ROWS)), "intuitor")
    assert result["steps"] == [0, 10, 58]
    points = result["points"]
    assert points["base"]["math500"]["difference"] == pytest.approx(0.10 - 0.090)
    assert points["step10"]["math500"]["difference"] == pytest.approx(0.30 - 0.368)
    assert points["step10"]["gsm8k"]["difference"] == pytest.approx(0.20 - 0.152)
    assert points["final"]["step"] == 58
    assert points["final"]["gsm8k"]["difference"] == pytest.approx(0.75 - 0.711)
    grpo = compare.comparison(compare.validations(tmp_path), "grpo")["points"]
    assert grpo["final"]["math500"]["paper"] == 0.560
    random = compare.comparison(compare.validations(tmp_path), "random")["points"]
    assert random["final"]["math500"] == {"run": 0.50, "paper": None, "difference": None}


def test_tool_prints_the_table_and_a_json_line(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "tools" / "compare_to_paper.py"),
                          str(_run_dir(tmp_path, ROWS[:3])), "--arm", "intuitor"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert "| step10 | 10 | MATH500 | 0.300 | 0.368 | -6.8 |" in lines
    result = json.loads(lines[-1])
    assert result["points"]["final"]["step"] == 10  # the last validation so far


def test_errors_name_the_file(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        compare.validations(tmp_path)
    with pytest.raises(SystemExit, match="no val/math500/acc or val/gsm8k/acc row"):
        compare.validations(_run_dir(tmp_path, [{"step": 1, "loss": 0.1}]))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not JSON"):
        compare.validations(tmp_path)
