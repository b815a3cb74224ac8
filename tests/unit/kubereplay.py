"""Replays recorded Kubernetes API server answers through httpx2's MockTransport.

A transcript (``tests/unit/data/kubeapi/<name>.json``) is a list of exchanges: the request the
client must send (method, path, the exact query parameters, optionally parts of the JSON body)
and the answer the API server gave (status and JSON body, or a watch stream: a ``.jsonl`` file
beside it, one watch event a line, as kube-apiserver writes them; or a connection error). Each
request is answered by the first unused exchange that matches it; exchanges of one path are thus
used in their recorded order. A watch request no exchange is left for waits (a quiet watch)
until the test ends; any other request without one is recorded in `unexpected` and answered 418.
There is no logic here beyond the matching: nothing is computed from a request.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx2

DATA = Path(__file__).parent / "data" / "kubeapi"

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://kube.test:6443", insecure-skip-tls-verify: true}
users:
- name: agent
  user: {token: recorded-token}
contexts:
- name: test
  context: {cluster: test, user: agent}
current-context: test
"""


def _subset(want: object, got: object) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _subset(v, got[k])
                                             for k, v in want.items())
    return want == got


class Replay:
    def __init__(self, name: str) -> None:
        self.exchanges: list[dict] = json.loads((DATA / f"{name}.json").read_text())["exchanges"]
        self.used = [False] * len(self.exchanges)
        self.requests: list[tuple[str, str, dict, dict | None]] = []  # method, path, query, body
        self.headers: list[dict] = []
        self.unexpected: list[str] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def transport(self) -> httpx2.MockTransport:
        return httpx2.MockTransport(self.handle)

    def remaining(self) -> list[dict]:
        return [x["request"] for x, u in zip(self.exchanges, self.used, strict=True) if not u]

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        query = dict(request.url.params)
        body = json.loads(request.content) if request.content else None
        with self._lock:
            self.requests.append((request.method, request.url.path, query, body))
            self.headers.append(dict(request.headers))
            found = None
            for i, x in enumerate(self.exchanges):
                want = x["request"]
                if (not self.used[i] and want["method"] == request.method
                        and want["path"] == request.url.path and want.get("query", {}) == query
                        and ("body" not in want or _subset(want["body"], body))):
                    self.used[i] = True
                    found = x["response"]
                    break
        if found is None:
            if query.get("watch") == "true":
                self.done.wait(30)
                raise httpx2.ReadError("replay finished", request=request)
            self.unexpected.append(f"{request.method} {request.url.path} {query} {body}")
            return httpx2.Response(418, json={"kind": "Status", "code": 418,
                                              "reason": "NotInTranscript", "message": "replay"})
        if "error" in found:
            raise getattr(httpx2, found["error"])(found.get("message", "recorded"),
                                                  request=request)
        if "stream" in found:
            return httpx2.Response(found.get("status", 200),
                                   content=(DATA / found["stream"]).read_bytes(),
                                   headers={"Content-Type": "application/json"})
        return httpx2.Response(found["status"], json=found["body"])
