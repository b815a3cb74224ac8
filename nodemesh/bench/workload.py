"""What `nodemesh bench` deploys, as plain data (pure functions, no I/O).

Two single-node clusters carry the four modes of the traffic section:

- the *plain* cluster (``--datapath none``): mode ``nomesh`` (client → 3 nginx / 3 echo pods by
  pod IP) and mode ``sidecar`` (the same workload with an Envoy sidecar in every pod, traffic
  captured by istio-init's iptables rules);
- the *mesh* cluster (``--datapath bpf``): mode ``l4`` (client → Service ClusterIP, kernel
  load balancing, a NetworkPolicy that allows the client) and mode ``l7`` (a second Service over
  the same pods with an HTTPRoute whose parent and backend is that Service, so requests cross the
  node's Envoy once).

The sidecar model is built to match the node Envoy's tuning: the HTTP connection manager comes
from nodemesh's own builder (`nodemesh.route.resources.http_connection_manager`) with the access
log taken out, clusters get nodemesh's circuit breakers and connect timeout, Envoy runs with the
same ``--concurrency`` and overload limits as the node Envoy.

The mTLS section (`MTLS_MODES`) uses two 2-node clusters of the same two kinds, clients on
`CLIENT_NODE` and servers on `SERVER_NODE`: plain routing across nodes, the sidecar model with
Istio's mutual TLS between the sidecars (`SidecarTls`: static certificates from a throwaway CA,
nodemesh's tunnel TLS parameters), and nodemesh with its tunnel (L4) or a route (L7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

ECHO_IMAGE = "registry.k8s.io/gateway-api/conformance/echo-basic"
SERVER_PORT = 8080
SERVICE_PORT = 80
RR_PORT = 7000
SIDECAR_UID = 1337
SIDECAR_OUTBOUND_PORT = 15001
SIDECAR_INBOUND_PORT = 15006
SIDECAR_ADMIN_PORT = 15000
SIDECAR_CONCURRENCY = 2  # the node Envoy's (nodemesh.agent.proxy.ProxyManager default)
MAX_DOWNSTREAM_CONNECTIONS = 50_000  # the node Envoy's bootstrap default
CLIENT_LABELS = {"role": "client"}
SERVERS = ("nginx", "echo")

MODES = ("nomesh", "sidecar", "l4", "l7")
MTLS_MODES = ("nomesh", "sidecar-mtls", "l4-mtls", "l7-mtls")
MODE_TITLES = {"nomesh": "no mesh", "sidecar": "sidecar model", "l4": "nodemesh L4",
               "l7": "nodemesh L7", "sidecar-mtls": "sidecar model, mTLS",
               "l4-mtls": "nodemesh L4, mTLS", "l7-mtls": "nodemesh L7, mTLS"}
# The mTLS section's topology: every client on one node, every server on the other.
CLIENT_NODE = "node1"
SERVER_NODE = "node2"
CLIENT_SA = "client"  # the clients' ServiceAccount; the servers keep "default"
SERVER_SA = "default"
TRUST_DOMAIN = "cluster.local"
NAMESPACE = "default"


@dataclass(frozen=True)
class Workload:
    """One traffic shape: server x connection handling x response size."""

    server: str  # "nginx" (fast static responder) or "echo" (nodemesh's Python echo server)
    conn: str  # "keepalive" or "close" (a new connection per request)
    body: str  # "small" or "16k"

    @property
    def name(self) -> str:
        return f"{self.server}/{self.conn}/{self.body}"

    @property
    def path(self) -> str:
        if self.body == "small":
            return "/"
        return "/16k" if self.server == "nginx" else "/?size=16384"


ALL_WORKLOADS = tuple(Workload(s, c, b) for s in SERVERS for c in ("keepalive", "close")
                      for b in ("small", "16k"))


# ---- Kubernetes objects -----------------------------------------------------------------
def meta(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name}
    if labels:
        m["labels"] = labels
    return m


def service(name: str, selector: dict[str, str], port: int = SERVICE_PORT,
            target: int | str = SERVER_PORT) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
            "spec": {"selector": selector,
                     "ports": [{"name": "http", "port": port, "targetPort": target}]}}


def server_argv(server: str, python: str) -> list[str]:
    if server == "nginx":
        return [python, "-m", "nodemesh.cluster.nginx", "--port", str(SERVER_PORT),
                "--workers", "1"]
    return [python, "-m", "nodemesh.echo", f"--port={SERVER_PORT}"]


def server_container(server: str, python: str, wait_for_redirect: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {"name": server,
                         "image": "nginx" if server == "nginx" else ECHO_IMAGE,
                         "ports": [{"containerPort": SERVER_PORT, "name": "http"}]}
    if server == "nginx":
        c["args"] = ["--port", str(SERVER_PORT), "--workers", "1"]
    else:
        c["args"] = [f"--port={SERVER_PORT}"]
    if wait_for_redirect:
        c["command"] = wait_then(server_argv(server, python))
        del c["args"]
    return c


def deployment(name: str, replicas: int, labels: dict[str, str],
               containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name),
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"terminationGracePeriodSeconds": 2,
                                           "containers": containers}}}}


def pod(name: str, labels: dict[str, str], containers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta(name, labels),
            "spec": {"terminationGracePeriodSeconds": 2, "containers": containers}}


def sleeper(name: str = "client", wait_for_redirect: bool = False) -> dict[str, Any]:
    argv = ["sleep", "infinity"]
    return {"name": name, "image": "debian",
            "command": wait_then(argv) if wait_for_redirect else argv}


def client_pod(name: str = "client", sidecar: dict[str, Any] | None = None) -> dict[str, Any]:
    containers = [sleeper("app", wait_for_redirect=sidecar is not None)]
    if sidecar is not None:
        containers.append(sidecar)
    return pod(name, dict(CLIENT_LABELS), containers)


# The hostile section: a pod that floods (DNS queries, new connections), and the name its victim
# looks up (a Service of the bench, in the namespace the bench uses).
HOSTILE_NAME = f"rr.{NAMESPACE}.svc.cluster.local"


def hostile_pod(name: str = "hostile") -> dict[str, Any]:
    return pod(name, {"app": name}, [sleeper("app")])


def rr_pod(nmrr: str, name: str = "rr") -> dict[str, Any]:
    return pod(name, {"app": name}, [{
        "name": "server", "image": "debian", "command": [nmrr, "server", str(RR_PORT)],
        "ports": [{"containerPort": RR_PORT, "name": "rr"}]}])


def allow_client_policy(name: str, apps: list[str], ports: list[int]) -> dict[str, Any]:
    """Ingress to the pods of `apps` only from the client pods, on `ports`."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(name),
            "spec": {"podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": sorted(apps)}]},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": dict(CLIENT_LABELS)}}],
                             "ports": [{"port": p, "protocol": "TCP"} for p in ports]}]}}


