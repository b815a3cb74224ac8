"""gRPC echo for the ``--grpc`` listeners, and a small client for tests.

Two services are served on every gRPC port (h2c, or TLS when the port is also given to ``--tls``):

``gateway_api_conformance.echo_basic.grpcecho.GrpcEcho`` -- echo-basic's service, used by the
Gateway API GRPCRoute conformance tests (upstream ``conformance/echo-basic/grpcecho.proto``):
``Echo`` and ``EchoTwo`` answer ``EchoResponse{assertions}`` with the fully qualified method,
the request metadata as ``Header{key, value}`` pairs (``:authority`` included, as grpc-go
reports it; ``-bin`` values base64-encoded), the ``:authority``, and the pod ``Context{namespace,
ingress, service_name, pod}``; ``EchoThree`` is intentionally unimplemented (UNIMPLEMENTED),
as upstream.

``proto.EchoTestService`` -- the Istio echo service of the ``echo-advanced`` image, which the
mesh conformance tests reach through ``client grpc://...`` (see :mod:`nodemesh.echo.client`):
``Echo(EchoRequest{message})`` answers ``EchoResponse{message}`` whose text holds
``RequestHeader=key:value``, ``StatusCode=200``, ``ServiceVersion=``, ``ServicePort=``, ``IP=``,
``Proto=GRPC``, ``Echo=<message>`` and ``Hostname=<pod>`` lines. ``ForwardEcho`` is unimplemented.

There is no protoc here: the descriptors are built in Python (``FileDescriptorProto`` -> a private
``DescriptorPool`` -> ``message_factory.GetMessageClass``) and served with grpcio generic
handlers. The standard ``grpc.health.v1.Health`` service is added when the
``grpcio-health-checking`` package is installed (it is not in this venv).

Client helpers: :func:`call` (GrpcEcho) returns the response as a dict in proto field names,
e.g. ``{"assertions": {"fully_qualified_method": "/...GrpcEcho/Echo", "headers": [{"key": ...,
"value": ...}], "authority": "...", "context": {"namespace": ..., "pod": ...}}}``;
:func:`call_istio` returns the Istio text. Both raise :class:`grpc.RpcError` on failure.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from nodemesh.echo.config import PodContext

__all__ = [
    "ISTIO_SERVICE",
    "METHODS",
    "PACKAGE",
    "POOL",
    "SERVICE",
    "Assertions",
    "Context",
    "EchoRequest",
    "EchoResponse",
    "Header",
    "IstioEchoRequest",
    "IstioEchoResponse",
    "TLSAssertions",
    "build_server",
    "call",
    "call_istio",
    "response_to_dict",
]

PACKAGE = "gateway_api_conformance.echo_basic.grpcecho"
SERVICE = f"{PACKAGE}.GrpcEcho"
METHODS = ("Echo", "EchoTwo", "EchoThree")
ISTIO_PACKAGE = "proto"
ISTIO_SERVICE = f"{ISTIO_PACKAGE}.EchoTestService"

_F = descriptor_pb2.FieldDescriptorProto
_STRING = _F.TYPE_STRING
_MESSAGE = _F.TYPE_MESSAGE
_OPTIONAL = _F.LABEL_OPTIONAL
_REPEATED = _F.LABEL_REPEATED


def _message(
    file: descriptor_pb2.FileDescriptorProto,
    name: str,
    fields: Sequence[tuple[str, int, int, int, str]],
) -> None:
    msg = file.message_type.add(name=name)
    for fname, number, ftype, label, type_name in fields:
        field = msg.field.add(name=fname, number=number, type=ftype, label=label)
        if type_name:
            field.type_name = type_name


def _grpcecho_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="grpcecho.proto", package=PACKAGE, syntax="proto3")
    f.options.go_package = "sigs.k8s.io/gateway-api/conformance/echo-basic/grpcechoserver"
    p = f".{PACKAGE}."
    _message(f, "Header", [("key", 1, _STRING, _OPTIONAL, ""), ("value", 2, _STRING, _OPTIONAL, "")])
    _message(
        f,
        "Context",
        [
            ("namespace", 1, _STRING, _OPTIONAL, ""),
            ("ingress", 2, _STRING, _OPTIONAL, ""),
            ("service_name", 3, _STRING, _OPTIONAL, ""),
            ("pod", 4, _STRING, _OPTIONAL, ""),
        ],
    )
    _message(
        f,
        "TLSAssertions",
        [
            ("version", 1, _STRING, _OPTIONAL, ""),
            ("negotiated_protocol", 2, _STRING, _OPTIONAL, ""),
            ("server_name", 3, _STRING, _OPTIONAL, ""),
            ("cipher_suite", 4, _STRING, _OPTIONAL, ""),
            ("peer_certificates", 5, _STRING, _REPEATED, ""),
        ],
    )
    _message(
        f,
        "Assertions",
        [
            ("fully_qualified_method", 1, _STRING, _OPTIONAL, ""),
            ("headers", 2, _MESSAGE, _REPEATED, p + "Header"),
            ("authority", 3, _STRING, _OPTIONAL, ""),
            ("context", 4, _MESSAGE, _OPTIONAL, p + "Context"),
            ("tls_assertions", 5, _MESSAGE, _OPTIONAL, p + "TLSAssertions"),
        ],
    )
    _message(f, "EchoRequest", [])
    _message(
        f,
        "EchoResponse",
        [
            ("assertions", 1, _MESSAGE, _OPTIONAL, p + "Assertions"),
            ("request", 2, _MESSAGE, _OPTIONAL, p + "EchoRequest"),
        ],
    )
    svc = f.service.add(name="GrpcEcho")
    for m in METHODS:
        svc.method.add(name=m, input_type=p + "EchoRequest", output_type=p + "EchoResponse")
    return f


def _istio_file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="istio/echo.proto", package=ISTIO_PACKAGE, syntax="proto3")
    _message(f, "EchoRequest", [("message", 1, _STRING, _OPTIONAL, "")])
    _message(f, "EchoResponse", [("message", 1, _STRING, _OPTIONAL, "")])
    svc = f.service.add(name="EchoTestService")
    svc.method.add(name="Echo", input_type=".proto.EchoRequest", output_type=".proto.EchoResponse")
    return f


POOL = descriptor_pool.DescriptorPool()
POOL.Add(_grpcecho_file())
POOL.Add(_istio_file())


def _cls(full_name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(full_name))


Header = _cls(f"{PACKAGE}.Header")
Context = _cls(f"{PACKAGE}.Context")
TLSAssertions = _cls(f"{PACKAGE}.TLSAssertions")
Assertions = _cls(f"{PACKAGE}.Assertions")
EchoRequest = _cls(f"{PACKAGE}.EchoRequest")
EchoResponse = _cls(f"{PACKAGE}.EchoResponse")
IstioEchoRequest = _cls(f"{ISTIO_PACKAGE}.EchoRequest")
IstioEchoResponse = _cls(f"{ISTIO_PACKAGE}.EchoResponse")


# --- server ---------------------------------------------------------------------------------


def _authority(context: grpc.ServicerContext) -> str:
    # grpcio has no public accessor for :authority; the sync server keeps it in the call
    # details of the request event. Fall back to "" if that ever changes.
    try:
        host = context._rpc_event.call_details.host  # type: ignore[attr-defined]
    except AttributeError:
        return ""
    if isinstance(host, bytes):
        return host.decode("utf-8", "replace")
    return str(host or "")


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    out = []
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode("ascii")
        out.append((key, value))
    return out


def _peer_ip(context: grpc.ServicerContext) -> str:
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5555" or "ipv6:[::1]:5555"
    _, _, addr = peer.partition(":")
    host = addr.rsplit(":", 1)[0]
    return host.strip("[]") or "0.0.0.0"


def _handlers(ctx: PodContext, port: int, tls: bool) -> list[grpc.GenericRpcHandler]:
    pod_context = Context(namespace=ctx.namespace, ingress=ctx.ingress, service_name=ctx.service, pod=ctx.pod)

    def echo(method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        full = f"/{SERVICE}/{method}"

        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            authority = _authority(context)
            headers = [Header(key=":authority", value=authority)] if authority else []
            headers += [Header(key=k, value=v) for k, v in _metadata(context)]
            assertions = Assertions(
                fully_qualified_method=full,
                headers=headers,
                authority=authority,
                context=pod_context,
            )
            if tls:
                assertions.tls_assertions.CopyFrom(TLSAssertions(negotiated_protocol="h2"))
            return EchoResponse(assertions=assertions)

        return handler

    def unimplemented(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "method EchoThree not implemented")

    def istio_echo(request: Any, context: grpc.ServicerContext) -> Any:
        authority = _authority(context)
        lines = []  # :authority is reported as Host= (a "RequestHeader=:authority:..." misparses)
        for key, value in _metadata(context):
            if not key.endswith("-bin"):
                lines.append(f"RequestHeader={key}:{value}")
        lines += [
            "StatusCode=200",
            f"Host={authority}",
            f"ServiceVersion={ctx.version}",
            f"ServicePort={port}",
        ]
        if ctx.cluster:
            lines.append(f"Cluster={ctx.cluster}")
        lines += [
            f"IP={_peer_ip(context)}",
            "Proto=GRPC",
            f"Echo={request.message}",
            f"Hostname={ctx.pod}",
            f"Namespace={ctx.namespace}",
        ]
        return IstioEchoResponse(message="\n".join(lines) + "\n")

    def method(fn: Callable[[Any, grpc.ServicerContext], Any], req: Any, resp: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
        )

    grpcecho = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": method(echo("Echo"), EchoRequest, EchoResponse),
            "EchoTwo": method(echo("EchoTwo"), EchoRequest, EchoResponse),
            "EchoThree": method(unimplemented, EchoRequest, EchoResponse),
        },
    )
    istio = grpc.method_handlers_generic_handler(
        ISTIO_SERVICE, {"Echo": method(istio_echo, IstioEchoRequest, IstioEchoResponse)}
    )
    return [grpcecho, istio]


def _add_health(server: grpc.Server) -> bool:
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # type: ignore
    except ImportError:
        return False
    servicer = health.HealthServicer()
    for name in ("", SERVICE, ISTIO_SERVICE):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return True


def build_server(
    bind: str,
    port: int,
    ctx: PodContext,
    credentials: grpc.ServerCredentials | None = None,
    workers: int = 8,
) -> tuple[grpc.Server, bool]:
    """An unstarted gRPC server bound to ``bind:port``, and whether it serves health checks.

    Raises ``RuntimeError`` when the port cannot be bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"grpc-{port}"),
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers(_handlers(ctx, port, credentials is not None))
    health = _add_health(server)
    address = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, health


