"""Ray worker groups: one Ray actor per rank of a torch.distributed world (gloo on CPU, NCCL on
GPU), placed with a placement group, driven from the single controller.

    group = WorkerGroup(ActorWorker, world_size=8, num_gpus_per_worker=1, args=(cfg_dict,))
    losses = group.execute_all("train_step", batch)      # every rank, results in rank order
    group.shutdown()

A worker class subclasses `Worker`: its constructor joins the process group (so `__init__` of the
subclass runs with torch.distributed ready, e.g. to build Megatron models and the vLLM engine,
which must come after `init_process_group`).
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import ray
from ray.exceptions import OutOfMemoryError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                            PlacementGroupSchedulingStrategy)

from megatron_intuitor.workers import PLACEMENT_STRATEGIES

# With this set, Ray leaves CUDA_VISIBLE_DEVICES alone: every worker sees all GPUs of its node and
# picks its own with LOCAL_RANK, as under torchrun (what Megatron, NCCL and vLLM's
# external_launcher expect), instead of seeing one GPU renumbered to 0.
_NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


# The run's log file (set by the trainer): every rank appends its stdout and stderr to it (vLLM,
# Megatron and Ray output), so that the console shows only the trainer's lines.
WORKER_LOG_ENV = "MEGATRON_INTUITOR_WORKER_LOG"


def _redirect_output(log_path: str) -> None:
    """Point this process's stdout and stderr (file descriptors 1 and 2, so that C++ and child
    processes follow) at the end of `log_path`."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class WorkerDiedError(RuntimeError):
    """A rank's process died, or its method raised; the message names the rank and its role."""

    step: Optional[int] = None  # the training step in progress, where the trainer knows it


class Worker:
    """Base of every rank. The environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK, LOCAL_WORLD_SIZE) comes from WorkerGroup; constructing the worker joins the
    default process group through `megatron_intuitor.parallel`. On GPU, LOCAL_RANK becomes the
    index of the GPU Ray assigned to this rank among the node's visible GPUs (torchrun's
    meaning), so `torch.cuda.set_device(LOCAL_RANK)` selects it."""

    def __init__(self) -> None:
        import torch

        from megatron_intuitor import parallel
        from megatron_intuitor.lifetime import die_with_parent_on_fork

        if os.environ.get(WORKER_LOG_ENV):
            _redirect_output(os.environ[WORKER_LOG_ENV])
        # Megatron's checkpoint writers (forked per save) must not outlive a killed rank.
        die_with_parent_on_fork()
        # Before anything creates a thread pool: more threads per rank only oversubscribe the
        # cores, and vLLM's CPU worker freezes the count once its engine exists.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            os.environ["LOCAL_RANK"] = str(_assigned_cuda_index())
        parallel.init_torch_distributed(self.rank, self.world_size,
                                        master_addr=os.environ["MASTER_ADDR"],
                                        master_port=int(os.environ["MASTER_PORT"]))

    def ready(self) -> int:
        """Returns the rank; answered once the constructor (and the process group) is done."""
        return self.rank

    def close(self) -> None:
        """Release what outlives a killed process (shared memory); runs just before the kill."""


