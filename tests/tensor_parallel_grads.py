"""The tensor-parallel step of Megatron's `finalize_model_grads`, for tests that take gradients
of bare model chunks (no DDP, so no data-parallel reduction): the gradients of parameters that
every tensor-parallel rank holds whole but computes from its own tokens (norms and router under
sequence parallelism, the q/k norms over each rank's heads) summed over the group, by
Megatron-Core's own function, so that the tests check the parameters it picks."""
from __future__ import annotations

import torch


def reduce_over_tensor_parallel(model_chunks: list[torch.nn.Module]) -> None:
    """Megatron's `_allreduce_non_tensor_model_parallel_grads` on `model_chunks` (in place)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import (
        _allreduce_non_tensor_model_parallel_grads)

    for chunk in model_chunks:
        chunk.ddp_config = DistributedDataParallelConfig()  # read for its FSDP flag only
    _allreduce_non_tensor_model_parallel_grads(model_chunks, model_chunks[0].config)
