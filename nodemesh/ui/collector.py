"""Flows from every agent into one rolling window, and the store's view of the cluster.

One thread per node follows its agent's flow stream (`/flows?follow=1`, starting with the flows
its ring already holds, as `nodemesh observe --follow` does) and reconnects when the agent
restarts; flows seen twice (a reconnect, the start of a stream) are dropped by uuid. A ticker
thread rereads the store when its revision moves and rebuilds the graph once a second for every
reader (`/api/graph`, `/api/events`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable

from nodemesh.cluster.agentclient import AgentClient
from nodemesh.cluster.config import ClusterConfig
from nodemesh.store import Store
from nodemesh.ui.graph import (
    FlowRecord,
    Inventory,
    SockCorrelator,
    build_graph,
    flow_item,
    inventory_from,
    involves,
)

log = logging.getLogger("nodemesh.ui")

MAX_RECORDS = 200_000  # records kept for the window, whatever the rate
MAX_FLOW_BODIES = 20_000  # of which this many keep their full flow, for the flow list
BACKFILL = 5000  # flows asked of each agent's ring when a stream starts
INVENTORY_KINDS = ("Pod", "Deployment", "Service")


class NodeFeed:
    """The state of one node's flow stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connected = False
        self.error: str | None = None
        self.received = 0

    def to_json(self) -> dict:
        return {"name": self.name, "connected": self.connected, "error": self.error,
                "received": self.received}


class Collector:
    def __init__(self, cfg: ClusterConfig, store: Store, window: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.window = window
        self.clock = clock
        self.feeds = {n.name: NodeFeed(n.name) for n in cfg.nodes}
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._records: collections.deque[FlowRecord] = collections.deque()
        self._bodies: collections.deque[FlowRecord] = collections.deque()
        self._uuids: set[str] = set()
        self._correlators = {n.name: SockCorrelator() for n in cfg.nodes}
        self.inventory = Inventory()
        self._store_revision = -1
        self._graph: dict = {}
        self._graph_json = b"{}"
        self._graph_version = 0
        self._changed = threading.Condition()

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self.refresh_inventory()
        self.tick()
        for name in self.feeds:
            threading.Thread(target=self._follow, args=(name,), name=f"flows-{name}",
                             daemon=True).start()
        threading.Thread(target=self._ticker, name="graph", daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        with self._changed:
            self._changed.notify_all()

    # ---- flows ----------------------------------------------------------------------------
    def _follow(self, node: str) -> None:
        feed = self.feeds[node]
        delay = 0.5
        while not self.stop.is_set():
            client = AgentClient(self.cfg.agent_socket(node), node, timeout=None)
            try:
                stream = client.stream("/flows", {"follow": ["1"], "last": [str(BACKFILL)]})
                feed.connected, feed.error, delay = True, None, 0.5
                for flow in stream:
                    if self.stop.is_set():
                        return
                    self.add(flow)
                    feed.received += 1
                feed.error = "flow stream ended (agent restarted?)"
            except PermissionError:
                feed.error = "permission denied on the agent socket: run `nodemesh ui` as root"
            except Exception as e:
                feed.error = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
            feed.connected = False
            self.stop.wait(delay)
            delay = min(delay * 2, 5.0)

    def add(self, flow: dict) -> None:
        """Take one flow (from any node's thread); agent events are not edges of the map."""
        if flow.get("Type") == "AGENT":
            return
        uid = flow.get("uuid")
        now = self.clock()
        with self._lock:
            if uid and uid in self._uuids:
                return
            rec = FlowRecord.parse(flow, self.inventory, now)
            if rec.t < now - self.window:
                rec.flow = None
                return
            if uid:
                self._uuids.add(uid)
            corr = self._correlators.get(rec.node)
            if corr is not None:
                corr.feed(rec)
            self._records.append(rec)
            self._bodies.append(rec)
            while len(self._bodies) > MAX_FLOW_BODIES:
                self._bodies.popleft().flow = None
            while len(self._records) > MAX_RECORDS:
                self._uuids.discard(self._records.popleft().uuid)

    def _prune(self, now: float) -> None:
        cutoff = now - self.window
        with self._lock:
            while self._records and self._records[0].t < cutoff - 5:
                self._uuids.discard(self._records.popleft().uuid)
            while self._bodies and self._bodies[0].t < cutoff - 5:
                self._bodies.popleft().flow = None
            for corr in self._correlators.values():
                corr.expire(now - 5)

    def records(self) -> list[FlowRecord]:
        with self._lock:
            return list(self._records)

    def flows(self, node_id: str | None = None, src: str | None = None, dst: str | None = None,
              limit: int = 50) -> list[dict]:
        """Recent flows that involve `node_id` (or go from `src` to `dst`), newest first."""
        cutoff = self.clock() - self.window
        out = []
        with self._lock:
            bodies = list(self._bodies)
        for rec in sorted(bodies, key=lambda r: r.t, reverse=True):
            if rec.flow is None or rec.t < cutoff:
                continue
            if node_id and not involves(rec, node_id):
                continue
            if src and rec.src != src:
                continue
            if dst and dst not in (rec.dst, rec.svc):
                continue
            out.append(flow_item(rec))
            if len(out) >= limit:
                break
        return out

    # ---- store and graph ------------------------------------------------------------------
    def refresh_inventory(self) -> None:
        try:
            rev = self.store.revision()
            if rev == self._store_revision:
                return
            objects, rev = self.store.list_with_revision(INVENTORY_KINDS)
        except Exception as e:  # a busy or vanished store: keep the last view
            log.warning("store: %s", e)
            return
        inv = inventory_from(objects)
        with self._lock:
            self.inventory = inv
            self._store_revision = rev

    def tick(self) -> None:
        now = self.clock()
        self._prune(now)
        graph = build_graph(self.records(), self.inventory, self.window, now)
        graph["cluster"] = {"name": self.cfg.name, "nodes": [f.to_json() for f in self.feeds.values()]}
        body = json.dumps(graph, separators=(",", ":")).encode()
        with self._changed:
            self._graph, self._graph_json = graph, body
            self._graph_version += 1
            self._changed.notify_all()

    def _ticker(self) -> None:
        last_inventory = 0.0
        while not self.stop.wait(max(0.05, 1.0 - (self.clock() % 1.0))):
            try:
                if self.clock() - last_inventory >= 2.0:
                    self.refresh_inventory()
                    last_inventory = self.clock()
                self.tick()
            except Exception:
                log.exception("graph update")

    def graph_json(self) -> tuple[int, bytes]:
        with self._changed:
            return self._graph_version, self._graph_json

    def wait_graph(self, after: int, timeout: float) -> tuple[int, bytes]:
        """The graph once it is newer than version `after` (or the current one at timeout)."""
        with self._changed:
            self._changed.wait_for(lambda: self._graph_version > after or self.stop.is_set(),
                                   timeout)
            return self._graph_version, self._graph_json
