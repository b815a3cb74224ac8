"""Processes identified by PID and start time, so a recycled PID is never mistaken for ours."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nodemesh.host.files import read_json, write_json_atomic


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on: index i is field i + 3."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(")") + 2:].split()


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    rest = _stat(pid)
    if rest is None or rest[0] == "Z":  # a zombie is gone for our purposes
        return None
    return int(rest[19])


def zombie_exit_status(pid: int) -> int | None:
    """The wait status of an exited, not yet reaped process (field 52 of /proc/PID/stat)."""
    rest = _stat(pid)
    if rest is None or rest[0] != "Z" or len(rest) < 50:
        return None
    return int(rest[49])


def describe_exit(status: int | None) -> str:
    """A wait status as words: "killed by SIGKILL", "exited with code 1"; "exited" if unknown."""
    if status is None:
        return "exited"
    if os.WIFSIGNALED(status):
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


@dataclass(frozen=True)
class ProcRef:
    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcRef | None:
        st = start_time(pid)
        return cls(pid, st) if st is not None else None

    def alive(self) -> bool:
        return start_time(self.pid) == self.start

    def signal(self, sig: int) -> bool:
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def to_json(self) -> dict:
        return {"pid": self.pid, "start": self.start}

    @classmethod
    def from_json(cls, d: dict | None) -> ProcRef | None:
        if not d or "pid" not in d:
            return None
        return cls(int(d["pid"]), int(d["start"]))


def stop(ref: ProcRef | None, grace: float = 5.0) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL."""
    if ref is None or not ref.signal(signal.SIGTERM):
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap_children()
        if not ref.alive():
            return
        time.sleep(0.02)
    ref.signal(signal.SIGKILL)
    for _ in range(100):
        reap_children()
        if not ref.alive():
            return
        time.sleep(0.01)


def reap_children() -> list[tuple[int, int]]:
    """Collect exited children without blocking; returns [(pid, wait status)]."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, status))


REAPED_KEEP = 64  # the last exits a subreaper records


def record_reaped(path: str, reaped: list[tuple[int, int]]) -> None:
    """Append what a subreaper reaped, (pid, wait status), to the JSON list at `path` (the last
    REAPED_KEEP): a process that started one of them and was not its parent (a double fork)
    can still learn how it ended (`reaped_status`)."""
    if not reaped:
        return
    now = time.time()
    old = read_json(path) or []
    new = [*old, *({"pid": pid, "status": st, "at": now} for pid, st in reaped)]
    write_json_atomic(path, new[-REAPED_KEEP:])


def reaped_status(path: str, pid: int, since: float) -> int | None:
    """The wait status `record_reaped` recorded for `pid` reaped at `since` or later."""
    for e in reversed(read_json(path) or []):
        if e.get("pid") == pid and e.get("at", 0) >= since:
            return int(e["status"])
    return None


def set_child_subreaper() -> None:
    """Orphans of our descendants are reparented to us (and reaped), not to PID 1."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def spawn_detached(argv: list[str], *, log_path: str, env: dict | None = None,
                   cwd: str | None = None,
                   preexec: Callable[[], None] | None = None) -> ProcRef:
    """Start a long-lived process that is not our child (double fork), return its reference.

    It is reparented to the nearest subreaper (the cluster daemon), so it survives our death
    and is still reaped when it exits.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate
        try:
            os.close(r)
            os.setsid()
            gpid = os.fork()
            if gpid == 0:
                os.close(w)
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.closerange(3, 65536)
                if cwd:
                    os.chdir(cwd)
                if preexec:
                    preexec()
                os.execvpe(argv[0], argv, env if env is not None else os.environ)
            os.write(w, str(gpid).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = f.read()
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    gpid = int(data)
    for _ in range(200):
        ref = ProcRef.of(gpid)
        if ref is not None:
            return ref
        time.sleep(0.005)
    raise RuntimeError(f"{argv[0]} exited at once; see {log_path}")


def command_lines() -> Iterator[tuple[int, str]]:
    """(pid, command line with spaces) of every process this one can read, but itself."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(pid) != os.getpid():
            yield int(pid), cmd
