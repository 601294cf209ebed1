"""Hugging Face model directory -> Megatron-Core `TransformerConfig` -> `GPTModel` chunks.

Supported: Qwen2 / Qwen2.5 (GQA, qkv bias, tied or untied embeddings), Llama 3 (rope scaling
"llama3"), Qwen3 (qk-norm, explicit head_dim), Qwen3-MoE (Qwen3 attention, every layer a
mixture of experts without a shared expert: Megatron's MoE layer with SequentialMLP experts),
Qwen2-MoE (Qwen2 attention, every layer a mixture of experts plus a shared expert behind a
sigmoid gate: Megatron's gated `SharedExpertMLP`).
Everything the bridge and the model builder need to know about an architecture is in
`ArchitectureFeatures`; anything outside what is listed here is refused with a ValueError before a model is built.

On CPU the model uses Megatron's local layer spec (torch norms, no fusions); on GPU the
Transformer Engine spec (imported lazily: the CPU environment has no Transformer Engine).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import transformers

from megatron_intuitor.config import MOE_TOKEN_DISPATCHERS
from megatron_intuitor.parallel import ParallelSizes
from megatron_intuitor.platform import on_gpu

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM",
                           "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM")
# Rope types whose inverse frequencies are static (no attention scaling, no sequence-length
# dependence), so they are exactly a different `inv_freq` in Megatron's rotary embedding.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_SCALING_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
FP8_AMAX_REDUCTIONS = ("tp", "tp_dp")


@dataclass(frozen=True)
class ArchitectureFeatures:
    """What the Megatron model and the weight mapping depend on, read from an HF config."""

    architecture: str
    head_dim: int
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    moe: Optional["MoeFeatures"] = None


@dataclass(frozen=True)
class MoeFeatures:
    """A mixture-of-experts MLP in every layer. The router takes the top `top_k` of
    softmax(router logits); with `norm_topk_prob` the chosen probabilities are renormalised to
    sum to 1, which is exactly a softmax over the top-k logits (Megatron's
    `moe_router_pre_softmax=False`); without it they are the full softmax's (pre-softmax).
    Qwen2-MoE adds a shared expert of `shared_expert_ffn_hidden_size` (0: none) whose output
    every token gets, scaled by sigmoid(shared_expert_gate(x)): Megatron's `SharedExpertMLP`
    with `moe_shared_expert_gate` computes exactly that."""

    num_experts: int
    top_k: int
    ffn_hidden_size: int
    norm_topk_prob: bool
    aux_loss_coeff: float
    shared_expert_ffn_hidden_size: int = 0


def architecture_features(hf_config: transformers.PretrainedConfig) -> ArchitectureFeatures:
    architecture = _checked_architecture(getattr(hf_config, "architectures", None), "HF config")
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads)
    moe = None
    if architecture in MOE_ARCHITECTURES:
        moe = MoeFeatures(num_experts=hf_config.num_experts,
                          top_k=hf_config.num_experts_per_tok,
                          ffn_hidden_size=hf_config.moe_intermediate_size,
                          norm_topk_prob=bool(hf_config.norm_topk_prob),
                          aux_loss_coeff=float(hf_config.router_aux_loss_coef),
                          shared_expert_ffn_hidden_size=int(getattr(
                              hf_config, "shared_expert_intermediate_size", 0) or 0))
    return ArchitectureFeatures(
        architecture=architecture,
        head_dim=head_dim,
        # Qwen2 always has q/k/v biases (and never an o_proj bias), Qwen2-MoE per `qkv_bias`;
        # the others follow `attention_bias`, which for them would also add an o_proj bias
        # (refused below).
        qkv_bias=architecture == "Qwen2ForCausalLM" or bool(
            getattr(hf_config, "qkv_bias" if architecture == "Qwen2MoeForCausalLM"
                    else "attention_bias", False)),
        qk_norm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        moe=moe,
    )


def _checked_architecture(architectures: Optional[list], where: str) -> str:
    if not architectures or len(architectures) != 1 or (
            architectures[0] not in SUPPORTED_ARCHITECTURES):
        raise ValueError(f"{where}: unsupported architecture {architectures!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return architectures[0]


def _rope_parameters(hf_config: transformers.PretrainedConfig) -> dict:
    # transformers 5 keeps rope_theta and the scaling in `rope_parameters`.
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return params


def _check_supported(hf_config: transformers.PretrainedConfig, where: str) -> None:
    features = architecture_features(hf_config)
    problems = []
    if hf_config.hidden_act != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act!r} (only 'silu' / SwiGLU)")
    if getattr(hf_config, "mlp_bias", False):
        problems.append("mlp_bias=True (MLP biases are not supported)")
    if features.architecture == "Qwen2MoeForCausalLM":
        if not features.qkv_bias:
            problems.append("qkv_bias=False (vLLM's Qwen2-MoE always has q/k/v biases)")
        if features.moe.shared_expert_ffn_hidden_size <= 0:
            problems.append(f"shared_expert_intermediate_size="
                            f"{features.moe.shared_expert_ffn_hidden_size} (a shared expert is "
                            f"required: transformers' Qwen2-MoE always builds one)")
    if features.architecture != "Qwen2ForCausalLM" and getattr(hf_config, "attention_bias", False):
        problems.append("attention_bias=True (adds an o_proj bias, not supported)")
    if getattr(hf_config, "use_sliding_window", False):
        problems.append("use_sliding_window=True (sliding-window attention is not supported)")
    if features.moe is not None:
        if hf_config.decoder_sparse_step != 1 or list(hf_config.mlp_only_layers or []):
            problems.append(f"decoder_sparse_step={hf_config.decoder_sparse_step}, "
                            f"mlp_only_layers={hf_config.mlp_only_layers} (only models whose "
                            "every layer is a mixture of experts are supported)")
        if not 0 < features.moe.top_k <= features.moe.num_experts:
            problems.append(f"num_experts_per_tok={features.moe.top_k} with "
                            f"num_experts={features.moe.num_experts}")
        if features.moe.top_k == 1 and features.moe.norm_topk_prob:
            # Megatron refuses a softmax over one logit (a zero gradient).
            problems.append("num_experts_per_tok=1 with norm_topk_prob=True")
    rope_type = _rope_parameters(hf_config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        problems.append(f"rope_type={rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if problems:
        raise ValueError(f"{where}: unsupported {features.architecture} config: "
                         + "; ".join(problems))


def load_hf_config(model_dir: str | Path) -> transformers.PretrainedConfig:
    """Read `<model_dir>/config.json`; ValueError on an unsupported architecture or feature."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no HF config at {config_file}")
    try:
        architectures = json.loads(config_file.read_text()).get("architectures")
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    # Checked before AutoConfig, which fails obscurely on model types it does not know.
    _checked_architecture(architectures, str(config_file))
    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    _check_supported(hf_config, str(config_file))
    return hf_config


