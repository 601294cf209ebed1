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
    PYTHONPATH=. python bench/real_experiment.py --list-trained-prompts [--steps 10]
    PYTHONPATH=. python bench/real_experiment.py --plot-only docs/experiment_runs.json \
        --plot docs/experiment.png

`--plot PNG` draws the runs (one colour per arm, a line style per seed, the legend outside the
panels); `--plot-only RUNS_JSON` draws a saved `{"steps", "runs"}` object (the last line's) without
running anything. A run's curves may be cut to some steps, named in its `curve_steps`.

`--list-trained-prompts` prints, one a line, the questions the runs train on in `--steps` steps
(the same for every arm and seed) and runs nothing: what docs/experiments.md's section 1 leaves
out.

Last line: one JSON object (every run's figures and each arm's summary).
"""
from __future__ import annotations

import argparse
import json
import os
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
          "response_length": metrics.RESPONSE_LENGTH_MEAN}


def defaults(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", "model.make_tiny=false",
            "actor.tensor_model_parallel_size=1", "data.format=synthetic",
            "data.synthetic.operators=+-", "data.synthetic.max_operand=20",
            "data.synthetic.val_size=96", "data.prompts_per_step=8", "rollout.n=4",
            "data.max_prompt_length=128", "data.max_response_length=128", "actor.lr=1e-5",
            "actor.lr_scheduler=constant", "actor.lr_warmup_ratio=0", "algorithm.kl_coef=0.005",
            "rollout.temperature=1.0", "actor.ppo_micro_batch_size_per_gpu=8",
            "actor.log_prob_micro_batch_size_per_gpu=8", "trainer.val_before_train=true",
            "trainer.val_every=0", "trainer.save_every=0", "trainer.keep_last=1"]


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
SEED_STYLES = ("-", "--", ":", "-.")


def plot(runs: dict[str, list[dict]], steps: int, png_path: Path,
         note: Optional[str] = None) -> Path:
    """Held-out accuracy and self-certainty before / after, and the training curves: one colour
    per arm, one line style per seed, the legend to the right of the panels; `note` on top."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    colours = {arm: f"C{index}" for index, arm in enumerate(runs)}
    seeds = sorted({run["seed"] for arm_runs in runs.values() for run in arm_runs})
    for index, (title, curve) in enumerate(PANELS):
        axes = figure.add_subplot(2, 3, index + 1)
        for arm, arm_runs in runs.items():
            for run in arm_runs:
                if curve is None:
                    key = "acc" if index == 0 else "val_self_certainty"
                    x, y = [0, steps], [run[f"{key}_before"], run[f"{key}_after"]]
                    y = [100 * v for v in y] if index == 0 else y
                else:
                    y = run[curve]
                    x = run.get("curve_steps") or list(range(1, len(y) + 1))
                axes.plot(x, y, color=colours[arm],
                          linestyle=SEED_STYLES[seeds.index(run["seed"]) % len(SEED_STYLES)],
                          marker="o", markersize=4, label=f"{arm}, seed {run['seed']}")
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    handles, labels = figure.axes[0].get_legend_handles_labels()
    legend = figure.add_subplot(2, 3, 6)
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
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for every run")
    options = parser.parse_args()
    if options.plot_only:
        if options.plot is None:
            parser.error("--plot-only needs --plot PNG")
        saved = json.loads(options.plot_only.read_text())
        print(plot(saved["runs"], saved["steps"], options.plot, saved.get("source")))
        return

    from megatron_intuitor.config import load
    from megatron_intuitor.models.real import smollm2_checkpoint

    model_dir = smollm2_checkpoint()
    base = defaults(model_dir) + options.overrides
    if options.list_trained_prompts:
        print("\n".join(trained_questions(model_dir, options.steps, base + ARMS["intuitor"])))
        return
    for arm in options.arms:  # a bad override fails here, before any run
        load(base + ARMS[arm])
    scratch = tempfile.TemporaryDirectory(prefix="real_experiment_")
    root = (options.output_dir or Path(scratch.name)).resolve()
    runs: dict[str, list[dict]] = {arm: [] for arm in options.arms}
    for seed in options.seeds:  # seed-major: a cut-short experiment still has every arm
        for arm in options.arms:
            figures = run_figures(root / f"{arm}_seed{seed}", options.steps,
                                  base + ARMS[arm] + [f"trainer.seed={seed}"])
            runs[arm].append({"seed": seed, **figures})
            print(json.dumps({"arm": arm, **runs[arm][-1]}), flush=True)
    summaries = {arm: summary(arm_runs) for arm, arm_runs in runs.items()}
    print(table(summaries, options.seeds))
    if options.plot:
        plot(runs, options.steps, options.plot)
    scratch.cleanup()
    print(json.dumps({"steps": options.steps, "seeds": options.seeds, "overrides": base,
                      "load_avg_1m": os.getloadavg()[0], "summary": summaries, "runs": runs}))


if __name__ == "__main__":
    main()