def place(objs: list[dict[str, Any]], node: str, service_account: str | None = None
          ) -> list[dict[str, Any]]:
    """Copies of `objs` whose pods (Pods, Deployment templates) run on `node`, optionally as
    `service_account`; other objects unchanged."""
    out = []
    for o in objs:
        o = json.loads(json.dumps(o))
        spec = (o["spec"]["template"]["spec"] if o["kind"] == "Deployment"
                else o["spec"] if o["kind"] == "Pod" else None)
        if spec is not None:
            spec["nodeName"] = node
            if service_account:
                spec["serviceAccountName"] = service_account
        out.append(o)
    return out


def expected_pods(objs: list[dict[str, Any]]) -> int:
    """How many pods `objs` make (Pods, plus the replicas of Deployments)."""
    return sum(1 if o["kind"] == "Pod" else int(o["spec"].get("replicas", 1))
               if o["kind"] == "Deployment" else 0 for o in objs)


def toggle_policy(name: str, app: str, allow: bool) -> dict[str, Any]:
    """The policy the change-latency test flips: ingress to `app` from the client, or from no one."""
    source = dict(CLIENT_LABELS) if allow else {"role": "nobody"}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta(name),
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": source}}],
                                  "ports": [{"port": SERVER_PORT, "protocol": "TCP"}]}]}}


