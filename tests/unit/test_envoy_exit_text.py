"""What `nodemesh status` says about a node Envoy that exited, and how an exit is described."""

from __future__ import annotations

import signal
import subprocess
import time

from nodemesh.cli.commands import _envoy_exit_text
from nodemesh.host.procs import ProcRef
from nodemesh.proxy.envoy import AdminClient, EnvoyProcess


def test_nothing_to_say_without_a_restart() -> None:
    assert _envoy_exit_text({"pid": 7, "restarts": 0, "exits": []}) == ""
    assert _envoy_exit_text({"pid": 7}) == ""


def test_the_last_exit_and_how_long_the_node_was_without_envoy() -> None:
    exits = [{"pid": 41, "how": "exited with code 1", "at": "t1", "downMs": 90.0},
             {"pid": 42, "how": "killed by SIGKILL", "at": "t2", "downMs": 181.4}]
    assert _envoy_exit_text({"restarts": 2, "exits": exits}) == (
        ", restarted 2 times (last: pid 42 killed by SIGKILL at t2, back after 181 ms)")
    exits[-1]["downMs"] = None
    assert _envoy_exit_text({"restarts": 1, "exits": exits[-1:]}).endswith(", NOT BACK YET)")


def _proc(argv: list[str]) -> EnvoyProcess:
    p = subprocess.Popen(argv)
    ref = ProcRef.of(p.pid)
    assert ref is not None
    return EnvoyProcess(ref, pidfile="/nonexistent", admin=AdminClient(socket_path="/x"),
                        popen=p)


def test_an_exit_is_described_by_its_signal_or_code() -> None:
    killed = _proc(["sleep", "30"])
    killed.ref.signal(signal.SIGKILL)
    assert killed.exit_description() == "killed by SIGKILL"
    failed = _proc(["sh", "-c", "sleep 0.2; exit 3"])
    assert failed.exit_description() == "exited with code 3"


def test_an_exit_is_read_from_a_zombie_when_it_is_not_our_popen() -> None:
    """An Envoy the agent did not start itself (double fork): its wait status is read from
    /proc while it is a zombie, before its reaper collects it."""
    p = subprocess.Popen(["sleep", "30"])
    ref = ProcRef.of(p.pid)
    assert ref is not None
    proc = EnvoyProcess(ref, pidfile="/nonexistent", admin=AdminClient(socket_path="/x"))
    ref.signal(signal.SIGKILL)
    for _ in range(100):  # until it is a zombie (we have not reaped it)
        if proc.exit_description() != "exited":
            break
        time.sleep(0.01)
    assert proc.exit_description() == "killed by SIGKILL"
    p.wait()
    assert proc.exit_description() == "exited"  # reaped: too late to tell


def test_the_subreaper_records_what_it_reaped(tmp_path) -> None:
    from nodemesh.host.procs import REAPED_KEEP, describe_exit, reaped_status, record_reaped

    path = str(tmp_path / "reaped.json")
    t0 = time.time()
    record_reaped(path, [(41, signal.SIGKILL), (42, 3 << 8)])
    assert describe_exit(reaped_status(path, 41, t0 - 1)) == "killed by SIGKILL"
    assert describe_exit(reaped_status(path, 42, t0 - 1)) == "exited with code 3"
    assert reaped_status(path, 42, t0 + 60) is None  # an older exit of a recycled pid
    record_reaped(path, [(1000 + i, 0) for i in range(REAPED_KEEP)])
    assert reaped_status(path, 41, 0) is None  # only the last ones are kept
