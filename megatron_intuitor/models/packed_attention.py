"""Packed-sequence (THD) core attention for Megatron's local layer spec, i.e. on CPU.

With `packed_seq_params` (qkv_format "thd") Megatron's attention hands its core attention the
query/key/value of all sequences of a micro-batch back to back, [t, heads, head_dim], after
applying rotary embeddings with positions that restart at every `cu_seqlens` boundary. Attention
must stay inside each sequence: a block-diagonal causal mask. Megatron-Core 0.16.1's local
`DotProductAttention` asserts "Packed sequence is not supported"; Transformer Engine's attention
(the GPU spec) takes THD natively and needs nothing from here.

`PackedDotProductAttention` runs the parent's own causal attention on each sequence as a batch
of one, so a packed row and a padded row go through the same kernel; the work is sum(s_i^2)
per head, not the t^2 of one block-diagonal mask over the whole pack.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


class PackedDotProductAttention(DotProductAttention):
    """Megatron's local `DotProductAttention`, also accepting THD `packed_seq_params`."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias)
        bounds = _sequence_bounds(packed_seq_params, query.shape[0])
        if attention_mask is not None:
            raise ValueError("packed sequences take their mask from cu_seqlens; "
                             "attention_mask must be None")
        attend = super().forward
        # [t, heads, dim] -> per sequence [s, 1, heads, dim] -> [s, 1, heads * dim] each.
        return torch.cat([attend(query[start:end, None], key[start:end, None],
                                 value[start:end, None], None, attn_mask_type, attention_bias)
                          for start, end in bounds])


def _sequence_bounds(params: PackedSeqParams, tokens: int) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence, checked against what this module can compute."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format={params.qkv_format!r}: only 'thd'")
    if params.cu_seqlens_q_padded is not None or params.cu_seqlens_kv_padded is not None:
        raise ValueError("packed_seq_params with cu_seqlens_*_padded is not supported on CPU: "
                         "give every token to a sequence (padding as a sequence of its own)")
    cu_seqlens = params.cu_seqlens_q
    if params.cu_seqlens_kv is not None and not torch.equal(params.cu_seqlens_kv, cu_seqlens):
        raise ValueError("self-attention needs cu_seqlens_kv == cu_seqlens_q")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} must rise from 0 to the {tokens} packed tokens")
    return [(start, end) for start, end in zip(bounds[:-1], bounds[1:]) if end > start]


def with_packed_core_attention(layer_spec):
    """`layer_spec` (Megatron's local GPT layer spec) with the core attention replaced by
    `PackedDotProductAttention`, so that the model accepts `packed_seq_params`."""
    layer_spec.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return layer_spec
