"""What the single writer decides allocate and release with, kept in memory.

The worker is the only writer, so it keeps every node's record, the ready
nodes of each pool (lowest id first) and what each owner holds. It loads them
at takeover, changes them only together with its own transaction, and writes
a batch's changes in a handful of statements (`flush`), whatever the batch
size. The database stays the record: after any failed transaction the worker
reloads from it.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from molteniron import errors, pool
from molteniron.models import EndReason, Node, State
from workers.batch import placeholders


class PoolState:
    def __init__(self) -> None:
        self.nodes: dict[int, dict] = {}
        self.ready: dict[str, set[int]] = defaultdict(set)
        self._ready_heap: dict[str, list[int]] = defaultdict(list)  # may hold stale ids
        self.owned: dict[str, set[int]] = defaultdict(set)
        self._reset_pending()

    # --- loading ---------------------------------------------------------------

    def load(self, session: Session) -> None:
        """Replace everything in memory with what the database holds."""
        self.clear()
        for node in session.scalars(select(Node).order_by(Node.id)):
            self._index(pool.node_record(node))
        session.expunge_all()

    def refresh(self, session: Session, node_ids: set[int]) -> None:
        """Re-read nodes that a pool operation changed through the ORM."""
        for node_id in node_ids:
            self._unindex(node_id)
        if node_ids:
            for node in session.scalars(select(Node).where(Node.id.in_(node_ids))):
                self._index(pool.node_record(node))

    def clear(self) -> None:
        """Forget every node and every pending write (the pool was emptied)."""
        self.nodes.clear()
        self.ready.clear()
        self._ready_heap.clear()
        self.owned.clear()
        self._reset_pending()

    # --- the rules -------------------------------------------------------------

    def capacity(self, node_pool: str) -> int:
        return sum(1 for r in self.nodes.values()
                   if r["node_pool"] == node_pool and r["state"] != State.MAINTENANCE.value)

    def allocate(self, owner: str, count: int, node_pool: str, request_id: str | None,
                 now: datetime) -> list[dict]:
        """All or nothing, lowest ids first: the same rule as molteniron.pool.allocate."""
        ready = self.ready.get(node_pool, ())
        if len(ready) < count:
            total = self.capacity(node_pool)
            if count > total:
                raise pool.pool_too_small(node_pool, total, count)
            raise pool.not_enough_nodes(node_pool, len(ready), count)
        heap = self._ready_heap[node_pool]
        taken = []
        while len(taken) < count:
            node_id = heapq.heappop(heap)
            if node_id in ready:
                ready.discard(node_id)
                taken.append(node_id)
        stamp = now.isoformat(timespec="seconds")
        for node_id in taken:
            record = self.nodes[node_id]
            record.update(state=State.ALLOCATED.value, owner=owner, allocated_at=stamp)
            self.owned[owner].add(node_id)
            self._node_writes[node_id] = (State.ALLOCATED, owner, now)
            self._opened[node_id] = {"node_id": node_id, "node_name": record["name"],
                                     "owner": owner, "request_id": request_id,
                                     "started_at": now, "ended_at": None, "end_reason": None}
        return [dict(self.nodes[i]) for i in taken]

    def release_owner(self, owner: str, reason: EndReason, now: datetime) -> list[dict]:
        """Every node of owner back to ready; OwnerNotFound if it holds none."""
        held = self.owned.get(owner)
        if not held:
            raise errors.OwnerNotFound(f"No nodes are owned by {owner}")
        return self._release(sorted(held), reason, now)

    def _release(self, node_ids: list[int], reason: EndReason, now: datetime) -> list[dict]:
        released = []
        for node_id in node_ids:
            record = self.nodes[node_id]
            self.owned[record["owner"]].discard(node_id)
            if not self.owned[record["owner"]]:
                del self.owned[record["owner"]]
            record.update(state=State.READY.value, owner=None, allocated_at=None)
            self._make_ready(node_id)
            self._node_writes[node_id] = (State.READY, None, None)
            opened = self._opened.pop(node_id, None)
            if opened is not None:  # opened in this same batch: insert it closed
                self._closed_in_batch.append({**opened, "ended_at": now, "end_reason": reason})
            else:
                self._to_close[reason].add(node_id)
            released.append(dict(record))
        return released

    # --- writing ----------------------------------------------------------------

    def flush(self, session: Session, now: datetime) -> None:
        """Write what changed since the last flush: a few statements for any number of changes.

        Plain driver SQL: this runs once per batch on the hot path, where building
        SQLAlchemy statements cost more than the database round trips.
        """
        if not (self._node_writes or self._to_close):
            return
        sql = session.connection().exec_driver_sql
        for reason, node_ids in self._to_close.items():
            if node_ids:
                sql(f"UPDATE allocations SET ended_at = %s, end_reason = %s "
                    f"WHERE node_id IN ({placeholders(node_ids)}) AND ended_at IS NULL",
                    (now, reason.value, *node_ids))
        rows = [(r["node_id"], r["node_name"], r["owner"], r["request_id"], r["started_at"],
                 r["ended_at"], r["end_reason"] and r["end_reason"].value)
                for r in [*self._opened.values(), *self._closed_in_batch]]
        if rows:
            sql("INSERT INTO allocations (node_id, node_name, owner, request_id, started_at, "
                "ended_at, end_reason) VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
        freed = [i for i, (state, _, _) in self._node_writes.items() if state == State.READY]
        if freed:
            sql(f"UPDATE nodes SET state = 'ready', owner = NULL, allocated_at = NULL, "
                f"lease_expires_at = NULL WHERE id IN ({placeholders(freed)})", tuple(freed))
        taken = [(i, owner, at) for i, (state, owner, at) in self._node_writes.items()
                 if state == State.ALLOCATED]
        if taken:
            # One UPDATE for every node taken: CASE picks each node's owner and time.
            cases = " ".join("WHEN %s THEN %s" for _ in taken)
            sql(f"UPDATE nodes SET state = 'allocated', owner = CASE id {cases} END, "
                f"allocated_at = CASE id {cases} END WHERE id IN ({placeholders(taken)})",
                (*[v for i, o, _ in taken for v in (i, o)],
                 *[v for i, _, t in taken for v in (i, t)], *[i for i, _, _ in taken]))
        session.expire_all()  # ORM objects loaded earlier in the batch are now stale
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._node_writes: dict[int, tuple] = {}
        self._opened: dict[int, dict] = {}
        self._closed_in_batch: list[dict] = []
        self._to_close: dict[EndReason, set[int]] = defaultdict(set)

    # --- indexes ----------------------------------------------------------------

    def _index(self, record: dict) -> None:
        self.nodes[record["id"]] = record
        if record["state"] == State.READY.value:
            self._make_ready(record["id"])
        if record["owner"] is not None:
            self.owned[record["owner"]].add(record["id"])

    def _unindex(self, node_id: int) -> None:
        record = self.nodes.pop(node_id, None)
        if record is None:
            return
        self.ready.get(record["node_pool"], set()).discard(node_id)
        if record["owner"] is not None and record["owner"] in self.owned:
            self.owned[record["owner"]].discard(node_id)
            if not self.owned[record["owner"]]:
                del self.owned[record["owner"]]

    def _make_ready(self, node_id: int) -> None:
        node_pool = self.nodes[node_id]["node_pool"]
        if node_id not in self.ready[node_pool]:
            self.ready[node_pool].add(node_id)
            heapq.heappush(self._ready_heap[node_pool], node_id)


