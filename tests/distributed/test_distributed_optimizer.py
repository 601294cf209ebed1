"""DP=2 with Megatron DDP + the distributed optimizer takes the same step as one process running
plain autograd + torch Adam on the same global batch: same gradient norm, same updated weights.
The one-process run also checks that full activation recomputation leaves the gradients exact."""
import pytest
import torch
from safetensors.torch import load_file

from megatron_intuitor.local_ranks import run_distributed

GLOBAL_BATCH, SEQ = 4, 16
# Adam's first step moves each weight by lr * g / (|g| + eps): entries whose gradient is near eps
# turn summation-order noise in g into update noise up to lr * noise / eps, so eps is 1e-6 here.
LR, BETAS, EPS, CLIP = 1e-3, (0.9, 0.999), 1e-6, 1.0


def _batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ + 1),
                           generator=torch.Generator().manual_seed(3))
    return tokens[:, :-1], tokens[:, 1:]


def _loaded_model(model_dir, recompute=False):
    from megatron_intuitor.models.bridge import load_hf_weights
    from megatron_intuitor.models.config import (
        build_model, load_hf_config, transformer_config_from_hf)
    from megatron_intuitor.parallel import ParallelSizes, init_model_parallel

    init_model_parallel(ParallelSizes(), seed=1)
    hf_config = load_hf_config(model_dir)
    chunks = build_model(hf_config, transformer_config_from_hf(hf_config, ParallelSizes(),
                                                               recompute=recompute))
    load_hf_weights(chunks, model_dir, hf_config)
    return hf_config, chunks


def _megatron_step(rank, world_size, model_dir):
    """One step of DDP + distributed Adam; this rank sees its 1/world_size of the global batch,
    as two micro-batches (so gradient accumulation across micro-batches is covered too)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.models.optimizer import build_optimizer

    hf_config, chunks = _loaded_model(model_dir)
    ddp_chunks, optimizer = build_optimizer(chunks, LR, betas=BETAS, eps=EPS, clip_grad=CLIP)
    ids, labels = (part.chunk(world_size)[rank] for part in _batch(hf_config.vocab_size))
    microbatches = iter(zip(ids.chunk(2), labels.chunk(2)))
    positions = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, chunk):
        mb_ids, mb_labels = next(data_iterator)
        per_token = chunk(mb_ids, positions, None, labels=mb_labels)
        return per_token, lambda out: (out.mean(), {"loss": out.mean().detach().clone()})

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=microbatches, model=ddp_chunks,
        num_microbatches=2, seq_length=SEQ, micro_batch_size=ids.shape[0] // 2,
        forward_only=False)
    updated, grad_norm, _ = optimizer.step()
    assert updated
    return grad_norm, dict(export_hf_weights(chunks, hf_config))


def _reference_step(rank, world_size, model_dir):
    """The same step without Megatron's DDP/optimizer: autograd on the whole batch, torch Adam."""
    from megatron_intuitor.models.bridge import export_hf_weights

    def gradients(chunk):
        ids, labels = _batch(hf_config.vocab_size)
        chunk(ids, torch.arange(SEQ).unsqueeze(0), None, labels=labels).mean().backward()
        return [param.grad for param in chunk.parameters()]

    hf_config, chunks = _loaded_model(model_dir)
    # Full activation recomputation (the backward re-runs each layer) changes no gradient.
    recomputed = gradients(_loaded_model(model_dir, recompute=True)[1][0])
    grads = gradients(chunks[0])
    recompute_diff = max((a - b).abs().max().item() for a, b in zip(grads, recomputed))
    params = list(chunks[0].parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, CLIP).item()
    torch.optim.Adam(params, lr=LR, betas=BETAS, eps=EPS).step()
    return grad_norm, dict(export_hf_weights(chunks, hf_config)), recompute_diff


@pytest.mark.slow
def test_data_parallel_2_distributed_optimizer_equals_one_process(tiny_qwen2):
    [(reference_norm, reference_weights, recompute_diff)] = run_distributed(
        _reference_step, 1, str(tiny_qwen2))
    assert recompute_diff == 0.0
    ranks = run_distributed(_megatron_step, 2, str(tiny_qwen2))
    assert reference_norm > CLIP  # the clipping path is exercised too
    for grad_norm, weights in ranks:
        assert grad_norm == pytest.approx(reference_norm, rel=1e-5)
        assert weights.keys() == reference_weights.keys()
        for name, expected in reference_weights.items():
            assert torch.allclose(weights[name], expected, rtol=0, atol=1e-6), name
    initial = load_file(str(tiny_qwen2 / "model.safetensors"))
    moved = min((reference_weights[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 100 * 1e-6  # every tensor moved far more than the tolerance
