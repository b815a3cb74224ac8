"""The client of a node agent's local API (a root-only unix socket): the CLI, the cluster's
lifecycle, the demo, the benchmark and the UI talk to agents through it. The server is
`nodemesh.agent.api`."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from nodemesh.errors import NodemeshError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class AgentClient:
    """Talks to one node's agent over its unix socket."""

    def __init__(self, path: str, node: str, timeout: float | None = 10.0) -> None:
        self.path = path
        self.node = node
        self.timeout = timeout

    def _request(self, method: str, path: str, query: dict | None = None,
                 body: Any = None) -> http.client.HTTPResponse:
        target = path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, target, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NodemeshError(f"the agent of node {self.node} is not running ({self.path}: "
                                f"{e.strerror}); `nodemesh status` shows the cluster, "
                                f"`nodemesh up` restarts it") from None

    def get(self, path: str, query: dict | None = None) -> Any:
        return self._decode(self._request("GET", path, query))

    def post(self, path: str, body: Any = None) -> Any:
        return self._decode(self._request("POST", path, None, body))

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request: (HTTP status, the decoded JSON answer), whatever the status. A socket
        nobody listens on, or no answer in time, raises OSError (the caller says what it means)."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw or b"null")
        except ValueError:
            return resp.status, {"error": raw.decode(errors="replace")[:200]}

    def _decode(self, resp: http.client.HTTPResponse) -> Any:
        data = json.loads(resp.read() or b"null")
        if resp.status != 200:
            raise NodemeshError(f"node {self.node}: {data.get('error') if data else resp.status}")
        return data

    def stream(self, path: str, query: dict | None = None) -> Iterator[Any]:
        resp = self._request("GET", path, query)
        if resp.status != 200:
            self._decode(resp)
        for line in resp:
            if line.strip():
                yield json.loads(line)
