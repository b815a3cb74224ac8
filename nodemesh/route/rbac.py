"""L7 (HTTP) policy of a pod port → Envoy RBAC rules, with Cilium's semantics.

A request is allowed iff some `L7PolicyRule` allows it: its source is one of this node's pods
whose identity the rule lists (matched on the connection's address, ``direct_remote_ip`` — the
client pod connected to the proxy itself; or any source when the rule lists identity 0) and
one of the rule's ``rules.http`` entries matches (an empty list matches every request).

An HTTP entry matches when all of its fields do, as in Cilium's proxy:

- ``method``, ``path``, ``host``: RE2 regular expressions matched against the whole of
  ``:method``, ``:path`` and ``:authority`` (Envoy's ``safe_regex`` is a full match, so
  ``path: /foo`` means ``^/foo$`` and does not match ``/foo/bar``; note that ``:path`` includes
  the query string, as in Cilium);
- ``headers``: ``"Name: value"`` (the header must have exactly that value) or ``"Name"`` (the
  header must be present);
- ``headerMatches``: ``{name, value}`` must have that value (no value: must be present).
  Cilium's ``mismatch`` actions (LOG/ADD/DELETE/REPLACE: let the request through and edit the
  header) and ``secret`` values are not supported: such an entry still requires the header,
  which errs on the side of denying.

Everything else is denied: Envoy answers ``403`` with body ``Access denied`` (the
listener's local-reply mapper), its access log carries the RBAC response flag and
``response_code_details: rbac_access_denied_matched_policy[none]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nodemesh.route.inputs import ANY_IDENTITY, L7Policy, Pod


def _header_entry(h: str) -> dict[str, Any]:
    # Cilium splits "Name: value" on the first space and trims the ':' off the name.
    parts = h.split(" ", 1)
    if len(parts) == 2:
        return {"header": {"name": parts[0].rstrip(":").lower(),
                           "string_match": {"exact": parts[1]}}}
    return {"header": {"name": parts[0].rstrip(":").lower(), "present_match": True}}


def http_permission(http: Mapping[str, Any]) -> dict[str, Any]:
    """One CNP ``rules.http`` entry → an RBAC Permission."""
    rules: list[dict[str, Any]] = []
    for fld, header in (("method", ":method"), ("path", ":path"), ("host", ":authority")):
        if http.get(fld):
            rules.append({"header": {"name": header,
                                     "string_match": {"safe_regex": {"regex": http[fld]}}}})
    rules.extend(_header_entry(h) for h in http.get("headers") or [])
    for hm in http.get("headerMatches") or []:
        name = str(hm["name"]).lower()
        if hm.get("value"):
            rules.append({"header": {"name": name, "string_match": {"exact": hm["value"]}}})
        else:
            rules.append({"header": {"name": name, "present_match": True}})
    if not rules:
        return {"any": True}
    if len(rules) == 1:
        return rules[0]
    return {"and_rules": {"rules": rules}}


def principals(identities: Sequence[int], local_pods: Sequence[Pod]) -> list[dict[str, Any]]:
    """The local client pods a rule allows (empty: none here)."""
    if ANY_IDENTITY in identities:
        return [{"any": True}]
    allowed = set(identities)
    ips = sorted({p.ip for p in local_pods if p.ip and p.identity in allowed})
    return [{"direct_remote_ip": {"address_prefix": ip, "prefix_len": 32}} for ip in ips]


def rbac_rules(policy: L7Policy, local_pods: Sequence[Pod]) -> dict[str, Any]:
    """The RBAC ``rules`` (an ALLOW list) for one policed pod port. No policy with a
    principal means nothing is allowed from this node."""
    policies: dict[str, Any] = {}
    for i, rule in enumerate(policy.rules):
        who = principals(rule.identities, local_pods)
        if not who:
            continue
        perms = [http_permission(h) for h in rule.http] or [{"any": True}]
        policies[f"rule-{i}"] = {"permissions": perms, "principals": who}
    return {"action": "ALLOW", "policies": policies}
