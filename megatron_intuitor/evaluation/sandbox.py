"""Run an untrusted Python program under bubblewrap, as an unprivileged user, with limits.

Model-generated code (HumanEval completions) is never `exec`-ed in our process. Each program
runs as `python -I program.py` inside a bubblewrap (`bwrap`, Debian package `bubblewrap`)
sandbox:

- user: the program runs as an unprivileged uid with no capabilities and no_new_privs. When the
  trainer is root, a small launcher (this file, run as a script with the standard library only)
  first switches to `nobody`, so the program's real uid on the host is not 0; otherwise it runs
  as the trainer's uid. bwrap puts it in a new user namespace that may create no further one.
- file system: an empty root, read-only; read-only binds of /usr, /lib* and the interpreter's
  prefixes (a venv under /tmp included); a fresh /proc with /proc/sys hidden; a read-only /dev
  with only null, zero, random, urandom, tty; the work dir `/sandbox` (cwd, HOME, TMPDIR) is a
  tmpfs of `disk_bytes`, the only writable place. Nothing else of the host is visible: no /etc,
  /home, /root, /tmp or /run, so no secrets and no Unix sockets of the host.
- namespaces: network (only a loopback of its own: no route anywhere), PID (the program sees
  only its own processes and every one dies with it), IPC, UTS, cgroup.
- limits: rlimits per process (CPU seconds, address space, file size, open files, no core
  dumps) set by a first program inside the sandbox, which then `exec`s the program; for all
  processes together a cgroup (v2 if its memory and pids controllers can be used, else the v1
  memory and pids hierarchies) caps total memory and the number of processes. Without a
  writable cgroup, RLIMIT_NPROC inside the user namespace caps the processes and memory is
  limited per process only (`max_processes * memory_bytes` in all): `check_sandbox()` says which.
- environment: empty but for PATH, HOME, TMPDIR, LANG (no API keys); stdin is /dev/null.

The parent enforces the wall clock; on timeout it kills the launcher's process group and the
cgroup. stdout and stderr come through pipes, so output never touches the host disk: the first
`output_chars` of each are kept, and after `output_bytes` the pipe closes (the program then gets
EPIPE). If the sandbox cannot start (bwrap missing, user namespaces disabled, the interpreter
not visible inside), `run_python` raises `SandboxUnavailable`: a program's result never stands
for a sandbox that did not run.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import BinaryIO

_WORK_DIR = "/sandbox"
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Run inside the sandbox before the program: its rlimits (soft == hard, so the program cannot
# raise them, and the CPU limit ends in SIGKILL), then the byte that says the sandbox started.
_INNER = """import json, os, resource, sys
config = json.loads(sys.argv[1])
for name, value in config["rlimits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
os.write(config["ready_fd"], b"1")
os.close(config["ready_fd"])
os.execv(sys.executable, [sys.executable, "-I", "program.py"])
"""
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30  # per process and, with a cgroup, all processes together
    max_processes: int = 32  # processes and threads together
    disk_bytes: int = 64 << 20  # size of the work dir's tmpfs, the only writable place
    file_bytes: int = 16 << 20  # per file
    open_files: int = 64
    output_bytes: int = 16 << 20  # per stream; beyond it the pipe closes
    output_chars: int = 8192  # how much of stdout/stderr is kept in the result


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # exit status, 128 + n after signal n; None when the wall clock hit
    stdout: str
    stderr: str
    memory_peak_bytes: int | None = None  # all processes together; None without a cgroup

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def passed(self) -> bool:
        return self.returncode == 0


class SandboxUnavailable(RuntimeError):
    """The sandbox could not start: stop, never grade the program as failed."""


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a Python program in the sandbox under `limits`."""
    bwrap = _bwrap_path()
    binds = _bind_paths()
    as_root = os.geteuid() == 0
    with contextlib.ExitStack() as cleanup:
        cgroup = _Cgroup.create(limits) if _cgroup_kind() else None
        if cgroup:
            cleanup.callback(cgroup.remove)
        stage = _stage_dir(len(binds)) if as_root else None
        if stage:
            cleanup.callback(_remove_stage, stage, len(binds))
        # File objects, so that closing early (the parent's copies, a full pipe) and closing
        # at the end never close a descriptor number twice.
        program = cleanup.enter_context(open(os.memfd_create("program.py"), "w+b"))
        program.write(source.encode())
        program.seek(0)
        ready_read, ready_write, out_read, out_write, err_read, err_write = (
            cleanup.enter_context(open(fd, "rb" if i % 2 == 0 else "wb", buffering=0))
            for i, fd in enumerate((*os.pipe(), *os.pipe(), *os.pipe())))
        sources = [os.path.join(stage, str(i)) for i in range(len(binds))] if stage else \
            [src for src, _ in binds]
        config = dict(bwrap=_bwrap_argv(bwrap, binds, sources, program.fileno(),
                                        ready_write.fileno(), limits,
                                        rlimit_processes=cgroup is None),
                      cgroup_procs=cgroup.procs_files if cgroup else [],
                      stage=[[src, dst] for (src, _), dst in zip(binds, sources)] if stage else [],
                      drop_to=_unprivileged_ids() if as_root else None)
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.DEVNULL, stdout=out_write, stderr=err_write, cwd="/",
            env=_program_env(), start_new_session=True,
            pass_fds=(ready_write.fileno(), program.fileno()))
        for parent_copy in (out_write, err_write, ready_write, program):
            parent_copy.close()

        def kill() -> None:
            try:
                os.killpg(launcher.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if cgroup:
                cgroup.kill()

        returncode, stdout, stderr = _wait(launcher, out_read, err_read, limits, kill)
        os.set_blocking(ready_read.fileno(), False)
        if ready_read.read(1) != b"1":  # None (nothing written) or b"" (closed unwritten)
            raise SandboxUnavailable(f"the sandbox did not start ({_bwrap_version(bwrap)}, "
                                     f"interpreter {sys.executable}): {stderr.strip()}")
        return SandboxResult(returncode, stdout, stderr, cgroup.memory_peak() if cgroup else None)


@lru_cache(maxsize=1)
def check_sandbox() -> str:
    """What confines programs here (probed once by running one); raises SandboxUnavailable."""
    result = run_python("print('ok')")
    if result.stdout != "ok\n":
        raise SandboxUnavailable(f"the probe program failed ({result.returncode}): "
                                 f"{result.stderr.strip()}")
    uid = "nobody" if os.geteuid() == 0 else f"uid {os.geteuid()}"
    kind = _cgroup_kind()
    aggregate = (f"total memory and processes by a cgroup {kind} per run" if kind else
                 "processes by RLIMIT_NPROC in the user namespace, memory per process only "
                 "(no writable cgroup)")
    return f"{_bwrap_version(_bwrap_path())} as {uid}; {aggregate}"


def _bwrap_path() -> str:
    path = shutil.which("bwrap") or shutil.which("bwrap", path="/usr/bin:/bin")
    if path is None:
        raise SandboxUnavailable("bubblewrap (`bwrap`) is not installed; model-written code runs "
                                 "only inside it: install the package `bubblewrap` "
                                 "(apt-get install bubblewrap)")
    return path


@lru_cache(maxsize=None)
def _bwrap_version(bwrap: str) -> str:
    result = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30)
    return result.stdout.strip() or f"{bwrap} (version unknown)"


