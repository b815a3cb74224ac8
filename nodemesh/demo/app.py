"""The demo's service: answers HTTP with JSON naming itself, after calling its upstream.

`python -m nodemesh.demo.app --name api --port 8080 --upstream http://store:8080/` answers
`GET /anything` with `{"service": "api", "version": ..., "pod": ..., "upstream": {...}}`, where
`upstream` is the JSON its upstream returned (or the error), so one request through the whole
chain shows every hop. Standard library only; one thread per connection.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def make_handler(name: str, version: str, upstream: str | None) -> type[BaseHTTPRequestHandler]:
    up = urllib.parse.urlsplit(upstream) if upstream else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            body: dict = {"service": name, "version": version, "pod": os.environ.get("POD_NAME", ""),
                          "method": self.command, "path": self.path}
            status = 200
            if up is not None:
                try:
                    conn = http.client.HTTPConnection(up.hostname, up.port or 80, timeout=3)
                    conn.request("GET", (up.path or "/") + self.path.lstrip("/"))
                    resp = conn.getresponse()
                    data = resp.read()
                    conn.close()
                    try:
                        body["upstream"] = json.loads(data)
                    except ValueError:
                        body["upstream"] = {"status": resp.status, "body": data[:200].decode(
                            "utf-8", "replace")}
                    if resp.status >= 500:
                        status = 502
                except OSError as e:
                    body["upstream"] = {"error": str(e)}
                    status = 502
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, fmt: str, *args: object) -> None:  # quiet: pods log only errors
            pass

    return Handler


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nodemesh-demo-app")
    ap.add_argument("--name", required=True)
    ap.add_argument("--version", default=os.environ.get("VERSION", "v1"))
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--upstream", default=None, help="URL called for every request")
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer(("0.0.0.0", args.port),
                                 make_handler(args.name, args.version, args.upstream))
    server.daemon_threads = True
    print(f"{args.name} {args.version} listening on :{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
