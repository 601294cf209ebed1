"""Bytes that cross Ray in one training step between the controller and the actor ranks, at the
official recipe's shapes (128 prompts x 8 responses, 512 prompt + 3072 response tokens, TP=2,
rollout TP=2), on 8 and 16 simulated ranks. No model, no Ray cluster: what is measured is the
objects themselves, serialized as Ray serializes a call's arguments and results (cloudpickle,
protocol 5), counted once per rank that sends or receives them.

new: `workers.actor.ActorGroup` driven the way `Trainer.train_step` drives it, over
  `SimulatedRanks` in place of its WorkerGroup: each call's arguments are serialized per rank;
  each simulated rank answers what `ActorWorker` answers (None where it does not report), the
  reports made by the worker's own functions (`workers/reports.py`) from per-token tensors of
  the recipe's shapes. The advantages come from `algorithm.response_advantages`, as in the trainer.
before: the previous data flow (up to commit 6a2cc02), its objects rebuilt here: every rank got
  the whole padded batch three times (scoring, reference, update; the update's with advantages,
  old and reference log-probs), returned its data-parallel share's per-token log-probs, entropy
  and self-certainty (and reference log-probs), every rank of a rollout replica returned the
  replica's samples (token ids, log-probs, text: 4 characters per token assumed), and every rank
  returned the update's metrics and a sync report.

Worst case for the response length: every response runs to the maximum. The new path's
rank-to-rank traffic (torch.distributed, not Ray: the samples shared by all ranks, the old and
reference log-probs gathered over each data-parallel group) is printed too, as `rank_to_rank`.

Usage: python bench/controller_traffic.py
Last line: one JSON object: the new path at 16 ranks (`ranks`, `bytes_to_controller`,
`bytes_from_controller`, `per_token_tensors_to_controller`), the same under `before`, and
every measured case under `cases`.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from ray import cloudpickle

from megatron_intuitor import algorithm, metrics
from megatron_intuitor.batch import RolloutBatch, data_parallel_shard
from megatron_intuitor.config import ActorSettings, Schedule, compose, resolve
from megatron_intuitor.ppo import LOSS_METRICS
from megatron_intuitor.rollout.engine import RolloutSample, SamplingConfig
from megatron_intuitor.workers.actor import ActorGroup
from megatron_intuitor.workers.reports import rollout_report, score_report

PROMPTS, N, PROMPT_TOKENS, RESPONSE_TOKENS = 128, 8, 512, 3072
CHARS_PER_TOKEN = 4  # the old samples' text, an estimate
UPDATE_METRICS = (*LOSS_METRICS, metrics.GRAD_NORM, metrics.LR, metrics.SKIPPED_STEPS)


def serialized_bytes(value: Any) -> int:
    return len(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def per_token_tensors(value: Any) -> int:
    """Tensors with a token axis ([rows, tokens]) and per-token lists of samples in `value`."""
    if isinstance(value, torch.Tensor):
        return int(value.dim() >= 2)
    if isinstance(value, RolloutSample):
        return 3  # prompt ids, response ids, log-probs
    if isinstance(value, dict):
        return sum(per_token_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(per_token_tensors(v) for v in value)
    return 0


@dataclass
class Traffic:
    to_controller: int = 0
    from_controller: int = 0
    per_token_tensors_to_controller: int = 0

    def sent(self, value: Any, ranks: int = 1) -> None:
        self.from_controller += serialized_bytes(value) * ranks

    def received(self, value: Any) -> None:
        self.to_controller += serialized_bytes(value)
        self.per_token_tensors_to_controller += per_token_tensors(value)


def step_rollouts(response_tokens: int, seed: int = 0) -> RolloutBatch:
    """The step's batch as the ranks hold it: every response at `response_tokens`."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = PROMPTS * N, PROMPT_TOKENS + response_tokens
    response_mask = torch.zeros(rows, width, dtype=torch.bool)
    response_mask[:, PROMPT_TOKENS:] = True
    return RolloutBatch(
        input_ids=torch.randint(0, 151_000, (rows, width), generator=gen),
        response_mask=response_mask, lengths=torch.full((rows,), width),
        group_index=torch.arange(rows) // N,
        rollout_log_probs=torch.where(response_mask, -torch.rand(rows, width, generator=gen),
                                      0.0))


