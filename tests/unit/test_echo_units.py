"""Unit tests of the echo workload's pure parts: flags, image mapping, parsing helpers, protos."""

from __future__ import annotations

import sys

import pytest

from nodemesh.echo import IMAGE_ALIASES, command_for, matches_image
from nodemesh.echo.client import ClientUsageError, _json_lines, parse_client_args
from nodemesh.echo.config import PodContext, UsageError, parse_args
from nodemesh.echo.httpserver import _echo_set_headers, canonical_header_name, parse_go_duration


def test_image_aliases_and_command() -> None:
    assert "registry.k8s.io/gateway-api/conformance/echo-advanced" in IMAGE_ALIASES
    assert "registry.k8s.io/gateway-api/conformance/echo-basic" in IMAGE_ALIASES
    assert all(":" not in a.rsplit("/", 1)[1] and "@" not in a for a in IMAGE_ALIASES)
    assert matches_image("registry.k8s.io/gateway-api/conformance/echo-advanced:v0.1.0")
    assert matches_image("gcr.io/k8s-staging-gateway-api/echo-basic@sha256:abcd")
    assert not matches_image("docker.io/library/nginx:1.25")
    args = ["--tcp=9090", "--port=8080"]
    assert command_for(args) == [sys.executable, "-m", "nodemesh.echo", *args]


def test_conformance_args_parse() -> None:
    cfg = parse_args(
        [
            "--tcp=9090",
            "--port=8080",
            "--grpc=7070",
            "--port=8443",
            "--tls=8443",
            "--crt=/cert.crt",
            "--key=/cert.key",
        ],
        env={},
    )
    assert cfg.http == [8080, 8443]
    assert cfg.tcp == [9090]
    assert cfg.grpc == [7070]
    assert cfg.udp == []
    assert cfg.tls == {8443}
    assert (cfg.crt, cfg.key) == ("/cert.crt", "/cert.key")
    assert cfg.bind == "0.0.0.0"
    assert not cfg.defaults


def test_separate_values_and_comma_lists() -> None:
    cfg = parse_args(["--port", "1000,1001", "--udp", "53", "--bind", "127.0.0.1"], env={})
    assert cfg.http == [1000, 1001]
    assert cfg.udp == [53]
    assert cfg.bind == "127.0.0.1"


def test_no_args_defaults() -> None:
    cfg = parse_args([], env={})
    assert cfg.defaults
    assert cfg.http == [8080, 8443]
    assert cfg.tls == {8443}
    assert cfg.tcp == [9090]
    assert cfg.grpc == [7070]
    cfg = parse_args([], env={"HTTP_PORT": "3000", "HTTPS_PORT": "3443"})
    assert cfg.http == [3000, 3443]
    assert cfg.tls == {3443}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus=1"], "unknown flag --bogus"),
        (["--port=http"], "--port"),
        (["--port=70000"], "--port"),
        (["--port"], "needs a value"),
        (["8080"], "unexpected argument"),
        (["--port=80", "--tcp=80"], "port 80"),
        (["--port=80", "--tls=443"], "--tls=443"),
        (["--udp=53", "--tls=53"], "UDP"),
        (["--crt=/x"], "no listener"),
    ],
)
def test_bad_args(argv: list[str], needle: str) -> None:
    with pytest.raises(UsageError, match=None) as err:
        parse_args(argv, env={})
    assert needle in str(err.value)


def test_bad_env_port() -> None:
    with pytest.raises(UsageError, match=r"\$HTTP_PORT"):
        parse_args([], env={"HTTP_PORT": "x"})


def test_pod_context_from_env() -> None:
    ctx = PodContext.from_env(
        {
            "POD_NAME": "echo-v1-0",
            "NAMESPACE": "ns",
            "SERVICE_NAME": "svc",
            "INGRESS_NAME": "ing",
            "POD_IP": "10.0.0.5",
            "NODE_NAME": "n1",
        }
    )
    assert (ctx.pod, ctx.namespace, ctx.service, ctx.ingress) == ("echo-v1-0", "ns", "svc", "ing")
    assert (ctx.pod_ip, ctx.node) == ("10.0.0.5", "n1")
    assert PodContext.from_env({"HOSTNAME": "h"}).pod == "h"


