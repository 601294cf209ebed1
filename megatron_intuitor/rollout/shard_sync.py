"""Direct weight sync: every rank copies its own Megatron shards into its own engine shard.

When the rollout engine is sharded like the actor (rollout TP == training TP over the same ranks,
no pipeline stages), the weights a rank's engine shard needs are the ones that rank already
holds: no gather, no full tensor anywhere, each byte copied once, in place. Each HF tensor's
local piece (`bridge.local_hf_pieces`, views of the Megatron parameters) goes to its slot in the
engine: vLLM fuses q/k/v and gate/up into one parameter, in the order its model's
`packed_modules_mapping` lists them. Only vocabulary rows may cross ranks: Megatron pads the
vocabulary to a multiple of 128 * TP, vLLM to 64, so the rank boundaries differ by a few rows,
sent point to point.

Mixture-of-experts layers: vLLM fuses a layer's experts into `w13_weight` [local experts,
2 I', H] (each expert's gate rows, then its up rows) and `w2_weight` [local experts, H, I'].
Megatron's expert pieces land in them directly where both split the experts the same way:
- engine without expert parallelism (its FusedMoE splits each expert's intermediate dimension
  over the engine's TP ranks, I' = I / TP) and actor EP = 1 with ETP = the engine's TP over the
  same ranks: every rank writes its ETP shard of every expert;
- engine with `enable_expert_parallel` (each engine rank holds E / TP whole experts, I' = I, in
  vLLM's linear placement) and actor EP = the engine's TP over the same ranks with ETP = 1:
  every rank writes its own experts, whole.
Any other pairing is refused (and streams). After the writes each fused layer goes through
vLLM's own `process_weights_after_loading` (a GPU backend's kernel format) and, on vLLM-CPU,
its grouped-GEMM prepack (`engine.repack_cpu_experts`), as after a streamed reload.

The plan (which piece goes where) is built and checked once: every engine parameter must be
covered exactly, every shape must fit. `ShardSync.plan` raises `ShardSyncUnavailable` (saying
why) when the layouts differ, and the caller streams full tensors instead
(`weight_sync.sync_weights`).

Kernel formats: on GPU vLLM computes with its parameters as loaded (unquantized), so the copies
are the whole sync and CUDA graphs keep their pointers. vLLM-CPU instead repacks each linear
layer into oneDNN's layout and drops the plain weight; there a layer gets a fresh plain weight,
its pieces, then vLLM's own `process_weights_after_loading` repacks it (one layer at a time:
memory bounded by the largest layer).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import transformers

from megatron_intuitor.models.bridge import LocalPiece, local_hf_pieces
from megatron_intuitor.rollout.engine import RolloutEngine, repack_cpu_experts
from megatron_intuitor.rollout.weight_sync import SyncReport

# An expert's piece: `<layer>.mlp.experts.<global expert>.<projection>.weight`.
_EXPERT_PIECE = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)")


class ShardSyncUnavailable(Exception):
    """The engine is not sharded like the actor: the sync must stream full tensors."""


@dataclass
class _VocabExchange:
    """Rows of a vocabulary parameter that cross ranks: [(peer global rank, source rows in my
    piece)] to send, [(peer, destination rows in my engine shard)] to receive."""

    sends: list[tuple[int, slice]] = field(default_factory=list)
    receives: list[tuple[int, slice]] = field(default_factory=list)
    local: Optional[tuple[slice, slice]] = None  # (rows of my piece, rows of my engine shard)
    real_rows: int = 0  # of my engine shard; the rows after them pad vLLM's vocabulary, zeroed


@dataclass
class _Target:
    """One engine parameter and the pieces that fill it."""

    module: torch.nn.Module
    param_name: str
    # of the plain weight (vLLM-CPU may have dropped it for its pack); a fused-experts weight
    # [experts, rows, columns] is seen as [experts x rows, columns]
    shape: tuple[int, ...]
    parts: list[tuple[str, int]] = field(default_factory=list)  # (hf_name, first row)
    vocab: Optional[_VocabExchange] = None
    sharers: list[torch.nn.Module] = field(default_factory=list)  # modules sharing the pack

    @property
    def repacked(self) -> bool:
        """vLLM-CPU computes this module from a private pack of the weight (`cpu_linear`)."""
        return self.param_name == "weight" and hasattr(self.module, "cpu_linear")

    def destination(self) -> torch.Tensor:
        param = getattr(self.module, self.param_name)
        if param.numel() == math.prod(self.shape):
            return param.data.view(self.shape)
        return torch.empty(self.shape, dtype=param.dtype, device=param.device)

    def finish(self, written: torch.Tensor) -> None:
        if not self.repacked:
            return
        getattr(self.module, self.param_name).data = written
        self.module.quant_method.process_weights_after_loading(self.module)
        for other in self.sharers:  # a tied LM head computes from the embedding's new pack
            other.cpu_linear = self.module.cpu_linear


class ShardSync:
    """The direct sync between one actor rank and its engine shard; call it after each update."""

    def __init__(self, engine: RolloutEngine, model_chunks: Sequence[torch.nn.Module],
                 hf_config: transformers.PretrainedConfig, targets: list[_Target]) -> None:
        self._engine = engine
        self._chunks = model_chunks
        self._hf_config = hf_config
        self._targets = targets
        # vLLM's fused-experts layers, processed once both of their weights are written
        self._fused_experts = list({id(t.module): t.module for t in targets
                                    if _is_fused_experts(t.module)}.values())

    @classmethod
    def plan(cls, engine: RolloutEngine, model_chunks: Sequence[torch.nn.Module],
             hf_config: transformers.PretrainedConfig) -> "ShardSync":
        """Check that the engine is sharded like the actor and map every piece to its slot.
        Collective over the actor's TP group (exchanges the vocabulary ranges)."""
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_ranks = dist.get_process_group_ranks(tp_group)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise ShardSyncUnavailable("the actor is pipelined: a rank holds only some layers")
        engine_ranks = engine.tensor_parallel_ranks
        if engine_ranks != tp_ranks:
            raise ShardSyncUnavailable(f"rollout TP ranks {engine_ranks} differ from the actor's "
                                       f"TP ranks {tp_ranks}")
        model = engine.local_model
        if engine.quantization is not None:
            raise ShardSyncUnavailable(f"the engine is quantized ({engine.quantization})")
        fused = next((m for m in model.modules() if _is_fused_experts(m)), None)
        if fused is not None:
            _check_expert_layout(fused, engine_ranks)
        pieces = local_hf_pieces(model_chunks, hf_config)
        packed = getattr(model, "packed_modules_mapping", {})
        by_param: dict[int, _Target] = {}
        for piece in pieces:
            target, first_row = _slot(model, packed, piece, by_param)
            target.parts.append((piece.hf_name, first_row))
        targets = list(by_param.values())
        by_name = {p.hf_name: p for p in pieces}
        _check_coverage(model, targets, by_name)
        for target in targets:
            if target.vocab is not None:
                target.vocab = _vocab_exchange(by_name[target.parts[0][0]], target, tp_group,
                                               tp_ranks)
            if target.repacked:
                target.sharers = [m for m in model.modules() if m is not target.module
                                  and getattr(m, "weight", None) is target.module.weight]
        return cls(engine, model_chunks, hf_config, targets)

    def __call__(self) -> SyncReport:
        """Copy every piece into the engine in place, then reset its prefix cache."""
        start = time.perf_counter()
        pieces = {p.hf_name: p.tensor for p in local_hf_pieces(self._chunks, self._hf_config)}
        copied, repack_seconds = 0, 0.0
        with self._engine.weight_update(changed=lambda: True), torch.no_grad():
            for target in self._targets:
                written = target.destination()
                if target.vocab is not None:
                    _exchange_vocab(pieces[target.parts[0][0]], written, target.vocab)
                else:
                    row_numel = math.prod(written.shape[1:])
                    for name, first_row in target.parts:
                        piece = pieces[name]
                        rows = written[first_row:first_row + piece.numel() // row_numel]
                        rows.view(piece.shape).copy_(piece)
                copied += written.numel() * written.element_size()
                repack_start = time.perf_counter()
                target.finish(written)
                repack_seconds += time.perf_counter() - repack_start
            repack_start = time.perf_counter()
            for experts in self._fused_experts:  # the kernel's format, as a reload leaves it
                experts.quant_method.process_weights_after_loading(experts)
            if self._fused_experts:
                repack_cpu_experts(self._engine.local_model)
            repack_seconds += time.perf_counter() - repack_start
        return SyncReport(tensors=len(pieces), bytes=copied, buckets=0, largest_bucket_bytes=0,
                          seconds=time.perf_counter() - start, path="shards",
                          repack_seconds=repack_seconds)


def _slot(model: torch.nn.Module, packed: dict[str, list[str]], piece: LocalPiece,
          by_param: dict[int, _Target]) -> tuple[_Target, int]:
    """The engine parameter that takes `piece` and the row its part starts at."""
    module_path, _, param_name = piece.hf_name.rpartition(".")
    expert = _EXPERT_PIECE.fullmatch(module_path)
    if expert is not None:
        return _expert_slot(model, piece, by_param, expert[1], int(expert[2]), expert[3])
    parent, _, leaf = module_path.rpartition(".")
    fused = next((name for name, parts in packed.items() if leaf in parts), None)
    try:
        module = model.get_submodule(f"{parent}.{fused}" if fused else module_path)
    except AttributeError as err:
        raise ShardSyncUnavailable(f"the engine has no module for {piece.hf_name!r}") from err
    param = getattr(module, param_name, None)
    if not isinstance(param, torch.nn.Parameter):
        raise ShardSyncUnavailable(f"the engine has no parameter for {piece.hf_name!r}")
    target = by_param.get(id(param))
    if target is None:
        target = by_param[id(param)] = _Target(module, param_name, _plain_shape(module, param))
        if piece.vocab_rows is not None:
            target.vocab = _VocabExchange()
    if fused:
        index = packed[fused].index(leaf)
        return target, sum(module.output_partition_sizes[:index])
    return target, 0


def _is_fused_experts(module: torch.nn.Module) -> bool:
    """vLLM's fused-experts layer (`RoutedExperts`: `w13_weight`, `w2_weight`)."""
    return hasattr(module, "w13_weight") and hasattr(module, "expert_map_manager")


def _check_expert_layout(experts: torch.nn.Module, engine_ranks: list[int]) -> None:
    """The actor's expert pieces map onto the engine's fused experts only if both split the
    experts alike over the same ranks (module docstring); checked on one layer, all alike."""
    from megatron.core import parallel_state

    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod)

    if not isinstance(experts.quant_method, UnquantizedFusedMoEMethod):
        raise ShardSyncUnavailable(f"the engine's experts use "
                                   f"{type(experts.quant_method).__name__}, not unquantized")
    backend = experts.quant_method.unquantized_backend.name
    if backend in ("XPU", "MOONEP", "TPU", "OOT"):  # other weight shapes, or no in-place reload
        raise ShardSyncUnavailable(f"the engine's MoE backend {backend} keeps its own layout")
    engine = experts.moe_config.moe_parallel_config
    ep, etp = (parallel_state.get_expert_model_parallel_world_size(),
               parallel_state.get_expert_tensor_parallel_world_size())
    if engine.use_ep:
        if etp != 1 or ep != engine.ep_size:
            raise ShardSyncUnavailable(
                f"the engine splits the experts over {engine.ep_size} ranks, whole "
                f"(enable_expert_parallel); the actor over EP={ep} with ETP={etp} "
                f"(needs EP={engine.ep_size}, ETP=1)")
        actor_group = parallel_state.get_expert_model_parallel_group()
    else:
        if ep != 1 or etp != engine.tp_size:
            raise ShardSyncUnavailable(
                f"the engine holds every expert, split over its {engine.tp_size} TP rank(s); the "
                f"actor over EP={ep} with ETP={etp} (needs EP=1, ETP={engine.tp_size})")
        actor_group = parallel_state.get_expert_tensor_parallel_group()
    actor_ranks = dist.get_process_group_ranks(actor_group)
    if actor_ranks != engine_ranks:
        raise ShardSyncUnavailable(f"the actor's expert ranks {actor_ranks} differ from the "
                                   f"engine's {engine_ranks}")
    plain_w13 = (experts.local_num_experts, 2 * experts.intermediate_size_per_partition,
                 experts.hidden_size)
    if tuple(experts.w13_weight.shape) != plain_w13 or not experts.w13_weight.is_contiguous():
        raise ShardSyncUnavailable(f"the engine's fused experts {list(experts.w13_weight.shape)}"
                                   f" are not laid out as [experts, 2 x {plain_w13[1] // 2}, "
                                   f"{plain_w13[2]}]")


