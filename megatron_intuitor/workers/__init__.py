"""Ray workers: one process per rank of the training world, driven by the single controller."""
from megatron_intuitor.workers.group import Worker, WorkerDiedError, WorkerGroup

__all__ = ["Worker", "WorkerDiedError", "WorkerGroup"]
