"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU), Megatron-Core's TP/PP/DP groups
and seeding. The one place that initialises parallel state."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_intuitor.platform import device, ensure_platform, on_gpu


@dataclass(frozen=True)
class ParallelSizes:
    """Megatron's parallel sizes. Experts (mixture-of-experts models) are split over `expert`
    ranks (EP) and each expert over `expert_tensor` ranks (ETP, default: `tensor`); Megatron
    folds EP x ETP into the data-parallel x tensor-parallel ranks of each pipeline stage."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    expert: int = 1
    expert_tensor: Optional[int] = None

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    def data(self, world_size: int) -> int:
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_model_parallel_size "
                f"({self.tensor}) x pipeline_model_parallel_size ({self.pipeline})"
            )
        expert_ranks = self.expert * self.expert_tensor_size
        if (world_size // self.pipeline) % expert_ranks:
            raise ValueError(
                f"the {world_size // self.pipeline} ranks of a pipeline stage are not divisible "
                f"by expert_model_parallel_size ({self.expert}) x "
                f"expert_tensor_parallel_size ({self.expert_tensor_size})")
        return world_size // model_parallel


def init_torch_distributed(rank: int, world_size: int, master_addr: str = "127.0.0.1",
                           master_port: int = 29500, timeout_s: int = 1800) -> None:
    """Join the default process group: NCCL with CUDA, gloo without."""
    ensure_platform()
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", str(master_port))
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group(
        backend="nccl" if on_gpu() else "gloo",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def init_model_parallel(sizes: ParallelSizes, seed: int = 1234) -> None:
    """Create Megatron-Core's TP/PP/DP groups on the default group, then seed every RNG."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("init_torch_distributed must run before init_model_parallel")
    sizes.data(dist.get_world_size())  # validates divisibility with a clear message
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=sizes.tensor,
            pipeline_model_parallel_size=sizes.pipeline,
            virtual_pipeline_model_parallel_size=sizes.virtual_pipeline,
            expert_model_parallel_size=sizes.expert,
            expert_tensor_parallel_size=sizes.expert_tensor_size,
        )
    set_seed(seed)


def warm_up_groups() -> None:
    """One tiny all-reduce on each of Megatron's groups this rank belongs to: NCCL creates a
    communicator (and its buffers, hundreds of MB per group on GPU) at a group's first
    collective, so that memory is taken before the rollout engine sizes itself from what is
    free. Collective over the world."""
    from megatron.core import parallel_state

    groups = [parallel_state.get_tensor_model_parallel_group(),
              parallel_state.get_pipeline_model_parallel_group(),
              parallel_state.get_data_parallel_group(with_context_parallel=True),
              parallel_state.get_model_parallel_group(),
              parallel_state.get_amax_reduction_group(with_context_parallel=True),
              parallel_state.get_expert_model_parallel_group(),
              parallel_state.get_expert_tensor_parallel_group()]
    if parallel_state.is_rank_in_embedding_group():
        groups.append(parallel_state.get_embedding_group())
    probe = torch.zeros(1, device=device())
    for group in groups:
        dist.all_reduce(probe, group=group)
    if on_gpu():
        torch.cuda.synchronize()


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker.

    Pipeline stages get distinct seeds (as Megatron's training loop does) so that dropout
    differs between layers on different stages; TP ranks get distinct tracker streams.
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
