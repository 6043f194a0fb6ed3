"""The order of one pool's waiters: priority first, then first come, first served.

A waiter's effective priority is its priority plus `priority_aging` per
minute it has waited. All waiters age at the same rate, so the order of two
waiters never changes while they wait: it is fixed by

    rank = aging * (minutes since the epoch at which it started waiting) - priority

smallest first, ties by arrival. A waiter of priority 0 is therefore passed
only by waiters of priority P that arrived less than P / aging minutes after
it (see README "Priority and quotas" for the bound this gives).

enqueued_at is the database's clock (workers/clock.py), never a worker host's:
a host whose clock was stepped back (or a standby whose clock is off, taking
over) would otherwise give a later waiter an earlier place.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    row_id: int
    request_id: str
    priority: int
    enqueued_at: datetime


def rank(waiter: Queued, aging: float) -> tuple[float, int]:
    minutes = waiter.enqueued_at.replace(tzinfo=timezone.utc).timestamp() / 60
    return (aging * minutes - waiter.priority, waiter.row_id)


Q = TypeVar("Q", bound=Queued)


class PoolQueue(Generic[Q]):
    """Hands back the very items added to it, so a caller keeps their own type."""

    def __init__(self, aging: float):
        self.aging = aging
        self.members: dict[str, Q] = {}
        self.ranks: dict[str, tuple[float, int]] = {}  # computed once, at arrival
        self._heap: list[tuple[tuple[float, int], str]] = []  # may hold removed ones
        self._last: tuple[float, int] | None = None  # the largest rank added

    def __len__(self) -> int:
        return len(self.members)

    def __bool__(self) -> bool:
        return bool(self.members)

    def add(self, waiter: Q) -> int:
        """Add a waiter; return its 1-based place (cheap when it goes last, the usual case)."""
        key = self.ranks[waiter.request_id] = rank(waiter, self.aging)
        self.members[waiter.request_id] = waiter
        heapq.heappush(self._heap, (key, waiter.request_id))
        if self._last is None or key >= self._last:
            self._last = key
            return len(self.members)
        return self.position(waiter.request_id)

    def remove(self, request_id: str) -> None:
        del self.members[request_id]
        del self.ranks[request_id]
        if not self.members:
            self._heap.clear()
            self._last = None

    def head(self) -> Q | None:
        heap = self._heap
        while heap and heap[0][1] not in self.members:
            heapq.heappop(heap)
        return self.members[heap[0][1]] if heap else None

    def ordered(self) -> list[Q]:
        """Every waiter in the order they will be served (a sort: not for the hot path)."""
        ranks = self.ranks
        return sorted(self.members.values(), key=lambda w: ranks[w.request_id])

    def position(self, request_id: str) -> int:
        return next(place for place, w in enumerate(self.ordered(), 1)
                    if w.request_id == request_id)

    def values(self) -> Iterator[Q]:
        """Every waiter, in no particular order."""
        return iter(self.members.values())
