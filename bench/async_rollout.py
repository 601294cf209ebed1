"""Benchmark: where the rollout runs and how stale it may be, on the real model
(SmolLM2-135M-Instruct, `megatron_intuitor.models.real`), same prompts and seeds, in one run:

- colocated:       an engine on each of the 2 training ranks, on-policy (the default);
- separate_sync:   1 training rank + 1 rollout rank, on-policy (`trainer.max_staleness=0`);
- separate_async:  the same ranks, one step off-policy (`trainer.max_staleness=1`), decoupled PPO
                   (`rollout.tis_cap=2`): generation of step k+1 runs while step k trains.

All three use 2 processes on the 2 cores (OMP_NUM_THREADS=1 each). Per mode: tokens/s over the
steps after the first (prompt + response tokens over step wall time), each side's idle seconds,
and for the separate modes the wall-clock bounds of every generation and of the training ranks'
work on each step (score, reference, update; the timeline PNG and `overlap_s`: seconds in which
a generation and that work ran at once).

What a CPU can show: that the pipeline overlaps (overlap_s > 0, the timeline) and what it costs
(staleness, behaviour KL). What it cannot: a speedup like a GPU's. Here the two sides share two
cores, so an overlapped generation slows the update it overlaps; and the update dominates the
step. The GPU gain is therefore a prediction of the cost model below from phase times, not a
measurement.

Cost model (phase times as inputs; each side as fast as on the whole pool): a synchronous
step takes G + T + S (generation, training = score + reference + update, weight sync); with one
step of staleness the sides run at once and a step takes max(G, T) + S. speedup = (G + T + S) /
(max(G, T) + S): an upper bound, since splitting the devices slows each side.
`predicted_gpu_speedup` is the model at published per-phase times of a synchronous step, checked
against the same source's published async speedup. NeMo-RL publishes its async GRPO speedup
(1.57x, LLaMA3.1-8B, 16 H100) without per-phase times (its performance summary lists step time
and tokens/s/GPU only), so the model cannot be checked against it without deriving the shares
from the 1.57x itself (circular); verl's one-step-off-policy recipe does publish per-phase times
(Qwen2.5-Math-7B, 16 H20, vLLM + Megatron, DAPO), and those are used (`PUBLISHED`).
`predicted_speedup_measured` is the model at this run's own separate_sync phase times.

    PYTHONPATH=. python bench/async_rollout.py [--steps 3] [override ...]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_intuitor import defaults  # noqa: E402
from tiny_intuitor import run_ours  # noqa: E402

from megatron_intuitor import metrics  # noqa: E402

MODES = {
    "colocated": ["trainer.n_gpus_per_node=2"],
    "separate_sync": ["trainer.n_gpus_per_node=1", "rollout.placement=separate",
                      "rollout.num_ranks=1", "trainer.max_staleness=0"],
    "separate_async": ["trainer.n_gpus_per_node=1", "rollout.placement=separate",
                       "rollout.num_ranks=1", "trainer.max_staleness=1", "rollout.tis_cap=2.0"],
}
TRAINING_PHASES = ("old_log_prob", "ref", "advantage", "update")

# verl recipe/one_step_off_policy/README.md (volcengine/verl, "Experimental Results", VLLM+Megatron
# rows; seconds per step, means over the run): the synchronous colocated step's phases, and the
# async speedups it reports (step time 699 -> 566 s; total time 18h21m -> 13h06m, "+40%").
PUBLISHED = {
    "source": "https://github.com/volcengine/verl/blob/main/recipe/one_step_off_policy/README.md"
              " (Qwen2.5-Math-7B, DAPO, 16 H20: colocate sync vs 4 rollout + 12 training GPUs, "
              "VLLM+Megatron)",
    "generation_s": 207.0, "training_s": 119.0 + 344.0,  # gen; old_log_prob + update_actor
    "sync_step_s": 699.0, "async_step_s": 566.0,
    "sync_total_h": 18 + 21 / 60, "async_total_h": 13 + 6 / 60,
}
NEMO_RL = ("NeMo-RL async GRPO 1.57x (LLaMA3.1-8B, 16 H100, 1,581 -> 2,478 tokens/s/GPU): no "
           "published per-phase times found (docs/about/performance-summary.md lists step time "
           "and tokens/s/GPU only; docs/guides/async-grpo.md none), so not checked")


def predicted_speedup(generation: float, training: float, sync: float) -> float:
    """Synchronous over one-step-off-policy step time (module doc)."""
    return (generation + training + sync) / (max(generation, training) + sync)


def training_interval(row: dict) -> tuple[float, float]:
    """The training ranks' work on a step: its scoring, reference and advantage phases (timed
    just before the update) and the update."""
    before = sum(row.get(metrics.timing(phase), 0.0) for phase in TRAINING_PHASES[:-1])
    return row[metrics.UPDATE_START] - before, row[metrics.UPDATE_END]


def overlap_seconds(rows: list[dict]) -> float:
    """Seconds in which the training ranks' work on a step (score, reference, update) and a
    generation ran at once (separate placement rows)."""
    generations = [(row[metrics.GENERATION_START], row[metrics.GENERATION_END]) for row in rows]
    total = 0.0
    for row in rows:
        start, end = training_interval(row)
        total += sum(max(0.0, min(end, g_end) - max(start, g_start))
                     for g_start, g_end in generations)
    return total


def summary(rows: list[dict]) -> dict:
    later = rows[1:]  # the first step pays the warm-up
    seconds = sum(row[metrics.timing("step")] for row in later)
    tokens = sum(row[metrics.THROUGHPUT] * row[metrics.timing("step")] for row in later)
    result = {"tokens_per_s": tokens / seconds, "step_s": seconds / len(later),
              "self_certainty": [row[metrics.SELF_CERTAINTY_MEAN] for row in rows]}
    if metrics.STALENESS in rows[0]:
        result.update(
            idle_training_s=sum(row[metrics.IDLE_TRAINING] for row in later),
            idle_rollout_s=sum(row[metrics.IDLE_ROLLOUT] for row in later),
            generation_s=sum(row[metrics.GENERATION_SECONDS] for row in later) / len(later),
            training_s=sum(row.get(metrics.timing(p), 0.0) for row in later
                           for p in TRAINING_PHASES) / len(later),
            staleness=[row[metrics.STALENESS] for row in rows],
            behaviour_kl=[row.get(metrics.BEHAVIOUR_KL) for row in rows],
            overlap_s=overlap_seconds(rows))
    else:  # colocated: one side waits while the other works
        result.update(
            idle_training_s=sum(row[metrics.timing("rollout")] for row in later),
            idle_rollout_s=sum(row[metrics.timing("step")] - row[metrics.timing("rollout")]
                               for row in later))
    return result


def plot_timeline(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    separate = [mode for mode in runs if mode.startswith("separate")]
    fig, axes = plt.subplots(len(separate), 1, figsize=(10, 1.8 * len(separate) + 0.6),
                             squeeze=False)
    for ax, mode in zip(axes[:, 0], separate):
        rows = runs[mode]
        origin = min(row[metrics.GENERATION_START] for row in rows)
        generations = [(row[metrics.GENERATION_START] - origin,
                        row[metrics.GENERATION_END] - row[metrics.GENERATION_START])
                       for row in rows]
        updates = [(start - origin, end - start)
                   for start, end in map(training_interval, rows)]
        ax.broken_barh(generations, (10, 8), color="tab:blue")
        ax.broken_barh(updates, (0, 8), color="tab:orange")
        for step, (start, _) in enumerate(generations, 1):
            ax.text(start, 19, f"gen {step}", fontsize=7)
        for step, (start, _) in enumerate(updates, 1):
            ax.text(start, -3, f"train {step}", fontsize=7)
        ax.set_yticks([4, 14], ["training ranks: score + update", "rollout rank: generation"])
        ax.set_title(mode, fontsize=9)
        ax.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeline", type=Path, default=Path("bench/async_timeline.png"))
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for all modes")
    options = parser.parse_args()

    from megatron_intuitor.config import load
    from megatron_intuitor.models.real import smollm2_checkpoint

    model_dir = smollm2_checkpoint()
    base = defaults(model_dir) + options.overrides
    for extra in MODES.values():
        load(base + extra)  # a bad override fails here, before any work
    scratch = tempfile.TemporaryDirectory(prefix="async_rollout_")
    runs, loads = {}, [os.getloadavg()[0]]
    for mode, extra in MODES.items():
        runs[mode] = run_ours(Path(scratch.name) / mode, options.steps, base + extra)
        loads.append(os.getloadavg()[0])
        print(mode, json.dumps(summary(runs[mode])), flush=True)
    plot_timeline(runs, options.timeline)
    results = {mode: summary(rows) for mode, rows in runs.items()}
    measured = results["separate_sync"]
    print(json.dumps({
        "tokens_per_s": {mode: result["tokens_per_s"] for mode, result in results.items()},
        "idle_s": {mode: {"training": result["idle_training_s"],
                          "rollout": result["idle_rollout_s"]}
                   for mode, result in results.items()},
        "overlap_s": results["separate_async"]["overlap_s"],
        "staleness": results["separate_async"]["staleness"],
        "behaviour_kl": results["separate_async"]["behaviour_kl"],
        "self_certainty": {mode: result["self_certainty"] for mode, result in results.items()},
        "predicted_speedup_measured": predicted_speedup(measured["generation_s"],
                                                        measured["training_s"], 0.0),
        "predicted_gpu_speedup": predicted_speedup(PUBLISHED["generation_s"],
                                                   PUBLISHED["training_s"], 0.0),
        "predicted_gpu_speedup_source": PUBLISHED["source"],
        "published_speedup_per_step": PUBLISHED["sync_step_s"] / PUBLISHED["async_step_s"],
        "published_speedup_total_time": PUBLISHED["sync_total_h"] / PUBLISHED["async_total_h"],
        "nemo_rl": NEMO_RL,
        "steps": options.steps, "timeline": str(options.timeline),
        "load_average": loads,
    }))


if __name__ == "__main__":
    main()
