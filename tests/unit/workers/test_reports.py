"""What the ranks report per response (`workers/reports.py`) gives the controller the numbers it
used to compute itself from the gathered per-token tensors: reports of the data-parallel shards
(trimmed to their own width), concatenated, against the previous controller-side formulas on the
whole padded batch."""
import torch

from megatron_intuitor import algorithm
from megatron_intuitor.batch import batch_from_rollouts, data_parallel_shard
from megatron_intuitor.rollout.engine import RolloutSample
from megatron_intuitor.workers.reports import ScoreReport, rollout_report, score_report

# (prompt tokens, response tokens) per row: the longest row sits in the second shard
ROWS = [(3, 5), (2, 1), (4, 6), (3, 2), (5, 9), (2, 4), (3, 3), (1, 7)]


def test_shard_reports_reproduce_the_whole_batch_figures():
    gen = torch.Generator().manual_seed(3)
    samples = [RolloutSample(row // 2, [1] * p, [2] * r, "", "stop",
                             torch.randn(r, generator=gen).tolist())
               for row, (p, r) in enumerate(ROWS)]
    rollouts = batch_from_rollouts(samples, pad_token_id=0)
    mask = rollouts.response_mask
    scores = {name: torch.where(mask, torch.randn(mask.shape, generator=gen), 0.0)
              for name in ("log_probs", "entropy", "self_certainty")}
    reports = []
    for dp_rank in range(2):
        shard = data_parallel_shard(rollouts, dp_rank, 2)
        rows = slice(dp_rank * 4, dp_rank * 4 + 4)
        trimmed = shard.trimmed()
        width = trimmed.input_ids.shape[1]
        reports.append(score_report({k: v[rows, :width] for k, v in scores.items()}, trimmed))
    report = ScoreReport.concatenate(reports)

    # the previous controller: per-token tensors of the whole batch
    # to rounding: the shards are summed at their own widths, the batch figures shard by shard
    torch.testing.assert_close(report.self_certainty,
                               algorithm.sequence_rewards_from_self_certainty(
                                   scores["self_certainty"], mask), rtol=1e-6, atol=0)
    tokens = mask.sum()
    torch.testing.assert_close(report.entropy_sum.sum() / tokens,
                               algorithm.masked_token_mean(scores["entropy"], mask),
                               rtol=1e-6, atol=0)
    diff = (scores["log_probs"] - rollouts.rollout_log_probs).abs()
    torch.testing.assert_close(report.logprob_diff_sum.sum() / tokens,
                               algorithm.masked_token_mean(diff, mask), rtol=1e-6, atol=0)

    summary = rollout_report(rollouts, verifiable=[1, 0, 0, 0, 1, 1, 0, 0])
    assert summary.response_lengths.tolist() == [r for _, r in ROWS]
    assert summary.lengths.tolist() == [p + r for p, r in ROWS]
    assert summary.group_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert summary.verifiable.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert rollout_report(rollouts, verifiable=None).verifiable is None


def test_rollout_report_carries_the_collapse_inputs():
    samples = [RolloutSample(0, [1, 1], [5, 6, 5, 6, 5], "", "length", [0.0] * 5),
               RolloutSample(0, [1, 1], [7, 8], "", "stop", [0.0] * 2)]
    report = rollout_report(batch_from_rollouts(samples, pad_token_id=0), None, samples, ngram=2)
    # bigrams of 5 6 5 6 5: (5,6) (6,5) (5,6) (6,5) -> 2 distinct of 4; 7 8: 1 of 1
    assert report.distinct_ngram.tolist() == [0.5, 1.0]
    assert report.truncated.tolist() == [True, False]
    assert rollout_report(batch_from_rollouts(samples, 0), None).distinct_ngram is None
