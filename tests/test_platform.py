"""The CPU adaptation lets Megatron-Core run TP and PP on gloo with the same numbers as 1 rank."""
import pytest
import torch

from megatron_intuitor.testing import run_distributed


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
    grad_sq = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters()
                  if p.grad is not None)
    return [float(item["loss"]) for item in losses], grad_sq


def test_adaptation_is_cpu_only():
    from megatron_intuitor.platform import cpu_adaptation_active, on_gpu

    assert not on_gpu() or not cpu_adaptation_active()


@pytest.mark.slow
def test_tensor_parallel_loss_equals_single_rank():
    [(single_loss, _)] = run_distributed(_gpt_loss, 1, 1, 1)
    tp_results = run_distributed(_gpt_loss, 2, 2, 1)
    for losses, _ in tp_results:
        assert losses == pytest.approx(single_loss, abs=1e-6)
