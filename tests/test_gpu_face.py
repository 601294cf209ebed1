"""The GPU face's decisions, isolated and checked on CPU (issue 10): what would otherwise only
fail on a GPU's first contact. The GPU itself is exercised by tests/gpu/ (marker `gpu`)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_intuitor.rollout import engine as engine_module


class _FakeLLM:
    """Records `vllm.LLM`'s arguments; its one worker holds a model on `device`."""

    created: list = []

    def __init__(self, model: str, **options) -> None:
        self.options = options
        _FakeLLM.created.append(self)

    def collective_rpc(self, fn, args=()):
        parameter = SimpleNamespace(device=_FakeLLM.device)
        model = SimpleNamespace(parameters=lambda: iter([parameter]))
        worker = SimpleNamespace(model_runner=SimpleNamespace(get_model=lambda: model))
        return [fn(worker, *args)]


@pytest.fixture
def faked_cuda(monkeypatch, tiny_qwen2):
    """The engine module believes it runs on GPU 3 of a node (LOCAL_RANK 3, global rank 11)."""
    monkeypatch.setattr(engine_module, "on_gpu", lambda: True)
    monkeypatch.setattr(engine_module, "_import_vllm", lambda: SimpleNamespace(LLM=_FakeLLM))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (60 * gib, 80 * gib))
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "11")
    _FakeLLM.created.clear()
    _FakeLLM.device = torch.device("cuda", 3)
    return tiny_qwen2


@pytest.mark.parametrize("tp", [1, 2])
def test_gpu_engine_uses_external_launcher_at_every_tp(faked_cuda, tp):
    """Defect 1: at TP=1 vLLM's default single-process executor puts the engine on cuda:0; on
    GPU every engine is built with external_launcher (cuda:LOCAL_RANK), with sleep mode and
    CUDA graphs."""
    engine_module.RolloutEngine(faked_cuda, max_model_len=64, tensor_parallel_size=tp,
                                gpu_memory_utilization=0.5)
    options = _FakeLLM.created[-1].options
    assert options["distributed_executor_backend"] == "external_launcher"
    assert options["tensor_parallel_size"] == tp
    assert options["enable_sleep_mode"] is True and options["enforce_eager"] is False
    assert "kv_cache_memory_bytes" not in options


def test_cpu_engine_keeps_single_process_executor_at_tp1():
    options = engine_module.engine_options(
        gpu=False, dtype=torch.float32, max_model_len=64, tensor_parallel_size=1,
        gpu_memory_utilization=0.5, seed=0, cpu_kv_cache_gib=0.5, enforce_eager=None,
        engine_kwargs=None)
    assert "distributed_executor_backend" not in options
    assert options["kv_cache_memory_bytes"] == 2**29 and options["enforce_eager"] is True


def test_gpu_engine_on_another_device_is_refused(faked_cuda):
    _FakeLLM.device = torch.device("cuda", 0)
    with pytest.raises(RuntimeError, match=r"cuda:0.*cuda:3"):
        engine_module.RolloutEngine(faked_cuda, max_model_len=64)


def test_gpu_engine_refuses_local_rank_not_the_current_device(faked_cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=0 but the current CUDA device is 3"):
        engine_module.RolloutEngine(faked_cuda, max_model_len=64)
    assert not _FakeLLM.created  # refused before vLLM starts


def test_gpu_memory_check_keeps_the_training_reserve(faked_cuda):
    """Defect 6: 60 GiB free, 10 GiB still to come for the optimizer state: a 0.7 share
    (56 GiB) no longer fits and the message gives the share that does (0.61)."""
    with pytest.raises(ValueError, match=r"gpu_memory_utilization=0.7 .* at most 0.61"):
        engine_module.RolloutEngine(faked_cuda, max_model_len=64, gpu_memory_utilization=0.7,
                                    reserved_gpu_bytes=10 * 2**30)
    engine_module.RolloutEngine(faked_cuda, max_model_len=64, gpu_memory_utilization=0.6,
                                reserved_gpu_bytes=10 * 2**30)
