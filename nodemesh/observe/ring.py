"""The bounded flow ring each agent keeps: newest flows win, readers never block writers.

Entries are flows (dicts) or records that build their flow on demand (`.to_flow()`, such as
`nodemesh.observe.flow.RawEvent`): readers always get dicts.

Writers (the ring-buffer drain, the access-log receiver) append from any thread; followers get
each new flow through an asyncio queue of their own, bounded too — a slow follower loses flows
(counted) instead of slowing the datapath's reader.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterator


class FlowRing:
    def __init__(self, capacity: int = 16384,
                 on_add: Callable[[object], None] | None = None) -> None:
        self.capacity = capacity
        self.on_add = on_add  # e.g. metrics, updated as flows arrive
        self._flows: collections.deque[object] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._followers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self.total = 0  # every flow ever added
        self.lost_followers = 0  # flows a slow follower could not take

    def add(self, flow: object) -> None:
        if self.on_add is not None:
            self.on_add(flow)
        with self._lock:
            self._flows.append(flow)
            self.total += 1
            followers = list(self._followers)
        for loop, q in followers:
            loop.call_soon_threadsafe(self._offer, q, flow)

    def _offer(self, q: asyncio.Queue, flow: object) -> None:
        try:
            q.put_nowait(flow)
        except asyncio.QueueFull:
            self.lost_followers += 1

    def snapshot(self) -> list[dict]:
        with self._lock:
            entries = list(self._flows)
        return [as_flow(e) for e in entries]

    def newest_first(self) -> Iterator[dict]:
        """Flows from the newest back, built only as far as the caller reads."""
        with self._lock:
            entries = list(self._flows)
        for e in reversed(entries):
            yield as_flow(e)

    @property
    def overwritten(self) -> int:
        """Flows the newest pushed out of the ring (the history is bounded; counted, as
        `nodemesh_lost_events{source="flow_ring_overwritten"}`)."""
        return max(0, self.total - self.capacity)

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.snapshot())

    def follow(self, maxsize: int = 4096) -> asyncio.Queue:
        """A queue that receives every entry added from now on (call from the event loop);
        pass what it yields through `as_flow`."""
        q: asyncio.Queue = asyncio.Queue(maxsize)
        with self._lock:
            self._followers.add((asyncio.get_running_loop(), q))
        return q

    def unfollow(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._followers = {(lp, x) for lp, x in self._followers if x is not q}


def as_flow(entry: object) -> dict:
    return entry if isinstance(entry, dict) else entry.to_flow()  # type: ignore[attr-defined]
