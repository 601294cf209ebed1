"""A rank's policy (or reference) model: its Megatron chunks of a Hugging Face checkpoint,
configured for the PPO update."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import transformers

from megatron_intuitor.parallel import ParallelSizes


def load_policy(model_dir: str | Path, sizes: ParallelSizes, *,
                params_dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                recompute: bool = False, fp8_recipe: str = "tensorwise",
                fp8_amax_reduction: str = "tp", moe_token_dispatcher: str = "alltoall",
                sequence_parallel: Optional[bool] = None,
                local_layers: bool = False) -> tuple[transformers.PretrainedConfig, list]:
    """This rank's Megatron chunks of the HF checkpoint `model_dir`, configured for the PPO
    update: `calculate_per_token_loss`, so the loss head's sums become an exact token mean.
    `sequence_parallel`: `actor.sequence_parallel` (None: on for a mixture of experts at TP >
    1, `config.uses_sequence_parallel`). `local_layers`: Megatron's local layer spec on GPU too
    (no Transformer Engine)."""
    from megatron_intuitor.models.bridge import load_hf_weights
    from megatron_intuitor.models.config import (build_model, load_hf_config,
                                                 transformer_config_from_hf,
                                                 uses_sequence_parallel)

    hf_config = load_hf_config(model_dir)
    config = transformer_config_from_hf(hf_config, sizes, params_dtype=params_dtype, fp8=fp8,
                                        recompute=recompute, fp8_recipe=fp8_recipe,
                                        fp8_amax_reduction=fp8_amax_reduction,
                                        moe_token_dispatcher=moe_token_dispatcher,
                                        sequence_parallel=uses_sequence_parallel(
                                            hf_config, sizes.tensor, sequence_parallel))
    config.calculate_per_token_loss = True
    chunks = build_model(hf_config, config, local_layers=local_layers)
    load_hf_weights(chunks, model_dir, hf_config)
    return hf_config, chunks
