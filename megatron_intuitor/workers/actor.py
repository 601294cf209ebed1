"""The actor: one Megatron rank of the policy (with its reference model, optimizer and colocated
vLLM engine), and the controller-side handle that drives all ranks.

`ActorWorker` runs inside a Ray actor, one per rank. Each rank takes the whole batch from the
object store and works on its data-parallel share; results come back from one rank of each
data-parallel group (every rank of the group holds them: the last pipeline stage broadcasts).

`ActorGroup` is what the trainer sees: generate, compute_log_probs, compute_ref_log_probs,
update_policy, sync_weights, save/load, export. It splits and gathers; it never touches a model.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import ray
import torch
from omegaconf import DictConfig, OmegaConf

from megatron_intuitor import metrics
from megatron_intuitor.batch import (MicroBatching, TrainingBatch, data_parallel_shard,
                                     group_mini_batches)
from megatron_intuitor.config import Layout, Schedule
from megatron_intuitor.platform import on_gpu
from megatron_intuitor.ppo import PPOSettings, load_policy
from megatron_intuitor.rollout.engine import RolloutSample, SamplingConfig
from megatron_intuitor.workers.group import Worker, WorkerGroup

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "float16": torch.float16}


def _lr_scheduler(optimizer, actor: DictConfig, schedule: Schedule):
    """Linear warm-up from 0 over `schedule.warmup_steps`, then `actor.lr_scheduler` decay to 0
    over the run's optimizer steps (verl's defaults: cosine, warm-up ratio 0.1)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=actor.lr, min_lr=0.0,
        lr_warmup_steps=schedule.warmup_steps,
        lr_decay_steps=max(schedule.optimizer_steps, schedule.warmup_steps + 1),
        lr_decay_style=actor.lr_scheduler, start_wd=actor.weight_decay,
        end_wd=actor.weight_decay, wd_incr_steps=max(schedule.optimizer_steps, 1),
        wd_incr_style="constant")


def _micro_batching(actor: DictConfig, micro_batch_size: int) -> MicroBatching:
    """`actor.use_dynamic_bsz`: token-budget micro-batches of `actor.max_tokens_per_gpu`, else
    `micro_batch_size` rows; `actor.use_remove_padding`: sequence packing."""
    return MicroBatching(micro_batch_size=micro_batch_size,
                         max_tokens=actor.max_tokens_per_gpu if actor.use_dynamic_bsz else 0,
                         packed=actor.use_remove_padding)


def guarded_optimizer_step(optimizer, grad_clip: float) -> tuple[bool, float]:
    """Step unless the gradient norm is not finite; then the step is skipped and the weights
    stay untouched. Returns (stepped, grad_norm)."""
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        optimizer.zero_grad()
        return False, grad_norm
    if grad_clip > 0:
        optimizer.clip_grad_norm(grad_clip)
    optimizer.step_with_ready_grads()
    return True, grad_norm


