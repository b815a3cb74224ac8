"""Schema of CiliumNetworkPolicy (cilium.io/v2): L3/L4 rules, HTTP rules, deny rules.

nodemesh enforces the parts of Cilium's policy language that make sense in a cluster of pods:
endpoint selectors, entities, CIDRs, ports, HTTP rules, and mutual authentication
(``authentication.mode: required``: peers whose workload identity was proven). Peers that need
Cilium's DNS proxy, cloud integrations, node identities or Kubernetes services as policy peers
(toFQDNs, toGroups, toNodes, toServices) are refused, as are non-HTTP L7 parsers and TLS
interception.
"""

from __future__ import annotations

import re

from nodemesh.model.common import CILIUM_SELECTOR
from nodemesh.model.names import (
    check_cidr,
    check_cidr_or_ip,
    check_http_header_name,
    check_iana_svc_name,
    parse_cidr,
)
from nodemesh.model.regex import re2_problem
from nodemesh.model.schema import (
    Bool,
    Ctx,
    Forbidden,
    Hook,
    Int,
    ListOf,
    Obj,
    Path,
    Str,
    Unsupported,
    opt,
    quote,
    req,
)

ENTITIES = ("all", "world", "cluster", "host", "remote-node")
REFUSED_ENTITIES = {
    "kube-apiserver": "a nodemesh cluster has no kube-apiserver",
    "init": "nodemesh pods get their identity before they start",
    "health": "nodemesh has no Cilium health endpoints",
    "unmanaged": "nodemesh manages every pod",
    "ingress": "nodemesh has no Cilium ingress proxy",
    "none": "a peer that selects nothing: remove the rule instead",
    "world-ipv4": 'nodemesh is IPv4-only: use "world"',
    "world-ipv6": "nodemesh is IPv4-only",
}
ENTITY = Str(enum=ENTITIES, unsupported=REFUSED_ENTITIES)
ONLY_HTTP = "nodemesh enforces HTTP rules only"
NO_TLS = "nodemesh does not intercept TLS"
_NUMERIC = re.compile(r"\d+")


def check_cnp_port(value: str) -> str | None:
    """Cilium ports are strings: a number 0-65535 (0 = every port) or a named port."""
    if _NUMERIC.fullmatch(value):
        return None if int(value) <= 65535 else "must be 0-65535 or a port name"
    if check_iana_svc_name(value.lower()) is not None:
        return 'must be a port number such as "80" or a port name such as "http"'
    return None


def _port_range(pp: dict, path: Path, ctx: Ctx) -> None:
    end = pp.get("endPort")
    if not end:
        return
    port = pp.get("port")
    if port is None or not _NUMERIC.fullmatch(port):
        ctx.error((*path, "endPort"), "requires a numeric port")
    elif end < int(port):
        ctx.error((*path, "endPort"), f"must be >= port ({port})")


PORT_PROTOCOL = Obj(
    {
        "port": Str(validator=check_cnp_port),
        "endPort": Int(0, 65535),
        "protocol": opt(Str(enum=("TCP", "UDP", "ANY"), unsupported={
            p: "nodemesh supports TCP and UDP" for p in ("SCTP", "VRRP", "IGMP", "ICMP")}), "ANY"),
    },
    hooks=[Hook(_port_range, needs=("port", "endPort"))],
)


def check_cilium_header(value: str) -> str | None:
    """``Name`` or ``Name: value`` (Cilium also takes ``Name value``)."""
    name = re.split(r"[:\s]", value.strip(), maxsplit=1)[0]
    problem = check_http_header_name(name)
    return f'header "{value}": name {problem}' if problem else None


def check_http_regex(value: str) -> str | None:
    """``method``, ``path`` and ``host`` of an HTTP rule: a regular expression Envoy's RE2 takes.

    route/rbac.py hands them to Envoy as they are (a ``safe_regex``, which is a full match, so
    no anchors are added): one that RE2 refuses gets the node's whole listener NACKed, so it is
    refused here, checked exactly as Envoy compiles it.
    """
    if not value:
        return None  # empty matches everything: rbac.py sends no regex for it
    why = re2_problem(value)
    return f"{quote(value)} is not a regular expression Envoy's RE2 accepts: {why}" if why else None


HTTP_RULE = Obj({
    # Cilium documents these as extended POSIX regexes; Envoy, which enforces them, runs RE2.
    "method": Str(validator=check_http_regex),
    "path": Str(validator=check_http_regex),
    "host": Str(validator=check_http_regex),
    "headers": ListOf(Str(validator=check_cilium_header)),
    "headerMatches": ListOf(Obj({
        "name": req(Str(validator=check_http_header_name)),
        "value": Str(),
        "mismatch": Str(enum=("LOG", "ADD", "DELETE", "REPLACE")),
        "secret": Unsupported("there are no Secrets in nodemesh: use value"),
    })),
})

L7_RULES = Obj({
    "http": ListOf(HTTP_RULE),
    "kafka": Unsupported(ONLY_HTTP),
    "dns": Unsupported(ONLY_HTTP + "; DNS-aware policy needs Cilium's DNS proxy"),
    "l7proto": Unsupported(ONLY_HTTP),
    "l7": Unsupported(ONLY_HTTP),
})


def _l7_ports(rule: dict, path: Path, ctx: Ctx) -> None:
    if not (rule.get("rules") or {}).get("http"):
        return
    ports = rule.get("ports") or []
    if not ports:
        ctx.error((*path, "rules", "http"), "HTTP rules need at least one port in ports")
    for i, p in enumerate(ports):
        if p["protocol"] not in ("TCP", "ANY"):
            ctx.error((*path, "ports", i, "protocol"),
                      f"must be TCP or ANY when the port has HTTP rules (got {p['protocol']})")
        if p.get("port", "0") == "0":
            ctx.error((*path, "ports", i, "port"), "HTTP rules need a specific port, not 0 (all)")


