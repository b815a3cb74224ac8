"""The routing half of the proxy return path, in the node's network namespace.

The datapath marks a reply that belongs to one of the node's own TCP sockets (the node Envoy's
transparent upstream connections, which carry a client pod's address) with `PROXY_MARK`
within `PROXY_MARK_MASK` (bpf/lib/proxy.h). These two entries turn the mark into local
delivery, as Cilium's proxy rules do:

    ip rule add fwmark 0x200/0xf00 lookup 2004 pref 9
    ip route add local 0.0.0.0/0 dev lo table 2004

Without them the mark is inert and such replies are routed to the pod whose address they
carry. Set `ConfigFlags.PROXY_RETURN` in nm_config only after `install_proxy_routing` (the
programs skip the socket lookup without it).

Both functions are idempotent and touch only these two entries; `netns` is a name under
/run/netns or a path (/proc/PID/ns/net), None for the caller's namespace.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from nodemesh.datapath import libbpf
from nodemesh.datapath.layout import PROXY_MARK, PROXY_MARK_MASK, PROXY_ROUTE_TABLE, PROXY_RULE_PREF
from nodemesh.errors import NodemeshError


class RoutingError(NodemeshError):
    """An `ip` command for the proxy return path failed; the message has its stderr."""


_FWMARK = f"{PROXY_MARK:#x}/{PROXY_MARK_MASK:#x}"
_RULE = ["fwmark", _FWMARK, "lookup", str(PROXY_ROUTE_TABLE), "pref", str(PROXY_RULE_PREF)]
_ROUTE = ["local", "0.0.0.0/0", "dev", "lo", "table", str(PROXY_ROUTE_TABLE)]


def _ip(netns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    def run() -> subprocess.CompletedProcess[str]:
        # `ip` forked from a thread that entered the namespace runs in it (fork copies the
        # calling thread's namespaces), which works for names and paths alike
        return subprocess.run(["ip", *args], capture_output=True, text=True)

    res = libbpf.run_in_netns(libbpf.netns_path(netns), run) if netns else run()
    if check and res.returncode != 0:
        raise RoutingError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _our_rules(netns: str | None) -> list[dict[str, Any]]:
    rules = json.loads(_ip(netns, "-j", "-4", "rule", "show").stdout or "[]")
    out = []
    for r in rules:
        mark = r.get("fwmark")
        mask = r.get("fwmask")
        table = str(r.get("table", ""))
        if (mark is not None and int(str(mark), 0) == PROXY_MARK
                and mask is not None and int(str(mask), 0) == PROXY_MARK_MASK
                and table == str(PROXY_ROUTE_TABLE)):
            out.append(r)
    return out


def _our_route_present(netns: str | None) -> bool:
    res = _ip(netns, "-j", "-4", "route", "show", "table", str(PROXY_ROUTE_TABLE), check=False)
    if res.returncode != 0:  # the table does not exist yet
        return False
    for r in json.loads(res.stdout or "[]"):
        if r.get("type") == "local" and r.get("dst") == "default" and r.get("dev") == "lo":
            return True
    return False


def proxy_routing_installed(netns: str | None = None) -> bool:
    """Are both the rule (at its preference) and the local route in place?"""
    rules = _our_rules(netns)
    return (any(r.get("priority") == PROXY_RULE_PREF for r in rules)
            and _our_route_present(netns))


def install_proxy_routing(netns: str | None = None) -> None:
    """Add the fwmark rule and the local default route of the proxy table if missing."""
    # route first: a rule pointing at an empty table would send marked packets on to the main
    # table, which is harmless, but this order never has a window where it matters
    _ip(netns, "-4", "route", "replace", *_ROUTE)
    if not any(r.get("priority") == PROXY_RULE_PREF for r in _our_rules(netns)):
        _ip(netns, "-4", "rule", "add", *_RULE)


def remove_proxy_routing(netns: str | None = None) -> None:
    """Remove the rule (every copy, at any preference) and the route; no-op when absent."""
    for r in _our_rules(netns):
        _ip(netns, "-4", "rule", "del", "fwmark", _FWMARK, "lookup", str(PROXY_ROUTE_TABLE),
            "pref", str(r.get("priority")), check=False)
    if _our_route_present(netns):
        _ip(netns, "-4", "route", "del", *_ROUTE)
