"""Ray worker groups: ranks form one gloo world, get the rank environment, and a dead or
failing rank is reported by number."""
import os
import signal
import time
from pathlib import Path

import pytest
import ray

from megatron_intuitor.workers import Worker, WorkerDiedError, WorkerGroup
from megatron_intuitor.workers import group as group_module


class _Probe(Worker):
    def __init__(self, tag: str = ""):
        super().__init__()
        self.tag = tag

    def environment(self) -> dict:
        import torch.distributed as dist

        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "OMP_NUM_THREADS", "PROBE_ENV")
        return {**{key: os.environ.get(key) for key in keys}, "backend": dist.get_backend(),
                "dist_rank": dist.get_rank(), "dist_world": dist.get_world_size(),
                "tag": self.tag}

    def all_reduce_rank(self) -> float:
        import torch
        import torch.distributed as dist

        value = torch.tensor([float(self.rank + 1)])
        dist.all_reduce(value)
        return float(value)

    def echo(self, value):
        return (self.rank, value)

    def die_or_all_reduce(self, dying_rank: int) -> float:
        if self.rank == dying_rank:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return self.all_reduce_rank()  # the survivors wait for the dead rank in a collective

    def raise_on(self, failing_rank: int) -> int:
        if self.rank == failing_rank:
            raise ValueError(f"bad batch on rank {self.rank}")
        return self.rank


class _FailsToStart(Worker):
    def __init__(self):
        super().__init__()
        if self.rank == 1:
            raise FileNotFoundError("checkpoint shard missing on rank 1")


@pytest.fixture(scope="module")
def ray_cluster():
    # A private local cluster (never someone's running one); the workers import this module.
    tests_dir = str(Path(__file__).resolve().parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_ranks_form_a_gloo_world_and_failures_name_the_rank(ray_cluster):
    group = WorkerGroup(_Probe, 2, num_cpus_per_worker=1, env={"PROBE_ENV": "passed"},
                        args=("hello",))
    try:
        # all_reduce of (rank + 1) over ranks 0 and 1: 1 + 2 on every rank.
        assert group.execute_all("all_reduce_rank") == [3.0, 3.0]
        envs = group.execute_all("environment")
        assert [env["RANK"] for env in envs] == ["0", "1"]
        assert [env["dist_rank"] for env in envs] == [0, 1]
        assert [env["LOCAL_RANK"] for env in envs] == ["0", "1"]  # one node
        for env in envs:
            assert env["WORLD_SIZE"] == "2" and env["dist_world"] == 2
            assert env["backend"] == "gloo"
            assert env["OMP_NUM_THREADS"] == "1"
            assert env["PROBE_ENV"] == "passed" and env["tag"] == "hello"
            assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == (envs[0]["MASTER_ADDR"],
                                                                envs[0]["MASTER_PORT"])
        assert envs[0]["MASTER_ADDR"] == ray.util.get_node_ip_address()
        assert group.execute_rank0("echo", "x") == (0, "x")
        assert group.execute_per_rank("echo", [("a",), ("b",)]) == [(0, "a"), (1, "b")]

        with pytest.raises(WorkerDiedError, match=r"worker rank 1 raised in worker\.raise_on: "
                                                  r"(.|\n)*bad batch on rank 1"):
            group.execute_all("raise_on", 1)
        assert group.execute_all("echo", 7) == [(0, 7), (1, 7)]  # still usable afterwards

        # Rank 1 is killed while rank 0 waits for it in an all_reduce.
        with pytest.raises(WorkerDiedError,
                           match=r"^worker rank 1 died \(in worker\.die_or_all_reduce\): "):
            group.execute_all("die_or_all_reduce", 1)
    finally:
        group.shutdown()  # rank 0 may still be blocked in the all_reduce
    assert group.actors == []


@pytest.mark.slow
def test_constructor_failure_is_named(ray_cluster):
    with pytest.raises(WorkerDiedError,
                       match=r"worker rank 1 failed to start \(in worker\.ready\): "
                             r"(.|\n)*checkpoint shard missing on rank 1"):
        WorkerGroup(_FailsToStart, 2, num_cpus_per_worker=1)
    # The failed group gave its CPUs and placement group back (released asynchronously).
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


def test_group_larger_than_cluster_fails_at_once(ray_cluster):
    with pytest.raises(RuntimeError, match=r"3 ranks x 1 CPU = 3 CPU needed, the Ray cluster "
                                           r"has 2.0 CPU"):
        WorkerGroup(_Probe, 3, num_cpus_per_worker=1)
    with pytest.raises(RuntimeError, match=r"GPU needed, the Ray cluster has 0 GPU"):
        WorkerGroup(_Probe, 1, num_gpus_per_worker=1)


def test_bad_arguments_are_named(ray_cluster):
    with pytest.raises(TypeError, match="must be a subclass of megatron_intuitor.workers.Worker"):
        WorkerGroup(dict, 2)
    with pytest.raises(ValueError, match="placement 'RANDOM'"):
        WorkerGroup(_Probe, 2, placement="RANDOM")


@pytest.mark.parametrize("visible, assigned, expected", [
    (None, [3], 3),          # all GPUs visible: the physical id is the index
    ("4,5,6,7", ["6"], 2),   # the node exposes a subset: the position in that list
])
def test_local_rank_is_the_assigned_gpu(monkeypatch, visible, assigned, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(group_module.ray, "get_gpu_ids", lambda: assigned)
    assert group_module._assigned_cuda_index() == expected


def test_failure_messages_put_dead_ranks_first():
    from ray.exceptions import ActorDiedError, OutOfMemoryError, RayTaskError

    group = WorkerGroup.__new__(WorkerGroup)  # only the message formatting, no Ray actors
    group.name, group.role = "actor", "training"
    message = group._describe({
        0: RayTaskError("train_step", "Traceback ...", RuntimeError("Connection closed by peer")),
        2: OutOfMemoryError("node memory 95% used"),
        1: ActorDiedError(),
    }, "train_step")
    lines = message.splitlines()
    assert lines[0].startswith("training rank 1 died (in actor.train_step): The actor died "
                               "unexpectedly")
    assert lines[1].startswith("training rank 2 died (killed by Ray's out-of-memory monitor) "
                               "(in actor.train_step): node memory 95% used")
    assert lines[2].startswith("training rank 0 raised in actor.train_step: ")
