"""Megatron DDP + (distributed) Adam around a model's chunks: the training side of the model."""
from __future__ import annotations

from typing import Sequence

import torch


def build_optimizer(
    model_chunks: Sequence[torch.nn.Module],
    lr: float,
    *,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip_grad: float = 1.0,
    min_lr: float = 0.0,
    use_distributed_optimizer: bool = True,
) -> tuple[list, object]:
    """Wrap `model_chunks` in Megatron DDP and build Adam over them.

    Returns `(ddp_chunks, optimizer)`: run forward/backward on `ddp_chunks` (Megatron's
    schedules accept them as `model`), then `optimizer.step()` -> `(ok, grad_norm, zeros)`;
    before each step call `chunk.zero_grad_buffer()` on every chunk and `optimizer.zero_grad()`.

    Load weights before calling this: with bf16 parameters the optimizer keeps its own fp32
    copies, made here. Gradients are averaged over the data-parallel group (each rank's loss is
    a mean over its own part of the global batch). Megatron exempts biases and norms from weight
    decay.
    """
    from megatron.core.distributed import (
        DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model_chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer)
    # Only the first chunk gets gradient buckets of its own, as in Megatron's training loop.
    ddp_chunks = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                          disable_bucketing=index > 0)
                  for index, chunk in enumerate(model_chunks)]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay,
                        adam_beta1=betas[0], adam_beta2=betas[1], adam_eps=eps,
                        clip_grad=clip_grad, bf16=config.bf16, fp16=config.fp16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=use_distributed_optimizer),
        ddp_chunks)
    # Without this Megatron's schedules never reduce gradients across data-parallel ranks (and
    # never all-reduce the tied embedding's gradient between the first and last stage).
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return ddp_chunks, optimizer


# What the training phase still allocates after the engine is built besides Adam's moments
# (cuBLAS / TE workspaces, allocator fragmentation): kept free when vLLM sizes itself.
TRAINING_HEADROOM_BYTES = 2 * 2**30


def pending_adam_state_bytes(optimizer) -> int:
    """Bytes Adam's two fp32 moments will take on this rank once created: torch's Adam and TE's
    FusedAdam both create them at the first step, after the rollout engine has taken its share
    of the GPU. Counts the parameters (this rank's shards) that have no state yet."""
    total = 0
    for inner in [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]:
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):  # .get: indexing would insert into the state
                    total += 2 * param.numel() * 4
    return total


def training_reserve_bytes(optimizer) -> int:
    """GPU memory the training phase will still allocate once the rollout engine exists."""
    return pending_adam_state_bytes(optimizer) + TRAINING_HEADROOM_BYTES
