"""Per-token log-prob, entropy and self-certainty from vocab-parallel logits, in one exact pass.

INTUITOR's reward is the model's self-certainty. For the logits `z` (over the real vocabulary of
size V, divided by the sampling temperature) that predicted token t:

    self_certainty = logsumexp(z) - mean(z)          (= KL(uniform || softmax(z)) + log V)
    log_prob       = z[t] - logsumexp(z)
    entropy        = logsumexp(z) - sum(softmax(z) * z)

Under tensor parallelism rank r holds columns [r * V_shard, (r + 1) * V_shard) of the vocabulary
padded by Megatron to a multiple of 128 * TP (Megatron's `VocabUtility`); the padded columns
(index >= V) hold zeros, not -inf, and are left out of every statistic. Nothing is gathered:

1. per chunk of rows, in fp32, the row max m_r of this rank's real columns (read while the chunk
   is in cache), zm = z - m_r and e = exp(zm), and the per-row statistics S = sum(e),
   D = sum(e * zm), Z = sum(zm) and zm[t] (on the rank owning t, 0 elsewhere);
2. ONE MAX all-reduce: the global max m; each rank moves its statistics from m_r to m
   (`_shift_statistics`), then ONE SUM all-reduce of the packed [tokens, 4] statistics;
3. log_prob = zm[t] - log S, entropy = log S - D / S, self_certainty = log S - Z / V.

Every statistic is taken relative to a row max, so nothing cancels catastrophically even for
logits of +-1e4. The backward pass recomputes each chunk from the saved logits and needs no
communication (the global log S and D / S are saved per token), so the extra memory is a few
[chunk, V_shard] fp32 buffers however many tokens there are. The caller's logits are never
modified. log_prob and entropy carry gradients; self_certainty is a reward and carries none.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

# Rows per chunk default to this many elements of V_shard. On CPU ~1M fp32 elements (4 MB per
# buffer) keep a chunk's passes in cache (measured fastest, 2.3x faster than 512-row chunks at
# V_shard 76032); on an accelerator few large chunks keep kernel launches rare.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 26


class TokenScores(NamedTuple):
    log_probs: torch.Tensor  # log p(target), differentiable
    entropy: torch.Tensor  # entropy of softmax(z), differentiable
    self_certainty: torch.Tensor  # logsumexp(z) - mean(z), no gradient


def _chunk_rows(chunk_size: Optional[int], shard_width: int, device: torch.device) -> int:
    if chunk_size is not None:
        return chunk_size
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS_ACCELERATOR)
    return max(1, budget // max(shard_width, 1))


class _VocabParallelTokenScores(torch.autograd.Function):
    """Autograd of the fused pass. Inputs are 2-D: logits [N, V_shard], targets [N]."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                vocab_size: int, tp_group: Optional[dist.ProcessGroup], chunk_rows: int):
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        shard_width = logits.shape[-1]
        vocab_start = tp_rank * shard_width
        real_width = min(max(vocab_size - vocab_start, 0), shard_width)  # 0: all padding
        real_logits = logits[:, :real_width]
        num_rows = logits.shape[0]
        stats_options = dict(dtype=torch.float32, device=logits.device)

        # Each chunk is shifted by this rank's own row max, taken from the chunk while it is in
        # cache (a separate max pass would stream the whole shard from memory once more); the
        # statistics move to the global max after ONE MAX all-reduce. The max of z = x / T is
        # max(x) / T: no scaled copy is needed to find it.
        row_max = torch.full((num_rows,), float("-inf"), **stats_options)
        stats = torch.zeros(num_rows, 4, **stats_options)  # S, D, Z, zm[target]
        local_targets, owned = _local_targets(targets, vocab_start, real_width)
        if real_width > 0:
            rows_per_chunk = max(1, min(chunk_rows, num_rows))
            shifted = torch.empty(rows_per_chunk, real_width, **stats_options)
            exps = torch.empty(rows_per_chunk, real_width, **stats_options)
            for start in range(0, num_rows, rows_per_chunk):
                end = min(start + rows_per_chunk, num_rows)
                chunk = real_logits[start:end]
                row_max[start:end] = chunk.amax(dim=-1)
                zm = _shifted_logits(chunk, row_max[start:end], temperature,
                                     out=shifted[: end - start])
                e = torch.exp(zm, out=exps[: end - start])
                stats[start:end, 0] = e.sum(dim=-1)
                stats[start:end, 2] = zm.sum(dim=-1)
                stats[start:end, 3] = zm.gather(1, local_targets[start:end, None]).squeeze(1)
                stats[start:end, 1] = e.mul_(zm).sum(dim=-1)
        if tp_size > 1:
            local_max = row_max.clone()
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
            if real_width > 0:
                _shift_statistics(stats, (local_max - row_max) / temperature, real_width)
        if real_width > 0:
            stats[:, 3].mul_(owned)
        if tp_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)

        sum_exp, sum_exp_zm, sum_zm, target_zm = stats.unbind(dim=-1)
        log_sum_exp = sum_exp.log()  # logsumexp(z) - m
        mean_zm_under_p = sum_exp_zm / sum_exp  # E_p[z] - m
        log_probs = target_zm - log_sum_exp
        entropy = log_sum_exp - mean_zm_under_p
        self_certainty = log_sum_exp - sum_zm / vocab_size

        ctx.save_for_backward(logits, local_targets, owned, row_max, log_sum_exp,
                              mean_zm_under_p)
        ctx.temperature, ctx.real_width, ctx.chunk_rows = temperature, real_width, chunk_rows
        ctx.mark_non_differentiable(self_certainty)
        return log_probs, entropy, self_certainty

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, _grad_self_certainty):
        logits, local_targets, owned, row_max, log_sum_exp, mean_zm_under_p = ctx.saved_tensors
        temperature, real_width = ctx.temperature, ctx.real_width
        num_rows = logits.shape[0]
        grad_log_probs = _zeros_if_none(grad_log_probs, log_sum_exp)
        grad_entropy = _zeros_if_none(grad_entropy, log_sum_exp)
        grad_logits = torch.empty_like(logits)
        grad_logits[:, real_width:] = 0  # padded columns do not exist for the scores

        # With p = softmax(z):  d log_prob / dz = onehot(t) - p,
        #                       d entropy / dz = p * (E_p[z] - z).
        # So dL/dz = p * (g_H * (E_p[zm] - zm) - g_lp) + g_lp * onehot(t), and dz/dx = 1/T.
        if real_width > 0:
            rows_per_chunk = max(1, min(ctx.chunk_rows, num_rows))
            options = dict(dtype=torch.float32, device=logits.device)
            work = torch.empty(rows_per_chunk, real_width, **options)
            probs = torch.empty(rows_per_chunk, real_width, **options)
            for start in range(0, num_rows, rows_per_chunk):
                end = min(start + rows_per_chunk, num_rows)
                rows = slice(start, end)
                zm = _shifted_logits(logits[rows, :real_width], row_max[rows], temperature,
                                     out=work[: end - start])
                p = torch.sub(zm, log_sum_exp[rows, None], out=probs[: end - start]).exp_()
                g_lp, g_h = grad_log_probs[rows, None], grad_entropy[rows, None]
                grad_z = zm.mul_(-g_h).add_(g_h * mean_zm_under_p[rows, None] - g_lp).mul_(p)
                grad_z.scatter_add_(1, local_targets[rows, None], g_lp * owned[rows, None])
                if temperature != 1.0:
                    grad_z.mul_(1.0 / temperature)
                grad_logits[rows, :real_width] = grad_z
        return grad_logits, None, None, None, None, None


