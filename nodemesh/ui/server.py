"""`nodemesh ui`: a live service map of the cluster, served on the loopback address.

A stdlib `ThreadingHTTPServer` serves the page (static files in this package, no external assets)
and a small JSON API over the collector's rolling window of flows:

- ``GET /`` the page; ``GET /static/<file>`` its script, style sheet and icon
- ``GET /api/graph`` nodes (workloads, services, reserved entities) and edges with their numbers
- ``GET /api/flows?workload=ID&limit=50`` recent flows involving a graph node, newest first
  (``from=ID&to=ID`` instead: the flows of one edge)
- ``GET /api/events`` Server-Sent Events: the graph, pushed every second
- ``GET /healthz``

It reads agent sockets (root-only), so it runs as root, like `nodemesh observe`; it binds a
loopback address only, and answers only requests addressed to one (no DNS rebinding).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nodemesh.cluster.config import load_cluster, state_dir_from
from nodemesh.errors import NodemeshError
from nodemesh.host import netns
from nodemesh.store import open_store
from nodemesh.ui.collector import Collector

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SSE_INTERVAL = 1.0
log = logging.getLogger("nodemesh.ui")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    server_version = "nodemesh-ui"
    collector: Collector  # set on the subclass `make_handler` builds

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    # ---- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: object, status: int = 200) -> None:
        self._send(status, json.dumps(data, separators=(",", ":")).encode(), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": message}, status)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname or ""
        if host and not _loopback(host):  # a browser always sends Host: no DNS rebinding
            self._error(HTTPStatus.FORBIDDEN, f"host {host!r} is not a loopback address")
            return
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        try:
            if url.path in ("/", "/index.html"):
                self._static("index.html")
            elif url.path.startswith("/static/"):
                self._static(url.path[len("/static/"):])
            elif url.path == "/favicon.ico":
                self._static("favicon.svg")
            elif url.path == "/api/graph":
                self._send(200, self.collector.graph_json()[1], "application/json")
            elif url.path == "/api/flows":
                self._flows(query)
            elif url.path == "/api/events":
                self._events()
            elif url.path == "/healthz":
                self._json({"ok": True})
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ---- routes -----------------------------------------------------------------------------
    def _static(self, name: str) -> None:
        ctype = STATIC_FILES.get(name)
        if ctype is None:
            self._error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
            return
        with open(os.path.join(STATIC_DIR, name), "rb") as f:
            self._send(200, f.read(), ctype, cache="no-cache")

    def _flows(self, query: dict[str, list[str]]) -> None:
        def one(key: str) -> str | None:
            return (query.get(key) or [None])[-1] or None

        try:
            limit = max(1, min(1000, int(one("limit") or 50)))
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "limit: must be a number")
            return
        node_id, src, dst = one("workload"), one("from"), one("to")
        if not (node_id or src or dst):
            self._error(HTTPStatus.BAD_REQUEST, "give workload=ID, or from=ID and/or to=ID")
            return
        flows = self.collector.flows(node_id=node_id, src=src, dst=dst, limit=limit)
        self._json({"workload": node_id, "from": src, "to": dst, "limit": limit,
                    "window": self.collector.window, "flows": flows})

    def _events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.write(b"retry: 1000\n\n")
        version = -1
        while not self.collector.stop.is_set():
            version, body = self.collector.wait_graph(version, SSE_INTERVAL * 1.5)
            self.wfile.write(b"event: graph\ndata: " + body + b"\n\n")
            self.wfile.flush()
        self.close_connection = True


def make_handler(collector: Collector) -> type[Handler]:
    return type("BoundHandler", (Handler,), {"collector": collector})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nodemesh ui",
                                description="serve a live service map of the cluster")
    p.add_argument("--state-dir", help="the cluster's state directory "
                   "(default: $NODEMESH_STATE_DIR or /var/lib/nodemesh)")
    p.add_argument("--address", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--port", type=int, default=9970, help="port to listen on (default 9970)")
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds of flows the numbers aggregate (default 60)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return serve(args)
    except NodemeshError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return e.exit_code


def serve(args: argparse.Namespace) -> int:
    if not _loopback(args.address):
        raise NodemeshError(f"--address {args.address}: the map shows the cluster's traffic "
                            "without authentication, so it listens on a loopback address only "
                            "(forward the port with ssh -L to view it from elsewhere)", 2)
    if not 0 <= args.port <= 65535:
        raise NodemeshError(f"--port {args.port}: must be 0-65535", 2)
    if not 1 <= args.window <= 3600:
        raise NodemeshError(f"--window {args.window:g}: must be 1-3600 seconds", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_cluster(state_dir_from(args.state_dir))
    netns.enter_for_store(cfg.store)  # (an etcd on the underlay: before any thread starts)
    if os.geteuid() != 0:
        print("warning: agent sockets are root-only; run `nodemesh ui` as root to see flows",
              file=sys.stderr)
    collector = Collector(cfg, open_store(cfg.state_dir), args.window)
    try:
        # The listener on the host's loopback, even when the process reaches its store from
        # the underlay's namespace: a socket stays in the namespace it was made in.
        server = netns.in_original_netns(ThreadingHTTPServer, (args.address, args.port),
                                         make_handler(collector))
    except OSError as e:
        raise NodemeshError(f"cannot listen on {args.address}:{args.port}: {e.strerror}") from None
    server.daemon_threads = True
    collector.start()

    def stop(signum: int, frame: object) -> None:
        collector.close()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    print(f"nodemesh ui: cluster {cfg.name} ({len(cfg.nodes)} nodes) on http://{host}:{port}/ "
          f"(window {args.window:g}s); Ctrl-C stops it", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        collector.close()
        server.server_close()
    return 0
