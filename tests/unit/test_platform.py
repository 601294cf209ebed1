"""The CPU adaptation is active exactly when there is no CUDA, and lets Megatron-Core run TP=2
on gloo with the same loss and gradients as one rank. (PP is not compared here: each pipeline
stage draws its layers' initial weights from its own seed, so a PP=2 model is not the one-rank
model; tests/unit/models/test_bridge.py loads one checkpoint at PP=2 and compares with transformers.)"""
import subprocess
import sys

import pytest
import torch

from megatron_intuitor.local_ranks import run_distributed


def _gpt_loss(rank, world_size, tp, pp):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import TransformerConfig

    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(tp, pp), seed=7)
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                               use_cpu_initialization=True, pipeline_dtype=torch.float32,
                               hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=256, max_sequence_length=32,
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)

    def forward_step(_, chunk):
        per_token = chunk(ids, positions, None, labels=ids)
        return per_token, lambda out: (out.float().mean(), {"loss": out.float().mean().detach()})

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
        num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=False)
    # the final norm lives whole on the last stage of every TP rank: its gradient compares as is
    final_norm = model.decoder.final_layernorm.weight.grad.clone() \
        if parallel_state.is_pipeline_last_stage() else None
    return [float(item["loss"]) for item in losses], final_norm


def test_adaptation_is_active_exactly_without_cuda():
    code = ("from megatron_intuitor.platform import cpu_adaptation_active, ensure_platform; "
            "before = cpu_adaptation_active(); ensure_platform(); "
            "print(before, cpu_adaptation_active())")
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
    assert printed == ["False", str(not torch.cuda.is_available())]


@pytest.mark.slow
def test_tensor_parallel_loss_and_gradients_equal_single_rank():
    [(single_losses, single_grad)] = run_distributed(_gpt_loss, 1, 1, 1)
    for losses, final_norm_grad in run_distributed(_gpt_loss, 2, 2, 1):
        assert losses == pytest.approx(single_losses, abs=1e-6)
        torch.testing.assert_close(final_norm_grad, single_grad, rtol=1e-5, atol=1e-7)
    assert single_grad.abs().max() > 0
