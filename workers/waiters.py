"""Waiting allocations: per pool by priority then arrival (workers/queue.py), deadlines,
quotas, cancel.

Waiters are rows (they survive a restart); the active worker keeps them in
memory too, loaded at takeover and changed only with its own transactions.
Every way a waiter leaves (served, cancelled, expired, its client gone) marks
its pool in `batch.touched_pools`, so the keeper serves the waiters behind it
at once: nodes never sit ready while a waiter they fit waits.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from sqlalchemy import select
from sqlalchemy.orm import Session

from molteniron import compat, errors, pool
from molteniron.models import WaitingRequest
from molteniron.protocol import QUEUED
from molteniron.workers.batch import Batch
from molteniron.workers.constraints import ANY, Constraints
from molteniron.workers.leases import LeasePolicy
from molteniron.workers.queue import PoolQueue
from molteniron.workers.quotas import Quotas
from molteniron.workers.state import PoolState

log = logging.getLogger(__name__)


class Tried(Enum):
    """What one attempt to serve a waiter came to (Waiters._try)."""
    DONE = "done"                # served, or answered (its deadline passed, the pool shrank)
    NO_NODES = "no_nodes"        # it goes on waiting for nodes it could use
    OVER_QUOTA = "over_quota"    # it goes on waiting for its user to give nodes back


@dataclass
class Waiter:
    row_id: int
    request_id: str
    node_pool: str
    count: int
    owner: str
    reply_to: str | None
    correlation_id: str | None
    deadline: float | None  # unix time by the database's clock (workers/clock.py)
    enqueued_at: datetime   # the database's clock: the queue's order (workers/queue.py)
    lease_seconds: int | None = None
    user: str | None = None  # the broker user who asked
    wants: Constraints = ANY
    priority: int = 0


class Waiters:
    def __init__(self, leases: LeasePolicy, priority_aging: float = 1.0,
                 quotas: Quotas | None = None):
        self.leases = leases
        self.priority_aging = priority_aging
        self.quotas = quotas or Quotas(None)
        self.by_pool: dict[str, PoolQueue[Waiter]] = {}  # each pool's waiters, in serving order
        self.by_request: dict[str, Waiter] = {}
        self.by_owner: dict[str, set[str]] = defaultdict(set)
        # Quotas: where a user who gave nodes back has waiters (user -> pool -> how many).
        self.by_user: dict[str | None, Counter[str]] = defaultdict(Counter)
        # The waiters each reply queue listens for: when one of them bounces, the
        # queue is gone, and so are all its waiters.
        self.by_reply_to: dict[str | None, set[str]] = defaultdict(set)
        self._deadlines: list[tuple[float, str]] = []  # may hold stale entries
        self.changes = 0  # bumped on every change, so a rolled-back savepoint can tell

    def load(self, session: Session) -> None:
        """Replace what is in memory with the rows (at takeover, or after a rollback)."""
        self.by_pool.clear()
        self.by_request.clear()
        self.by_owner.clear()
        self.by_user.clear()
        self.by_reply_to.clear()
        self._deadlines.clear()
        for row in session.scalars(select(WaitingRequest).order_by(WaitingRequest.id)):
            self._remember(Waiter(row.id, row.request_id, row.node_pool, row.count, row.owner,
                                  row.reply_to, row.correlation_id, row.deadline,
                                  row.enqueued_at, row.lease_seconds, row.user,
                                  Constraints.from_row(row.constraints), row.priority))

    def __len__(self) -> int:
        return len(self.by_request)

    def has_waiting(self, node_pool: str) -> bool:
        return bool(self.by_pool.get(node_pool))

    def position(self, request_id: str) -> int:
        """1-based place in its pool's queue (a walk of the queue: only for redeliveries)."""
        return self.by_pool[self.by_request[request_id].node_pool].position(request_id)

    def queued_reply(self, request_id: str) -> dict:
        return {"status": QUEUED, "queued": True, "position": self.position(request_id)}

    def enqueue(self, batch: Batch, request_id: str, node_pool: str, count: int, owner: str,
                reply_to: str | None, correlation_id: str | None,
                wait_seconds: float | None, lease_seconds: int | None,
                user: str | None = None, wants: Constraints = ANY, priority: int = 0) -> dict:
        """Make the allocate a waiting row; return the interim reply."""
        assert batch.now is not None and batch.clock is not None  # given by Batch.at()
        # By the database's clock, like every deadline: a step of this host's wall
        # clock (or another worker's, after a takeover) ends no wait early or late.
        deadline = None if wait_seconds is None else batch.clock + wait_seconds
        constraints = wants.to_row()
        # Its autoincrement id is its place in line, so the INSERT runs now; what the batch
        # deferred goes first (a waiter dropped earlier in it may have had this request id).
        batch.send_writes()
        row_id = batch.connection.exec_driver_sql(
            "INSERT INTO waiting_requests (request_id, node_pool, count, owner, user, reply_to, "
            "correlation_id, enqueued_at, deadline, lease_seconds, constraints, priority) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (request_id, node_pool, count, owner, user, reply_to, correlation_id, batch.now,
             deadline, lease_seconds, None if constraints is None else json.dumps(constraints),
             priority)).lastrowid
        place = self._remember(Waiter(row_id, request_id, node_pool, count, owner, reply_to,
                                      correlation_id, deadline, batch.now, lease_seconds, user,
                                      wants, priority))
        if place == 1 and len(self.by_pool[node_pool]) > 1:
            # Ahead of earlier waiters (by priority): the nodes they kept may be its now.
            batch.touched_pools.add(node_pool)
        return {"status": QUEUED, "queued": True, "position": place}

    def serve(self, batch: Batch, state: PoolState, node_pool: str) -> None:
        """Serve the pool's waiters in order while nodes suffice.

        The rule: a waiter that cannot be served keeps the ready nodes it could use
        from everyone behind it; those behind may take only other nodes. A waiter
        without constraints could use any node, so nobody passes it (plain FIFO).
        """
        queue = self.by_pool.get(node_pool)
        while queue:
            head = queue.head()
            assert head is not None  # a queue that is not empty has a head
            outcome = self._try(batch, state, head, frozenset())
            if outcome is Tried.DONE:
                continue
            if outcome is Tried.OVER_QUOTA:  # it keeps nothing from anyone: look behind it
                self._serve_behind(batch, state, node_pool, set())
            elif not head.wants.any:
                self._serve_behind(batch, state, node_pool, state.usable(node_pool, head.wants))
            return

    def _serve_behind(self, batch: Batch, state: PoolState, node_pool: str,
                      blocked: set[int]) -> None:
        """The walk past a blocked head with constraints (only then: it is O(queue))."""
        queue = self.by_pool.get(node_pool)
        for waiter in (queue.ordered()[1:] if queue else ()):
            if waiter.request_id not in self.by_request:
                continue
            outcome = self._try(batch, state, waiter, blocked)
            if outcome is Tried.NO_NODES:
                if waiter.wants.any:
                    return  # it could use every node left: nobody behind it may pass
                blocked |= state.usable(node_pool, waiter.wants)

    def blocked_nodes(self, state: PoolState, node_pool: str) -> set[int] | None:
        """Ready nodes that waiting allocates could use (None: all of them): what a new
        allocate must leave alone to be served at once."""
        blocked: set[int] = set()
        queue = self.by_pool.get(node_pool)
        for waiter in (queue.values() if queue else ()):
            if not self.quotas.allows(waiter.user, waiter.count, state.held_by_user[waiter.user]):
                continue  # over its quota: it keeps nothing from anyone
            if waiter.wants.any:
                return None
            blocked |= state.usable(node_pool, waiter.wants)
        return blocked

    def _try(self, batch: Batch, state: PoolState, waiter: Waiter, skip) -> Tried:
        """Serve or answer one waiter, or say why it goes on waiting."""
        assert batch.now is not None and batch.clock is not None  # given by Batch.at()
        if waiter.deadline is not None and waiter.deadline <= batch.clock:
            self._finish(batch, waiter, self._timed_out(waiter, state))  # its client gave up
            return Tried.DONE
        if not self.quotas.allows(waiter.user, waiter.count, state.held_by_user[waiter.user]):
            return Tried.OVER_QUOTA
        try:
            records = state.allocate(waiter.owner, waiter.count, waiter.node_pool,
                                     waiter.request_id, batch.now,
                                     self.leases.until(batch.now, waiter.lease_seconds),
                                     waiter.user, waiter.wants, skip)
        except errors.NotEnoughNodes:
            return Tried.NO_NODES
        except errors.PoolTooSmall as exc:  # the pool shrank below what it asks for
            self._finish(batch, waiter, exc.to_reply())
            return Tried.DONE
        self._finish(batch, waiter, compat.nodes_reply(records), grant=True)
        return Tried.DONE

    def refuse_impossible(self, batch: Batch, state: PoolState, node_pool: str) -> int:
        """409 to every waiter asking for more nodes than the pool now has outside
        maintenance (a walk of the queue: only after the pool itself changed)."""
        hopeless = [(w, state.capacity(node_pool, w.wants))
                    for w in (self.by_pool[node_pool].values()
                              if node_pool in self.by_pool else ())]
        hopeless = [(w, total) for w, total in hopeless if w.count > total]
        for waiter, total in hopeless:
            self._finish(batch, waiter, pool.pool_too_small(
                node_pool, total, waiter.count, waiter.wants.describe()).to_reply())
        return len(hopeless)

    def expire(self, batch: Batch, state: PoolState | None = None) -> int:
        """Answer and remove every waiter whose deadline has passed (with `state`, the
        answer of one its quota held says so)."""
        assert batch.clock is not None  # given by Batch.at()
        expired = 0
        while self._deadlines and self._deadlines[0][0] <= batch.clock:
            deadline, request_id = heapq.heappop(self._deadlines)
            waiter = self.by_request.get(request_id)
            if waiter is not None and waiter.deadline == deadline:
                self._finish(batch, waiter, self._timed_out(waiter, state))
                expired += 1
        return expired

    def probe_reply_queues(self, batch: Batch) -> int:
        """Tell one waiter of each reply queue where it stands (mandatory), every tick.

        A client killed while waiting sent no cancel; its reply queue went with its
        connection, so the probe comes back unroutable and the keeper cancels every
        waiter of that queue (cancel_reply_queue): a gone client holds no place in
        any queue for longer than two ticks, however many waiters it left."""
        probed: set[str | None] = set()
        for place, waiter in self.rows():
            if waiter.reply_to not in probed:
                probed.add(waiter.reply_to)
                batch.reply(waiter.reply_to, waiter.correlation_id, waiter.request_id,
                            {"status": QUEUED, "queued": True, "position": place})
        return len(probed)

    def cancel_reply_queue(self, batch: Batch, reply_to: str, why: str) -> int:
        """Cancel every waiter whose replies go to `reply_to` (it is gone)."""
        gone = sorted(self.by_reply_to.get(reply_to, ()))
        for request_id in gone:
            self.cancel(batch, request_id, why, gone_from=reply_to)
        return len(gone)

    def count_of_user(self, user: str | None) -> int:
        """How many allocates `user` has waiting, in every pool."""
        return sum(self.by_user.get(user, Counter()).values())

    def cancel(self, batch: Batch, request_id: str, why: str,
               gone_from: str | None = None) -> Waiter:
        """Remove one waiter; its client gets a cancelled reply (if it still listens).

        gone_from: the reply queue its reply bounced from. The stored reply says so,
        and a copy of the request sent again with another reply queue (by a client
        that moved to another broker) is served."""
        waiter = self.by_request[request_id]
        self._finish(batch, waiter, client_gone_reply(why, gone_from) if gone_from
                     else errors.RequestCancelled(why).to_reply())
        return waiter

    def redirect(self, batch: Batch, request_id: str, reply_to: str | None,
                 correlation_id: str | None) -> None:
        """A copy of a waiting allocate came with another reply queue: its client lost its
        broker and listens there now, so that is where the nodes go."""
        waiter = self.by_request[request_id]
        if not reply_to or reply_to == waiter.reply_to:
            return
        self._forget_reply_to(waiter)
        waiter.reply_to, waiter.correlation_id = reply_to, correlation_id
        self.by_reply_to[reply_to].add(request_id)
        batch.defer("UPDATE waiting_requests SET reply_to = %s, correlation_id = %s "
                    "WHERE id = %s", (reply_to, correlation_id, waiter.row_id))
        self.changes += 1

    def holder_of(self, owner: str) -> str | None:
        """The broker user of the owner's waiting allocates (None: it waits for nothing)."""
        waiting = self.by_owner.get(owner)
        return self.by_request[next(iter(waiting))].user if waiting else None

    def pools_of_user(self, user: str | None) -> set[str]:
        """The pools where a user has waiting allocates."""
        return set(self.by_user.get(user, ()))

    def cancel_owner(self, batch: Batch, owner: str) -> int:
        mine = sorted(self.by_owner.get(owner, ()))
        for request_id in mine:
            self.cancel(batch, request_id, f"release {owner} cancelled this waiting allocate")
        return len(mine)

    def cancel_all(self, batch: Batch, why: str) -> int:
        every = list(self.by_request)
        for request_id in every:
            self.cancel(batch, request_id, why)
        return len(every)

    def rows(self, node_pool: str | None = None) -> list[tuple[int, Waiter]]:
        """(position, waiter) in the order they will be served, pool by pool."""
        return [(place, w) for p, queue in sorted(self.by_pool.items()) if node_pool in (None, p)
                for place, w in enumerate(queue.ordered(), 1)]

    def _finish(self, batch: Batch, waiter: Waiter, reply: dict, grant: bool = False) -> None:
        batch.defer("DELETE FROM waiting_requests WHERE id = %s", (waiter.row_id,))
        batch.store_reply(waiter.request_id, "allocate", reply, waiter.user)
        batch.reply(waiter.reply_to, waiter.correlation_id, waiter.request_id, reply, grant=grant)
        queue = self.by_pool[waiter.node_pool]
        queue.remove(waiter.request_id)
        if not queue:
            del self.by_pool[waiter.node_pool]
        del self.by_request[waiter.request_id]
        owned = self.by_owner[waiter.owner]
        owned.discard(waiter.request_id)
        if not owned:
            del self.by_owner[waiter.owner]
        self._forget_reply_to(waiter)
        mine = self.by_user[waiter.user]
        mine[waiter.node_pool] -= 1
        if not mine[waiter.node_pool]:
            del mine[waiter.node_pool]
            if not mine:
                del self.by_user[waiter.user]
        # Whoever waited behind it may fit now (or learn that the pool is too small).
        batch.touched_pools.add(waiter.node_pool)
        self.changes += 1
        log.info("op=allocate id=%s owner=%s pool=%s status=%s waited=true",
                 waiter.request_id, waiter.owner, waiter.node_pool, reply["status"])

    def _remember(self, waiter: Waiter) -> int:
        queue = self.by_pool.get(waiter.node_pool)
        if queue is None:
            queue = self.by_pool[waiter.node_pool] = PoolQueue(self.priority_aging)
        place = queue.add(waiter)
        self.by_request[waiter.request_id] = waiter
        self.by_owner[waiter.owner].add(waiter.request_id)
        self.by_user[waiter.user][waiter.node_pool] += 1
        self.by_reply_to[waiter.reply_to].add(waiter.request_id)
        if waiter.deadline is not None:
            heapq.heappush(self._deadlines, (waiter.deadline, waiter.request_id))
        self.changes += 1
        return place

    def _timed_out(self, waiter: Waiter, state: PoolState | None) -> dict:
        """The answer to a waiter whose deadline passed: what held it, when its quota did."""
        message = (f"no {waiter.count} node(s) of pool {waiter.node_pool} became ready "
                   "before the deadline")
        if state is not None:
            held_back = self.quotas.held_back(waiter.user, waiter.count,
                                              state.held_by_user.get(waiter.user, 0))
            if held_back is not None:
                ready = len(state.usable(waiter.node_pool, waiter.wants))
                message = (f"no {waiter.count} node(s) of pool {waiter.node_pool} could be "
                           f"taken before the deadline: its quota held this wait, with {ready} "
                           f"usable node(s) ready ({held_back})")
        return errors.DeadlineExpired(message).to_reply()

    def _forget_reply_to(self, waiter: Waiter) -> None:
        listening = self.by_reply_to[waiter.reply_to]
        listening.discard(waiter.request_id)
        if not listening:
            del self.by_reply_to[waiter.reply_to]


def client_gone_reply(why: str, reply_to: str | None) -> dict:
    """The stored reply of an allocate undone because its reply bounced from reply_to.
    Not final: a copy of the request sent again with another reply queue is served
    (PoolKeeper._handle_one)."""
    return {**errors.RequestCancelled(why).to_reply(), "client_gone": reply_to or "?"}
