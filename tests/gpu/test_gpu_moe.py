"""Mixture-of-experts training through Transformer Engine on 2 GPUs: the tiny Qwen3-MoE in fp32 at
TP=2 x EP=2 (ETP=1: each GPU holds 4 whole experts), sequence parallel (TE's norms and linears,
Megatron's all-to-all token dispatcher over NCCL), as `load_policy` builds the trainer's policy:
packed scores equal transformers', then one PPO-like update (log-prob loss, Megatron DDP +
distributed optimizer) takes a finite step that lowers the loss.

NEVER RAN: written on a machine without GPUs (the CPU face runs the same layout with the local
spec: tests/unit/models/test_bridge.py, tests/unit/test_scoring.py, tests/e2e/test_moe_run.py).
Skipped with fewer than 2 GPUs; its own processes (no engine), so scripts/gpu_smoke.sh may run
it next to the single-GPU files."""
from __future__ import annotations

import pytest
import torch

from megatron_intuitor.core_check import random_batch, transformers_scores
from megatron_intuitor.local_ranks import run_distributed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

TEMPERATURE = 1.0


def _train_on_rank(rank, world_size, model_dir, ids, attention, response):
    from megatron_intuitor.batch import MicroBatching
    from megatron_intuitor.models.forward import (micro_batches, run_pipeline, score_batch,
                                                  shifted_token_scores)
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.models.policy import load_policy
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs, to compare with transformers
    sizes = ParallelSizes(2, expert=2, expert_tensor=1)
    init_model_parallel(sizes, seed=1)
    hf_config, chunks = load_policy(model_dir, sizes)
    module_types = {type(m).__name__ for m in chunks[0].modules()}
    batching = MicroBatching(micro_batch_size=2, packed=True)
    scores = score_batch(chunks, ids, attention, response, temperature=TEMPERATURE,
                         vocab_size=hf_config.vocab_size, batching=batching)["log_probs"]
    chunks, optimizer = build_optimizer(chunks, lr=1e-3)
    lengths = attention.sum(dim=1)
    cut = micro_batches({"input_ids": ids, "response_mask": response}, lengths,
                        batching.partition(lengths))

    def loss_head(logits_shard, micro_batch):
        token = shifted_token_scores(logits_shard, micro_batch["input_ids"],
                                     temperature=TEMPERATURE, vocab_size=hf_config.vocab_size)
        loss = -(token.log_probs * micro_batch["response_mask"]).sum()
        return loss, {"loss": loss.detach()}

    losses = []
    for _ in range(2):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        stats = run_pipeline(chunks, cut, loss_head, forward_only=False, packed=True)
        losses.append(float(sum(item["loss"] for item in stats)))
        ok, grad_norm, _ = optimizer.step()
    return {"sequence_parallel": chunks[0].config.sequence_parallel,
            "te": "TEDotProductAttention" in module_types, "scores": scores.cpu(),
            "ok": ok, "grad_norm": float(grad_norm), "losses": losses}


def test_moe_trains_sequence_parallel_at_tp2_ep2_through_transformer_engine(tmp_path):
    from megatron_intuitor.models.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "qwen3_moe", arch="qwen3_moe", vocab_size=1003,
                                num_layers=4)
    ids, attention, response = random_batch([21, 14, 33, 9], prompt_len=5)  # odd lengths
    ranks = run_distributed(_train_on_rank, 2, str(model_dir), ids, attention, response)
    reference = transformers_scores(model_dir, ids, attention, TEMPERATURE)["log_probs"].cpu()
    for result in ranks:
        assert result["sequence_parallel"] and result["te"]
        diff = (result["scores"] - reference)[response].abs().max()
        assert diff < 1e-3, f"max |log-prob diff| {diff}"
        assert result["ok"] and 0 < result["grad_norm"] < float("inf")
        assert result["losses"][1] < result["losses"][0]
