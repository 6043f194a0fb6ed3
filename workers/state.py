"""The pool's rules, decided in memory by the single writer.

This is the one place that decides allocate, release, renew, lease expiry,
maintenance and cleaning (claim, report, abandon, requeue). The worker is the
only writer, so it keeps every node's record, the ready nodes of each pool
(lowest id first), what each owner holds, each pool's capacity and the leases in
expiry order. It loads them at takeover, changes them only together with its own
transaction, and writes a batch's changes in a handful of statements (`flush`),
whatever the batch size. Other changes to nodes (add, set_field, remove, import)
go through the ORM and come back here through `refresh`. The database stays the
record: after any failed transaction the worker reloads from it.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Set
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from molteniron import cleaning, errors, pool
from molteniron.models import EndReason, Node, State
from molteniron.node_record import NodeRecord
from molteniron.node_states import ENDED_BY, Event, next_state, refused_mid_cleaning
from molteniron.workers.batch import placeholders, values
from molteniron.workers.constraints import ANY, Constraints


class PoolState:
    def __init__(self, clean_released: bool = False) -> None:
        # True when a cleaning_command is configured: released nodes are dirty, not
        # ready, until a cleaner says they are clean (workers/cleaning.py).
        self.clean_released = clean_released
        self.nodes: dict[int, NodeRecord] = {}
        self.loads = 0  # how many times load() has read the whole pool
        self._sorted_ids: list[int] | None = None  # self.nodes' ids in order, made when asked
        self.ready: dict[str, set[int]] = defaultdict(set)
        self._ready_heap: dict[str, list[int]] = defaultdict(list)  # may hold stale ids
        self.owned: dict[str, set[int]] = defaultdict(set)
        self.capacity_of: dict[str, int] = defaultdict(int)  # nodes outside maintenance
        self.leases: dict[int, datetime] = {}
        self.request_of: dict[int, str | None] = {}  # allocated node -> the request granted it
        self.shrunk: set[str] = set()  # pools that lost capacity: some waiters may be hopeless
        self.held_by_user: dict[str | None, int] = defaultdict(int)  # for quotas
        self.quota_freed: set[str | None] = set()  # users who gave nodes back: serve their waiters
        self.granted: dict[str, set[int]] = defaultdict(set)  # request -> nodes it still holds
        self._lease_heap: list[tuple[datetime, int]] = []  # may hold stale entries
        self._reset_pending()

    # --- loading ---------------------------------------------------------------

    def load(self, session: Session) -> None:
        """Replace everything in memory with what the database holds."""
        self.clear()
        self.loads += 1
        for node in session.scalars(select(Node).order_by(Node.id)):
            self._index(NodeRecord.from_node(node))
        session.expunge_all()
        for node_id, request_id in session.connection().exec_driver_sql(
                "SELECT node_id, request_id FROM allocations WHERE ended_at IS NULL"):
            self._held_by(node_id, request_id)

    def refresh(self, session: Session, node_ids: set[int]) -> set[str]:
        """Re-read nodes changed through the ORM; return the pools they left or joined."""
        pools = set()
        present = node_ids & self.nodes.keys()
        for node_id in node_ids:
            old = self._unindex(node_id)
            if old is not None:
                pools.add(old.node_pool)
        if node_ids:
            for node in session.scalars(select(Node).where(Node.id.in_(node_ids))):
                self._index(NodeRecord.from_node(node))
                pools.add(node.node_pool)
            for gone in node_ids - self.nodes.keys():  # removed: its allocation ended too
                self._forget_request(gone)
        if node_ids & self.nodes.keys() != present:  # a node was added or removed
            self._sorted_ids = None
        return pools

    def clear(self) -> None:
        """Forget every node and every pending write (the pool was emptied)."""
        self.nodes.clear()
        self._sorted_ids = None
        self.ready.clear()
        self._ready_heap.clear()
        self.owned.clear()
        self.capacity_of.clear()
        self.leases.clear()
        self.request_of.clear()
        self.granted.clear()
        self.shrunk.clear()
        self.held_by_user.clear()
        self.quota_freed.clear()
        self._lease_heap.clear()
        self._reset_pending()

    # --- the rules -------------------------------------------------------------

    def capacity(self, node_pool: str, wants: Constraints = ANY) -> int:
        """Nodes of the pool outside maintenance that meet `wants`: the most one
        request could ever get. Without constraints a counter; with them a scan."""
        if wants.any:
            return self.capacity_of.get(node_pool, 0)
        return sum(1 for r in self.nodes.values() if r.node_pool == node_pool
                   and r.state != State.MAINTENANCE.value and wants.matches(r))

    def usable(self, node_pool: str, wants: Constraints) -> set[int]:
        """The ready nodes of the pool that meet `wants`."""
        ready = self.ready.get(node_pool, set())
        return set(ready) if wants.any else {i for i in ready if wants.matches(self.nodes[i])}

    def allocate(self, owner: str, count: int, node_pool: str, request_id: str | None,
                 now: datetime, lease_until: datetime, user: str | None = None,
                 wants: Constraints = ANY, skip: Set[int] = frozenset()) -> list[NodeRecord]:
        """All or nothing, lowest ids first, only nodes meeting `wants` and not in `skip`
        (nodes an earlier waiter could use); each node leased until lease_until. The
        records themselves, not copies: render the reply before the pool changes again."""
        ready = self.ready.get(node_pool, set())
        if wants.any and not skip:
            available = len(ready)
        else:
            candidates = sorted(i for i in ready if i not in skip and wants.matches(self.nodes[i]))
            available = len(candidates)
        if available < count:
            total = self.capacity(node_pool, wants)
            if count > total:
                raise pool.pool_too_small(node_pool, total, count, wants.describe())
            raise pool.not_enough_nodes(node_pool, available, count)
        if wants.any and not skip:
            heap = self._ready_heap[node_pool]
            taken: list[int] = []
            while len(taken) < count:
                node_id = heapq.heappop(heap)
                if node_id in ready:
                    ready.discard(node_id)
                    taken.append(node_id)
        else:  # the heap keeps these ids: the fast path skips what is not ready any more
            taken = candidates[:count]
            ready.difference_update(taken)
        stamp = now.isoformat(timespec="seconds")
        for node_id in taken:
            record = self.nodes[node_id]
            after = next_state(record, Event.ALLOCATE)  # taken from the ready: allocated
            assert after is not None
            record.state = after.value
            record.owner = owner
            record.allocated_at = stamp
            record.holder_user = user
            self.held_by_user[user] += 1
            self.owned[owner].add(node_id)
            self._held_by(node_id, request_id)
            self._set_lease(node_id, lease_until)
            self._node_writes[node_id] = (after, owner, now)
            self._opened[node_id] = {"node_id": node_id, "node_name": record.name,
                                     "owner": owner, "user": user, "request_id": request_id,
                                     "started_at": now, "ended_at": None, "end_reason": None}
        return [self.nodes[i] for i in taken]

    def holder_of(self, owner: str) -> str | None:
        """The broker user the owner name is bound to while it holds nodes (None: unbound)."""
        held = self.owned.get(owner)
        return self.nodes[next(iter(held))].holder_user if held else None

    def release_owner(self, owner: str, reason: EndReason,
                      now: datetime) -> list[NodeRecord]:
        """Every node of owner back (ready, or dirty); OwnerNotFound if it holds none."""
        held = self.owned.get(owner)
        if not held:
            raise errors.OwnerNotFound(f"No nodes are owned by {owner}")
        return self._release(sorted(held), reason, now)

    def release_request(self, request_id: str, reason: EndReason,
                        now: datetime) -> list[NodeRecord]:
        """The nodes one request was granted and still holds, back to ready (maybe none)."""
        return self._release(sorted(self.granted.get(request_id, ())), reason, now)

    def renew(self, owner: str, lease_until: datetime) -> list[NodeRecord]:
        """Every node of owner leased until lease_until; OwnerNotFound if it holds none."""
        held = self.owned.get(owner)
        if not held:
            raise errors.OwnerNotFound(f"No nodes are owned by {owner}")
        for node_id in held:
            next_state(self.nodes[node_id], Event.RENEW)  # allocated stays allocated
        for node_id in sorted(held):
            self._set_lease(node_id, lease_until)
            if node_id not in self._node_writes:  # allocated in an earlier batch
                self._lease_writes[node_id] = lease_until
        return [self.nodes[i] for i in sorted(held)]

    def expire(self, now: datetime) -> dict[str | None, list[NodeRecord]]:
        """Take back every node whose lease has ended (history: expired), by former owner."""
        expired: dict[str | None, set[int]] = defaultdict(set)  # a refresh may push a lease twice
        heap = self._lease_heap
        while heap and heap[0][0] <= now:
            until, node_id = heapq.heappop(heap)
            if self.leases.get(node_id) == until:  # else renewed or released since
                expired[self.nodes[node_id].owner].add(node_id)
        return {owner: self._release(sorted(ids), EndReason.EXPIRED, now)
                for owner, ids in expired.items()}

    def _set_lease(self, node_id: int, until: datetime) -> None:
        self.leases[node_id] = until
        self.nodes[node_id].lease_expires_at = until.isoformat(timespec="seconds")
        heapq.heappush(self._lease_heap, (until, node_id))

    def _release(self, node_ids: list[int], reason: EndReason,
                 now: datetime) -> list[NodeRecord]:
        event = ENDED_BY[reason]
        # All decided before any is changed: a refused node leaves memory as it was.
        # A dirty node still counts in capacity: waiters wait for its cleaning.
        afters = [next_state(self.nodes[i], event, self.clean_released) for i in node_ids]
        released = []
        for node_id, after in zip(node_ids, afters):
            assert after is not None
            record = self.nodes[node_id]
            owner = record.owner
            if owner is not None:  # always, for an allocated node
                self.owned[owner].discard(node_id)
                if not self.owned[owner]:
                    del self.owned[owner]
            self.leases.pop(node_id, None)
            self._forget_request(node_id)
            self._lease_writes.pop(node_id, None)
            self.held_by_user[record.holder_user] -= 1
            self.quota_freed.add(record.holder_user)
            record.state = after.value
            record.owner = record.allocated_at = record.lease_expires_at = None
            record.holder_user = None
            _drop_claim(record)
            if after == State.READY:
                self._make_ready(node_id)
            elif after == State.MAINTENANCE:
                self.capacity_of[record.node_pool] -= 1
                self.shrunk.add(record.node_pool)
            self._node_writes[node_id] = (after, None, None)
            opened = self._opened.pop(node_id, None)
            if opened is not None:  # opened in this same batch: insert it closed
                self._closed_in_batch.append({**opened, "ended_at": now, "end_reason": reason})
            else:
                self._to_close[reason].add(node_id)
            released.append(record)
        return released

    # --- maintenance and cleaning: one node, named by its admin or its cleaner ---------

    def find(self, ref: str | int) -> NodeRecord:
        """A node by id (digits) or by name (a walk: these operations are rare); 404."""
        text = str(ref)
        record = (self.nodes.get(int(text)) if text.isdigit()
                  else next((r for r in self.nodes.values() if r.name == text), None))
        if record is None:
            raise pool.no_such_node(text)
        return record

    def set_maintenance(self, ref: str | int, on: bool, reason: str | None, now: datetime,
                        force: bool = False) -> NodeRecord:
        """Take a node out of service (with a reason) or put it back, as pool.set_maintenance
        says: an allocated node keeps its job and goes at its release; a node a cleaner is
        cleaning goes back to ready only when forced (its claim is dropped)."""
        record = self.find(ref)
        event = Event.MAINTENANCE_ON if on else Event.MAINTENANCE_OFF
        kept = pool.maintenance_reason_on(reason, record.maintenance_reason) if on else None
        after = next_state(record, event)
        assert after is not None
        if after != record.state and refused_mid_cleaning(record.state, event):
            pool.refuse_mid_cleaning(record, now, force, event.value)
            _drop_claim(record)
        record.maintenance_reason = kept
        self._restate(record, after)
        return record

    def claim_dirty(self, cleaner: str, now: datetime,
                    claim_seconds: float) -> NodeRecord | None:
        """The lowest-id dirty node nobody holds a live claim on, claimed for cleaner (None:
        none). A walk in id order: cleaners ask every few seconds, not per allocation."""
        stamp = now.isoformat(timespec="seconds")
        record = next((self.nodes[i] for i in self.sorted_ids()
                       if cleaning.claimable(self.nodes[i], stamp)), None)
        if record is None:
            return None
        after = next_state(record, Event.CLEAN_CLAIM)
        assert after is not None
        record.clean_claim = cleaning.new_claim(cleaner)
        record.clean_claimed_until = cleaning.claim_until(now, claim_seconds).isoformat()
        self._restate(record, after)
        return record

    def finish_cleaning(self, node_id: int, claim: str, ok: bool,
                        detail: str | None) -> NodeRecord:
        """A cleaner's report: ready if ok, else maintenance with detail as the reason.
        Accepted while the token is still the node's claim, even past the claim's time
        (nobody took it over); refused with 409 otherwise, changing nothing."""
        record = self.nodes.get(node_id)
        after = cleaning.checked_report(record, node_id, claim, "clean_done",
                                        Event.CLEAN_DONE_OK if ok else Event.CLEAN_DONE_FAILED)
        assert record is not None
        _drop_claim(record)
        record.maintenance_reason = cleaning.failure_reason(ok, detail)
        self._restate(record, after)
        return record

    def abandon_claim(self, node_id: int, claim: str) -> NodeRecord:
        """A cleaner gives its claim back unfinished: the node stays dirty, for the next one."""
        record = self.nodes.get(node_id)
        after = cleaning.checked_report(record, node_id, claim, "clean_abandon",
                                        Event.CLEAN_ABANDON)
        assert record is not None
        _drop_claim(record)
        self._restate(record, after)
        return record

    def requeue(self, ref: str | int) -> NodeRecord:
        """A ready or maintenance node (by name or id) back to dirty, to be cleaned again."""
        record = self.find(ref)
        after = next_state(record, Event.CLEAN)
        assert after is not None
        if after != record.state:
            record.maintenance_reason = None
            _drop_claim(record)
            self._restate(record, after)
        return record

    def _restate(self, record: NodeRecord, after: State) -> None:
        """record is in state after now (never to or from allocated: those are allocate's and
        _release's): the ready and capacity indexes follow, and the next flush writes
        its state, maintenance reason and claim from the record."""
        node_id, node_pool = record.id, record.node_pool
        before, record.state = record.state, after.value
        if before != after:
            if before == State.READY:
                self.ready[node_pool].discard(node_id)  # the heap's entry goes stale
            elif after == State.READY:
                self._make_ready(node_id)
            if after == State.MAINTENANCE:
                self.capacity_of[node_pool] -= 1
                self.shrunk.add(node_pool)
            elif before == State.MAINTENANCE:
                self.capacity_of[node_pool] += 1
        self._record_writes.add(node_id)

    # --- writing ----------------------------------------------------------------

    def flush(self, session: Session | None, now: datetime, write=None) -> None:
        """Write what changed since the last flush: a few statements for any number of changes.

        Plain driver SQL: this runs once per batch on the hot path, where building
        SQLAlchemy statements cost more than the database round trips. write(sql,
        params) runs each statement (the worker's Batch.defer keeps them for its
        COMMIT); by default they run at once on the session's connection. The ORM
        objects the session holds are expired: the statements changed their rows.
        """
        if not (self._node_writes or self._to_close or self._lease_writes
                or self._record_writes):
            return
        if write is None:
            assert session is not None, "flush needs a session or a write"
            write = session.connection().exec_driver_sql
        sql = write
        for reason, node_ids in self._to_close.items():
            if node_ids:
                sql(f"UPDATE allocations SET ended_at = %s, end_reason = %s "
                    f"WHERE node_id IN ({placeholders(node_ids)}) AND ended_at IS NULL",
                    (now, reason.value, *node_ids))
        rows = [(r["node_id"], r["node_name"], r["owner"], r["user"], r["request_id"],
                 r["started_at"], r["ended_at"], r["end_reason"] and r["end_reason"].value)
                # Closed first: a node taken, released and taken again in this batch
                # must show its holders in order (ids break the tie of equal times).
                for r in [*self._closed_in_batch, *self._opened.values()]]
        if rows:
            rows_sql, params = values(rows)
            sql("INSERT INTO allocations (node_id, node_name, owner, user, request_id, "
                f"started_at, ended_at, end_reason) VALUES {rows_sql}", params)
        for after in (State.READY, State.DIRTY, State.MAINTENANCE):
            freed = [i for i, (state, _, _) in self._node_writes.items() if state == after]
            if freed:
                sql(f"UPDATE nodes SET state = '{after.value}', owner = NULL, "
                    f"holder_user = NULL, allocated_at = NULL, lease_expires_at = NULL, "
                    f"clean_claim = NULL, clean_claimed_until = NULL "
                    f"WHERE id IN ({placeholders(freed)})", tuple(freed))
        taken = [(i, owner, self.nodes[i].holder_user, at, self.leases[i])
                 for i, (state, owner, at) in self._node_writes.items()
                 if state == State.ALLOCATED]
        if taken:
            # One UPDATE for every node taken: CASE picks each node's values.
            cases = " ".join("WHEN %s THEN %s" for _ in taken)
            columns = ("owner", "holder_user", "allocated_at", "lease_expires_at")
            sql("UPDATE nodes SET state = 'allocated', "
                + ", ".join(f"{c} = CASE id {cases} END" for c in columns)
                + f" WHERE id IN ({placeholders(taken)})",
                (*[v for k in range(1, 5) for row in taken for v in (row[0], row[k])],
                 *[row[0] for row in taken]))
        if self._lease_writes:
            renewed = list(self._lease_writes.items())
            cases = " ".join("WHEN %s THEN %s" for _ in renewed)
            sql(f"UPDATE nodes SET lease_expires_at = CASE id {cases} END "
                f"WHERE id IN ({placeholders(renewed)})",
                (*[v for pair in renewed for v in pair], *[i for i, _ in renewed]))
        # Last: the records hold what the rows must end with, whatever the UPDATEs above
        # wrote for allocations and releases in this batch. A node removed since has no row.
        records = [self.nodes[i] for i in sorted(self._record_writes) if i in self.nodes]
        if records:
            cases = " ".join("WHEN %s THEN %s" for _ in records)
            columns = ("state", "maintenance_reason", "clean_claim", "clean_claimed_until")
            sql("UPDATE nodes SET " + ", ".join(f"{c} = CASE id {cases} END" for c in columns)
                + f" WHERE id IN ({placeholders(records)})",
                (*[v for r in records for v in (r.id, r.state)],
                 *[v for r in records for v in (r.id, r.maintenance_reason)],
                 *[v for r in records for v in (r.id, r.clean_claim)],
                 *[v for r in records for v in (r.id, _time(r.clean_claimed_until))],
                 *[r.id for r in records]))
        if session is not None:
            session.expire_all()  # ORM objects loaded earlier in the batch are now stale
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._node_writes: dict[int, tuple] = {}
        self._opened: dict[int, dict] = {}
        self._closed_in_batch: list[dict] = []
        self._to_close: dict[EndReason, set[int]] = defaultdict(set)
        self._lease_writes: dict[int, datetime] = {}  # renewals of nodes not otherwise written
        # Nodes whose state, maintenance reason or claim an admin or a cleaner changed.
        self._record_writes: set[int] = set()

    # --- indexes ----------------------------------------------------------------

    def sorted_ids(self) -> list[int]:
        """Every node's id, in order (kept until load or refresh adds or removes one)."""
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self.nodes)
        return self._sorted_ids

    def _index(self, record: NodeRecord) -> None:
        node_id = record.id
        self.nodes[node_id] = record
        if record.state == State.READY.value:
            self._make_ready(node_id)
        if record.state != State.MAINTENANCE.value:
            self.capacity_of[record.node_pool] += 1
        if record.owner is not None:
            self.owned[record.owner].add(node_id)
            self.held_by_user[record.holder_user] += 1
        if record.lease_expires_at is not None and record.state == State.ALLOCATED.value:
            until = datetime.fromisoformat(record.lease_expires_at)
            self.leases[node_id] = until
            heapq.heappush(self._lease_heap, (until, node_id))

    def _unindex(self, node_id: int) -> NodeRecord | None:
        record = self.nodes.pop(node_id, None)
        if record is None:
            return None
        self.ready.get(record.node_pool, set()).discard(node_id)
        if record.state != State.MAINTENANCE.value:
            self.capacity_of[record.node_pool] -= 1
        owner = record.owner
        if owner is not None and owner in self.owned:
            self.held_by_user[record.holder_user] -= 1
            self.quota_freed.add(record.holder_user)
            self.owned[owner].discard(node_id)
            if not self.owned[owner]:
                del self.owned[owner]
        self.leases.pop(node_id, None)
        return record

    def _forget_request(self, node_id: int) -> None:
        request_id = self.request_of.pop(node_id, None)
        if request_id in self.granted:
            self.granted[request_id].discard(node_id)
            if not self.granted[request_id]:
                del self.granted[request_id]

    def _held_by(self, node_id: int, request_id: str | None) -> None:
        self.request_of[node_id] = request_id
        if request_id is not None:
            self.granted[request_id].add(node_id)

    def _make_ready(self, node_id: int) -> None:
        node_pool = self.nodes[node_id].node_pool
        if node_id not in self.ready[node_pool]:
            self.ready[node_pool].add(node_id)
            heapq.heappush(self._ready_heap[node_pool], node_id)


def _drop_claim(record: NodeRecord) -> None:
    record.clean_claim = record.clean_claimed_until = None


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
