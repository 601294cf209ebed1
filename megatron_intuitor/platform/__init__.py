"""Where the code runs: CUDA (the GPU face) or CPU (the development and CI face).

`ensure_platform()` is called once per process before Megatron-Core builds anything. On a
machine with CUDA it does nothing; without CUDA it activates the CPU adaptation in `cpu.py`.
"""
import torch

from megatron_intuitor.platform.cpu import activate_cpu_adaptation, cpu_adaptation_active


def on_gpu() -> bool:
    """True when this process has a CUDA device: NCCL, Transformer Engine and vLLM GPU apply."""
    return torch.cuda.is_available()


def ensure_platform() -> None:
    """Make Megatron-Core usable on this machine (idempotent)."""
    if not on_gpu():
        activate_cpu_adaptation()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


__all__ = ["on_gpu", "ensure_platform", "device", "cpu_adaptation_active"]
