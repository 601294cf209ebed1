"""Set a replication run's validation curve against the INTUITOR paper's Qwen2.5-1.5B numbers.

    python tools/compare_to_paper.py runs/qwen2.5_1.5b_math_intuitor --arm intuitor

Reads RUN_DIR/metrics.jsonl (`examples/replicate_intuitor_qwen2.5_1.5b.sh` validates greedily on
MATH500 and GSM8K before training and every 10 steps), prints per benchmark the run's accuracy
before training, at step 10 and at its last validation next to the paper's, and the difference
in points; the last line is one JSON object. The random arm has no paper numbers: only the
base model's are compared (its accuracy should stay near them).

The paper's numbers (arXiv 2505.19590, Qwen2.5-1.5B base trained on MATH): Table 1 (end of the
epoch: base, GRPO, INTUITOR) and the early-training table (step 10). A run's step-10 and last
validation are compared with them; a run that never reached step 10 is compared at its last.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

BENCHMARKS = {"math500": "MATH500", "gsm8k": "GSM8K"}
# accuracy by arm, then point ("base": before training, "step10", "final"), then benchmark
# Checked against a second source in this project: INTUITOR's MATH500 0.090 -> 0.368 (step 10)
# -> 0.530 (issue 21, shared/FACTS.md). The GSM8K and GRPO figures were entered from the paper's
# tables without a second check here: verify them against arXiv 2505.19590 before citing.
PAPER = {
    "base": {"math500": 0.090, "gsm8k": 0.002},
    "intuitor": {"step10": {"math500": 0.368, "gsm8k": 0.152},
                 "final": {"math500": 0.530, "gsm8k": 0.711}},
    "grpo": {"step10": {"math500": 0.296, "gsm8k": 0.081},
             "final": {"math500": 0.560, "gsm8k": 0.747}},
}
ARMS = ("intuitor", "grpo", "random")


def validations(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> {benchmark: greedy accuracy} for every logged validation of a benchmark."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (is this a run's output directory?)")
    found: dict[int, dict[str, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}:{number}: not JSON ({err})") from None
        for benchmark in BENCHMARKS:
            value = row.get(f"val/{benchmark}/acc")
            if value is not None:
                found.setdefault(int(row["step"]), {})[benchmark] = float(value)
    if not found:
        raise SystemExit(f"{path}: no val/math500/acc or val/gsm8k/acc row: the run has not "
                         f"validated yet")
    return found


def comparison(found: dict[int, dict[str, float]], arm: str) -> dict:
    """The run at before / step 10 / last against the paper: {point: {benchmark: {run, paper,
    difference}}} (paper and difference None where the paper has no number)."""
    steps = sorted(found)
    points: dict[str, Optional[int]] = {
        "base": 0 if 0 in found else None,
        "step10": 10 if 10 in found else None,
        "final": steps[-1] if steps[-1] > 0 else None}
    result: dict = {"arm": arm, "steps": steps, "points": {}}
    for point, step in points.items():
        if step is None:
            continue
        paper = PAPER["base"] if point == "base" else PAPER.get(arm, {}).get(point, {})
        result["points"][point] = {"step": step, **{
            benchmark: {"run": found[step].get(benchmark), "paper": paper.get(benchmark),
                        "difference": (None if found[step].get(benchmark) is None
                                       or paper.get(benchmark) is None
                                       else found[step][benchmark] - paper[benchmark])}
            for benchmark in BENCHMARKS}}
    return result


def render(result: dict) -> str:
    lines = [f"arm {result['arm']}, validations at steps {result['steps']}",
             "| point | step | benchmark | run | paper | run - paper, points |",
             "|---|---|---|---|---|---|"]
    for point, entry in result["points"].items():
        for benchmark, name in BENCHMARKS.items():
            figures = entry[benchmark]
            run, paper, difference = (figures[k] for k in ("run", "paper", "difference"))
            lines.append(
                f"| {point} | {entry['step']} | {name} | "
                f"{'-' if run is None else f'{run:.3f}'} | "
                f"{'-' if paper is None else f'{paper:.3f}'} | "
                f"{'-' if difference is None else f'{100 * difference:+.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--arm", required=True, choices=ARMS,
                        help="the run's algorithm (the paper's numbers to compare with)")
    args = parser.parse_args()
    result = comparison(validations(args.run_dir), args.arm)
    print(render(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
