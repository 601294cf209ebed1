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


def test_orphaned_shm_segments_are_removed_only_when_unmapped_and_old(tmp_path):
    from megatron_intuitor.lifetime import remove_orphaned_shm

    names = ["-tp:0-[0-1]-cpushm_0", "-tp:0-[0-1]-cpushm_1", "-tp:1-[0-1]-cpushm_0", "psm_1234"]
    mapped_old, orphan_old, orphan_new, other = (tmp_path / name for name in names)
    for path in (mapped_old, orphan_old, orphan_new, other):
        path.write_bytes(b"\0" * 4096)
    hour_ago = time.time() - 3600
    for path in (mapped_old, orphan_old, other):
        os.utime(path, (hour_ago, hour_ago))
    holder = subprocess.Popen(  # a live process with mapped_old mapped
        [sys.executable, "-c", "import mmap, sys, time\n"
         f"f = open({str(mapped_old)!r}, 'r+b'); m = mmap.mmap(f.fileno(), 4096)\n"
         "print('mapped', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        assert remove_orphaned_shm(tmp_path) == [orphan_old]
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mapped_old.name, orphan_new.name, other.name])