# --- client ---------------------------------------------------------------------------------


def _channel(
    target: str,
    authority: str | None,
    root_certificates: bytes | None,
    server_name: str | None,
) -> grpc.Channel:
    options: list[tuple[str, Any]] = []
    if authority:
        options.append(("grpc.default_authority", authority))
    if root_certificates is not None:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return grpc.secure_channel(target, creds, options=options)
    return grpc.insecure_channel(target, options=options)


def _md(metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if metadata is None:
        return []
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return [(k.lower(), v) for k, v in items]


def response_to_dict(message: Any) -> dict[str, Any]:
    """A response message as a dict with proto field names and scalar defaults filled in."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def call(
    target: str,
    method: str = "Echo",
    metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    timeout: float = 5.0,
    *,
    authority: str | None = None,
    root_certificates: bytes | None = None,
    server_name: str | None = None,
) -> dict[str, Any]:
    """Call ``GrpcEcho/<method>`` on ``target`` ("host:port") and return the response dict.

    ``method`` is ``Echo``, ``EchoTwo``, ``EchoThree`` or a full ``/pkg.Service/Method`` path.
    ``authority`` overrides ``:authority``; ``root_certificates`` (PEM) switches to TLS, with
    ``server_name`` as the name to verify. A new channel (connection) is used for every call.
    """
    path = method if method.startswith("/") else f"/{SERVICE}/{method}"
    with _channel(target, authority, root_certificates, server_name) as channel:
        stub = channel.unary_unary(
            path,
            request_serializer=EchoRequest.SerializeToString,
            response_deserializer=EchoResponse.FromString,
        )
        response = stub(EchoRequest(), metadata=_md(metadata), timeout=timeout)
    return response_to_dict(response)


def call_istio(
    target: str,
    message: str = "",
    metadata: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    timeout: float = 5.0,
    *,
    authority: str | None = None,
    root_certificates: bytes | None = None,
    server_name: str | None = None,
) -> str:
    """Call ``proto.EchoTestService/Echo`` on ``target`` and return the response text."""
    with _channel(target, authority, root_certificates, server_name) as channel:
        stub = channel.unary_unary(
            f"/{ISTIO_SERVICE}/Echo",
            request_serializer=IstioEchoRequest.SerializeToString,
            response_deserializer=IstioEchoResponse.FromString,
        )
        response = stub(IstioEchoRequest(message=message), metadata=_md(metadata), timeout=timeout)
    return str(response.message)