def http_route(name: str, svc: str, header_gen: int | None = None) -> dict[str, Any]:
    """A GAMMA route: parent and only backend are the same Service (optionally with a request
    header that the change-latency test bumps)."""
    rule: dict[str, Any] = {"backendRefs": [{"name": svc, "port": SERVICE_PORT}]}
    if header_gen is not None:
        rule["filters"] = [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{"name": "x-bench-gen", "value": str(header_gen)}]}}]
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": meta(name),
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": svc,
                                     "port": SERVICE_PORT}],
                     "rules": [rule]}}


# ---- the sidecar model ------------------------------------------------------------------
# istio-init's rules for a pod with the default settings (REDIRECT mode, no TPROXY), as
# `istio-iptables` writes them: inbound TCP to 15006 except Istio's own ports, outbound TCP to
# 15001 except the proxy's own traffic (uid/gid 1337), loopback and the inbound upstream source
# 127.0.0.6.
ISTIO_IPTABLES = f"""*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {SIDECAR_INBOUND_PORT}
-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner {SIDECAR_UID} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {SIDECAR_UID} -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner {SIDECAR_UID} -j RETURN
-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner {SIDECAR_UID} -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {SIDECAR_UID} -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner {SIDECAR_UID} -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {SIDECAR_OUTBOUND_PORT}
COMMIT
"""

# The app containers of a sidecar pod start once the redirect is in place (Istio's
# holdApplicationUntilProxyStarts does the same for the proxy itself; readiness covers that).
WAIT_FOR_REDIRECT = ("until iptables -t nat -S ISTIO_OUTPUT >/dev/null 2>&1; do sleep 0.05; done; "
                     'exec "$@"')


def wait_then(argv: list[str]) -> list[str]:
    return ["sh", "-c", WAIT_FOR_REDIRECT, "wait-for-redirect", *argv]