def _bwrap_argv(bwrap: str, binds: list[tuple[str, str]], sources: list[str], program_fd: int,
                ready_fd: int, limits: SandboxLimits, rlimit_processes: bool) -> list[str]:
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent",
            "--new-session", "--hostname", "sandbox"]
    for source, (_, dest) in zip(sources, binds):
        argv += ["--ro-bind", source, dest]
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
    argv += ["--proc", "/proc", "--tmpfs", "/proc/sys", "--remount-ro", "/proc/sys",
             "--dev", "/dev", "--remount-ro", "/dev",
             "--size", str(limits.disk_bytes), "--tmpfs", _WORK_DIR,
             "--file", str(program_fd), f"{_WORK_DIR}/program.py", "--chdir", _WORK_DIR,
             "--remount-ro", "/"]
    rlimits = [("RLIMIT_CPU", limits.cpu_seconds), ("RLIMIT_AS", limits.memory_bytes),
               ("RLIMIT_FSIZE", limits.file_bytes), ("RLIMIT_NOFILE", limits.open_files),
               ("RLIMIT_CORE", 0)]
    if rlimit_processes:
        rlimits.append(("RLIMIT_NPROC", limits.max_processes))
    inner = dict(rlimits=rlimits, ready_fd=ready_fd)
    return argv + ["--", sys.executable, "-I", "-S", "-c", _INNER, json.dumps(inner)]


