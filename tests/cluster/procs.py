"""Background daemons with pid files in the state dir: started detached (they outlive the CLI and are shared
by pytest workers), stopped by process group, SIGTERM then SIGKILL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .paths import state_dir

# The daemons this process started, held so that subprocess's own clean-up of dropped Popen objects (run from
# any thread's next Popen) never reaps them first: their exit status is ours to report (exit_status).
_children: dict[int, subprocess.Popen[bytes]] = {}


def pid_file(name: str) -> Path:
    return state_dir() / "pids" / f"{name}.pid"


def log_file(name: str) -> Path:
    path = state_dir() / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def pid_of(name: str) -> int | None:
    """The daemon's pid when it runs; None for a dead one, a zombie, or a pid that another program reuses
    (the pid file records the program, so a file left by a killed session never adopts a stranger)."""
    try:
        pid_text, _, program = pid_file(name).read_text().strip().partition(" ")
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return pid if runs_program(program, stat, cmdline) else None


def runs_program(program: str, stat: str, cmdline: bytes) -> bool:
    """Whether a process (its ``/proc/<pid>/stat`` and ``cmdline``) is a live run of ``program`` (empty: any).

    A script (a Python console script) runs as "<interpreter> <script>": the program is the first or second
    argument. Right after ``Popen`` returns, the kernel may still be setting up the new program and ``cmdline``
    reads empty (seen with dockerd; CI's "etcd failed to start" with an empty log had the same signature); then
    the command name in ``stat`` (the executable's file name, at most 15 characters) decides.
    """
    comm, _, rest = stat.partition(" (")[2].rpartition(")")
    if rest.split()[0] == "Z":
        return False
    if not program:
        return True
    args = [arg.decode(errors="replace") for arg in cmdline.split(b"\0")[:2] if arg]
    if args:
        return program in args
    return comm == Path(program).name[:15]


def is_running(name: str) -> bool:
    return pid_of(name) is not None


def start(name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    """Start `argv` detached in its own session; return its pid. No-op when already running."""
    existing = pid_of(name)
    if existing:
        return existing
    log = log_file(name)
    pid_path = pid_file(name)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n=== {time.strftime('%H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True, close_fds=True)
    _children[proc.pid] = proc
    pid_path.write_text(f"{proc.pid} {argv[0]}")
    return proc.pid


def exit_status(name: str) -> str | None:
    """How a daemon that this process started has ended ("exit code 1", "killed by SIGKILL"), reaping it;
    None while it runs or when another process started it (its status is not ours to read)."""
    recorded = _recorded_pid(name)
    proc = _children.get(recorded) if recorded else None
    code = proc.poll() if proc else None
    if code is None:
        return None
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _recorded_pid(name: str) -> int | None:
    try:
        return int(pid_file(name).read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None


def exited_early(name: str) -> bool:
    return pid_file(name).exists() and not is_running(name)


def stop(name: str, timeout: float = 15.0) -> None:
    pid = pid_of(name)
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_of(name):
            time.sleep(0.2)
        if pid_of(name):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
        _reap(pid)
    recorded = _recorded_pid(name)
    if recorded in _children:  # ours, and dead already: collect it
        _children.pop(recorded).poll()
    pid_file(name).unlink(missing_ok=True)


def _reap(pid: int) -> None:
    """Collect the exit status when the daemon is our own child, so it leaves no zombie behind."""
    proc = _children.pop(pid, None)
    if proc is not None:
        proc.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def machine_lock(name: str = "harness") -> Iterator[None]:
    """One `up`/`down` at a time on this machine (pytest workers and helpers share the cluster)."""
    path = state_dir() / f"{name}.lock"
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
