"""Everything one node needs, computed at once from what the store says: the `NodeSnapshot`.

`build_node_snapshot` is pure. It takes `NodeInputs` (the store's objects as the agent's
informer has them, the pods whose veths this node's datapath has attached, the identities
allocated so far, the node Envoy's listener ports, the workload certificates on hand, and what
the kernel holds now) and returns, for that one moment:

- the identities of every pod with an address, and the ipcache (every pod, every node, the world);
- the services as the socket LB sees them, in two states (`lb_interim` with only the redirects
  into the node Envoy that may stay while Envoy takes its new configuration, `lb` with all);
- the lowered policy of each attached pod (where the new one cannot be written, the previous
  one, closed in the directions the new one isolates), and the
  ``nm_endpoints``/``nm_lxc``/``nm_netns`` entries that let its veth pass;
- the node Envoy's resources (listeners, routes, clusters, endpoints, the tunnel's listeners
  and clusters, secrets), route statuses, and the redirects into it;
- the context flow events are read against (who an address or identity is).

The agent's reconcile step (`nodemesh.agent.reconcile`) applies it in a fixed order: datapath
maps with the interim redirects, then Envoy (and its acknowledgement), then the new redirects.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from nodemesh.certs.spiffe import spiffe_id
from nodemesh.datapath import layout as L
from nodemesh.datapath.lb import LbState, compile_lb
from nodemesh.identity import security_labels
from nodemesh.model.workloads import is_deleting
from nodemesh.mtls.tunnel import (
    DatapathTunnel,
    MeshPod,
    TunnelInput,
    TunnelPlan,
    datapath_tunnel,
    mesh_pods,
    plan_tunnel,
)
from nodemesh.node.addresses import NODE_DNS_IP, POD_GATEWAY
from nodemesh.node.fit import Refusal, age_key, fit_ipcache, fit_policy, fit_services
from nodemesh.node.services import ServiceNames, lb_services, named_ports
from nodemesh.observe.flow import FlowEndpoint, StaticContext, labels_of, workloads_of
from nodemesh.policy import Compiler, PolicyCompileError, PolicyInput, PolicyPod
from nodemesh.policy.lower import LoweredPolicy, lower_policy
from nodemesh.proxy.snapshot import CLUSTER, LISTENER, SECRET, Snapshot
from nodemesh.route import (
    L7Input,
    Pod,
    RedirectKey,
    Service,
    l7_policies_from_compiled,
    translate,
)
from nodemesh.route.inputs import PROXY_IP, MtlsView
from nodemesh.route.snapshot import Translation
from nodemesh.route.tls import ROOTS_SECRET
from nodemesh.route.visibility import visibility_routes

KINDS = ("Pod", "Service", "Namespace", "NetworkPolicy", "CiliumNetworkPolicy", "Identity",
         "PeerAuthentication", "HTTPRoute", "GRPCRoute", "TrustBundle")
LabelKey = tuple[tuple[str, str], ...]  # a security label set, sorted


@dataclass(frozen=True)
class Endpoint:
    """An endpoint: a pod on this node whose veth the datapath manages (its ``nm_endpoints``
    entry), as Cilium uses the word. (A policy's view of any pod is a `PolicyPod`, a side of a
    flow a `FlowEndpoint`, a service's pod a backend.)"""

    uid: str
    namespace: str
    name: str
    ip: str
    ifindex: int
    netns_cookie: int = 0  # what socket-LB events carry instead of a source address


@dataclass(frozen=True)
class Redirects:
    """Destinations the node Envoy takes over: service ports with routes, pod ports with L7
    policy ((ip, port, protocol) → listener port), and which clients of each pod port are
    redirected (0 = any)."""

    service: Mapping[RedirectKey, int] = field(default_factory=dict)
    pod: Mapping[RedirectKey, int] = field(default_factory=dict)
    identities: Mapping[RedirectKey, frozenset[int]] = field(default_factory=dict)

    def all(self) -> dict[RedirectKey, int]:
        return {**self.service, **self.pod}

    def kept_while_changing_to(self, new: Redirects) -> Redirects:
        """The redirects that may stay while the node Envoy changes to `new`'s listeners:
        those that keep their listener port (a redirect that goes away or moves goes first)."""
        return Redirects(
            service={k: v for k, v in self.service.items() if new.service.get(k) == v},
            pod={k: v for k, v in self.pod.items() if new.pod.get(k) == v},
            identities={k: new.identities.get(k, frozenset())
                        for k, v in self.pod.items() if new.pod.get(k) == v})

    def l7_redir_entries(self) -> list[tuple[Any, Any]]:
        """``nm_l7_redir``: connect() to a pod port that L7 policy covers goes to the node
        Envoy, for the client identities some L7 rule covers (0 = any client)."""
        out = []
        for k, port in sorted(self.pod.items()):
            if k.protocol != "TCP":
                continue
            for ident in sorted(self.identities.get(k) or {0}):
                out.append(L.l7_redirect(k.ip, k.port, port, identity=ident))
        return out


@dataclass(frozen=True)
class Certificates:
    """The workload certificates the node has (for the mutual-TLS tunnel)."""

    ready: frozenset[str] = frozenset()  # SPIFFE IDs with a valid leaf
    leaves: Mapping[str, Any] = field(default_factory=dict)  # SPIFFE ID -> leaf (.chain_pem, .key_pem)


@dataclass(frozen=True)
class NodeInputs:
    """What `build_node_snapshot` reads: nothing else."""

    node: str
    node_ip: str
    node_ips: Mapping[str, str]  # every node's underlay address, by node name
    objects: Mapping[str, Sequence[Mapping[str, Any]]]  # KINDS -> objects
    attached: Mapping[str, Endpoint] = field(default_factory=dict)  # uid -> pod
    # Pods this node is starting, whose address the store may not have yet: (pod, ip) by uid.
    starting: Mapping[str, tuple[Mapping[str, Any], str]] = field(default_factory=dict)
    covering: Mapping[str, tuple[Mapping[str, Any], str]] = field(default_factory=dict)  # for the tunnel
    identities: Mapping[LabelKey, int] = field(default_factory=dict)  # allocated
    mtls: bool = False
    trust_domain: str = "cluster.local"
    proxy: bool = True  # the node runs an Envoy
    proxy_ports: Mapping[RedirectKey, int] = field(default_factory=dict)  # listener ports so far
    certificates: Certificates | None = None  # None: the node runs no tunnel
    applied: Redirects = field(default_factory=Redirects)  # what the kernel has now
    previous_lb: LbState | None = None  # id assignments to keep
    maglev_m: int = L.MAGLEV_DEFAULT_M
    previous_policy: Mapping[int, LoweredPolicy] = field(default_factory=dict)  # ifindex -> last good
    boot_offset_ns: int = 0  # wall clock minus monotonic clock, for flow timestamps
    # map name -> max entries (the kernel's); objects past a map's capacity are left out whole
    # (`nodemesh.node.fit`). Empty: no limit is checked.
    capacities: Mapping[str, int] = field(default_factory=dict)


@dataclass
class EnvoyPart:
    """The node Envoy's part of the snapshot."""

    snapshot: Snapshot  # what the xDS server serves
    result: Translation  # translate's output (route statuses, owners, ports)
    tunnel: TunnelPlan | None
    has_secrets: bool
    listener_targets: dict[int, RedirectKey]  # listener port -> what it stands for
    policy_names: dict[tuple[str, int], list[str]]  # (pod ip, port) -> L7 policies guarding it
    bundle_roots: tuple[bytes, ...] = ()


@dataclass
class NodeSnapshot:
    """One node's complete desired state at one store revision (see the module docstring)."""

    identity_of: dict[str, int]  # pod uid -> identity, every pod with an address
    identity_labels: dict[int, dict[str, str]]
    pod_identities: dict[tuple[str, str], int]  # (namespace, name) -> identity
    ipcache: list[tuple[Any, Any]]
    tunnel: DatapathTunnel
    tunnel_ports: list[tuple[Any, Any]]
    lb_interim: LbState
    lb: LbState
    service_names: ServiceNames
    policy: dict[int, LoweredPolicy]  # ifindex -> lowered policy (attached pods)
    policy_errors: dict[str, str]  # "ns/pod" -> why its new policy did not compile
    policy_names: dict[int, str]
    endpoints: list[tuple[Any, Any]]  # nm_endpoints
    lxc: list[tuple[Any, Any]]  # nm_lxc
    netns: list[tuple[Any, Any]]  # nm_netns
    programmed: frozenset[str]  # uids of attached pods whose veth passes traffic
    redirects_interim: Redirects
    redirects: Redirects
    envoy: EnvoyPart | None  # None: the node runs no Envoy
    context: StaticContext
    identity_workloads: dict[int, tuple[str, str]]
    cookie_ips: dict[int, str]
    local_ips: frozenset[bytes]
    refusals: list[Refusal] = field(default_factory=list)  # maps that had no room, and for what

    def policy_entries(self) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any]]]:
        """``nm_policy`` and ``nm_policy_cidr`` entries."""
        return L.policy_map_pairs(self.policy.values())


