"""visibility_routes: which annotated Service ports get an in-memory pass-through route."""

from __future__ import annotations

from nodemesh.route.visibility import VISIBILITY_ANNOTATION, visibility_routes

ON = {VISIBILITY_ANNOTATION: "true"}


def svc(name: str, ports: list[dict], annotations: dict | None = None, ns: str = "shop",
        cluster_ip: str = "10.96.0.9") -> dict:
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns, "uid": f"u-{name}",
                                            "annotations": annotations or {}},
            "spec": {"clusterIP": cluster_ip, "ports": ports}}


def ns(name: str, annotations: dict | None = None) -> dict:
    return {"kind": "Namespace", "metadata": {"name": name, "annotations": annotations or {}}}


def route_to(name: str, namespace: str = "shop") -> dict:
    return {"kind": "HTTPRoute", "metadata": {"name": "r", "namespace": namespace},
            "spec": {"parentRefs": [{"kind": "Service", "name": name}]}}


def test_annotated_service_gets_a_route_to_itself_per_http_port() -> None:
    (r,) = visibility_routes([svc("web", [{"name": "http", "port": 80}], ON)], [ns("shop")], [])
    assert r["metadata"]["namespace"] == "shop" and r["metadata"]["name"] == "l7-visibility-web-80"
    (parent,) = r["spec"]["parentRefs"]
    (rule,) = r["spec"]["rules"]
    assert (parent["name"], parent["port"]) == ("web", 80)
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "web", "port": 80,
                                    "weight": 1}]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]


def test_namespace_annotation_covers_its_services() -> None:
    out = visibility_routes([svc("web", [{"port": 8080}])], [ns("shop", ON)], [])
    assert [r["metadata"]["name"] for r in out] == ["l7-visibility-web-8080"]


def test_not_annotated_nothing() -> None:
    assert visibility_routes([svc("web", [{"name": "http", "port": 80}])], [ns("shop")], []) == []
    assert visibility_routes([svc("web", [{"name": "http", "port": 80}],
                                  {VISIBILITY_ANNOTATION: "false"})], [], []) == []


def test_only_ports_that_surely_carry_http() -> None:
    ports = [{"name": "http", "port": 81}, {"name": "http-alt", "port": 82},
             {"name": "grpc", "port": 83, "appProtocol": "grpc"}, {"name": "db", "port": 5432},
             {"name": "metrics", "port": 9090, "appProtocol": "h2c"},
             {"name": "dns", "port": 80, "protocol": "UDP"}, {"port": 8080}]
    out = visibility_routes([svc("web", ports, ON)], [], [])
    assert sorted(r["spec"]["parentRefs"][0]["port"] for r in out) == [81, 82, 8080, 9090]


def test_a_routed_or_headless_service_is_left_alone() -> None:
    port = [{"name": "http", "port": 80}]
    assert visibility_routes([svc("web", port, ON)], [], [route_to("web")]) == []
    assert visibility_routes([svc("web", port, ON)], [], [route_to("web", "other")]) != []
    assert visibility_routes([svc("web", port, ON, cluster_ip="None")], [], []) == []
