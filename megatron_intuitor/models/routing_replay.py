"""Routing replay for a mixture of experts (`actor.moe_routing_replay=rollout`, "R3" in verl,
Rollout Routing Replay, arXiv 2510.11370): the policy's routers take the experts the rollout
engine chose for each token instead of their own top-k, in the old-log-prob and update passes,
so that the engine's and the trainer's log-probs differ by numerics only, not by routing.

Megatron-Core 0.16.1 asks a router's `router_replay` for its top-k
(`moe_utils.topk_routing_with_score_function` -> `RouterReplay.get_replay_topk`); this module
installs a `ForcedRouting` there on the policy's routers only (never the reference or scorer
model), sets each micro-batch's experts per layer before its forward (`set_micro_batch_routing`,
called by `forward.run_pipeline` when a micro-batch carries a `routed_experts` column) and
clears them after the pass (`replaying`). The gate weights still get gradients: the replayed
experts' probabilities come from the router's own logits (a softmax over the forced top-k, as
Megatron's replay does); the load-balancing loss is computed from the router's natural top-k.

Token layout: a router sees its micro-batch's hidden states [s, b, h] flattened sequence-major
(token s * b + i is position s of row i; packed, [t, 1]: the pack's order), only its own
pipeline stage's layers, and with sequence parallelism its tensor-parallel rank's contiguous
share of those tokens. The column holds global expert ids [b, s, layers, top_k] in the model's
micro-batch layout; `NO_ROUTING` (-1) marks tokens the engine did not route (the last token of a
sequence, which the engine samples but never feeds back; padding), which take the router's own
top-k: their outputs reach no scored log-prob.

Recompute: with activation recomputation Megatron reruns each layer's forward inside autograd's
backward; there the router takes the micro-batch's experts from `RouterReplay`'s backward queue
(`REPLAY_BACKWARD`, first in first out: a pipeline schedule runs each chunk's backwards in the
order of its forwards) instead of the latest forward's (`REPLAY_FORWARD`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megatron_intuitor.batch import NO_ROUTING


class ForcedRouting(RouterReplay):
    """One router's replay: Megatron's `RouterReplay` (targets, backward queue, actions) with
    rows marked `NO_ROUTING` routed naturally, and without joining Megatron's process-wide list
    of instances (which would mix the policy's routers with other models')."""

    def __init__(self) -> None:  # RouterReplay.__init__ would register the instance globally
        self.target_topk_idx: Optional[torch.Tensor] = None
        self.recorded_topk_idx: Optional[torch.Tensor] = None  # RouterReplay's; unused here
        self.router_replay_action = None
        self.replay_backward_list: list[torch.Tensor] = []

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups=None, group_topk=None,
                        default_compute_topk=None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.router_replay_action is None:
            return default_compute_topk(scores, topk, num_groups, group_topk)
        # inside autograd's backward (a graph task runs): the recomputed forward of an earlier
        # micro-batch; torch.utils.checkpoint tells its recomputation apart the same way
        recomputing = torch._C._current_graph_task_id() != -1
        self.router_replay_action = (RouterReplayAction.REPLAY_BACKWARD if recomputing
                                     else RouterReplayAction.REPLAY_FORWARD)
        if recomputing:
            if not self.replay_backward_list:
                raise RuntimeError("routing replay: a recomputed router call has no experts "
                                   "left in its backward queue")
            forced = self.replay_backward_list.pop(0)
        else:
            forced = self.target_topk_idx
        if forced is None or forced.shape != (scores.shape[0], topk):
            raise RuntimeError(
                f"routing replay: the router has {scores.shape[0]} tokens of top-{topk}, the "
                f"replayed experts are {None if forced is None else tuple(forced.shape)}")
        _, natural = default_compute_topk(scores, topk, num_groups, group_topk)
        forced = forced.to(scores.device, torch.long)
        indices = torch.where(forced == NO_ROUTING, natural, forced)
        return scores.gather(1, indices), indices


def policy_routers(model_chunks: Sequence[torch.nn.Module]) -> list:
    """The Megatron routers of `model_chunks`, in layer order per chunk."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [module for chunk in model_chunks for module in chunk.modules()
            if isinstance(module, TopKRouter)]


def install_routing_replay(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Give every router of `model_chunks` a `ForcedRouting` (idle until `replaying`)."""
    routers = policy_routers(model_chunks)
    if not routers:
        raise ValueError("actor.moe_routing_replay: the model has no mixture-of-experts router")
    for router in routers:
        router.router_replay = ForcedRouting()


def _replays(model_chunks: Sequence[torch.nn.Module]) -> list[ForcedRouting]:
    replays = [router.router_replay for router in policy_routers(model_chunks)]
    if not replays or not all(isinstance(replay, ForcedRouting) for replay in replays):
        raise RuntimeError("routing replay: these model chunks have no routing replay "
                           "installed (install_routing_replay; only the policy has one)")
    return replays


@contextmanager
def replaying(model_chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Replay the experts set per micro-batch inside; afterwards every router routes by its own
    top-k again and holds no experts (nothing reaches a later pass)."""
    replays = _replays(model_chunks)
    for replay in replays:
        replay.clear_indices()
        replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for replay in replays:
            replay.clear_indices()
            replay.clear_router_replay_action()


def router_token_layout(routed_experts: torch.Tensor, lengths: torch.Tensor,
                        packed: bool) -> torch.Tensor:
    """A micro-batch's `routed_experts` [b, s, layers, k] (packed: [1, t, layers, k]) in the
    order its routers see the tokens: [s * b, layers, k], sequence-major, positions past the real
    tokens (padding rows and columns, a pack's padding sequence) marked `NO_ROUTING`."""
    rows, width = routed_experts.shape[:2]
    positions = torch.arange(width, device=lengths.device)
    if packed:
        real = (positions < lengths.sum())[None]
    else:
        real = torch.zeros(rows, width, dtype=torch.bool, device=lengths.device)
        real[:len(lengths)] = positions < lengths[:, None]
    marked = torch.where(real[..., None, None].to(routed_experts.device), routed_experts,
                         NO_ROUTING)
    return marked.transpose(0, 1).reshape(rows * width, *routed_experts.shape[2:])


def set_micro_batch_routing(chunk: torch.nn.Module, routed_experts: torch.Tensor,
                            lengths: torch.Tensor, packed: bool) -> None:
    """Queue one micro-batch's experts on `chunk`'s routers (its layers only; with sequence
    parallelism this tensor-parallel rank's share of the tokens)."""
    from megatron.core import parallel_state

    tokens = router_token_layout(routed_experts, lengths, packed)
    for router in policy_routers([chunk]):
        if router.config.sequence_parallel:
            share = tokens.shape[0] // parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            layer_tokens = tokens[rank * share:(rank + 1) * share]
        else:
            layer_tokens = tokens
        router.router_replay.set_target_indices(layer_tokens[:, router.layer_number - 1])