@lru_cache(maxsize=1)
def _bind_paths() -> list[tuple[str, str]]:
    """(host source, sandbox destination) of the read-only binds: system libraries and the
    interpreter's prefixes (a venv's, its base, the real executable's), each at its own path."""
    candidates = [p for p in _SYSTEM_DIRS if os.path.isdir(p) and not os.path.islink(p)]
    real_executable = os.path.realpath(sys.executable)
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                   os.path.dirname(os.path.dirname(real_executable))):
        candidates += [os.path.abspath(prefix), os.path.realpath(prefix)]
    binds: list[tuple[str, str]] = []
    for dest in sorted(set(candidates), key=len):  # parents first; skip what they contain
        if dest != "/" and not any(dest.startswith(d.rstrip("/") + "/") for _, d in binds):
            binds.append((os.path.realpath(dest), dest))
    if os.geteuid() == 0:
        closed = [src for src, _ in binds if os.stat(src).st_mode & 0o005 != 0o005]
        if closed:
            raise SandboxUnavailable(f"the sandbox runs programs as nobody, who cannot read "
                                     f"the interpreter's {closed} (chmod o+rx)")
    return binds


def _stage_dir(count: int) -> str:
    # A root trainer's bind sources may sit below directories `nobody` cannot enter (pyenv in
    # /root, mode 700). The launcher binds them here, in a mount namespace of its own, before
    # it becomes `nobody` and starts bwrap, which then binds them from here.
    stage = tempfile.mkdtemp(prefix="sandbox_stage_")
    os.chmod(stage, 0o755)
    for i in range(count):
        os.mkdir(os.path.join(stage, str(i)))
    return stage


def _remove_stage(stage: str, count: int) -> None:
    # rmdir, never a recursive delete: these are (empty) mount points in the launcher's view.
    for i in range(count):
        os.rmdir(os.path.join(stage, str(i)))
    os.rmdir(stage)


def _unprivileged_ids() -> list[int]:
    try:
        entry = pwd.getpwnam("nobody")
        return [entry.pw_uid, entry.pw_gid]
    except KeyError:
        return [65534, 65534]


def _program_env() -> dict[str, str]:
    # Nothing inherited: the trainer's environment may hold credentials (WANDB_API_KEY, ...).
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": _WORK_DIR, "TMPDIR": _WORK_DIR,
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0"}


def _wait(process: subprocess.Popen, out: BinaryIO, err: BinaryIO, limits: SandboxLimits,
          kill: Callable[[], None]) -> tuple[int | None, str, str]:
    """Read both pipes (closing them) until the process ends or the wall clock runs out."""
    deadline = time.monotonic() + limits.wall_seconds
    keep = limits.output_chars * 4
    heads = {out: bytearray(), err: bytearray()}
    seen = dict.fromkeys(heads, 0)
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for pipe in heads:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map() and not timed_out:
            events = selector.select(max(0.0, deadline - time.monotonic()))
            timed_out = not events and time.monotonic() >= deadline
            for key, _ in events:
                pipe = key.fileobj
                chunk = pipe.read(1 << 16)
                heads[pipe] += chunk[:max(0, keep - len(heads[pipe]))]
                seen[pipe] += len(chunk)
                if not chunk or seen[pipe] >= limits.output_bytes:
                    selector.unregister(pipe)
                    pipe.close()  # past output_bytes the program's writes get EPIPE
    returncode = None
    if not timed_out:
        try:
            returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    if returncode is None:
        kill()
        process.wait()
    out_text, err_text = (heads[pipe].decode("utf-8", errors="replace")[:limits.output_chars]
                          for pipe in (out, err))
    return returncode, out_text, err_text


# --- cgroups ----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _cgroup_kind() -> str | None:
    """"v2" or "v1" when a cgroup with memory and pids limits can be made here, else None."""
    for kind, parents in _cgroup_parents():
        try:
            _Cgroup(kind, parents, SandboxLimits()).remove()
            return kind
        except OSError:
            continue
    return None


def _cgroup_parents() -> list[tuple[str, dict[str, str]]]:
    """Candidate parents of a run's cgroup, by kind: our own cgroup in each hierarchy."""
    own = {}  # hierarchy controllers ("" for v2) -> our path in it
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers] = path
    mounts = {}  # "" (v2) or controller name -> directory of our cgroup there
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mount, fs = line.split(" - ")
            _, _, _, root, mount_point = mount.split()[:5]
            fstype, _, options = fs.split()[:3]
            if fstype == "cgroup2" and "" in own:
                mounts.setdefault("", _below(mount_point, root, own[""]))
            elif fstype == "cgroup":
                for controller in set(options.split(",")) & {"memory", "pids"}:
                    path = next((p for k, p in own.items() if controller in k.split(",")), None)
                    if path is not None:
                        mounts.setdefault(controller, _below(mount_point, root, path))
    candidates = []
    if mounts.get(""):
        candidates.append(("v2", {"memory": mounts[""], "pids": mounts[""]}))
    if mounts.get("memory") and mounts.get("pids"):
        candidates.append(("v1", {"memory": mounts["memory"], "pids": mounts["pids"]}))
    return candidates


