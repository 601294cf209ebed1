"""The actor: one Megatron rank of the policy (with its reference model, optimizer and colocated
vLLM engine), and the controller-side handle that drives all ranks.

`ActorWorker` runs inside a Ray actor, one per rank, built from `ActorSettings` (made once on the
controller). The data of a step stays on the ranks: each rollout replica samples its share of
the prompts, the ranks exchange the samples among themselves (torch.distributed) so every rank
holds the step's `RolloutBatch`, score their data-parallel share and exchange the per-token
log-probs over the data-parallel group; the controller only ever receives one number per
response (`workers/reports.py`) and sends one advantage per response back.

`ActorGroup` is what the trainer sees: rollout, release_rollout_memory, score, score_reference,
update_policy, sync_weights, generate (validation), save/load, export. It never touches a model.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_intuitor import algorithm, metrics
from megatron_intuitor.batch import (RolloutBatch, batch_from_rollouts, data_parallel_shard,
                                     group_mini_batches)
from megatron_intuitor.config import ActorSettings, OptimizerSettings, Schedule
from megatron_intuitor.platform import on_gpu
from megatron_intuitor.rollout.engine import RolloutSample, SamplingConfig
from megatron_intuitor.rollout.transport import make_transport
from megatron_intuitor.scorer import SCORER_IDS, ema_update_
from megatron_intuitor.workers.group import Worker, WorkerGroup
from megatron_intuitor.workers.reports import (RolloutReport, ScoreReport, rollout_report,
                                               sampling_score_report, score_report)

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


def _lr_scheduler(optimizer, settings: OptimizerSettings, schedule: Schedule):
    """Linear warm-up from 0 over `schedule.warmup_steps`, then `actor.lr_scheduler` decay to 0
    over the run; stepped once per training step (verl's unit), so every mini-batch of a step
    uses the same learning rate (the first step's is 0 when there is a warm-up, as in verl)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=settings.lr, min_lr=0.0,
        lr_warmup_steps=schedule.warmup_steps,
        lr_decay_steps=max(schedule.training_steps, schedule.warmup_steps + 1),
        lr_decay_style=settings.lr_scheduler, start_wd=settings.weight_decay,
        end_wd=settings.weight_decay, wd_incr_steps=max(schedule.training_steps, 1),
        wd_incr_style="constant")


def clip_grad_norm(optimizer, grad_clip: float) -> float:
    """Clip every gradient by the norm over all of them; returns that norm. A mixture of experts
    has two optimizers in Megatron's `ChainedOptimizer` (dense and expert parameters reduce over
    different data-parallel groups), whose `clip_grad_norm` only works for one: the total norm
    comes from the chain (over both groups), then each part is clipped by it, as
    `ChainedOptimizer.step` does."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    if len(parts) == 1:
        return parts[0].clip_grad_norm(grad_clip)
    grad_norm = optimizer.get_grad_norm()
    for part in parts:
        params = part.get_parameters()
        if params:
            clip_grad_by_total_norm_fp32(
                params, grad_clip, grad_norm,
                part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return grad_norm


def guarded_optimizer_step(optimizer, grad_clip: float) -> tuple[bool, float]:
    """Step unless the gradient norm is not finite; then the step is skipped and the weights
    stay untouched. The norm is computed once (one all-reduce): clipping computes it, so it is
    not asked for separately. Returns (stepped, grad_norm before clipping)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(clip_grad_norm(optimizer, grad_clip) if grad_clip > 0
                      else optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        optimizer.zero_grad()  # clipping by a non-finite norm touched only these gradients
        return False, grad_norm
    optimizer.step_with_ready_grads()
    return True, grad_norm


def optimizer_step_at_scheduled_lr(optimizer, grad_clip: float,
                                   finite_loss: bool = True) -> tuple[bool, float, float]:
    """`guarded_optimizer_step` at the learning rate the schedule set (a non-finite loss skips
    it). Returns (stepped, grad_norm, the learning rate this step used)."""
    lr = optimizer.param_groups[0]["lr"]
    if finite_loss:
        stepped, grad_norm = guarded_optimizer_step(optimizer, grad_clip)
    else:
        optimizer.zero_grad()
        stepped, grad_norm = False, float("nan")
    return stepped, grad_norm, lr


def end_of_training_step(lr_scheduler, stepped: Sequence[bool]) -> None:
    """Advance the LR schedule once per training step, verl's unit, whatever the number of
    optimizer steps in it; a training step whose optimizer steps were all skipped (non-finite)
    leaves it, so skipped steps do not eat the warm-up."""
    if any(stepped):
        lr_scheduler.step(increment=1)


def graded_samples(samples: list[RolloutSample], records: Optional[list], first_prompt: int,
                   grade: bool = True, answers: bool = False
                   ) -> tuple[list[RolloutSample], Optional[list[float]], Optional[list]]:
    """A replica's samples with global prompt indices (from `first_prompt`) and no text, their
    0/1 grades against `records` (`grade`) and their extracted final answers (`answers`); None
    for what was not asked or without `records`."""
    verifiable = extracted = None
    if records is not None and grade:
        from megatron_intuitor.evaluation.registry import grade_record

        verifiable = [float(grade_record(records[s.prompt_index], s.text)) for s in samples]
    if records is not None and answers:
        from megatron_intuitor.evaluation.best_of_n import extract_answer

        extracted = [extract_answer(records[s.prompt_index], s.text) for s in samples]
    # the text was needed only to grade and read answers
    return ([replace(s, prompt_index=s.prompt_index + first_prompt, text="") for s in samples],
            verifiable, extracted)


def cross_rank_backend() -> str:
    return "nccl" if on_gpu() else "gloo"


def _compute_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


class ActorWorker(Worker):
    """Policy shards, frozen reference shards, distributed optimizer and one rollout engine;
    between the calls of a step it holds the step's rollouts and their old / reference
    log-probs."""

    def __init__(self, settings: ActorSettings, model_dir: str) -> None:
        super().__init__()  # joins the default process group
        from megatron.core import parallel_state

        from megatron_intuitor import parallel
        from megatron_intuitor.models.policy import load_policy
        from megatron_intuitor.models.optimizer import build_optimizer

        self.settings = settings
        sizes = settings.layout.parallel_sizes()
        parallel.init_model_parallel(sizes, seed=settings.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        # one rank per data-parallel group reports its share (every rank of the group holds it:
        # the last pipeline stage broadcasts); one rank per rollout replica reports its samples
        self.reports_for_dp_group = (parallel_state.get_tensor_model_parallel_rank() == 0
                                     and parallel_state.get_pipeline_model_parallel_rank() == 0)
        self.reports_for_replica = self.rank % settings.rollout.tensor_parallel == 0
        self.model_dir = model_dir
        model = settings.model
        precision = dict(params_dtype=_DTYPES[model.precision], fp8=model.fp8,
                         recompute=model.recompute, fp8_recipe=model.fp8_recipe,
                         fp8_amax_reduction=model.fp8_amax_reduction,
                         moe_token_dispatcher=model.moe_token_dispatcher,
                         sequence_parallel=model.sequence_parallel)
        self.hf_config, self.policy = load_policy(model_dir, sizes, **precision)
        self.policy, self.optimizer = build_optimizer(
            self.policy, settings.optimizer.lr, weight_decay=settings.optimizer.weight_decay,
            clip_grad=settings.optimizer.grad_clip)
        self.lr_scheduler = _lr_scheduler(self.optimizer, settings.optimizer, settings.schedule)
        if model.replays_rollout_routing:  # the policy only: reference and scorer route freely
            from megatron_intuitor.models.routing_replay import install_routing_replay

            install_routing_replay(self.policy)
        self.expert_load = None  # mixture of experts: the update pass's expert load
        experts = getattr(self.hf_config, "num_experts", None)
        if experts:
            from megatron_intuitor.models.moe_stats import ExpertLoadMeter

            self.expert_load = ExpertLoadMeter(self.policy, self.hf_config.num_hidden_layers,
                                               experts)
        self.reference = None
        if model.keep_reference:
            self.reference = _frozen(load_policy(model_dir, sizes, **precision)[1])
        self.ref_offload = model.ref_offload and on_gpu()
        if self.ref_offload:
            self._move_reference("cpu")
        self.scorer_model = self._build_scorer(model_dir, sizes, precision)
        parallel.warm_up_groups()  # NCCL communicators take their memory before vLLM sizes
        self.weights_version = 0  # the policy's: the training step whose update made it
        self.engine_asleep = False
        self.engine = self.transport = None  # separate: no engine, `connect_rollout` the transport
        if settings.rollout.placement == "colocated":
            self.engine = self._build_engine()
            self.transport = make_transport(self.engine, self.policy, self.hf_config,
                                            bucket_bytes=settings.rollout.weight_sync_bucket_bytes)
            self.sync_weights()
        # the step's data, kept here between the controller's calls
        self.rollouts: Optional[RolloutBatch] = None
        self.old_log_probs: Optional[torch.Tensor] = None
        self.ref_log_probs: Optional[torch.Tensor] = None

    def _build_scorer(self, model_dir: str, sizes, precision: dict) -> Optional[list]:
        """`algorithm.scorer`'s model chunks: None (online: the policy scores), the start
        weights (frozen: the reference model when the KL term keeps one, else a copy) or the
        EMA copy, in fp32 whatever the policy's precision: its updates move it by ~1e-5 of the
        difference, which bf16 (8 bits of mantissa) would round away."""
        from megatron_intuitor.models.policy import load_policy

        scorer = self.settings.scorer.scorer
        if scorer == "online":
            return None
        if scorer == "frozen":
            return (self.reference if self.reference is not None
                    else _frozen(load_policy(model_dir, sizes, **precision)[1]))
        # the policy's layout (dispatcher, sequence parallelism), in fp32 and without FP8
        return _frozen(load_policy(model_dir, sizes, **{**precision, "params_dtype": torch.float32,
                                                        "fp8": None})[1])

    # ------------------------------------------------------------------------------- rollout

    def _build_engine(self):
        from megatron_intuitor.models.optimizer import training_reserve_bytes
        from megatron_intuitor.rollout.engine import RolloutEngine

        rollout = self.settings.rollout
        return RolloutEngine(self.model_dir, dtype=_DTYPES[rollout.dtype],
                             max_model_len=rollout.max_model_len,
                             tensor_parallel_size=rollout.tensor_parallel,
                             gpu_memory_utilization=rollout.gpu_memory_utilization,
                             reserved_gpu_bytes=training_reserve_bytes(self.optimizer),
                             seed=self.settings.seed, score_at_sampling=rollout.score_at_sampling,
                             return_routed_experts=self.settings.model.replays_rollout_routing)

    def close(self) -> None:
        """vLLM frees its shared-memory message queues only in its own teardown."""
        if self.engine is not None:
            self.engine.shutdown()

    def open_weights_store(self) -> tuple[str, int]:
        """Rank 0, separate placement: the cross-rank group's rendezvous, on a free port."""
        import ray

        from megatron_intuitor.rollout.transport import cross_rank_store

        host = ray.util.get_node_ip_address()
        self._weights_store = cross_rank_store(host, server=True)
        return host, self._weights_store.port

    def connect_rollout(self, cross_world: int) -> None:
        """Separate placement: rank 0 joins the group spanning it and the rollout ranks (as its
        rank 0), the others only take part in the export."""
        from megatron_intuitor.rollout.transport import cross_rank_group

        group = (cross_rank_group(self._weights_store, 0, cross_world, cross_rank_backend())
                 if self.rank == 0 else None)
        self.transport = make_transport(None, self.policy, self.hf_config,
                                        bucket_bytes=self.settings.rollout.weight_sync_bucket_bytes,
                                        group=group, rollout_dtype=_DTYPES[
                                            self.settings.rollout.dtype],
                                        device=_compute_device())

    def get_weight_sync_path(self) -> str:
        return self.transport.path

    def generate(self, prompts: list[list[int]],
                 sampling: SamplingConfig) -> Optional[list[RolloutSample]]:
        """This replica's samples (validation), from the replica's first rank; None from the
        others (every rank of a replica samples the same)."""
        samples = self.engine.generate(prompts, sampling) if prompts else []
        return samples if self.reports_for_replica else None

    def rollout(self, prompts: list[list[int]], sampling: SamplingConfig, first_prompt: int,
                records: Optional[list], ngram: int = 3, grade: bool = True,
                answers: bool = False) -> Optional[RolloutReport]:
        """Sample this replica's prompts (global indices from `first_prompt`), and, when
        `records` (their prompt records) are given, grade them (`grade`) and read their final
        answers (`answers`); share the samples with every rank: each rank then holds the step's
        whole RolloutBatch. Rank 0 reports it; the others None."""
        import torch.distributed as dist

        samples = self.engine.generate(prompts, sampling) if prompts else []
        shared: tuple[list, Optional[list[float]], Optional[list]] = ([], None, None)
        if self.reports_for_replica:
            shared = graded_samples(samples, records, first_prompt, grade, answers)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, shared)
        return self._keep_rollouts(gathered, records is not None and grade,
                                   records is not None and answers, ngram)

    def ingest(self, graded: bool, answers: bool, ngram: int, *gathered
               ) -> Optional[RolloutReport]:
        """The step's responses generated by the separate rollout ranks (`gathered`: each
        rank's (samples, grades, answers), handed over by Ray), kept like `rollout`'s."""
        return self._keep_rollouts(gathered, graded, answers, ngram)

    def _keep_rollouts(self, gathered, graded: bool, answers: bool,
                       ngram: int) -> Optional[RolloutReport]:
        step_samples = [sample for rank_samples, _, _ in gathered for sample in rank_samples]
        self.rollouts = batch_from_rollouts(step_samples, self.settings.pad_token_id)
        self.old_log_probs = self.ref_log_probs = None
        if self.rank != 0:
            return None
        scores = [score for _, scores, _ in gathered if scores is not None for score in scores]
        read = [answer for _, _, found in gathered if found is not None for answer in found]
        return rollout_report(self.rollouts, scores if graded else None, step_samples, ngram,
                              read if answers else None)

    def sync_weights(self) -> None:
        """The policy's weights into this rank's engine: shard to shard when they are sharded
        alike, else streamed (HF names, full tensors). After `release_rollout_memory` (GPU), the
        engine's weight memory comes back first and its KV cache after the sync."""
        if self.engine_asleep:
            self.engine.wake_up(["weights"])
        self.transport.push(self.weights_version)  # separate: broadcast to the rollout ranks
        if self.engine_asleep:
            self.engine.wake_up(["kv_cache"])
            self.engine_asleep = False

    def release_rollout_memory(self) -> None:
        """Colocation on GPU: the engine frees its weights and KV cache for the training phase
        (level 2 drops the weights, the sync after the update brings new ones; level 1 keeps
        them in host memory: `rollout.sleep_level`). A no-op on CPU."""
        if self.engine is not None and not self.engine_asleep:
            self.engine.sleep(level=self.settings.rollout.sleep_level)
            self.engine_asleep = True

    def _move_reference(self, device: str) -> None:
        for chunk in self.reference:
            chunk.to(device)

    @contextmanager
    def _on_compute_device(self, model_chunks):
        """With `actor.ref_offload` on GPU the reference's weights live in host memory except
        during its forwards (as the reference, or as the frozen scorer)."""
        offloaded = self.ref_offload and model_chunks is self.reference
        if offloaded:
            self._move_reference("cuda")
        try:
            yield
        finally:
            if offloaded:
                self._move_reference("cpu")

    # ------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def _score_shard(self, model_chunks, batch: Optional[RolloutBatch] = None,
                     replay_routing: bool = False
                     ) -> tuple[RolloutBatch, dict[str, torch.Tensor]]:
        """This data-parallel rank's share of `batch` (default: the step's rollouts) and its
        per-token scores; `replay_routing`: the routers replay the engine's experts."""
        from megatron_intuitor.models.forward import score_batch

        batch = self.rollouts if batch is None else batch
        shard = data_parallel_shard(batch, self.dp_rank, self.dp_size).trimmed()
        attention_mask = torch.arange(shard.input_ids.shape[1]) < shard.lengths[:, None]
        return shard, score_batch(
            model_chunks, shard.input_ids, attention_mask, shard.response_mask,
            temperature=self.settings.loss.temperature, vocab_size=self.hf_config.vocab_size,
            batching=self.settings.batches.micro_batching(
                self.settings.batches.log_prob_micro_batch_size),
            routed_experts=shard.routed_experts if replay_routing else None)

    def _gather_data_parallel(self, shard_values: torch.Tensor) -> torch.Tensor:
        """[shard rows, width] per data-parallel rank -> [all rows, the batch's width] on
        every rank, rows in batch order (padding columns 0)."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        from megatron_intuitor.platform import device

        width = self.rollouts.input_ids.shape[1]
        padded = torch.nn.functional.pad(shard_values, (0, width - shard_values.shape[1]))
        if self.dp_size == 1:
            return padded
        padded = padded.to(device())
        parts = [torch.empty_like(padded) for _ in range(self.dp_size)]
        dist.all_gather(parts, padded, group=parallel_state.get_data_parallel_group())
        return torch.cat(parts).cpu()

    def score(self) -> Optional[ScoreReport]:
        """Score this rank's share with the pre-update policy; the old log-probs of the whole
        batch stay on every rank, the per-response figures go to the controller from one rank
        per data-parallel group (None from the others). Scored at sampling
        (`rollout.score_at_sampling`), the figures are the engine's and no forward runs: the
        update takes the old log-probs from its own forward (on-policy)."""
        if self.settings.rollout.score_at_sampling:
            shard = data_parallel_shard(self.rollouts, self.dp_rank, self.dp_size).trimmed()
            report = sampling_score_report(shard) if self.reports_for_dp_group else None
        else:
            shard, scores = self._score_shard(
                self.policy, replay_routing=self.settings.model.replays_rollout_routing)
            self.old_log_probs = self._gather_data_parallel(scores["log_probs"])
            report = score_report(scores, shard) if self.reports_for_dp_group else None
        if self.scorer_model is None:
            return report
        # `algorithm.scorer`: the reward's self-certainty from the EMA copy or the start weights
        # (the same vocab-parallel forward); entropy and log-probs stay the policy's
        with self._on_compute_device(self.scorer_model):
            shard, scores = self._score_shard(self.scorer_model)
        if report is None:
            return None
        return replace(report, self_certainty=algorithm.sequence_rewards_from_self_certainty(
            scores["self_certainty"], shard.response_mask))

    def score_samples(self, samples: list[RolloutSample]) -> Optional[ScoreReport]:
        """The current policy's figures of given responses (validation), padded with repeated
        rows to split over the data-parallel ranks; one rank per data-parallel group reports."""
        padded = list(samples) + [samples[-1]] * (-len(samples) % self.dp_size)
        shard, scores = self._score_shard(self.policy,
                                          batch_from_rollouts(padded, self.settings.pad_token_id))
        return score_report(scores, shard) if self.reports_for_dp_group else None

    def score_reference(self) -> None:
        """The reference model's log-probs of the whole batch, kept on every rank; with
        `actor.ref_offload` on GPU its weights live in host memory except during this forward."""
        with self._on_compute_device(self.reference):
            _, scores = self._score_shard(self.reference)
        self.ref_log_probs = self._gather_data_parallel(scores["log_probs"])

    # -------------------------------------------------------------------------------- update

    def update_policy(self, advantages: torch.Tensor, step: int) -> Optional[dict[str, float]]:
        """PPO epochs over mini-batches of whole prompt groups, one optimizer step each, on the
        step's rollouts with `advantages` [responses]; rank 0 returns the metrics (identical on
        every rank), the others None."""
        settings, batches = self.settings, self.settings.batches
        batch = self.rollouts.for_update(advantages, self.old_log_probs, self.ref_log_probs)
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step) \
            if batches.shuffle_mini_batches else None
        per_step: list[dict[str, float]] = []
        with self.expert_load.measuring() if self.expert_load else nullcontext():
            self._ppo_epochs(batch, generator, per_step)
        end_of_training_step(self.lr_scheduler,
                             [not m[metrics.SKIPPED_STEPS] for m in per_step])
        result = {name: sum(m[name] for m in per_step) / len(per_step) for name in per_step[0]}
        result[metrics.SKIPPED_STEPS] = sum(m[metrics.SKIPPED_STEPS] for m in per_step)
        result[metrics.LR] = per_step[-1][metrics.LR]  # the step's (one per training step)
        if self.expert_load:
            result.update(self.expert_load.metrics())  # collective
        result.update(self._update_scorer(step))
        self.weights_version = step
        return result if self.rank == 0 else None

    def _ppo_epochs(self, batch, generator: Optional[torch.Generator],
                    per_step: list[dict[str, float]]) -> None:
        """The update's optimizer steps; each appends its metrics to `per_step`."""
        from megatron_intuitor.ppo import ppo_forward_backward

        settings, batches = self.settings, self.settings.batches
        for _ in range(batches.ppo_epochs):
            for rows in group_mini_batches(batch, batches.ppo_mini_batch_prompts, generator):
                shard = data_parallel_shard(batch.select(rows), self.dp_rank,
                                            self.dp_size).trimmed()
                for chunk in self.policy:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                losses = ppo_forward_backward(
                    self.policy, shard, batches.micro_batching(batches.ppo_micro_batch_size),
                    settings.loss, self.hf_config.vocab_size)
                stepped, grad_norm, lr = optimizer_step_at_scheduled_lr(
                    self.optimizer, settings.optimizer.grad_clip,
                    finite_loss=all(math.isfinite(v) for v in losses.values()))
                per_step.append({**losses, metrics.GRAD_NORM: grad_norm, metrics.LR: lr,
                                 metrics.SKIPPED_STEPS: float(not stepped)})

    def _update_scorer(self, step: int) -> dict[str, float]:
        """The EMA scorer's move towards the updated policy, once per training step as the
        paper (whether or not an optimizer step was skipped: the schedule is the run's clock);
        the step's scorer metrics."""
        scorer = self.settings.scorer
        figures = {metrics.REWARD_SCORER: SCORER_IDS[scorer.scorer]}
        if scorer.scorer == "ema":
            weight = scorer.policy_weight(step, self.settings.schedule.training_steps)
            ema_update_(self.scorer_model, self.policy, weight)
            figures[metrics.SCORER_EMA_POLICY_WEIGHT] = weight
        return figures

    # --------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, root: str, step: int, extra: dict, keep_last: int,
                        keep_steps: tuple[int, ...] = ()) -> str:
        from megatron_intuitor.checkpoint import save_checkpoint

        extra = {**extra, "lr_scheduler": self.lr_scheduler.state_dict()}
        return str(save_checkpoint(root, step, self.policy, self.optimizer, extra=extra,
                                   keep_last=keep_last, keep_steps=keep_steps,
                                   hf_assets_dir=self.model_dir,
                                   companions=self._checkpointed_companions()))

    def _checkpointed_companions(self) -> dict[str, list]:
        """The models a checkpoint holds besides the policy: the EMA scorer's weights (the
        frozen ones are the start weights, rebuilt from the model directory)."""
        return {"ema_scorer": self.scorer_model} if self.settings.scorer.scorer == "ema" else {}

    def load_checkpoint(self, path: str) -> dict:
        from megatron_intuitor.checkpoint import load_checkpoint

        extra = load_checkpoint(path, self.policy, self.optimizer,
                                companions=self._checkpointed_companions())
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.weights_version = int(extra["step"])
        if self.engine is not None:  # separate: the controller syncs both sides at once
            self.sync_weights()
        return extra

    def export_hf(self, out_dir: str) -> None:
        """Write the policy as a Hugging Face checkpoint (rank 0 writes; all ranks stream)."""
        from megatron_intuitor.checkpoint import save_hf_checkpoint
        from megatron_intuitor.models.bridge import export_hf_weights

        save_hf_checkpoint(export_hf_weights(self.policy, self.hf_config), out_dir,
                           assets_dir=self.model_dir, overwrite=True, write=self.rank == 0)

    def data_parallel_coordinates(self) -> tuple[int, bool]:
        """(DP rank, whether this rank reports for its DP group)."""
        return self.dp_rank, self.reports_for_dp_group


