"""AccessLogFlow: an access-log entry kept raw reads back as the flow the eager path built, and
the metrics count it the same."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2

from nodemesh.agent.l7flows import AccessLogFlow
from nodemesh.observe.flow import flow_from_access_log
from nodemesh.observe.metrics import AgentMetrics
from nodemesh.proxy.als import entry_to_dict
from nodemesh.route.inputs import RedirectKey
from nodemesh.ui.graph import FlowRecord, Inventory, summary
from tests.unit.test_observe import CTX

TARGETS = {15002: RedirectKey("10.96.0.9", 80, "TCP")}
POLICIES = {("10.244.2.3", 8080): ["CiliumNetworkPolicy shop/l7-only-get"]}


def entry(code: int = 200, details: str = "via_upstream", backend_tag: bool = True,
          local_port: int = 15002) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "10.244.1.2"
    c.downstream_remote_address.socket_address.port_value = 40000
    c.downstream_local_address.socket_address.address = "169.254.42.1"
    c.downstream_local_address.socket_address.port_value = local_port
    c.upstream_remote_address.socket_address.address = "10.244.2.3"
    c.upstream_remote_address.socket_address.port_value = 8080
    c.start_time.FromSeconds(1_700_000_000)
    c.duration.FromMicroseconds(2500)
    c.route_name = "shop/web"
    c.custom_tags["nodemesh.route"] = "HTTPRoute shop/web"
    c.custom_tags["nodemesh.pod"] = "web-abc-1"
    if backend_tag:
        c.custom_tags["nodemesh.backend"] = "shop/web:80"
    e.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    e.request.request_method = 1
    e.request.authority = "web.shop"
    e.request.path = "/api"
    e.request.request_headers["x-request-id"] = "abc"
    e.response.response_code.value = code
    e.response.response_code_details = details
    return e


def eager(e: accesslog_pb2.HTTPAccessLogEntry) -> dict:
    """What the agent built for every entry before it kept them raw."""
    d = entry_to_dict(e)
    d["original_destination"] = "10.96.0.9:80"
    tags = d["custom_tags"]
    denied = d["response_code"] == 403 and "rbac" in d["response_code_details"]
    ns, _, name = tags["nodemesh.backend"].partition("/")
    f = flow_from_access_log(d, CTX, denied_by_policy=denied,
                             backend_service=(ns, name.split(":")[0]))
    f["l7"]["route"] = tags["nodemesh.route"]
    f["l7"]["backend_pod"] = tags["nodemesh.pod"]
    return f


def raw(e: accesslog_pb2.HTTPAccessLogEntry) -> AccessLogFlow:
    return AccessLogFlow(e.SerializeToString(), "node1", CTX, TARGETS, POLICIES)


def strip(f: dict) -> dict:
    return {k: v for k, v in f.items() if k != "uuid"}


def test_raw_entry_reads_back_as_the_eager_flow() -> None:
    e = entry()
    f = raw(e).to_flow()
    assert strip(f) == strip(eager(e))
    assert f["destination_service"] == {"namespace": "shop", "name": "web"}
    assert f["l7"]["http"]["code"] == 200 and f["l7"]["http"]["method"] == "GET"
    assert f["destination"]["pod_name"] == "web-abc-1"


def test_l7_denial_names_the_policy() -> None:
    f = raw(entry(403, "rbac_access_denied_matched_policy[none]")).to_flow()
    assert f["verdict"] == "DROPPED" and f["drop_reason_desc"] == "POLICY_DENIED"
    assert f["ingress_denied_by"] == [{"kind": "CiliumNetworkPolicy", "namespace": "shop",
                                       "name": "l7-only-get"}]
    assert f["Summary"].endswith("(no L7 rule allows it: CiliumNetworkPolicy shop/l7-only-get)")


def test_service_from_the_listener_target_without_a_backend_tag() -> None:
    f = raw(entry(backend_tag=False)).to_flow()
    assert f["destination_service"] == {"namespace": "shop", "name": "web"}
    other = raw(entry(backend_tag=False, local_port=15999)).to_flow()
    assert "destination_service" not in other


def test_metrics_count_the_raw_entry_as_its_flow() -> None:
    by_flow, by_raw = AgentMetrics("node1"), AgentMetrics("node1")
    for code, details in ((200, "via_upstream"), (403, "rbac_access_denied_matched_policy[x]")):
        e = entry(code, details)
        by_flow.observe(raw(e).to_flow())
        by_raw.observe(raw(e))
    assert by_raw.flow_counts == by_flow.flow_counts
    assert by_raw.expose() == by_flow.expose()
    assert b'code="403"' in by_raw.expose()


def test_the_same_entry_is_the_same_flow_on_every_read() -> None:
    e = entry()
    first, again = raw(e).to_flow(), raw(e).to_flow()
    assert first["uuid"] == again["uuid"]  # a reader that deduplicates by uuid sees it once
    assert raw(entry(404)).to_flow()["uuid"] != first["uuid"]


def test_a_request_envoy_could_not_parse_is_a_malformed_request_not_none() -> None:
    """Envoy's HTTP/1 codec answers a bad request line (a space in the path) with 400 before
    any method, authority or path is known: the flow carries "" and the UI says what it was."""
    e = entry(400, details="http1.codec_error")
    e.request.request_method = 0
    e.request.authority = ""
    e.request.path = ""
    flow = raw(e).to_flow()
    assert flow["l7"]["http"]["method"] == "" and flow["l7"]["http"]["url"] == ""
    assert strip(flow) == strip(eager(e))
    rec = FlowRecord.parse(flow, Inventory(), now=0.0)
    assert summary(rec) == "HTTP/1.1 malformed request → 400 · 2.50 ms"
    assert "None" not in summary(rec)
    rec = FlowRecord.parse(raw(entry()).to_flow(), Inventory(), now=0.0)
    assert summary(rec) == "HTTP/1.1 GET http://web.shop/api → 200 · 2.50 ms"
