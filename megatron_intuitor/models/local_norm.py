"""The RMSNorm of Megatron's local layer spec (CPU, or GPU without Transformer Engine), able to
run sequence parallel.

Megatron-Core 0.16.1's local spec builds its norms with `WrappedTorchNorm`, which asserts
"sequence parallel not supported by torch LayerNorm". A norm needs nothing to run on a
sequence-parallel shard (it is row-wise over the hidden dimension); what sequence parallelism
needs is that its weight's gradient, a partial sum over this tensor-parallel rank's share of the
tokens, be summed over the tensor-parallel group. Megatron's `finalize_model_grads` does that
for every parameter marked `sequence_parallel` (`_allreduce_non_tensor_model_parallel_grads`), as
Apex's `FusedLayerNorm` and Transformer Engine's norms mark theirs. `SequenceParallelRMSNorm` is
torch's RMSNorm (the same computation and parameter as `WrappedTorchNorm` builds) that marks its
weight likewise; `local_block_spec` puts it into a local layer spec and its final norm.
"""
from __future__ import annotations

from typing import Optional

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` built from Megatron's norm arguments, its weight marked
    `sequence_parallel` when the model config is."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused_megatron_options):
        # Megatron passes persist_layer_norm / zero_centered_gamma / normalization; the config
        # checks below are WrappedTorchNorm's, less the sequence-parallel one.
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma or (
                config.persist_layer_norm or config.memory_efficient_layer_norm):
            raise ValueError("SequenceParallelRMSNorm is a plain RMSNorm: normalization="
                             f"{config.normalization!r}, no zero-centred gamma, no persistent or "
                             "memory-efficient norm")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def local_block_spec(layer_spec, config, vp_stage: Optional[int]):
    """The transformer block of Megatron's local GPT `layer_spec` for virtual pipeline stage
    `vp_stage` of this rank, every norm (input, pre-MLP, q/k, final) a
    `SequenceParallelRMSNorm`."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    layer = layer_spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = SequenceParallelRMSNorm
    attention = layer.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention, name) is not IdentityOp:  # Qwen3's qk-norm
            setattr(attention, name, SequenceParallelRMSNorm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers,
                                      layer_norm=SequenceParallelRMSNorm)
