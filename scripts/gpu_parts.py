"""The parts of the two GPU checks, each run in a process of its own under a time limit, by
scripts/gpu_smoke.sh (`smoke`: tests/gpu/, one file per process) and scripts/gpu_check_core.sh
(`core`: `python -m megatron_intuitor.core_check PART`, torch + transformers + megatron-core).

    python scripts/gpu_parts.py {smoke,core} --out DIR

Without CUDA it exits at once (status 2), before importing torch where no NVIDIA device node
exists. Parts run offline (HF_HUB_OFFLINE, no usage statistics, wandb disabled) with this
checkout first on PYTHONPATH, whatever is installed.
Each part's output goes to the console and to DIR/<part>.log; its time is printed when it ends.
All parts share one compile cache (vLLM's, TorchInductor's and Triton's, under $GPU_CHECK_CACHE,
default ~/.cache/megatron_intuitor/gpu_check), so a vLLM engine compiles its model once, not once
per part, and a second run starts warm.

A part that overruns its limit is stopped with everything it started: this process is a child
subreaper (Linux `PR_SET_CHILD_SUBREAPER`), so processes that outlive their parent (Ray's GCS,
raylet and workers after the driver is killed, engine processes) are re-parented here instead
of to init; after every part, timed out or not, each remaining descendant gets SIGTERM, then
SIGKILL after a grace period, so no process of one part still holds the GPU when the next
starts. Last line: one JSON object (the parts' exit codes, times and reported figures).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
STOP_GRACE_S = 10.0
# A pytest part's lines worth a summary: outcomes and the measurements the GPU tests print.
SUMMARY_LINE = re.compile(
    r"^(PASSED|FAILED|ERROR|SKIPPED) |(TE bf16|vLLM runner|shard sync|streamed sync|sleep\(2\)|"
    r"greedy tokens|after the step|FP8 vs|scores at sampling).*")


@dataclass(frozen=True)
class Part:
    name: str
    limit_s: int
    command: tuple[str, ...]


def _pytest(path: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-rA", "-s",
            path)


def _core(part: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "megatron_intuitor.core_check", part)


# Every file of tests/gpu/ in a process of its own: a process holds one vLLM engine, shut down
# only at its end (tests/gpu/conftest.py says why).
SMOKE_PARTS = (
    Part("suite", 300, _pytest("tests/gpu/test_gpu_suite.py")),
    Part("scores_at_sampling", 180, _pytest("tests/gpu/test_gpu_scores_at_sampling.py")),
    # an engine returning routed experts (vLLM's V2 runner) and Megatron replaying them
    Part("routing_replay", 180, _pytest("tests/gpu/test_gpu_routing_replay.py")),
    Part("cli", 300, _pytest("tests/gpu/test_cli.py")),
    # two GPUs (skipped, saying so, on one): the cross-rank weight broadcast over NCCL
    Part("cross_rank_nccl", 180, _pytest("tests/gpu/test_cross_rank_nccl.py")),
    # mixture-of-experts shard-to-shard sync (the expert-parallel engine case needs 2 GPUs)
    Part("moe_sync", 300, _pytest("tests/gpu/test_gpu_moe_sync.py")),
    # two GPUs (skipped, saying so, on one): MoE training, TP=2 x EP=2, sequence parallel
    Part("moe", 240, _pytest("tests/gpu/test_gpu_moe.py")),
)
# Together under 8 minutes on one H100 even if every part runs to its limit.
CORE_PARTS = (
    Part("logits", 120, _core("logits")),
    Part("scoring", 180, _core("scoring")),
    Part("ppo", 150, _core("ppo")),
)
PART_SETS = {"smoke": SMOKE_PARTS, "core": CORE_PARTS}


def become_subreaper() -> None:
    """Orphaned descendants of this process get this process as their parent (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def stop_descendants() -> list[int]:
    """SIGTERM every descendant of this process, SIGKILL those alive after STOP_GRACE_S, reap
    them all. Returns the pids that were still running."""
    grace_s = STOP_GRACE_S
    descendants = psutil.Process().children(recursive=True)
    for process in descendants:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(descendants, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return [process.pid for process in descendants]


def compile_cache_env(cache_root: Path) -> dict[str, str]:
    """One compile cache for every part (vLLM's torch.compile artifacts, Inductor, Triton)."""
    return {"VLLM_CACHE_ROOT": str(cache_root / "vllm"),
            "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor"),
            "TRITON_CACHE_DIR": str(cache_root / "triton")}


def run_part(part: Part, out_dir: Path, env: Optional[dict[str, str]] = None) -> dict:
    """Run `part` (its own session), echo and log its output, stop it at its limit; afterwards
    nothing it started is left running. Returns its record for the summary."""
    log_path = out_dir / f"{part.name}.log"
    print(f"== {part.name} (limit {part.limit_s} s): {' '.join(part.command)}", flush=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(part.command, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                   text=True, errors="replace")
        copier = threading.Thread(target=_copy_lines, args=(process.stdout, log), daemon=True)
        copier.start()
        try:
            returncode: Optional[int] = process.wait(timeout=part.limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            returncode, timed_out = None, True
        stopped = stop_descendants()  # reaps the part too: a timed-out part has no exit code
        copier.join(timeout=STOP_GRACE_S)
    seconds = time.monotonic() - started
    verdict = "TIMED OUT" if timed_out else ("ok" if returncode == 0 else f"exit {returncode}")
    print(f"== {part.name}: {verdict} in {seconds:.0f} s"
          + (f" ({len(stopped)} leftover processes stopped)" if stopped else ""), flush=True)
    lines = log_path.read_text(errors="replace").splitlines()
    return {"part": part.name, "returncode": returncode, "timed_out": timed_out,
            "seconds": round(seconds, 1), "stopped_processes": len(stopped),
            "summary": [match.group(0) for line in lines
                        if (match := SUMMARY_LINE.search(line))],
            "result": _last_json(lines)}


def _copy_lines(source, log) -> None:
    for line in source:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()


def _last_json(lines: list[str]) -> Optional[dict]:
    """A core part's result: the last line of its output that is a JSON object."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def missing_cuda() -> Optional[str]:
    """Why this machine cannot run a GPU check, or None: no NVIDIA device node (torch is not
    even imported), or no CUDA device visible to torch."""
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        return "no CUDA device on this machine (no /dev/nvidia<N>)"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to {sys.executable} (torch.cuda.is_available() is False)"
    return None


def environment() -> dict[str, str]:
    """The GPU, torch's CUDA and the versions of the packages the checks touch."""
    from importlib import metadata

    import torch

    found = {"gpu": f"{torch.cuda.get_device_name(0)} (capability "
                    f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))})",
             "torch": f"{torch.__version__} (CUDA {torch.version.cuda})"}
    for name in ("megatron-core", "transformers", "vllm", "transformer_engine",
                 "transformer_engine_cu13", "transformer_engine_cu12", "transformer_engine_torch",
                 "ray"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONUNBUFFERED": "1"}


def run_parts(parts: tuple[Part, ...], out_dir: Path, cache_root: Path) -> dict:
    """Every part in order, whatever the earlier ones did; the summary of all."""
    become_subreaper()
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **OFFLINE_ENV, **compile_cache_env(cache_root),
           "PYTHONPATH": python_path}
    started = time.monotonic()
    records = [run_part(part, out_dir, env) for part in parts]
    return {"ok": all(record["returncode"] == 0 for record in records),
            "seconds": round(time.monotonic() - started, 1), "parts": records}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", choices=sorted(PART_SETS))
    parser.add_argument("--out", type=Path, help="logs and summary.json (default: "
                        "/tmp/gpu_<parts>_<time>)")
    options = parser.parse_args()
    reason = missing_cuda()
    if reason is not None:
        print(f"gpu_{options.parts}: {reason}: nothing to run", file=sys.stderr)
        return 2
    out_dir = options.out or Path(f"/tmp/gpu_{options.parts}_{time.strftime('%Y%m%d_%H%M%S')}")
    found = environment()
    for name, version in found.items():
        print(f"{name:26s} {version}")
    cache_root = Path(os.environ.get("GPU_CHECK_CACHE")
                      or Path.home() / ".cache" / "megatron_intuitor" / "gpu_check")
    os.chdir(Path(__file__).resolve().parent.parent)  # the parts' paths are the repository's
    summary = {"check": options.parts, "environment": found,
               **run_parts(PART_SETS[options.parts], out_dir, cache_root)}
    print(f"== summary ({out_dir})")
    for record in summary["parts"]:
        print(f"{record['part']}: "
              f"{'timed out' if record['timed_out'] else 'exit ' + str(record['returncode'])}, "
              f"{record['seconds']} s")
        for line in record["summary"]:
            print(f"  {line}")
    line = json.dumps(summary)
    (out_dir / "summary.json").write_text(line + "\n")
    print(line)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
