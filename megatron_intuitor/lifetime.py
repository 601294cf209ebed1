"""Processes that must not outlive the process that made them.

A rank killed with SIGKILL (the driver killed, the OOM killer, a node agent) cannot clean up;
whatever it forked keeps running: Megatron's checkpoint writer processes (forked per file
bucket during a save) would finish or hang on their queues, holding memory and the resource
tracker's pipe. `die_with_parent_on_fork()` makes every process this one forks from Python
(`os.fork`, multiprocessing's fork context) ask the kernel for SIGKILL when its parent dies
(Linux `prctl(PR_SET_PDEATHSIG)`).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

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
