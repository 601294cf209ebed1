"""One forward of a prompt+response batch through Megatron-Core's pipeline schedule, at any TP/PP.

`run_pipeline` feeds micro-batches through `get_forward_backward_func` and hands the last stage's
vocab-parallel logits to a *head* `(logits_shard, micro_batch) -> Megatron loss tuple`; the
scoring pass (`score_batch`, forward only) and the trainer's PPO loss (forward and backward) are
two heads on the same forward. `shifted_token_scores` is what both heads start from.

Batch layout: every row is right-padded, [prompt, response, padding], 1s of `attention_mask`
first. Causal attention then needs no padding mask (padding only follows real tokens), which is
exact on every attention backend, and positions are 0..s-1.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from megatron_intuitor.scoring import TokenScores, vocab_parallel_token_scores

# head(logits_shard [mb, s, V/TP], micro_batch) -> (loss, stats) or (loss, num_tokens, stats),
# Megatron's loss-function contract; stats are gathered per micro-batch on the last stage.
LogitsHead = Callable[[torch.Tensor, dict], tuple]

SCORE_NAMES = TokenScores._fields  # ("log_probs", "entropy", "self_certainty")


def _tp_group():
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def shifted_token_scores(logits_shard: torch.Tensor, input_ids: torch.Tensor, *,
                         temperature: float, vocab_size: int) -> TokenScores:
    """Scores of `input_ids` [b, s] from the logits [b, s, V/TP] that predicted them: entry t
    scores token t from the logits at t-1; entry 0 (no prediction) is 0. Gradients flow to the
    logits through log_probs and entropy."""
    # Score every position against the next token (the last against a dummy, dropped below)
    # rather than slicing logits[:, :-1], which would copy the whole logits tensor.
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    scores = vocab_parallel_token_scores(logits_shard, next_ids, temperature=temperature,
                                         vocab_size=vocab_size, tp_group=_tp_group())
    return TokenScores(*(torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
                         for v in scores))


def check_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor, micro_batch_size: int) -> None:
    """Clear errors for a batch `run_pipeline` cannot score exactly."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    for name, mask in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if mask.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
    if micro_batch_size < 1 or input_ids.shape[0] % micro_batch_size:
        raise ValueError(f"micro_batch_size {micro_batch_size} must divide the batch size "
                         f"{input_ids.shape[0]} (pipeline stages exchange fixed shapes)")
    attention, response = attention_mask.bool(), response_mask.bool()
    lengths = attention.sum(dim=1, keepdim=True)
    right_padded = attention == (torch.arange(attention.shape[1], device=attention.device)
                                 < lengths)
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


def run_pipeline(model_chunks: list, batch: dict[str, torch.Tensor], head: LogitsHead, *,
                 micro_batch_size: int, forward_only: bool) -> list:
    """Run `batch` (tensors with the batch on dim 0, `input_ids` [b, s] among them) through the
    pipeline schedule in micro-batches of `micro_batch_size` rows; `head` turns the last stage's
    logits shard of each micro-batch into Megatron's loss tuple. Returns the heads' stats, one
    entry per micro-batch, on the last pipeline stage ([] on the others). With
    forward_only=False the losses are back-propagated into the chunks' gradients."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    input_ids = batch["input_ids"]
    batch_size, seq_length = input_ids.shape
    micro_batches = [{key: value[start:start + micro_batch_size] for key, value in batch.items()}
                     for start in range(0, batch_size, micro_batch_size)]
    position_ids = torch.arange(seq_length, device=input_ids.device).expand(micro_batch_size, -1)

    def forward_step(data_iterator, chunk):
        micro_batch = next(data_iterator)
        # attention_mask None: the causal mask alone is exact for right-padded rows.
        logits_shard = chunk(micro_batch["input_ids"], position_ids, None)
        return logits_shard, lambda logits: head(logits, micro_batch)

    # Every chunk (virtual stage) consumes the same micro-batches through its own iterator.
    iterators = [iter(micro_batches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks, num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)


def score_batch(model_chunks: list, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor, *, temperature: float, vocab_size: int,
                micro_batch_size: int) -> dict[str, torch.Tensor]:
    """Per-token log_probs, entropy and self_certainty [b, s] (fp32, no gradient) of a
    right-padded prompt+response batch, on every rank: entry t scores token t, and entries
    outside `response_mask` are 0. The last pipeline stage computes them, then broadcasts over
    the pipeline group. Sentence-level self-certainty is
    `scoring.masked_mean_per_sequence(scores["self_certainty"], response_mask)`."""
    from megatron.core import parallel_state

    check_batch(input_ids, attention_mask, response_mask, micro_batch_size)
    response = response_mask.bool()

    def scores_head(logits_shard, micro_batch):
        scores = shifted_token_scores(logits_shard, micro_batch["input_ids"],
                                      temperature=temperature, vocab_size=vocab_size)
        stacked = torch.stack(scores, dim=-1)
        stacked = torch.where(micro_batch["response_mask"][..., None], stacked, 0.0)
        return stacked.new_zeros(()), {"scores": stacked}

    with torch.no_grad():
        stats = run_pipeline(model_chunks, {"input_ids": input_ids, "response_mask": response},
                             scores_head, micro_batch_size=micro_batch_size, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        stacked = torch.cat([item["scores"] for item in stats])
    else:
        stacked = torch.empty(*input_ids.shape, len(SCORE_NAMES), dtype=torch.float32,
                              device=input_ids.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.broadcast(stacked, group=group, group_src=dist.get_world_size(group) - 1)
    return dict(zip(SCORE_NAMES, stacked.unbind(dim=-1)))
