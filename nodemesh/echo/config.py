"""Command-line flags and pod context of the echo server.

Flags follow the conformance image ``echo-advanced`` (the Istio echo server), which the Gateway API
mesh manifests run with ``--tcp=9090 --port=8080 --grpc=7070 --port=8443 --tls=8443
--crt=/cert.crt --key=/cert.key``:

``--port=P``   HTTP/1.1 listener (repeatable; ``--port=8080,8081`` also works)
``--tcp=P``    TCP echo listener (repeatable)
``--udp=P``    UDP echo listener (repeatable)
``--grpc=P``   gRPC (h2c) listener (repeatable)
``--tls=P``    serve TLS on P, which must also be given as ``--port``, ``--tcp`` or ``--grpc``
``--crt=F``, ``--key=F``  PEM certificate and key for the TLS listeners; when either file is
               missing a self-signed certificate is generated at start
``--version=V``  service version reported as ``ServiceVersion=`` in the Istio text format
``--cluster=C``  cluster name reported as ``Cluster=`` in the Istio text format
``--bind=ADDR``  address to listen on (nodemesh extension; default ``0.0.0.0``)

Anything else is refused with a message naming the flag. With no arguments at all the server
listens like the conformance "consumer" Deployment (which has no args but declares the ports):
HTTP on ``$HTTP_PORT`` or 8080, HTTPS on ``$HTTPS_PORT`` or 8443, TCP 9090, gRPC 7070.
(echo-basic's own default HTTP port is 3000, but no nodemesh manifest declares 3000, and the
echo-advanced image the manifests name defaults to 8080/9090/7070.)

The pod context comes from the downward-API variables echo-basic reads: ``POD_NAME``,
``NAMESPACE``, ``SERVICE_NAME``, ``INGRESS_NAME``; nodemesh also sets ``POD_IP`` and
``NODE_NAME``. When ``POD_NAME`` is unset the host name is used, as in a Kubernetes pod.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["USAGE", "Config", "PodContext", "UsageError", "parse_args"]

USAGE = """\
usage: python -m nodemesh.echo [--port=P]... [--tcp=P]... [--udp=P]... [--grpc=P]...
                               [--tls=P]... [--crt=FILE] [--key=FILE] [--version=V]
                               [--cluster=C] [--bind=ADDR]
       python -m nodemesh.echo client URL [--method=M] [-H 'Name: value']... [--count=N]
                               [--timeout=SECONDS] [--insecure-skip-verify]
  With no arguments: HTTP on $HTTP_PORT or 8080, HTTPS on $HTTPS_PORT or 8443,
  TCP echo on 9090, gRPC on 7070."""

_LIST_FLAGS = ("port", "tcp", "udp", "grpc", "tls")
_VALUE_FLAGS = ("crt", "key", "version", "cluster", "bind")


class UsageError(ValueError):
    """A bad command line: the message names the flag and what is wrong with it."""


@dataclass
class Config:
    """Which listeners to open, and with which TLS material."""

    http: list[int] = field(default_factory=list)
    tcp: list[int] = field(default_factory=list)
    udp: list[int] = field(default_factory=list)
    grpc: list[int] = field(default_factory=list)
    tls: set[int] = field(default_factory=set)
    crt: str | None = None
    key: str | None = None
    version: str = ""
    cluster: str = ""
    bind: str = "0.0.0.0"
    defaults: bool = False  # True when started without arguments


@dataclass(frozen=True)
class PodContext:
    """Where this echo server runs, as reported in every response."""

    namespace: str = ""
    ingress: str = ""
    service: str = ""
    pod: str = ""
    pod_ip: str = ""
    node: str = ""
    version: str = ""
    cluster: str = ""

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, version: str = "", cluster: str = ""
    ) -> PodContext:
        e = os.environ if env is None else env
        pod = e.get("POD_NAME") or e.get("HOSTNAME") or socket.gethostname()
        return cls(
            namespace=e.get("NAMESPACE", ""),
            ingress=e.get("INGRESS_NAME", ""),
            service=e.get("SERVICE_NAME", ""),
            pod=pod,
            pod_ip=e.get("POD_IP", ""),
            node=e.get("NODE_NAME", ""),
            version=version,
            cluster=cluster,
        )


def _port(flag: str, text: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise UsageError(f"--{flag}: {text!r} is not a port number (1-65535)")
    return int(text)


def _env_port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return _port(name, raw)
    except UsageError:
        raise UsageError(f"${name}: {raw!r} is not a port number (1-65535)") from None


def parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Config:
    """Parse the server's flags; raise :class:`UsageError` on anything unknown or invalid."""
    e = os.environ if env is None else env
    if not argv:
        https = _env_port(e, "HTTPS_PORT", 8443)
        cfg = Config(
            http=[_env_port(e, "HTTP_PORT", 8080), https],
            tcp=[9090],
            grpc=[7070],
            tls={https},
            defaults=True,
        )
        _check(cfg)
        return cfg

    cfg = Config()
    lists: dict[str, list[int]] = {f: [] for f in _LIST_FLAGS}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"unexpected argument {arg!r} (flags look like --port=8080)")
        name, eq, value = arg[2:].partition("=")
        if name not in _LIST_FLAGS and name not in _VALUE_FLAGS:
            raise UsageError(f"unknown flag --{name}")
        if not eq:
            if i >= len(args):
                raise UsageError(f"--{name} needs a value")
            value = args[i]
            i += 1
        if name in _LIST_FLAGS:
            parts = [p for p in value.split(",") if p.strip()]
            if not parts:
                raise UsageError(f"--{name} needs a port number")
            lists[name].extend(_port(name, p) for p in parts)
        elif name == "bind":
            if not value:
                raise UsageError("--bind needs an address")
            cfg.bind = value
        else:
            setattr(cfg, name, value)
    cfg.http = list(dict.fromkeys(lists["port"]))
    cfg.tcp = list(dict.fromkeys(lists["tcp"]))
    cfg.udp = list(dict.fromkeys(lists["udp"]))
    cfg.grpc = list(dict.fromkeys(lists["grpc"]))
    cfg.tls = set(lists["tls"])
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    seen: dict[int, str] = {}
    for kind, ports in (("port", cfg.http), ("tcp", cfg.tcp), ("grpc", cfg.grpc)):
        for p in ports:
            if p in seen:
                raise UsageError(f"port {p} is given both as --{seen[p]} and as --{kind}")
            seen[p] = kind
    for p in sorted(cfg.tls):
        if p not in seen:
            if p in cfg.udp:
                raise UsageError(f"--tls={p}: TLS is not supported on UDP ports")
            raise UsageError(f"--tls={p}: port {p} is not one of the --port/--tcp/--grpc ports")
    if not (cfg.http or cfg.tcp or cfg.udp or cfg.grpc):
        raise UsageError("no listener: give at least one of --port, --tcp, --udp, --grpc")