class ActorWorker(Worker):
    """Policy shards, frozen reference shards, distributed optimizer and one rollout engine."""

    def __init__(self, cfg: dict, model_dir: str, schedule: Schedule) -> None:
        super().__init__()  # joins the default process group
        from megatron.core import parallel_state

        from megatron_intuitor import parallel
        from megatron_intuitor.models.optimizer import build_optimizer

        self.cfg = cfg = OmegaConf.create(cfg)
        actor = cfg.actor
        sizes = parallel.ParallelSizes(actor.tensor_model_parallel_size,
                                       actor.pipeline_model_parallel_size,
                                       actor.virtual_pipeline_model_parallel_size)
        parallel.init_model_parallel(sizes, seed=cfg.trainer.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.model_dir = model_dir
        precision = dict(params_dtype=_DTYPES[actor.precision], fp8=actor.fp8,
                         recompute=actor.recompute, fp8_recipe=actor.fp8_recipe,
                         fp8_amax_reduction=actor.fp8_amax_reduction)
        self.hf_config, self.policy = load_policy(model_dir, sizes, **precision)
        self.policy, self.optimizer = build_optimizer(
            self.policy, actor.lr, weight_decay=actor.weight_decay, clip_grad=actor.grad_clip)
        self.lr_scheduler = _lr_scheduler(self.optimizer, actor, schedule)
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            _, self.reference = load_policy(model_dir, sizes, **precision)
            for chunk in self.reference:
                chunk.requires_grad_(False)
                chunk.eval()
        self.ppo_settings = PPOSettings(
            temperature=cfg.rollout.temperature, vocab_size=self.hf_config.vocab_size,
            clip_ratio=cfg.algorithm.clip_ratio, kl_coef=cfg.algorithm.kl_coef,
            kl_type=cfg.algorithm.kl_type, entropy_coef=cfg.algorithm.entropy_coef,
            tis_cap=cfg.rollout.tis_cap, policy_loss=cfg.algorithm.policy_loss,
            cov_select_ratio=cfg.algorithm.cov.select_ratio,
            cov_clip_lower=cfg.algorithm.cov.clip_lower,
            cov_clip_upper=cfg.algorithm.cov.clip_upper, cov_kl_coef=cfg.algorithm.cov.kl_coef)
        self.ref_offload = bool(actor.ref_offload) and on_gpu()
        if self.ref_offload:
            self._move_reference("cpu")
        parallel.warm_up_groups()  # NCCL communicators take their memory before vLLM sizes
        self.engine = self._build_engine()
        self.engine_asleep = False
        self.direct_sync = self._plan_direct_sync()
        self.sync_weights()

    # ------------------------------------------------------------------------------- rollout

    def _build_engine(self):
        from megatron_intuitor.models.optimizer import training_reserve_bytes
        from megatron_intuitor.rollout.engine import RolloutEngine

        rollout, data = self.cfg.rollout, self.cfg.data
        # "auto": the rollout runs in the training precision
        dtype = _DTYPES[self.cfg.actor.precision if rollout.dtype == "auto" else rollout.dtype]
        return RolloutEngine(self.model_dir, dtype=dtype,
                             max_model_len=data.max_prompt_length + data.max_response_length,
                             tensor_parallel_size=rollout.tensor_parallel_size,
                             gpu_memory_utilization=rollout.gpu_memory_utilization,
                             reserved_gpu_bytes=training_reserve_bytes(self.optimizer),
                             seed=self.cfg.trainer.seed)

    def _plan_direct_sync(self):
        """The direct shard-to-shard sync when the engine is sharded like the policy, else None
        (the sync then streams full tensors; the reason goes to the log)."""
        from megatron_intuitor.rollout.shard_sync import ShardSync, ShardSyncUnavailable

        try:
            direct_sync = ShardSync.plan(self.engine, self.policy, self.hf_config)
        except ShardSyncUnavailable as why:
            self.weight_sync_path = f"streams full tensors ({why})"
            return None
        self.weight_sync_path = "shard to shard"
        return direct_sync

    def close(self) -> None:
        """vLLM frees its shared-memory message queues only in its own teardown."""
        self.engine.shutdown()

    def get_weight_sync_path(self) -> str:
        return self.weight_sync_path

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[RolloutSample]:
        return self.engine.generate(prompts, sampling) if prompts else []

    def sync_weights(self) -> dict[str, float]:
        """The policy's weights into this rank's engine: shard to shard when they are sharded
        alike, else streamed (HF names, full tensors). On GPU the engine's weight memory comes
        back first and its KV cache after the sync."""
        from megatron_intuitor.models.bridge import export_hf_weights
        from megatron_intuitor.rollout.weight_sync import sync_weights

        if self.engine_asleep:
            self.engine.wake_up(["weights"])
        if self.direct_sync is not None:
            report = self.direct_sync()
        else:
            report = sync_weights(self.engine, export_hf_weights(self.policy, self.hf_config),
                                  bucket_bytes=int(self.cfg.rollout.weight_sync_bucket_mb * 2**20))
        if self.engine_asleep:
            self.engine.wake_up(["kv_cache"])
            self.engine_asleep = False
        return {"bytes": report.bytes, "seconds": report.seconds}

    def _release_rollout_memory(self) -> None:
        """Colocation on GPU: the engine frees its weights and KV cache for the training phase
        (level 2 drops the weights, the sync after the update brings new ones; level 1 keeps
        them in host memory: `rollout.sleep_level`). A no-op on CPU."""
        if not self.engine_asleep:
            self.engine.sleep(level=self.cfg.rollout.sleep_level)
            self.engine_asleep = True

    def _move_reference(self, device: str) -> None:
        for chunk in self.reference:
            chunk.to(device)

    # ------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def _score(self, model_chunks, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        from megatron_intuitor.models.forward import score_batch

        shard = data_parallel_shard(batch, self.dp_rank, self.dp_size).trimmed()
        attention_mask = torch.arange(shard.input_ids.shape[1]) < shard.lengths[:, None]
        return score_batch(model_chunks, shard.input_ids, attention_mask, shard.response_mask,
                           temperature=self.cfg.rollout.temperature,
                           vocab_size=self.hf_config.vocab_size,
                           batching=_micro_batching(
                               self.cfg.actor, self.cfg.actor.log_prob_micro_batch_size_per_gpu))

    def compute_log_probs(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """log_probs, entropy, self_certainty per token of this rank's DP share (pre-update)."""
        self._release_rollout_memory()
        return self._score(self.policy, batch)

    def compute_ref_log_probs(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """The reference model's log-probs; with `actor.ref_offload` on GPU its weights live in
        host memory except during this forward."""
        self._release_rollout_memory()
        if self.ref_offload:
            self._move_reference("cuda")
        try:
            return {"log_probs": self._score(self.reference, batch)["log_probs"]}
        finally:
            if self.ref_offload:
                self._move_reference("cpu")

    # -------------------------------------------------------------------------------- update

    def update_policy(self, batch: TrainingBatch, step: int) -> dict[str, float]:
        """PPO epochs over mini-batches of whole prompt groups; one optimizer step each."""
        from megatron_intuitor.ppo import ppo_forward_backward

        actor = self.cfg.actor
        generator = torch.Generator().manual_seed(self.cfg.trainer.seed * 1_000_003 + step)
        per_step: list[dict[str, float]] = []
        for _ in range(actor.ppo_epochs):
            for rows in group_mini_batches(batch, actor.ppo_mini_batch_size, generator):
                shard = data_parallel_shard(batch.select(rows), self.dp_rank,
                                            self.dp_size).trimmed()
                for chunk in self.policy:
                    chunk.zero_grad_buffer()
                self.optimizer.zero_grad()
                losses = ppo_forward_backward(
                    self.policy, shard,
                    _micro_batching(actor, actor.ppo_micro_batch_size_per_gpu), self.ppo_settings)
                finite_loss = all(math.isfinite(v) for v in losses.values())
                stepped, grad_norm = guarded_optimizer_step(self.optimizer, actor.grad_clip) \
                    if finite_loss else (False, float("nan"))
                if not finite_loss:
                    self.optimizer.zero_grad()
                self.lr_scheduler.step(increment=1)
                per_step.append({**losses, metrics.GRAD_NORM: grad_norm,
                                 metrics.SKIPPED_STEPS: float(not stepped)})
        result = {name: sum(m[name] for m in per_step) / len(per_step) for name in per_step[0]}
        result[metrics.SKIPPED_STEPS] = sum(m[metrics.SKIPPED_STEPS] for m in per_step)
        result[metrics.LR] = self.optimizer.param_groups[0]["lr"]
        return result

    # --------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, root: str, step: int, extra: dict, keep_last: int,
                        keep_steps: tuple[int, ...] = ()) -> str:
        from megatron_intuitor.checkpoint import save_checkpoint

        extra = {**extra, "lr_scheduler": self.lr_scheduler.state_dict()}
        return str(save_checkpoint(root, step, self.policy, self.optimizer, extra=extra,
                                   keep_last=keep_last, keep_steps=keep_steps,
                                   hf_assets_dir=self.model_dir))

    def load_checkpoint(self, path: str) -> dict:
        from megatron_intuitor.checkpoint import load_checkpoint

        extra = load_checkpoint(path, self.policy, self.optimizer)
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
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
        from megatron.core import parallel_state

        leader = (parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.get_pipeline_model_parallel_rank() == 0)
        return self.dp_rank, leader


class ActorGroup:
    """The controller's handle on all actor ranks."""

    def __init__(self, cfg: DictConfig, layout: Layout, schedule: Schedule,
                 model_dir: Path) -> None:
        self.layout = layout
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TOKENIZERS_PARALLELISM": "false",
               "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        self.group = WorkerGroup(
            ActorWorker, layout.world_size, placement=cfg.trainer.placement,
            num_cpus_per_worker=cfg.trainer.cpus_per_worker,
            num_gpus_per_worker=1 if layout.device == "cuda" else 0, env=env,
            args=(OmegaConf.to_container(cfg), str(model_dir), schedule), name="actor")
        coordinates = self.group.execute_all("data_parallel_coordinates")
        # one reporting rank per DP group, in DP order
        self.dp_leaders = [rank for dp in range(layout.data_parallel)
                           for rank, (dp_rank, leader) in enumerate(coordinates)
                           if dp_rank == dp and leader]
        self.rollout_replicas = layout.world_size // cfg.rollout.tensor_parallel_size
        self.rollout_tp = cfg.rollout.tensor_parallel_size

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingConfig,
                 seed: int) -> list[RolloutSample]:
        """Prompts split over the rollout replicas (the ranks of one replica get the same
        share); samples come back grouped by prompt, prompt indices global."""
        replicas = self.rollout_replicas
        share = math.ceil(len(prompts) / replicas)
        starts = [min(r * share, len(prompts)) for r in range(replicas)]
        per_replica = [(list(prompts[start:start + share]),
                        replace(sampling, seed=seed * 1009 + replica))
                       for replica, start in enumerate(starts)]
        results = self.group.execute_per_rank(
            "generate", [per_replica[rank // self.rollout_tp]
                         for rank in range(self.layout.world_size)])
        return [replace(sample, prompt_index=sample.prompt_index + start)
                for replica, start in enumerate(starts)
                for sample in results[replica * self.rollout_tp]]

    def _gather_dp(self, results: list[dict]) -> dict[str, torch.Tensor]:
        """Concatenate the DP shards' per-token tensors (padding widths may differ)."""
        shards = [results[rank] for rank in self.dp_leaders]
        width = max(shard["log_probs"].shape[1] for shard in shards)
        return {key: torch.cat([torch.nn.functional.pad(s[key], (0, width - s[key].shape[1]))
                                for s in shards]) for key in shards[0]}

    def compute_log_probs(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        return self._gather_dp(self.group.execute_all("compute_log_probs", ray.put(batch)))

    def compute_ref_log_probs(self, batch: TrainingBatch) -> torch.Tensor:
        return self._gather_dp(self.group.execute_all("compute_ref_log_probs", ray.put(batch)))[
            "log_probs"]

    def update_policy(self, batch: TrainingBatch, step: int) -> dict[str, float]:
        return self.group.execute_all("update_policy", ray.put(batch), step)[0]

    def sync_weights(self) -> dict[str, float]:
        return self.group.execute_all("sync_weights")[0]

    def weight_sync_path(self) -> str:
        """How rank 0's weights reach its engine: "shard to shard" or why they stream."""
        return self.group.execute_rank0("get_weight_sync_path")

    def save_checkpoint(self, root: str, step: int, extra: dict, keep_last: int,
                        keep_steps: tuple[int, ...] = ()) -> str:
        return self.group.execute_all("save_checkpoint", root, step, extra, keep_last,
                                      keep_steps)[0]

    def load_checkpoint(self, path: str) -> dict:
        return self.group.execute_all("load_checkpoint", path)[0]

    def export_hf(self, out_dir: str) -> None:
        self.group.execute_all("export_hf", out_dir)

    def shutdown(self) -> None:
        self.group.shutdown()
