"""A run killed mid-save leaves nothing behind: the tiny job with rollout TP=2 (vLLM's 24 MB
shared-memory broadcaster) and a checkpoint per step; when its second save starts, the driver
and both ranks get SIGKILL at once. Within 20 s no process of the run may remain (Megatron's
forked checkpoint writers and the resource tracker included) and no /dev/shm file that the
run's processes had mapped may still exist; the killed save is never taken as a checkpoint."""
import os
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


@pytest.mark.slow
def test_sigkill_mid_save_with_rollout_tp2_leaves_no_process_and_no_shm(tmp_path):
    marker = f"MI_LEFT_BEHIND_TEST={uuid.uuid4().hex}"
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", marker.split("=")[0]: marker.split("=")[1],
           "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "megatron_intuitor.main", f"trainer.output_dir={run_dir}",
         f"logger.log_dir={tmp_path / 'logs'}", "logger.backends=[jsonl]",
         "trainer.total_steps=3", "trainer.save_every=1", "trainer.val_every=0",
         "rollout.tensor_parallel_size=2"],
        env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.err", "w"))
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

    deadline = time.monotonic() + SETTLE_SECONDS
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == {}
    assert sorted(name for name in mapped if (Path("/dev/shm") / name).exists()) == []
    # the save killed midway was never published (a step_2 exists only if its save had been
    # published whole before the kill): a resume takes the last whole checkpoint
    checkpoints = run_dir / "checkpoints"
    published = "step_2" if (checkpoints / "step_2").exists() else "step_1"
    assert latest_checkpoint(checkpoints) == checkpoints / published
