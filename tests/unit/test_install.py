"""scripts/install.sh's choices on simulated machines, nothing downloaded: PYTHON is a stub
interpreter that answers pip's dry-run resolution of torch the way a given machine would, records
every other pip call, and fails `import vllm` on demand. Plus the install check the console
script runs, against hand-written version sets."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from repo_paths import REPO

from megatron_intuitor.install_check import fix_command, mismatched_torch_companions

INSTALL = REPO / "scripts" / "install.sh"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_INDEX = "https://download.pytorch.org/whl/cu130"

STUB = textwrap.dedent(f"""\
    #!{sys.executable} -S
    # A machine as the test describes it in STUB_* variables; calls are logged to STUB_LOG.
    import json, os, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[:1] == ["-c"]:
        code = args[1]
        if "version_info" in code:
            sys.exit(int(os.environ.get("STUB_PYTHON_TOO_OLD", "0")))
        if "import vllm" in code or "transformer_engine" in code:
            sys.exit(int(os.environ.get("STUB_IMPORT_FAILS", "0")))
        if "torch.version.cuda" in code:
            sys.exit(0)
        if "nvidia.cudnn" in code:  # the include directories of the CUDA torch's wheels
            print("/wheels/nvidia/cudnn/include:/wheels/nvidia/nccl/include")
            sys.exit(0)
        sys.exit(subprocess.call([{sys.executable!r}] + args))  # the report parser: real python
    if args[:3] == ["-m", "pip", "install"] and "--dry-run" in args:
        version = os.environ.get("STUB_TORCH_RESOLVES", "")
        if not version:
            sys.exit(1)  # "No matching distribution found"
        report = args[args.index("--report") + 1]
        with open(report, "w") as out:  # the shape of pip's installation report (checked below)
            json.dump({{"install": [{{"metadata": {{"name": "torch", "version": version}}}}]}}, out)
        sys.exit(0)
    if args[:2] == ["-m", "megatron_intuitor.install_check"]:
        names = os.environ.get("STUB_MISMATCHED", "")
        print(names)
        sys.exit(1 if names else 0)
    sys.exit(0)  # pip install / uninstall: recorded only
    """)


def run_install(tmp_path: Path, face: str,
                **machine: str) -> tuple[subprocess.CompletedProcess, list]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log),
           **{f"STUB_{key.upper()}": value for key, value in machine.items()}}
    env.pop("PIP_EXTRA_ARGS", None)
    result = subprocess.run(["bash", str(INSTALL), face], env=env, capture_output=True,
                            text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def pip_installs(calls: list) -> list:
    return [call[3:] for call in calls if call[:3] == ["-m", "pip", "install"]
            and "--dry-run" not in call]


def test_cpu_face_keeps_a_pip_that_already_serves_the_cpu_torch(tmp_path):
    result, calls = run_install(tmp_path, "cpu", torch_resolves="2.13.0+cpu")
    assert result.returncode == 0, result.stderr
    assert pip_installs(calls) == [["-c", str(REPO / "constraints/cpu.txt"),
                                    "-e", f"{REPO}[cpu,dev]"]]
    assert ["-c", "import vllm, megatron.core, ray, megatron_intuitor.trainer"] in calls


@pytest.mark.parametrize("resolves", ["2.13.0", ""], ids=["pypi-cuda-build", "nothing"])
def test_cpu_face_adds_pytorchs_cpu_index_where_the_default_gives_cuda(tmp_path, resolves):
    result, calls = run_install(tmp_path, "cpu", torch_resolves=resolves)
    assert result.returncode == 0, result.stderr
    assert pip_installs(calls) == [["--extra-index-url", CPU_INDEX, "-c",
                                    str(REPO / "constraints/cpu.txt"), "-e", f"{REPO}[cpu,dev]"]]
    assert CPU_INDEX in result.stderr


def test_gpu_face_adds_the_cuda_index_only_where_pip_serves_the_cpu_torch(tmp_path):
    result, calls = run_install(tmp_path, "gpu", torch_resolves="2.13.0")
    assert result.returncode == 0, result.stderr
    assert all("--extra-index-url" not in args for args in pip_installs(calls))
    result, calls = run_install(tmp_path, "gpu", torch_resolves="2.13.0+cpu")
    installs = pip_installs(calls)
    assert [args[:2] for args in installs] == [["--extra-index-url", CUDA_INDEX]] * 2
    assert "--no-build-isolation" in installs[1] and f"{REPO}[gpu,dev]" in installs[1]
    te_check = calls.index(["-m", "megatron_intuitor.preflight", "--te-build"])
    assert te_check < calls.index(["-m", "pip", "install", *installs[1]])


def test_only_mismatched_companions_are_removed(tmp_path):
    result, calls = run_install(tmp_path, "cpu", torch_resolves="2.13.0+cpu",
                                mismatched="torchvision torchcodec")
    assert result.returncode == 0, result.stderr
    assert ["-m", "pip", "uninstall", "-y", "torchvision", "torchcodec"] in calls
    result, calls = run_install(tmp_path, "cpu", torch_resolves="2.13.0+cpu")
    assert not any(call[2:3] == ["uninstall"] for call in calls)


def test_a_failing_import_vllm_fails_the_install(tmp_path):
    result, _ = run_install(tmp_path, "cpu", torch_resolves="2.13.0+cpu", import_fails="1")
    assert result.returncode == 1
    assert "'import vllm, megatron.core, ray, megatron_intuitor.trainer' failed" in result.stderr


def test_python_older_than_311_is_refused_before_pip(tmp_path):
    result, calls = run_install(tmp_path, "cpu", python_too_old="1")
    assert result.returncode == 1 and "needs Python 3.11+" in result.stderr
    assert not any(call[:2] == ["-m", "pip"] for call in calls)


def test_the_stubbed_report_has_the_shape_of_pips(tmp_path):
    """This machine's own pip, dry run (index pages and metadata only): the report holds the
    resolved version where the script reads it."""
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                    "--no-deps", "--quiet", "--report", str(report), "torch==2.13.0"],
                   check=True, capture_output=True, timeout=120)
    version = json.loads(report.read_text())["install"][0]["metadata"]["version"]
    assert version.startswith("2.13.0")


@pytest.mark.parametrize("versions, mismatched", [
    ({"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": "2.13.0+cpu"}, ["torchvision"]),
    ({"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu", "torchcodec": "0.9.0"}, ["torchcodec"]),
    ({"torch": "2.13.0+cpu"}, []),
    ({"torch": "2.13.0", "torchvision": "0.28.0"}, []),  # the CUDA torch with its own builds
    ({}, []),
])
def test_mismatched_companions(versions, mismatched):
    assert mismatched_torch_companions(versions.get) == mismatched


def test_fix_command():
    assert fix_command(["torchvision", "torchaudio"]) == "pip uninstall -y torchvision torchaudio"
