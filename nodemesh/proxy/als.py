"""Envoy's gRPC Access Log Service (ALS) receiver: access-log entries as plain dicts.

Envoy streams access logs to `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`
when a listener's HTTP connection manager has an `envoy.access_loggers.http_grpc` access log
(`http_grpc_access_log` builds one). The receiver runs on the xDS server's gRPC server (same unix
socket, so the log config can point at the bootstrap's `xds_cluster`).

The receiving side never waits for the consumer: entries go into a bounded queue, and when it is
full they are dropped and counted (Envoy buffers and flushes on its own timer; a slow agent must
cost log entries, not proxy latency or Envoy memory). A consumer task turns each entry into a
dict (`entry_to_dict`) and hands it to the callback, which may be a plain function or a
coroutine function. A raw callback instead takes each HTTP entry undecoded as it arrives (the
agent keeps it that way until a flow is read: `nodemesh.agent.l7flows`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2 as accesslog_config_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import any_pb2, duration_pb2, json_format, symbol_database

log = logging.getLogger("nodemesh.proxy.als")

AccessLogCallback = Callable[[dict[str, Any]], object]
RawAccessLogCallback = Callable[
    [str, str, accesslog_pb2.HTTPAccessLogEntry | accesslog_pb2.TCPAccessLogEntry], None]

# ResponseFlags field → the short code Envoy prints for %RESPONSE_FLAGS%.
RESPONSE_FLAG_CODES: dict[str, str] = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "unauthorized_details": "UAEX",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}

_PROTOCOLS = {
    accesslog_pb2.HTTPAccessLogEntry.HTTP10: "HTTP/1.0",
    accesslog_pb2.HTTPAccessLogEntry.HTTP11: "HTTP/1.1",
    accesslog_pb2.HTTPAccessLogEntry.HTTP2: "HTTP/2",
    accesslog_pb2.HTTPAccessLogEntry.HTTP3: "HTTP/3",
}


# ---------------------------------------------------------------------------------------------
# Entry → dict


def _address(a: address_pb2.Address) -> str | None:
    kind = a.WhichOneof("address")
    if kind == "socket_address":
        sa = a.socket_address
        host = f"[{sa.address}]" if ":" in sa.address else sa.address
        return f"{host}:{sa.port_value}"
    if kind == "pipe":
        return f"unix:{a.pipe.path}"
    if kind == "envoy_internal_address":
        return f"internal:{a.envoy_internal_address.server_listener_name}"
    return None


def _ms(d: duration_pb2.Duration) -> float:
    return d.seconds * 1000.0 + d.nanos / 1e6


def _any_to_value(a: any_pb2.Any) -> Any:
    """A filter-state object as JSON-like data: known message types decoded, others as bytes."""
    try:
        symbol_database.Default().GetSymbol(a.TypeName())
    except KeyError:
        return {"@type": a.type_url, "value_base64": base64.b64encode(a.value).decode()}
    d = json_format.MessageToDict(a)
    # Wrapper types (StringValue, ...) come out as {"@type": ..., "value": x}: keep just x.
    if set(d) == {"@type", "value"}:
        return d["value"]
    return d


def response_flags(flags: accesslog_pb2.ResponseFlags) -> list[str]:
    """Envoy's short response-flag codes (UF, URX, NR, ...) that are set."""
    out = []
    for fd, value in flags.ListFields():
        if fd.name == "unauthorized_details":
            out.append("UAEX")
        elif value is True:
            out.append(RESPONSE_FLAG_CODES.get(fd.name, fd.name))
    return out


