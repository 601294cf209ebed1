"""Processes that must not outlive the process that made them.

A rank killed with SIGKILL (the driver killed, the OOM killer, a node agent) cannot clean up;
whatever it forked keeps running: Megatron's checkpoint writer processes (forked per file
bucket during a save) would finish or hang on their queues, holding memory and the resource
tracker's pipe. `die_with_parent_on_fork()` makes every process this one forks from Python
(`os.fork`, multiprocessing's fork context) ask the kernel for SIGKILL when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`). `remove_orphaned_shm` deletes, at start, the shared-memory
segments of a run killed before it could unlink them.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_forking_pid = 0  # the pid that is forking, recorded just before the fork
_installed = False


def die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux); exits at once if the parent is
    already gone (it may die between the fork and this call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent()
    if os.getppid() != _forking_pid:  # the parent died before the kernel could be told
        os._exit(1)


def die_with_parent_on_fork() -> None:
    """From now on, every child this process forks is killed when this process dies. Only on
    Linux (elsewhere a no-op); idempotent. The signal is tied to the forking thread: a child
    forked by a thread that ends before it would be killed, so fork from long-lived threads
    (Megatron's writers are forked and joined within one save call)."""
    global _installed
    if _installed or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True


# vLLM-CPU names its tensor-parallel segments after the group only (`-tp:0-[0-1]-cpushm_0`), the
# same in every run: one left by a run killed while its engine was starting makes the next
# engine fail with EEXIST. (Once every rank has mapped them the engine unlinks the names.)
VLLM_CPU_SHM_PATTERN = "*cpushm_*"
# A segment younger than this may belong to an engine being built right now (created, not yet
# mapped by all of its ranks).
STALE_AFTER_SECONDS = 60.0


def remove_orphaned_shm(shm_dir: Path = Path("/dev/shm"), pattern: str = VLLM_CPU_SHM_PATTERN,
                        stale_after_s: float = STALE_AFTER_SECONDS) -> list[Path]:
    """Delete the segments matching `pattern` that no live process maps and that are older than
    `stale_after_s` (their creator, which mapped them, is gone); returns what was deleted.
    Only the memory maps this user may read are seen (not another user's processes, nor a
    sandbox's init): the ranks of a run, which map its segments, always are."""
    candidates = [path for path in shm_dir.glob(pattern)
                  if time.time() - path.stat().st_mtime > stale_after_s]
    if not candidates:
        return []
    mapped = _mapped_paths()
    removed = []
    for path in candidates:
        if str(path) not in mapped:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _mapped_paths() -> set[str]:
    """Every file some live process maps, from the /proc/<pid>/maps this user may read."""
    mapped: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)
                    if len(fields) == 6:
                        mapped.add(fields[5].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return mapped
