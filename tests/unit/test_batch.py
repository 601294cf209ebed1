"""Rollouts -> padded training tensors, DP shards and micro-batch partitions."""
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch

from megatron_intuitor.batch import (MicroBatching, batch_from_rollouts, data_parallel_shard,
                                     group_mini_batches)
from megatron_intuitor.rollout.engine import RolloutSample


def _sample(prompt_index, prompt, response):
    return RolloutSample(prompt_index, prompt, response, "", "stop",
                         [-0.5 * (i + 1) for i in range(len(response))])


def test_rollouts_become_right_padded_rows_aligned_on_token_positions():
    batch = batch_from_rollouts([_sample(0, [5, 6], [7, 8, 9]), _sample(1, [5], [4])],
                                pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 4, 0, 0, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True, True],
                                            [False, True, False, False, False]]
    assert batch.rollout_log_probs[0].tolist() == [0.0, 0.0, -0.5, -1.0, -1.5]
    assert batch.lengths.tolist() == [5, 2]
    assert batch.group_index.tolist() == [0, 1]
    assert int(batch.response_mask.sum()) == 4


def test_data_parallel_shards_are_contiguous_and_trimmed_on_request():
    samples = [_sample(i // 2, [1] * (i + 1), [2]) for i in range(4)]
    batch = batch_from_rollouts(samples, pad_token_id=0)
    first, second = (data_parallel_shard(batch, r, 2) for r in range(2))
    assert first.group_index.tolist() == [0, 0] and second.group_index.tolist() == [1, 1]
    assert first.trimmed().input_ids.shape == (2, 3)
    try:
        data_parallel_shard(batch, 0, 3)
    except ValueError as error:
        assert "3 data-parallel ranks" in str(error)
    else:
        raise AssertionError("4 rows over 3 ranks must fail")


def test_token_budget_partition_bounds_tokens_and_covers_every_row_once():
    lengths = torch.tensor([7, 3, 12, 5, 5, 9, 2, 11, 25])
    for packed in (False, True):
        batching = MicroBatching(max_tokens=20, packed=packed)
        parts = batching.partition(lengths)
        assert sorted(int(r) for part in parts for r in part) == list(range(len(lengths)))
        for part in parts:
            rows = lengths[part].tolist()
            # packed: the real tokens; padded: rows x the longest row
            want = sum(rows) if packed else len(rows) * max(rows)
            assert batching.tokens(rows) == want
            assert want <= 20 or len(rows) == 1  # a row over the budget goes alone
        assert [len(p) for p in parts if int(lengths[p].max()) == 25] == [1]
    # Packing counts no padding: one long row and short ones share a budget padding cannot.
    unequal = torch.tensor([2, 10, 2, 2, 2])
    assert [p.tolist() for p in MicroBatching(max_tokens=20).partition(unequal)] == [
        [1, 0, 2, 3, 4]]
    assert [p.tolist() for p in MicroBatching(max_tokens=20, packed=False).partition(unequal)] \
        == [[1, 0], [2, 3, 4]]
    fixed = MicroBatching(micro_batch_size=3).partition(lengths[:8])
    assert [p.tolist() for p in fixed] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ValueError, match="micro_batch_size > 0 or a token budget"):
        MicroBatching()


def test_mini_batches_hold_whole_prompt_groups_in_a_seeded_order():
    samples = [_sample(i // 4, [1], [2]) for i in range(12)]
    batch = batch_from_rollouts(samples, pad_token_id=0)
    runs = [group_mini_batches(batch, 2, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert [r.tolist() for r in runs[0]] == [r.tolist() for r in runs[1]]
    assert [len(r) for r in runs[0]] == [8, 4]
    for rows in runs[0]:
        groups = batch.group_index[rows]
        for group in groups.unique():
            assert int((batch.group_index == group).sum()) == int((groups == group).sum())
    assert sorted(torch.cat(runs[0]).tolist()) == list(range(12))
    # no generator (actor.shuffle=false): prompt order, as verl's unshuffled split
    assert [r.tolist() for r in group_mini_batches(batch, 2, None)] == [list(range(8)),
                                                                       list(range(8, 12))]


def test_select_and_trim_carry_the_update_columns():
    rollouts = batch_from_rollouts([_sample(0, [5, 6], [7, 8, 9]), _sample(0, [5], [4])], 0)
    batch = rollouts.for_update(torch.tensor([1.0, -1.0]), torch.arange(10.0).view(2, 5), None)
    second = batch.select(torch.tensor([1])).trimmed()
    assert second.advantages.tolist() == [-1.0]
    assert second.old_log_probs.tolist() == [[5.0, 6.0]]
    assert second.input_ids.tolist() == [[5, 4]]
    assert second.ref_log_probs is None
    with pytest.raises(FrozenInstanceError):
        batch.advantages = torch.zeros(2)


def test_routed_experts_lie_on_token_positions_with_unrouted_tokens_marked():
    """The engine reports experts for every token but the last sampled one ([tokens - 1, layers,
    top_k]); the batch puts them on the token positions and -1 on the last token and padding,
    and shards them with the rows."""
    def routed(sample, first):  # 2 layers, top-2: token t of layer l holds (first + t, l)
        tokens = len(sample.prompt_token_ids) + len(sample.response_token_ids) - 1
        experts = np.zeros((tokens, 2, 2), dtype=np.uint8)
        experts[..., 0] = first + np.arange(tokens)[:, None]
        experts[..., 1] = np.arange(2)[None]
        return replace(sample, routed_experts=experts)

    samples = [routed(_sample(0, [5, 6], [7, 8]), 10), routed(_sample(1, [5], [4]), 20)]
    batch = batch_from_rollouts(samples, pad_token_id=0)
    assert batch.routed_experts.shape == (2, 4, 2, 2)
    assert batch.routed_experts[0, :, 0, 0].tolist() == [10, 11, 12, -1]
    assert batch.routed_experts[1, :, 1, :].tolist() == [[20, 1], [-1, -1], [-1, -1], [-1, -1]]
    shard = data_parallel_shard(batch, 1, 2).trimmed()
    assert shard.routed_experts.tolist() == batch.routed_experts[1:, :2].tolist()
    assert batch_from_rollouts([samples[0], _sample(1, [5], [4])], 0).routed_experts is None