def _expert_slot(model: torch.nn.Module, piece: LocalPiece, by_param: dict[int, _Target],
                 experts_path: str, expert: int, projection: str) -> tuple[_Target, int]:
    """The fused-experts weight that takes an expert's `projection` and its first row there:
    expert e's rows in `w13_weight` are [gate; up], in `w2_weight` its [H, I'] block."""
    try:
        experts = next(m for m in model.get_submodule(experts_path).modules()
                       if _is_fused_experts(m))
    except (AttributeError, StopIteration) as err:
        raise ShardSyncUnavailable(f"the engine has no fused experts for "
                                   f"{piece.hf_name!r}") from err
    local = experts.expert_map_manager.map_global_to_local(expert)
    if local < 0:
        raise ShardSyncUnavailable(f"expert {expert} of {experts_path} is held by this actor "
                                   f"rank, not by its engine shard")
    param_name = "w2_weight" if projection == "down_proj" else "w13_weight"
    param = getattr(experts, param_name)
    experts_count, rows, columns = param.shape
    target = by_param.get(id(param))
    if target is None:
        target = by_param[id(param)] = _Target(experts, param_name, (experts_count * rows, columns))
    return target, local * rows + (rows // 2 if projection == "up_proj" else 0)


def _plain_shape(module: torch.nn.Module, param: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's shape as loaded; a vLLM-CPU linear layer dropped its weight for a pack."""
    if param.numel() == 0 and hasattr(module, "cpu_linear"):
        if not hasattr(module, "output_size_per_partition"):  # replicated (MoE router, gates)
            return (module.output_size, module.input_size)
        return (module.output_size_per_partition, module.input_size_per_partition)
    return tuple(param.shape)


def _check_coverage(model: torch.nn.Module, targets: list[_Target],
                    pieces: dict[str, LocalPiece]) -> None:
    """Every engine parameter is a target, and its pieces fill it exactly."""
    covered = {id(getattr(t.module, t.param_name)) for t in targets}
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ShardSyncUnavailable(f"no actor weight maps to engine parameters {missing[:3]}")
    for target in targets:
        if target.vocab is not None:
            start, stop = target.module.shard_indices.org_vocab_start_index, \
                target.module.shard_indices.org_vocab_end_index
            if target.shape[1:] != tuple(pieces[target.parts[0][0]].tensor.shape[1:]) or \
                    stop - start > target.shape[0]:
                raise ShardSyncUnavailable(f"vocabulary shard {target.parts[0][0]!r} does not fit")
            continue
        row_numel = math.prod(target.shape[1:])
        filled = 0
        for name, first_row in sorted(target.parts, key=lambda part: part[1]):
            numel = pieces[name].tensor.numel()
            if first_row != filled or numel % row_numel:
                raise ShardSyncUnavailable(f"{name!r} ({list(pieces[name].tensor.shape)}) does "
                                           f"not fit its engine slot {list(target.shape)}")
            filled += numel // row_numel
        if filled != target.shape[0]:
            raise ShardSyncUnavailable(f"engine parameter of {target.parts[0][0]!r} has "
                                       f"{target.shape[0]} rows, the actor's pieces {filled}")


def _vocab_exchange(piece: LocalPiece, target: _Target, group, ranks: list[int]
                    ) -> _VocabExchange:
    """Which of this rank's vocabulary rows stay, which go to which peer and which come back."""
    indices = target.module.shard_indices
    mine = (piece.vocab_rows, (indices.org_vocab_start_index, indices.org_vocab_end_index))
    everyone: list = [None] * len(ranks)
    dist.all_gather_object(everyone, mine, group=group)
    (held_start, held_stop), (want_start, want_stop) = mine
    exchange = _VocabExchange(real_rows=want_stop - want_start)
    for peer, ((peer_held_start, peer_held_stop), (peer_want_start, peer_want_stop)) in zip(
            ranks, everyone):
        if peer == dist.get_rank():
            lo, hi = max(held_start, want_start), min(held_stop, want_stop)
            if lo < hi:
                exchange.local = (slice(lo - held_start, hi - held_start),
                                  slice(lo - want_start, hi - want_start))
            continue
        lo, hi = max(held_start, peer_want_start), min(held_stop, peer_want_stop)
        if lo < hi:
            exchange.sends.append((peer, slice(lo - held_start, hi - held_start)))
        lo, hi = max(peer_held_start, want_start), min(peer_held_stop, want_stop)
        if lo < hi:
            exchange.receives.append((peer, slice(lo - want_start, hi - want_start)))
    return exchange


def _exchange_vocab(piece: torch.Tensor, written: torch.Tensor, exchange: _VocabExchange) -> None:
    """Copy the rows this rank holds, swap the rest with the peers that hold them."""
    if exchange.local is not None:
        source, destination = exchange.local
        written[destination].copy_(piece[source])
    written[exchange.real_rows:].zero_()  # as vLLM's loader leaves them
    received = [(rows, torch.empty_like(piece[:rows.stop - rows.start]))
                for _, rows in exchange.receives]
    operations = [dist.P2POp(dist.isend, piece[rows].contiguous(), peer)
                  for peer, rows in exchange.sends]
    operations += [dist.P2POp(dist.irecv, buffer, peer)
                   for (peer, _), (_, buffer) in zip(exchange.receives, received)]
    if operations:  # one group: NCCL needs sends and receives between two ranks posted together
        for request in dist.batch_isend_irecv(operations):
            request.wait()
    for rows, buffer in received:
        written[rows].copy_(buffer)
