"""Run a function on N local processes joined in one gloo/NCCL group: the multi-rank harness of
`tools/convert_ckpt.py`, the tests and the benchmarks (the trainer itself uses Ray, not this)."""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_intuitor.platform import on_gpu

# Ranks fork from multiprocessing's forkserver, one process per session that imported these
# once: a spawned rank spent ~5 CPU-s importing torch, Megatron-Core and our model code, ~3 more
# on Megatron's MoE utilities (the CPU adaptation patches them) and ~4 on vLLM's engine before
# its first line. Only on the CPU face: on CUDA an import may touch the device, and a forked
# child cannot use a device its parent initialised.
CPU_PRELOAD = ["megatron_intuitor.workers.actor", "megatron_intuitor.rollout.engine",
               "megatron.core.transformer.moe.moe_utils", "transformers", "vllm.entrypoints.llm"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple,
            results: Any) -> None:
    # One thread per rank: on a 2-core machine more threads per rank only oversubscribe.
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    from megatron_intuitor import parallel

    try:
        parallel.init_torch_distributed(rank, world_size, master_port=port)
        # pickled here, by value: the manager's pickler would share each tensor's storage
        # through a file descriptor, and a result of many tensors exceeds a user's usual limit
        # of 1024 open files
        results[rank] = ("ok", pickle.dumps(fn(rank, world_size, *args)))
    except BaseException:  # report any failure to the parent with its traceback
        results[rank] = ("error", traceback.format_exc())
    finally:
        parallel.destroy()


def _join_or_abort(procs: list, results: Any, grace_s: float = 10.0) -> None:
    """Join all ranks; once one has failed, give the others `grace_s` then kill them (a rank
    that died leaves its peers blocked in a collective forever)."""
    failed_at = None
    while any(proc.is_alive() for proc in procs):
        for proc in procs:
            proc.join(timeout=0.2)
        failed = any(status != "ok" for status, _ in results.values()) or any(
            proc.exitcode not in (None, 0) for proc in procs)
        if failed and failed_at is None:
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list:
    """Call `fn(rank, world_size, *args)` on `world_size` new ranks of one thread each; return
    their results. `fn` must be importable (module level)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([] if on_gpu() else CPU_PRELOAD)
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_worker,
                             args=(r, world_size, port, fn, args, results))
                 for r in range(world_size)]
        for proc in procs:
            proc.start()
        _join_or_abort(procs, results)
        collected = [results.get(r, ("error", f"rank {r} exited with code {procs[r].exitcode}"))
                     for r in range(world_size)]
    errors = [f"rank {r}:\n{payload}" for r, (status, payload) in enumerate(collected)
              if status != "ok"]
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    return [pickle.loads(payload) for _, payload in collected]