def step_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 151_000, (PROMPTS, PROMPT_TOKENS), generator=gen).tolist()


def token_scores(shard: RolloutBatch, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.where(shard.response_mask, torch.randn(shard.input_ids.shape,
                                                               generator=gen), 0.0)
            for name in ("log_probs", "entropy", "self_certainty")}


class SimulatedRanks:
    """The WorkerGroup interface over simulated ranks (Megatron's rank order: TP fastest, then
    DP; PP=1). Records the serialized bytes of every argument and result."""

    def __init__(self, world_size: int, tp: int, rollout_tp: int, rollouts: RolloutBatch,
                 traffic: Traffic) -> None:
        self.world_size, self.tp, self.rollout_tp = world_size, tp, rollout_tp
        self.dp = world_size // tp
        self.rollouts, self.traffic = rollouts, traffic

    def _answer(self, rank: int, method: str, args: Sequence[Any]) -> Any:
        dp_rank, dp_leader = rank // self.tp, rank % self.tp == 0
        if method == "data_parallel_coordinates":
            return dp_rank, dp_leader
        if method == "rollout":
            return rollout_report(self.rollouts, None) if rank == 0 else None
        if method == "score":
            if not dp_leader:
                return None
            shard = data_parallel_shard(self.rollouts, dp_rank, self.dp).trimmed()
            return score_report(token_scores(shard, seed=dp_rank), shard)
        if method == "update_policy":
            return {name: 0.5 for name in UPDATE_METRICS} if rank == 0 else None
        if method in ("score_reference", "release_rollout_memory", "sync_weights"):
            return None
        raise NotImplementedError(method)

    def execute_per_rank(self, method: str, per_rank_args: Sequence[Sequence[Any]]) -> list:
        results = []
        for rank, args in enumerate(per_rank_args):
            self.traffic.sent(args)
            results.append(self._answer(rank, method, args))
            self.traffic.received(results[-1])
        return results

    def execute_all(self, method: str, *args: Any) -> list:
        return self.execute_per_rank(method, [args] * self.world_size)


