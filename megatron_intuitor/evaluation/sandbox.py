"""Run an untrusted Python program in its own process, with limits and without network.

Model-generated code (HumanEval completions) is never `exec`-ed in our process. Each program
runs as `python -I program.py` in a fresh interpreter started by a small launcher (this file,
run as a script with only the standard library) that, before the program starts:

- sets rlimits: CPU seconds, address space, file size (which also bounds the captured output),
  open files, no core dumps;
- enters new Linux namespaces (root: mount + network + PID; otherwise a user namespace on top,
  where the kernel allows one): the network namespace has only a loopback that is down, so no
  socket can reach anything; the mount namespace puts empty tmpfs over /tmp, /var/tmp, /run and
  /dev/shm (hiding sockets such as Ray's), mounts the program's throwaway directory at
  /tmp/work, and remounts everything else read-only; the PID namespace sees only the program,
  and every process in it dies with the program;
- drops every capability and sets no_new_privs, so the program cannot undo any of this;
- gives the program an empty environment (no API keys), stdin closed, cwd = its directory.

The launcher does this itself rather than in a `preexec_fn`, which is unsafe in a threaded
parent (Ray workers are threaded). The parent enforces a wall-clock limit and kills the
launcher's process group; the PID namespace then takes every descendant with it.
`isolation_available()` says whether namespaces work here; `run_python` refuses to run without
them unless `require_isolation=False` (rlimits, own process and directory only).
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from functools import lru_cache

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 24, 38
# Per-mount flags that a bind remount must repeat (inside a user namespace the kernel refuses
# to clear flags inherited from the parent namespace).
_MOUNT_OPTION_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                       "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
                       "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}
_HIDDEN_DIRS = ("/tmp", "/var/tmp", "/run", "/dev/shm")
_WORK_DIR = "/tmp/work"
_SETUP_FAILED = 125  # launcher exit status when isolation could not be set up


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30
    file_bytes: int = 16 << 20  # per file written, captured stdout/stderr included
    open_files: int = 64
    output_chars: int = 8192  # how much of stdout/stderr is kept in the result


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when the wall clock killed it
    stdout: str
    stderr: str
    isolated: bool

    @property
    def timed_out(self) -> bool:
        return self.returncode is None

    @property
    def passed(self) -> bool:
        return self.returncode == 0


class SandboxUnavailable(RuntimeError):
    pass


def run_python(source: str, limits: SandboxLimits = SandboxLimits(), *,
               require_isolation: bool = True) -> SandboxResult:
    """Run `source` as a Python program under `limits` in a throwaway directory."""
    isolate = isolation_available()
    if require_isolation and not isolate:
        raise SandboxUnavailable(
            "cannot create mount/network/PID namespaces here (not root and user namespaces are "
            "disabled), so untrusted code would run with network access and a writable file "
            "system; pass require_isolation=False to accept rlimits and a temp dir only")
    work_dir = tempfile.mkdtemp(prefix="sandbox_")
    try:
        with open(os.path.join(work_dir, "program.py"), "w") as f:
            f.write(source)
        # The launcher writes one byte here once the program's confinement is in place; the
        # program never holds this pipe, so it cannot fake (or hide) a setup failure.
        ready_read, ready_write = os.pipe()
        config = dict(work_dir=work_dir, isolate=isolate, ready_fd=ready_write,
                      cpu_seconds=limits.cpu_seconds, memory_bytes=limits.memory_bytes,
                      file_bytes=limits.file_bytes, open_files=limits.open_files)
        with open(os.path.join(work_dir, ".stdout"), "w+b") as out, \
                open(os.path.join(work_dir, ".stderr"), "w+b") as err, \
                os.fdopen(ready_read, "rb") as ready:
            try:
                launcher = subprocess.Popen(
                    [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=work_dir,
                    env=_program_env(work_dir), start_new_session=True, pass_fds=(ready_write,))
            finally:
                os.close(ready_write)
            try:
                returncode = launcher.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.wait()
                returncode = None
            stdout, stderr = (_read_head(f, limits.output_chars) for f in (out, err))
            confined = ready.read(1) == b"1"
        if returncode == _SETUP_FAILED and not confined:
            raise SandboxUnavailable(stderr.strip())
        return SandboxResult(returncode, stdout, stderr, isolate)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


@lru_cache(maxsize=1)
def isolation_available() -> bool:
    """Whether this machine lets the launcher create its namespaces (probed once)."""
    probe = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         f"import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); "
         f"flags = {_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID} | "
         f"(0 if os.geteuid() == 0 else {_CLONE_NEWUSER}); "
         f"raise SystemExit(0 if libc.unshare(flags) == 0 else 1)"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return probe.returncode == 0


def _program_env(work_dir: str) -> dict[str, str]:
    # Nothing inherited: the trainer's environment may hold credentials (WANDB_API_KEY, ...).
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work_dir, "TMPDIR": work_dir,
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0"}


def _read_head(f, max_chars: int) -> str:
    f.seek(0)
    return f.read(max_chars * 4).decode("utf-8", errors="replace")[:max_chars]


# ---------------------------------------------------------------------------------------------
# Launcher side: runs as `python -I -S sandbox.py <json>` with the standard library only.


def _launch(config: dict) -> None:
    ready_fd, work_dir = config["ready_fd"], config["work_dir"]
    try:
        _set_rlimits(config)
        if config["isolate"]:
            work_dir = _enter_namespaces(work_dir)
    except OSError as e:
        print(f"sandbox setup failed: {e}", file=sys.stderr)
        os._exit(_SETUP_FAILED)
    if config["isolate"]:
        pid = os.fork()  # the first child is PID 1 of the new PID namespace
        if pid:
            os.close(ready_fd)
            _, status = os.waitpid(pid, 0)
            _exit_like(status)
        try:
            _libc_call("prctl", _PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            _libc_call("mount", b"proc", b"/proc", b"proc",
                       _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            _drop_capabilities()
        except OSError as e:
            print(f"sandbox setup failed: {e}", file=sys.stderr)
            os._exit(_SETUP_FAILED)
    os.write(ready_fd, b"1")
    os.close(ready_fd)
    os.chdir(work_dir)
    env = dict(os.environ, HOME=work_dir, TMPDIR=work_dir)
    os.execve(sys.executable, [sys.executable, "-I", "program.py"], env)


def _exit_like(status: int) -> None:
    """End the launcher the way the program ended, so the parent sees the same status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # their handlers cannot be changed
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _set_rlimits(config: dict) -> None:
    # soft == hard: the kernel then sends SIGKILL, which PID 1 of a namespace (the program)
    # cannot ignore, unlike the SIGXCPU of a lower soft limit.
    for limit, value in ((resource.RLIMIT_CPU, (config["cpu_seconds"],) * 2),
                         (resource.RLIMIT_AS, (config["memory_bytes"],) * 2),
                         (resource.RLIMIT_FSIZE, (config["file_bytes"],) * 2),
                         (resource.RLIMIT_NOFILE, (config["open_files"],) * 2),
                         (resource.RLIMIT_CORE, (0, 0))):
        resource.setrlimit(limit, value)


