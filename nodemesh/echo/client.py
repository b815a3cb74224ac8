"""``python -m nodemesh.echo client URL ...``: the request side of the mesh conformance tests.

The Gateway API mesh tests do not call the echo pods from outside: they exec
``client <scheme>://<host><path> [--method=M] [-H Name:value]...`` inside an echo pod (the Istio
echo image's client) and parse its text output with ``conformance/utils/echo/parse.go``. This
command prints the same format, so a test runner can exec it in a pod (``command_for(["client",
...])``) and parse it the same way:

    [0] Url=http://echo/v1
    [0] Header=X-Test:1
    [0] StatusCode=200
    [0] ResponseHeader=Content-Type:application/json
    [0 body] Host=echo
    [0 body] URL=/v1
    [0 body] Method=GET
    [0 body] Proto=HTTP/1.1
    [0 body] RequestHeader=X-Test:1
    [0 body] Namespace=gateway-conformance-mesh
    [0 body] Hostname=echo-v1-0
    [0 body] ServicePort=8080

For ``http://`` and ``https://`` the JSON answer of :mod:`nodemesh.echo.httpserver` is rewritten
into those ``Field=value`` lines (any other body is printed line by line); redirects are not
followed; a ``Host:`` header sets the Host (and nothing else). For ``grpc://host:port`` the Istio
``proto.EchoTestService/Echo`` method is called (headers become metadata, ``Host`` the
``:authority``) and its text is printed. ``--count=N`` sends N requests, each on a new connection,
with a blank line between the answers. TLS certificates are not verified (test certificates are
self-signed). A failed request is reported on stderr and the exit code is 1.
"""

from __future__ import annotations

import http.client
import json
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

import grpc

from nodemesh.echo import grpcecho
from nodemesh.echo.httpserver import canonical_header_name, parse_go_duration

__all__ = ["ClientArgs", "main", "parse_client_args", "request_once"]

USAGE = (
    "usage: python -m nodemesh.echo client URL [--method=M] [-H 'Name: value']... [--count=N]\n"
    "                                          [--timeout=DURATION] [--insecure-skip-verify]"
)


class ClientUsageError(ValueError):
    """A bad client command line."""


@dataclass
class ClientArgs:
    url: str
    method: str = "GET"
    headers: list[tuple[str, str]] = field(default_factory=list)
    count: int = 1
    timeout: float = 5.0


def parse_client_args(argv: Sequence[str]) -> ClientArgs:
    """Parse ``client`` arguments (Istio echo client spelling); raise ClientUsageError."""
    url = ""
    method = "GET"
    headers: list[tuple[str, str]] = []
    count = 1
    timeout = 5.0
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-"):
            if url:
                raise ClientUsageError(f"unexpected argument {arg!r}: the URL is {url!r}")
            url = arg
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name == "insecure-skip-verify":
            continue
        if name not in ("method", "H", "header", "count", "timeout", "url"):
            raise ClientUsageError(f"unknown flag {arg.split('=', 1)[0]}")
        if not eq:
            if i >= len(args):
                raise ClientUsageError(f"{arg} needs a value")
            value = args[i]
            i += 1
        if name == "method":
            method = value.upper()
        elif name in ("H", "header"):
            key, sep, val = value.partition(":")
            if not sep or not key.strip():
                raise ClientUsageError(f"header {value!r} is not 'Name: value'")
            headers.append((key.strip(), val.strip()))
        elif name == "count":
            if not value.isdigit() or int(value) < 1:
                raise ClientUsageError(f"--count: {value!r} is not a positive number")
            count = int(value)
        elif name == "timeout":
            try:
                timeout = parse_go_duration(value)
            except ValueError:
                raise ClientUsageError(f"--timeout: {value!r} is not a duration") from None
        else:
            url = value
    if not url:
        raise ClientUsageError("a URL is required")
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https", "grpc"):
        raise ClientUsageError(f"unsupported scheme {scheme!r} (http, https, grpc)")
    return ClientArgs(url, method, headers, count, timeout)