def _frozen(model_chunks: list) -> list:
    """`model_chunks` for forwards only (a reference or scorer model): no gradients, eval."""
    for chunk in model_chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return model_chunks


@dataclass
class PendingRollout:
    """A generation running on the separate rollout ranks: Ray references, one per rank."""

    samples: list  # each rank's (samples, grades, answers), for the training ranks
    facts: list  # each rank's version and times, for the controller
    graded: bool
    answers: bool
    submitted: float  # time.time() at submission


class ActorGroup:
    """The controller's handle on all actor ranks (`group`: their WorkerGroup, or anything with
    its execute_* methods, e.g. the simulated ranks of `bench/controller_traffic.py`)."""

    def __init__(self, settings: ActorSettings, group, rollout_group=None) -> None:
        self.group, self.rollout_group = group, rollout_group  # rollout: separate placement
        self.world_size = settings.layout.world_size
        coordinates = group.execute_all("data_parallel_coordinates")
        # one reporting rank per DP group, in DP order
        self.dp_leaders = [rank for dp in range(settings.layout.data_parallel)
                           for rank, (dp_rank, leader) in enumerate(coordinates)
                           if dp_rank == dp and leader]
        self.rollout_tp = settings.rollout.tensor_parallel
        self.rollout_replicas = (self.world_size // self.rollout_tp if rollout_group is None
                                 else rollout_group.world_size)
        self.engine_version: Optional[int] = None  # separate: the rollout ranks' weights
        if rollout_group is not None:
            self._connect_rollout()

    @classmethod
    def start(cls, settings: ActorSettings, model_dir: Path, *, placement: str,
              cpus_per_worker: float) -> "ActorGroup":
        """One Ray actor per rank, each building its models and engine from `settings`."""
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TOKENIZERS_PARALLELISM": "false",
               "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        layout = settings.layout
        gpus = 1 if layout.device == "cuda" else 0
        group = WorkerGroup(
            ActorWorker, layout.world_size, placement=placement,
            num_cpus_per_worker=cpus_per_worker, num_gpus_per_worker=gpus, env=env,
            args=(settings, str(model_dir)), name="actor", role="training")
        rollout_group = None
        try:
            if settings.rollout.placement == "separate":  # a placement group of their own
                from megatron_intuitor.workers.rollout import RolloutWorker

                rollout_group = WorkerGroup(
                    RolloutWorker, settings.rollout.num_ranks, placement=placement,
                    num_cpus_per_worker=cpus_per_worker, num_gpus_per_worker=gpus, env=env,
                    args=(settings, str(model_dir)), name="rollout", role="rollout")
            return cls(settings, group, rollout_group)
        except BaseException:
            group.shutdown()
            if rollout_group is not None:
                rollout_group.shutdown()
            raise

    def _connect_rollout(self) -> None:
        """The cross-rank group: training rank 0 (rank 0 of it) and every rollout rank; then
        the first weights (version 0) to the rollout ranks."""
        host, port = self.group.execute_rank0("open_weights_store")
        world = 1 + self.rollout_group.world_size
        joins = self.group.submit_per_rank("connect_rollout", [(world,)] * self.group.world_size)
        receivers = self.rollout_group.submit_per_rank(
            "connect_trainer", [(host, port, 1 + rank, world)
                                for rank in range(self.rollout_group.world_size)])
        self.rollout_group.gather(receivers, "connect_trainer")
        self.group.gather(joins, "connect_rollout")
        self.sync_weights()

    # --------------------------------------------------- separate rollout ranks: a step ahead

    def submit_rollout(self, prompts: Sequence[list[int]], sampling: SamplingConfig, seed: int,
                       records: Optional[Sequence] = None, grade: bool = True,
                       answers: bool = False) -> "PendingRollout":
        """Start generating on the rollout ranks (separate placement) and return at once;
        `records`, `grade`, `answers` as for `rollout`."""
        replicas = self._per_replica(prompts, sampling, seed)
        refs = self.rollout_group.submit_per_rank(
            "rollout", [(replica_prompts, replica_sampling, start,
                         None if records is None else list(records[start:start + len(
                             replica_prompts)]), grade, answers)
                        for start, replica_prompts, replica_sampling in replicas])
        return PendingRollout(samples=[samples for samples, _ in refs],
                              facts=[facts for _, facts in refs],
                              graded=records is not None and grade,
                              answers=records is not None and answers, submitted=time.time())

    def collect_rollout(self, pending: "PendingRollout",
                        ngram: int = 3) -> tuple[RolloutReport, dict]:
        """Wait for `pending`'s responses and hand them to the training ranks (by reference:
        the controller never holds them); the report, and the generation's version and times."""
        facts = self.rollout_group.gather(pending.facts, "rollout")
        versions = {fact["version"] for fact in facts}
        if len(versions) != 1:
            raise RuntimeError(f"rollout ranks generated one step with weight versions "
                               f"{sorted(versions)}")
        report = self.group.execute_all("ingest", pending.graded, pending.answers, ngram,
                                     *pending.samples)[0]
        return report, {"version": versions.pop(),
                        "started": min(fact["started"] for fact in facts),
                        "finished": max(fact["finished"] for fact in facts),
                        "tokens": sum(fact["tokens"] for fact in facts)}

    def _per_replica(self, prompts: Sequence[list[int]], sampling: SamplingConfig,
                     seed: int) -> list[tuple[int, list[list[int]], SamplingConfig]]:
        """(first prompt, prompts, sampling with the replica's seed) of each rollout replica:
        the prompts split in order."""
        share = math.ceil(len(prompts) / self.rollout_replicas)
        starts = [min(r * share, len(prompts)) for r in range(self.rollout_replicas)]
        return [(start, list(prompts[start:start + share]),
                 replace(sampling, seed=seed * 1009 + replica))
                for replica, start in enumerate(starts)]

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig,
                 seed: int) -> list[RolloutSample]:
        """Samples of `prompts` (validation: the texts come back), split over the rollout
        replicas; grouped by prompt, prompt indices global."""
        replicas = self._per_replica(prompts, sampling, seed)
        if self.rollout_group is not None:
            results = self.rollout_group.execute_per_rank(
                "generate", [replica[1:] for replica in replicas])
            return [replace(sample, prompt_index=sample.prompt_index + start)
                    for (start, _, _), samples in zip(replicas, results) for sample in samples]
        results = self.group.execute_per_rank(
            "generate", [replicas[rank // self.rollout_tp][1:] for rank in range(self.world_size)])
        return [replace(sample, prompt_index=sample.prompt_index + start)
                for replica, (start, _, _) in enumerate(replicas)
                for sample in results[replica * self.rollout_tp]]

    def rollout(self, prompts: Sequence[list[int]], sampling: SamplingConfig, seed: int,
                records: Optional[Sequence] = None, ngram: int = 3, grade: bool = True,
                answers: bool = False) -> RolloutReport:
        """The step's responses to `prompts`, kept on the ranks; with `records` (the prompts'
        records) graded (`grade`) and their final answers read (`answers`). Returns a few
        figures per response (their distinct `ngram`-gram ratios among them)."""
        def replica_records(start: int, count: int) -> Optional[list]:
            return None if records is None else list(records[start:start + count])

        replicas = self._per_replica(prompts, sampling, seed)
        per_rank = []
        for rank in range(self.world_size):
            start, replica_prompts, replica_sampling = replicas[rank // self.rollout_tp]
            per_rank.append((replica_prompts, replica_sampling, start,
                             replica_records(start, len(replica_prompts)), ngram, grade,
                             answers))
        return self.group.execute_per_rank("rollout", per_rank)[0]

    def release_rollout_memory(self) -> None:
        """GPU: the engines free their weights and KV cache for training (`sync_weights` brings
        them back). A no-op on CPU."""
        self.group.execute_all("release_rollout_memory")

    def score(self) -> ScoreReport:
        """Old log-probs of the step's rollouts (kept on the ranks); per-response figures."""
        results = self.group.execute_all("score")
        return ScoreReport.concatenate([results[rank] for rank in self.dp_leaders])

    def score_samples(self, samples: Sequence[RolloutSample]) -> ScoreReport:
        """The current policy's figures of `samples` (validation responses), in their order."""
        results = self.group.execute_all("score_samples", list(samples))
        report = ScoreReport.concatenate([results[rank] for rank in self.dp_leaders])
        return ScoreReport(*(getattr(report, name)[:len(samples)]
                             for name in ("self_certainty", "entropy_sum", "logprob_diff_sum")))

    def score_reference(self) -> None:
        """Reference log-probs of the step's rollouts, kept on the ranks."""
        self.group.execute_all("score_reference")

    def update_policy(self, advantages: torch.Tensor, step: int) -> dict[str, float]:
        return self.group.execute_all("update_policy", advantages, step)[0]

    def sync_weights(self) -> None:
        """The policy into every engine; separate: the training ranks' broadcast and the
        rollout ranks' reception run at once."""
        if self.rollout_group is None:
            self.group.execute_all("sync_weights")
            return
        sends = self.group.submit_per_rank("sync_weights", [()] * self.group.world_size)
        received = self.rollout_group.submit_per_rank(
            "receive_weights", [()] * self.rollout_group.world_size)
        self.engine_version = self.rollout_group.gather(received, "receive_weights")[0]
        self.group.gather(sends, "sync_weights")

    def weight_sync_path(self) -> str:
        """How rank 0's weights reach its engine: "shard to shard" or why they stream."""
        return self.group.execute_rank0("get_weight_sync_path")

    def save_checkpoint(self, root: str, step: int, extra: dict, keep_last: int,
                        keep_steps: tuple[int, ...] = ()) -> str:
        return self.group.execute_all("save_checkpoint", root, step, extra, keep_last,
                                      keep_steps)[0]

    def load_checkpoint(self, path: str) -> dict:
        extra = self.group.execute_all("load_checkpoint", path)[0]
        if self.rollout_group is not None:
            self.sync_weights()
        return extra

    def export_hf(self, out_dir: str) -> None:
        self.group.execute_all("export_hf", out_dir)

    def shutdown(self) -> None:
        self.group.shutdown()
        if self.rollout_group is not None:
            self.rollout_group.shutdown()