_TYPE = "type.googleapis.com/"
_ORIGINAL_DST = {"name": "envoy.filters.listener.original_dst", "typed_config": {
    "@type": _TYPE + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}
_HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _hcm(listener: str, cluster: str) -> dict[str, Any]:
    """nodemesh's HTTP connection manager with an inline route to `cluster`, no access log."""
    from nodemesh.route.resources import http_connection_manager

    hcm = http_connection_manager(listener, "unused")
    hcm.pop("rds", None)
    hcm.pop("access_log", None)
    hcm["route_config"] = {"name": listener, "virtual_hosts": [{
        "name": listener, "domains": ["*"],
        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def _tcp_proxy(cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": _TYPE + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": cluster, "cluster": cluster}}


def _cluster_common(name: str) -> dict[str, Any]:
    from nodemesh.route.resources import CIRCUIT_BREAKERS, CONNECT_TIMEOUT

    return {"name": name, "connect_timeout": CONNECT_TIMEOUT,
            "circuit_breakers": CIRCUIT_BREAKERS,
            "typed_extension_protocol_options": {_HPO_KEY: {
                "@type": _TYPE + _HPO_KEY,
                "use_downstream_protocol_config": {"http_protocol_options": {},
                                                   "http2_protocol_options": {}}}}}


def _original_dst_cluster(name: str, bind_127_0_0_6: bool) -> dict[str, Any]:
    c = {**_cluster_common(name), "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED"}
    if bind_127_0_0_6:  # Istio's inbound upstream source, exempted by the iptables rules
        c["upstream_bind_config"] = {"source_address": {"address": "127.0.0.6", "port_value": 0}}
    return c


@dataclass(frozen=True)
class OutboundService:
    """A service the sidecar routes to: its ClusterIP and port, its endpoints, and (with mutual
    TLS) the SPIFFE ID its endpoints must present."""

    name: str
    vip: str
    port: int
    endpoints: tuple[tuple[str, int], ...]
    peer_id: str = ""


@dataclass(frozen=True)
class SidecarTls:
    """A sidecar's workload certificate (Istio's SDS would deliver it; here it is static)."""

    spiffe_id: str
    chain_pem: str
    key_pem: str = field(repr=False)
    root_pem: str


# The client sidecar's counters that show its requests went out in mutual TLS (every outbound
# cluster has only the TLS transport socket), read from the pod's loopback.
SIDECAR_TLS_STATS_URL = (
    f"http://127.0.0.1:{SIDECAR_ADMIN_PORT}/stats?filter=" + quote(
        r"^cluster\.outbound\|.*\.(ssl\.handshake|ssl\.connection_error|upstream_rq_total"
        r"|upstream_cx_total)$"))
# Istio's ALPN for mTLS between sidecars (ALPNInMeshWithMxc); the inbound chain matches it.
ISTIO_ALPN = ("istio-peer-exchange", "istio")
_TLS_INSPECTOR = {"name": "envoy.filters.listener.tls_inspector", "typed_config": {
    "@type": _TYPE + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}


def sidecar_tls_socket(tls: SidecarTls, upstream: bool, peer_id: str = "",
                       sni: str = "") -> dict[str, Any]:
    """Istio's ISTIO_MUTUAL transport socket, built from nodemesh's own tunnel TLS settings
    (`nodemesh.route.tls`: TLS 1.3 only, Envoy's default ciphers and curves) so both meshes
    negotiate the same; static certificates instead of SDS, Istio's ALPN, and the peer's
    SPIFFE ID checked where Istio checks it (the client checks the server's)."""
    from nodemesh.route import tls as mesh_tls

    build = mesh_tls.upstream_tls if upstream else mesh_tls.downstream_tls
    sock = build(tls.spiffe_id, {"exact": peer_id or tls.spiffe_id})
    ctx = sock["typed_config"]["common_tls_context"]
    del ctx["tls_certificate_sds_secret_configs"]
    validation = ctx.pop("combined_validation_context")["default_validation_context"]
    if not peer_id:  # Istio's inbound leaves the client's identity to authorization policies
        validation.pop("match_typed_subject_alt_names", None)
    ctx["tls_certificates"] = [{"certificate_chain": {"inline_string": tls.chain_pem},
                                "private_key": {"inline_string": tls.key_pem}}]
    ctx["validation_context"] = {**validation, "trusted_ca": {"inline_string": tls.root_pem}}
    ctx["alpn_protocols"] = list(ISTIO_ALPN)
    if sni:
        sock["typed_config"]["sni"] = sni
    return sock


def _inbound_chains(tls: SidecarTls | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """virtualInbound's chains for the app port (and the clusters only they use): plaintext, or
    with `tls` Istio's STRICT mode: mutual TLS terminated here, plaintext refused."""
    name = f"inbound|{SERVER_PORT}||"
    chain: dict[str, Any] = {"name": name, "filter_chain_match": {"destination_port": SERVER_PORT},
                             "filters": [_hcm(name, name)]}
    if tls is None:
        return [chain], []
    chain["filter_chain_match"].update(transport_protocol="tls",
                                       application_protocols=list(ISTIO_ALPN))
    chain["transport_socket"] = sidecar_tls_socket(tls, upstream=False)
    refuse = {"name": f"{name}-plaintext", "filter_chain_match": {"destination_port": SERVER_PORT},
              "filters": [_tcp_proxy("BlackHoleCluster")]}
    blackhole = {"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": "BlackHoleCluster", "endpoints": []}}
    return [chain, refuse], [blackhole]


def sidecar_bootstrap(pod_name: str, outbound: list[OutboundService],
                      tls: SidecarTls | None = None) -> dict[str, Any]:
    """The sidecar's static Envoy config (what istiod would push, for these services; with
    `tls`, what it pushes with mesh-wide STRICT mutual TLS)."""
    chains = []
    clusters: list[dict[str, Any]] = []
    for s in outbound:
        cname = f"outbound|{s.port}||{s.name}"
        chains.append({"name": cname,
                       "filter_chain_match": {"prefix_ranges": [{"address_prefix": s.vip,
                                                                 "prefix_len": 32}],
                                              "destination_port": s.port},
                       "filters": [_hcm(cname, cname)]})
        cluster = {**_cluster_common(cname), "type": "STATIC", "lb_policy": "ROUND_ROBIN",
                   "load_assignment": {"cluster_name": cname, "endpoints": [{"lb_endpoints": [
                       {"endpoint": {"address": {"socket_address": {
                           "address": ip, "port_value": port}}}}
                       for ip, port in s.endpoints]}]}}
        if tls is not None:
            cluster["transport_socket"] = sidecar_tls_socket(
                tls, upstream=True, peer_id=s.peer_id,
                sni=f"outbound_.{s.port}_._.{s.name}.{NAMESPACE}.svc.{TRUST_DOMAIN}")
        clusters.append(cluster)
    inbound_chains, inbound_clusters = _inbound_chains(tls)
    clusters += [_original_dst_cluster("PassthroughCluster", False),
                 _original_dst_cluster("InboundPassthroughCluster", True),
                 _original_dst_cluster(f"inbound|{SERVER_PORT}||", True), *inbound_clusters]
    listeners = [
        {"name": "virtualOutbound",
         "address": {"socket_address": {"address": "0.0.0.0", "port_value": SIDECAR_OUTBOUND_PORT}},
         "listener_filters": [_ORIGINAL_DST], "traffic_direction": "OUTBOUND",
         "filter_chains": chains,
         "default_filter_chain": {"name": "PassthroughFilterChain",
                                  "filters": [_tcp_proxy("PassthroughCluster")]}},
        {"name": "virtualInbound",
         "address": {"socket_address": {"address": "0.0.0.0", "port_value": SIDECAR_INBOUND_PORT}},
         "listener_filters": [_ORIGINAL_DST] + ([_TLS_INSPECTOR] if tls else []),
         "traffic_direction": "INBOUND",
         "filter_chains": inbound_chains,
         "default_filter_chain": {"name": "InboundPassthroughFilterChain",
                                  "filters": [_tcp_proxy("InboundPassthroughCluster")]}},
    ]
    return {
        "node": {"id": pod_name, "cluster": "sidecar"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1",
                                                 "port_value": SIDECAR_ADMIN_PORT}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
        "overload_manager": {"refresh_interval": "0.25s", "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": _TYPE + "envoy.extensions.resource_monitors.downstream_connections.v3."
                                 "DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS}}]},
    }


SIDECAR_SCRIPT = (
    "set -e\n"
    "iptables-restore --noflush <<'EOF'\n" + ISTIO_IPTABLES + "EOF\n"
    f'exec setpriv --reuid={SIDECAR_UID} --regid={SIDECAR_UID} --clear-groups "$1" '
    f'--config-yaml "$2" --disable-hot-restart --concurrency {SIDECAR_CONCURRENCY} -l warning\n'
)


def sidecar_container(envoy: str, config: dict[str, Any]) -> dict[str, Any]:
    """The `istio-proxy` container: istio-init's rules, then Envoy as uid 1337 (no init
    containers here, so the setup runs in the proxy container before exec)."""
    return {
        "name": "istio-proxy", "image": "envoyproxy/envoy",
        "command": ["sh", "-c", SIDECAR_SCRIPT, "istio-proxy", envoy,
                    json.dumps(config, separators=(",", ":"))],
        # Probing rarely keeps the shims quiet on the servers' CPU while the benchmark runs;
        # so the first probe must find Envoy ready, or the pod waits a whole period: when ten
        # sidecars start at once on this 2-CPU VM, Envoy often needs more than a second.
        "readinessProbe": {"httpGet": {"host": "127.0.0.1", "port": SIDECAR_ADMIN_PORT,
                                       "path": "/ready"},
                           "initialDelaySeconds": 2, "periodSeconds": 10},
    }


# ---- the whole setup ----------------------------------------------------------------------
def plain_servers(python: str, replicas: int = 3, prefix: str = "",
                  servers: tuple[str, ...] = SERVERS) -> list[dict[str, Any]]:
    """The nomesh servers (or, with `prefix`, any plain copy): deployments and services."""
    objs: list[dict[str, Any]] = []
    for s in servers:
        name = prefix + s
        objs.append(deployment(name, replicas, {"app": name}, [server_container(s, python)]))
        objs.append(service(name, {"app": name}))
    return objs


def sidecar_servers(python: str, envoy: str, replicas: int = 3,
                    servers: tuple[str, ...] = SERVERS,
                    tls: SidecarTls | None = None) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for s in servers:
        name = "sc-" + s
        config = sidecar_bootstrap(name, [], tls)
        containers = [server_container(s, python, wait_for_redirect=True),
                      sidecar_container(envoy, config)]
        objs.append(deployment(name, replicas, {"app": name}, containers))
        objs.append(service(name, {"app": name}))
    return objs


def sidecar_client(envoy: str, outbound: list[OutboundService],
                   tls: SidecarTls | None = None) -> dict[str, Any]:
    return client_pod("sc-client", sidecar_container(envoy, sidecar_bootstrap("sc-client", outbound,
                                                                              tls)))


def l7_workload(python: str, replicas: int = 3,
                servers: tuple[str, ...] = SERVERS) -> list[dict[str, Any]]:
    """The L7 mode's own client and servers, with Services that have a route (only these go
    via the node Envoy). They are separate from the L4 mode's pods: the node Envoy's upstream
    connections carry the client pod's address (original_src), and a direct connection of the
    same client that happens to pick the same source port towards the same server pod hangs
    (see docs/benchmarks.md), which would make one mode's traffic disturb the other's."""
    objs: list[dict[str, Any]] = [client_pod("client-l7")]
    for s in servers:
        name = f"{s}-l7"
        objs.append(deployment(name, replicas, {"app": name}, [server_container(s, python)]))
        objs.append(service(name, {"app": name}))
        objs.append(http_route(name, name))
    return objs


def calib_pod() -> dict[str, Any]:
    """nginx alone in a pod: the load generators' calibration runs against it on loopback."""
    return pod("calib", {"app": "calib"}, [server_container("nginx", "")])


CHANGE_TARGET = "pt"


def change_target(python: str) -> list[dict[str, Any]]:
    """The target of the change-latency test: one echo pod, a Service for the policy test and
    one for the route test, the policy in its allowing state, the route at generation 0."""
    return [deployment(CHANGE_TARGET, 1, {"app": CHANGE_TARGET}, [server_container("echo", python)]),
            service(CHANGE_TARGET, {"app": CHANGE_TARGET}),
            service(f"{CHANGE_TARGET}-l7", {"app": CHANGE_TARGET}),
            toggle_policy(CHANGE_TARGET, CHANGE_TARGET, allow=True),
            http_route(f"{CHANGE_TARGET}-l7", f"{CHANGE_TARGET}-l7", header_gen=0)]


# ---- the mTLS section (two 2-node clusters) -------------------------------------------------
def mtls_plain(python: str, envoy: str, servers: tuple[str, ...], server_tls: SidecarTls,
               replicas: int = 3) -> list[dict[str, Any]]:
    """The plain 2-node cluster before its sidecar client: on the server node the nomesh
    servers and the sidecar servers (STRICT mutual TLS), on the client node the nomesh client."""
    return [*place(plain_servers(python, replicas, servers=servers), SERVER_NODE),
            *place(sidecar_servers(python, envoy, replicas, servers, server_tls), SERVER_NODE),
            *place([client_pod()], CLIENT_NODE, CLIENT_SA)]


def mtls_sidecar_client(envoy: str, outbound: list[OutboundService],
                        client_tls: SidecarTls) -> dict[str, Any]:
    """The sidecar client on the client node (it needs the servers' pod IPs: applied last)."""
    return place([sidecar_client(envoy, outbound, client_tls)], CLIENT_NODE, CLIENT_SA)[0]


def mtls_mesh(python: str, servers: tuple[str, ...], replicas: int = 3) -> list[dict[str, Any]]:
    """The nodemesh 2-node cluster: servers (L4, and L7 behind routes) on the server node, their
    clients on the client node, the policy that allows the clients."""
    l7 = l7_workload(python, replicas, servers)
    policy = allow_client_policy("allow-client", [*servers, *(f"{s}-l7" for s in servers)],
                                 [SERVER_PORT])
    return [*place(plain_servers(python, replicas, servers=servers), SERVER_NODE),
            *place([client_pod(), *(o for o in l7 if o["kind"] == "Pod")], CLIENT_NODE, CLIENT_SA),
            *place([o for o in l7 if o["kind"] != "Pod"], SERVER_NODE), policy]
