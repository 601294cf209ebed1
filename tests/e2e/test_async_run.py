"""End to end on CPU: the tiny job with its rollout engine on a rank of its own
(`rollout.placement=separate`) one step off-policy (`trainer.max_staleness=1`) with the
decoupled-PPO correction and a mask band: every step's staleness, the versions that generated
and scored it, the correction's and the idle metrics, and self-certainty rising over 4 steps as
the on-policy tiny run's does (6.268 -> 6.286 there, measured)."""
import json
import os
import subprocess
import sys

import pytest

from megatron_intuitor import metrics


@pytest.mark.slow
def test_one_step_off_policy_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    overrides = [f"trainer.output_dir={tmp_path}", "trainer.total_steps=4",
                 "trainer.val_every=0", "trainer.save_every=0", "logger.backends=[jsonl]",
                 f"logger.log_dir={tmp_path / 'logs'}", "rollout.placement=separate",
                 "rollout.num_ranks=1", "trainer.max_staleness=1", "rollout.tis_cap=2.0",
                 "rollout.correction_band=[0.5,2.0]"]
    done = subprocess.run([sys.executable, "-m", "megatron_intuitor.main", *overrides], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row[metrics.STALENESS] for row in rows] == [0, 1, 1, 1]
    assert [row[metrics.BEHAVIOUR_VERSION] for row in rows] == [0, 0, 1, 2]
    assert [row[metrics.SCORER_VERSION] for row in rows] == [0, 1, 2, 3]  # always the current
    for row in rows:
        assert 0 <= row[metrics.CORRECTION_DROPPED] <= 1
        assert 0 <= row[metrics.CORRECTION_TRUNCATED] <= 1
        assert row[metrics.BEHAVIOUR_KL] >= 0
        assert row[metrics.IDLE_TRAINING] >= 0 and row[metrics.IDLE_ROLLOUT] >= 0
        assert row[metrics.SKIPPED_STEPS] == 0
    # on-policy the engine's and Megatron's log-probs agree (fp32): KL ~0 at step 1
    assert rows[0][metrics.BEHAVIOUR_KL] < 1e-6
    assert rows[-1][metrics.SELF_CERTAINTY_MEAN] > rows[0][metrics.SELF_CERTAINTY_MEAN]
    assert (tmp_path / "hf_final" / "model.safetensors.index.json").is_file()
