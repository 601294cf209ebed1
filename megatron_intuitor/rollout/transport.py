"""How the trained weights reach the rollout engines: one interface, three transports, chosen
once by `make_transport`, so that a worker's sync is one call (`transport.push(version)`).

- shard to shard (`shard_sync.ShardSync`): the engine lives on the training rank and is sharded
  like the actor; each rank copies its own shards, no gather.
- streamed (`weight_sync.sync_weights`): the engine lives on the training rank, sharded
  otherwise; full HF tensors, one bucket at a time.
- cross-rank broadcast (`BroadcastSender` / `receive_weights`): the engines have ranks of their
  own (`rollout.placement=separate`). Training rank 0 exports the full HF tensors (every training
  rank takes part in the export's TP gather and PP broadcast) and broadcasts them, cast to the
  rollout dtype, in buckets of at most `bucket_bytes`, over a group spanning it and the rollout
  ranks; each rollout rank loads them in place (the streamed path's checks and reload, then a
  prefix-cache reset). A version number travels in every bucket's header: a receiver refuses a
  transfer that mixes versions, and the engine's version changes only once a transfer is whole.

The cross-rank group is built on its own `TCPStore` (`cross_rank_group`), never from the default
torch.distributed world: the training ranks' world is theirs (TP/PP/DP), and vLLM adopts the
default world of a process that has one (FACTS.md), so the rollout ranks must not join it. gloo
on CPU, NCCL on GPU (the same calls; the NCCL path is in the GPU suite and has never run here).
"""
from __future__ import annotations

import pickle
import time
from datetime import timedelta
from typing import Callable, Iterable, Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_intuitor.rollout.engine import RolloutEngine
from megatron_intuitor.rollout.weight_sync import SyncReport, sync_weights

CROSS_RANK_TIMEOUT = timedelta(minutes=30)  # a training step may run this long between syncs


class WeightTransport(Protocol):
    """The training side of a weight sync: `push(version)` moves the current weights."""

    path: str  # how, for the log

    def push(self, version: int) -> SyncReport: ...


class LocalTransport:
    """Colocated: the engine in this rank's process, filled by `sync` (shards or a stream)."""

    def __init__(self, sync: Callable[[], SyncReport], path: str) -> None:
        self._sync, self.path = sync, path

    def push(self, version: int) -> SyncReport:
        return self._sync()


