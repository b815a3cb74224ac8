"""Run an echo server as a child process in tests (loopback only) and always stop it.

    with EchoProcess(["--port", str(free_port())]) as echo:
        ...  # echo.pid, echo.lines (the "listening" lines)

The process is started with ``--bind=127.0.0.1`` unless the args give ``--bind``; ``start``
waits until every expected listener has logged its line, and ``stop`` sends SIGTERM to that PID
(SIGKILL after a timeout) and reaps it, so nothing is left running.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import TracebackType

from nodemesh.echo import command_for

__all__ = ["EchoProcess", "free_port"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free on 127.0.0.1 right now (TCP by default, or ``socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoProcess:
    """``python -m nodemesh.echo`` as a child process bound to 127.0.0.1."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        listeners: int | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.args = list(args)
        if not any(a == "--bind" or a.startswith("--bind=") for a in self.args):
            self.args.append("--bind=127.0.0.1")
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.expected = listeners if listeners is not None else _count_listeners(self.args)
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> EchoProcess:
        cmd = command_for(self.args)
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + self.timeout
        assert self.proc.stdout is not None
        while len(self.lines) < self.expected:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                err = self._stderr()
                self.stop()
                raise RuntimeError(f"echo server did not start: {self.lines} {err}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if ready:
                line = self.proc.stdout.readline()
                if line and "listening" in line:
                    self.lines.append(line.rstrip("\n"))
        return self

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None or self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM this PID, wait, SIGKILL if needed; return the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        return proc.returncode

    def __enter__(self) -> EchoProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _count_listeners(args: Sequence[str]) -> int:
    """How many 'listening' lines the server will print for these args."""
    from nodemesh.echo.config import parse_args

    cfg = parse_args(args, env={})
    return len(cfg.http) + len(cfg.tcp) + len(cfg.udp) + len(cfg.grpc)
