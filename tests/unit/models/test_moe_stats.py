"""The update pass's expert load and load-balancing loss of the tiny Qwen3-MoE (one rank, a
training-mode forward, the second row's last tokens padding): tokens per expert equal the counts
of transformers' top-k over its own router logits on the real tokens, and the loss equals
Megatron's formula evaluated in float64 on those logits (E x sum_e f_e P_e: f_e the share of
routed slots, P_e the mean full-softmax probability), padding left out of both."""
import pytest
import torch
import torch.nn.functional as F

from megatron_intuitor import metrics
from megatron_intuitor.local_ranks import run_distributed

TOKENS = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
PADDING = torch.zeros(TOKENS.shape, dtype=torch.bool)
PADDING[1, 19:] = True  # padding follows the real tokens, which causal attention keeps apart


def _measure_on_rank(rank, world_size, model_dir):
    from megatron_intuitor.models.bridge import load_hf_weights
    from megatron_intuitor.models.config import (
        build_model, load_hf_config, transformer_config_from_hf)
    from megatron_intuitor.models.moe_stats import ExpertLoadMeter
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(1, 1), seed=1)
    hf_config = load_hf_config(model_dir)
    chunks = build_model(hf_config, transformer_config_from_hf(hf_config, ParallelSizes(1, 1)))
    load_hf_weights(chunks, model_dir, hf_config)
    meter = ExpertLoadMeter(chunks, hf_config.num_hidden_layers, hf_config.num_experts)
    chunks[0].train()
    chunks[0](TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)  # not counted
    with meter.measuring():
        chunks[0](TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None,
                  padding_mask=PADDING).sum().backward()
    return meter.metrics()


def test_expert_load_and_aux_loss_equal_an_independent_count(tiny_qwen3_moe):
    from transformers import AutoModelForCausalLM

    [logged] = run_distributed(_measure_on_rank, 1, tiny_qwen3_moe)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_moe, dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = model(TOKENS, output_router_logits=True).router_logits
    experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    losses = []
    real = int((~PADDING).sum())
    for layer, logits in enumerate(router_logits, start=1):
        logits = logits.reshape(*TOKENS.shape, experts)[~PADDING].double()
        chosen = logits.topk(top_k, dim=-1).indices
        counts = torch.bincount(chosen.flatten(), minlength=experts).double()
        assert counts.sum() == real * top_k
        assert logged[metrics.moe_tokens_per_expert_max(layer)] == counts.max()
        assert logged[metrics.moe_tokens_per_expert_mean(layer)] == counts.mean()
        share = counts / (real * top_k)
        mean_prob = F.softmax(logits, dim=-1).mean(dim=0)
        losses.append(float(experts * (share * mean_prob).sum()))
    assert counts.max() > counts.mean()  # the loads differ: a max that is the mean proves little
    assert logged[metrics.MOE_AUX_LOSS] == pytest.approx(sum(losses) / len(losses), rel=1e-5)

