"""Forward passes of prompt+response rows through Megatron-Core's pipeline schedule, at any TP/PP,
with the rows padded or packed.

`run_pipeline` feeds pre-cut micro-batches through `get_forward_backward_func` and hands the last
stage's vocab-parallel logits to a *head* `(logits_shard, micro_batch) -> Megatron loss tuple`;
the scoring pass (`score_batch`, forward only) and the trainer's PPO loss (forward and backward)
are two heads on the same forward. `shifted_token_scores` is what both heads start from.

Rows come right-padded, [prompt, response, padding], with their lengths. The model reads them
- padded: [b, s] as given, positions 0..s-1, causal attention without a mask, which is exact on
  every attention backend because padding only follows real tokens; or
- packed (THD, "remove padding"): the real tokens of all rows back to back in one row [1, t],
  positions restarting at each sequence, and `PackedSeqParams` with the boundaries (`cu_seqlens`)
  so that attention and rotary positions stay inside each sequence (Transformer Engine's
  attention on GPU, `packed_attention.PackedDotProductAttention` on CPU). No work on padding.
A head sees each per-token tensor of its micro-batch laid out like the logits, and
`ModelInput.to_rows` turns such a tensor back into right-padded rows.

`run_pipeline(..., logits_at="response_mask")` computes the LM head only where its logits are
used: at the positions whose next token the named mask marks (response tokens), not over the
prompts. The head then receives logits [1, k, V/TP] for those k positions (row-major order) and
`token_scores` scatters their scores back into the micro-batch's layout: the same values as
scoring every position (the LM head is row-wise), without the vocabulary-wide matmul and softmax
statistics over prompt tokens. Skipped (all positions computed) when the output layer runs
sequence parallel, whose input is split over the sequence.

At PP > 1, stages exchange activations of one shape per call (Megatron's schedule receives into
buffers of `[seq_length, micro_batch_size, hidden]`): the micro-batches are padded to the largest
of the call (padding rows and columns; packed, one padding sequence at the end of the pack, ahead
of which causal attention never looks), unless the model config sets `variable_seq_lengths`, in
which case the stages exchange each tensor's shape first and nothing is padded.

Sequence parallelism (`config.sequence_parallel`) splits each micro-batch's sequence over the
tensor-parallel ranks: its length is padded to a multiple of the TP size, the same way as for
FP8 below (padded rows to such a width, a pack with one padding sequence at its end); the output
layer gathers the sequence again, so heads see the logits of every position as without it. For
a mixture of experts the model gets the padding as `padding_mask`, which Megatron's routers
leave out of the load-balancing loss (the padding of right-padded rows too).

FP8 (Transformer Engine): its GEMMs need the product of an input's leading dimensions (the token
count) divisible by 8 and the last by 16 (`transformer_engine/pytorch/utils.py:704-714` in TE
2.20.2; Megatron aligns to 16, 32 for MXFP8: `megatron/core/fp8_utils.py:168-173`). With
`config.fp8` each micro-batch is padded to a multiple of that many tokens: padded rows to a
width that is a multiple, a pack with one padding sequence at its end; the padding is no
response token, so it counts nowhere. Delayed scaling reduces amaxes over TP x DP at every
autocast exit (`fp8_utils.py:620-630`) unless `config.tp_only_amax_red`: the data-parallel ranks
then run the same number of micro-batches, the ones with fewer adding empty ones.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_intuitor.batch import NO_ROUTING, MicroBatching
from megatron_intuitor.platform import device
from megatron_intuitor.scoring import TokenScores, vocab_parallel_token_scores

# head(logits_shard [b, s, V/TP] or [1, t, V/TP], micro_batch: ModelInput) -> (loss, stats) or
# (loss, num_tokens, stats), Megatron's loss-function contract; stats are gathered per
# micro-batch on the last stage.
LogitsHead = Callable[[torch.Tensor, "ModelInput"], tuple]

SCORE_NAMES = TokenScores._fields  # ("log_probs", "entropy", "self_certainty")
# A micro-batch column of each token's experts [.., layers, top_k] (global ids): the policy's
# routers replay them (`models/routing_replay.py`, actor.moe_routing_replay)
ROUTED_EXPERTS = "routed_experts"


def _tp_group():
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _real_tokens(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[b, width] bool: position t of row i holds one of its `lengths[i]` real tokens."""
    return torch.arange(width, device=lengths.device) < lengths[:, None]