def _common(c: accesslog_pb2.AccessLogCommon) -> dict[str, Any]:
    start = c.start_time.ToDatetime(tzinfo=UTC) if c.HasField("start_time") else None
    if c.HasField("duration"):
        duration = _ms(c.duration)
    elif c.HasField("time_to_last_downstream_tx_byte"):
        duration = _ms(c.time_to_last_downstream_tx_byte)
    else:
        duration = None
    d: dict[str, Any] = {
        "time": start.isoformat(timespec="microseconds").replace("+00:00", "Z") if start else None,
        "duration_ms": duration,
        "downstream_remote_address": _address(c.downstream_remote_address),
        "downstream_direct_remote_address": _address(c.downstream_direct_remote_address),
        "downstream_local_address": _address(c.downstream_local_address),
        "upstream_host": _address(c.upstream_remote_address),
        "upstream_local_address": _address(c.upstream_local_address),
        "upstream_cluster": c.upstream_cluster or None,
        "route_name": c.route_name or None,
        "response_flags": response_flags(c.response_flags),
        "upstream_transport_failure_reason": c.upstream_transport_failure_reason or None,
        "connection_termination_details": c.connection_termination_details or None,
        "downstream_transport_failure_reason": c.downstream_transport_failure_reason or None,
        "access_log_type": accesslog_pb2.AccessLogType.Name(c.access_log_type),
    }
    if c.HasField("time_to_first_upstream_rx_byte"):
        d["upstream_time_to_first_byte_ms"] = _ms(c.time_to_first_upstream_rx_byte)
    if c.filter_state_objects:
        d["filter_state"] = {k: _any_to_value(v) for k, v in sorted(c.filter_state_objects.items())}
    if c.metadata.filter_metadata:
        d["metadata"] = {k: json_format.MessageToDict(v)
                         for k, v in sorted(c.metadata.filter_metadata.items())}
    if c.custom_tags:
        d["custom_tags"] = dict(sorted(c.custom_tags.items()))
    if c.HasField("tls_properties"):
        tls = c.tls_properties
        d["tls"] = {
            "version": accesslog_pb2.TLSProperties.TLSVersion.Name(tls.tls_version),
            "sni": tls.tls_sni_hostname or None,
            "peer_uri_sans": [s.uri for s in tls.peer_certificate_properties.subject_alt_name
                              if s.WhichOneof("san") == "uri"],
        }
    return d


def entry_to_dict(entry: accesslog_pb2.HTTPAccessLogEntry) -> dict[str, Any]:
    """One HTTP access-log entry as a plain dict (JSON-serialisable)."""
    req, resp = entry.request, entry.response
    d = {"kind": "http", **_common(entry.common_properties)}
    d.update({
        "protocol": _PROTOCOLS.get(entry.protocol_version),
        "method": base_pb2.RequestMethod.Name(req.request_method) if req.request_method else None,
        "scheme": req.scheme or None,
        "authority": req.authority or None,
        "path": req.path or None,
        "original_path": req.original_path or None,
        "user_agent": req.user_agent or None,
        "referer": req.referer or None,
        "forwarded_for": req.forwarded_for or None,
        "request_id": req.request_id or None,
        "request_body_bytes": req.request_body_bytes,
        "request_headers": dict(sorted(req.request_headers.items())),
        "response_code": resp.response_code.value if resp.HasField("response_code") else None,
        "response_code_details": resp.response_code_details or None,
        "response_body_bytes": resp.response_body_bytes,
        "response_headers": dict(sorted(resp.response_headers.items())),
    })
    if resp.response_trailers:
        d["response_trailers"] = dict(sorted(resp.response_trailers.items()))
    return d


def tcp_entry_to_dict(entry: accesslog_pb2.TCPAccessLogEntry) -> dict[str, Any]:
    """One TCP access-log entry (tcp_grpc logger) as a plain dict."""
    d = {"kind": "tcp", **_common(entry.common_properties)}
    d["received_bytes"] = entry.connection_properties.received_bytes
    d["sent_bytes"] = entry.connection_properties.sent_bytes
    return d


# ---------------------------------------------------------------------------------------------
# Config helper


def http_grpc_access_log(*, log_name: str = "nodemesh", cluster: str = "xds_cluster",
                         request_headers: tuple[str, ...] = (),
                         response_headers: tuple[str, ...] = (),
                         filter_state_objects: tuple[str, ...] = (),
                         flush_interval_ms: int = 1000,
                         buffer_size_bytes: int = 16384) -> accesslog_config_pb2.AccessLog:
    """The `access_log` entry for an HTTP connection manager that streams to this receiver.

    `cluster` is the bootstrap's static cluster for the agent's socket; the log is identified by
    `log_name` (and Envoy's node id) in the stream.
    """
    cfg = als_config_pb2.HttpGrpcAccessLogConfig(
        common_config=als_config_pb2.CommonGrpcAccessLogConfig(
            log_name=log_name,
            transport_api_version=config_source_pb2.ApiVersion.V3,
            filter_state_objects_to_log=list(filter_state_objects),
        ),
        additional_request_headers_to_log=list(request_headers),
        additional_response_headers_to_log=list(response_headers),
    )
    cfg.common_config.grpc_service.envoy_grpc.cluster_name = cluster
    cfg.common_config.buffer_flush_interval.FromMilliseconds(flush_interval_ms)
    cfg.common_config.buffer_size_bytes.value = buffer_size_bytes
    a = any_pb2.Any()
    a.Pack(cfg, deterministic=True)
    return accesslog_config_pb2.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=a)