# ---- the parts --------------------------------------------------------------------------------
def pods_with_address(inp: NodeInputs) -> dict[str, tuple[Mapping[str, Any], str]]:
    """Every pod with an address, by uid: from the store (not terminating), an attached pod
    the store has no address for yet, and pods being started here. Pods in their node's network
    (``hostNetwork``, on Kubernetes) are not among them: their address is the node's, which the
    ipcache maps to the node. Nor are finished pods (Succeeded, Failed) unless their veth is still
    attached here: Kubernetes gives a finished pod's address to the next pod."""
    pods: dict[str, tuple[Mapping[str, Any], str]] = {}
    by_uid = {p["metadata"]["uid"]: p for p in inp.objects.get("Pod", ())}
    for uid, p in by_uid.items():
        status = p.get("status") or {}
        ip = status.get("podIP")
        if ip and not is_deleting(p) and not (p.get("spec") or {}).get("hostNetwork") \
                and status.get("phase") not in ("Succeeded", "Failed"):
            pods[uid] = (p, ip)
    for uid, a in inp.attached.items():
        if uid not in pods and uid in by_uid:
            pods[uid] = (by_uid[uid], a.ip)
    pods.update(inp.starting)
    return pods


def label_sets(inp: NodeInputs) -> dict[str, dict[str, str]]:
    """The security labels of every pod with an address, by uid."""
    namespaces = {n["metadata"]["name"]: n for n in inp.objects.get("Namespace", ())}
    return {uid: security_labels(p, namespaces.get(p["metadata"]["namespace"]))
            for uid, (p, _) in pods_with_address(inp).items()}


