"""The echo server's process behaviour: flags, start-up failures, TLS files, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from nodemesh.echo import command_for
from nodemesh.echo.testing import EchoProcess, free_port
from nodemesh.echo.tlsutil import self_signed


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command_for(list(args)), capture_output=True, text=True, timeout=timeout)


def test_unknown_flag_is_refused() -> None:
    r = run("--port=8080", "--bogus=1")
    assert r.returncode == 2
    assert "unknown flag --bogus" in r.stderr
    assert "usage:" in r.stderr
    assert "listening" not in r.stdout


def test_bad_port_is_refused() -> None:
    r = run("--port=eighty")
    assert r.returncode == 2
    assert "--port" in r.stderr


def test_help() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert "--tls" in r.stdout


def test_port_in_use_exits_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run(f"--port={port}", "--bind=127.0.0.1")
    assert r.returncode == 1
    assert f"cannot listen http 127.0.0.1:{port}" in r.stderr


def test_sigterm_exits_zero_promptly() -> None:
    http, tcp, grpc_port = free_port(), free_port(), free_port()
    udp = free_port(socket.SOCK_DGRAM)
    echo = EchoProcess([f"--port={http}", f"--tcp={tcp}", f"--udp={udp}", f"--grpc={grpc_port}"])
    with echo:
        assert [line.split()[2] for line in echo.lines] == ["http", "tcp", "udp", "grpc"]
        # Open connections (one idle keep-alive, one TCP echo, one waiting on a delay) must
        # not hold the shutdown up.
        idle = socket.create_connection(("127.0.0.1", http), timeout=5)
        idle.sendall(b"GET / HTTP/1.1\r\nHost: e\r\n\r\n")
        idle.recv(65536)
        waiting = socket.create_connection(("127.0.0.1", http), timeout=5)
        waiting.sendall(b"GET /?delay=60s HTTP/1.1\r\nHost: e\r\n\r\n")
        stream = socket.create_connection(("127.0.0.1", tcp), timeout=5)
        stream.sendall(b"x")
        stream.recv(1)
        time.sleep(0.2)
        start = time.monotonic()
        os.kill(echo.pid, signal.SIGTERM)
        assert echo.proc is not None
        code = echo.proc.wait(10)
        elapsed = time.monotonic() - start
        for s in (idle, waiting, stream):
            s.close()
    assert code == 0
    assert elapsed < 3.0, f"took {elapsed:.2f}s to stop"


def test_tls_uses_given_files(tmp_path: Path) -> None:
    pair = self_signed(["from-file.example"], ["127.0.0.1"])
    crt, key = tmp_path / "cert.crt", tmp_path / "cert.key"
    crt.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    port = free_port()
    with EchoProcess([f"--port={port}", f"--tls={port}", f"--crt={crt}", f"--key={key}"]) as e:
        assert f"certificate: file:{crt}" in e.lines[0]
        ctx = ssl.create_default_context(cadata=pair.cert_pem.decode())
        ctx.check_hostname = True
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="from-file.example") as s,
        ):
            s.sendall(b"GET /tls HTTP/1.1\r\nHost: from-file.example\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert b'"serverName":"from-file.example"' in data


def test_tls_grpc_port() -> None:
    from nodemesh.echo import grpcecho

    port = free_port()
    with EchoProcess([f"--grpc={port}", f"--tls={port}"]) as e:
        assert "grpcs" in e.lines[0]
        # The generated certificate is not known to the client: fetch it from the server.
        pem = ssl.get_server_certificate(("127.0.0.1", port)).encode()
        resp = grpcecho.call(f"127.0.0.1:{port}", "Echo", root_certificates=pem, server_name="localhost")
    assert resp["assertions"]["tls_assertions"]["negotiated_protocol"] == "h2"