def test_go_durations() -> None:
    assert parse_go_duration("0") == 0
    assert parse_go_duration("1.5s") == pytest.approx(1.5)
    assert parse_go_duration("500ms") == pytest.approx(0.5)
    assert parse_go_duration("1m30s") == pytest.approx(90)
    assert parse_go_duration("-2us") == pytest.approx(-2e-6)
    for bad in ("", "5", "s", "1x", "1.s.", "."):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_go_duration(bad)


def test_canonical_header_names() -> None:
    assert canonical_header_name("x-forwarded-for") == "X-Forwarded-For"
    assert canonical_header_name("CONTENT-type") == "Content-Type"
    assert canonical_header_name("x--a") == "X--A"
    assert canonical_header_name("bad name") is None
    assert canonical_header_name("") is None


def test_echo_set_header_rules() -> None:
    got = _echo_set_headers(["X-A:1,X-A: 2, x-b:c", "Content-Length:5,:x,bad name:1,X-Empty"])
    assert got == [("X-A", "1,2"), ("x-b", "c"), ("X-Empty", "")]
    assert _echo_set_headers([""]) == []


def test_client_args() -> None:
    a = parse_client_args(["http://echo/v1", "--method=post", "-H", "X-A:1", "-H=Host: h"])
    assert (a.url, a.method, a.headers, a.count) == (
        "http://echo/v1",
        "POST",
        [("X-A", "1"), ("Host", "h")],
        1,
    )
    assert parse_client_args(["grpc://echo:7070", "--count=3", "--timeout=2s"]).timeout == 2.0
    for bad in ([], ["ftp://x"], ["http://x", "--nope"], ["http://x", "-H", "novalue"]):
        with pytest.raises(ClientUsageError):
            parse_client_args(bad)


def test_client_json_translation() -> None:
    lines = _json_lines(
        {
            "path": "/p",
            "host": "echo",
            "method": "GET",
            "proto": "HTTP/1.1",
            "headers": {"X-A": ["1", "2"]},
            "namespace": "ns",
            "pod": "echo-v1-0",
            "httpPort": "8080",
        }
    )
    assert "Hostname=echo-v1-0" in lines
    assert lines.count("RequestHeader=X-A:1") == 1
    assert "RequestHeader=X-A:2" in lines
    assert "URL=/p" in lines


def test_grpc_descriptors() -> None:
    from nodemesh.echo import grpcecho

    svc = grpcecho.POOL.FindServiceByName(grpcecho.SERVICE)
    assert svc.full_name == "gateway_api_conformance.echo_basic.grpcecho.GrpcEcho"
    assert [m.name for m in svc.methods] == ["Echo", "EchoTwo", "EchoThree"]
    ctx_fields = [f.name for f in grpcecho.Context.DESCRIPTOR.fields]
    assert ctx_fields == ["namespace", "ingress", "service_name", "pod"]
    a = grpcecho.Assertions.DESCRIPTOR.fields_by_name
    assert [f.number for f in grpcecho.Assertions.DESCRIPTOR.fields] == [1, 2, 3, 4, 5]
    assert a["headers"].message_type.full_name.endswith(".Header")
    resp = grpcecho.EchoResponse()
    resp.assertions.headers.add(key="k", value="v")
    resp.assertions.context.pod = "p"
    again = grpcecho.EchoResponse.FromString(resp.SerializeToString())
    assert grpcecho.response_to_dict(again)["assertions"]["headers"] == [{"key": "k", "value": "v"}]
    istio = grpcecho.POOL.FindServiceByName(grpcecho.ISTIO_SERVICE)
    assert istio.full_name == "proto.EchoTestService"


def test_self_signed_certificate() -> None:
    from cryptography import x509

    from nodemesh.echo import tlsutil

    pair = tlsutil.load_keypair("/nonexistent.crt", "/nonexistent.key", ["echo-v1-0"], ["127.0.0.1"])
    assert pair.source == "self-signed"
    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "echo-v1-0" in san.get_values_for_type(x509.DNSName)
    ctx = tlsutil.server_context(pair, alpn=["http/1.1"])
    assert ctx.minimum_version.name == "TLSv1_2"
