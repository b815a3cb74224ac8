"""Schema of Service: ClusterIP and headless services, their ports and session affinity.

Only what nodemesh's socket load balancer does is accepted: one IPv4 ClusterIP (or none for a
headless service) with TCP/UDP ports. NodePort, LoadBalancer and ExternalName services, external
IPs and IPv6 are refused. The cluster IP itself is allocated at admission (admission.py).
"""

from __future__ import annotations

import ipaddress

from nodemesh.model.common import LABELS, PORT
from nodemesh.model.labels import validate_label_key
from nodemesh.model.names import check_dns1123_label, check_iana_svc_name
from nodemesh.model.schema import (
    Bool,
    Ctx,
    Hook,
    Int,
    IntOrStr,
    Key,
    ListOf,
    Obj,
    Path,
    Str,
    Unsupported,
    format_path,
    one_of,
    opt,
    quote,
    req,
)
from nodemesh.model.workloads import PROTOCOL

SUPPORTED_TYPES = "nodemesh supports ClusterIP and headless services"
LB_ONLY = "only LoadBalancer services use it; " + SUPPORTED_TYPES
IPV4_ONLY = "nodemesh is IPv4-only"
LB_ALGORITHM_ANNOTATION = "service.cilium.io/lb-algorithm"
LB_ALGORITHMS = ("random", "maglev")
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, Kubernetes' default for ClientIP affinity


def check_cluster_ip(value: str) -> str | None:
    if value in ("", "None"):
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return f'must be "None" (headless), empty (allocate one) or an IPv4 address (got "{value}")'
    if ip.version != 4:
        return f"an IPv6 address is not supported ({IPV4_ONLY})"
    return None


def _port_defaults(port: dict, path: Path, ctx: Ctx) -> None:
    # Kubernetes: targetPort defaults to the port itself.
    port.setdefault("targetPort", port["port"])


SERVICE_PORT = Obj(
    {
        "name": Str(validator=check_dns1123_label),
        "protocol": opt(PROTOCOL, "TCP"),
        "appProtocol": Str(validator=validate_label_key),
        "port": req(PORT),
        "targetPort": IntOrStr(PORT, Str(validator=check_iana_svc_name)),
        "nodePort": Unsupported("only NodePort services use it; " + SUPPORTED_TYPES, (0,)),
    },
    hooks=[Hook(_port_defaults, needs=("port",))],
)


def _ports(spec: dict, path: Path, ctx: Ctx) -> None:
    ports = spec.get("ports") or []
    if not ports and spec.get("clusterIP") != "None":
        ctx.error((*path, "ports"), "required: a Service needs at least one port "
                  '(only a headless service, clusterIP: "None", may have none)')
    names: dict[str, int] = {}
    keys: dict[tuple[int, str], int] = {}
    for i, p in enumerate(ports):
        name = p.get("name")
        if not name and len(ports) > 1:
            ctx.error((*path, "ports", i, "name"), "required when a Service has more than one port")
        elif name in names:
            first = format_path((*path, "ports", names[name], "name"))
            ctx.error((*path, "ports", i, "name"),
                      f'duplicate port name "{name}" (same as {first})')
        elif name:
            names[name] = i
        key = (p["port"], p["protocol"])
        if key in keys:
            first = format_path((*path, "ports", keys[key]))
            ctx.error((*path, "ports", i, "port"),
                      f"duplicate port {key[0]}/{key[1]} (same as {first})")
        else:
            keys[key] = i


def _affinity(spec: dict, path: Path, ctx: Ctx) -> None:
    if spec.get("sessionAffinity") == "ClientIP":
        cfg = spec.setdefault("sessionAffinityConfig", {})
        cfg.setdefault("clientIP", {}).setdefault("timeoutSeconds", DEFAULT_AFFINITY_TIMEOUT)
    elif "sessionAffinityConfig" in spec:
        ctx.error((*path, "sessionAffinityConfig"),
                  "may only be set when sessionAffinity is ClientIP")


def _cluster_ips(spec: dict, path: Path, ctx: Ctx) -> None:
    ip, ips = spec.get("clusterIP"), spec.get("clusterIPs")
    if ips and ip not in (None, "") and ips[0] != ip:
        ctx.error((*path, "clusterIPs", 0), f'must match spec.clusterIP ("{ip}")')
    elif ips and ip in (None, ""):
        spec["clusterIP"] = ips[0]
    if spec.get("clusterIP") == "":
        spec.pop("clusterIP")  # empty means "allocate one", as if unset
        spec.pop("clusterIPs", None)


SERVICE_SPEC = Obj(
    {
        "type": opt(Str(enum=("ClusterIP",), unsupported=dict.fromkeys(
            ("NodePort", "LoadBalancer", "ExternalName"), SUPPORTED_TYPES)), "ClusterIP"),
        "selector": LABELS,
        "ports": ListOf(SERVICE_PORT),
        "clusterIP": Str(validator=check_cluster_ip),
        "clusterIPs": ListOf(Str(validator=check_cluster_ip), max_items=1),
        "sessionAffinity": opt(Str(enum=("None", "ClientIP")), "None"),
        "sessionAffinityConfig": Obj({"clientIP": Obj({"timeoutSeconds": Int(1, 86400)})}),
        "ipFamilies": opt(ListOf(Str(enum=("IPv4",), unsupported={"IPv6": IPV4_ONLY}),
                                 max_items=1), ["IPv4"]),
        "ipFamilyPolicy": opt(Str(enum=("SingleStack", "PreferDualStack"),
                                  unsupported={"RequireDualStack": IPV4_ONLY}), "SingleStack"),
        "internalTrafficPolicy": opt(Str(enum=("Cluster",), unsupported={
            "Local": "every node load-balances to every endpoint"}), "Cluster"),
        # Accepted, no effect.
        "publishNotReadyAddresses": Bool(),
        "trafficDistribution": Str(),
        # Refused.
        "externalIPs": Unsupported("services are reached on their ClusterIP only"),
        "externalName": Unsupported("ExternalName services: " + SUPPORTED_TYPES),
        "externalTrafficPolicy": Unsupported("only NodePort and LoadBalancer services use it"),
        "loadBalancerIP": Unsupported(LB_ONLY),
        "loadBalancerSourceRanges": Unsupported(LB_ONLY),
        "loadBalancerClass": Unsupported(LB_ONLY),
        "allocateLoadBalancerNodePorts": Unsupported(LB_ONLY),
        "healthCheckNodePort": Unsupported(LB_ONLY, (0,)),
    },
    hooks=[
        Hook(_ports, needs=("ports", "clusterIP")),
        Hook(_affinity, needs=("sessionAffinity", "sessionAffinityConfig")),
        Hook(_cluster_ips, needs=("clusterIP", "clusterIPs")),
    ],
)


def check_service_annotations(obj: dict, path: Path, ctx: Ctx) -> None:
    """Cilium's load-balancing algorithm annotation must name an algorithm nodemesh has."""
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    algo = annotations.get(LB_ALGORITHM_ANNOTATION)
    if algo is not None and algo not in LB_ALGORITHMS:
        ctx.error(("metadata", "annotations", Key(LB_ALGORITHM_ANNOTATION)),
                  f"must be {one_of(LB_ALGORITHMS)} (got {quote(algo)})")
