"""Attacks on the HumanEval sandbox (`evaluation/sandbox.py`), each as a model-written program:
each must be contained, and each reports how long it took against a stated bound. A sandbox
that cannot start raises; it never grades a program as failed."""
import errno
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_intuitor.evaluation import sandbox
from megatron_intuitor.evaluation.code import grade_humaneval, humaneval_problems
from megatron_intuitor.evaluation.sandbox import (SandboxLimits, SandboxResult,
                                                  SandboxUnavailable, check_sandbox, run_python)
from repo_paths import REPO

try:
    SANDBOX = check_sandbox()
    PROBLEM = None
except SandboxUnavailable as e:
    SANDBOX, PROBLEM = None, str(e)
    warnings.warn(f"sandbox attack tests SKIPPED, the sandbox cannot start here: {PROBLEM}")
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"sandbox cannot start: {PROBLEM}")
needs_cgroup = pytest.mark.skipif(
    sandbox._cgroup_kind() is None,
    reason="no writable cgroup here: total memory is limited per process only")
ROOT = os.geteuid() == 0


@pytest.fixture
def attack(capsys):
    """Run a program in the sandbox; print (to the console) and bound its wall time."""
    def run(name: str, source: str, bound_seconds: float, **limits) -> SandboxResult:
        start = time.monotonic()
        result = run_python(source, SandboxLimits(**limits))
        seconds = time.monotonic() - start
        with capsys.disabled():
            print(f"\n[sandbox attack] {name}: returncode {result.returncode}, "
                  f"{seconds:.2f} s (bound {bound_seconds} s)")
        assert seconds < bound_seconds, f"{name} took {seconds:.1f} s"
        return result
    return run


def _report(result: SandboxResult) -> dict:
    assert result.passed, result.stderr
    return json.loads(result.stdout)


def test_program_runs_unprivileged_without_capabilities(attack, capsys):
    with capsys.disabled():
        print(f"\n[sandbox] {SANDBOX}")
    marker = f"sandbox_marker_{uuid.uuid4().hex}"
    program = f"""
import json, os, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({{k: status[k].split() for k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs")}}))
sys.stdout.flush()
os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(4)", "{marker}"])
"""
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(attack, "uid and capabilities", program, 20)
        host_uids = []
        deadline = time.monotonic() + 10
        while not host_uids and time.monotonic() < deadline:
            host_uids = [uid for pid in _processes_with(marker) if (uid := _host_uid(pid)) >= 0]
            time.sleep(0.05)
        result = running.result()
    inside = _report(result)
    assert inside["CapEff"] == inside["CapBnd"] == ["0000000000000000"]
    assert inside["NoNewPrivs"] == ["1"]
    # The uid that the host's kernel checks: never 0, `nobody` when the trainer is root.
    expected = 65534 if ROOT else os.geteuid()
    assert host_uids == [expected] and expected != 0


def test_proc_sys_kernel_log_and_hostname_are_out_of_reach(attack):
    program = """
import json, socket
report = {}
for path, mode in (("/proc/sys/vm/drop_caches", "w"), ("/proc/sys/kernel/hostname", "w"),
                   ("/proc/sysrq-trigger", "w"), ("/proc/kmsg", "rb"), ("/proc/kcore", "rb")):
    try:
        with open(path, mode) as f:
            f.write("3") if mode == "w" else f.read(1)
        report[path] = "done"
    except OSError as e:
        report[path] = e.errno
try:
    socket.sethostname("owned")
    report["sethostname"] = "done"
except OSError as e:
    report["sethostname"] = e.errno
report["hostname"] = socket.gethostname()
print(json.dumps(report))
"""
    host_name = socket.gethostname()
    report = _report(attack("/proc/sys writes, /proc/kmsg, hostname", program, 10))
    assert report.pop("sethostname") == errno.EPERM
    assert report.pop("hostname") == "sandbox"
    assert all(isinstance(e, int) for e in report.values()), report
    assert socket.gethostname() == host_name


