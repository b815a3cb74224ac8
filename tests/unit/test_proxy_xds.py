"""The ADS protocol state machine, driven like Envoy drives it, without gRPC or Envoy.

Each test plays Envoy: it feeds DiscoveryRequests into the servicer's RPC methods through an
async queue and reads the responses. Both SotW and delta: initial requests, ACK, NACK, stale
nonces, name subscriptions, pushes on snapshot change, removals, reconnects.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import symbol_database

from nodemesh.proxy.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot, resource_name
from nodemesh.proxy.xds import XdsServer
from tests.unit.test_proxy_snapshot import cla, cluster, listener, route


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 10))
    return wrapper


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


class FakeEnvoy:
    """One ADS stream as Envoy sees it."""

    def __init__(self, server: XdsServer, delta: bool = False) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.context = FakeContext()
        svc = server.servicer
        method = svc.DeltaAggregatedResources if delta else svc.StreamAggregatedResources
        self._gen = method(self._requests(), self.context)
        self.task = asyncio.create_task(self._read())
        self._first = True

    async def _requests(self) -> Any:
        while True:
            r = await self.requests.get()
            if r is None:
                return
            yield r

    async def _read(self) -> None:
        try:
            async for r in self._gen:
                await self.responses.put(r)
        except Aborted:
            pass

    def _node(self, r: Any) -> Any:
        if self._first:  # set_node_on_first_message_only
            r.node.id = "n1"
            r.node.user_agent_build_version.version.major_number = 1
            r.node.user_agent_build_version.version.minor_number = 40
            self._first = False
        return r

    def sotw(self, t: str, names: tuple[str, ...] = (), nonce: str = "", version: str = "",
             error: str | None = None) -> None:
        r = discovery_pb2.DiscoveryRequest(type_url=t, resource_names=list(names),
                                           response_nonce=nonce, version_info=version)
        if error is not None:
            r.error_detail.code = 13
            r.error_detail.message = error
        self.requests.put_nowait(self._node(r))

    def delta(self, t: str, subscribe: tuple[str, ...] = (), unsubscribe: tuple[str, ...] = (),
              nonce: str = "", error: str | None = None,
              initial: dict[str, str] | None = None) -> None:
        r = discovery_pb2.DeltaDiscoveryRequest(
            type_url=t, resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe), response_nonce=nonce,
            initial_resource_versions=initial or {})
        if error is not None:
            r.error_detail.code = 13
            r.error_detail.message = error
        self.requests.put_nowait(self._node(r))

    def ack(self, resp: Any, names: tuple[str, ...] = ()) -> None:
        if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
            self.delta(resp.type_url, nonce=resp.nonce)
        else:
            self.sotw(resp.type_url, names, nonce=resp.nonce, version=resp.version_info)

    async def recv(self, timeout: float = 1.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def quiet(self, wait: float = 0.05) -> None:
        await asyncio.sleep(wait)
        assert self.responses.empty(), f"unexpected response: {self.responses.get_nowait()}"

    async def close(self) -> None:
        self.requests.put_nowait(None)
        await asyncio.wait_for(self.task, 1)


def names_of(resp: Any) -> list[str]:
    if isinstance(resp, discovery_pb2.DeltaDiscoveryResponse):
        return [r.name for r in resp.resources]
    out = []
    for a in resp.resources:
        m = symbol_database.Default().GetSymbol(a.TypeName())()
        a.Unpack(m)
        out.append(resource_name(m))
    return out


def snap(clusters: dict[str, str] | None = None, eps: dict[str, int] | None = None,
         routes: dict[str, str] | None = None, listeners: dict[str, str] | None = None) -> Snapshot:
    """clusters: name → connect timeout; eps: name → port; routes: name → cluster;
    listeners: name → route config."""
    clusters = {"a": "1s", "b": "1s"} if clusters is None else clusters
    eps = {"a": 8001, "b": 8002} if eps is None else eps
    routes = {"r1": "a"} if routes is None else routes
    listeners = {"l1": "r1"} if listeners is None else listeners
    return Snapshot.build(
        clusters=[cluster(n, t) for n, t in clusters.items()],
        endpoints=[cla(n, p) for n, p in eps.items()],
        routes=[route(n, c) for n, c in routes.items()],
        listeners=[listener(n, 10000 + i, r) for i, (n, r) in enumerate(listeners.items())])


# ---------------------------------------------------------------------------------------------
# State of the world


@async_test
async def test_sotw_initial_requests_acks_and_status() -> None:
    srv = XdsServer()
    s1 = snap()
    srv.set_snapshot("n1", s1)
    env = FakeEnvoy(srv)
    env.sotw(CLUSTER)
    r = await env.recv()
    assert r.type_url == CLUSTER and names_of(r) == ["a", "b"]
    assert r.version_info == s1.type_version(CLUSTER) and r.nonce
    env.ack(r)
    env.sotw(ENDPOINT, ("a", "b"))
    r = await env.recv()
    assert names_of(r) == ["a", "b"]
    env.ack(r, ("a", "b"))
    env.sotw(LISTENER)
    r = await env.recv()
    env.ack(r)
    env.sotw(ROUTE, ("r1",))
    r = await env.recv()
    assert names_of(r) == ["r1"]
    env.ack(r, ("r1",))
    await env.quiet()
    st = srv.status("n1")
    assert list(st) == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    for t in st:
        assert st[t]["acked_version"] == st[t]["sent_version"] == s1.type_version(t)
        assert st[t]["nack"] is None and st[t]["pending"] is False and st[t]["mode"] == "sotw"
    assert st[CLUSTER]["subscribed"] is None and st[ENDPOINT]["subscribed"] == ["a", "b"]
    assert st[CLUSTER]["resource_names"] == ["a", "b"]
    assert srv.sync_state("n1") == "synced"
    node = srv.nodes()["n1"]
    assert node["connected"] and node["envoy_version"] == "1.40.0" and node["sync"] == "synced"
    stats = srv.stats()
    assert stats["responses"] == {"CDS": 1, "EDS": 1, "LDS": 1, "RDS": 1}
    assert stats["acks"] == {"CDS": 1, "EDS": 1, "LDS": 1, "RDS": 1}
    assert stats["streams_active"] == 1
    await env.close()
    assert srv.nodes()["n1"]["connected"] is False
    assert srv.sync_state("n1") == "disconnected"


@async_test
async def test_sotw_request_before_snapshot_is_answered_when_it_arrives() -> None:
    srv = XdsServer()
    env = FakeEnvoy(srv)
    env.sotw(CLUSTER)
    await env.quiet()
    assert srv.sync_state("n1") == "no-snapshot"
    srv.set_snapshot("n1", snap())
    r = await env.recv()
    assert r.type_url == CLUSTER and names_of(r) == ["a", "b"]
    await env.close()


@async_test
async def test_sotw_eds_answers_by_name_and_on_subscription_change() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env = FakeEnvoy(srv)
    env.sotw(ENDPOINT, ("a", "nope"))
    r = await env.recv()
    assert names_of(r) == ["a"]  # only what was asked for, and what exists
    env.ack(r, ("a", "nope"))
    await env.quiet()
    # The same nonce again with other names: a subscription change, not a second ACK.
    env.sotw(ENDPOINT, ("a", "b"), nonce=r.nonce, version=r.version_info)
    r2 = await env.recv()
    assert names_of(r2) == ["a", "b"] and r2.nonce != r.nonce
    assert srv.stats()["acks"] == {"EDS": 1}
    env.ack(r2, ("a", "b"))
    await env.quiet()
    assert srv.stats()["acks"] == {"EDS": 2}
    await env.close()


@async_test
async def test_sotw_stale_nonce_is_ignored() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env = FakeEnvoy(srv)
    env.sotw(CLUSTER)
    r1 = await env.recv()
    srv.set_snapshot("n1", snap(clusters={"a": "2s", "b": "1s"}))
    r2 = await env.recv()
    assert r2.nonce != r1.nonce
    env.ack(r1)  # answers the older response: stale
    await env.quiet()
    st = srv.status("n1")[CLUSTER]
    assert st["acked_version"] is None and st["pending"] is True
    assert srv.stats()["stale_nonces"] == {"CDS": 1}
    env.ack(r2)
    await env.quiet()
    assert srv.status("n1")[CLUSTER]["acked_version"] == r2.version_info
    await env.close()


@async_test
async def test_sotw_nack_is_recorded_reported_and_not_resent() -> None:
    nacks: list[tuple[str, str, str, str, list[str]]] = []
    srv = XdsServer(on_nack=lambda *a: nacks.append(a))
    good = snap()
    srv.set_snapshot("n1", good)
    env = FakeEnvoy(srv)
    env.sotw(ROUTE, ("r1",))
    r1 = await env.recv()
    env.ack(r1, ("r1",))
    await env.quiet()
    bad = snap(routes={"r1": "b"})
    srv.set_snapshot("n1", bad)
    r2 = await env.recv()
    # Envoy refuses: it keeps (and reports) the last good version.
    env.sotw(ROUTE, ("r1",), nonce=r2.nonce, version=r1.version_info, error="missing ]: [")
    await env.quiet()
    st = srv.status("n1")[ROUTE]
    assert st["acked_version"] == r1.version_info
    assert st["sent_version"] == r2.version_info
    assert st["nack"]["version"] == r2.version_info
    assert st["nack"]["message"] == "missing ]: [" and st["nack"]["resource_names"] == ["r1"]
    assert st["pending"] is False
    assert nacks == [("n1", ROUTE, r2.version_info, "missing ]: [", ["r1"])]
    assert srv.stats()["nacks"] == {"RDS": 1}
    # Not resent on its own, not even on a repeat of the same nonce.
    env.sotw(ROUTE, ("r1",), nonce=r2.nonce, version=r1.version_info, error="missing ]: [")
    await env.quiet()
    assert len(nacks) == 1
    # A fixed snapshot goes out and its ACK clears the NACK.
    srv.set_snapshot("n1", snap(routes={"r1": "a"}, clusters={"a": "1s", "b": "1s"}))
    r3 = await env.recv()
    assert r3.version_info == good.type_version(ROUTE)
    env.ack(r3, ("r1",))
    await env.quiet()
    assert srv.status("n1")[ROUTE]["nack"] is None
    await env.close()


@async_test
async def test_sotw_nack_names_the_resources_that_changed() -> None:
    """Envoy's message rarely names the resource; the NACK lists what changed since the version
    Envoy last accepted (what delta would have sent)."""
    nacks: list[Any] = []
    srv = XdsServer(on_nack=lambda *a: nacks.append(a))
    two = {"r1": "a", "r2": "a"}
    srv.set_snapshot("n1", snap(routes=two))
    env = FakeEnvoy(srv)
    env.sotw(ROUTE, ("r1", "r2"))
    r1 = await env.recv()
    assert names_of(r1) == ["r1", "r2"]
    env.ack(r1, ("r1", "r2"))
    await env.quiet()
    srv.set_snapshot("n1", snap(routes={"r1": "a", "r2": "b"}))
    r2 = await env.recv()
    assert names_of(r2) == ["r1", "r2"]  # SotW: the whole subscribed set
    env.sotw(ROUTE, ("r1", "r2"), nonce=r2.nonce, version=r1.version_info, error="missing ]: [")
    await env.quiet()
    assert nacks[-1][4] == ["r2"]
    assert srv.status("n1")[ROUTE]["nack"]["resource_names"] == ["r2"]
    await env.close()


@async_test
async def test_sotw_push_in_warming_order_and_only_changed_types() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env = FakeEnvoy(srv)
    # Envoy subscribes in any order; pushes still go CDS, EDS, LDS, RDS.
    env.sotw(ROUTE, ("r1",))
    env.sotw(LISTENER)
    env.sotw(ENDPOINT, ("a", "b", "c"))
    env.sotw(CLUSTER)
    subscribed = {ROUTE: ("r1",), LISTENER: (), ENDPOINT: ("a", "b", "c"), CLUSTER: ()}
    for _ in range(4):
        r = await env.recv()
        env.ack(r, subscribed[r.type_url])
    await env.quiet()
    srv.set_snapshot("n1", snap(clusters={"a": "1s", "b": "1s", "c": "1s"},
                                eps={"a": 8001, "b": 8002, "c": 8003},
                                routes={"r1": "c"}, listeners={"l1": "r1", "l2": "r1"}))
    got = [(await env.recv()).type_url for _ in range(4)]
    assert got == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    await env.quiet()
    # Only the endpoints change: only EDS goes out.
    srv.set_snapshot("n1", snap(clusters={"a": "1s", "b": "1s", "c": "1s"},
                                eps={"a": 8001, "b": 8002, "c": 9999},
                                routes={"r1": "c"}, listeners={"l1": "r1", "l2": "r1"}))
    r = await env.recv()
    assert r.type_url == ENDPOINT and names_of(r) == ["a", "b", "c"]
    await env.quiet()
    await env.close()


@async_test
async def test_sotw_lds_and_cds_carry_the_full_set() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap(clusters={"a": "1s", "b": "1s", "c": "1s"}))
    env = FakeEnvoy(srv)
    env.sotw(CLUSTER)
    r = await env.recv()
    env.ack(r)
    await env.quiet()
    srv.set_snapshot("n1", snap(clusters={"a": "1s", "c": "1s"}))
    r = await env.recv()
    assert names_of(r) == ["a", "c"]  # b left out = b removed
    await env.close()


@pytest.mark.parametrize("force", [True, False])
def test_sotw_changed_cluster_gets_its_endpoints_again(force: bool) -> None:
    @async_test
    async def run() -> None:
        srv = XdsServer(force_eds_after_cds=force)
        srv.set_snapshot("n1", snap())
        env = FakeEnvoy(srv)
        env.sotw(CLUSTER)
        env.ack(await env.recv())
        await env.quiet()
        env.sotw(ENDPOINT, ("a", "b"))
        eds = await env.recv()
        env.ack(eds, ("a", "b"))
        await env.quiet()
        # Cluster a changes, its endpoints do not.
        srv.set_snapshot("n1", snap(clusters={"a": "5s", "b": "1s"}))
        r = await env.recv()
        assert r.type_url == CLUSTER
        if force:
            r2 = await env.recv()
            assert r2.type_url == ENDPOINT and r2.version_info == eds.version_info
            assert names_of(r2) == ["a", "b"]
        await env.quiet()
        # A new cluster (not a changed one) needs no push: Envoy asks for its endpoints.
        srv.set_snapshot("n1", snap(clusters={"a": "5s", "b": "1s", "c": "1s"}))
        r = await env.recv()
        assert r.type_url == CLUSTER
        await env.quiet()
        await env.close()

    run()


@async_test
async def test_sotw_reconnect_serves_the_current_snapshot() -> None:
    srv = XdsServer()
    s1 = snap()
    srv.set_snapshot("n1", s1)
    env = FakeEnvoy(srv)
    env.sotw(CLUSTER)
    r = await env.recv()
    env.ack(r)
    await env.close()
    # A new server process (agent restart): Envoy reconnects with its version and old nonce.
    srv2 = XdsServer()
    srv2.set_snapshot("n1", s1)
    env2 = FakeEnvoy(srv2)
    env2.sotw(CLUSTER, nonce=r.nonce, version=r.version_info)
    r2 = await env2.recv()
    assert names_of(r2) == ["a", "b"] and r2.version_info == r.version_info
    # Before Envoy ACKs, status already knows which version Envoy runs.
    assert srv2.status("n1")[CLUSTER]["acked_version"] == r.version_info
    env2.ack(r2)
    await env2.quiet()
    assert srv2.status("n1")[CLUSTER]["pending"] is False
    await env2.close()


@async_test
async def test_first_request_without_node_id_is_refused() -> None:
    srv = XdsServer()
    env = FakeEnvoy(srv)
    env._first = False  # no node on the first message
    env.sotw(CLUSTER)
    await asyncio.wait_for(env.task, 1)
    assert env.context.aborted is not None
    assert env.context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT


@async_test
async def test_two_nodes_get_their_own_snapshots() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap(clusters={"a": "1s"}))
    srv.set_snapshot("n2", snap(clusters={"b": "1s"}))
    e1 = FakeEnvoy(srv)
    e2 = FakeEnvoy(srv)
    e1.sotw(CLUSTER)
    r = discovery_pb2.DiscoveryRequest(type_url=CLUSTER)
    r.node.id = "n2"
    e2._first = False
    e2.requests.put_nowait(r)
    assert names_of(await e1.recv()) == ["a"]
    assert names_of(await e2.recv()) == ["b"]
    srv.set_snapshot("n2", snap(clusters={"b": "1s", "c": "1s"}))
    assert names_of(await e2.recv()) == ["b", "c"]
    await e1.quiet()
    await e1.close()
    await e2.close()


@async_test
async def test_callback_errors_do_not_break_the_stream() -> None:
    def boom(*_: Any) -> None:
        raise RuntimeError("callback bug")

    srv = XdsServer(on_nack=boom, on_ack=boom)
    srv.set_snapshot("n1", snap())
    env = FakeEnvoy(srv)
    env.sotw(CLUSTER)
    r = await env.recv()
    env.sotw(CLUSTER, nonce=r.nonce, error="bad")
    await env.quiet()
    srv.set_snapshot("n1", snap(clusters={"a": "3s"}))
    r = await env.recv()
    env.ack(r)
    await env.quiet()
    assert srv.status("n1")[CLUSTER]["acked_version"] == r.version_info
    await env.close()


@async_test
async def test_wait_synced() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap(eps={"a": 1, "b": 2}))
    env = FakeEnvoy(srv, delta=False)

    async def envoy() -> None:
        env.sotw(CLUSTER)
        env.sotw(LISTENER)
        for _ in range(2):
            env.ack(await env.recv())

    task = asyncio.create_task(envoy())
    assert await srv.wait_synced("n1", timeout=2) == "synced"
    await task
    with pytest.raises(TimeoutError):
        await srv.wait_for(lambda: False, timeout=0.05)
    await env.close()


# ---------------------------------------------------------------------------------------------
# Delta


async def _delta_connected(srv: XdsServer) -> tuple[FakeEnvoy, dict[str, Any]]:
    env = FakeEnvoy(srv, delta=True)
    first = {}
    env.delta(CLUSTER)
    first[CLUSTER] = await env.recv()
    env.ack(first[CLUSTER])
    env.delta(ENDPOINT, subscribe=("a", "b"))
    first[ENDPOINT] = await env.recv()
    env.ack(first[ENDPOINT])
    env.delta(LISTENER)
    first[LISTENER] = await env.recv()
    env.ack(first[LISTENER])
    env.delta(ROUTE, subscribe=("r1",))
    first[ROUTE] = await env.recv()
    env.ack(first[ROUTE])
    await env.quiet()
    return env, first


@async_test
async def test_delta_initial_wildcard_names_and_versions() -> None:
    srv = XdsServer()
    s1 = snap()
    srv.set_snapshot("n1", s1)
    env, first = await _delta_connected(srv)
    r = first[CLUSTER]
    assert names_of(r) == ["a", "b"] and r.system_version_info == s1.type_version(CLUSTER)
    assert {x.name: x.version for x in r.resources} == dict(s1.resource_versions(CLUSTER))
    assert names_of(first[ENDPOINT]) == ["a", "b"] and names_of(first[ROUTE]) == ["r1"]
    st = srv.status("n1")
    assert all(v["mode"] == "delta" for v in st.values())
    assert st[CLUSTER]["subscribed"] is None and st[ROUTE]["subscribed"] == ["r1"]
    assert st[CLUSTER]["acked_version"] == s1.type_version(CLUSTER)
    assert srv.sync_state("n1") == "synced"
    await env.close()


@async_test
async def test_delta_sends_only_changes_and_removals() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env, _ = await _delta_connected(srv)
    s2 = snap(clusters={"a": "1s", "c": "1s"}, eps={"a": 9001, "c": 8003})
    srv.set_snapshot("n1", s2)
    r = await env.recv()
    assert r.type_url == CLUSTER and names_of(r) == ["c"] and list(r.removed_resources) == ["b"]
    env.ack(r)
    r = await env.recv()
    # a changed; b is gone from the snapshot (Envoy is subscribed to it still, until CDS lands).
    assert r.type_url == ENDPOINT and names_of(r) == ["a"] and list(r.removed_resources) == ["b"]
    env.ack(r)
    await env.quiet()
    # Envoy subscribes to c's endpoints after the new cluster arrived.
    env.delta(ENDPOINT, subscribe=("c",), unsubscribe=("b",))
    r = await env.recv()
    assert names_of(r) == ["c"] and not r.removed_resources
    env.ack(r)
    await env.quiet()
    assert srv.sync_state("n1") == "synced"
    assert srv.status("n1")[ENDPOINT]["resource_names"] == ["a", "c"]
    await env.close()


@async_test
async def test_delta_nack_rolls_back_versions() -> None:
    nacks: list[Any] = []
    srv = XdsServer(on_nack=lambda *a: nacks.append(a))
    s1 = snap()
    srv.set_snapshot("n1", s1)
    env, _ = await _delta_connected(srv)
    srv.set_snapshot("n1", snap(routes={"r1": "b"}))
    r = await env.recv()
    assert r.type_url == ROUTE and names_of(r) == ["r1"]
    env.delta(ROUTE, nonce=r.nonce, error="bad regex")
    await env.quiet()  # not resent on its own
    st = srv.status("n1")[ROUTE]
    assert st["nack"]["message"] == "bad regex" and st["nack"]["resource_names"] == ["r1"]
    assert st["acked_version"] == s1.type_version(ROUTE)
    assert srv.sync_state("n1") == "nacked"
    assert nacks[0][:4] == ("n1", ROUTE, r.system_version_info, "bad regex")
    # Another change elsewhere: the refused route stays refused, it is not sent again...
    srv.set_snapshot("n1", snap(routes={"r1": "b"}, eps={"a": 8001, "b": 7777}))
    r2 = await env.recv()
    assert r2.type_url == ENDPOINT
    env.ack(r2)
    await env.quiet()
    # ...until the route changes again (Envoy still has r1 = "a", so the new one goes out)...
    srv.set_snapshot("n1", snap(routes={"r1": "c"}, eps={"a": 8001, "b": 7777}))
    r3 = await env.recv()
    assert r3.type_url == ROUTE and names_of(r3) == ["r1"]
    env.ack(r3)
    await env.quiet()
    assert srv.status("n1")[ROUTE]["nack"] is None
    # ...and going back to what Envoy has needs nothing to be sent.
    srv.set_snapshot("n1", snap(routes={"r1": "b"}, eps={"a": 8001, "b": 7777}))
    r4 = await env.recv()
    assert r4.type_url == ROUTE
    env.delta(ROUTE, nonce=r4.nonce, error="again")
    await env.quiet()
    srv.set_snapshot("n1", snap(routes={"r1": "c"}, eps={"a": 8001, "b": 7777}))
    await env.quiet()
    assert srv.status("n1")[ROUTE]["nack"] is None
    assert srv.sync_state("n1") == "synced"
    await env.close()


@async_test
async def test_delta_reconnect_with_initial_resource_versions() -> None:
    srv = XdsServer()
    s1 = snap()
    srv.set_snapshot("n1", s1)
    env = FakeEnvoy(srv, delta=True)
    have = dict(s1.resource_versions(CLUSTER))
    have["a"] = "old"
    have["gone"] = "x"
    env.delta(CLUSTER, initial=have)
    r = await env.recv()
    # b is current: not resent; a is outdated: resent; gone is not in the snapshot: removed.
    assert names_of(r) == ["a"] and list(r.removed_resources) == ["gone"]
    env.ack(r)
    # A type Envoy is fully current on gets an empty first answer (Envoy's init waits for it).
    env.delta(LISTENER, initial=dict(s1.resource_versions(LISTENER)))
    r = await env.recv()
    assert not r.resources and not r.removed_resources
    env.ack(r)
    await env.quiet()
    assert srv.status("n1")[LISTENER]["acked_version"] == s1.type_version(LISTENER)
    await env.close()


@async_test
async def test_delta_subscriptions_and_missing_resources() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env = FakeEnvoy(srv, delta=True)
    env.delta(ENDPOINT, subscribe=("a",))
    r = await env.recv()
    assert names_of(r) == ["a"]
    env.ack(r)
    env.delta(ENDPOINT, subscribe=("b", "zz"))
    r = await env.recv()
    # zz does not exist: Envoy is told at once (removed), so it need not wait for a timeout.
    assert names_of(r) == ["b"] and list(r.removed_resources) == ["zz"]
    env.ack(r)
    env.delta(ENDPOINT, unsubscribe=("a",))
    await env.quiet()
    srv.set_snapshot("n1", snap(eps={"a": 1234, "b": 8002}))  # a changes: not subscribed
    await env.quiet()
    srv.set_snapshot("n1", snap(eps={"a": 1234, "b": 8002, "zz": 5}))  # zz appears
    r = await env.recv()
    assert names_of(r) == ["zz"]
    await env.close()


@async_test
async def test_delta_changed_cluster_gets_its_endpoints_again() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env, first = await _delta_connected(srv)
    srv.set_snapshot("n1", snap(clusters={"a": "5s", "b": "1s"}))
    r = await env.recv()
    assert r.type_url == CLUSTER and names_of(r) == ["a"]
    r = await env.recv()
    assert r.type_url == ENDPOINT and names_of(r) == ["a"]
    assert r.resources[0].version == first[ENDPOINT].resources[0].version
    await env.quiet()
    await env.close()


@async_test
async def test_delta_stale_nonce_is_counted() -> None:
    srv = XdsServer()
    srv.set_snapshot("n1", snap())
    env = FakeEnvoy(srv, delta=True)
    env.delta(CLUSTER)
    r = await env.recv()
    env.ack(r)
    env.delta(CLUSTER, nonce="not-ours")
    await env.quiet()
    assert srv.stats()["stale_nonces"] == {"CDS": 1}
    assert srv.stats()["acks"] == {"CDS": 1}
    await env.close()
