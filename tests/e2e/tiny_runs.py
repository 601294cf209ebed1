"""The tiny job's end-to-end runs as the tests start them: the shared settings, a launch through
`python -m megatron_intuitor.main` or `run_intuitor.sh`, and the metric rows a run wrote."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from repo_paths import REPO

# The collapse guards at thresholds a collapsing tiny run crosses within 4 steps.
GUARDS = ["trainer.guard.entropy_baseline_steps=2", "trainer.guard.max_entropy_drop=0.2",
          "trainer.guard.max_repetitive_share=0.5", "trainer.guard.max_short_share=0.5"]
# One rank instead of the tiny job's two (TP 2): for runs whose checks do not need tensor
# parallelism; a tiny run then costs ~35 CPU-s instead of ~55.
ONE_RANK = ["actor.tensor_model_parallel_size=1", "trainer.n_gpus_per_node=1"]
# The uninterrupted run (tests/e2e/conftest.py) also logs to the console and W&B (offline), and
# watches for collapse; none of that changes a metric.
UNINTERRUPTED_EXTRA = ["logger.backends=[console,jsonl,wandb]", *GUARDS]


def overrides(run_dir: Path, steps: int) -> list[str]:
    """4 prompts x 4 responses x 16 tokens, two optimizer steps per step, a checkpoint every
    step."""
    return [f"trainer.output_dir={run_dir}", f"trainer.total_steps={steps}",
            "trainer.save_every=1", "trainer.val_every=0", "logger.backends=[jsonl]",
            f"logger.log_dir={run_dir / 'logs'}", "data.prompts_per_step=4",
            "data.max_response_length=16", "actor.ppo_micro_batch_size_per_gpu=4",
            "actor.log_prob_micro_batch_size_per_gpu=8", "actor.ppo_mini_batch_size=2",
            "actor.lr=1e-3", "trainer.keep_last=3"]


def launch(overrides: list[str], script: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1",
           "PYTHON": sys.executable, "WANDB_MODE": "offline"}
    command = ([str(REPO / "run_intuitor.sh"), "default"] if script
               else [sys.executable, "-m", "megatron_intuitor.main"])
    return subprocess.Popen([*command, *overrides], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)


def _sigint_as_in_a_terminal() -> None:
    """Ctrl-C's SIGINT at its default action in the run, as a terminal starts a command: a test
    process started in the background by a non-interactive shell has SIGINT ignored, and an
    ignored signal stays ignored across exec (the run then never sees the test's Ctrl-C)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


def metric_rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}
