"""What fits in the datapath's maps (pure): the objects past a map's capacity are refused whole.

A BPF map has a fixed size (cluster.json ``maps``, `nodemesh up --map-size`). When the desired
entries of a node need more than a map holds, the node snapshot leaves whole objects out, never
half of one, and says so with a `Refusal` per map (the map, its capacity, the entries all
objects would need, the objects left out). The order is deterministic and stable: the oldest
objects (by ``creationTimestamp``, then namespace and name) come first, so a new object never
pushes out one that works; a local pod comes before the pods of other nodes in the ipcache.

- services (``nm_lb4_svc``: one entry per port and one per backend of each port;
  ``nm_lb4_revnat``: one per port; ``nm_lb4_be``: one per distinct backend, shared;
  ``nm_lb4_maglev``: one per Maglev port with backends): a service that does not fit gets no
  entries at all; connections to its ClusterIP are not translated.
- the ipcache (``nm_ipcache``): the world, the nodes and the node's own addresses first, then the
  pods; a pod left out has no identity on this node (its traffic is the world's to policy here;
  a local pod left out is not programmed: its veth drops, failing closed).
- policy (``nm_policy``, ``nm_policy_cidr``): a local pod whose new policy does not fit keeps
  its previous entries, as a compile error does, closed in the directions the new policy
  isolates (the snapshot's `fallbacks`); when not even those fit, it has none and its veth
  drops (fails closed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodemesh.datapath.lb import LbService

SERVICE_MAPS = ("nm_lb4_svc", "nm_lb4_revnat", "nm_lb4_be", "nm_lb4_maglev")
POLICY_MAPS = ("nm_policy", "nm_policy_cidr")
IPCACHE_MAP = "nm_ipcache"
FIT_MAPS = (*SERVICE_MAPS, IPCACHE_MAP, *POLICY_MAPS)
KIND_OF_MAP = {**dict.fromkeys(SERVICE_MAPS, "Service"), IPCACHE_MAP: "Pod",
               **dict.fromkeys(POLICY_MAPS, "Pod")}


@dataclass(frozen=True)
class Refusal:
    """One map had no room: `objects` ("namespace/name", of `kind`) were left out."""

    map: str
    capacity: int
    needed: int  # entries everything desired would take
    kind: str
    objects: tuple[str, ...]

    def message(self) -> str:
        shown = ", ".join(self.objects[:5]) + (f" (+{len(self.objects) - 5} more)"
                                                if len(self.objects) > 5 else "")
        what = ("whose new policy is not written (its previous entries stay, if they fit)"
                if self.map in POLICY_MAPS else "left out")
        return (f"map {self.map} is full: {self.needed} entries needed, it holds "
                f"{self.capacity}; {len(self.objects)} {self.kind.lower()}"
                f"{'s' if len(self.objects) != 1 else ''} {what}: {shown}; raise it with "
                f"`nodemesh up --map-size {self.map}=N` (cluster.json \"maps\": "
                f"{{\"{self.map}\": N}})")

    def to_json(self) -> dict[str, Any]:
        return {"map": self.map, "capacity": self.capacity, "needed": self.needed,
                "kind": self.kind, "objects": list(self.objects), "message": self.message()}


@dataclass
class _Refused:
    needed: dict[str, int] = field(default_factory=dict)
    objects: dict[str, list[str]] = field(default_factory=dict)

    def add(self, m: str, ref: str) -> None:
        self.objects.setdefault(m, []).append(ref)

    def out(self, capacities: Mapping[str, int]) -> list[Refusal]:
        return [Refusal(m, capacities[m], self.needed.get(m, 0), KIND_OF_MAP[m],
                        tuple(sorted(refs))) for m, refs in sorted(self.objects.items())]


def age_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """Oldest first, then namespace/name: the order objects get room in."""
    meta = obj.get("metadata") or {}
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("namespace") or ""),
            str(meta.get("name") or ""))


def _service_needs(ports: Sequence[LbService]) -> tuple[dict[str, int], set[tuple]]:
    need = {"nm_lb4_svc": sum(1 + len(p.backends) for p in ports),
            "nm_lb4_revnat": len(ports),
            "nm_lb4_maglev": sum(1 for p in ports if p.algorithm == "maglev" and p.backends)}
    backends = {(ip, port, p.key[2]) for p in ports for ip, port in p.backends}
    return need, backends


def fit_services(ports: Iterable[LbService], names: Mapping[tuple[str, int], tuple[str, str]],
                 order: Mapping[tuple[str, str], Any],
                 capacities: Mapping[str, int]) -> tuple[set[tuple[str, str]], list[Refusal]]:
    """The services ((namespace, name)) whose ports all fit in the LB maps, in `order` (a sort
    key per service; missing ones last by name), and a Refusal per map that had no room.
    Without capacities for the LB maps every service fits."""
    by_service: dict[tuple[str, str], list[LbService]] = {}
    for p in ports:
        ref = names.get((p.vip, p.port))
        if ref is not None:
            by_service.setdefault(ref, []).append(p)
    caps = {m: capacities[m] for m in SERVICE_MAPS if m in capacities}
    if not caps:
        return set(by_service), []
    used = dict.fromkeys(caps, 0)
    used_backends: set[tuple] = set()
    all_backends: set[tuple] = set()
    refused = _Refused(needed=dict.fromkeys(caps, 0))
    admitted: set[tuple[str, str]] = set()
    for ref in sorted(by_service, key=lambda r: (order.get(r) is None, order.get(r) or (), r)):
        need, backends = _service_needs(by_service[ref])
        all_backends |= backends
        for m in caps:
            if m != "nm_lb4_be":
                refused.needed[m] += need[m]
        full = [m for m in caps if m != "nm_lb4_be" and used[m] + need[m] > caps[m]]
        if "nm_lb4_be" in caps and len(used_backends | backends) > caps["nm_lb4_be"]:
            full.append("nm_lb4_be")
        if full:
            for m in full:
                refused.add(m, f"{ref[0]}/{ref[1]}")
            continue
        admitted.add(ref)
        for m in caps:
            if m != "nm_lb4_be":
                used[m] += need[m]
        used_backends |= backends
    if "nm_lb4_be" in caps:
        refused.needed["nm_lb4_be"] = len(all_backends)
    return admitted, refused.out(caps)


def fit_ipcache(fixed: int, pods: Sequence[tuple[str, str]], capacities: Mapping[str, int]
                ) -> tuple[set[str], list[Refusal]]:
    """The pods (uid, "namespace/name", in the order they get room) that fit in the ipcache
    after its `fixed` entries (the world, the nodes, the node's own addresses)."""
    cap = capacities.get(IPCACHE_MAP)
    if cap is None or fixed + len(pods) <= cap:
        return {uid for uid, _ in pods}, []
    room = max(0, cap - fixed)
    left_out = [ref for _, ref in pods[room:]]
    return ({uid for uid, _ in pods[:room]},
            [Refusal(IPCACHE_MAP, cap, fixed + len(pods), "Pod", tuple(sorted(left_out)))])


@dataclass(frozen=True)
class PolicyFit:
    chosen: dict[int, Any]  # ifindex -> the lowered policy its veth gets
    errors: dict[str, str]  # "ns/pod" -> why its new policy is not in the maps
    refusals: list[Refusal]


def _policy_size(low: Any) -> dict[str, int]:
    return {"nm_policy": len(low.policy), "nm_policy_cidr": len(low.cidr)}


def fit_policy(pods: Sequence[tuple[int, str]], new: Mapping[int, Any],
               previous: Mapping[int, Any], capacities: Mapping[str, int]) -> PolicyFit:
    """Each local pod ((ifindex, "ns/pod") in the order they get room) gets its `new` lowered
    policy if it fits beside those before it, else its `previous` one if that fits, else none
    (its veth stays closed). A pod with no new policy (it did not compile) keeps its previous."""
    caps = {m: capacities[m] for m in POLICY_MAPS if m in capacities}
    chosen: dict[int, Any] = {}
    errors: dict[str, str] = {}
    if not caps:
        for ifindex, _ in pods:
            low = new.get(ifindex, previous.get(ifindex))
            if low is not None:
                chosen[ifindex] = low
        return PolicyFit(chosen, errors, [])
    used = dict.fromkeys(caps, 0)
    refused = _Refused(needed=dict.fromkeys(caps, 0))

    def fits(low: Any) -> list[str]:
        size = _policy_size(low)
        return [m for m in caps if used[m] + size[m] > caps[m]]

    def take(ifindex: int, low: Any) -> None:
        chosen[ifindex] = low
        size = _policy_size(low)
        for m in caps:
            used[m] += size[m]

    for ifindex, ref in pods:
        want = new.get(ifindex, previous.get(ifindex))
        if want is None:
            continue
        size = _policy_size(want)
        for m in caps:
            refused.needed[m] += size[m]
        full = fits(want)
        if not full:
            take(ifindex, want)
            continue
        for m in full:
            refused.add(m, ref)
        what = ", ".join(f"{size[m]} {m} entries ({caps[m] - used[m]} of {caps[m]} free)"
                         for m in full)
        prev = previous.get(ifindex)
        if prev is not None and prev is not want and not fits(prev):
            take(ifindex, prev)
            errors[ref] = (f"its policy needs {what}; keeping its previous entries (closed "
                           "in the directions the new policy isolates)")
        else:
            errors[ref] = (f"its policy needs {what}; it has no entries that fit, so its veth "
                           "drops all traffic")
    return PolicyFit(chosen, errors, refused.out(caps))
