"""Benchmark: what the separate scoring forward costs on the real model (SmolLM2-135M-Instruct),
and what `rollout.score_at_sampling=true` saves: the engine takes each sampled token's
self-certainty and entropy from the logits it samples from, and the update takes the old
log-probs from its own forward (on-policy), so the old-log-prob forward does not run.

Both variants run `bench/real_intuitor.py`'s configuration (8 prompts x 4 responses x 64 tokens,
TP=1 x DP=2, lr 1e-6, KL 0.005), the same seeds, alternating (separate, at sampling, separate,
... for `--rounds`). Per variant: the mean per-phase and step seconds of the steps after the
first, tokens/s, `rollout/logprob_diff` (engine vs Megatron log-probs; at sampling measured by
the update's forward) and the self-certainty / entropy of every step. The first step's rollouts
are the same tokens in both (same weights and seeds), so its figures compare the engine's
scores with the scoring forward's directly: `first_step_self_certainty_diff`.

    PYTHONPATH=. python bench/scoring_cost.py [--steps 3] [--rounds 1] [override ...]

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
from real_intuitor import OURS_PHASES, defaults, mean_after_first  # noqa: E402
from tiny_intuitor import run_ours  # noqa: E402

from megatron_intuitor import metrics  # noqa: E402

VARIANTS = {"separate": ["rollout.score_at_sampling=false"],
            "at_sampling": ["rollout.score_at_sampling=true"]}


def figures(runs: list[list[dict]]) -> dict:
    """Means over the rounds of the steps after the first; every step's curves."""
    rows = [row for run in runs for row in run[1:]]
    tokens = sum(row[metrics.THROUGHPUT] * row[metrics.timing("step")] for row in rows)
    seconds = sum(row[metrics.timing("step")] for row in rows)
    return {
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(rows),
        "phase_s": {phase: sum(mean_after_first([row[metrics.timing(phase)] for row in run])
                               for run in runs) / len(runs)
                    for phase in OURS_PHASES if metrics.timing(phase) in runs[0][0]},
        "logprob_diff": [[row[metrics.ROLLOUT_LOGPROB_DIFF] for row in run] for run in runs],
        "self_certainty": [[row[metrics.SELF_CERTAINTY_MEAN] for row in run] for run in runs],
        "entropy": [[row[metrics.ENTROPY] for row in run] for run in runs],
        "response_length": [[row[metrics.RESPONSE_LENGTH_MEAN] for row in run] for run in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for both")
    options = parser.parse_args()
    if options.steps < 2:
        parser.error("--steps must be >= 2: the first step is left out of the timings")

    from megatron_intuitor.config import load
    from megatron_intuitor.models.real import smollm2_checkpoint

    base = defaults(smollm2_checkpoint()) + options.overrides
    for extra in VARIANTS.values():  # a bad override fails here, before any run
        load(base + extra)
    scratch = tempfile.TemporaryDirectory(prefix="scoring_cost_")
    runs: dict[str, list[list[dict]]] = {name: [] for name in VARIANTS}
    loads = []
    for round_index in range(options.rounds):
        for name, extra in VARIANTS.items():
            loads.append(os.getloadavg()[0])
            runs[name].append(run_ours(Path(scratch.name) / f"{name}_{round_index}",
                                       options.steps, base + extra))
    result = {"steps": options.steps, "rounds": options.rounds,
              **{name: figures(variant_runs) for name, variant_runs in runs.items()}}
    separate, sampled = result["separate"], result["at_sampling"]
    result["step_speedup"] = separate["step_s"] / sampled["step_s"]
    result["first_step_self_certainty_diff"] = max(
        abs(a[0] - b[0]) for a, b in zip(separate["self_certainty"], sampled["self_certainty"]))
    result["first_step_entropy_diff"] = max(
        abs(a[0] - b[0]) for a, b in zip(separate["entropy"], sampled["entropy"]))
    result["load_avg_1m_at_starts"] = loads
    scratch.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
