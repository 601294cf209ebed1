"""`rollout.score_at_sampling` end to end on the tiny job: the rewards the engine takes while
sampling and the update from the forward's own old log-probs give the step that the separate
scoring forward gives; the option is refused where it would not be exact (off-policy)."""
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megatron_intuitor import metrics
from megatron_intuitor.config import ConfigError, load

from tiny_runs import ONE_RANK, finish, launch, metric_rows, overrides


def _weights(model_dir: Path) -> dict:
    return {name: tensor for path in sorted(model_dir.glob("*.safetensors"))
            for name, tensor in load_file(path).items()}


def _one_step(run_dir: Path, score_at_sampling: bool) -> tuple[dict, dict]:
    """One step of the tiny run with the step's prompts as the mini-batch (as
    `rollout.score_at_sampling` needs): its metrics and exported weights."""
    finish(launch(overrides(run_dir, 1) + ONE_RANK + [
        "actor.ppo_mini_batch_size=4",
        f"rollout.score_at_sampling={str(score_at_sampling).lower()}"]))
    return metric_rows(run_dir)[1], _weights(run_dir / "hf_final")


@pytest.mark.slow
def test_scores_at_sampling_give_the_step_of_the_scoring_forward(tmp_path):
    """Same seeds, one step (one rank, on-policy), scored by the separate forward and at sampling:
    self-certainty and entropy of the engine equal
    the scoring forward's within 1e-4 (fp32 vLLM vs Megatron), the PPO loss, gradient norm and
    updated weights agree (ratio exactly 1 vs recomputed 1 +- rounding; the loss and weights to
    the advantages' fp32 resolution), and the update's forward reports the engine/Megatron log-prob
    difference."""
    separate, separate_weights = _one_step(tmp_path / "separate", False)
    sampled, sampled_weights = _one_step(tmp_path / "sampled", True)
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
    base = _weights(tmp_path / "separate" / "tiny_model")

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