def label_key(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


def known_identities(identities: Iterable[Mapping[str, Any]]) -> dict[LabelKey, int]:
    """Identity objects of the store → label set -> number."""
    return {label_key((o.get("spec") or {}).get("labels", {})): int(o["metadata"]["name"])
            for o in identities}


def missing_identities(inp: NodeInputs) -> list[dict[str, str]]:
    """Label sets of pods that have no identity yet (allocate them, then build)."""
    seen: dict[LabelKey, dict[str, str]] = {}
    for labels in label_sets(inp).values():
        key = label_key(labels)
        if key not in inp.identities:
            seen.setdefault(key, labels)
    return list(seen.values())


def ipcache_entries(node: str, node_ip: str, node_ips: Mapping[str, str],
                    pods: Mapping[str, tuple[Mapping[str, Any], str]],
                    identity_of: Mapping[str, int],
                    tunnel_flags: Mapping[str, int]) -> list[tuple[Any, Any]]:
    """``nm_ipcache``: the world, every node, the node's own addresses, every pod (with the
    node it runs on, and its tunnel flags)."""
    out = [(L.IpcacheKey.of("0.0.0.0/0"), L.IpcacheEntry(L.Identity.WORLD, 0, 0, 0))]
    for name, ip in node_ips.items():
        ident = L.Identity.HOST if name == node else L.Identity.REMOTE_NODE
        out.append((L.IpcacheKey.of(f"{ip}/32"), L.IpcacheEntry(ident, L.ip4(ip), 0, 0)))
    for ip in (POD_GATEWAY, NODE_DNS_IP, PROXY_IP):
        out.append((L.IpcacheKey.of(f"{ip}/32"),
                    L.IpcacheEntry(L.Identity.HOST, L.ip4(node_ip), 0, 0)))
    for uid, (p, ip) in pods.items():
        host = node_ips.get(p["spec"].get("nodeName") or "", node_ip)
        out.append((L.IpcacheKey.of(f"{ip}/32"),
                    L.IpcacheEntry(identity_of[uid], L.ip4(host), tunnel_flags.get(ip, 0), 0)))
    return out


def _with_address(pod: Mapping[str, Any], ip: str) -> Mapping[str, Any]:
    if (pod.get("status") or {}).get("podIP") == ip:
        return pod
    return {**pod, "status": {**(pod.get("status") or {}), "podIP": ip}}


def _l7_pod_objects(inp: NodeInputs) -> list[Mapping[str, Any]]:
    """The store's pods, with the addresses of pods the tunnel is being readied for."""
    pods = list(inp.objects.get("Pod", ()))
    for uid, (pod, ip) in inp.covering.items():
        pods = [p for p in pods if p["metadata"].get("uid") != uid]
        pods.append(_with_address(pod, ip))
    return pods


def tunnel_mesh(inp: NodeInputs) -> list[MeshPod]:
    """The pods of the mesh as the node's tunnel sees them."""
    return mesh_pods(_l7_pod_objects(inp), inp.objects.get("PeerAuthentication", ()))


def wanted_certificates(inp: NodeInputs) -> set[str]:
    """SPIFFE IDs of the workloads this node runs in the mesh: their certificates."""
    return {p.workload.spiffe(inp.trust_domain) for p in tunnel_mesh(inp) if p.node == inp.node}


def trust_roots(objects: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[list[bytes], str]:
    """The default TrustBundle's roots and the root that signs now."""
    bundle = next((b for b in objects.get("TrustBundle", ())
                   if b["metadata"]["name"] == "default"), None)
    spec = (bundle or {}).get("spec") or {}
    return [r.encode() for r in spec.get("roots") or []], str(spec.get("signing") or "")


def workload_secret(identity: str, leaf: Any) -> secret_pb2.Secret:
    """An SDS secret with a workload identity's certificate chain and key (named by its
    SPIFFE ID)."""
    s = secret_pb2.Secret(name=identity)
    s.tls_certificate.certificate_chain.inline_bytes = leaf.chain_pem
    s.tls_certificate.private_key.inline_bytes = leaf.key_pem
    return s


def roots_secret(roots: list[bytes]) -> secret_pb2.Secret:
    """The trust bundle as an SDS validation context."""
    s = secret_pb2.Secret(name=ROOTS_SECRET)
    s.validation_context.trusted_ca.inline_bytes = b"".join(roots)
    return s


def _tunnel_plan(inp: NodeInputs) -> tuple[TunnelPlan | None, list, MtlsView | None, tuple]:
    certs = inp.certificates
    if certs is None:
        return None, [], None, ()
    roots, _ = trust_roots(inp.objects)
    mesh = tunnel_mesh(inp)
    td = inp.trust_domain
    ready = certs.ready if roots else frozenset()
    plan = plan_tunnel(TunnelInput(inp.node, td, tuple(mesh), ready, tuple(inp.node_ips.values())))
    secrets = [workload_secret(i, certs.leaves[i]) for i in sorted(plan.secrets)]
    if roots:
        secrets.append(roots_secret(roots))
    view = MtlsView(
        trust_domain=td,
        clients={p.ip: p.workload.spiffe(td) for p in mesh
                 if p.node == inp.node and p.workload.spiffe(td) in plan.secrets},
        servers={p.ip: p.workload.spiffe(td) for p in mesh if p.node != inp.node},
        tunnelled=frozenset(ip for ip, f in plan.ipcache_flags.items()
                            if f & L.IpcacheFlags.TUNNEL),
        ports={(ip, port): t for ip, port, t in plan.port_overrides})
    return plan, secrets, view, tuple(roots)


def _has_http_rules(cnps: Iterable[Mapping[str, Any]]) -> bool:
    return any("rules" in str(c.get("spec", "")) or "rules" in str(c.get("specs", ""))
               for c in cnps)


def _envoy(inp: NodeInputs, pod_identities: Mapping[tuple[str, str], int],
           compiled: Mapping[str, Any]) -> tuple[EnvoyPart, Redirects]:
    k = inp.objects
    pods = []
    for p in _l7_pod_objects(inp):
        if p["metadata"].get("deletionTimestamp"):
            continue
        meta = p["metadata"]
        pods.append(Pod.from_object(p, pod_identities.get((meta["namespace"], meta["name"]), 0)))
    services = [Service.from_object(s) for s in k.get("Service", ())
                if (s["spec"].get("clusterIP") or "None") != "None"]
    l7 = l7_policies_from_compiled(compiled, pods) if compiled else ()
    routes = list(k.get("HTTPRoute", ())) + list(k.get("GRPCRoute", ()))
    routes += visibility_routes(k.get("Service", ()), k.get("Namespace", ()), routes)
    tunnel, secrets, view, roots = _tunnel_plan(inp)
    result = translate(L7Input.build(inp.node, services, pods, routes, l7, mtls=view),
                       inp.proxy_ports)
    by_type = {t: list(msgs) for t, msgs in result.snapshot.by_type().items()}
    if tunnel is not None:
        by_type[LISTENER] += tunnel.listeners
        by_type[CLUSTER] += tunnel.clusters
        if secrets:
            by_type[SECRET] = secrets
    identities = {p.key: frozenset(i for r in p.rules for i in r.identities) for p in l7}
    part = EnvoyPart(
        snapshot=Snapshot(by_type), result=result, tunnel=tunnel, has_secrets=bool(secrets),
        listener_targets={port: key for key, port in result.ports.items()},
        policy_names={(p.pod_ip, p.port): sorted({r.policy for r in p.rules if r.policy})
                      for p in l7},
        bundle_roots=roots)
    return part, Redirects(dict(result.service_redirects), dict(result.pod_redirects), identities)


def _context(inp: NodeInputs, pods: Mapping[str, tuple[Mapping[str, Any], str]],
             identity_of: Mapping[str, int], lb: LbState, service_names: ServiceNames,
             policy_names: Mapping[int, str]) -> tuple[StaticContext, dict[int, tuple[str, str]]]:
    from nodemesh.observe.metrics import workload_of

    by_ip, by_identity = {}, {}
    local_ids = {a.uid: a.ifindex for a in inp.attached.values()}
    for uid, (p, ip) in pods.items():
        meta = p["metadata"]
        fe = FlowEndpoint(identity=identity_of[uid], namespace=meta["namespace"],
                          pod_name=meta["name"],
                          labels=labels_of(meta.get("labels") or {}, meta["namespace"]),
                          workloads=workloads_of(meta.get("ownerReferences") or []),
                          id=local_ids.get(uid, 0))
        by_ip[ip] = fe
        by_identity.setdefault(identity_of[uid], FlowEndpoint(
            identity=identity_of[uid], namespace=meta["namespace"], labels=fe.labels))
    revnat = {}
    for (vip, port, _proto), idx in lb.rev_nat.items():
        name = service_names.get((vip, port))
        if name:
            revnat[idx] = name
    workloads: dict[int, tuple[str, str]] = {}
    for fe in by_ip.values():
        workloads.setdefault(fe.identity, workload_of(fe.to_json()))
    spiffe_ids = {}
    if inp.mtls:
        for p, ip in pods.values():
            spec = p.get("spec") or {}
            sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
            spiffe_ids[ip] = spiffe_id(inp.trust_domain, p["metadata"]["namespace"], sa)
    ctx = StaticContext(node_name=inp.node, by_ip=by_ip, by_identity=by_identity,
                        services_by_revnat=revnat, services_by_address=dict(service_names),
                        policies=dict(policy_names), boot_offset_ns=inp.boot_offset_ns,
                        spiffe_ids=spiffe_ids)
    return ctx, workloads


# ---- the snapshot -----------------------------------------------------------------------------
def fallbacks(isolates: Mapping[int, tuple[bool, bool]],
              previous: Mapping[int, LoweredPolicy]) -> dict[int, LoweredPolicy]:
    """What each pod falls back to when its new policy cannot be written (no room in the maps,
    or more rules than they can express): its previous entries, but isolated in every direction
    (`isolates`: ingress, egress) the new policy isolates. A policy that starts selecting a pod
    so never leaves it open in that direction: it fails closed there."""
    out = dict(previous)
    for ifindex, prev in previous.items():
        if ifindex not in isolates:
            continue
        ingress = prev.ingress_enforced or isolates[ifindex][0]
        egress = prev.egress_enforced or isolates[ifindex][1]
        if (ingress, egress) != (prev.ingress_enforced, prev.egress_enforced):
            out[ifindex] = replace(prev, ingress_enforced=ingress, egress_enforced=egress)
    return out


def build_node_snapshot(inp: NodeInputs) -> NodeSnapshot:
    """The node's desired state (pure). Every pod's label set must have an identity in
    ``inp.identities`` (`missing_identities` lists those that do not)."""
    k = inp.objects
    pods = pods_with_address(inp)
    labels_by_uid = label_sets(inp)
    missing = [labels for labels in labels_by_uid.values()
               if label_key(labels) not in inp.identities]
    if missing:
        raise ValueError(f"no identity allocated for label set {missing[0]}")
    identity_of = {uid: inp.identities[label_key(labels)] for uid, labels in labels_by_uid.items()}
    ident_labels: dict[int, dict[str, str]] = {}
    for uid in pods:
        ident_labels[identity_of[uid]] = labels_by_uid[uid]
    for key, ident in inp.identities.items():
        ident_labels.setdefault(ident, dict(key))
    pod_identities = {(p["metadata"]["namespace"], p["metadata"]["name"]): identity_of[uid]
                      for uid, (p, _) in pods.items()}

    # The mutual-TLS tunnel: which pods of other nodes this node's pods reach through it
    # (ipcache flags), and which local pods receive through it (their endpoint flag).
    tunnel = DatapathTunnel()
    if inp.mtls:
        tunnel = datapath_tunnel(
            mesh_pods([_with_address(p, ip) for p, ip in pods.values()],
                      k.get("PeerAuthentication", ())), inp.node)
    # The ipcache: the fixed entries, then local pods, then the others, oldest first.
    local_uids = set(inp.attached)
    ipcache_order = sorted(pods, key=lambda u: (u not in local_uids, age_key(pods[u][0]), u))
    in_ipcache, refusals = fit_ipcache(
        1 + len(inp.node_ips) + 3,
        [(u, f"{pods[u][0]['metadata']['namespace']}/{pods[u][0]['metadata']['name']}")
         for u in ipcache_order], inp.capacities)
    ipcache = ipcache_entries(inp.node, inp.node_ip, inp.node_ips,
                              {u: v for u, v in pods.items() if u in in_ipcache}, identity_of,
                              tunnel.ipcache_flags)
    tunnel_ports = [L.tunnel_port_entry(ip, port, t) for ip, port, t in tunnel.port_overrides]

    # Policy: every pod with an address is a peer; attached pods get their entries.
    namespaces = {n["metadata"]["name"]: dict(n["metadata"].get("labels") or {})
                  for n in k.get("Namespace", ())}
    pinput = PolicyInput(
        endpoints=[PolicyPod(p["metadata"]["namespace"], p["metadata"]["name"],
                            dict(p["metadata"].get("labels") or {}), ip, identity_of[uid],
                            named_ports(p)) for uid, (p, ip) in pods.items()],
        namespaces=namespaces, identities=ident_labels,
        network_policies=k.get("NetworkPolicy", ()),
        cilium_policies=k.get("CiliumNetworkPolicy", ()))
    compiler = Compiler(pinput)
    by_ref = {e.ref: e for e in pinput.endpoints}
    compiled: dict[str, Any] = {}
    errors: dict[str, str] = {}

    def compile_one(ref: str) -> Any:
        if ref not in compiled and ref not in errors:
            try:
                compiled[ref] = compiler.compile(by_ref[ref])
            except PolicyCompileError as e:
                errors[ref] = e.message
        return compiled.get(ref)

    new_lowered: dict[int, LoweredPolicy] = {}
    isolates: dict[int, tuple[bool, bool]] = {}
    policy_names: dict[int, str] = {}
    for a in inp.attached.values():
        ref = f"{a.namespace}/{a.name}"
        if ref not in by_ref:
            continue
        c = compile_one(ref)
        if c is None:
            continue
        isolates[a.ifindex] = (c.ingress_enforced, c.egress_enforced)
        try:
            new_lowered[a.ifindex] = lower_policy(c, a.ifindex)
        except PolicyCompileError as e:  # (more rules than the datapath's maps hold)
            errors[ref] = e.message
            continue
        policy_names.update(c.policy_names)
    # What fits in the policy maps: the oldest pods first; one that does not keep its previous.
    by_uid = {p["metadata"]["uid"]: p for p in k.get("Pod", ())}
    policy_order = sorted(inp.attached.values(), key=lambda a: (
        age_key(by_uid.get(a.uid) or {"metadata": {"namespace": a.namespace, "name": a.name}}),
        a.ifindex))
    fitted = fit_policy([(a.ifindex, f"{a.namespace}/{a.name}") for a in policy_order],
                        new_lowered, fallbacks(isolates, inp.previous_policy),
                        inp.capacities)
    lowered = fitted.chosen
    for ref, msg in fitted.errors.items():
        errors.setdefault(ref, msg)
    refusals += fitted.refusals

    # The node Envoy: routes, L7 policy (of every pod: a client's node enforces it), tunnel.
    envoy = None
    redirects = Redirects()
    if inp.proxy:
        l7_compiled = {}
        if _has_http_rules(k.get("CiliumNetworkPolicy", ())):
            for ref in by_ref:
                c = compile_one(ref)
                if c is not None:
                    l7_compiled[ref] = c
        envoy, redirects = _envoy(inp, pod_identities, l7_compiled)
    interim = inp.applied.kept_while_changing_to(redirects)

    # Services, with the interim redirects and with all of them (the same ids in both).
    svc_objs = k.get("Service", ())
    pod_objs = [p for p, _ in pods.values()]
    svcs, names = lb_services(svc_objs, pod_objs, interim.service)
    # What fits in the LB maps: whole services, the oldest first.
    admitted, svc_refusals = fit_services(
        svcs, names, {(s["metadata"]["namespace"], s["metadata"]["name"]): age_key(s)
                      for s in svc_objs}, inp.capacities)
    refusals += svc_refusals

    def fitting(ports: list[Any]) -> list[Any]:
        return ports if not svc_refusals else [p for p in ports
                                               if names.get((p.vip, p.port)) in admitted]

    lb_interim = compile_lb(fitting(svcs), inp.previous_lb, inp.maglev_m)
    lb = lb_interim
    if redirects.service != interim.service:
        lb = compile_lb(fitting(lb_services(svc_objs, pod_objs, redirects.service)[0]),
                        lb_interim, inp.maglev_m)

    # Endpoints: a pod's veth passes traffic only once its policy and identity are there.
    endpoints, lxc, netns = [], [], []
    programmed = set()
    for a in inp.attached.values():
        low = lowered.get(a.ifindex)
        ident = identity_of.get(a.uid, 0)
        if low is None or not ident or a.uid not in in_ipcache:
            continue
        flags = low.flags
        if a.ip in tunnel.inbound_pods:
            flags |= L.EndpointFlags.TUNNEL_IN
        endpoints.append((L.u32(a.ifindex), L.EndpointInfo(L.ip4(a.ip), ident, flags, 0)))
        lxc.append(L.lxc_entry(a.ip, a.ifindex, ident))
        if a.netns_cookie:
            netns.append(L.netns_entry(a.netns_cookie, ident, a.ifindex))
        programmed.add(a.uid)

    context, workloads = _context(inp, pods, identity_of, lb_interim, names, policy_names)
    return NodeSnapshot(
        identity_of=identity_of, identity_labels=ident_labels, pod_identities=pod_identities,
        ipcache=ipcache, tunnel=tunnel, tunnel_ports=tunnel_ports,
        lb_interim=lb_interim, lb=lb, service_names=names,
        policy=lowered, policy_errors=errors_of_attached(errors, inp), policy_names=policy_names,
        endpoints=endpoints, lxc=lxc, netns=netns, programmed=frozenset(programmed),
        redirects_interim=interim, redirects=redirects, envoy=envoy, context=context,
        identity_workloads=workloads,
        cookie_ips={a.netns_cookie: a.ip for a in inp.attached.values() if a.netns_cookie},
        local_ips=frozenset(socket.inet_aton(a.ip) for a in inp.attached.values()),
        refusals=refusals)


def errors_of_attached(errors: Mapping[str, str], inp: NodeInputs) -> dict[str, str]:
    """The compile errors of this node's pods (others' show on their own node)."""
    mine = {f"{a.namespace}/{a.name}" for a in inp.attached.values()}
    return {ref: msg for ref, msg in errors.items() if ref in mine}
