"""A rollout rank of its own (`rollout.placement=separate`): one vLLM engine, no trainer model.

Its ranks form a torch.distributed world of their own (vLLM builds its groups on it, as on the
training ranks when colocated) and join the cross-rank group of training rank 0, which
broadcasts every new policy to them (`rollout.transport`). The engine's weights carry the version
(the training step whose update made them) that every response it generates reports: the
trainer knows how stale a batch is, and a batch is generated between two syncs, never across one.
"""
from __future__ import annotations

import time
from typing import Optional

import ray

from megatron_intuitor.config import ActorSettings
from megatron_intuitor.rollout.engine import RolloutSample, SamplingConfig
from megatron_intuitor.workers.actor import (_DTYPES, _compute_device, cross_rank_backend,
                                             graded_samples)
from megatron_intuitor.workers.group import Worker


class RolloutWorker(Worker):
    def __init__(self, settings: ActorSettings, model_dir: str) -> None:
        super().__init__()  # the rollout ranks' own world
        from megatron_intuitor.rollout.engine import RolloutEngine

        self.engine = RolloutEngine(model_dir, dtype=_DTYPES[settings.rollout.dtype],
                                    max_model_len=settings.rollout.max_model_len,
                                    gpu_memory_utilization=settings.rollout.gpu_memory_utilization,
                                    seed=settings.seed, return_routed_experts=(
                                        settings.model.replays_rollout_routing))
        self.version: Optional[int] = None  # None: the engine's dummy start weights
        self.group = None

    def connect_trainer(self, host: str, port: int, cross_rank: int, cross_world: int) -> None:
        from megatron_intuitor.rollout.transport import cross_rank_group, cross_rank_store

        self.group = cross_rank_group(cross_rank_store(host, port), cross_rank, cross_world,
                                      cross_rank_backend())

    def receive_weights(self) -> int:
        """Training rank 0's broadcast, loaded in place; the weights' version."""
        from megatron_intuitor.rollout.transport import receive_weights

        self.version, _ = receive_weights(self.engine, self.group, _compute_device())
        return self.version

    @ray.method(num_returns=2)
    def rollout(self, prompts: list[list[int]], sampling: SamplingConfig, first_prompt: int,
                records: Optional[list], grade: bool = True,
                answers: bool = False) -> tuple[tuple, dict]:
        """This rank's share of a step: (samples without text, grades, answers) for the training
        ranks,
        and what the controller reads: the weights' version and when generation ran."""
        if self.version is None:
            raise RuntimeError("rollout rank: no weights received yet")
        started = time.time()
        samples = self.engine.generate(prompts, sampling) if prompts else []
        finished = time.time()
        return (graded_samples(samples, records, first_prompt, grade, answers),
                {"version": self.version, "started": started, "finished": finished,
                 "tokens": sum(len(s.prompt_token_ids) + len(s.response_token_ids)
                               for s in samples)})

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[RolloutSample]:
        """Samples with their text (validation)."""
        return self.engine.generate(prompts, sampling) if prompts else []

    def close(self) -> None:
        self.engine.shutdown()
