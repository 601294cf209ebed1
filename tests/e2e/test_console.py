"""The console a person reads: a tiny run prints its start line, one line per step and its end
line, nothing else (vLLM, Megatron and Ray output goes to the log file); a step line shows k/N,
the step's own time and the time left."""
import os
import subprocess
import sys

import pytest

from megatron_intuitor import metrics
from repo_paths import REPO



def test_step_line_shows_progress_step_time_and_eta():
    values = {metrics.PG_LOSS: 0.5, metrics.timing("rollout"): 2.0,
              metrics.timing("update"): 1.0, metrics.timing("step"): 3.5,
              "val/gsm8k/acc": 0.25}
    line = metrics.MetricsLogger.console_line(3, values, total_steps=20, eta_seconds=125)
    assert line == ("[bold cyan]step 3/20[/] [dim]pg_loss[/] 0.5  [dim]gsm8k/acc[/] 0.25  "
                    "[dim]s[/] 3.5  [dim]eta[/] 2m05s")
    assert [metrics.format_duration(s) for s in (42, 185, 3725)] == ["42s", "3m05s", "1h02m"]


@pytest.mark.slow
def test_tiny_run_console_is_start_steps_end(tmp_path):
    """The console of a 2-step run; then the same command again says it resumed at the end and
    that nothing is left to do (it once said only "finished 0 steps")."""
    command = [sys.executable, "-m", "megatron_intuitor.main",
               f"trainer.output_dir={tmp_path / 'run'}", f"logger.log_dir={tmp_path / 'logs'}",
               "trainer.total_steps=2", "trainer.val_every=0", "trainer.save_every=0",
               "logger.backends=[console,jsonl,wandb]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    [log_file] = (tmp_path / "logs").glob("tiny_*.log")
    assert len(lines) == 4, lines
    assert lines[0].startswith("megatron-intuitor: tiny, 2 steps of 8 prompts x 4 responses on "
                               "2 cpu rank(s) (TP 2 x PP 1 x DP 1); log ")
    assert lines[1].startswith("step 1/2 self_cert ") and " eta " in lines[1]
    assert lines[2].startswith("step 2/2 self_cert ") and lines[2].endswith(" eta 0s")
    assert lines[3].startswith("megatron-intuitor: tiny finished 2 steps in ")
    assert lines[3].endswith(f"log {log_file}")
    logged = log_file.read_text()
    assert "Initializing a V1 LLM engine" in logged  # vLLM's INFO went to the log file
    assert "step 2 intuitor/self_certainty/mean=" in logged  # every metric, once, in the file

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = (again.stdout + again.stderr).splitlines()
    assert lines[1] == (f"resumed from {tmp_path / 'run' / 'checkpoints' / 'step_2'} at step 2 "
                        f"of 2: the run is complete, nothing left to do (trainer.resume=disable "
                        f"starts over, the old run kept; trainer.total_steps=N runs on)"), lines
    assert lines[-1].startswith("megatron-intuitor: tiny finished 2 steps in "), lines
