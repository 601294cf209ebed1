"""Expert load and load-balancing loss of a mixture of experts, measured in the update pass.

A forward hook on every Megatron-Core router counts the tokens routed to each expert (its
top-k routing map, less the padding tokens the router is told of: `forward.run_pipeline` passes
them, and the router leaves them out of its loss too); the load-balancing loss comes from
Megatron's own per-layer tracker (`moe_utils.save_to_aux_losses_tracker`, the loss divided by
its coefficient, one value per router call). `metrics()` reduces both over every rank
(collective): tokens summed over the data-parallel ranks, the loss averaged over all router
calls. Without sequence parallelism the tensor-parallel ranks of a router see the same tokens,
so only tensor-parallel rank 0 counts; with it each holds a part of the sequence, and its token
counts and its term of the loss (Megatron's loss is a sum of one term per tensor-parallel rank)
add up over the tensor-parallel group, whose router calls count once.

Known limit: with activation recompute (`actor.recompute=true`) the recomputed forward calls
the router again and its tokens are counted again (the max / mean ratio is unchanged).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from megatron_intuitor import metrics

AUX_LOSS_NAME = "load_balancing_loss"  # Megatron's tracker key for moe_router_load_balancing_type=aux_loss


class ExpertLoadMeter:
    """Counts routed tokens per (layer, expert) while `measuring()`."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], num_layers: int,
                 num_experts: int) -> None:
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.router import TopKRouter

        routers = [m for chunk in model_chunks for m in chunk.modules()
                   if isinstance(m, TopKRouter)]
        config = routers[0].config if routers else None
        first_tp_rank = parallel_state.get_tensor_model_parallel_rank() == 0
        self._counts_here = bool(routers) and (config.sequence_parallel or first_tp_rank)
        self._counts_calls_here = bool(routers) and first_tp_rank
        self.tokens = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.calls = torch.zeros(num_layers, dtype=torch.float64)
        self._device = next(model_chunks[0].parameters()).device
        self._active = False
        for router in routers:
            router.register_forward_hook(self._count)

    def _count(self, router: torch.nn.Module, inputs, output) -> None:
        if self._active and self._counts_here:
            _, routing_map = output  # [tokens, experts]
            padding = inputs[1] if len(inputs) > 1 else None  # [s, b] like the tokens, or None
            if padding is not None:
                routing_map = routing_map & ~padding.reshape(-1, 1)
            layer = router.layer_number - 1
            self.tokens[layer] += routing_map.sum(dim=0).to("cpu", torch.float64)
            self.calls[layer] += self._counts_calls_here

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Count the router calls inside; forgets earlier counts and Megatron's tracked losses."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

        self.tokens.zero_()
        self.calls.zero_()
        clear_aux_losses_tracker()
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def metrics(self) -> dict[str, float]:
        """Per layer (1-based) max and mean tokens per expert, and the load-balancing loss (mean
        over layers and router calls; absent when no router call tracked one). Collective."""
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        num_layers = self.tokens.shape[0]
        aux = torch.zeros(num_layers, dtype=torch.float64)
        tracked = get_moe_layer_wise_logging_tracker().get(AUX_LOSS_NAME)
        if tracked is not None and self._counts_here:
            aux += tracked["values"].detach().to("cpu", torch.float64)
        packed = torch.cat([self.tokens.flatten(), self.calls, aux]).to(self._device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        tokens = packed[:self.tokens.numel()].view_as(self.tokens)
        calls = packed[self.tokens.numel():self.tokens.numel() + num_layers]
        aux = packed[-num_layers:]
        result: dict[str, float] = {}
        for layer in range(num_layers):
            if calls[layer] > 0:
                result[metrics.moe_tokens_per_expert_max(layer + 1)] = float(tokens[layer].max())
                result[metrics.moe_tokens_per_expert_mean(layer + 1)] = float(tokens[layer].mean())
        routed = calls > 0
        if routed.any() and aux.abs().sum() > 0:
            result[metrics.MOE_AUX_LOSS] = float((aux[routed] / calls[routed]).mean())
        return result
