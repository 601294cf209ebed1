"""`rollout.score_at_sampling` end to end on the tiny job: the rewards the engine takes while
sampling and the update from the forward's own old log-probs give the step that the separate
scoring forward gives; the option is refused where it would not be exact (off-policy)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_intuitor import metrics
from megatron_intuitor.config import ConfigError, load

from repo_paths import REPO
from tiny_runs import finish, launch, metric_rows, overrides


def _weights(model_dir: Path) -> dict:
    return {name: tensor for path in sorted(model_dir.glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


def _step_1_export(run_dir: Path, out: Path) -> Path:
    """The run's step-1 checkpoint as an HF directory (tools/convert_ckpt.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "tools" / "convert_ckpt.py"), "megatron-to-hf",
                    str(run_dir / "checkpoints" / "step_1"), str(out), "--tp", "2"], env=env,
                   check=True, capture_output=True, timeout=600)
    return out


@pytest.mark.slow
def test_scores_at_sampling_give_the_step_of_the_scoring_forward(uninterrupted, tmp_path):
    """Same seeds, step 1 (TP=2, on-policy) of the uninterrupted tiny run (scored by the separate
    forward) and of a run scored at sampling: self-certainty and entropy of the engine equal
    the scoring forward's within 1e-4 (fp32 vLLM vs Megatron), the PPO loss, gradient norm and
    updated weights agree (ratio exactly 1 vs recomputed 1 +- rounding; the loss and weights to
    the advantages' fp32 resolution), and the update's forward reports the engine/Megatron log-prob
    difference."""
    run_dir, _ = uninterrupted
    separate = metric_rows(run_dir)[1]
    separate_weights = _weights(_step_1_export(run_dir, tmp_path / "separate_step_1"))
    finish(launch(overrides(tmp_path / "sampled", 1) + ["rollout.score_at_sampling=true"]))
    sampled = metric_rows(tmp_path / "sampled")[1]
    sampled_weights = _weights(tmp_path / "sampled" / "hf_final")
    assert sampled[metrics.RESPONSE_LENGTH_MEAN] == separate[metrics.RESPONSE_LENGTH_MEAN]
    for name in (metrics.SELF_CERTAINTY_MEAN, metrics.SELF_CERTAINTY_STD, metrics.ENTROPY):
        assert sampled[name] == pytest.approx(separate[name], abs=1e-4), name
    # This random model's self-certainties lie ~3e-4 apart at ~6.27, where fp32 resolves 5e-7:
    # z-scored, each advantage is determined to ~1e-3 only, by either scorer, and so is the
    # loss (-token mean of the advantages at ratio 1)
    assert sampled[metrics.PG_LOSS] == pytest.approx(separate[metrics.PG_LOSS], abs=2e-3)
    assert sampled[metrics.GRAD_NORM] == pytest.approx(separate[metrics.GRAD_NORM], rel=1e-3)
    assert 0 < sampled[metrics.ROLLOUT_LOGPROB_DIFF] < 1e-4
    assert sampled[metrics.ROLLOUT_LOGPROB_DIFF] == pytest.approx(
        separate[metrics.ROLLOUT_LOGPROB_DIFF], abs=1e-5)
    base = _weights(run_dir / "tiny_model")

    def norm(weights: dict, minus: dict) -> float:
        return sum(float((weights[k] - minus[k]).double().pow(2).sum()) for k in weights) ** 0.5
    # Adam's first step is ~lr x sign(gradient): where those advantage-level differences flip a
    # small gradient's sign a weight moves the other way (a few in a thousand of them)
    assert norm(separate_weights, base) > 0.1
    assert norm(sampled_weights, separate_weights) < 0.15 * norm(separate_weights, base)
    flipped = sum(int(((separate_weights[k] - sampled_weights[k]).abs() > 1e-4).sum())
                  for k in base) / sum(tensor.numel() for tensor in base.values())
    assert flipped < 0.01

def test_scores_at_sampling_are_refused_off_policy():
    with pytest.raises(ConfigError, match="rollout.score_at_sampling=true skips the old-policy "
                                          "forward.*actor.ppo_epochs=1 \\(now 2\\)"):
        load(["rollout.score_at_sampling=true", "actor.ppo_epochs=2"])
    with pytest.raises(ConfigError, match="actor.ppo_mini_batch_size=data.prompts_per_step "
                                          "\\(now 4 and 8\\)"):
        load(["rollout.score_at_sampling=true", "actor.ppo_mini_batch_size=4"])
    assert load(["rollout.score_at_sampling=true"]).rollout.score_at_sampling
