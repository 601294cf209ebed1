"""Controlled experiment: does INTUITOR improve the real model (SmolLM2-135M-Instruct) on a held-out
task it can partly solve? Three arms, the same steps, prompts and seeds:

- `intuitor`: `algorithm=intuitor`, the self-certainty reward;
- `grpo`: `algorithm=grpo`, the verifiable 0/1 reward (the upper reference: it sees the answers);
- `control`: `algorithm=intuitor` with `actor.lr=0`: the same rollouts and scoring, no update;
- `vote`: `algorithm=intuitor_vote` (self-certainty + answer vote, docs/experiments.md);
- `random`: `algorithm=random` (i.i.d. normal rewards: movement without direction).

The task: synthetic arithmetic `a + b` / `a - b` with operands 0..20 (`data.synthetic`); the
held-out set is 96 prompts of another seed, and training prompts equal to one of them are dropped.
Measured before choosing it: the base model's greedy accuracy is 26% there at 128 response tokens.
Each run validates greedily before its first step and after its last (`val/.../acc` and the
held-out mean self-certainty); its rollouts give the training self-certainty, entropy and
response length per step. A seed is `trainer.seed` (the sampling); the data order is the same
for every run. Per arm the table gives the mean over seeds and the spread (min..max). Micro-batches
of 8 rows (a rank held ~7 GB resident; the loss is the exact token mean however the rows are
cut).

    PYTHONPATH=. python bench/real_experiment.py [--steps 10] [--seeds 1 2] \
        [--arms intuitor grpo control] [--output-dir DIR] [override ...]
    PYTHONPATH=. python bench/real_experiment.py --test-split --val-every 5 --steps 10 \
        --arms intuitor random vote --seeds 1 2 rollout.n=8 data.prompts_per_step=4 \
        --plot docs/experiment_test.png
    PYTHONPATH=. python bench/real_experiment.py --list-trained-prompts [--steps 10]
    PYTHONPATH=. python bench/real_experiment.py --plot-only docs/experiment_runs.json \
        --plot docs/experiment.png

`--plot PNG` draws the runs (one colour per arm, a line style per seed, the legend outside the
panels); `--plot-only RUNS_JSON` draws a saved `{"steps", "runs"}` object (the last line's) without
running anything. A run's curves may be cut to some steps, named in its `curve_steps`.

`--list-trained-prompts` prints, one a line, the questions the runs train on in `--steps` steps
(the same for every arm and seed) and runs nothing: what docs/experiments.md's section 1 leaves
out.

`--test-split` (docs/experiments.md, section 3): the 96 held-out prompts become the *selection*
split, validated every `--val-every` steps (a checkpoint saved at each); each run's checkpoint
with the highest selection accuracy (the earliest on ties; step 0 is the start policy) is scored
greedily on the *test* split: `--test-prompts` (>= 384; a seeded sample) of the prompts of the
`a +- b <= 20` space that are neither selection prompts nor ones the runs train on. The start policy is scored there too; each arm
gets its change from it and its difference from the other arms, paired over the test prompts
(seeds averaged per prompt), with 95% bootstrap intervals over the prompts. The plot then also
draws selection accuracy against the KL from the start policy (`actor/kl_loss`, k3, logged at
each step on that step's rollouts, i.e. the policy of the previous step), so that arms compare at
equal movement.

Every finished part (the start policy's test results, then each run) is appended to
`<output-dir>/results.jsonl`; `--report-from <output-dir>/results.jsonl --steps N [--plot PNG]`
reports on the runs finished so far (a cut-short experiment); the same command with `--continue`
keeps them and resumes a run that was cut short from its last checkpoint.

Last line: one JSON object (every run's figures and each arm's summary).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_intuitor import run_ours  # noqa: E402

from megatron_intuitor import metrics  # noqa: E402

DATASET = "synthetic_arithmetic"
ARMS = {"intuitor": ["algorithm=intuitor"], "grpo": ["algorithm=grpo"],
        "control": ["algorithm=intuitor", "actor.lr=0"],
        "vote": ["algorithm=intuitor_vote"], "random": ["algorithm=random"]}
CURVES = {"self_certainty": metrics.SELF_CERTAINTY_MEAN, "entropy": metrics.ENTROPY,
          "response_length": metrics.RESPONSE_LENGTH_MEAN, "kl": metrics.KL_LOSS}
SPACE = ("+-", 20)  # data.synthetic.operators, max_operand
MIN_TEST_PROMPTS = 384


def defaults(model_dir: Path, val_every: int = 0) -> list[str]:
    """Every run's settings; with `val_every` > 0 a validation and a checkpoint every that many
    steps, all checkpoints kept (the test split scores the best one)."""
    return [f"model.path={model_dir}", "model.make_tiny=false",
            "actor.tensor_model_parallel_size=1", "data.format=synthetic",
            f"data.synthetic.operators={SPACE[0]}", f"data.synthetic.max_operand={SPACE[1]}",
            "data.synthetic.val_size=96", "data.prompts_per_step=8", "rollout.n=4",
            "data.max_prompt_length=128", "data.max_response_length=128", "actor.lr=1e-5",
            "actor.lr_scheduler=constant", "actor.lr_warmup_ratio=0", "algorithm.kl_coef=0.005",
            "rollout.temperature=1.0", "actor.ppo_micro_batch_size_per_gpu=8",
            "actor.log_prob_micro_batch_size_per_gpu=8", "trainer.val_before_train=true",
            f"trainer.val_every={val_every}", f"trainer.save_every={val_every}",
            f"trainer.keep_last={1 if val_every == 0 else 1000}"]


def run_figures(run_dir: Path, steps: int, overrides: list[str]) -> dict:
    """One run; its held-out accuracy and self-certainty before / after, and its curves."""
    step_rows = run_ours(run_dir, steps, overrides)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    accuracy, certainty = metrics.val_accuracy(DATASET), f"val/{DATASET}/self_certainty"
    validations = [row for row in rows if accuracy in row]
    before, after = validations[0], validations[-1]
    if before.get("step") != 0 or after.get("step") != steps:
        raise SystemExit(f"{run_dir}: expected validations before step 1 and after the last "
                         f"step, got steps {[row.get('step') for row in validations]}")
    return {"acc_before": before[accuracy], "acc_after": after[accuracy],
            "val_acc": [[row["step"], row[accuracy]] for row in validations],
            "val_self_certainty_before": before[certainty],
            "val_self_certainty_after": after[certainty],
            **{name: [row[key] for row in step_rows] for name, key in CURVES.items()},
            "step_s": [row[metrics.timing("step")] for row in step_rows]}


def best_validation_step(run: dict) -> int:
    """The step whose selection accuracy is highest, the earliest on ties (the least moved)."""
    best = max(accuracy for _, accuracy in run["val_acc"])
    return min(step for step, accuracy in run["val_acc"] if accuracy == best)


def test_questions(model_dir: Path, steps: int, overrides: list[str], size: int) -> list:
    """The test split: `size` records (a seeded sample, in the space's order) of the space's that
    are neither validation (selection) prompts nor ones the runs train on in `steps` steps."""
    from transformers import AutoTokenizer

    from megatron_intuitor.config import load
    from megatron_intuitor.data.synthetic import arithmetic_space
    from megatron_intuitor.trainer import load_prompt_sets

    cfg = load(overrides)
    _, val_sets = load_prompt_sets(cfg, AutoTokenizer.from_pretrained(model_dir))
    excluded = {prompt.record.messages[-1]["content"] for val in val_sets for prompt in val.prompts}
    excluded |= set(trained_questions(model_dir, steps, overrides))
    records = [record for record in arithmetic_space(SPACE[1], SPACE[0], name=DATASET)
               if record.messages[-1]["content"] not in excluded]
    if len(records) < size:
        raise SystemExit(f"test split: {len(records)} prompts left, fewer than --test-prompts "
                         f"{size} (fewer --steps leave more)")
    return [records[i] for i in sorted(random.Random(0).sample(range(len(records)), size))]


def greedy_correct(model_dir: Path, records: list, overrides: list[str]) -> list[bool]:
    """Greedy responses of the model to the records (the runs' prompt settings), graded."""
    import torch
    from transformers import AutoTokenizer

    from megatron_intuitor.config import load
    from megatron_intuitor.data.prompts import build_prompts
    from megatron_intuitor.evaluation.registry import grade_record
    from megatron_intuitor.evaluation.responses import EvalResponses

    data = load(overrides).data
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = build_prompts(records, tokenizer, data.system_prompt, data.max_prompt_length,
                            name="test split").prompts
    if len(prompts) != len(records):
        raise SystemExit(f"test split: {len(records) - len(prompts)} prompts longer than "
                         f"data.max_prompt_length={data.max_prompt_length}")
    engine = EvalResponses(model_dir, tokenizer, dtype=torch.float32,
                           max_prompt_length=data.max_prompt_length,
                           max_response_length=data.max_response_length, seed=0)
    responses = engine.greedy([p.token_ids for p in prompts])
    engine.shutdown()
    return [grade_record(p.record, r.text) for p, r in zip(prompts, responses)]


def score_on_test_split(run_dir: Path, run: dict, base_model: Path, records: list,
                        overrides: list[str]) -> dict:
    """The run's best selection checkpoint (exported to HF), scored on the test split."""
    from megatron_intuitor.evaluate import export_to_hf

    step = best_validation_step(run)
    model_dir = (base_model if step == 0 else
                 export_to_hf(run_dir / "checkpoints" / f"step_{step}", run_dir / "best_hf"))
    correct = greedy_correct(model_dir, records, overrides)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~2 GB each: weights + Adam
    shutil.rmtree(run_dir / "best_hf", ignore_errors=True)
    return {"best_step": step, "test_acc": sum(correct) / len(correct), "test_correct": correct}


def paired_interval(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over prompts and its 95% bootstrap interval (prompts resampled)."""
    import numpy as np

    from megatron_intuitor.evaluation.selection import bootstrap_interval

    difference = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    low, high = bootstrap_interval((difference, np.ones_like(difference)))
    return {"mean": float(difference.mean()), "low": low, "high": high}


def test_comparison(runs: dict[str, list[dict]], start_correct: list[bool]) -> dict:
    """Test accuracy per arm (seeds averaged per prompt), its change from the start policy and
    each pair of arms' difference, with intervals."""
    per_prompt = {arm: [sum(run["test_correct"][i] for run in arm_runs) / len(arm_runs)
                        for i in range(len(start_correct))] for arm, arm_runs in runs.items()}
    base = [float(c) for c in start_correct]
    result = {"test_prompts": len(base), "start_acc": sum(base) / len(base)}
    for arm, accuracy in per_prompt.items():
        result[f"{arm}_acc"] = sum(accuracy) / len(accuracy)
        result[f"{arm}_minus_start"] = paired_interval(accuracy, base)
    arms = list(per_prompt)
    for i, first in enumerate(arms):
        for second in arms[i + 1:]:
            result[f"{first}_minus_{second}"] = paired_interval(per_prompt[first],
                                                                per_prompt[second])
    return result


def summary(runs: list[dict]) -> dict:
    """Mean and (min, max) over seeds of the scalar figures, and of the first / last step's."""
    values = {key: [run[key] for run in runs] for key in
              ("acc_before", "acc_after", "val_self_certainty_before",
               "val_self_certainty_after")}
    for name in CURVES:
        values[f"{name}_first"] = [run[name][0] for run in runs]
        values[f"{name}_last"] = [run[name][-1] for run in runs]
    values["acc_change"] = [run["acc_after"] - run["acc_before"] for run in runs]
    return {key: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
            for key, v in values.items()}


def table(summaries: dict[str, dict], seeds: list[int]) -> str:
    """The README's results table: mean (min..max) over the seeds."""
    def cell(figure: dict, scale: float = 1.0, digits: int = 1) -> str:
        mean, low, high = (figure[k] * scale for k in ("mean", "min", "max"))
        return f"{mean:.{digits}f} ({low:.{digits}f}..{high:.{digits}f})"

    lines = [f"| arm ({len(seeds)} seeds) | held-out acc before, % | after, % | change, points "
             "| held-out self-certainty before -> after | training self-certainty first -> "
             "last step | entropy first -> last | response length first -> last |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, figures in summaries.items():
        lines.append(
            f"| {arm} | {cell(figures['acc_before'], 100)} | {cell(figures['acc_after'], 100)} "
            f"| {cell(figures['acc_change'], 100)} "
            f"| {cell(figures['val_self_certainty_before'], digits=2)} -> "
            f"{cell(figures['val_self_certainty_after'], digits=2)} "
            f"| {cell(figures['self_certainty_first'], digits=2)} -> "
            f"{cell(figures['self_certainty_last'], digits=2)} "
            f"| {cell(figures['entropy_first'], digits=3)} -> "
            f"{cell(figures['entropy_last'], digits=3)} "
            f"| {cell(figures['response_length_first'])} -> "
            f"{cell(figures['response_length_last'])} |")
    return "\n".join(lines)


PANELS = (("held-out greedy accuracy, %", None), ("held-out self-certainty (greedy)", None),
          ("training self-certainty", "self_certainty"), ("training entropy", "entropy"),
          ("training response length, tokens", "response_length"))
ACCURACY_VS_KL = "held-out greedy accuracy, % vs KL from the start policy"
SEED_STYLES = ("-", "--", ":", "-.")


def plot(runs: dict[str, list[dict]], steps: int, png_path: Path,
         note: Optional[str] = None) -> Path:
    """Held-out accuracy and self-certainty, and the training curves: one colour per arm, one line
    style per seed, the legend to the right of the panels; `note` on top. Runs that logged the KL
    get a panel of held-out accuracy against the KL from the start policy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_kl = all("kl" in run for arm_runs in runs.values() for run in arm_runs)
    panels = [*PANELS, (ACCURACY_VS_KL, "kl")] if with_kl else list(PANELS)
    columns = (len(panels) + 2) // 2
    figure = Figure(figsize=(4.4 * columns, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    colours = {arm: f"C{index}" for index, arm in enumerate(runs)}
    seeds = sorted({run["seed"] for arm_runs in runs.values() for run in arm_runs})
    for index, (title, curve) in enumerate(panels):
        axes = figure.add_subplot(2, columns, index + 1)
        for arm, arm_runs in runs.items():
            for run in arm_runs:
                validations = run.get("val_acc") or [[0, run["acc_before"]],
                                                     [steps, run["acc_after"]]]
                if title == ACCURACY_VS_KL:  # the KL logged at the validated step (0 before)
                    x = [0.0 if step == 0 else run["kl"][step - 1] for step, _ in validations]
                    y = [100 * accuracy for _, accuracy in validations]
                elif index == 0:
                    x, y = zip(*[(step, 100 * accuracy) for step, accuracy in validations])
                elif curve is None:
                    x = [0, steps]
                    y = [run["val_self_certainty_before"], run["val_self_certainty_after"]]
                else:
                    y = run[curve]
                    x = run.get("curve_steps") or list(range(1, len(y) + 1))
                axes.plot(x, y, color=colours[arm],
                          linestyle=SEED_STYLES[seeds.index(run["seed"]) % len(SEED_STYLES)],
                          marker="o", markersize=4, label=f"{arm}, seed {run['seed']}")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("KL from the start policy (k3)" if title == ACCURACY_VS_KL else "step")
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    legend = figure.add_subplot(2, columns, len(panels) + 1)
    legend.axis("off")
    legend.legend(handles, labels, loc="center", fontsize=9, frameon=False)
    if note:
        figure.suptitle(note, fontsize=9)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    return png_path


def trained_questions(model_dir: Path, steps: int, overrides: list[str]) -> list[str]:
    """The user messages of the prompts the first `steps` steps draw, in order, as the trainer's
    loader draws them."""
    from transformers import AutoTokenizer

    from megatron_intuitor.config import load
    from megatron_intuitor.data.loader import PromptLoader
    from megatron_intuitor.trainer import load_prompt_sets

    cfg = load(overrides)
    train_set, _ = load_prompt_sets(cfg, AutoTokenizer.from_pretrained(model_dir))
    loader = PromptLoader(train_set.prompts, cfg.data.prompts_per_step, cfg.data.seed,
                          shuffle=cfg.data.shuffle)
    return [prompt.record.messages[-1]["content"] for _ in range(steps)
            for prompt in loader.next_batch()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--arms", nargs="+", default=["intuitor", "grpo", "control"],
                        choices=list(ARMS))
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="keep every run here (default: a temporary directory)")
    parser.add_argument("--plot", type=Path, default=None, help="draw the runs into this PNG")
    parser.add_argument("--plot-only", type=Path, default=None, metavar="RUNS_JSON",
                        help="draw a saved {steps, runs} object into --plot and exit")
    parser.add_argument("--list-trained-prompts", action="store_true",
                        help="print the questions the runs train on and exit")
    parser.add_argument("--test-split", action="store_true",
                        help="choose each run's checkpoint on the held-out (selection) prompts "
                             "and score it on the rest of the space (module doc)")
    parser.add_argument("--test-prompts", type=int, default=MIN_TEST_PROMPTS,
                        help=f"test split size (>= {MIN_TEST_PROMPTS})")
    parser.add_argument("--val-every", type=int, default=0,
                        help="validate (and save) every that many steps (needed by --test-split)")
    parser.add_argument("--report-from", type=Path, default=None, metavar="RESULTS_JSONL",
                        help="report on the finished runs of an --output-dir's results.jsonl "
                             "(with the same --steps) and exit")
    parser.add_argument("--continue", dest="continue_", action="store_true",
                        help="keep the finished parts of --output-dir's results.jsonl and resume "
                             "a run that was cut short from its last checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every run")
    options = parser.parse_args()
    if options.report_from:
        report(options.report_from, options.steps, options.overrides, options.plot)
        return
    if options.plot_only:
        if options.plot is None:
            parser.error("--plot-only needs --plot PNG")
        saved = json.loads(options.plot_only.read_text())
        print(plot(saved["runs"], saved["steps"], options.plot, saved.get("source")))
        return

    from megatron_intuitor.config import load
    from megatron_intuitor.models.real import smollm2_checkpoint

    if options.test_split and not 0 < options.val_every <= options.steps:
        parser.error(f"--test-split needs 0 < --val-every <= --steps (now {options.val_every})")
    if options.test_prompts < MIN_TEST_PROMPTS:
        parser.error(f"--test-prompts must be >= {MIN_TEST_PROMPTS}, got {options.test_prompts}")
    model_dir = smollm2_checkpoint()
    base = defaults(model_dir, options.val_every) + options.overrides
    if options.list_trained_prompts:
        print("\n".join(trained_questions(model_dir, options.steps, base + ARMS["intuitor"])))
        return
    for arm in options.arms:  # a bad override fails here, before any run
        load(base + ARMS[arm])
    scratch = tempfile.TemporaryDirectory(prefix="real_experiment_")
    root = (options.output_dir or Path(scratch.name)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    record = root / "results.jsonl"  # one line per finished part: a cut-short run can report
    kept = ([json.loads(line) for line in record.read_text().splitlines()]
            if options.continue_ and record.is_file() else [])
    record.write_text("".join(json.dumps(row) + "\n" for row in kept))
    finished = {(row["arm"], row["seed"]) for row in kept if "arm" in row}
    test_records = None
    if options.test_split:  # the start policy on the test split, before any run
        test_records = test_questions(model_dir, options.steps, base + ARMS["intuitor"],
                                      options.test_prompts)
        start = next((row for row in kept if "start_correct" in row), None)
        if start is None:
            start = {"start_correct": greedy_correct(model_dir, test_records, base)}
            append_line(record, start)
        print(json.dumps({"test_prompts": len(test_records),
                          "start_acc": sum(start["start_correct"]) / len(test_records)}),
              flush=True)
    for seed in options.seeds:  # seed-major: a cut-short experiment still has every arm
        for arm in options.arms:
            if (arm, seed) in finished:
                continue
            run_dir = root / f"{arm}_seed{seed}"
            overrides = base + ARMS[arm] + [f"trainer.seed={seed}"]
            if options.continue_:
                overrides += resume_where_it_stopped(run_dir)
            run = {"arm": arm, "seed": seed, **run_figures(run_dir, options.steps, overrides)}
            if test_records:
                run.update(score_on_test_split(run_dir, run, model_dir, test_records, base))
            append_line(record, run)
            print(json.dumps(run), flush=True)
    report(record, options.steps, base, options.plot)
    scratch.cleanup()


def resume_where_it_stopped(run_dir: Path) -> list[str]:
    """For a run cut short (its last checkpoint before the end): the override that resumes it
    there, its metric rows after that checkpoint's step dropped (the resumed run logs them
    again); nothing for a run that never saved."""
    from megatron_intuitor.checkpoint import TRAINER_STATE_FILE, latest_checkpoint

    last = latest_checkpoint(run_dir / "checkpoints")  # the trainer's own choice on resume=auto
    if last is None:
        return []
    step = json.loads((last / TRAINER_STATE_FILE).read_text())["step"]
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(
        row + "\n" for row in rows if json.loads(row)["step"] <= step))
    return ["trainer.resume=auto"]  # after run_ours' trainer.resume=disable: the last one wins


def append_line(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def report(record: Path, steps: int, overrides: list[str], png_path: Optional[Path]) -> None:
    """The table, the test comparison (if the runs were scored on a test split), the plot and
    the last JSON line, from the results file of finished runs (`--report-from`)."""
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    start_correct = next((row["start_correct"] for row in rows if "start_correct" in row), None)
    runs: dict[str, list[dict]] = {}
    for row in rows:
        if "arm" in row:
            runs.setdefault(row["arm"], []).append({k: v for k, v in row.items() if k != "arm"})
    seeds = sorted({run["seed"] for arm_runs in runs.values() for run in arm_runs})
    summaries = {arm: summary(arm_runs) for arm, arm_runs in runs.items()}
    print(table(summaries, seeds))
    test = {}
    if start_correct is not None:
        test = test_comparison(runs, start_correct)
        print(json.dumps({"test": test}), flush=True)
    if png_path:
        plot(runs, steps, png_path)
    print(json.dumps({"steps": steps, "seeds": seeds, "overrides": overrides,
                      "load_avg_1m": os.getloadavg()[0], "summary": summaries, "test": test,
                      "runs": runs}))


if __name__ == "__main__":
    main()
