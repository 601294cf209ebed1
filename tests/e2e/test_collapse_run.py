"""End to end on CPU: the tiny INTUITOR job driven into collapse on purpose (no KL to the
reference, lr 5e-2: entropy falls from 6.2 to ~4.4 nats in 4 steps) raises the entropy-drop
alarm by step 4 (the guard's baseline is the mean of steps 1-2, threshold 0.2); `stop` ends the
run there cleanly; `rollback` restores the best checkpoint by trainer.best_metric (kept although
keep_last=1), whose logits the exported policy then has. Each run on one rank (TP 1). (That the
same guards raise no alarm on healthy settings is checked on test_trainer.py's uninterrupted
run.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_intuitor import collapse, metrics
from repo_paths import REPO
from tiny_runs import GUARDS, ONE_RANK

ALARM_BY_STEP = 4
COLLAPSING = ["actor.lr=5e-2", "algorithm.kl_coef=0"]


def _run(run_dir: Path, steps: int, extra: list[str]) -> str:
    overrides = [f"trainer.output_dir={run_dir}", f"trainer.total_steps={steps}",
                 "trainer.val_every=0", "trainer.save_every=0", "logger.backends=[jsonl]",
                 f"logger.log_dir={run_dir / 'logs'}", "data.prompts_per_step=4",
                 "data.max_response_length=16", "data.synthetic.val_size=4",
                 "actor.ppo_micro_batch_size_per_gpu=4",
                 "actor.log_prob_micro_batch_size_per_gpu=8", "actor.ppo_mini_batch_size=2",
                 *GUARDS, *ONE_RANK, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "megatron_intuitor.main", *overrides], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run.stdout + run.stderr


def _steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def alerts(run_dir: Path) -> list[dict]:
    path = run_dir / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _first_alarm(run_dir: Path) -> dict:
    alarm = alerts(run_dir)[0]
    assert alarm["title"] == "INTUITOR collapse alarm"
    assert alarm["step"] <= ALARM_BY_STEP
    assert f"alarm at step {alarm['step']}: intuitor/collapse/entropy_drop = " in alarm["text"]
    assert alarm["text"].endswith("> threshold 0.2")
    row = _steps(run_dir)[alarm["step"] - 1]
    assert row[collapse.signal_name("entropy_drop")] > 0.2  # the logged value is the alarmed one
    return alarm


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.arange(3, 40).reshape(1, -1)).logits[0]


def _to_hf(checkpoint: Path, out: Path) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"),
                          "megatron-to-hf", str(checkpoint), str(out)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return out


@pytest.mark.slow
def test_stop_ends_the_collapsing_run_at_the_alarm(tmp_path):
    _run(tmp_path, 8, [*COLLAPSING, "trainer.guard.action=stop"])
    alarm = _first_alarm(tmp_path)
    assert [row["step"] for row in _steps(tmp_path)] == list(range(1, alarm["step"] + 1))
    assert "trainer.guard.action=stop: stopping" in alerts(tmp_path)[-1]["text"]
    assert (tmp_path / "hf_final" / "config.json").is_file()  # ended through the normal exit
    assert (tmp_path / "collapse.png").is_file()


@pytest.mark.slow
def test_rollback_restores_the_best_checkpoint(tmp_path):
    _run(tmp_path, 8, [*COLLAPSING, "trainer.val_every=2", "trainer.save_every=1",
                       "trainer.keep_last=1", "trainer.guard.action=rollback",
                       "trainer.guard.after_rollback=stop",
                       f"trainer.best_metric={metrics.val_accuracy('synthetic_arithmetic')}"])
    alarm = _first_alarm(tmp_path)
    # accuracy 0 at every validation of the random model: the first one (step 2) stays the best
    assert "rolled back to" in alerts(tmp_path)[-1]["text"]
    assert alerts(tmp_path)[-1]["text"].split()[3].endswith("step_2")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_2", f"step_{alarm['step']}"]  # keep_last=1 plus the best
    exported = _logits(tmp_path / "hf_final")
    best = _logits(_to_hf(tmp_path / "checkpoints" / "step_2", tmp_path / "best_hf"))
    collapsed = _logits(_to_hf(tmp_path / "checkpoints" / f"step_{alarm['step']}",
                               tmp_path / "collapsed_hf"))
    assert float((exported - best).abs().max()) < 1e-5
    assert float((exported - collapsed).abs().max()) > 0.1