def _json_lines(doc: dict[str, object]) -> list[str]:
    lines = [
        f"Host={doc.get('host', '')}",
        f"URL={doc.get('path', '')}",
        f"Method={doc.get('method', '')}",
        f"Proto={doc.get('proto', '')}",
    ]
    headers = doc.get("headers")
    if isinstance(headers, dict):
        for name in sorted(headers):
            values = headers[name]
            for value in values if isinstance(values, list) else [values]:
                lines.append(f"RequestHeader={name}:{value}")
    lines += [f"Namespace={doc.get('namespace', '')}", f"Hostname={doc.get('pod', '')}"]
    if doc.get("httpPort"):
        lines.append(f"ServicePort={doc['httpPort']}")
    return lines


def _http(args: ClientArgs, rid: int) -> str:
    parts = urlsplit(args.url)
    host_header = parts.netloc
    extra: list[tuple[str, str]] = []
    for name, value in args.headers:
        if name.lower() == "host":
            host_header = value
        else:
            extra.append((name, value))
    out = [f"[{rid}] Url={args.url}"]
    out += [f"[{rid}] Header={name}:{value}" for name, value in args.headers]
    port = parts.port
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection(parts.hostname or "", port, timeout=args.timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", port, timeout=args.timeout)
    try:
        target = args.url.split("://", 1)[1][len(parts.netloc) :] or "/"
        conn.putrequest(args.method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host_header)
        conn.putheader("User-Agent", "nodemesh-echo-client")
        for name, value in extra:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        out.append(f"[{rid}] StatusCode={resp.status}")
        headers = sorted(((canonical_header_name(k) or k), v) for k, v in resp.getheaders())
        out += [f"[{rid}] ResponseHeader={k}:{v}" for k, v in headers]
        lines: list[str] = []
        if resp.getheader("Content-Type", "") == "application/json":
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and "pod" in doc:
                lines = _json_lines(doc)
        if not lines:
            lines = [ln for ln in body.decode("utf-8", "replace").split("\n") if ln]
        out += [f"[{rid} body] {line}" for line in lines]
    finally:
        conn.close()
    return "\n".join(out) + "\n"


def _grpc(args: ClientArgs, rid: int) -> str:
    parts = urlsplit(args.url)
    authority = None
    metadata: list[tuple[str, str]] = []
    for name, value in args.headers:
        if name.lower() == "host":
            authority = value
        else:
            metadata.append((name.lower(), value))
    metadata.append(("x-request-id", str(rid)))
    text = grpcecho.call_istio(parts.netloc, "", metadata, args.timeout, authority=authority)
    out = [f"[{rid}] grpcecho.Echo({args.url})"]
    out += [f"[{rid} body] {line}" for line in text.split("\n") if line]
    return "\n".join(out) + "\n"


def request_once(args: ClientArgs, rid: int = 0) -> str:
    """Send request number ``rid`` and return its output block."""
    if urlsplit(args.url).scheme == "grpc":
        return _grpc(args, rid)
    return _http(args, rid)


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    if "-h" in argv or "--help" in argv:
        print(USAGE, file=out)
        return 0
    try:
        args = parse_client_args(argv)
    except ClientUsageError as exc:
        print(f"nodemesh-echo client: error: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    failed = 0
    blocks: list[str] = []
    for rid in range(args.count):
        try:
            blocks.append(request_once(args, rid))
        except (OSError, http.client.HTTPException, grpc.RpcError) as exc:
            failed += 1
            detail = exc.details() if isinstance(exc, grpc.RpcError) else exc  # type: ignore[attr-defined]
            print(f"[{rid} error] {type(exc).__name__}: {detail}", file=sys.stderr)
    out.write("\n".join(blocks))
    out.flush()
    return 1 if failed else 0
