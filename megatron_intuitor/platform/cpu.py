"""Megatron-Core on a machine without CUDA. Active only when `torch.cuda.is_available()` is False.

Megatron-Core 0.16 hard-codes CUDA in ~150 places (`device="cuda"`, `torch.cuda.current_device()`,
`.cuda()`, `pin_memory=True`, the CUDA RNG tracker, `param.type()` checks in the optimizer).
Rather than patching each call site, this module:

1. pushes a `TorchFunctionMode` that rewrites every CUDA device argument to CPU, turns
   `Tensor.cuda()` / `Tensor.pin_memory()` into no-ops and drops `pin_memory=` (about 1 us per
   torch call, negligible next to the kernels);
2. gives `torch.cuda` the few process-level functions Megatron calls (`current_device`,
   `synchronize`, memory statistics, RNG state) with CPU meanings: the RNG tracker of
   `megatron.core.tensor_parallel.random` then forks the CPU generator, so tensor-parallel
   dropout streams stay distinct per TP rank exactly as on GPU;
3. gives `torch.cuda.Stream` / `current_stream` / `stream` no-op stand-ins (the MoE token
   dispatcher's side stream), defines the `te_general_gemm = None` the MoE router tests
   for (megatron-core 0.16.1 leaves it undefined without Transformer Engine) and gathers the
   dispatcher's parts of different lengths, which gloo's `all_gather` refuses;
4. makes the optimizer's `param.type() == "torch.cuda.FloatTensor"` checks accept CPU tensors.

The GPU path never imports anything from here.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_LOCK = threading.Lock()


def _to_cpu_device(value: Any) -> Any:
    if isinstance(value, torch.device):
        return torch.device("cpu") if value.type == "cuda" else value
    if isinstance(value, str) and value.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cpu")  # a bare int device means cuda:<int> in torch
    return value


_TENSOR_NOOPS = {torch.Tensor.cuda, torch.Tensor.pin_memory}
# A mode is popped while its __torch_function__ runs, so everything a backward pass executes in
# Python (activation recomputation under `recompute=True`, gradient hooks) would run without it.
_AUTOGRAD_ENTRY_POINTS = {torch.Tensor.backward, torch.autograd.backward, torch.autograd.grad}


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch function called while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TENSOR_NOOPS:
            return args[0]
        if func in _AUTOGRAD_ENTRY_POINTS:
            with self:  # keep the mode on for the backward pass itself (torch's documented way)
                return torch.overrides.redispatch_function(func, types, args, kwargs)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        if func is torch.distributed.all_to_all_single:
            # Megatron's token dispatcher moves its split sizes to the host as numpy arrays only
            # when they are CUDA tensors; on CPU they stay tensors, which c10d refuses.
            for key in ("output_split_sizes", "input_split_sizes"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = kwargs[key].tolist()
        if func is torch.distributed.all_gather and _uneven_parts(*args, **kwargs):
            return _all_gather_uneven(*args, **kwargs)
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _uneven_parts(tensor_list, tensor, group=None, async_op=False) -> bool:
    return not async_op and len({part.shape for part in tensor_list}) > 1


def _all_gather_uneven(tensor_list, tensor, group=None, async_op=False) -> None:
    """`all_gather` into parts of different lengths (dim 0), which NCCL takes and gloo refuses
    ("invalid tensor size"): Megatron's all-to-all token dispatcher gathers each rank's routed
    tokens over the expert-tensor-parallel group so. Gathers the parts zero-padded to the
    longest, then keeps each part's own rows."""
    longest = max(part.shape[0] for part in tensor_list)
    padded = tensor.new_zeros(longest, *tensor.shape[1:])
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(gathered, padded, group=group)
    for part, received in zip(tensor_list, gathered):
        part.copy_(received[:part.shape[0]])


# Type strings Megatron compares `param.type()` against; on CPU the tensors report torch.*Tensor.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _tensor_type_as_cuda(self: torch.Tensor, dtype=None, *args, **kwargs):
    if dtype is None and not args and not kwargs:
        name = _ORIGINAL_TENSOR_TYPE(self)
        return _CUDA_TYPE_NAMES.get(name, name)
    return _ORIGINAL_TENSOR_TYPE(self, dtype, *args, **kwargs)


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _cpu_rng_state(device: Any = "cuda", *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _seed_cpu_generator(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse here.
    torch.default_generator.manual_seed(int(seed))


class _CpuStream:
    """A stand-in for `torch.cuda.Stream` (and Event): CPU work is ordered, so waiting and
    synchronising are no-ops. Megatron's all-to-all token dispatcher creates one to copy routing
    counts device-to-host on the side."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream: "_CpuStream") -> None:
        pass

    def record_event(self, event=None) -> "_CpuStream":
        return self

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = lambda seed: None
    for stat in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, stat, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.Stream = _CpuStream
    cuda.current_stream = lambda *a, **k: _CPU_STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    # These two bypass torch.cuda.get/set_rng_state via torch._C internals on GPU.
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state


def _patch_megatron_moe() -> None:
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16.1 imports `te_general_gemm` only with Transformer Engine but tests it
    # for None in the router's gating linear: without TE the router raises NameError.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def activate_cpu_adaptation() -> None:
    """Install the CPU adaptation in this process (idempotent; refuses on a CUDA machine)."""
    global _ACTIVE
    if torch.cuda.is_available():
        raise RuntimeError("The CPU adaptation of Megatron-Core must not run on a CUDA machine.")
    with _LOCK:
        if _ACTIVE:
            return
        _patch_torch_cuda()
        torch.Tensor.type = _tensor_type_as_cuda
        _patch_megatron_rng()
        _patch_megatron_moe()
        # Never exited: the mode stays on this process's torch-function stack for its lifetime.
        CudaToCpuMode().__enter__()
        _ACTIVE = True


def cpu_adaptation_active() -> bool:
    return _ACTIVE
