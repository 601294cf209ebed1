"""Ray workers: one process per rank of the training world, driven by the single controller.

The package itself imports no Ray (the config check reads `PLACEMENT_STRATEGIES` from here and
must stay cheap); `Worker`, `WorkerGroup` and `WorkerDiedError` load `workers.group` on first
use."""
from typing import Any

# Ray's placement-group strategies (trainer.placement; `WorkerGroup`'s placement)
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

__all__ = ["PLACEMENT_STRATEGIES", "Worker", "WorkerDiedError", "WorkerGroup"]


def __getattr__(name: str) -> Any:
    if name in ("Worker", "WorkerDiedError", "WorkerGroup"):
        from megatron_intuitor.workers import group

        return getattr(group, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