def _enter_namespaces(work_dir: str) -> str:
    """New mount/network/PID namespaces; returns the program directory's path inside them."""
    uid, gid = os.geteuid(), os.getegid()
    as_root = uid == 0
    _libc_call("unshare", _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID
               | (0 if as_root else _CLONE_NEWUSER))
    if not as_root:  # map ourselves so that we hold capabilities inside the new namespace
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _libc_call("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)
    # Keep a handle on the program directory: it lives under /tmp, which gets covered below.
    work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
    for hidden in _HIDDEN_DIRS:
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            _libc_call("mount", b"tmpfs", hidden.encode(), b"tmpfs",
                       _MS_NOSUID | _MS_NODEV, b"size=64k,mode=755")
    os.mkdir(_WORK_DIR)
    _libc_call("mount", f"/proc/self/fd/{work_fd}".encode(), _WORK_DIR.encode(), None,
               _MS_BIND | _MS_REC, None)
    os.close(work_fd)
    for mount_point, flags in _mounts():
        if mount_point == _WORK_DIR:
            continue
        # Mounts shadowed by the tmpfs above can no longer be reached by path: skip them.
        if any(mount_point.startswith(h + "/") for h in _HIDDEN_DIRS if h != "/tmp"):
            continue
        _libc_call("mount", None, mount_point.encode(), None,
                   _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags, None)
    return _WORK_DIR


def _mounts() -> list[tuple[str, int]]:
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4].encode().decode("unicode_escape")  # "\040" is a space
            flags = 0
            for option in fields[5].split(","):
                flags |= _MOUNT_OPTION_FLAGS.get(option, 0)
            mounts.append((mount_point, flags))
    return mounts


def _drop_capabilities() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _libc_call("prctl", _PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words): all empty
    _libc_call("capset", header, data)
    _libc_call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


_LIBC = None


def _libc_call(name: str, *args) -> None:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    if getattr(_LIBC, name)(*args) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{name}{args[:2]}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
