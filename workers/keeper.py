"""The database side of the worker: one transaction per batch, fenced by an epoch.

The keeper owns what the active worker decides with (PoolState, Waiters) and does one
job: it commits a batch. It checks that its epoch is still the newest (workers/fence.py:
read first, or in the batch's write trip), handles each request of the batch (replay a
stored reply, redirect its waiter, or dispatch it and store its reply), and flushes
memory's changes with the stored replies in the batch's COMMIT. After every request,
tick or undone grant it serves the waiters of each pool that may have changed, so nodes
never sit ready while a waiter they fit waits.

Around that job, in modules of their own: the database servers and the move to the next
one (workers/database.py), the grant outbox (workers/grants.py), the heartbeat and the
pruning (workers/housekeeping.py), the handlers (workers/dispatch.py) and the savepoint
of those that go through the ORM (workers/savepoint.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from molteniron import compat, db, errors, protocol
from molteniron.config import Config
from molteniron.workers import authz, fence, grants, metrics, savepoint
from molteniron.workers.authz import Authorizer
from molteniron.workers.batch import Batch, Stored
from molteniron.workers.cleaning import CleaningPolicy, replayed_claim
from molteniron.workers.clock import DatabaseClock
from molteniron.workers.database import Servers
from molteniron.workers.dispatch import HANDLERS, NO_SAVEPOINT, Context
from molteniron.workers.housekeeping import Housekeeping
from molteniron.workers.leases import LeasePolicy
from molteniron.workers.limits import UserLimits
from molteniron.workers.quotas import Quotas
from molteniron.workers.state import PoolState
from molteniron.workers.waiters import Waiters

log = logging.getLogger(__name__)

# After the fence in a write trip tripped, batches read the fence first for this long:
# a client that keeps sending answered requests again costs a reload of the pool at
# most this often, not one per copy.
CAREFUL_AFTER_TRIP = 10.0


class PoolKeeper:
    def __init__(self, config: Config, worker_id: str):
        self.config = config
        self.worker_id = worker_id
        self.servers = Servers(config.db_url, worker_id)  # db_url's, tried in order
        # Whether the fence's trip form trips on this engine (fence.check_signal): None
        # until checked, False if the check failed after start (the read form only).
        self.fence_trips: bool | None = None
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        savepoint.install_hooks(self.sessions)
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
        self.housekeeping = Housekeeping(worker_id, config.reply_retention,
                                         config.history_retention)
        self.careful_until = 0.0  # time.monotonic() until which batches read the fence first
        self.connection: Connection | None = None  # kept from batch to batch (_transaction)

    def stand_by(self) -> None:
        """A new consumer: the next delivery, if any, makes this worker take over."""
        self.epoch = None
        self._drop_connection()  # a standby may idle for longer than the server keeps it

    @property
    def engine(self) -> Engine:
        """The engine of the database server in use."""
        return self.servers.engine

    def heartbeat_due(self) -> bool:
        """A standby's heartbeat is due (the worker asks between deliveries)."""
        return self.housekeeping.heartbeat_due()

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
        if len(self.servers.urls) < 2:
            return False
        self._drop_connection()
        self.servers.use_next(why)
        self.fence_trips = None  # another server: checked again before the next batch
        self.sessions.configure(bind=self.engine)
        self.reload_needed = True  # what the other server holds is the truth now
        return True

    def database_answers(self) -> bool:
        """The server in use serves this worker's tables and accepts writes to them
        (workers/database.py Servers.answers); changes nothing."""
        return self.servers.answers()

    def close(self) -> None:
        try:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    "DELETE FROM worker_heartbeats WHERE worker_id = %s", (self.worker_id,))
        except SQLAlchemyError:
            pass  # the row ages out: `workers` shows only recent heartbeats
        self._drop_connection()
        self.engine.dispose()

    def commit(self, requests, bounced, settled: dict[str, str] | None = None) -> Batch:
        """Handle a batch in one transaction; the batch holds the replies to send after it.

        bounced: (reply queue, interim reply) that the broker returned: the waiters'
        client is gone; settled: grant outcomes from the broker (workers/grants.py) to
        write down.
        """
        settled = settled or {}
        if self.fence_trips is None:
            try:
                self._check_fence()  # a database error holds the batch, as the batch's would
            except errors.FenceSignalBroken as exc:
                self.fence_trips = False
                log.error("event=fence_broken worker=%s fence=read_every_batch detail=%r",
                          self.worker_id, exc.message)
        undo = [rid for rid, outcome in settled.items() if outcome == grants.UNDO]
        if undo and self.epoch is not None:
            self._mark_to_undo(undo)
        if self._may_fence_in_trip(requests, bounced):
            try:
                return self._commit(requests, bounced, settled, fence_in_trip=True)
            except DBAPIError as exc:
                if not fence.tripped(exc):
                    raise
            # Memory took the batch for new: it goes back to what the database holds,
            # and the batch runs again, fenced by a read that says why it tripped.
            self.reload_needed = True
            self.careful_until = time.monotonic() + CAREFUL_AFTER_TRIP
            log.info("event=fence_tripped worker=%s requests=%d undone=all", self.worker_id,
                     len(requests))
        return self._commit(requests, bounced, settled, fence_in_trip=False)

    def _may_fence_in_trip(self, requests, bounced) -> bool:
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
                and not self.reload_needed and not bounced
                and self.connection is not None and not db.on_galera(self.connection)
                and time.monotonic() >= self.careful_until and self.clock.fresh()
                and all(request.op in NO_SAVEPOINT and not _maybe_answered(method, properties)
                        for method, properties, request in requests))

    def _commit(self, requests, bounced, settled: dict[str, str],
                fence_in_trip: bool) -> Batch:
        with self._transaction() as batch:
            request_ids = [r.id for _, _, r in requests]
            taking: int | None = None
            stored: dict[str, Stored] = {}
            if fence_in_trip:
                assert self.epoch is not None  # only a worker that holds the pool (_may_...)
                batch.at(self.clock.now())  # no read: the last one, moved on by monotonic time
                fence.first_write(batch, self.epoch, request_ids)
            else:
                taking, stored = self._fence(batch, request_ids)
            assert batch.now is not None  # the batch's time, given by the fence
            if taking is not None:  # not those this batch settles: their rows go now
                batch.adopted_grants = [row for row in grants.adopt_outbox(batch, self.state)
                                        if row.request_id not in settled]
            if settled:
                grants.settle(batch, self.state, settled, self._holder_of_request)
                self._serve_waiters(batch)
            for reply_to, reply in bounced:
                self._cancel_waiters_of(batch, reply_to, reply)
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
            self.state.flush(batch.orm_session, batch.now, batch.defer)
            batch.defer_stored_replies()
            grants.write_outbox(batch)
            batch.commit()  # its writes and the COMMIT: one round trip
        if taking is not None:
            self.epoch = taking
            self.housekeeping.took_over()
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

    def _fence(self, batch: Batch, request_ids: list[str]
               ) -> tuple[int | None, dict[str, Stored]]:
        """Check the epoch is ours; on the first batch after standing by, take a new one.
        Returns (the epoch taken or None, the replies stored for request_ids): one round
        trip for both, which also gives the batch its time (the database's)."""
        wall_before = time.time()  # for the skew only: nothing decides by this host's clock
        epoch, database_now, stored = fence.read(batch.connection, request_ids)
        now = self.clock.read(database_now, wall_before)
        batch.at(now)
        if self.epoch is None:
            fence.take(batch.connection, epoch + 1, self.worker_id, batch.now or now)
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
        previous = batch.stored_reply(request.id, stored)
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
            batch.store_reply(request.id, request.op, reply, request.user)
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
        return self.state.nodes[next(iter(held))].holder_user if held else None

    def _sender_of_request(self, batch: Batch, request_id: str) -> str | None:
        """The broker user who sent a request, as far as the pool knows (a read: cancel)."""
        holder = self._holder_of_request(request_id)
        if holder is not None:
            return holder
        stored = batch.read_stored_reply(request_id)
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
        if request.op in NO_SAVEPOINT:  # these check before they change
            try:
                return handler(context, request)
            except errors.MoltenIronError as exc:
                return exc.to_reply()
        return savepoint.run(handler, context, request)

    def _serve_waiters(self, batch: Batch) -> None:
        while self.state.shrunk:  # a node went into maintenance at its release
            self.waiters.refuse_impossible(batch, self.state, self.state.shrunk.pop())
        while self.state.quota_freed:  # users below their quota again: their waiters may go
            batch.touched_pools.update(self.waiters.pools_of_user(self.state.quota_freed.pop()))
        while batch.touched_pools:
            node_pool = batch.touched_pools.pop()
            if self.waiters.has_waiting(node_pool):
                self.waiters.serve(batch, self.state, node_pool)

    def _cancel_waiters_of(self, batch: Batch, reply_to: str, reply: dict) -> None:
        """An interim reply bounced from reply_to: that queue is gone, and with it the
        client of every waiter that listens there."""
        if reply.get("status") != protocol.QUEUED:
            return
        cancelled = self.waiters.cancel_reply_queue(batch, reply_to, "its client went away")
        if cancelled:
            log.info("event=client_gone id=%s undone=waiting waiters=%d", reply["id"],
                     cancelled)
            self._serve_waiters(batch)

    def _mark_to_undo(self, request_ids: list[str]) -> None:
        """Write down, before undoing anything, that these grants never reached anyone."""
        with self._transaction() as batch:
            self._fence(batch, [])
            grants.mark_to_undo(batch.connection, request_ids)

    def standby_heartbeat(self) -> None:
        """A standby gets no deliveries, so it says it is alive on its own
        (workers/housekeeping.py)."""
        try:
            self.housekeeping.standby_heartbeat(self.engine, self.clock)
        except SQLAlchemyError as exc:
            log.warning("event=heartbeat_failed worker=%s error=%r", self.worker_id,
                        str(exc).splitlines()[0][:200])
            if db.node_unusable(exc):
                self.use_next_database(exc)

    def _on_tick(self, batch: Batch) -> None:
        """The tick's pool work: waiter deadlines, leases that ended, reply-queue probes;
        then the housekeeping (heartbeat, pruning)."""
        assert batch.now is not None  # given by the fence
        self.waiters.expire(batch, self.state)  # a wait its quota held says so
        for owner, records in self.state.expire(batch.now).items():
            batch.touched_pools.update(r.node_pool for r in records)
            log.info("event=lease_expired owner=%s nodes=%d", owner, len(records))
            metrics.lease_expired(batch, len(records))
        self._serve_waiters(batch)  # before probing: a waiter served now needs no reminder
        self.waiters.probe_reply_queues(batch)
        self.housekeeping.on_tick(batch, self.clock.skew)


def _maybe_answered(method, properties) -> bool:
    """Redelivered by the broker, or sent again by its client (protocol.COPY_HEADER).
    method is None for a request handed over without a broker (tests, bench)."""
    return bool((method is not None and method.redelivered)
                or (properties.headers or {}).get(protocol.COPY_HEADER))


def _is_grant(op: str, reply: dict) -> bool:
    return op == "allocate" and reply.get("status") == 200

