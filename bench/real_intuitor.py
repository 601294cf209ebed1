"""Benchmark: INTUITOR on the real model (SmolLM2-135M-Instruct, `megatron_intuitor.models.real`)
against TRL's GRPOTrainer on the same model, prompts, batch, lr, KL, temperature and
self-certainty reward, in one run, alternating (ours, TRL, ours, ... for `--rounds`), each with
2 cores (ours: 2 ranks x 1 thread, TP=1 x DP=2; TRL: one process, 2 threads).

Both sides and their figures are `bench/tiny_intuitor.py`'s (`run_ours`, `run_trl`; see there),
with the real model's checkpoint as `model.path` and this file's defaults: 8 prompts x 4
responses x 64 tokens, synthetic arithmetic prompts in the model's chat template, 3 steps,
lr 1e-6 constant, KL 0.005, temperature 1.0. Per phase, each side's seconds are set against the
compute floor: 2 x params x tokens for a forward (3x for forward + backward) at the measured
~58 GFLOP/s per core over 2 cores; the rollout's floor counts one forward of every token.

    PYTHONPATH=. python bench/real_intuitor.py [--steps 3] [--rounds 1] [override ...]

Last line: one JSON object (tokens_per_s, trl_tokens_per_s, per-phase seconds and floors of
both, self-certainty and entropy curves of both, load average).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_intuitor import run_ours, run_trl  # noqa: E402

from megatron_intuitor import metrics  # noqa: E402

FLOPS_PER_CORE = 58e9  # measured fp32 matmul rate of one core here (FACTS.md)
CORES = 2
OURS_PHASES = ("rollout", "old_log_prob", "ref", "update", "weight_sync")
# the forward passes each phase makes over every token of the step (3 for forward + backward)
FLOOR_FORWARDS = {"rollout": 1, "old_log_prob": 1, "ref": 1, "update": 3, "score": 1,
                  "reward": 1}


def defaults(model_dir: Path) -> list[str]:
    return [f"model.path={model_dir}", "model.make_tiny=false",
            "actor.tensor_model_parallel_size=1", "data.prompts_per_step=8", "rollout.n=4",
            "data.max_prompt_length=128", "data.max_response_length=64", "actor.lr=1e-6",
            "actor.lr_scheduler=constant", "actor.lr_warmup_ratio=0", "algorithm.kl_coef=0.005",
            "rollout.temperature=1.0", "actor.ppo_micro_batch_size_per_gpu=16",
            "actor.log_prob_micro_batch_size_per_gpu=16", "trainer.val_every=0",
            "trainer.save_every=0"]


def floors(step_tokens: list[float], params: int) -> dict[str, float]:
    """Seconds per step of one forward over the mean step's tokens, per phase."""
    tokens = sum(step_tokens[1:]) / len(step_tokens[1:])
    forward = 2 * params * tokens / (FLOPS_PER_CORE * CORES)
    return {phase: forward * count for phase, count in FLOOR_FORWARDS.items()}


def mean_after_first(values: list[float]) -> float:
    return sum(values[1:]) / len(values[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="ours then TRL, this many times")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for both")
    options = parser.parse_args()

    from safetensors import safe_open

    from megatron_intuitor.config import load
    from megatron_intuitor.models.real import smollm2_checkpoint

    model_dir = smollm2_checkpoint()
    overrides = defaults(model_dir) + options.overrides
    cfg = load(overrides)  # a bad override fails here, before any work
    with safe_open(str(model_dir / "model.safetensors"), "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    scratch = tempfile.TemporaryDirectory(prefix="real_intuitor_")
    ours_rows, trl_runs, loads = [], [], []
    for round_index in range(options.rounds):
        run_dir = Path(scratch.name) / f"ours_{round_index}"
        loads.append(os.getloadavg()[0])
        ours_rows.append(run_ours(run_dir, options.steps, overrides))
        loads.append(os.getloadavg()[0])
        trl_runs.append(run_trl(cfg, model_dir, Path(scratch.name) / f"trl_{round_index}",
                                options.steps))

    figures: dict = {"params": params, "steps": options.steps, "rounds": options.rounds,
                     "prompts_per_step": cfg.data.prompts_per_step, "n": cfg.rollout.n,
                     "max_response_length": cfg.data.max_response_length}
    ours_tokens = [row[metrics.THROUGHPUT] * row[metrics.timing("step")]
                   for rows in ours_rows for row in rows[1:]]
    ours_seconds = [row[metrics.timing("step")] for rows in ours_rows for row in rows[1:]]
    figures["tokens_per_s"] = sum(ours_tokens) / sum(ours_seconds)
    figures["phase_s"] = {phase: sum(mean_after_first([row[metrics.timing(phase)] for row in rows])
                                     for rows in ours_rows) / len(ours_rows)
                          for phase in OURS_PHASES}
    figures["step_s"] = sum(ours_seconds) / len(ours_seconds)
    figures["floor_s"] = {phase: seconds for phase, seconds in
                          floors([0.0] + ours_tokens, params).items() if phase in OURS_PHASES}
    figures["self_certainty"] = [[row[metrics.SELF_CERTAINTY_MEAN] for row in rows]
                                 for rows in ours_rows]
    figures["entropy"] = [[row[metrics.ENTROPY] for row in rows] for rows in ours_rows]
    figures["response_length"] = [[row[metrics.RESPONSE_LENGTH_MEAN] for row in rows]
                                  for rows in ours_rows]

    trl_tokens = [t for run in trl_runs for t in run["trl_step_tokens"][1:]]
    trl_seconds = [s for run in trl_runs for s in run["trl_step_seconds"][1:]]
    figures["trl_tokens_per_s"] = sum(trl_tokens) / sum(trl_seconds)
    figures["trl_phase_s"] = {phase: sum(mean_after_first(run["trl_phase_seconds"][phase])
                                         for run in trl_runs) / len(trl_runs)
                              for phase in trl_runs[0]["trl_phase_seconds"]}
    figures["trl_step_s"] = sum(trl_seconds) / len(trl_seconds)
    figures["trl_floor_s"] = {phase: seconds for phase, seconds in
                              floors([0.0] + trl_tokens, params).items()
                              if phase in figures["trl_phase_s"]}
    figures["trl_self_certainty"] = [run["trl_self_certainty"] for run in trl_runs]
    figures["trl_entropy"] = [run["trl_entropy"] for run in trl_runs]
    figures["trl_response_length_mean"] = [run["trl_response_length_mean"] for run in trl_runs]
    figures["speedup"] = figures["tokens_per_s"] / figures["trl_tokens_per_s"]
    figures["load_avg_1m_at_starts"] = loads
    figures["load_avg_1m"] = os.getloadavg()[0]
    for name in ("phase_s", "trl_phase_s"):
        floor = figures[name.replace("phase", "floor")]
        figures[name.replace("phase_s", "over_floor")] = {
            phase: seconds / floor[phase] for phase, seconds in figures[name].items()
            if phase in floor}
    scratch.cleanup()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