def new_path(world_size: int, response_tokens: int, tp: int = 2, rollout_tp: int = 2) -> dict:
    cfg = resolve(compose([
        f"trainer.nnodes={world_size // 8}", "trainer.n_gpus_per_node=8", "trainer.device=cpu",
        f"actor.tensor_model_parallel_size={tp}", f"rollout.tensor_parallel_size={rollout_tp}",
        f"data.prompts_per_step={PROMPTS}", f"rollout.n={N}",
        f"data.max_prompt_length={PROMPT_TOKENS}", f"data.max_response_length={response_tokens}"]))
    settings = ActorSettings.from_cfg(cfg, Schedule(training_steps=1, warmup_steps=0),
                                      pad_token_id=0)
    rollouts = step_rollouts(response_tokens)
    startup = Traffic()
    actor = ActorGroup(settings, SimulatedRanks(world_size, tp, rollout_tp, rollouts, startup))
    traffic = Traffic()
    actor.group.traffic = traffic
    prompts = step_prompts()
    sampling = SamplingConfig(n=N, max_tokens=response_tokens, stop_token_ids=(0,))
    # Trainer.train_step's calls, in its order (algorithm intuitor: nothing graded)
    report = actor.rollout(prompts, sampling, seed=1)
    actor.release_rollout_memory()
    scores = actor.score()
    actor.score_reference()
    advantages = algorithm.response_advantages(cfg.algorithm, scores.self_certainty,
                                               report.verifiable, report.group_index)
    actor.update_policy(advantages, step=1)
    actor.sync_weights()
    assert len(advantages) == PROMPTS * N
    return {"ranks": world_size, "bytes_to_controller": traffic.to_controller,
            "bytes_from_controller": traffic.from_controller,
            "per_token_tensors_to_controller": traffic.per_token_tensors_to_controller,
            "rank_to_rank": rank_to_rank_bytes(rollouts, world_size, world_size // tp)}


def rank_to_rank_bytes(rollouts: RolloutBatch, world_size: int, dp: int) -> int:
    """What the new path moves between ranks (torch.distributed): every rank receives every
    replica's samples (all_gather_object), and each rank its data-parallel peers' old and
    reference log-probs ([rows, batch width] fp32, all_gather)."""
    samples = _samples(rollouts, text=False)
    log_probs = rollouts.rollout_log_probs.numel() * 4 * (dp - 1) // dp
    return serialized_bytes(samples) * world_size + 2 * log_probs * world_size


def _samples(rollouts: RolloutBatch, text: bool) -> list[RolloutSample]:
    ids, log_probs = rollouts.input_ids.tolist(), rollouts.rollout_log_probs.tolist()
    response = int(rollouts.response_mask[0].sum())
    return [RolloutSample(int(rollouts.group_index[row]), ids[row][:PROMPT_TOKENS],
                          ids[row][PROMPT_TOKENS:], "abcd" * response if text else "",
                          "length", log_probs[row][PROMPT_TOKENS:])
            for row in range(len(rollouts))]


def before_path(world_size: int, response_tokens: int, tp: int = 2,
                rollout_tp: int = 2) -> dict:
    """The previous flow's objects (see the module docstring), per rank."""
    traffic = Traffic()
    dp, replicas = world_size // tp, world_size // rollout_tp
    rollouts = step_rollouts(response_tokens)
    prompts = step_prompts()
    sampling = SamplingConfig(n=N, max_tokens=response_tokens, stop_token_ids=(0,))
    samples = _samples(rollouts, text=True)
    per_replica = len(samples) // replicas
    for rank in range(world_size):  # generate: every rank returned its replica's samples
        replica = rank // rollout_tp
        share = PROMPTS // replicas
        traffic.sent((prompts[replica * share:(replica + 1) * share],
                      replace(sampling, seed=replica)))
        traffic.received(samples[replica * per_replica:(replica + 1) * per_replica])
    traffic.sent(rollouts, ranks=world_size)  # compute_log_probs(ray.put(batch))
    shards = [data_parallel_shard(rollouts, dp_rank, dp).trimmed() for dp_rank in range(dp)]
    for rank in range(world_size):
        traffic.received(token_scores(shards[rank // tp], seed=rank // tp))
    traffic.sent(rollouts, ranks=world_size)  # compute_ref_log_probs(ray.put(batch))
    for rank in range(world_size):
        traffic.received({"log_probs": token_scores(shards[rank // tp], seed=rank)["log_probs"]})
    old = rollouts.rollout_log_probs
    update_batch = rollouts.for_update(torch.randn(len(rollouts)), old, old.clone())
    traffic.sent((update_batch, 1), ranks=world_size)  # update_policy(ray.put(batch), step)
    for _ in range(world_size):
        traffic.received({name: 0.5 for name in UPDATE_METRICS})
        traffic.received({"bytes": 1, "seconds": 0.5})  # sync_weights
    return {"ranks": world_size, "bytes_to_controller": traffic.to_controller,
            "bytes_from_controller": traffic.from_controller,
            "per_token_tensors_to_controller": traffic.per_token_tensors_to_controller}


def main() -> None:
    cases = []
    for ranks in (8, 16):
        new = new_path(ranks, RESPONSE_TOKENS)
        shorter = new_path(ranks, RESPONSE_TOKENS // 3)
        before = before_path(ranks, RESPONSE_TOKENS)
        case = {**new, "independent_of_response_length": all(
                    new[key] == shorter[key] for key in ("bytes_to_controller",
                                                         "bytes_from_controller")),
                "before": before}
        print(json.dumps(case), flush=True)
        cases.append(case)
    print(json.dumps({**cases[-1], "cases": cases}))


if __name__ == "__main__":
    main()
