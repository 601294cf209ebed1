"""Nothing a run forks outlives it: children forked after `die_with_parent_on_fork` die with
their parent when it is SIGKILLed; without it they live on (the control)."""
import os
import signal
import subprocess
import sys
import time

import pytest

PARENT = """
import multiprocessing, sys, time
from megatron_intuitor.lifetime import die_with_parent_on_fork
if sys.argv[1] == "1":
    die_with_parent_on_fork()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
child.start()
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _orphan_after_parent_killed(install: bool) -> tuple[int, bool]:
    """Fork a sleeping child in a parent process, SIGKILL the parent; is the child alive 3 s
    later?"""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, "1" if install else "0"],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 3
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, _alive(child)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_forked_children_die_with_their_parent():
    child, alive = _orphan_after_parent_killed(install=False)
    assert alive  # the control: an orphan lives on by default
    os.kill(child, signal.SIGKILL)
    child, alive = _orphan_after_parent_killed(install=True)
    assert not alive
