"""Tiny Hugging Face checkpoints made locally (no model can be downloaded here): a byte-level BPE
tokenizer trained on the synthetic arithmetic corpus, with a Qwen-style chat template, and a
randomly initialised Qwen2 / Llama / Qwen3 / Qwen3-MoE / Qwen2-MoE model saved as safetensors.

Used by the tests, the benchmarks and the embedded `tiny` default."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5-0.5B's widths (hidden 896, 14 query / 2 key-value heads of 64, FFN 4864, vocabulary
# 151936, tied embeddings) with 2 layers: the GPU checks' model, full-size where the vocabulary
# and the kernels' shapes matter, small enough to build in seconds.
QWEN25_05B_WIDTHS = dict(arch="qwen2", hidden_size=896, num_layers=2, num_heads=14,
                         num_kv_heads=2, intermediate_size=4864, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=4096)

ARCHITECTURES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
}
MOE_ARCHES = ("qwen3_moe", "qwen2_moe")


def _tokenizer_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    words = ("Let's think step by step and output the final answer within \\boxed{}. "
             "What is the sum of and the product minus plus times divided by equals answer "
             "question system user assistant The result is so therefore first then next").split()
    corpus = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        corpus.append(f"What is {a} {op} {b}? {' '.join(rng.choices(words, k=8))} "
                      f"\\boxed{{{eval(f'{a}{op}{b}')}}}")
    return corpus


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` with Qwen-style special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", bos_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vocab_size: Optional[int] = None,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 1024,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer_vocab_size: int = 512,
    init_std: float = 0.02,
    num_experts: int = 8,
    num_experts_per_tok: int = 2,
    moe_intermediate_size: int = 64,
    shared_expert_intermediate_size: int = 96,
) -> Path:
    """Write a randomly initialised HF checkpoint (config, safetensors, tokenizer) to `out_dir`.

    `vocab_size` (the lm_head width) defaults to the tokenizer's size and may exceed it, as in
    Qwen2.5 (151936 columns for 151665 tokens). head_dim = hidden/heads must be >= 32 for vLLM's
    CPU attention kernels. `num_experts`, `num_experts_per_tok` and `moe_intermediate_size`
    apply to the mixtures of experts (every layer sparse): `qwen3_moe` with `norm_topk_prob` on,
    as in Qwen3-30B-A3B; `qwen2_moe` with it off and a gated shared expert of
    `shared_expert_intermediate_size`, as in Qwen1.5-MoE-A2.7B.
    """
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny-model arch {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(tokenizer_vocab_size)
    vocab = vocab_size or len(tokenizer)
    if vocab < len(tokenizer):
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer ({len(tokenizer)})")
    config_cls, model_cls = (getattr(transformers, name) for name in ARCHITECTURES[arch])
    extra = {}
    if arch == "llama":
        extra["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": max_position_embeddings // 4}
        extra["rope_theta"] = 500000.0
    if arch in ("qwen3", "qwen3_moe"):
        extra["head_dim"] = hidden_size // num_heads
    if arch in MOE_ARCHES:
        extra.update(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                     moe_intermediate_size=moe_intermediate_size,
                     norm_topk_prob=arch == "qwen3_moe")
    if arch == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = shared_expert_intermediate_size
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings, rms_norm_eps=1e-6, initializer_range=init_std,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases so a mapping error cannot hide
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                # A decisive router: with near-ties in the top-k, fp32 rounding differences
                # between implementations could flip an expert choice.
                param.normal_(0.0, 0.5)
            elif name.endswith("mlp.shared_expert_gate.weight"):
                param.normal_(0.0, 0.1)  # sigmoid gates spread over (0, 1), not all ~0.5
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
