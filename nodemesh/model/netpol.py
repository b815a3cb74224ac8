"""Schema of Kubernetes NetworkPolicy (networking.k8s.io/v1) and its validation rules.

Peers, ports and ipBlocks follow the API server's rules: a peer names podSelector and/or
namespaceSelector, or an ipBlock alone; ``except`` blocks are strict subnets of ``cidr``;
``endPort`` needs a numeric ``port`` no larger than itself. SCTP rules are accepted: pods here
carry no SCTP, so such a rule never matches TCP or UDP traffic (what upstream's e2e suite checks).
"""

from __future__ import annotations

from nodemesh.model.common import LABEL_SELECTOR, PORT
from nodemesh.model.names import check_cidr, check_iana_svc_name, parse_cidr
from nodemesh.model.schema import (
    Ctx,
    Hook,
    Int,
    IntOrStr,
    ListOf,
    Obj,
    Path,
    Str,
    opt,
    req,
)


def _port_range(port: dict, path: Path, ctx: Ctx) -> None:
    if "endPort" not in port:
        return
    start = port.get("port")
    if start is None:
        ctx.error((*path, "endPort"), "may not be set without port")
    elif isinstance(start, str):
        ctx.error((*path, "endPort"), f'may not be set when port is a name ("{start}")')
    elif port["endPort"] < start:
        ctx.error((*path, "endPort"), f"must be >= port ({start})")


NP_PORT = Obj(
    {
        "protocol": opt(Str(enum=("TCP", "UDP", "SCTP")), "TCP"),
        "port": IntOrStr(PORT, Str(validator=check_iana_svc_name)),
        "endPort": Int(1, 65535),
    },
    hooks=[Hook(_port_range, needs=("port", "endPort"))],
)


def _ip_block(block: dict, path: Path, ctx: Ctx) -> None:
    cidr = parse_cidr(block["cidr"])
    assert cidr is not None  # the schema checked it
    for i, text in enumerate(block.get("except", [])):
        exc = parse_cidr(text)
        assert exc is not None
        if (exc.version != cidr.version or not exc.subnet_of(cidr)  # type: ignore[arg-type]
                or exc.prefixlen <= cidr.prefixlen):
            ctx.error((*path, "except", i), f'must be a strict subnet of cidr "{block["cidr"]}"')


IP_BLOCK = Obj(
    {"cidr": req(Str(validator=check_cidr)), "except": ListOf(Str(validator=check_cidr))},
    hooks=[_ip_block],
)


def _peer(peer: dict, path: Path, ctx: Ctx) -> None:
    if not peer:
        ctx.error(path, "must set podSelector, namespaceSelector or ipBlock")
    elif "ipBlock" in peer and len(peer) > 1:
        ctx.error((*path, "ipBlock"), "may not be combined with podSelector or namespaceSelector")


PEER = Obj(
    {"podSelector": LABEL_SELECTOR, "namespaceSelector": LABEL_SELECTOR, "ipBlock": IP_BLOCK},
    hooks=[Hook(_peer, needs=())],
)


def _policy_types(spec: dict, path: Path, ctx: Ctx) -> None:
    # Kubernetes: Ingress always, Egress too when the policy has egress rules.
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress", "Egress"] if spec.get("egress") else ["Ingress"]


NP_SPEC = Obj(
    {
        # The API's podSelector is a plain struct: an absent one is {} and selects every pod.
        "podSelector": opt(LABEL_SELECTOR, {}),
        "ingress": ListOf(Obj({"ports": ListOf(NP_PORT), "from": ListOf(PEER)})),
        "egress": ListOf(Obj({"ports": ListOf(NP_PORT), "to": ListOf(PEER)})),
        "policyTypes": ListOf(Str(enum=("Ingress", "Egress")), max_items=2,
                              unique=lambda t: t, unique_msg="duplicate policy type"),
    },
    hooks=[Hook(_policy_types, needs=("policyTypes", "egress"))],
)