def uses_sequence_parallel(hf_config: transformers.PretrainedConfig, tp: int,
                           setting: Optional[bool] = None) -> bool:
    """Whether the model runs sequence parallel: `setting` (`actor.sequence_parallel`) where TP
    > 1, and when it is None exactly for a mixture of experts at TP > 1 (Megatron-Core trains an
    MoE layer at TP > 1 only sequence parallel; dense models keep Megatron's default, off)."""
    if tp == 1:
        return False
    return architecture_features(hf_config).moe is not None if setting is None else setting


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Megatron's embedding/output width: `vocab_size` rounded up to a multiple of 128 * tp."""
    multiple = 128 * tp
    return -(-vocab_size // multiple) * multiple


def _check_parallel_sizes(hf_config: transformers.PretrainedConfig, sizes: ParallelSizes) -> None:
    tp, pp, vpp = sizes.tensor, sizes.pipeline, sizes.virtual_pipeline or 1
    layers = hf_config.num_hidden_layers
    moe = architecture_features(hf_config).moe
    divisible = {
        "num_attention_heads": hf_config.num_attention_heads,
        "num_key_value_heads": hf_config.num_key_value_heads,
    }
    if moe is None:
        divisible["intermediate_size"] = hf_config.intermediate_size
    elif moe.shared_expert_ffn_hidden_size:
        divisible["shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
    for key, value in divisible.items():
        if value % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide {key}={value}")
    if moe is None and (sizes.expert, sizes.expert_tensor_size) != (1, tp):
        raise ValueError(f"expert_model_parallel_size={sizes.expert} / "
                         f"expert_tensor_parallel_size={sizes.expert_tensor} need a "
                         f"mixture-of-experts model ({', '.join(MOE_ARCHITECTURES)})")
    if moe is not None:
        if moe.num_experts % sizes.expert:
            raise ValueError(f"expert_model_parallel_size {sizes.expert} does not divide "
                             f"num_experts={moe.num_experts}")
        if moe.ffn_hidden_size % sizes.expert_tensor_size:
            raise ValueError(f"expert_tensor_parallel_size {sizes.expert_tensor_size} does not "
                             f"divide moe_intermediate_size={moe.ffn_hidden_size}")
    if pp > layers:
        raise ValueError(f"pipeline parallel size {pp} is larger than num_hidden_layers={layers}")
    if sizes.virtual_pipeline is not None and pp == 1:
        raise ValueError("virtual pipeline stages need pipeline parallel size > 1")
    if layers % (pp * vpp):
        raise ValueError(f"num_hidden_layers={layers} is not divisible by pipeline parallel size "
                         f"{pp} x virtual pipeline stages {vpp}")


def transformer_config_from_hf(
    hf_config: transformers.PretrainedConfig,
    sizes: ParallelSizes,
    params_dtype: torch.dtype = torch.float32,
    fp8: Optional[str] = None,
    recompute: bool = False,
    fp8_recipe: str = "tensorwise",
    fp8_amax_reduction: str = "tp",
    moe_token_dispatcher: str = "alltoall",
    sequence_parallel: bool = False,
):
    """The Megatron `TransformerConfig` of an HF model at the given parallel sizes.

    `fp8` ("e4m3" or "hybrid") turns on Transformer Engine FP8 (GPU only) with the scaling
    `fp8_recipe` (default per-tensor current scaling; Megatron's own default, delayed scaling
    with an amax history of 1, quantises the scoring and the update passes of the same weights
    differently) and amaxes reduced over `fp8_amax_reduction` ("tp" or "tp_dp");
    `recompute` recomputes every layer's activations in the backward pass;
    `moe_token_dispatcher` ("alltoall" or "allgather") moves tokens to their experts' ranks;
    `sequence_parallel` splits the activations outside attention and the MLP over the sequence
    on the tensor-parallel ranks (needs TP > 1; `uses_sequence_parallel` says when).
    """
    from megatron.core.transformer import TransformerConfig

    _check_supported(hf_config, "transformer_config_from_hf")
    _check_parallel_sizes(hf_config, sizes)
    if fp8 is not None:
        if fp8 not in FP8_FORMATS:
            raise ValueError(f"fp8={fp8!r}: choose one of {FP8_FORMATS} or None")
        if fp8_recipe not in FP8_SCALING_RECIPES:
            raise ValueError(f"fp8_recipe={fp8_recipe!r}: choose one of {FP8_SCALING_RECIPES}")
        if fp8_amax_reduction not in FP8_AMAX_REDUCTIONS:
            raise ValueError(f"fp8_amax_reduction={fp8_amax_reduction!r}: choose one of "
                             f"{FP8_AMAX_REDUCTIONS}")
        _check_fp8_widths(hf_config, sizes.tensor)
        if not on_gpu():
            raise ValueError(f"fp8={fp8!r} needs Transformer Engine on a GPU; "
                             "this machine has none")
    features = architecture_features(hf_config)
    gpu = on_gpu()
    moe_options = {}
    if features.moe is not None:
        if moe_token_dispatcher not in MOE_TOKEN_DISPATCHERS:
            raise ValueError(f"moe_token_dispatcher={moe_token_dispatcher!r}: choose one of "
                             f"{MOE_TOKEN_DISPATCHERS}")
        moe_options = dict(
            num_moe_experts=features.moe.num_experts,
            moe_ffn_hidden_size=features.moe.ffn_hidden_size,
            moe_router_topk=features.moe.top_k,
            moe_router_score_function="softmax",
            moe_router_pre_softmax=not features.moe.norm_topk_prob,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=features.moe.aux_loss_coeff,
            moe_z_loss_coeff=None,
            moe_token_dispatcher_type=moe_token_dispatcher,
            # Router logits in the model dtype as HF computes them (megatron-core 0.16.1's
            # fp32 router path also needs Transformer Engine).
            moe_router_dtype=None,
            moe_grouped_gemm=False,
            expert_model_parallel_size=sizes.expert,
            expert_tensor_parallel_size=sizes.expert_tensor_size,
        )
        if features.moe.shared_expert_ffn_hidden_size:
            moe_options.update(
                moe_shared_expert_intermediate_size=features.moe.shared_expert_ffn_hidden_size,
                moe_shared_expert_gate=True)
    recompute_options = (dict(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1) if recompute else {})
    return TransformerConfig(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        # Unused by an all-MoE model; Megatron still wants a value.
        ffn_hidden_size=(features.moe.ffn_hidden_size if features.moe is not None
                         else hf_config.intermediate_size),
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=features.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=features.qkv_bias,
        qk_layernorm=features.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        init_method_std=hf_config.initializer_range,
        tensor_model_parallel_size=sizes.tensor,
        pipeline_model_parallel_size=sizes.pipeline,
        virtual_pipeline_model_parallel_size=sizes.virtual_pipeline,
        # forward.run_pipeline pads sequences to a multiple of TP for it
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        fp8=fp8,
        **(dict(fp8_recipe=fp8_recipe, tp_only_amax_red=fp8_amax_reduction == "tp")
           if fp8 is not None else {}),
        # Fused kernels exist only with CUDA (and apex/TE); the local spec on CPU runs unfused.
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        # CPU initialisation makes weights independent of TP (the same seeded full tensor is
        # split), which is also what the tests rely on.
        use_cpu_initialization=not gpu,
        **recompute_options,
        **moe_options,
    )


def _check_fp8_widths(hf_config: transformers.PretrainedConfig, tp: int) -> None:
    """TE's FP8 GEMMs need every input's last dimension divisible by 16
    (`transformer_engine/pytorch/utils.py:704-714`): the hidden size and the per-rank widths of
    the attention and MLP projections."""
    head_dim = architecture_features(hf_config).head_dim
    widths = {"hidden_size": hf_config.hidden_size,
              "num_attention_heads x head_dim / TP": hf_config.num_attention_heads * head_dim // tp,
              "intermediate_size / TP": hf_config.intermediate_size // tp}
    bad = {name: width for name, width in widths.items() if width % 16}
    if bad:
        raise ValueError(f"FP8 needs GEMM widths divisible by 16; this model at TP={tp} has "
                         + ", ".join(f"{name} = {width}" for name, width in bad.items()))


def _hf_inv_freq(hf_config: transformers.PretrainedConfig, head_dim: int) -> torch.Tensor:
    """The rotary inverse frequencies HF uses for this config (float32, [head_dim / 2])."""
    rope = _rope_parameters(hf_config)
    base = float(rope["rope_theta"])
    # The same expression as HF's `compute_default_rope_parameters` and Megatron's RotaryEmbedding.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope["rope_type"] == "default":
        return inv_freq
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, device="cpu")
    if attention_scaling != 1.0:
        raise ValueError(f"rope_type={rope['rope_type']!r} scales attention by "
                         f"{attention_scaling}; not supported")
    return scaled.float()


def build_model(hf_config: transformers.PretrainedConfig, transformer_config, *,
                local_layers: bool = False) -> list:
    """This rank's `GPTModel` chunks (one per virtual pipeline stage), randomly initialised.

    Vocabulary padded to a multiple of 128 * TP; tied embeddings share the output weight (a copy
    on the last stage when PP > 1). Load weights with `bridge.load_hf_weights`. `local_layers`:
    Megatron's local layer spec (torch layers) on GPU too, for machines without Transformer
    Engine (`core_check`); on CPU it is the only spec.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    _check_supported(hf_config, "build_model")
    features = architecture_features(hf_config)
    # Experts as SequentialMLP (per-expert linears, the same parameter names on both faces);
    # grouped GEMM is a GPU speed-up not taken yet.
    num_experts = features.moe.num_experts if features.moe is not None else None
    if local_layers and transformer_config.fp8:
        raise ValueError("FP8 needs Transformer Engine's layer spec, not the local one")
    local_spec = not on_gpu() or local_layers
    if not local_spec:
        from megatron.core.models.gpt import gpt_layer_specs
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        if not gpt_layer_specs.HAVE_TE:  # TE missing, or its import failed (CUDA / torch ABI)
            raise RuntimeError(
                "build_model on GPU uses Transformer Engine's layer spec, but megatron.core "
                "could not import transformer_engine: `python -c 'import "
                "transformer_engine.pytorch'` shows why (docs/gpu.md)")
        layer_spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=features.qk_norm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        from megatron_intuitor.models.local_norm import local_block_spec
        from megatron_intuitor.models.packed_attention import with_packed_core_attention

        # The local core attention refuses packed (THD) sequences; ours takes both layouts.
        # The local norms refuse sequence parallelism; `local_block_spec`'s run it.
        layer_spec = with_packed_core_attention(get_gpt_layer_local_spec(
            num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=features.qk_norm,
            normalization="RMSNorm"))
    rope = _rope_parameters(hf_config)
    # Megatron's own llama3 scaling hard-codes original_max_position_embeddings=8192 and the
    # low/high frequency factors 1 and 4; the flag is kept for its metadata, and the exact
    # frequencies of this config are installed below.
    llama3 = rope["rope_type"] == "llama3"
    inv_freq = _hf_inv_freq(hf_config, features.head_dim)
    vpp = transformer_config.virtual_pipeline_model_parallel_size
    chunks = []
    for stage in (range(vpp) if vpp else [None]):
        model = GPTModel(
            config=transformer_config,
            transformer_layer_spec=(local_block_spec(layer_spec, transformer_config, stage)
                                    if local_spec else layer_spec),
            vocab_size=padded_vocab_size(hf_config.vocab_size,
                                         transformer_config.tensor_model_parallel_size),
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                               vp_stage=stage),
            share_embeddings_and_output_weights=features.tied_embeddings,
            position_embedding_type="rope",
            rotary_base=float(rope["rope_theta"]),
            rope_scaling=llama3,
            rope_scaling_factor=float(rope.get("factor", 8.0)),
            vp_stage=stage,
        )
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
        chunks.append(model)
    return chunks