def _shift_statistics(stats: torch.Tensor, delta: torch.Tensor, width: int) -> None:
    """Move a rank's S, D, Z, zm[target] (columns of `stats`, taken relative to its own row max)
    to the global max, in place: with delta = (local max - global max) / T <= 0 and zm' = zm +
    delta, S' = S e^delta, D' = e^delta (D + delta S), Z' = Z + width delta. No term cancels:
    D, delta S and Z, width delta are all <= 0."""
    scale = delta.exp()
    sum_exp, sum_exp_zm, sum_zm, target_zm = stats.unbind(dim=-1)
    sum_exp_zm.add_(delta * sum_exp).mul_(scale)
    sum_exp.mul_(scale)
    sum_zm.add_(width * delta)
    target_zm.add_(delta)


def _shifted_logits(logits: torch.Tensor, row_max: torch.Tensor, temperature: float,
                    out: torch.Tensor) -> torch.Tensor:
    """z - max(z) in fp32 for z = logits / T, written into `out` (never into `logits`)."""
    torch.sub(logits, row_max[:, None], out=out)
    if temperature != 1.0:
        out.mul_(1.0 / temperature)
    return out


def _local_targets(targets: torch.Tensor, vocab_start: int,
                   real_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each target in this shard (0 where another rank owns it) and ownership 0/1."""
    local = targets - vocab_start
    owned = (local >= 0) & (local < real_width)
    return torch.where(owned, local, 0), owned.float()


def _zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad.float()


def vocab_parallel_token_scores(
    logits_shard: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    temperature: float,
    vocab_size: int,
    tp_group: Optional[dist.ProcessGroup] = None,
    chunk_size: Optional[int] = None,
) -> TokenScores:
    """Log-prob of `target_ids`, entropy and self-certainty per token, as fp32 `TokenScores`
    shaped like `target_ids`.

    logits_shard: [..., V_shard], this rank's columns of the padded vocabulary (any float dtype;
        statistics accumulate in fp32). Leading dims may be [b, s], [s, b] or packed [t].
    target_ids: [...] integer ids in [0, vocab_size): the token each row of logits predicted.
    temperature: the sampling temperature the logits are divided by (> 0).
    vocab_size: the real vocabulary (the HF config's `vocab_size`); columns past it are padding.
    tp_group: the tensor-parallel group the vocabulary is split over; None means the logits
        hold the whole (padded) vocabulary and nothing is communicated. Every rank of the group
        must call this with the same leading shape and targets.
    chunk_size: rows processed at once (None: as many as fit a cache-sized budget); the extra
        memory is a few [chunk_size, V_shard] fp32 buffers.
    """
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    _check_inputs(logits_shard, target_ids, temperature, vocab_size, tp_size, chunk_size)
    shard_width = logits_shard.shape[-1]
    rows = _VocabParallelTokenScores.apply(
        logits_shard.reshape(-1, shard_width), target_ids.reshape(-1), float(temperature),
        vocab_size, tp_group, _chunk_rows(chunk_size, shard_width, logits_shard.device))
    return TokenScores(*(values.view(target_ids.shape) for values in rows))


def self_certainty_and_entropy(logits: torch.Tensor, *, temperature: float,
                               vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(self-certainty, entropy) in fp32 of every row of `logits` [..., >= vocab_size] holding
    the whole vocabulary on one process (the rollout engine's logits, `rollout.sampling_scores`),
    over the first `vocab_size` columns at `temperature`: the pass of
    `vocab_parallel_token_scores` with no tensor-parallel group, so that a reward taken while
    sampling is the trainer's arithmetic, row max shift included. No gradient."""
    no_target = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    with torch.no_grad():  # its log-prob of token 0 is not wanted
        scores = vocab_parallel_token_scores(logits, no_target, temperature=temperature,
                                             vocab_size=vocab_size)
    return scores.self_certainty, scores.entropy


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                  vocab_size: int, tp_size: int, chunk_size: Optional[int]) -> None:
    if not logits.is_floating_point():
        raise TypeError(f"logits_shard must be a float tensor, got {logits.dtype}")
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
        raise ValueError(f"target_ids shape {tuple(targets.shape)} must equal logits_shard's "
                         f"leading shape {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"target_ids must be an integer tensor, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    padded_width = logits.shape[-1] * tp_size
    if not 0 < vocab_size <= padded_width:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {padded_width}]: the padded "
                         f"vocabulary is {logits.shape[-1]} columns x {tp_size} TP ranks")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab_size):
        raise ValueError(f"target_ids must lie in [0, vocab_size={vocab_size}), found "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def masked_mean_per_sequence(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [b, s] over the positions where `mask` [b, s] is set, per row -> [b].

    A row with no masked-in position gives 0 (not NaN); values at masked-out positions never
    leak in, even if they are NaN or inf.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}")
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1).to(values.dtype)


def masked_mean_per_packed_sequence(values: torch.Tensor, mask: torch.Tensor,
                                    cu_seqlens: torch.Tensor) -> torch.Tensor:
    """`masked_mean_per_sequence` for packed (THD) tokens: `values` and `mask` are [t], sequence
    i spans [cu_seqlens[i], cu_seqlens[i + 1]). Returns [len(cu_seqlens) - 1]."""
    if values.shape != mask.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must be "
                         f"equal 1-D (packed tokens)")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0
            or int(cu_seqlens[-1]) != values.numel() or bool((lengths < 0).any())):
        raise ValueError(f"cu_seqlens must rise from 0 to the token count {values.numel()}, "
                         f"got {cu_seqlens.tolist()}")
    sequence_of_token = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=values.device), lengths.to(values.device))
    mask = mask.bool()
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    sums = torch.zeros(lengths.numel(), dtype=values.dtype, device=values.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, sequence_of_token, kept)
    counts = counts.index_add(0, sequence_of_token, mask.to(values.dtype))
    return sums / counts.clamp(min=1)