_PORT_RULE_FIELDS = {
    "ports": ListOf(PORT_PROTOCOL, max_items=40),
    "terminatingTLS": Unsupported(NO_TLS),
    "originatingTLS": Unsupported(NO_TLS),
    "serverNames": Unsupported(NO_TLS),
    "listener": Unsupported("there are no CiliumEnvoyConfig listeners in nodemesh"),
}
PORT_RULE = Obj({**_PORT_RULE_FIELDS, "rules": L7_RULES},
                hooks=[Hook(_l7_ports, needs=("ports", "rules"))])
PORT_DENY_RULE = Obj({
    "ports": ListOf(PORT_PROTOCOL, max_items=40),
    "rules": Forbidden("a deny rule cannot have L7 rules: it drops whole connections"),
})


def _cidr_rule(rule: dict, path: Path, ctx: Ctx) -> None:
    if "cidr" not in rule:
        ctx.error((*path, "cidr"), "required")
        return
    cidr = parse_cidr(rule["cidr"])
    assert cidr is not None  # the schema checked it
    for i, text in enumerate(rule.get("except", [])):
        exc = parse_cidr(text)
        assert exc is not None
        if exc.version != cidr.version or not exc.subnet_of(cidr):  # type: ignore[arg-type]
            ctx.error((*path, "except", i), f'must lie inside cidr "{rule["cidr"]}"')


CIDR_RULE = Obj(
    {
        "cidr": Str(validator=check_cidr),
        "except": ListOf(Str(validator=check_cidr)),
        "cidrGroupRef": Unsupported("there are no CiliumCIDRGroups in nodemesh"),
        "cidrGroupSelector": Unsupported("there are no CiliumCIDRGroups in nodemesh"),
    },
    hooks=[_cidr_rule],
)

NO_ICMP = "ICMP rules: nodemesh policy covers TCP and UDP"
# Cilium's `authentication` of an ingress or egress rule; Cilium requires its mode. Cilium's
# third mode, "test-always-fail", exists only to test Cilium's own authentication datapath.
AUTHENTICATION_MODES = ("disabled", "required")
NO_TEST_AUTH = 'a Cilium test mode that nodemesh does not implement: use "required" or "disabled"'
AUTHENTICATION = Obj({
    "mode": req(Str(enum=AUTHENTICATION_MODES, unsupported={"test-always-fail": NO_TEST_AUTH})),
})
NO_NODES = "nodes have no identities of their own in nodemesh; use the host entity"


def _peers(direction: str) -> dict:
    """The L3 peer fields of an ingress (from*) or egress (to*) section."""
    d = direction
    fields: dict = {
        f"{d}Endpoints": ListOf(CILIUM_SELECTOR),
        f"{d}Entities": ListOf(ENTITY),
        f"{d}CIDR": ListOf(Str(validator=check_cidr_or_ip)),
        f"{d}CIDRSet": ListOf(CIDR_RULE),
        f"{d}Requires": Unsupported("deprecated in Cilium; put the labels in the selectors"),
        f"{d}Nodes": Unsupported(NO_NODES),
        f"{d}Groups": Unsupported("there is no cloud provider integration in nodemesh"),
        "icmps": Unsupported(NO_ICMP),
    }
    if d == "to":
        fields["toServices"] = Unsupported("select the service's pods with toEndpoints")
        fields["toFQDNs"] = Unsupported("DNS-based policy needs Cilium's DNS proxy")
    return fields


INGRESS_RULE = Obj({**_peers("from"), "toPorts": ListOf(PORT_RULE),
                    "authentication": AUTHENTICATION})
INGRESS_DENY_RULE = Obj({**_peers("from"), "toPorts": ListOf(PORT_DENY_RULE)})
EGRESS_RULE = Obj({**_peers("to"), "toPorts": ListOf(PORT_RULE),
                   "authentication": AUTHENTICATION})
EGRESS_DENY_RULE = Obj({**_peers("to"), "toPorts": ListOf(PORT_DENY_RULE)})

SECTIONS = ("ingress", "ingressDeny", "egress", "egressDeny")


def _rule(rule: dict, path: Path, ctx: Ctx) -> None:
    # Cilium's CRD: a rule needs at least one section (an empty list counts).
    if not any(s in rule for s in SECTIONS):
        ctx.error(path, "must have at least one of ingress, ingressDeny, egress or egressDeny")


RULE = Obj(
    {
        "endpointSelector": req(CILIUM_SELECTOR),
        "nodeSelector": Unsupported("host policies: nodes have no identities in nodemesh"),
        "ingress": ListOf(INGRESS_RULE),
        "ingressDeny": ListOf(INGRESS_DENY_RULE),
        "egress": ListOf(EGRESS_RULE),
        "egressDeny": ListOf(EGRESS_DENY_RULE),
        "enableDefaultDeny": Obj({"ingress": Bool(), "egress": Bool()}),
        "description": Str(),
        # Accepted, no effect: labels that identify the rule.
        "labels": ListOf(Obj({"key": req(Str()), "value": Str(), "source": Str()})),
    },
    hooks=[Hook(_rule, needs=())],
)


def check_cnp_specs(obj: dict, path: Path, ctx: Ctx) -> None:
    if "spec" not in obj and not obj.get("specs"):
        ctx.error(("spec",), "required: a CiliumNetworkPolicy needs spec or specs")
