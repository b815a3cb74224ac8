"""Snapshot: content versions, per-resource versions, diffs, immutability, consistency checks."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the type)
from google.protobuf import json_format

from nodemesh.proxy.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    Change,
    Snapshot,
    resource_name,
    short_name,
)

ADS = {"ads": {}, "resource_api_version": "V3"}


def cluster(name: str, timeout: str = "1s", service_name: str = "") -> cluster_pb2.Cluster:
    eds: dict = {"eds_config": ADS}
    if service_name:
        eds["service_name"] = service_name
    return json_format.ParseDict({"name": name, "type": "EDS", "connect_timeout": timeout,
                                  "eds_cluster_config": eds}, cluster_pb2.Cluster())


def cla(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    return json_format.ParseDict({"cluster_name": name, "endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    ]}]}, endpoint_pb2.ClusterLoadAssignment())


def route(name: str, cluster_name: str) -> route_pb2.RouteConfiguration:
    return json_format.ParseDict({"name": name, "virtual_hosts": [{
        "name": "vh", "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}]}]},
        route_pb2.RouteConfiguration())


def listener(name: str, port: int, rds: str) -> listener_pb2.Listener:
    return json_format.ParseDict({
        "name": name, "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{"name": "hcm", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                     "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name, "rds": {"route_config_name": rds, "config_source": ADS},
            "http_filters": [{"name": "router", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        }}]}]}, listener_pb2.Listener())


def base(**kw: object) -> Snapshot:
    args: dict = {"listeners": [listener("l1", 10001, "r1")], "routes": [route("r1", "a")],
                  "clusters": [cluster("a"), cluster("b")],
                  "endpoints": [cla("a", 8001), cla("b", 8002)]}
    args.update(kw)
    return Snapshot.build(**args)


def test_versions_are_content_hashes_stable_across_builds() -> None:
    s1, s2 = base(), base()
    assert s1.version == s2.version
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        assert s1.type_version(t) == s2.type_version(t)
        assert dict(s1.resource_versions(t)) == dict(s2.resource_versions(t))
    assert s1 == s2 and hash(s1) == hash(s2)
    # Input order does not matter.
    s3 = base(clusters=[cluster("b"), cluster("a")])
    assert s3.type_version(CLUSTER) == s1.type_version(CLUSTER)


def test_changing_one_resource_changes_only_its_versions() -> None:
    s1 = base()
    s2 = base(endpoints=[cla("a", 8001), cla("b", 9999)])
    assert s2.type_version(ENDPOINT) != s1.type_version(ENDPOINT)
    assert s2.resource_versions(ENDPOINT)["a"] == s1.resource_versions(ENDPOINT)["a"]
    assert s2.resource_versions(ENDPOINT)["b"] != s1.resource_versions(ENDPOINT)["b"]
    for t in (CLUSTER, LISTENER, ROUTE):
        assert s2.type_version(t) == s1.type_version(t)
    assert s2.version != s1.version


def test_label_is_kept_and_not_part_of_content() -> None:
    s1, s2 = base(version="7"), base(version="8")
    assert (s1.version, s2.version) == ("7", "8")
    assert s1 == s2
    assert s1.type_version(CLUSTER) == s2.type_version(CLUSTER)


def test_diff() -> None:
    s1 = base()
    s2 = base(clusters=[cluster("a", "2s"), cluster("c")],
              endpoints=[cla("a", 8001), cla("c", 8003)])
    d = Snapshot.diff(s1, s2)
    assert d[CLUSTER] == Change(added=("c",), changed=("a",), removed=("b",))
    assert d[ENDPOINT] == Change(added=("c",), changed=(), removed=("b",))
    assert LISTENER not in d and ROUTE not in d
    assert Snapshot.diff(s1, base()) == {}
    first = Snapshot.diff(None, s1)
    assert first[CLUSTER].added == ("a", "b") and first[LISTENER].added == ("l1",)


def test_snapshot_is_immutable_and_copies_on_get() -> None:
    c = cluster("a")
    s = Snapshot.build(clusters=[c])
    before = s.type_version(CLUSTER)
    c.connect_timeout.seconds = 99  # the caller's message changes later: the snapshot does not
    assert s.type_version(CLUSTER) == before
    got = s.get(CLUSTER, "a")
    assert isinstance(got, cluster_pb2.Cluster) and got.connect_timeout.seconds == 1
    got.connect_timeout.seconds = 42
    assert s.get(CLUSTER, "a").connect_timeout.seconds == 1  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        s.packed(CLUSTER)["x"] = None  # type: ignore[index]
    with pytest.raises(AttributeError):
        s.version = "x"  # type: ignore[misc]


def test_names_order_and_empty_types() -> None:
    s = base()
    assert s.names(CLUSTER) == ("a", "b")
    assert s.type_urls() == (CLUSTER, ENDPOINT, LISTENER, ROUTE)
    assert s.names(SECRET) == () and s.packed(SECRET) == {}
    # An empty type has a fixed version, the same whether listed or not.
    empty = Snapshot.build()
    assert empty.type_version(LISTENER) == empty.type_version(SECRET) == s.type_version(SECRET)
    assert len(s) == 6
    assert "CDS=2" in repr(s)


def test_bad_input_is_refused_with_names() -> None:
    with pytest.raises(ValueError, match="two CDS resources are named 'a'"):
        Snapshot.build(clusters=[cluster("a"), cluster("a")])
    with pytest.raises(ValueError, match=r"Cluster was given as a .*Listener"):
        Snapshot({LISTENER: [cluster("a")]})
    with pytest.raises(ValueError, match="has no name"):
        Snapshot.build(clusters=[cluster_pb2.Cluster()])


def test_resource_names_and_short_names() -> None:
    assert resource_name(cla("x", 1)) == "x"
    assert resource_name(cluster("y")) == "y"
    assert short_name(ROUTE) == "RDS" and short_name("type.googleapis.com/a.b.Thing") == "Thing"


def test_consistency_errors() -> None:
    assert base().consistency_errors() == []
    s = base(endpoints=[cla("a", 8001)], routes=[])
    errs = s.consistency_errors()
    assert any("cluster 'b' uses EDS" in e for e in errs)
    assert any("listener 'l1' uses RDS route configuration 'r1'" in e for e in errs)
    # service_name is what the cluster asks EDS for.
    s2 = Snapshot.build(clusters=[cluster("a", service_name="svc-a")], endpoints=[cla("svc-a", 1)])
    assert s2.consistency_errors() == []
    assert s2.eds_name("a") == "svc-a" and s2.eds_name("nope") is None