def test_no_host_files_kernel_log_or_other_users_files(attack, tmp_path):
    private = tmp_path / "private.txt"
    private.write_text("secret")
    private.chmod(0o600)
    paths = [p for p in ("/etc/shadow", "/etc/passwd", "/home", "/dev/kmsg", "/dev/mem",
                         "/sys/kernel", "/var/run", "/run", "/tmp", str(private), __file__)
             if os.path.exists(p)]
    assert len(paths) >= 8
    program = f"""
import json, os
report = {{}}
for path in {paths!r}:
    try:
        if os.path.isfile(path):
            open(path, "r+b").close()
            report[path] = "opened"
        else:
            report[path] = sorted(os.listdir(path))
    except OSError as e:
        report[path] = e.errno
report["/"] = os.listdir("/")
report["/dev"] = os.listdir("/dev")
print(json.dumps(report))
"""
    report = _report(attack("/etc/shadow, /dev/kmsg, other users' files", program, 10))
    assert sorted(report.pop("/dev")) == ["core", "fd", "full", "null", "ptmx", "pts", "random",
                                          "shm", "stderr", "stdin", "stdout", "tty", "urandom",
                                          "zero"]
    # Only the system libraries and the interpreter's prefixes (and the dirs above them).
    prefixes = [Path(p) for q in (sys.prefix, sys.base_prefix,
                                  os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
                for p in {os.path.abspath(q), os.path.realpath(q)}]
    allowed = {"sandbox", "dev", "proc"} | {Path(p).parts[1] for p in (
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *prefixes)}
    assert set(report.pop("/")) <= allowed
    # A directory above a bound prefix (/tmp for a venv in /tmp/venv) exists inside, holding
    # only the way down to that prefix; every other path is absent.
    assert report == {path: _ways_down(Path(path), prefixes) or errno.ENOENT for path in paths}


def test_files_are_written_only_in_the_size_limited_work_dir(attack, tmp_path):
    outside = [str(tmp_path / "escaped.txt"), f"/tmp/escaped_{uuid.uuid4().hex}",
               str(Path(__file__).resolve().parent / f"escaped_{uuid.uuid4().hex}"),
               "/escaped", "/dev/escaped", "/dev/shm/escaped",
               os.path.join(sys.prefix, "escaped")]
    program = f"""
import errno, json, os, tempfile
report = dict(cwd=os.getcwd(), temp_dir=tempfile.gettempdir(), denied={{}})
for path in {outside!r}:
    try:
        open(path, "w").close()
    except OSError as e:
        report["denied"][path] = e.errno
written, failure = 0, None
for i in range(32):  # 32 files x 16 MiB
    try:
        with open(f"big_{{i}}", "wb") as f:
            for _ in range(16):
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
    except OSError as e:
        failure = e.errno
        break
report.update(written=written, failure=failure)
print(json.dumps(report))
"""
    limits = SandboxLimits()
    report = _report(attack("32 files x 16 MiB", program, 15))
    assert report["cwd"] == report["temp_dir"] == "/sandbox"
    assert set(report["denied"]) == set(outside)  # nowhere else (read-only or not there)
    assert not any(os.path.exists(p) for p in outside)
    assert report["failure"] == errno.ENOSPC
    assert 32 << 20 <= report["written"] <= limits.disk_bytes


def test_unix_sockets_of_the_host_are_out_of_reach(attack):
    socket_dir = tempfile.mkdtemp(dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    path = os.path.join(socket_dir, "host.sock")
    abstract = f"\0sandbox_test_{uuid.uuid4().hex}"
    program = f"""
import json, socket
report = {{}}
for address in ({path!r}, {abstract!r}):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(address)
        s.sendall(b"owned")
        report[repr(address)] = "sent"
    except OSError as e:
        report[repr(address)] = e.errno
print(json.dumps(report))
"""
    servers = []
    try:
        for address in (path, abstract):
            server = socket.socket(socket.AF_UNIX)
            server.bind(address)
            server.listen()
            server.settimeout(0.2)
            servers.append(server)
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(address)  # the same connect outside the sandbox works
            server.accept()[0].close()
        report = _report(attack("host Unix sockets", program, 10))
        assert report == {repr(path): errno.ENOENT, repr(abstract): errno.ECONNREFUSED}
        for server in servers:
            with pytest.raises(socket.timeout):
                server.accept()
    finally:
        for server in servers:
            server.close()
        os.unlink(path)
        os.rmdir(socket_dir)


def test_network_is_unreachable_inside_and_out(attack):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        server.settimeout(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            server.accept()[0].close()  # reachable from the host itself
        # 192.0.2.1 is TEST-NET-1 (RFC 5737): nothing is sent; the sandbox has no route at all.
        program = f"""
import json, socket, time
report = {{}}
for host, port in (("127.0.0.1", {port}), ("192.0.2.1", 80)):
    start = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=5).close()
        report[host] = ["connected", time.monotonic() - start]
    except OSError as e:
        report[host] = [e.errno, time.monotonic() - start]
print(json.dumps(report))
"""
        report = _report(attack("network 127.0.0.1 and 192.0.2.1", program, 10))
        with pytest.raises(socket.timeout):
            server.accept()
    assert report["127.0.0.1"][0] == errno.ECONNREFUSED  # its own loopback, not the host's
    assert report["192.0.2.1"][0] == errno.ENETUNREACH and report["192.0.2.1"][1] < 1


def test_host_processes_cannot_be_signalled(attack):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        program = f"""
import json, os, signal
report = {{}}
try:
    os.kill({victim.pid}, signal.SIGKILL)
    report["kill"] = "sent"
except OSError as e:
    report["kill"] = e.errno
report["visible_pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(report))
os.kill(-1, signal.SIGKILL)  # everything it may signal
"""
        result = attack("kill a host pid", program, 10)
        report = json.loads(result.stdout)
        assert report["kill"] == errno.ESRCH
        assert max(report["visible_pids"]) < 10  # its own PID namespace
        time.sleep(0.2)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_environment_secrets_are_not_passed(attack, monkeypatch):
    monkeypatch.setenv("SANDBOX_TEST_SECRET", "hunter2")
    program = """
import os
seen = repr(dict(os.environ))
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        seen += open(f"/proc/{pid}/environ").read()
    except OSError:
        pass
print(seen)
"""
    result = attack("environment variables", program, 10)
    assert result.passed and "hunter2" not in result.stdout and "HOME" in result.stdout


def test_infinite_loop_is_killed_by_the_cpu_limit(attack):
    result = attack("infinite loop", "while True: pass", 6, cpu_seconds=1, wall_seconds=30)
    assert result.returncode == 128 + signal.SIGKILL  # RLIMIT_CPU, long before the wall clock
    result = attack("sleeping forever", "import time; time.sleep(600)", 4, wall_seconds=1)
    assert result.timed_out


def test_eight_gigabyte_allocation_fails(attack):
    result = attack("8 GB allocation", "x = bytearray(8 << 30)", 5)
    assert not result.passed and "MemoryError" in result.stderr


@needs_cgroup
def test_total_memory_of_all_processes_is_capped(attack):
    # 4 processes x 700 MiB against 1 GiB in total: each alone fits its own address-space limit.
    program = """
import json, os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"\\x01" * (700 << 20)
        time.sleep(2)
        os._exit(0)
    children.append(pid)
statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
print(json.dumps(statuses))
"""
    result = attack("4 forks x 700 MiB", program, 20)
    statuses = json.loads(result.stdout)
    assert statuses.count(0) <= 1 and statuses.count(-signal.SIGKILL) >= 3, statuses
    assert result.memory_peak_bytes <= 1 << 30


@needs_cgroup
def test_a_killed_runs_empty_cgroups_are_swept_but_not_a_busy_one():
    """SIGKILL skips a run's cleanup and leaves its empty cgroup: the next run's start removes
    ours when old enough; one with a process in it, and other names, stay."""
    kind = sandbox._cgroup_kind()
    parents = dict(sandbox._cgroup_parents())[kind]
    parent = next(iter(parents.values()))
    stale = os.path.join(parent, f"{sandbox.CGROUP_PREFIX}stale_{uuid.uuid4().hex[:6]}")
    busy = os.path.join(parent, f"{sandbox.CGROUP_PREFIX}busy_{uuid.uuid4().hex[:6]}")
    other = os.path.join(parent, f"someone_else_{uuid.uuid4().hex[:6]}")
    for directory in (stale, busy, other):
        os.mkdir(directory)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with open(os.path.join(busy, "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        assert sandbox.remove_stale_cgroups({"": parent}, older_than=3600) == []
        assert sandbox.remove_stale_cgroups({"": parent}, older_than=0) == [stale]
        assert not os.path.exists(stale) and os.path.isdir(busy) and os.path.isdir(other)
    finally:
        sleeper.kill()
        sleeper.wait()
        for directory in (busy, other):
            for _ in range(100):
                try:
                    os.rmdir(directory)
                    break
                except OSError:
                    time.sleep(0.05)


@pytest.mark.parametrize("aggregate", ["cgroup", "rlimit"])
def test_number_of_processes_is_capped(attack, monkeypatch, aggregate):
    if aggregate == "cgroup" and sandbox._cgroup_kind() is None:
        pytest.skip("no writable cgroup here")
    if aggregate == "rlimit":
        monkeypatch.setattr(sandbox, "_cgroup_kind", lambda: None)
    program = """
import json, os, time
started = 1
while True:
    try:
        pid = os.fork()
    except OSError as e:
        print(json.dumps([started, e.errno]))
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    started += 1
"""
    started, error = _report(attack(f"process count ({aggregate})", program, 10,
                                    max_processes=16))
    assert error == errno.EAGAIN and 8 <= started <= 16


def test_fork_bomb_is_contained_and_leaves_nothing(attack):
    marker = f"sandbox_marker_{uuid.uuid4().hex}"
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    program = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, " \
              f"{marker!r}])\n"
    result = attack("fork bomb", program, 8, wall_seconds=2)
    assert result.timed_out
    _assert_gone(marker)
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=30).returncode == 0


def test_no_process_outlives_the_run(attack):
    marker = f"sandbox_marker_{uuid.uuid4().hex}"
    spawn = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
             f"'import time; time.sleep(600)', {marker!r}], start_new_session=True)\n")
    assert attack("detached child, program exits", spawn, 10).passed
    _assert_gone(marker)
    result = attack("detached child, wall clock", spawn + "import time; time.sleep(600)\n", 8,
                    wall_seconds=2)
    assert result.timed_out
    _assert_gone(marker)


def test_segfault_is_reported_without_a_core_dump(attack):
    result = attack("segfault", "import ctypes\nctypes.string_at(0)\n", 10)
    assert result.returncode == 128 + signal.SIGSEGV


def test_stdout_flood_is_cut_off(attack):
    limits = SandboxLimits()
    result = attack("stdout flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
                    10)
    assert not result.passed and result.stdout == "x" * limits.output_chars
    assert "BrokenPipeError" in result.stderr  # the pipe closed after output_bytes


def test_program_cannot_fake_a_sandbox_that_did_not_start(attack):
    result = attack("fake setup failure",
                    "import sys\nprint('bwrap: execvp failed', file=sys.stderr)\nsys.exit(1)\n", 10)
    assert result.returncode == 1


def test_a_sandbox_that_cannot_start_raises_instead_of_grading(monkeypatch):
    problem = humaneval_problems()["HumanEval/53"]
    # The interpreter is not visible inside (as when a venv in /tmp was hidden by a tmpfs).
    monkeypatch.setattr(sandbox, "_bind_paths", lambda: [])
    with pytest.raises(SandboxUnavailable, match="did not start"):
        grade_humaneval(problem["canonical_solution"], problem)
    monkeypatch.undo()
    monkeypatch.setattr(sandbox.shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        run_python("print(1)")


def test_preflight_refuses_a_humaneval_run_whose_sandbox_cannot_start(monkeypatch, preflight):
    """The preflight probes the sandbox when validation grades HumanEval: without bubblewrap it
    reports an error naming the dataset and the cause, before anything starts."""
    from megatron_intuitor import config

    cfg = config.resolve(config.compose(["task=code_humaneval"]))
    report = preflight.Report()
    monkeypatch.setattr(sandbox.shutil, "which", lambda *args, **kwargs: None)
    sandbox.check_sandbox.cache_clear()  # probed once per process: probe again without bwrap
    preflight.check_sandbox(report, cfg)
    assert report.errors == 1
    assert "code sandbox for humaneval cannot start" in report.lines[0]
    assert "bubblewrap" in report.lines[0]
    default = preflight.Report()
    preflight.check_sandbox(default, config.resolve(config.compose([])))  # nothing graded as code
    assert (default.errors, default.lines) == (0, [])


@pytest.mark.skipif(not ROOT, reason="only a root trainer hands programs to nobody")
def test_an_interpreter_prefix_nobody_cannot_read_is_named(monkeypatch, tmp_path):
    tmp_path.chmod(0o700)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(SandboxUnavailable, match=f"nobody.*{tmp_path}"):
        sandbox._bind_paths.__wrapped__()


@pytest.mark.slow
def test_canonical_humaneval_solutions_pass_from_a_venv_under_tmp():
    venv = Path(tempfile.mkdtemp(prefix="sandbox_venv_", dir="/tmp"))
    venv.chmod(0o755)  # as `python -m venv /tmp/x` makes it
    try:
        _venv_seeing_this_environment(venv)
        grader = """
import json, sys
from megatron_intuitor.evaluation.code import humaneval_problems
from megatron_intuitor.evaluation.registry import accuracy
from megatron_intuitor.evaluation.sandbox import run_python
problems = humaneval_problems()
ids = sorted(problems)
print(json.dumps(dict(
    prefix=run_python("import sys; print(sys.prefix)").stdout.strip(), tasks=len(ids),
    accuracy=accuracy("humaneval", [problems[t]["canonical_solution"] for t in ids], ids))))
"""
        repo = str(REPO)
        start = time.monotonic()
        done = subprocess.run([str(venv / "bin" / "python"), "-c", grader], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "PYTHONPATH": repo})
        seconds = time.monotonic() - start
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.splitlines()[-1])
        print(f"[sandbox] 164 canonical solutions from {venv}: {seconds:.1f} s")
        assert report == dict(prefix=str(venv), tasks=164, accuracy=1.0)
    finally:
        shutil.rmtree(venv)


def _ways_down(directory: Path, prefixes: list[Path]) -> list[str]:
    """The names in `directory` on the way to the prefixes below it (empty if none is)."""
    return sorted({p.relative_to(directory).parts[0] for p in prefixes
                   if directory in p.parents})


def _venv_seeing_this_environment(venv: Path) -> None:
    """A venv at `venv` that imports what this interpreter imports. `-m venv` run from a venv
    builds on the base interpreter (`sys._base_executable`), so `--system-site-packages` alone
    sees the base's packages, not this venv's: a .pth file adds this environment's site dirs
    (with their own .pth files, e.g. editable installs)."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    site_dirs = site.getsitepackages() + (
        [site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (Path(purelib) / "outer_environment.pth").write_text(
        f"import site; list(map(site.addsitedir, {site_dirs!r}))\n")


def _assert_gone(marker: str, within_seconds: float = 5) -> None:
    deadline = time.monotonic() + within_seconds
    while time.monotonic() < deadline and _processes_with(marker):
        time.sleep(0.05)
    assert _processes_with(marker) == []


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def _host_uid(pid: int) -> int:
    """The process's real uid as the host sees it (-1 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    except OSError:
        return -1
