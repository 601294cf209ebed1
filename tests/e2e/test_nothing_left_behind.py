"""A killed run leaves nothing behind.

- Killed mid-save: the tiny job with rollout TP=2 (vLLM's 24 MB shared-memory broadcaster) and
  a checkpoint per step; when its second save starts, the driver and both ranks get SIGKILL at
  once. Within 20 s no process of the run may remain (Megatron's forked checkpoint writers and
  the resource tracker included) and no /dev/shm file that the run's processes had mapped may
  still exist; the killed save is never taken as a checkpoint.
- A rollout rank killed mid-generation (`rollout.placement=separate`, one step off-policy): the
  run stops by itself (exit 1), naming the rollout rank, what it was doing and the step, and the
  checkpoint to resume from; then, as above, no process and no mapped /dev/shm file remain."""
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_intuitor.checkpoint import latest_checkpoint
from repo_paths import REPO

SETTLE_SECONDS = 20


def _processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of every process whose environment holds `marker` (the run's
    processes: Ray's daemons and workers inherit the driver's environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(
                        b"\0", b" ").decode(errors="replace")[:120]
            except OSError:  # exited meanwhile, or not ours to read
                pass
    return found


def _mapped_shm(pids) -> set[str]:
    names = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                names |= {line.split("/dev/shm/", 1)[1].removesuffix("\n").removesuffix(
                    " (deleted)") for line in maps if "/dev/shm/" in line}
        except OSError:
            pass
    return names


def _start_run(tmp_path: Path, marker: str, *overrides: str) -> subprocess.Popen:
    """The tiny job in `tmp_path / "run"`, a checkpoint per step, its processes marked by
    `marker` in their environment; stderr to `tmp_path / "driver.err"`."""
    name, value = marker.split("=")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", name: value,
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "megatron_intuitor.main", f"trainer.output_dir={tmp_path / 'run'}",
         f"logger.log_dir={tmp_path / 'logs'}", "logger.backends=[jsonl]",
         "trainer.save_every=1", "trainer.val_every=0", *overrides],
        env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.err", "w"))


def _assert_nothing_left(marker: str, mapped: set[str]) -> None:
    """Within SETTLE_SECONDS no process of the run remains, and none of the /dev/shm files its
    processes had mapped exists."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == {}
    assert sorted(name for name in mapped if (Path("/dev/shm") / name).exists()) == []


@pytest.mark.slow
def test_sigkill_mid_save_with_rollout_tp2_leaves_no_process_and_no_shm(tmp_path):
    marker = f"MI_LEFT_BEHIND_TEST={uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    driver = _start_run(tmp_path, marker, "trainer.total_steps=3",
                        "rollout.tensor_parallel_size=2")
    second_save = run_dir / "checkpoints" / ".tmp_step_2"
    deadline = time.monotonic() + 400
    while not second_save.exists():
        assert driver.poll() is None, (tmp_path / "driver.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach its second save"
        time.sleep(0.02)
    processes = _processes_with(marker)
    ranks = [pid for pid, command in processes.items() if command.startswith("ray::")]
    mapped = _mapped_shm(processes)
    for pid in [driver.pid, *ranks]:
        os.kill(pid, signal.SIGKILL)
    driver.wait()
    assert len(ranks) >= 2 and any(name.startswith("psm_") for name in mapped), (processes,
                                                                                  mapped)

    _assert_nothing_left(marker, mapped)
    # the save killed midway was never published (a step_2 exists only if its save had been
    # published whole before the kill): a resume takes the last whole checkpoint
    checkpoints = run_dir / "checkpoints"
    published = "step_2" if (checkpoints / "step_2").exists() else "step_1"
    assert latest_checkpoint(checkpoints) == checkpoints / published


@pytest.mark.slow
def test_rollout_rank_killed_mid_generation_is_named_and_leaves_nothing(tmp_path):
    marker = f"MI_LEFT_BEHIND_TEST={uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    driver = _start_run(tmp_path, marker, "trainer.total_steps=8", "rollout.placement=separate",
                        "rollout.num_ranks=1", "trainer.max_staleness=1")
    first_checkpoint = run_dir / "checkpoints" / "step_1"
    deadline = time.monotonic() + 400
    generating = None  # the rollout rank while it runs RolloutWorker.rollout (Ray's title)
    while generating is None:
        assert driver.poll() is None, (tmp_path / "driver.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "no generation after the first checkpoint"
        if first_checkpoint.is_dir():
            processes = _processes_with(marker)
            generating = next((pid for pid, command in processes.items()
                               if command.startswith("ray::RolloutWorker.rollout")), None)
        time.sleep(0.01)
    mapped = _mapped_shm(processes)
    os.kill(generating, signal.SIGKILL)
    assert driver.wait(timeout=300) == 1
    stopped = (tmp_path / "driver.err").read_text()
    assert re.search(r"the run stopped at step \d+:\nrollout rank 0 died \(in rollout\.rollout\)",
                     stopped), stopped[-3000:]
    assert re.search(r"last checkpoint step_\d+ .*rerun the same command", stopped)
    assert "Traceback" not in stopped
    _assert_nothing_left(marker, mapped)