def make_transport(engine: Optional[RolloutEngine], model_chunks, hf_config, *,
                   bucket_bytes: int, group: Optional[dist.ProcessGroup] = None,
                   rollout_dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> WeightTransport:
    """The transport of a training rank, chosen once: with an engine of its own (colocated),
    shard to shard when the engine is sharded like the actor, else streamed; without one
    (`rollout.placement=separate`), the cross-rank broadcast over `group` (None on training
    ranks other than 0, which only take part in the export)."""
    from megatron_intuitor.models.bridge import export_hf_weights
    from megatron_intuitor.rollout.shard_sync import ShardSync, ShardSyncUnavailable

    def export() -> Iterable[tuple[str, torch.Tensor]]:
        return export_hf_weights(model_chunks, hf_config)

    if engine is None:
        return BroadcastSender(export, group, rollout_dtype, bucket_bytes, device)
    try:
        return LocalTransport(ShardSync.plan(engine, model_chunks, hf_config), "shard to shard")
    except ShardSyncUnavailable as why:
        return LocalTransport(lambda: sync_weights(engine, export(), bucket_bytes=bucket_bytes),
                              f"streams full tensors ({why})")


# ------------------------------------------------------------------------ cross-rank broadcast


def cross_rank_store(host: str, port: int = 0, server: bool = False) -> dist.TCPStore:
    """The rendezvous of a cross-rank group: the server (training rank 0) on `port` (0: a free
    one, read back as `store.port`), the clients connecting to it."""
    return dist.TCPStore(host, port, None, is_master=server, timeout=CROSS_RANK_TIMEOUT,
                         wait_for_workers=False)


def cross_rank_group(store: dist.Store, rank: int, world_size: int,
                     backend: str) -> dist.ProcessGroup:
    """A process group of its own on `store`, outside the default world (blocks until all
    `world_size` ranks joined): gloo, or nccl on GPU."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, CROSS_RANK_TIMEOUT)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    raise ValueError(f"cross-rank group: backend {backend!r}, expected gloo or nccl")


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    group.broadcast([tensor]).wait()  # root 0: training rank 0


def _broadcast_object(group: dist.ProcessGroup, value, device: torch.device):
    """A small picklable value from rank 0 to every rank of `group`."""
    if group.rank() == 0:
        payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    _broadcast(group, size)
    if group.rank() != 0:
        payload = torch.empty(int(size), dtype=torch.uint8)
    payload = payload.to(device)
    _broadcast(group, payload)
    return pickle.loads(payload.cpu().numpy().tobytes()) if group.rank() != 0 else value


class BroadcastSender:
    """Training rank 0's half of the cross-rank sync: `source()` yields (hf_name, full tensor)
    pairs (on every training rank, which all take part in the export); rank 0 broadcasts."""

    path = "cross-rank broadcast"

    def __init__(self, source: Callable[[], Iterable[tuple[str, torch.Tensor]]],
                 group: Optional[dist.ProcessGroup], dtype: torch.dtype, bucket_bytes: int,
                 device: torch.device) -> None:
        if bucket_bytes < 1:
            raise ValueError(f"weight sync: bucket_bytes must be positive, got {bucket_bytes}")
        self._source, self._group = source, group  # group None: a rank that only exports
        self._dtype, self._limit, self._device = dtype, bucket_bytes, device

    def push(self, version: int) -> SyncReport:
        start = time.perf_counter()
        tensors = total = buckets = largest = 0
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        for name, tensor in self._source():
            if self._group is None:
                continue
            tensor = tensor.detach().to(self._dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > self._limit:
                self._send(version, bucket, last=False)
                buckets, largest = buckets + 1, max(largest, size)
                bucket, size = [], 0
            bucket.append((name, tensor))
            size, tensors, total = size + nbytes, tensors + 1, total + nbytes
        if self._group is not None:
            self._send(version, bucket, last=True)
            buckets, largest = buckets + 1, max(largest, size)
        return SyncReport(tensors, total, buckets, largest, time.perf_counter() - start,
                          path="broadcast")

    def _send(self, version: int, bucket: list[tuple[str, torch.Tensor]], last: bool) -> None:
        header = {"version": version, "last": last,
                  "tensors": [(name, tuple(t.shape)) for name, t in bucket]}
        _broadcast_object(self._group, header, self._device)
        flat = (torch.cat([t.flatten() for _, t in bucket]) if bucket
                else torch.empty(0, dtype=self._dtype)).to(self._device)
        _broadcast(self._group, flat)


def _received(group: dist.ProcessGroup, dtype: torch.dtype, device: torch.device,
              versions: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """The broadcast's (hf_name, tensor) pairs, bucket by bucket; every header's version in
    `versions`."""
    while True:
        header = _broadcast_object(group, None, device)
        if versions and header["version"] != versions[0]:
            raise RuntimeError(f"weight sync: a bucket of version {header['version']} inside "
                               f"the transfer of version {versions[0]}")
        versions.append(header["version"])
        numels = [int(torch.Size(shape).numel()) for _, shape in header["tensors"]]
        flat = torch.empty(sum(numels), dtype=dtype, device=device)
        _broadcast(group, flat)
        for (name, shape), piece in zip(header["tensors"], flat.split(numels)):
            yield name, piece.view(shape)
        if header["last"]:
            return


def receive_weights(engine: RolloutEngine, group: dist.ProcessGroup,
                    device: torch.device) -> tuple[int, SyncReport]:
    """A rollout rank's half: the whole broadcast into `engine` in place (the streamed path's
    name/shape checks and reload) -> (the weights' version, report)."""
    versions: list[int] = []
    report = sync_weights(engine, _received(group, engine.dtype, device, versions))
    return versions[0], report
