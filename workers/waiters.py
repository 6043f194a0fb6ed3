"""Waiting allocations: FIFO per pool, deadlines, cancel.

Waiters are rows (they survive a restart); the active worker keeps them in
memory too, loaded at takeover and changed only with its own transactions.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from molteniron import compat, errors
from molteniron.models import WaitingRequest
from molteniron.protocol import QUEUED, TIMED_OUT
from workers.batch import Batch
from workers.state import PoolState

log = logging.getLogger(__name__)


@dataclass
class Waiter:
    row_id: int
    request_id: str
    node_pool: str
    count: int
    owner: str
    reply_to: str | None
    correlation_id: str | None
    deadline: float | None
    enqueued_at: datetime


class Waiters:
    def __init__(self) -> None:
        self.by_pool: dict[str, deque[Waiter]] = {}
        self.by_request: dict[str, Waiter] = {}
        self.changes = 0  # bumped on every change, so a rolled-back savepoint can tell

    def load(self, session: Session) -> None:
        """Replace what is in memory with the rows (at takeover, or after a rollback)."""
        self.by_pool.clear()
        self.by_request.clear()
        for row in session.scalars(select(WaitingRequest).order_by(WaitingRequest.id)):
            self._remember(Waiter(row.id, row.request_id, row.node_pool, row.count, row.owner,
                                  row.reply_to, row.correlation_id, row.deadline,
                                  row.enqueued_at))

    def __len__(self) -> int:
        return len(self.by_request)

    def has_waiting(self, node_pool: str) -> bool:
        return bool(self.by_pool.get(node_pool))

    def position(self, request_id: str) -> int:
        waiter = self.by_request[request_id]
        return list(self.by_pool[waiter.node_pool]).index(waiter) + 1

    def queued_reply(self, request_id: str) -> dict:
        return {"status": QUEUED, "queued": True, "position": self.position(request_id)}

    def enqueue(self, batch: Batch, request_id: str, node_pool: str, count: int, owner: str,
                reply_to: str | None, correlation_id: str | None,
                deadline: float | None) -> dict:
        """Make the allocate a waiting row; return the interim reply."""
        row = WaitingRequest(request_id=request_id, node_pool=node_pool, count=count, owner=owner,
                             reply_to=reply_to, correlation_id=correlation_id,
                             enqueued_at=batch.now, deadline=deadline)
        batch.session.add(row)
        batch.session.flush()
        self._remember(Waiter(row.id, request_id, node_pool, count, owner, reply_to,
                              correlation_id, deadline, batch.now))
        return self.queued_reply(request_id)

    def serve(self, batch: Batch, state: PoolState, node_pool: str) -> int:
        """Serve the pool's waiters in order while nodes suffice; return how many."""
        queue = self.by_pool.get(node_pool)
        served = 0
        while queue:
            head = queue[0]
            if head.deadline is not None and head.deadline <= batch.clock:
                self._finish(batch, head, _timed_out(head))  # its client has given up
                continue
            try:
                records = state.allocate(head.owner, head.count, node_pool, head.request_id,
                                         batch.now)
            except errors.NotEnoughNodes:
                break
            except errors.PoolTooSmall as exc:  # the pool shrank below what it asks for
                self._finish(batch, head, exc.to_reply())
                continue
            self._finish(batch, head, compat.nodes_reply(records))
            served += 1
        return served

    def expire(self, batch: Batch) -> int:
        """Answer and remove every waiter whose deadline has passed."""
        expired = [w for w in self.by_request.values()
                   if w.deadline is not None and w.deadline <= batch.clock]
        for waiter in expired:
            self._finish(batch, waiter, _timed_out(waiter))
        return len(expired)

    def cancel(self, batch: Batch, request_id: str, why: str) -> Waiter:
        """Remove one waiter; its client gets a cancelled reply (if it still listens)."""
        waiter = self.by_request[request_id]
        self._finish(batch, waiter, errors.RequestCancelled(why).to_reply())
        return waiter

    def cancel_owner(self, batch: Batch, owner: str) -> int:
        mine = [w.request_id for w in self.by_request.values() if w.owner == owner]
        for request_id in mine:
            self.cancel(batch, request_id, f"release {owner} cancelled this waiting allocate")
        return len(mine)

    def cancel_all(self, batch: Batch, why: str) -> int:
        every = list(self.by_request)
        for request_id in every:
            self.cancel(batch, request_id, why)
        return len(every)

    def rows(self, node_pool: str | None = None) -> list[Waiter]:
        return [w for p, q in sorted(self.by_pool.items()) if node_pool in (None, p) for w in q]

    def _finish(self, batch: Batch, waiter: Waiter, reply: dict) -> None:
        batch.session.execute(delete(WaitingRequest).where(WaitingRequest.id == waiter.row_id))
        batch.store(waiter.request_id, "allocate", reply)
        batch.reply(waiter.reply_to, waiter.correlation_id, waiter.request_id, reply)
        self.by_pool[waiter.node_pool].remove(waiter)
        del self.by_request[waiter.request_id]
        self.changes += 1
        log.info("op=allocate id=%s owner=%s pool=%s status=%s waited=true",
                 waiter.request_id, waiter.owner, waiter.node_pool, reply["status"])

    def _remember(self, waiter: Waiter) -> None:
        self.by_pool.setdefault(waiter.node_pool, deque()).append(waiter)
        self.by_request[waiter.request_id] = waiter
        self.changes += 1


def _timed_out(waiter: Waiter) -> dict:
    return {"status": TIMED_OUT, "error": "DeadlineExpired",
            "message": f"no {waiter.count} node(s) of pool {waiter.node_pool} became ready "
                       "before the deadline"}
