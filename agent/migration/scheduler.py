"""Who may migrate now: the host's limit and the pair limits.

Two counters gate every outbound migration, taken in this order:

1. the **pair** limit towards its destination: at most
   ``min(local limit, remote limit)`` migrations from this host to that
   peer leave the queue at once (the remote limit is learned from the peer's
   Welcome; until the first handshake with a peer only one is let through,
   and that handshake is the probe);
2. the **host** limit (``LiveSlots``): inbound and outbound migrations of
   this host together never exceed ``max_live_migrations``.

A migration waits for its pair slot before it takes a host slot, so a job
whose peer is saturated never sits on a host slot that a job to another
peer could use. Both queues are FIFO within a priority (higher first).
An inbound request takes a host slot only if one is free now; otherwise
the destination answers BUSY and the source puts the job back in its
queue (see source.py), so nothing is refused just because a host is busy.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools


class _FairQueue:
    """Waiters ordered by (-priority, arrival)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def push(self, priority: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (-priority, next(self._seq), fut))
        return fut

    def pop_live(self) -> asyncio.Future | None:
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                return fut
        return None

    def __len__(self) -> int:
        return sum(1 for _, _, f in self._heap if not f.done())


class LiveSlots:
    """This host's live-migration limit, counting inbound and outbound alike."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters = _FairQueue()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_use < self.limit and not len(self._waiters):
            self.in_use += 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> None:
        if self.try_acquire():
            return
        fut = self._waiters.push(priority)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()          # granted while being cancelled: hand it on
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self.in_use < self.limit:
            fut = self._waiters.pop_live()
            if fut is None:
                return
            self.in_use += 1
            fut.set_result(None)


class StorageSlots(LiveSlots):
    """This host's storage-move limit (``limits.max_storage_migrations``):
    the same FIFO-within-priority queue as LiveSlots, counted apart from the
    live slots. Local moves take one each; a shared-nothing migration will
    take one here and one live slot, on both hosts."""


class PairLimits:
    """Outbound migrations per destination, at most min(local, remote limit)."""

    def __init__(self, local: LiveSlots) -> None:
        self.local = local
        self.remote_limit: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self._waiters: dict[str, _FairQueue] = {}

    def limit(self, peer: str) -> int:
        remote = self.remote_limit.get(peer)
        if remote is None:
            return 1                    # unknown peer: the first handshake is the probe
        return max(1, min(self.local.limit, remote))

    def learn(self, peer: str, remote_limit: int) -> None:
        self.remote_limit[peer] = remote_limit
        self._wake(peer)

    async def acquire(self, peer: str, priority: int = 0) -> None:
        q = self._waiters.setdefault(peer, _FairQueue())
        if self.in_flight.get(peer, 0) < self.limit(peer) and not len(q):
            self.in_flight[peer] = self.in_flight.get(peer, 0) + 1
            return
        fut = q.push(priority)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(peer)
            raise

    def release(self, peer: str) -> None:
        self.in_flight[peer] -= 1
        self._wake(peer)

    def wake_all(self) -> None:
        for peer in list(self._waiters):
            self._wake(peer)

    def _wake(self, peer: str) -> None:
        q = self._waiters.get(peer)
        while q is not None and self.in_flight.get(peer, 0) < self.limit(peer):
            fut = q.pop_live()
            if fut is None:
                return
            self.in_flight[peer] = self.in_flight.get(peer, 0) + 1
            fut.set_result(None)


class HostBandwidth:
    """One rate cap shared by every outbound migration of the host.

    Virtual-time pacing: each send books ``nbytes / rate`` seconds on a
    shared clock and waits until its slot, allowing BURST_S of credit, so
    concurrent migrations share the cap in proportion to what they send.
    """

    BURST_S = 0.01

    def __init__(self, mibps: int) -> None:
        self.rate_bps = mibps * 2**20
        self._next = 0.0

    async def consume(self, nbytes: int) -> None:
        import time

        now = time.monotonic()
        self._next = max(self._next, now - self.BURST_S) + nbytes / self.rate_bps
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
