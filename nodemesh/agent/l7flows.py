"""L7 flows from the node Envoy's access log, kept as Envoy sent them until someone reads them.

Each HTTP access-log entry becomes one L7 flow in the agent's flow ring. Building the flow (a
tree of dicts with both endpoints' labels and the request's headers) costs the agent tens of
microseconds and a few KiB per request, for flows that most of the time nobody reads before
the ring forgets them. So the ring keeps an `AccessLogFlow`: the entry's protobuf bytes and
references to the tables that explain it as they were when it arrived (the datapath's flow
context, the proxy's listener targets and L7 policy names; each is replaced, never changed in
place, when the agent syncs). `to_flow()` builds the flow when `observe`, the UI or a test
asks; the metrics read the few fields they count (`metric_labels()`) without building it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from nodemesh.observe.flow import FlowContext, flow_from_access_log, stable_uuid
from nodemesh.proxy.als import entry_to_dict

HTTP_METHODS = {v.number: v.name if v.number else ""
                for v in base_pb2.RequestMethod.DESCRIPTOR.values}


class AccessLogFlow:
    """One HTTP access-log entry of the node Envoy, with what is needed to explain it later."""

    __slots__ = ("ctx", "node", "policy_names", "raw", "targets")

    def __init__(self, raw: bytes, node: str, ctx: FlowContext, targets: Mapping[int, Any],
                 policy_names: Mapping[tuple[str, int], list[str]]) -> None:
        self.raw = raw
        self.node = node
        self.ctx = ctx
        self.targets = targets  # listener port -> RedirectKey (the original destination)
        self.policy_names = policy_names  # (pod IP, port) -> the policies guarding it

    def entry(self) -> accesslog_pb2.HTTPAccessLogEntry:
        return accesslog_pb2.HTTPAccessLogEntry.FromString(self.raw)

    # ---- what the metrics count -------------------------------------------------------------
    def metric_labels(self) -> tuple[Mapping[str, Any], Mapping[str, Any], tuple[str, str] | None,
                                     str, int, float, bool]:
        """(source, destination, service, method, code, seconds, denied) with the endpoints as
        flow JSON, as `flow_from_access_log` resolves them, without building the flow."""
        e = self.entry()
        c = e.common_properties
        src_ip = c.downstream_remote_address.socket_address.address
        up = c.upstream_remote_address.socket_address
        orig_ip, orig_port = self._original_destination(c)
        dst_ip = up.address or orig_ip
        src = self.ctx.endpoint_by_ip(src_ip) or self.ctx.endpoint_by_identity(2)
        dst = (self.ctx.endpoint_by_ip(dst_ip) if dst_ip else None) or \
            self.ctx.endpoint_by_identity(0)
        code = e.response.response_code.value if e.response.HasField("response_code") else 0
        d = c.duration if c.HasField("duration") else c.time_to_last_downstream_tx_byte
        seconds = d.seconds + d.nanos / 1e9
        return (src.to_json(), dst.to_json(), self._service(c, orig_ip, orig_port),
                HTTP_METHODS.get(e.request.request_method, ""), code, seconds,
                self._denied(code, e.response.response_code_details))

    def _original_destination(self, c: accesslog_pb2.AccessLogCommon) -> tuple[str, int]:
        """Where the client connected: the redirected service or pod port behind the listener
        it reached, else the listener's own address."""
        local = c.downstream_local_address.socket_address
        target = self.targets.get(local.port_value)
        if target is not None:
            return target.ip, target.port
        return local.address, local.port_value

    def _service(self, c: accesslog_pb2.AccessLogCommon, orig_ip: str,
                 orig_port: int) -> tuple[str, str] | None:
        return _backend(c) or self.ctx.service_by_address(orig_ip, orig_port)

    @staticmethod
    def _denied(code: int, details: str) -> bool:
        return code == 403 and "rbac" in details

    # ---- the flow -----------------------------------------------------------------------------
    def to_flow(self) -> dict:
        e = self.entry()
        c = e.common_properties
        entry = entry_to_dict(e)
        entry["node"] = self.node
        orig_ip, orig_port = self._original_destination(c)
        entry["original_destination"] = f"{orig_ip}:{orig_port}"
        denied = self._denied(int(entry.get("response_code") or 0),
                              str(entry.get("response_code_details") or ""))
        flow = flow_from_access_log(entry, self.ctx, denied_by_policy=denied,
                                    backend_service=_backend(c),
                                    flow_id=stable_uuid(self.node.encode(), self.raw))
        tags = c.custom_tags
        if tags.get("nodemesh.route"):
            flow.setdefault("l7", {})["route"] = tags["nodemesh.route"]
        if tags.get("nodemesh.pod"):
            flow["l7"]["backend_pod"] = tags["nodemesh.pod"]
        if denied:
            ip, port = flow["IP"]["destination"], flow["l4"]["TCP"]["destination_port"]
            by = []
            for name in self.policy_names.get((ip, port), []):
                kind, _, ref = name.partition(" ")
                ns, _, n = ref.rpartition("/")
                by.append({"kind": kind, "namespace": ns, "name": n})
            if by:
                flow["ingress_denied_by"] = by
            flow["drop_reason_desc"] = "POLICY_DENIED"
            flow["Summary"] += " (no L7 rule allows it: " + ", ".join(
                f"{b['kind']} {b['namespace']}/{b['name']}" for b in by) + ")" if by else ""
        return flow


def _backend(c: accesslog_pb2.AccessLogCommon) -> tuple[str, str] | None:
    """The service the route sent the request to (the `nodemesh.backend` tag: ns/name:port)."""
    tag = c.custom_tags.get("nodemesh.backend", "")
    if "/" not in tag:
        return None
    ns, _, name = tag.partition("/")
    return ns, name.split(":")[0]