# ---------------------------------------------------------------------------------------------
# Receiver


class AccessLogReceiver(als_pb2_grpc.AccessLogServiceServicer):
    """Receives Envoy access logs and hands each entry, as a dict, to `callback`.

    Every dict also has `node` (Envoy's node id) and `log_name`. Counters in `stats()`:
    received, delivered, dropped (queue full), callback_errors, streams.
    """

    def __init__(self, callback: AccessLogCallback | None = None, *, max_queue: int = 10000,
                 raw_callback: RawAccessLogCallback | None = None) -> None:
        if callback is None and raw_callback is None:
            raise ValueError("AccessLogReceiver needs a callback or a raw_callback")
        self.callback = callback
        # Given, it takes every entry (HTTP or TCP) as it arrives, undecoded: (node, log_name,
        # entry protobuf), on the stream's own task; it must be quick. The queue is then not used.
        self.raw_callback = raw_callback
        self.queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue(max_queue)
        self.received = 0
        self.delivered = 0
        self.dropped = 0
        self.callback_errors = 0
        self.streams = 0
        self._consumer: asyncio.Task[None] | None = None

    def register(self, server: Any) -> None:
        """Add the service to a grpc.aio server (before it starts)."""
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)

    async def start(self) -> None:
        if self._consumer is None:
            self._consumer = asyncio.create_task(self._consume(), name="als-consumer")

    async def stop(self, drain_timeout: float = 1.0) -> None:
        """Deliver what is queued (for up to `drain_timeout` seconds), then stop the consumer."""
        task, self._consumer = self._consumer, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained(), drain_timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _drained(self) -> None:
        while not self.queue.empty():
            await asyncio.sleep(0.01)

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "delivered": self.delivered, "dropped": self.dropped,
                "callback_errors": self.callback_errors, "streams": self.streams,
                "queued": self.queue.qsize()}

    def _offer(self, node: str, log_name: str, entry: Any) -> None:
        self.received += 1
        try:
            self.queue.put_nowait((node, log_name, entry))
        except asyncio.QueueFull:
            self.dropped += 1

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
                               context: Any) -> als_pb2.StreamAccessLogsResponse:
        # Only the first message of a stream carries the identifier.
        node = log_name = ""
        self.streams += 1
        try:
            async for msg in request_iterator:
                if msg.HasField("identifier"):
                    node = msg.identifier.node.id
                    log_name = msg.identifier.log_name
                # Conversion happens in the consumer: this loop only queues, so Envoy's stream is
                # drained as fast as it arrives.
                if self.raw_callback is not None:
                    self._hand_over(node, log_name, msg.http_logs.log_entry)
                    self._hand_over(node, log_name, msg.tcp_logs.log_entry)
                    continue
                for e in msg.http_logs.log_entry:
                    self._offer(node, log_name, e)
                for e in msg.tcp_logs.log_entry:
                    self._offer(node, log_name, e)
        finally:
            self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def _hand_over(self, node: str, log_name: str, entries: Any) -> None:
        assert self.raw_callback is not None
        for e in entries:
            self.received += 1
            try:
                self.raw_callback(node, log_name, e)
                self.delivered += 1
            except Exception:
                self.callback_errors += 1
                log.exception("als: access-log callback failed")

    async def _consume(self) -> None:
        while True:
            node, log_name, entry = await self.queue.get()
            try:
                if isinstance(entry, accesslog_pb2.HTTPAccessLogEntry):
                    d = entry_to_dict(entry)
                else:
                    d = tcp_entry_to_dict(entry)
                d["node"] = node
                d["log_name"] = log_name
                assert self.callback is not None  # entries are queued only without raw_callback
                r = self.callback(d)
                if inspect.isawaitable(r):
                    await r
                self.delivered += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                self.callback_errors += 1
                log.exception("als: access-log callback failed")
