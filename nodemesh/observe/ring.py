"""The bounded flow ring each agent keeps: newest flows win, readers never block writers.

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
                 on_add: Callable[[dict], None] | None = None) -> None:
        self.capacity = capacity
        self.on_add = on_add  # e.g. metrics, updated as flows arrive
        self._flows: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._followers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()
        self.total = 0  # every flow ever added
        self.lost_followers = 0  # flows a slow follower could not take

    def add(self, flow: dict) -> None:
        if self.on_add is not None:
            self.on_add(flow)
        with self._lock:
            self._flows.append(flow)
            self.total += 1
            followers = list(self._followers)
        for loop, q in followers:
            loop.call_soon_threadsafe(self._offer, q, flow)

    def _offer(self, q: asyncio.Queue, flow: dict) -> None:
        try:
            q.put_nowait(flow)
        except asyncio.QueueFull:
            self.lost_followers += 1

    def snapshot(self) -> list[dict]:
        with self._lock:
            return list(self._flows)

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.snapshot())

    def follow(self, maxsize: int = 4096) -> asyncio.Queue:
        """A queue that receives every flow added from now on (call from the event loop)."""
        q: asyncio.Queue = asyncio.Queue(maxsize)
        with self._lock:
            self._followers.add((asyncio.get_running_loop(), q))
        return q

    def unfollow(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._followers = {(lp, x) for lp, x in self._followers if x is not q}