@dataclass
class ModelInput:
    """One micro-batch as the model reads it: `tokens` holds `input_ids` and every other
    per-token tensor in the model's layout ([b, s] padded, [1, t] packed)."""

    tokens: dict[str, torch.Tensor]
    position_ids: torch.Tensor
    lengths: torch.Tensor  # [b] real tokens of each of the micro-batch's rows
    packed_seq_params: Optional[object] = None  # megatron PackedSeqParams when packed
    # tokens (layout of input_ids) whose predicting logits alone were computed; None: all
    scored_tokens: Optional[torch.Tensor] = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tokens[name]

    def padding(self) -> torch.Tensor:
        """bool, laid out like `self["input_ids"]`: True at the tokens of no row (padding)."""
        rows, width = self["input_ids"].shape
        if self.packed_seq_params is not None:
            return (torch.arange(width, device=self.lengths.device) >= self.lengths.sum())[None]
        padding = torch.ones(rows, width, dtype=torch.bool, device=self.lengths.device)
        padding[:len(self.lengths)] = ~_real_tokens(self.lengths, width)
        return padding

    def to_rows(self, values: torch.Tensor) -> torch.Tensor:
        """`values` laid out like `self["input_ids"]` (plus trailing dims) -> right-padded rows
        [b, longest row, ...], 0 past each row's length."""
        width = int(self.lengths.max())
        real = _real_tokens(self.lengths, width)
        rows = values.new_zeros(len(self.lengths), width, *values.shape[2:])
        if self.packed_seq_params is not None:
            rows[real] = values[0, :int(self.lengths.sum())]
        else:
            rows[real] = values[:len(self.lengths), :width][real]
        return rows


def _packed_seq_params(sequence_lengths: list[int], device: torch.device):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = torch.tensor([0, *sequence_lengths], device=device).cumsum(0).to(torch.int32)
    # The true longest sequence: Megatron builds rotary frequencies for positions below it (a
    # larger value that happened to equal the pack length would switch its THD RoPE to
    # offset positions).
    longest = max(sequence_lengths)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _model_input(micro_batch: dict[str, torch.Tensor], packed: bool) -> ModelInput:
    """`micro_batch`'s rows in the model's layout, on the model's device."""
    compute = device()
    lengths = micro_batch["lengths"].to(compute)
    tokens = {name: value.to(compute) for name, value in micro_batch.items() if name != "lengths"}
    rows, width = tokens["input_ids"].shape
    if not packed:
        return ModelInput(tokens, torch.arange(width, device=compute).expand(rows, -1), lengths)
    real = _real_tokens(lengths, width)
    starts = lengths.cumsum(0) - lengths
    position_ids = torch.arange(int(lengths.sum()), device=compute) - starts.repeat_interleave(
        lengths)
    return ModelInput({name: value[real][None] for name, value in tokens.items()},
                      position_ids[None], lengths, _packed_seq_params(lengths.tolist(), compute))


def _padded_to(model_input: ModelInput, rows: int, width: int) -> ModelInput:
    """`model_input` grown to [rows, width] with zeros (token id 0, masks False); packed, the
    extra tokens form one sequence of their own after the real ones."""
    current_rows, current = model_input["input_ids"].shape
    if (current_rows, current) == (rows, width):
        return model_input

    def grow(value: torch.Tensor) -> torch.Tensor:
        grown = value.new_zeros(rows, width, *value.shape[2:])
        grown[:current_rows, :current] = value
        return grown

    tokens = {name: grow(value) for name, value in model_input.tokens.items()}
    compute = model_input.lengths.device
    if model_input.packed_seq_params is None:
        return replace(model_input, tokens=tokens,
                       position_ids=torch.arange(width, device=compute).expand(rows, -1))
    padding = torch.arange(width - current, device=compute)
    return replace(model_input, tokens=tokens,
                   position_ids=torch.cat([model_input.position_ids[0], padding])[None],
                   packed_seq_params=_packed_seq_params(
                       model_input.lengths.tolist() + [width - current], compute))


def token_multiple(config) -> int:
    """The multiple of tokens a micro-batch's sequence length must be for this model config:
    that of its FP8 GEMMs (1 without FP8), times the TP size under sequence parallelism (each
    tensor-parallel rank holds an equal part of the sequence, whose tokens its GEMMs take)."""
    fp8 = (32 if config.fp8_recipe == "mxfp8" else 16) if config.fp8 else 1
    return fp8 * (config.tensor_model_parallel_size if config.sequence_parallel else 1)


