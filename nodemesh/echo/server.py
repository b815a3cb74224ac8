"""Run the echo server: open every listener of a :class:`~nodemesh.echo.config.Config`.

HTTP, TCP and UDP listeners run on one asyncio loop; each gRPC port is a grpcio server with its
own small thread pool. At start one line per listener goes to stdout, e.g.::

    nodemesh-echo: listening http 0.0.0.0:8080
    nodemesh-echo: listening https 0.0.0.0:8443 (certificate: self-signed)
    nodemesh-echo: listening tcp 0.0.0.0:9090
    nodemesh-echo: listening udp 0.0.0.0:5353
    nodemesh-echo: listening grpc 0.0.0.0:7070 (GrpcEcho, EchoTestService)

A listener that cannot be opened is reported on stderr and the process exits 1 (after closing
what it had opened). SIGTERM or SIGINT closes the listeners and open connections and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
from typing import Any, TextIO

import grpc

from nodemesh.echo import grpcecho, tlsutil
from nodemesh.echo.config import USAGE, Config, PodContext, UsageError, parse_args
from nodemesh.echo.httpserver import EchoHTTP
from nodemesh.echo.l4 import TCPEcho, UDPEchoProtocol

__all__ = ["main", "serve"]

_PREFIX = "nodemesh-echo:"


def _names(ctx: PodContext) -> tuple[list[str], list[str]]:
    """DNS and IP names for a generated certificate."""
    names = [ctx.pod, "localhost", "echo"]
    if ctx.service:
        names.append(ctx.service)
    if ctx.namespace:
        for svc in ("echo", "echo-v1", "echo-v2", ctx.service):
            if svc:
                names += [f"{svc}.{ctx.namespace}", f"{svc}.{ctx.namespace}.svc"]
    ips = ["127.0.0.1"] + ([ctx.pod_ip] if ctx.pod_ip else [])
    return names, ips


async def serve(cfg: Config, ctx: PodContext, out: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; return the process exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    pair: tlsutil.KeyPair | None = None

    def keypair() -> tlsutil.KeyPair:
        nonlocal pair
        if pair is None:
            names, ips = _names(ctx)
            pair = tlsutil.load_keypair(cfg.crt, cfg.key, names, ips)
        return pair

    def log(kind: str, port: int, note: str = "") -> None:
        suffix = f" ({note})" if note else ""
        print(f"{_PREFIX} listening {kind} {cfg.bind}:{port}{suffix}", file=out, flush=True)

    http = EchoHTTP(ctx)
    tcp = TCPEcho()
    servers: list[asyncio.base_events.Server] = []
    datagrams: list[asyncio.DatagramTransport] = []
    grpc_servers: list[grpc.Server] = []
    code = 0
    kind, port = "", 0
    try:
        for port in cfg.http:
            tls = port in cfg.tls
            kind = "https" if tls else "http"
            ssl_ctx = tlsutil.server_context(keypair(), alpn=["http/1.1"]) if tls else None
            servers.append(
                await loop.create_server(
                    http.protocol_factory(port, tls), cfg.bind, port, ssl=ssl_ctx, backlog=1024
                )
            )
            log(kind, port, f"certificate: {keypair().source}" if tls else "")
        for port in cfg.tcp:
            tls = port in cfg.tls
            kind = "tls-tcp" if tls else "tcp"
            ssl_ctx = tlsutil.server_context(keypair()) if tls else None
            servers.append(
                await loop.create_server(tcp.protocol_factory, cfg.bind, port, ssl=ssl_ctx, backlog=1024)
            )
            log(kind, port, f"certificate: {keypair().source}" if tls else "")
        for port in cfg.udp:
            kind = "udp"
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UDPEchoProtocol(ctx.pod), local_addr=(cfg.bind, port)
            )
            datagrams.append(transport)  # type: ignore[arg-type]
            log(kind, port)
        for port in cfg.grpc:
            tls = port in cfg.tls
            kind = "grpcs" if tls else "grpc"
            creds = None
            if tls:
                kp = keypair()
                creds = grpc.ssl_server_credentials([(kp.key_pem, kp.cert_pem)])
            server, health = grpcecho.build_server(cfg.bind, port, ctx, creds)
            server.start()
            grpc_servers.append(server)
            services = "GrpcEcho, EchoTestService" + (", grpc.health.v1.Health" if health else "")
            note = services + (f"; certificate: {keypair().source}" if tls else "")
            log(kind, port, note)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"{_PREFIX} error: cannot listen {kind} {cfg.bind}:{port}: {exc}", file=err, flush=True)
        code = 1
    else:
        gc.freeze()  # startup objects never need collecting: keeps GC pauses short
        await stop.wait()

    for srv in servers:
        srv.close()
    http.close_all()
    tcp.close_all()
    for transport in datagrams:
        transport.close()
    stopped = [srv.stop(grace=0.2) for srv in grpc_servers]
    for event in stopped:
        event.wait(2.0)
    for srv in servers:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(srv.wait_closed(), 1.0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m nodemesh.echo [flags]`` or ``python -m nodemesh.echo client ...``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "client":
        from nodemesh.echo import client

        return client.main(args[1:])
    if "-h" in args or "--help" in args:
        print(USAGE)
        return 0
    try:
        cfg = parse_args(args)
    except UsageError as exc:
        print(f"{_PREFIX} error: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    ctx = PodContext.from_env(version=cfg.version, cluster=cfg.cluster)
    result: Any = asyncio.run(serve(cfg, ctx))
    return int(result)
