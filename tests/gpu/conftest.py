"""The GPU suite's shared state: one process, world size 1 over NCCL, a Qwen2 at Qwen2.5-0.5B
widths made locally (nothing is downloaded), the bf16 policy with its optimizer and one vLLM
engine, built once and shared by the tests of a file in file order (as the actor builds them).

One vLLM engine per process, shut down only at the session's end: vLLM freezes its environment
when a process's first engine starts (so a second engine cannot choose its model runner) and an
engine's shutdown destroys torch.distributed (`vllm/distributed/parallel_state.py`
`cleanup_dist_env_and_memory`), which every Megatron test needs. scripts/gpu_smoke.sh runs each
test file in a process of its own; tests/unit/test_gpu_face.py checks both rules."""
from __future__ import annotations

import os

import pytest
import torch

# Few sequences per step: vLLM captures CUDA graphs for batch sizes up to 2 x max_num_seqs, 7
# sizes here instead of 51 at H100's default of 1024 sequences, each capture costing start-up
# time (`vllm/config/vllm.py` `_set_cudagraph_sizes`).
ENGINE_SETTINGS = dict(max_model_len=512, engine_kwargs={"max_num_seqs": 16})


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from megatron_intuitor.models.tiny import QWEN25_05B_WIDTHS, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen2_05b_shape"), **QWEN25_05B_WIDTHS,
                           dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def world():
    """This process as rank 0 of 1 (NCCL), Megatron at TP = PP = 1."""
    from megatron_intuitor import parallel
    from megatron_intuitor.local_ranks import free_port

    port = free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    parallel.init_torch_distributed(0, 1, master_port=port)
    sizes = parallel.ParallelSizes(1, 1)
    parallel.init_model_parallel(sizes, seed=1)
    yield sizes
    parallel.destroy()


@pytest.fixture(scope="session")
def policy(world, model_dir):
    """(hf_config, DDP chunks, optimizer): the bf16 policy as the actor builds it."""
    from megatron_intuitor.models.optimizer import build_optimizer
    from megatron_intuitor.models.policy import load_policy

    hf_config, chunks = load_policy(model_dir, world, params_dtype=torch.bfloat16)
    chunks, optimizer = build_optimizer(chunks, 1e-5, weight_decay=0.0, clip_grad=1.0)
    return hf_config, chunks, optimizer


@pytest.fixture(scope="session")
def engine(policy, model_dir):
    from megatron_intuitor import parallel
    from megatron_intuitor.models.optimizer import training_reserve_bytes
    from megatron_intuitor.rollout.engine import RolloutEngine

    parallel.warm_up_groups()
    rollout = RolloutEngine(model_dir, dtype=torch.bfloat16, gpu_memory_utilization=0.3, seed=0,
                            reserved_gpu_bytes=training_reserve_bytes(policy[2]),
                            **ENGINE_SETTINGS)
    yield rollout
    rollout.shutdown()


@pytest.fixture(scope="session")
def scored_engine(policy, model_dir):
    """An engine with the sampling-scores processor (`rollout.score_at_sampling`), eager (no
    graphs to capture): V1 model runner, so it must be its process's first engine."""
    from megatron_intuitor import parallel
    from megatron_intuitor.rollout.engine import RolloutEngine

    parallel.warm_up_groups()
    rollout = RolloutEngine(model_dir, dtype=torch.bfloat16, gpu_memory_utilization=0.3, seed=0,
                            score_at_sampling=True, enforce_eager=True, **ENGINE_SETTINGS)
    yield rollout
    rollout.shutdown()


@pytest.fixture(scope="session")
def moe_model_dir(tmp_path_factory):
    """The tiny Qwen3-MoE of the CPU tests (4 layers, 8 experts, top-2), fp32."""
    from megatron_intuitor.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("qwen3_moe"), arch="qwen3_moe",
                           vocab_size=1003, num_layers=4)


@pytest.fixture(scope="session")
def routed_engine(world, moe_model_dir):
    """An fp32 engine of the tiny Qwen3-MoE that returns each token's routed experts
    (`actor.moe_routing_replay=rollout`): vLLM's Model Runner V2, eager."""
    from megatron_intuitor import parallel
    from megatron_intuitor.rollout.engine import RolloutEngine

    parallel.warm_up_groups()
    rollout = RolloutEngine(moe_model_dir, dtype=torch.float32, gpu_memory_utilization=0.3,
                            seed=0, return_routed_experts=True, enforce_eager=True,
                            **ENGINE_SETTINGS)
    yield rollout
    rollout.shutdown()
