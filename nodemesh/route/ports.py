"""Stable listener-port allocation: one proxy port per redirected destination.

The listener port names the original destination (the datapath rewrote VIP:port or
podIP:port to PROXY_IP:listener-port), so a destination must keep its port for as long as it
is redirected: connections in flight and BPF map entries refer to it. Rules:

- a key that had a port keeps it;
- a new key gets the lowest port from `FIRST_LISTENER_PORT` up that no current key holds and
  that no key held in `previous` — a port freed in this round is not handed to another
  destination in the same round, because the old listener may still be draining and a
  connection meant for the old destination must never reach the new one. It becomes free for
  reuse from the next round on;
- new keys are served in sorted order, so the result depends only on the inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from nodemesh.route.inputs import FIRST_LISTENER_PORT, RedirectKey

LAST_LISTENER_PORT = 15999  # a range the agent can keep free of other local listeners


class PortsExhausted(Exception):
    """More redirected destinations than listener ports."""


def allocate_listener_ports(
    keys: Iterable[RedirectKey],
    previous: Mapping[RedirectKey, int] | None = None,
    first: int = FIRST_LISTENER_PORT,
    last: int = LAST_LISTENER_PORT,
) -> dict[RedirectKey, int]:
    """The listener port of every key in `keys` (sorted by key)."""
    previous = previous or {}
    wanted = sorted(set(keys))
    out: dict[RedirectKey, int] = {}
    for k in wanted:
        port = previous.get(k)
        if port is not None and first <= port <= last:
            out[k] = port
    # Never two keys on one port, even if `previous` was inconsistent: the first key wins.
    seen: dict[int, RedirectKey] = {}
    for k in list(out):
        if out[k] in seen:
            del out[k]
        else:
            seen[out[k]] = k
    blocked = set(out.values()) | set(previous.values())
    candidate = first
    for k in wanted:
        if k in out:
            continue
        while candidate in blocked:
            candidate += 1
        if candidate > last:
            raise PortsExhausted(f"no listener port left in {first}-{last} for {k} "
                                 f"({len(wanted)} redirected destinations)")
        out[k] = candidate
        blocked.add(candidate)
    return dict(sorted(out.items()))
