"""The database side of the worker: one transaction per batch, fenced by an epoch.

The keeper owns what the active worker decides with (PoolState, Waiters),
checks on every transaction that its epoch is still the newest (workers/fence.py: read
first, or in the batch's write trip), and handles
each request of a batch: replay a stored reply, dispatch it, store its reply.
After every request, tick or undone grant it serves the waiters of each pool
that may have changed, so nodes never sit ready while a waiter they fit waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Connection, event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from molteniron import compat, db, errors, pool, protocol
from molteniron.config import Config, url_list
from molteniron.models import EndReason, Node
from molteniron.workers import authz, fence, metrics
from molteniron.workers.authz import Authorizer
from molteniron.workers.batch import Batch, Stored, placeholders
from molteniron.workers.cleaning import CleaningPolicy, replayed_claim
from molteniron.workers.clock import DatabaseClock
from molteniron.workers.dispatch import HANDLERS, IN_MEMORY, Context
from molteniron.workers.grants import UNDO
from molteniron.workers.leases import LeasePolicy
from molteniron.workers.limits import UserLimits
from molteniron.workers.quotas import Quotas
from molteniron.workers.state import PoolState
from molteniron.workers.waiters import Waiters, client_gone_reply

log = logging.getLogger(__name__)

PRUNE_EVERY = 5.0            # seconds between prunes of stored replies and history
PRUNE_CHUNK = 10_000         # rows deleted per table per prune, so a prune never stalls a batch
HEARTBEAT_EVERY = 5.0        # seconds between a worker's heartbeat rows (active and standby)
# After the fence in a write trip tripped, batches read the fence first for this long:
# a client that keeps sending answered requests again costs a reload of the pool at
# most this often, not one per copy.
CAREFUL_AFTER_TRIP = 10.0


class PoolKeeper:
    def __init__(self, config: Config, worker_id: str):
        self.config = config
        self.worker_id = worker_id
        self.databases = url_list(config.db_url)  # Galera nodes, say: tried in order
        self.database = 0  # index of the one in use
        # Whether the fence's trip form trips on this engine (fence.check_signal): None
        # until checked, False if the check failed after start (the read form only).
        self.fence_trips: bool | None = None
        self.engine = self._engine()
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Nodes changed through the ORM reach memory by themselves (no handler has to say so).
        event.listen(self.sessions, "before_flush", _send_writes_first)
        event.listen(self.sessions, "after_flush", _collect_changed_nodes)
        event.listen(self.sessions, "do_orm_execute", _notice_bulk_node_changes)
        self.leases = LeasePolicy(config.lease_seconds, config.max_lease_seconds)
        self.authz = Authorizer(config.admins)
        self.limits = UserLimits(config.max_priority, config.max_waiting_per_user,
                                 config.max_wait_seconds)
        self.cleaning = CleaningPolicy(config.cleaning_command is not None,
                                       config.cleaning_timeout)
        self.state = PoolState(clean_released=self.cleaning.enabled)
        self.waiters = Waiters(self.leases, config.priority_aging, Quotas(config.quotas))
        self.epoch: int | None = None   # None while standing by
        self.reload_needed = False       # in-memory state may differ from the database
        self.clock = DatabaseClock(worker_id)  # the time every decision is made by
        self.last_prune = 0.0            # time.monotonic() of the last prune
        self.last_heartbeat = 0.0
        self.careful_until = 0.0  # time.monotonic() until which batches read the fence first
        self.connection: Connection | None = None  # kept from batch to batch (_transaction)

    def stand_by(self) -> None:
        """A new consumer: the next delivery, if any, makes this worker take over."""
        self.epoch = None
        self._drop_connection()  # a standby may idle for longer than the server keeps it

    def heartbeat_due(self) -> bool:
        return time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY

    def _engine(self):
        engine = db.make_engine(self.databases[self.database], pre_ping=False,
                                joined_statements=True, pool_reset_on_return=None)
        event.listen(engine.pool, "reset", db.rollback_if_in_transaction)
        event.listen(engine, "connect", db.causal_reads)
        event.listen(engine, "connect", fence.strict_writes)
        return engine

    def refuse_broken_fence(self) -> None:
        """At the worker's start: FenceSignalBroken if the fence's trip form would not trip
        on this database and driver (fence.check_signal). A database that cannot be asked
        now is asked again before the first batch."""
        try:
            self._check_fence()
        except (SQLAlchemyError, LookupError) as exc:
            log.warning("event=fence_unchecked worker=%s reason=%r", self.worker_id,
                        str(exc).splitlines()[0][:200])

    def _check_fence(self) -> None:
        fence.check_signal(self.engine)
        self.fence_trips = True
        log.info("event=fence_checked worker=%s", self.worker_id)

    def use_next_database(self, why: BaseException) -> bool:
        """The server in use cannot serve (db.node_unusable): move to the next of
        db_url's servers. False when there is no other one to move to."""
        if len(self.databases) < 2:
            return False
        self._drop_connection()
        self.engine.dispose()
        self.database = (self.database + 1) % len(self.databases)
        self.engine = self._engine()
        self.fence_trips = None  # another server: checked again before the next batch
        self.sessions.configure(bind=self.engine)
        self.reload_needed = True  # what the other server holds is the truth now
        log.warning("event=database_switched worker=%s to=%s reason=%r", self.worker_id,
                    self.engine.url.render_as_string(hide_password=True),
                    str(why).splitlines()[0][:200])
        return True

    def database_answers(self) -> bool:
        """The server serves this worker's tables and accepts writes to them; changes nothing.

        A read alone says too little: a Galera node outside the primary component answers
        SELECT 1 but refuses any read of a table (1047), and a read-only server answers
        every read but refuses every write (1290). So the probe also updates this
        worker's heartbeat row to its own value, in a transaction it rolls back: read_only
        refuses the statement before it looks at a row (even when no row matches), and
        the row is one no other worker writes, so the probe waits on nobody's lock. A
        full disk passes (nothing grows): the batch's own retry finds that out."""
        try:
            with self.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    conn.exec_driver_sql("SELECT epoch FROM worker_meta WHERE id = 1")
                    conn.exec_driver_sql(
                        "UPDATE worker_heartbeats SET seen_at = seen_at WHERE worker_id = %s",
                        (self.worker_id,))
                finally:
                    transaction.rollback()
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    "DELETE FROM worker_heartbeats WHERE worker_id = %s", (self.worker_id,))
        except SQLAlchemyError:
            pass  # the row ages out: `workers` shows only recent heartbeats
        self._drop_connection()
        self.engine.dispose()

    def commit(self, requests, returned, settled: dict[str, str] | None = None) -> Batch:
        """Handle a batch in one transaction; the batch holds the replies to send after it.

        returned: interim replies that came back (their waiter's client is gone);
        settled: grant outcomes from the broker (workers/grants.py) to write down.
        """
        settled = settled or {}
        if self.fence_trips is None:
            try:
                self._check_fence()  # a database error holds the batch, as the batch's would
            except errors.FenceSignalBroken as exc:
                self.fence_trips = False
                log.error("event=fence_broken worker=%s fence=read_every_batch detail=%r",
                          self.worker_id, exc.message)
        undo = [rid for rid, outcome in settled.items() if outcome == UNDO]
        if undo and self.epoch is not None:
            self._mark_returned(undo)
        if self._may_fence_in_trip(requests, returned):
            try:
                return self._commit(requests, returned, settled, fence_in_trip=True)
            except DBAPIError as exc:
                if not fence.tripped(exc):
                    raise
            # Memory took the batch for new: it goes back to what the database holds,
            # and the batch runs again, fenced by a read that says why it tripped.
            self.reload_needed = True
            self.careful_until = time.monotonic() + CAREFUL_AFTER_TRIP
            log.info("event=fence_tripped worker=%s requests=%d undone=all", self.worker_id,
                     len(requests))
        return self._commit(requests, returned, settled, fence_in_trip=False)

    def _may_fence_in_trip(self, requests, returned) -> bool:
        """The batch may skip the fence's read and check it in its write trip
        (workers/fence.py): the trip form is known to trip on this engine, the worker
        holds the pool with a memory that matches the database, every operation works on
        that memory, and no request may have been answered before (redelivered by the
        broker, or a copy its client sent again). Should one have been, the fence trips.
        Not on Galera: its wsrep_sync_wait makes reads wait for the cluster, not writes.
        (A worker that holds the pool keeps its connection: a failure that dropped it
        also asked for a reload.) Nor when the database's time was last read too long
        ago: the read brings it (workers/clock.py)."""
        return (self.fence_trips is True and self.epoch is not None
                and not self.reload_needed and not returned
                and self.connection is not None and not db.on_galera(self.connection)
                and time.monotonic() >= self.careful_until and self.clock.fresh()
                and all(request.op in IN_MEMORY and not _maybe_answered(method, properties)
                        for method, properties, request in requests))

    def _commit(self, requests, returned, settled: dict[str, str],
                fence_in_trip: bool) -> Batch:
        with self._transaction() as batch:
            request_ids = [r.id for _, _, r in requests]
            if fence_in_trip:
                batch.at(self.clock.now())  # no read: the last one, moved on by monotonic time
                fence.first_write(batch, self.epoch, request_ids)
                taking, stored = None, {}
            else:
                taking, stored = self._fence(batch, request_ids)
            if taking is not None:  # not those this batch settles: their rows go now
                batch.adopted_grants = [grant for grant in self._adopt_grants(batch)
                                        if grant[0] not in settled]
            self._settle_grants(batch, settled)
            for reply_to, reply in returned:
                self._undo_returned(batch, reply_to, reply)
            ticked = False
            for _, properties, request in requests:
                if request.op == "tick":
                    ticked = True
                    continue
                reply, outcome = self._handle_one(batch, request, properties, stored)
                # A replayed grant may have reached its client the first time: if
                # this copy comes back, that says nothing about the client. Nor does a
                # refusal of a request id another user sent.
                batch.reply(properties.reply_to, properties.correlation_id, request.id, reply,
                            mandatory=outcome not in ("replayed", "refused"),
                            grant=outcome == "handled" and _is_grant(request.op, reply))
            if ticked:
                self._on_tick(batch)
            self._serve_waiters(batch)
            self.state.flush(batch.orm_session, batch.now, batch.write)
            batch.write_stored()
            batch.commit()  # its writes and the COMMIT: one round trip
        if taking is not None:
            self.epoch = taking
            self.last_heartbeat = 0.0  # say at the next tick that this worker is active now
            log.info("event=active worker=%s epoch=%d waiting=%d",
                     self.worker_id, taking, len(self.waiters))
        return batch

    @contextmanager
    def _transaction(self) -> Iterator[Batch]:
        """A transaction, as a Batch, on the connection batches keep between them (a pool
        checkout and return were a tenth of a one-request batch's CPU). An ORM
        session one of its operations made is closed before the transaction ends; on a
        failure, quietly, and the connection goes back to the pool (a rollback, or
        discarded if it died): the next batch takes a fresh one."""
        if self.connection is None:
            self.connection = self.engine.connect()
        conn = self.connection
        try:
            with conn.begin():
                batch = Batch(conn, self.sessions)
                try:
                    yield batch
                except BaseException:
                    batch.close_session(failed=True)
                    raise
                batch.close_session()
        except BaseException:
            self._drop_connection()
            raise

    def _drop_connection(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            try:
                connection.close()
            except SQLAlchemyError:
                pass  # a dead connection: the pool discards it

    def _fence(self, batch: Batch, request_ids: list[str]) -> tuple[int | None, dict]:
        """Check the epoch is ours; on the first batch after standing by, take a new one.
        Returns (the epoch taken or None, the replies stored for request_ids): one round
        trip for both, which also gives the batch its time (the database's)."""
        wall_before = time.time()  # for the skew only: nothing decides by this host's clock
        epoch, database_now, stored = fence.read(batch.connection, request_ids)
        batch.at(self.clock.read(database_now, wall_before))
        if self.epoch is None:
            fence.take(batch.connection, epoch + 1, self.worker_id, batch.now)
            self._load(batch.session)
            return epoch + 1, stored
        if epoch != self.epoch:
            log.error("event=fenced worker=%s my_epoch=%d db_epoch=%d",
                      self.worker_id, self.epoch, epoch)
            raise errors.NotActiveWorker(f"worker epoch {self.epoch} superseded by {epoch}")
        if self.reload_needed:
            self._load(batch.session)
            self.reload_needed = False
        return None, stored

    def _load(self, session: Session) -> None:
        self.state.load(session)
        self.waiters.load(session)

    def _handle_one(self, batch: Batch, request: protocol.Request, properties,
                    stored: dict[str, Stored]) -> tuple[dict, str]:
        started = time.perf_counter()
        previous = batch.stored(request.id, stored)
        waiter = self.waiters.by_request.get(request.id)
        if previous is not None and previous.reply.get("client_gone") not in (
                None, properties.reply_to) and previous.user == request.user:
            # Undone because its reply bounced from that queue. A copy with another reply
            # queue was sent again by a client that moved to another broker and listens
            # there: serve it afresh. (A redelivered copy to the dead queue stays refused.)
            previous = None
            batch.withdrawn_grants.discard(request.id)
        original_user = (previous.user if previous is not None
                         else waiter.user if waiter is not None else request.user)
        try:
            self.authz.require_user(request)
            if not self.authz.may_use_request_id(request.user, original_user):
                raise authz.foreign_request_id(request)
        except errors.MoltenIronError as exc:
            reply, outcome = exc.to_reply(), "refused"
        else:
            if previous is not None:
                reply, outcome = self._replayed(request, previous.reply), "replayed"
                if request.id in self.state.granted:
                    batch.regranted.add(request.id)
            elif waiter is not None:  # redelivered, or sent again, while it waits
                self.waiters.redirect(batch, request.id, properties.reply_to,
                                      properties.correlation_id)
                reply, outcome = self.waiters.queued_reply(request.id), "still_waiting"
            else:
                reply, outcome = self._dispatch(batch, request, properties), "handled"
                self._serve_waiters(batch)
        if (outcome == "handled" and protocol.OPERATIONS[request.op].mutates
                and reply["status"] != protocol.QUEUED):
            batch.store(request.id, request.op, reply, request.user)
        seconds = time.perf_counter() - started
        metrics.request_handled(batch, request.op, reply["status"], seconds)
        log.info("op=%s id=%s user=%s owner=%s status=%s outcome=%s ms=%.2f", request.op,
                 request.id, request.user or "-", request.args.get("owner") or "-",
                 reply["status"], outcome, seconds * 1000)
        return reply, outcome

    def _replayed(self, request: protocol.Request, stored: dict) -> dict:
        """A stored reply holds no password: a grant still held is rendered again, in full."""
        held = self.state.granted.get(request.id)
        if request.op == "allocate" and stored.get("status") == 200 and held:
            return compat.nodes_reply([self.state.nodes[i] for i in sorted(held)])
        if request.op == "clean_claim" and stored.get("claim"):
            return replayed_claim(self.state, stored)
        return stored

    def _holder_of_owner(self, owner: str) -> str | None:
        return self.state.holder_of(owner) or self.waiters.holder_of(owner)

    def _holder_of_request(self, request_id: str) -> str | None:
        """The broker user of a waiting or granted request (None: neither)."""
        waiter = self.waiters.by_request.get(request_id)
        if waiter is not None:
            return waiter.user
        held = self.state.granted.get(request_id)
        return self.state.nodes[next(iter(held))]["holder_user"] if held else None

    def _sender_of_request(self, batch: Batch, request_id: str) -> str | None:
        """The broker user who sent a request, as far as the pool knows (a read: cancel)."""
        holder = self._holder_of_request(request_id)
        if holder is not None:
            return holder
        stored = batch.look_up_stored(request_id)
        return None if stored is None else stored.user

    def _dispatch(self, batch: Batch, request: protocol.Request, properties) -> dict:
        try:
            self.authz.check(request, self._holder_of_owner,
                             lambda request_id: self._sender_of_request(batch, request_id))
        except errors.MoltenIronError as exc:
            return exc.to_reply()
        context = Context(batch, self.state, self.waiters, self.leases, properties.reply_to,
                          properties.correlation_id, self.cleaning, self.authz, self.limits)
        handler = HANDLERS[request.op]
        if request.op in IN_MEMORY:  # these check before they change: no savepoint needed
            try:
                return handler(context, request)
            except errors.MoltenIronError as exc:
                return exc.to_reply()
        # The ORM must see this batch's changes.
        self.state.flush(batch.orm_session, batch.now, batch.write)
        batch.send_writes()
        mark = batch.mark()
        changes = self.waiters.changes
        savepoint = batch.session.begin_nested()
        memory_touched = False  # handlers check before changing; the refresh changes memory
        try:
            reply = handler(context, request)
            batch.send_writes()
            batch.session.flush()  # so that _collect_changed_nodes sees every change
            memory_touched = True
            self._absorb_orm_changes(batch)
            savepoint.commit()
            return reply
        except errors.MoltenIronError as exc:
            failure = exc.to_reply()
        except DBAPIError as exc:
            if exc.connection_invalidated or db.lock_conflict(exc) or db.node_unusable(exc):
                raise  # not this request's fault: the whole batch is retried
            log.exception("event=internal_error op=%s id=%s", request.op, request.id)
            failure = errors.InternalError.for_request(request.id).to_reply()
        savepoint.rollback()
        batch.rollback_to(mark)
        if memory_touched:
            # Flushed just before the savepoint: the database now holds what memory should.
            self.state.load(batch.session)
        if self.waiters.changes != changes:
            self.waiters.load(batch.session)
        return failure

    def _adopt_grants(self, batch: Batch) -> list[tuple]:
        """The outbox as found at takeover, each grant rendered again from the pool (the
        row holds no password); a grant whose nodes went back meanwhile is dropped."""
        adopted = []
        for request_id, reply_to, correlation_id, returned in load_grant_outbox(batch.connection):
            held = self.state.granted.get(request_id)
            if not held:
                batch.withdraw_grant(request_id)
                continue
            body = protocol.reply_body(request_id, compat.nodes_reply(
                [self.state.nodes[i] for i in sorted(held)]))
            adopted.append((request_id, reply_to, correlation_id, body, returned))
        return adopted

    def _absorb_orm_changes(self, batch: Batch) -> None:
        """Bring nodes changed through the ORM into memory; their pools may serve waiters."""
        if batch.reload_pool:
            self.state.load(batch.session)
            changed = set(self.waiters.by_pool)
            batch.reload_pool = False
        else:
            changed = self.state.refresh(batch.session, batch.touched_nodes)
        batch.touched_nodes.clear()
        for node_pool in changed:  # a pool that shrank may never serve some waiters now
            self.waiters.refuse_impossible(batch, self.state, node_pool)
        batch.touched_pools.update(changed)

    def _serve_waiters(self, batch: Batch) -> None:
        while self.state.shrunk:  # a node went into maintenance at its release
            self.waiters.refuse_impossible(batch, self.state, self.state.shrunk.pop())
        while self.state.quota_freed:  # users below their quota again: their waiters may go
            batch.touched_pools.update(self.waiters.pools_of_user(self.state.quota_freed.pop()))
        while batch.touched_pools:
            node_pool = batch.touched_pools.pop()
            if self.waiters.has_waiting(node_pool):
                self.waiters.serve(batch, self.state, node_pool)

    def _undo_returned(self, batch: Batch, reply_to: str, reply: dict) -> None:
        """An interim reply came back: its reply queue is gone, and with it the client
        of every waiter that listens there."""
        if reply.get("status") != protocol.QUEUED:
            return
        cancelled = self.waiters.cancel_reply_queue(batch, reply_to, "its client went away")
        if cancelled:
            log.info("event=client_gone id=%s undone=waiting waiters=%d", reply["id"],
                     cancelled)
            self._serve_waiters(batch)

    def _mark_returned(self, request_ids: list[str]) -> None:
        """Write down, before undoing anything, that these grants never reached anyone."""
        with self._transaction() as batch:
            self._fence(batch, [])
            batch.connection.exec_driver_sql(
                f"UPDATE grant_outbox SET returned = 1 WHERE request_id IN "
                f"({placeholders(request_ids)})", tuple(request_ids))

    def _settle_grants(self, batch: Batch, settled: dict[str, str]) -> None:
        """Grants the broker confirmed or returned: out of the outbox; undone if returned."""
        if not settled:
            return
        settled_undo = [request_id for request_id, outcome in settled.items() if outcome == UNDO]
        rows = batch.connection.exec_driver_sql(
            f"SELECT request_id, reply_to, regranted FROM grant_outbox WHERE request_id IN "
            f"({placeholders(settled_undo)})", tuple(settled_undo)).all() if settled_undo else []
        bounced_from = {request_id: reply_to for request_id, reply_to, _ in rows}
        # Undone only while it is in the outbox and no copy was answered with it: this
        # worker may have learnt of the bounce, stood by, and meanwhile another worker
        # settled the grant or gave it to a copy's live client.
        undone = [request_id for request_id, _, regranted in rows if not regranted]
        for request_id in sorted(set(settled_undo) - set(undone)):
            log.info("event=undo_skipped id=%s reason=%s", request_id,
                     "answered again" if request_id in bounced_from else "settled elsewhere")
        for request_id in undone:
            user = self._holder_of_request(request_id)
            released = self.state.release_request(request_id, EndReason.CLIENT_GONE, batch.now)
            if released:
                batch.store(request_id, "allocate", client_gone_reply(
                    "its client went away before the reply reached it",
                    bounced_from.get(request_id)), user)
                batch.touched_pools.update(r["node_pool"] for r in released)
                metrics.grant_undone(batch)
            log.info("event=client_gone id=%s undone=allocation nodes=%d",
                     request_id, len(released))
        batch.write(f"DELETE FROM grant_outbox WHERE request_id IN ({placeholders(settled)})",
                    tuple(settled))
        self._serve_waiters(batch)

    def standby_heartbeat(self) -> None:
        """A standby gets no deliveries, so it says it is alive on its own (and reads the
        database's time, so that it knows its clock's skew before it takes over)."""
        self.last_heartbeat = time.monotonic()
        try:
            with self.engine.begin() as conn:
                wall_before = time.time()
                self.clock.read(conn.exec_driver_sql("SELECT UTC_TIMESTAMP(6)").scalar(),
                                wall_before)
                write_heartbeat(conn, self.worker_id, "standby", self.clock.skew)
        except SQLAlchemyError as exc:
            log.warning("event=heartbeat_failed worker=%s error=%r", self.worker_id,
                        str(exc).splitlines()[0][:200])
            if db.node_unusable(exc):
                self.use_next_database(exc)

    def _on_tick(self, batch: Batch) -> None:
        self.waiters.expire(batch, self.state)  # a wait its quota held says so
        for owner, records in self.state.expire(batch.now).items():
            batch.touched_pools.update(r["node_pool"] for r in records)
            log.info("event=lease_expired owner=%s nodes=%d", owner, len(records))
            metrics.lease_expired(batch, len(records))
        self._serve_waiters(batch)  # before probing: a waiter served now needs no reminder
        self.waiters.probe_reply_queues(batch)
        if time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY:
            self.last_heartbeat = time.monotonic()
            write_heartbeat(batch.connection, self.worker_id, "active", self.clock.skew)
        if time.monotonic() - self.last_prune >= PRUNE_EVERY:
            self.last_prune = time.monotonic()
            replies = pool.prune_processed(
                batch.session, batch.now - timedelta(seconds=self.config.reply_retention),
                PRUNE_CHUNK)
            history = pool.prune_history(
                batch.session, batch.now - timedelta(seconds=self.config.history_retention),
                PRUNE_CHUNK)
            if replies or history:
                log.info("event=pruned stored_replies=%d allocations=%d", replies, history)


def _maybe_answered(method, properties) -> bool:
    """Redelivered by the broker, or sent again by its client (protocol.COPY_HEADER).
    method is None for a request handed over without a broker (tests, bench)."""
    return bool((method is not None and method.redelivered)
                or (properties.headers or {}).get(protocol.COPY_HEADER))


def _is_grant(op: str, reply: dict) -> bool:
    return op == "allocate" and reply.get("status") == 200


def load_grant_outbox(connection: Connection) -> list[tuple]:
    """Grants committed but not known to have reached their client (oldest first)."""
    return [(rid, reply_to, corr, bool(returned)) for rid, reply_to, corr, returned
            in connection.exec_driver_sql(
                "SELECT request_id, reply_to, correlation_id, returned FROM grant_outbox "
                "ORDER BY created_at")]


def _send_writes_first(session: Session, flush_context, instances) -> None:
    """The batch's deferred writes go before anything the ORM writes, in the order the
    batch decided them (a row it deleted may be written again by the ORM)."""
    batch = session.info.get("batch")
    if batch is not None:
        batch.send_writes()


def _collect_changed_nodes(session: Session, flush_context) -> None:
    batch = session.info.get("batch")
    if batch is not None:
        batch.touched_nodes.update(obj.id for obj in (*session.new, *session.dirty,
                                                      *session.deleted)
                                   if isinstance(obj, Node))


def _notice_bulk_node_changes(orm_execute_state) -> None:
    batch = orm_execute_state.session.info.get("batch")
    mapper = orm_execute_state.bind_mapper
    if (batch is not None and mapper is not None and mapper.class_ is Node
            and (orm_execute_state.is_update or orm_execute_state.is_delete)):
        batch.reload_pool = True


def write_heartbeat(connection: Connection, worker_id: str, role: str,
                    clock_skew: float | None) -> None:
    """The worker is alive, as of the database's clock; clock_skew: its own wall clock's
    offset from the database's (workers/clock.py), shown by `molteniron workers`."""
    connection.exec_driver_sql(
        "INSERT INTO worker_heartbeats (worker_id, role, seen_at, clock_skew_s) "
        "VALUES (%s, %s, UTC_TIMESTAMP(6), %s) ON DUPLICATE KEY UPDATE role = VALUES(role), "
        "seen_at = VALUES(seen_at), clock_skew_s = VALUES(clock_skew_s)",
        (worker_id, role, clock_skew))