def _below(mount_point: str, mount_root: str, path: str) -> str | None:
    relative = os.path.relpath(path, mount_root)
    return None if relative.startswith("..") else os.path.normpath(
        os.path.join(mount_point, relative))


CGROUP_PREFIX = "megatron_intuitor_sandbox_"
STALE_CGROUP_SECONDS = 60.0  # far longer than a sandboxed program lives between mkdir and join


def remove_stale_cgroups(parents: dict[str, str],
                         older_than: float = STALE_CGROUP_SECONDS) -> list[str]:
    """Remove the empty run cgroups a killed trainer left behind (SIGKILL skips `remove`): ours by
    name, older than `older_than` seconds (a concurrent run's fresh one is left alone), empty
    (rmdir refuses a cgroup with processes). Returns the removed directories."""
    removed = []
    now = time.time()
    for parent in dict.fromkeys(parents.values()):
        try:
            names = [n for n in os.listdir(parent) if n.startswith(CGROUP_PREFIX)]
        except OSError:
            continue
        for name in names:
            directory = os.path.join(parent, name)
            try:
                if now - os.stat(directory).st_mtime >= older_than:
                    os.rmdir(directory)
                    removed.append(directory)
            except OSError:  # in use (EBUSY), or gone meanwhile
                continue
    return removed


class _Cgroup:
    """One run's cgroup(s): memory and pids limits, join, kill, peak memory, remove."""

    def __init__(self, kind: str, parents: dict[str, str], limits: SandboxLimits):
        self.kind = kind
        name = f"{CGROUP_PREFIX}{uuid.uuid4().hex[:12]}"
        self.dirs = {c: os.path.join(p, name) for c, p in parents.items()}
        made = []
        try:
            for directory in dict.fromkeys(self.dirs.values()):
                if kind == "v2":
                    _enable_controllers(os.path.dirname(directory))
                os.mkdir(directory)
                made.append(directory)
            memory, pids = self.dirs["memory"], self.dirs["pids"]
            if kind == "v2":
                _write(f"{memory}/memory.max", limits.memory_bytes)
                _write(f"{memory}/memory.swap.max", 0, optional=True)
            else:
                _write(f"{memory}/memory.limit_in_bytes", limits.memory_bytes)
                _write(f"{memory}/memory.memsw.limit_in_bytes", limits.memory_bytes,
                       optional=True)
            _write(f"{pids}/pids.max", limits.max_processes)
        except OSError:
            for directory in made:
                os.rmdir(directory)
            raise

    @classmethod
    def create(cls, limits: SandboxLimits) -> _Cgroup:
        kind = _cgroup_kind()
        parents = dict(_cgroup_parents())[kind]
        remove_stale_cgroups(parents)
        return cls(kind, parents, limits)

    @property
    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in dict.fromkeys(self.dirs.values())]

    def kill(self) -> None:
        deadline = time.monotonic() + 5
        for procs in self.procs_files:
            kill_file = os.path.join(os.path.dirname(procs), "cgroup.kill")
            if os.path.exists(kill_file):
                _write(kill_file, 1)
            while time.monotonic() < deadline:
                with open(procs) as f:
                    pids = [int(p) for p in f.read().split()]
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)

    def memory_peak(self) -> int | None:
        name = "memory.peak" if self.kind == "v2" else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.dirs["memory"], name)) as f:
                return int(f.read())
        except OSError:  # memory.peak is new in Linux 5.19
            return None

    def remove(self) -> None:
        self.kill()
        for directory in dict.fromkeys(self.dirs.values()):
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last processes exit
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)


def _enable_controllers(parent: str) -> None:
    with open(f"{parent}/cgroup.subtree_control") as f:
        enabled = f.read().split()
    missing = [c for c in ("memory", "pids") if c not in enabled]
    if missing:
        _write(f"{parent}/cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _write(path: str, value, optional: bool = False) -> None:
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(str(value))


# ---------------------------------------------------------------------------------------------
# Launcher side: runs as `python -I -S sandbox.py <json>` with the standard library only. It
# joins the run's cgroup, stages the binds (root only), becomes unprivileged and execs bwrap.


def _launch(config: dict) -> None:
    for procs in config["cgroup_procs"]:
        _write(procs, os.getpid())
    if config["stage"]:
        _libc_call("unshare", _CLONE_NEWNS)
        _libc_call("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)
        for source, target in config["stage"]:
            _libc_call("mount", source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None)
    if config["drop_to"]:
        uid, gid = config["drop_to"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    # After the uid change (which clears it): bwrap and the sandbox die with the parent.
    _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.execv(config["bwrap"][0], config["bwrap"])


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args[:3]}: {os.strerror(errno)}")


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