def _aligned(model_input: ModelInput, multiple: int) -> ModelInput:
    """`model_input` padded to a token count that is a multiple of `multiple`: padded rows to
    such a width, a pack to such a length."""
    rows, width = model_input["input_ids"].shape
    return _padded_to(model_input, rows, -(-width // multiple) * multiple)


def _empty_like(model_input: ModelInput, multiple: int) -> ModelInput:
    """A micro-batch of one padding row of `multiple` tokens, in `model_input`'s layout: it
    holds no response token, so every head's loss and token count on it are 0 (and no replayed
    experts: its routers route by their own top-k)."""
    compute = model_input.lengths.device
    lengths = torch.tensor([multiple], device=compute)
    tokens = {name: value.new_full((1, multiple, *value.shape[2:]),
                                   NO_ROUTING if name == ROUTED_EXPERTS else 0)
              for name, value in model_input.tokens.items()}
    packed = (None if model_input.packed_seq_params is None
              else _packed_seq_params([multiple], compute))
    return ModelInput(tokens, torch.arange(multiple, device=compute)[None], lengths, packed)


def equalised_micro_batches(inputs: list, count: int, filler: Callable[[], object]) -> list:
    """`inputs` followed by `filler()` until there are `count`: every data-parallel rank runs
    the largest number of micro-batches any of them has."""
    if count < len(inputs):
        raise ValueError(f"cannot equalise {len(inputs)} micro-batches down to {count}")
    return list(inputs) + [filler() for _ in range(count - len(inputs))]


def _amax_reduced_over_data_parallel(config) -> bool:
    """Delayed scaling reduces amaxes at autocast exit over Megatron's amax group; the other
    recipes do not (TE 2.20.2 `quantization.py:770-782`)."""
    from megatron.core import parallel_state

    delayed = bool(config.fp8) and config.fp8_recipe == "delayed"
    return delayed and not config.tp_only_amax_red and (
        parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1)


def _largest_count_over_data_parallel(count: int) -> int:
    from megatron.core import parallel_state

    largest = torch.tensor([count], device=device())
    dist.all_reduce(largest, op=dist.ReduceOp.MAX,
                    group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return int(largest)


def _check_micro_batches(micro_batches: Sequence[dict[str, torch.Tensor]]) -> None:
    if not micro_batches:
        raise ValueError("run_pipeline needs at least one micro-batch")
    for index, micro_batch in enumerate(micro_batches):
        if "input_ids" not in micro_batch or "lengths" not in micro_batch:
            raise ValueError(f"micro-batch {index} needs 'input_ids' and 'lengths', has "
                             f"{sorted(micro_batch)}")
        shape, lengths = micro_batch["input_ids"].shape, micro_batch["lengths"]
        for name, value in micro_batch.items():
            if name != "lengths" and value.shape[:2] != shape:
                raise ValueError(f"micro-batch {index}: {name} shape {tuple(value.shape)} does "
                                 f"not start with input_ids shape {tuple(shape)}")
        if lengths.shape != shape[:1] or lengths.min() < 1 or lengths.max() > shape[1]:
            raise ValueError(f"micro-batch {index}: lengths {lengths.tolist()} must be one per "
                             f"row, each in [1, {shape[1]}]")


def _output_layers(model_chunks: list) -> list:
    from megatron.core.utils import unwrap_model

    return [layer for chunk in model_chunks
            if (layer := getattr(unwrap_model(chunk), "output_layer", None)) is not None]


def _router_padding(chunk, micro_batch: ModelInput) -> torch.Tensor:
    """The padding of `micro_batch` as Megatron's MoE routers take it (`padding_mask`: left out
    of the load-balancing loss): [b, s], or this tensor-parallel rank's part of the sequence on
    a sequence-parallel stage without the embedding (megatron-core 0.16.1 splits the mask only
    where it embeds the tokens)."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    padding = micro_batch.padding()
    model = unwrap_model(chunk)
    if model.config.sequence_parallel and not model.pre_process:
        padding = padding.chunk(parallel_state.get_tensor_model_parallel_world_size(), dim=1)[
            parallel_state.get_tensor_model_parallel_rank()]
    return padding


def _predicting_positions(scored_tokens: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict the marked tokens: each mark moved one to the left (a
    marked token is never the first of its row or, packed, of its sequence)."""
    return torch.cat([scored_tokens[:, 1:], torch.zeros_like(scored_tokens[:, :1])], dim=1)


def run_pipeline(model_chunks: list, micro_batches: Sequence[dict[str, torch.Tensor]],
                 head: LogitsHead, *, forward_only: bool, packed: bool,
                 logits_at: Optional[str] = None) -> list:
    """Run `micro_batches` through the pipeline schedule. Each is a dict with `lengths` [b]
    (real tokens per row) and right-padded per-token tensors [b, s], `input_ids` among them;
    sizes may differ between micro-batches. `head` turns the last stage's logits shard of each
    into Megatron's loss tuple; with `logits_at` (the name of a bool per-token column) only the
    logits predicting the marked tokens are computed (see the module docstring). Returns the
    heads' stats, one entry per micro-batch in order, on the last pipeline stage ([] on the
    others). With forward_only=False the losses are back-propagated into the chunks'
    gradients. With FP8 the micro-batches are padded and their number equalised over data
    parallelism (module docstring). A `ROUTED_EXPERTS` column (per-token tensors may have
    trailing dims) makes the routers replay those experts (`models/routing_replay.py`)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    _check_micro_batches(micro_batches)
    config = get_model_config(model_chunks[0])
    multiple = token_multiple(config)
    inputs = [_aligned(_model_input(micro_batch, packed), multiple)
              for micro_batch in micro_batches]
    real_count = len(inputs)
    if _amax_reduced_over_data_parallel(config):
        inputs = equalised_micro_batches(inputs, _largest_count_over_data_parallel(real_count),
                                         lambda: _empty_like(inputs[0], multiple))
    rows = max(item["input_ids"].shape[0] for item in inputs)
    width = max(item["input_ids"].shape[1] for item in inputs)
    if (parallel_state.get_pipeline_model_parallel_world_size() > 1
            and not config.variable_seq_lengths):
        inputs = [_padded_to(item, rows, width) for item in inputs]

    output_layers = _output_layers(model_chunks)
    selecting = logits_at is not None and not any(layer.sequence_parallel
                                                  for layer in output_layers)
    if selecting:
        inputs = [replace(item, scored_tokens=item[logits_at].bool()) for item in inputs]
    current: dict[str, Optional[torch.Tensor]] = {"positions": None}

    def select_hidden(_module, args, kwargs):
        """hidden [s, b, h] -> the predicting positions [k, 1, h], row-major over [b, s]."""
        hidden = args[0].transpose(0, 1)[current["positions"]]
        return (hidden.unsqueeze(1), *args[1:]), kwargs

    hooks = [layer.register_forward_pre_hook(select_hidden, with_kwargs=True)
             for layer in output_layers] if selecting else []

    def forward_step(data_iterator, chunk):
        micro_batch = next(data_iterator)
        if selecting:
            current["positions"] = _predicting_positions(micro_batch.scored_tokens)
        # attention_mask None: causal attention is exact for right-padded rows, and packed
        # sequences are delimited by packed_seq_params.
        if replay:
            set_micro_batch_routing(chunk, micro_batch[ROUTED_EXPERTS], micro_batch.lengths,
                                    micro_batch.packed_seq_params is not None)
        routing = ({"padding_mask": _router_padding(chunk, micro_batch)}
                   if config.num_moe_experts else {})
        logits_shard = chunk(micro_batch["input_ids"], micro_batch.position_ids, None,
                             packed_seq_params=micro_batch.packed_seq_params, **routing)
        return logits_shard, lambda logits: head(logits, micro_batch)

    # Every chunk (virtual stage) consumes the same micro-batches through its own iterator.
    iterators = [iter(inputs) for _ in model_chunks]
    replay = ROUTED_EXPERTS in inputs[0].tokens
    if replay:
        from megatron_intuitor.models.routing_replay import replaying, set_micro_batch_routing
    try:
        with replaying(model_chunks) if replay else nullcontext():
            stats = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
                model=model_chunks, num_microbatches=len(inputs), seq_length=width,
                micro_batch_size=rows, forward_only=forward_only)
    finally:
        for hook in hooks:
            hook.remove()
    return stats[:real_count]  # the empty micro-batches' stats are nobody's


def micro_batches(tokens: dict[str, torch.Tensor], lengths: torch.Tensor,
                  partition: Sequence[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """`run_pipeline`'s input: the rows of each index tensor in `partition`, each micro-batch
    trimmed to its longest row."""
    cut = []
    for rows in partition:
        width = int(lengths[rows].max())
        cut.append({"lengths": lengths[rows],
                    **{name: value[rows, :width] for name, value in tokens.items()}})
    return cut


def shifted_token_scores(logits_shard: torch.Tensor, input_ids: torch.Tensor, *,
                         temperature: float, vocab_size: int) -> TokenScores:
    """Scores of `input_ids` [b, s] (or a packed [1, t]) from the logits [b, s, V/TP] that
    predicted them: entry t scores token t from the logits at t-1; entry 0 (no prediction) is 0.
    In a packed row, the entry of each later sequence's first token comes from the previous
    sequence's last logits and means nothing; a row's first token is never a response token,
    so the response mask drops it. Gradients flow to the logits through log_probs and entropy."""
    # Score every position against the next token (the last against a dummy, dropped below)
    # rather than slicing logits[:, :-1], which would copy the whole logits tensor.
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    scores = vocab_parallel_token_scores(logits_shard, next_ids, temperature=temperature,
                                         vocab_size=vocab_size, tp_group=_tp_group())
    return TokenScores(*(torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
                         for v in scores))


def token_scores(logits_shard: torch.Tensor, micro_batch: ModelInput, *, temperature: float,
                 vocab_size: int) -> TokenScores:
    """`shifted_token_scores` of the micro-batch's `input_ids` from the logits the head got: all
    positions, or only those predicting `micro_batch.scored_tokens` (`run_pipeline(logits_at=)`),
    in which case the other entries are 0."""
    input_ids = micro_batch["input_ids"]
    if micro_batch.scored_tokens is None:
        return shifted_token_scores(logits_shard, input_ids, temperature=temperature,
                                    vocab_size=vocab_size)
    scored = micro_batch.scored_tokens
    scores = vocab_parallel_token_scores(logits_shard, input_ids[scored][None],
                                         temperature=temperature, vocab_size=vocab_size,
                                         tp_group=_tp_group())

    def laid_out(values: torch.Tensor) -> torch.Tensor:
        # masked_scatter fills the marked entries in row-major order, as the selection took them
        return torch.zeros(input_ids.shape, dtype=values.dtype,
                           device=values.device).masked_scatter(scored, values[0])

    return TokenScores(*(laid_out(v) for v in scores))


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> None:
    """Clear errors for a batch `score_batch` cannot score exactly."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    for name, mask in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
    attention, response = attention_mask.bool(), response_mask.bool()
    lengths = attention.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError(f"attention_mask row {int((lengths == 0).nonzero()[0])} is empty")
    right_padded = attention == _real_tokens(lengths, attention.shape[1])
    if not right_padded.all():
        row = int((~right_padded).any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} is not right-padded: lay each row out as "
                         f"[prompt, response, padding]")
    if (response & ~attention).any():
        row = int((response & ~attention).any(dim=1).nonzero()[0])
        raise ValueError(f"response_mask row {row} marks padding positions")
    if response[:, 0].any():
        raise ValueError("response_mask marks position 0, which no logits predict: "
                         "every response needs a prompt before it")


def score_batch(model_chunks: list, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor, *, temperature: float, vocab_size: int,
                batching: MicroBatching,
                routed_experts: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """Per-token log_probs, entropy and self_certainty [b, s] (fp32, no gradient) of a
    right-padded prompt+response batch, on every rank, in the batch's row order: entry t scores
    token t, and entries outside `response_mask` are 0. `batching` says how the rows are cut and
    laid out. The last pipeline stage computes them, then broadcasts over the pipeline group.
    Sentence-level self-certainty is
    `scoring.masked_mean_per_sequence(scores["self_certainty"], response_mask)`.
    `routed_experts` [b, s, layers, top_k]: the experts the routers replay (routing replay)
    instead of their own top-k."""
    from megatron.core import parallel_state

    check_batch(input_ids, attention_mask, response_mask)
    lengths = attention_mask.bool().sum(dim=1)
    partition = batching.partition(lengths)

    def scores_head(logits_shard, micro_batch):
        scores = token_scores(logits_shard, micro_batch, temperature=temperature,
                              vocab_size=vocab_size)
        stacked = torch.where(micro_batch["response_mask"][..., None],
                              torch.stack(scores, dim=-1), 0.0)
        return stacked.new_zeros(()), {"scores": micro_batch.to_rows(stacked)}

    columns = {"input_ids": input_ids, "response_mask": response_mask.bool()}
    if routed_experts is not None:
        columns[ROUTED_EXPERTS] = routed_experts
    with torch.no_grad():
        stats = run_pipeline(
            model_chunks, micro_batches(columns, lengths, partition),
            scores_head, forward_only=True, packed=batching.packed, logits_at="response_mask")
    stacked = torch.zeros(*input_ids.shape, len(SCORE_NAMES), dtype=torch.float32,
                          device=device())
    if parallel_state.is_pipeline_last_stage():
        for rows, item in zip(partition, stats):
            stacked[rows.to(stacked.device), :item["scores"].shape[1]] = item["scores"]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.broadcast(stacked, group=group, group_src=dist.get_world_size(group) - 1)
    return dict(zip(SCORE_NAMES, stacked.to(input_ids.device).unbind(dim=-1)))
