"""`rollout.score_at_sampling` end to end on the tiny job: the rewards the engine takes while
sampling and the update from the forward's own old log-probs give the step that the separate
scoring forward gives; the option is refused where it would not be exact (off-policy)."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_intuitor import metrics
from megatron_intuitor.config import ConfigError, load

from test_trainer import _finish, _main


def _one_step(run_dir: Path, score_at_sampling: bool) -> tuple[dict, dict]:
    _finish(_main([f"trainer.output_dir={run_dir}", "trainer.total_steps=1",
                   "trainer.val_every=0", "logger.backends=[jsonl]",
                   f"logger.log_dir={run_dir / 'logs'}", "data.prompts_per_step=4",
                   "actor.ppo_mini_batch_size=4", "data.max_response_length=16",
                   "actor.ppo_micro_batch_size_per_gpu=4", "actor.lr=1e-3",
                   f"rollout.score_at_sampling={str(score_at_sampling).lower()}"]))
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return row, load_file(run_dir / "hf_final" / "model.safetensors")


@pytest.mark.slow
def test_scores_at_sampling_give_the_step_of_the_scoring_forward(tmp_path):
    """Same seeds, one step (TP=2, on-policy): self-certainty and entropy of the engine equal
    the scoring forward's within 1e-4 (fp32 vLLM vs Megatron), the PPO loss, gradient norm and
    updated weights agree (ratio exactly 1 vs recomputed 1 +- rounding), and the update's
    forward reports the engine/Megatron log-prob difference."""
    separate, separate_weights = _one_step(tmp_path / "separate", False)
    sampled, sampled_weights = _one_step(tmp_path / "sampled", True)
    assert sampled[metrics.RESPONSE_LENGTH_MEAN] == separate[metrics.RESPONSE_LENGTH_MEAN]
    for name in (metrics.SELF_CERTAINTY_MEAN, metrics.SELF_CERTAINTY_STD, metrics.ENTROPY):
        assert sampled[name] == pytest.approx(separate[name], abs=1e-4), name
    assert sampled[metrics.PG_LOSS] == pytest.approx(separate[metrics.PG_LOSS], abs=1e-5)
    assert sampled[metrics.GRAD_NORM] == pytest.approx(separate[metrics.GRAD_NORM], rel=1e-3)
    assert 0 < sampled[metrics.ROLLOUT_LOGPROB_DIFF] < 1e-4
    assert sampled[metrics.ROLLOUT_LOGPROB_DIFF] == pytest.approx(
        separate[metrics.ROLLOUT_LOGPROB_DIFF], abs=1e-5)
    base = load_file(tmp_path / "separate" / "tiny_model" / "model.safetensors")
    moved = max(float((separate_weights[k] - base[k]).abs().max()) for k in separate_weights)
    differs = max(float((separate_weights[k] - sampled_weights[k]).abs().max())
                  for k in separate_weights)
    assert moved > 5e-4 and differs < moved / 20


def test_scores_at_sampling_are_refused_off_policy():
    with pytest.raises(ConfigError, match="rollout.score_at_sampling=true skips the old-policy "
                                          "forward.*actor.ppo_epochs=1 \\(now 2\\)"):
        load(["rollout.score_at_sampling=true", "actor.ppo_epochs=2"])
    with pytest.raises(ConfigError, match="actor.ppo_mini_batch_size=data.prompts_per_step "
                                          "\\(now 4 and 8\\)"):
        load(["rollout.score_at_sampling=true", "actor.ppo_mini_batch_size=4"])
    assert load(["rollout.score_at_sampling=true"]).rollout.score_at_sampling