def _assigned_cuda_index() -> int:
    """The index, among this process's visible CUDA devices, of the GPU Ray assigned to it."""
    gpu_ids = ray.get_gpu_ids()
    if len(gpu_ids) != 1:
        raise RuntimeError(f"a GPU worker needs exactly one GPU from Ray, got {gpu_ids}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return visible.split(",").index(str(gpu_ids[0]))
    return int(gpu_ids[0])


def _rendezvous_address() -> tuple[str, int]:
    """This node's IP and a port free on it: rank 0's node hosts the TCP store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class WorkerGroup:
    """`world_size` Ray actors of `worker_cls` (a `Worker` subclass), one per rank, in one
    placement group of one bundle per rank.

    placement: Ray's strategy. PACK (default) fills one node before the next, so consecutive
    ranks (a tensor-parallel group) share a node; STRICT_PACK insists on one node; SPREAD and
    STRICT_SPREAD spread ranks over nodes. Ranks are numbered node by node, LOCAL_RANK within
    the node. A bundle is {CPU: num_cpus_per_worker} plus {GPU: 1} with num_gpus_per_worker=1.

    env: extra environment of every worker process (e.g. VLLM_ENABLE_V1_MULTIPROCESSING=0);
    OMP_NUM_THREADS defaults to 1. args/kwargs go to every rank's constructor. name appears in
    actor names and messages; role is what its ranks do ("training", "rollout"), the word a
    failure names them by ("rollout rank 0 died ..."); ready_timeout_s bounds the wait for the
    placement group.
    """

    _rank_nodes: Sequence[str] = ()  # the node id of each rank, once placed

    def __init__(self, worker_cls: type, world_size: int, *, placement: str = "PACK",
                 num_cpus_per_worker: float = 1.0, num_gpus_per_worker: int = 0,
                 env: Optional[dict[str, str]] = None, args: Sequence[Any] = (),
                 kwargs: Optional[dict[str, Any]] = None, name: str = "worker",
                 role: str = "worker", ready_timeout_s: float = 300.0) -> None:
        if not (isinstance(worker_cls, type) and issubclass(worker_cls, Worker)):
            raise TypeError(f"worker_cls {worker_cls!r} must be a subclass of "
                            f"megatron_intuitor.workers.Worker")
        if placement not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement {placement!r}: expected one of "
                             f"{', '.join(PLACEMENT_STRATEGIES)}")
        if num_gpus_per_worker not in (0, 1):
            raise ValueError(f"num_gpus_per_worker={num_gpus_per_worker}: a rank drives 0 or 1 GPU")
        if not ray.is_initialized():
            raise RuntimeError("WorkerGroup needs Ray: call ray.init() first")
        self.name, self.role = name, role
        self.world_size = world_size
        self.placement = placement
        bundle = {"CPU": num_cpus_per_worker}
        if num_gpus_per_worker:
            bundle["GPU"] = num_gpus_per_worker
        self._check_fits(bundle)
        # Unnamed: placement group names must be unique, and groups may share a name.
        self._placement_group = placement_group([dict(bundle)] * world_size, strategy=placement)
        self.actors: list = []
        try:
            self._start(worker_cls, bundle, env or {}, args, kwargs or {}, ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _check_fits(self, bundle: dict[str, float]) -> None:
        """Fail now, not after a silent wait, when the cluster cannot hold the group at all."""
        cluster = ray.cluster_resources()
        for resource, amount in bundle.items():
            needed, total = amount * self.world_size, cluster.get(resource, 0)
            if needed > total:
                raise RuntimeError(
                    f"worker group {self.name!r}: {self.world_size} ranks x {amount} {resource} = "
                    f"{needed} {resource} needed, the Ray cluster has {total} {resource}")

    def _start(self, worker_cls: type, bundle: dict[str, float], env: dict[str, str],
               args: Sequence[Any], kwargs: dict[str, Any], ready_timeout_s: float) -> None:
        pg = self._placement_group
        ready, _ = ray.wait([pg.ready()], timeout=ready_timeout_s)
        if not ready:
            raise RuntimeError(
                f"worker group {self.name!r}: the placement group of {self.world_size} x "
                f"{bundle} (strategy {self.placement}) was not scheduled within "
                f"{ready_timeout_s:.0f} s; available resources: {ray.available_resources()}")
        # Bundles grouped by node, in order of each node's first bundle: ranks count node by node.
        bundle_nodes = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        node_order = list(dict.fromkeys(bundle_nodes[i] for i in range(self.world_size)))
        bundles = sorted(range(self.world_size),
                         key=lambda i: (node_order.index(bundle_nodes[i]), i))
        self._rank_nodes = [bundle_nodes[i] for i in bundles]
        master_addr, master_port = self._rendezvous_on(bundle_nodes[bundles[0]])
        remote_cls = ray.remote(worker_cls)
        local_ranks: dict[str, int] = {}
        for rank, bundle_index in enumerate(bundles):
            node = bundle_nodes[bundle_index]
            local_ranks[node] = local_ranks.get(node, -1) + 1
            forwarded = {WORKER_LOG_ENV: os.environ[WORKER_LOG_ENV]} \
                if os.environ.get(WORKER_LOG_ENV) else {}
            rank_env = {"OMP_NUM_THREADS": "1", **forwarded, **env,
                        "RANK": str(rank), "WORLD_SIZE": str(self.world_size),
                        "LOCAL_RANK": str(local_ranks[node]),
                        "LOCAL_WORLD_SIZE": str(sum(n == node for n in bundle_nodes.values())),
                        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port)}
            if "GPU" in bundle:
                rank_env[_NOSET_CUDA_VISIBLE_DEVICES] = "1"
            self.actors.append(remote_cls.options(
                name=f"{self.name}_rank{rank}_{pg.id.hex()[:8]}",
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=bundle_index),
                runtime_env={"env_vars": rank_env},
            ).remote(*args, **kwargs))
        self.execute_all("ready")  # surfaces constructor failures with their rank

    @staticmethod
    def _rendezvous_on(node_id: str) -> tuple[str, int]:
        """Address and free port on rank 0's node: asked here when that is the driver's node
        (saves starting a process), else by a zero-CPU task pinned to that node."""
        if node_id == ray.get_runtime_context().get_node_id():
            return _rendezvous_address()
        return ray.get(ray.remote(_rendezvous_address).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
        ).remote())

    def execute_all(self, method: str, *args: Any, **kwargs: Any) -> list:
        """Call `method(*args, **kwargs)` on every rank; their results in rank order."""
        return self._gather([getattr(actor, method).remote(*args, **kwargs)
                             for actor in self.actors], method)

    def execute_per_rank(self, method: str, per_rank_args: Sequence[Sequence[Any]]) -> list:
        """Call `method(*per_rank_args[r])` on each rank r; results in rank order."""
        return self.gather(self.submit_per_rank(method, per_rank_args), method)

    def submit_per_rank(self, method: str, per_rank_args: Sequence[Sequence[Any]]) -> list:
        """`execute_per_rank` without waiting: each rank's Ray reference(s), for `gather`."""
        if len(per_rank_args) != self.world_size:
            raise ValueError(f"per_rank_args has {len(per_rank_args)} entries for "
                             f"{self.world_size} ranks")
        return [getattr(actor, method).remote(*rank_args)
                for actor, rank_args in zip(self.actors, per_rank_args)]

    def gather(self, refs: list, method: str) -> list:
        """The results of one reference per rank (rank order), a failure named by its rank."""
        return self._gather(refs, method)

    def execute_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call `method` on rank 0 only (not for collectives: the other ranks would not join)."""
        return self._gather([getattr(self.actors[0], method).remote(*args, **kwargs)], method)[0]

    def _gather(self, refs: list, method: str, grace_s: float = 10.0) -> list:
        """Results of `refs` (one per rank, in rank order). When a rank fails, its peers are
        typically stuck in a collective with it, so do not wait for them: collect what else
        fails within `grace_s` (a death makes the peers' collectives fail too) and raise,
        naming the ranks that died before those that merely raised."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending, failures = list(refs), {}
        deadline = None
        while pending and (deadline is None or time.monotonic() < deadline):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            for ref in done:
                try:
                    ray.get(ref)
                except RayError as error:
                    failures[rank_of[ref]] = error
                    deadline = deadline or time.monotonic() + grace_s
        if failures:
            raise WorkerDiedError(self._describe(failures, method)) from next(
                iter(failures.values()))
        return ray.get(refs)

    def _describe(self, failures: dict[int, Exception], method: str) -> str:
        # RayTaskError: the method raised; any other RayError (actor died, killed by Ray's
        # out-of-memory monitor, node lost) means the process is gone.
        died = sorted(rank for rank, error in failures.items()
                      if not isinstance(error, RayTaskError))
        raised = sorted(rank for rank in failures if rank not in died)
        lines = [f"{self.role} rank {rank} {_how_it_died(failures[rank])} (in "
                 f"{self.name}.{method}): {_first_lines(failures[rank])}" for rank in died]
        lines += [f"{self.role} rank {rank} raised in {self.name}.{method}: "
                  f"{_first_lines(failures[rank])}" for rank in raised]
        if died and self._rank_nodes:  # a multi-node run names the machines of the dead ranks
            nodes = _node_states()
            lines += [self._where(rank, nodes) for rank in died]
        return "\n".join(lines)

    def _where(self, rank: int, nodes: dict[str, dict]) -> str:
        node_id = self._rank_nodes[rank]
        node = nodes.get(node_id, {})
        state = "alive" if node.get("Alive") else "lost: Ray marked the node dead"
        return (f"{self.role} rank {rank} was on node {node_id} "
                f"({node.get('NodeManagerAddress', '?')}, {state})")

    def shutdown(self, close_timeout_s: float = 10.0) -> None:
        """Let every rank `close` (ranks stuck in a collective never get to it: they are not
        waited for beyond `close_timeout_s`), then kill every rank and free the placement
        group."""
        if self.actors:
            ray.wait([actor.close.remote() for actor in self.actors],
                     num_returns=len(self.actors), timeout=close_timeout_s)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._placement_group is not None:
            remove_placement_group(self._placement_group)
            self._placement_group = None

    def __enter__(self) -> "WorkerGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _node_states() -> dict[str, dict]:
    """Ray's view of every node it knows, by node id (dead nodes included, marked Alive=False);
    empty when Ray cannot say."""
    try:
        return {node["NodeID"]: node for node in ray.nodes()}
    except Exception:  # the GCS itself may be gone with the node: name the rank without it
        return {}


def _how_it_died(error: Exception) -> str:
    if getattr(error, "actor_init_failed", False):
        return "failed to start"
    if isinstance(error, OutOfMemoryError):
        return "died (killed by Ray's out-of-memory monitor)"
    return "died"


def _first_lines(error: Exception, limit: int = 30) -> str:
    """An error's message, cut to `limit` lines (Ray errors carry whole tracebacks)."""
    lines = str(error).strip().splitlines()
    return "\n".join(lines[:limit] + ([f"... ({len(lines) - limit} more lines)"]
                                      if len(lines) > limit else []))
