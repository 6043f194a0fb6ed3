"""The database side of the worker: one transaction per batch, fenced by an epoch.

The keeper owns what the active worker decides with (PoolState, Waiters),
checks on every transaction that its epoch is still the newest, and handles
each request of a batch: replay a stored reply, dispatch it, store its reply.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session

from molteniron import db, errors, pool, protocol
from molteniron.config import Config
from molteniron.models import EndReason, WorkerMeta
from workers.batch import Batch, load_stored_replies
from workers.dispatch import HANDLERS, IN_MEMORY, Context
from workers.state import PoolState
from workers.waiters import Waiters

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0           # seconds between prunes of stored replies
PRUNE_CHUNK = 10_000         # rows deleted per prune, so a prune never stalls a batch
HEARTBEAT_EVERY = 5.0        # seconds between a worker's heartbeat rows (active and standby)


class PoolKeeper:
    def __init__(self, config: Config, worker_id: str):
        self.config = config
        self.worker_id = worker_id
        self.engine = db.make_engine(config.db_url, pre_ping=False)
        self.state = PoolState()
        self.waiters = Waiters()
        self.epoch: int | None = None   # None while standing by
        self.reload_needed = False       # in-memory state may differ from the database
        self.last_prune = 0.0
        self.last_heartbeat = 0.0

    def stand_by(self) -> None:
        """A new consumer: the next delivery, if any, makes this worker take over."""
        self.epoch = None

    def heartbeat_due(self) -> bool:
        return time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY

    def database_answers(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    def close(self) -> None:
        try:
            with Session(self.engine) as session, session.begin():
                session.connection().exec_driver_sql(
                    "DELETE FROM worker_heartbeats WHERE worker_id = %s", (self.worker_id,))
        except SQLAlchemyError:
            pass  # the row ages out: `workers` shows only recent heartbeats
        self.engine.dispose()

    def commit(self, requests, returned) -> Batch:
        """Handle a batch in one transaction; the batch holds the replies to send after it."""
        with Session(self.engine, expire_on_commit=False) as session:
            with session.begin():
                taking = self._fence(session)
                batch = Batch(session)
                stored = load_stored_replies(session, [r.id for _, _, r in requests])
                for reply_to, reply in returned:
                    self._undo_returned(batch, reply_to, reply)
                ticked = False
                for _, properties, request in requests:
                    if request.op == "tick":
                        ticked = True
                        continue
                    reply, outcome = self._handle_one(batch, request, properties, stored)
                    # A replayed grant may have reached its client the first time: if
                    # this copy comes back, that says nothing about the client.
                    batch.reply(properties.reply_to, properties.correlation_id, request.id, reply,
                                mandatory=outcome != "replayed")
                if ticked:
                    self._on_tick(batch)
                self.state.flush(session, batch.now)
                batch.write_stored()
        if taking is not None:
            self.epoch = taking
            log.info("event=active worker=%s epoch=%d waiting=%d",
                     self.worker_id, taking, len(self.waiters))
        return batch

    def _fence(self, session: Session) -> int | None:
        """Check the epoch is ours; on the first batch after standing by, take a new one."""
        epoch = session.connection().exec_driver_sql(
            "SELECT epoch FROM worker_meta WHERE id = 1 FOR UPDATE").scalar_one()
        if self.epoch is None:
            session.execute(update(WorkerMeta).where(WorkerMeta.id == 1).values(
                epoch=epoch + 1, holder=self.worker_id, taken_at=pool.utcnow()))
            self._load(session)
            return epoch + 1
        if epoch != self.epoch:
            log.error("event=fenced worker=%s my_epoch=%d db_epoch=%d",
                      self.worker_id, self.epoch, epoch)
            raise errors.NotActiveWorker(f"worker epoch {self.epoch} superseded by {epoch}")
        if self.reload_needed:
            self._load(session)
            self.reload_needed = False
        return None

    def _load(self, session: Session) -> None:
        self.state.load(session)
        self.waiters.load(session)

    def _handle_one(self, batch: Batch, request: protocol.Request, properties,
                    stored: dict[str, dict]) -> tuple[dict, str]:
        started = time.perf_counter()
        previous = batch.stored_reply(request.id, stored)
        if previous is not None:
            reply, outcome = previous, "replayed"
        elif request.id in self.waiters.by_request:  # redelivered while it waits
            reply, outcome = self.waiters.queued_reply(request.id), "still_waiting"
        elif (request.deadline is not None and request.deadline <= batch.clock
              and protocol.OPERATIONS[request.op].expires):
            reply = errors.DeadlineExpired("the request's deadline passed before a worker "
                                           "saw it").to_reply()
            outcome = "late"
        else:
            reply, outcome = self._dispatch(batch, request, properties), "handled"
        if (outcome in ("handled", "late") and protocol.OPERATIONS[request.op].mutates
                and reply["status"] != protocol.QUEUED):
            batch.store(request.id, request.op, reply)
        log.info("op=%s id=%s owner=%s status=%s outcome=%s ms=%.2f", request.op, request.id,
                 request.args.get("owner", "-"), reply["status"], outcome,
                 (time.perf_counter() - started) * 1000)
        return reply, outcome

    def _dispatch(self, batch: Batch, request: protocol.Request, properties) -> dict:
        context = Context(batch, self.state, self.waiters, properties.reply_to,
                          properties.correlation_id)
        handler = HANDLERS[request.op]
        if request.op in IN_MEMORY:  # these check before they change: no savepoint needed
            try:
                reply = handler(context, request)
            except errors.MoltenIronError as exc:
                return exc.to_reply()
            self._serve_waiters(batch)
            return reply
        self.state.flush(batch.session, batch.now)  # the ORM must see this batch's changes
        mark = batch.mark()
        changes = self.waiters.changes
        savepoint = batch.session.begin_nested()
        memory_touched = False  # handlers check before changing; refresh/serve change memory
        try:
            reply = handler(context, request)
            memory_touched = True
            self.state.refresh(batch.session, batch.touched_nodes)
            batch.touched_nodes.clear()
            self._serve_waiters(batch)
            savepoint.commit()
            return reply
        except errors.MoltenIronError as exc:
            failure = exc.to_reply()
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            log.exception("event=internal_error op=%s id=%s", request.op, request.id)
            failure = {"status": 500, "error": "InternalError",
                       "message": f"the database refused the change: {exc.orig}"}
        savepoint.rollback()
        batch.rollback_to(mark)
        if memory_touched:
            # Flushed just before the savepoint: the database now holds what memory should.
            self.state.load(batch.session)
        if self.waiters.changes != changes:
            self.waiters.load(batch.session)
        return failure

    def _serve_waiters(self, batch: Batch) -> None:
        while batch.touched_pools:
            node_pool = batch.touched_pools.pop()
            if self.waiters.has_waiting(node_pool):
                self.waiters.serve(batch, self.state, node_pool)

    def _undo_returned(self, batch: Batch, reply_to: str, reply: dict) -> None:
        """The client of a reply is gone: what the reply granted goes back."""
        request_id = reply["id"]
        waiter = self.waiters.by_request.get(request_id)
        if reply.get("status") == protocol.QUEUED and waiter and waiter.reply_to == reply_to:
            self.waiters.cancel(batch, request_id, "its client went away")
            log.info("event=client_gone id=%s undone=waiting", request_id)
        elif reply.get("status") == 200 and isinstance(reply.get("nodes"), dict):
            self.state.flush(batch.session, batch.now)
            nodes = pool.release_request(batch.session, request_id, EndReason.CANCELLED, batch.now)
            if nodes:
                batch.store(request_id, "allocate", errors.RequestCancelled(
                    "its client went away before the reply reached it").to_reply())
                self.state.refresh(batch.session, {n.id for n in nodes})
                batch.touched_pools.update(n.node_pool for n in nodes)
                self._serve_waiters(batch)
                log.info("event=client_gone id=%s undone=allocation nodes=%d",
                         request_id, len(nodes))

    def standby_heartbeat(self) -> None:
        """A standby gets no deliveries, so it says it is alive on its own."""
        self.last_heartbeat = time.monotonic()
        try:
            with Session(self.engine) as session, session.begin():
                write_heartbeat(session, self.worker_id, "standby")
        except SQLAlchemyError as exc:
            log.warning("event=heartbeat_failed worker=%s error=%r", self.worker_id,
                        str(exc).splitlines()[0][:200])

    def _on_tick(self, batch: Batch) -> None:
        self.waiters.expire(batch)
        if time.monotonic() - self.last_heartbeat >= HEARTBEAT_EVERY:
            self.last_heartbeat = time.monotonic()
            write_heartbeat(batch.session, self.worker_id, "active")
        if batch.clock - self.last_prune >= PRUNE_EVERY:
            self.last_prune = batch.clock
            cutoff = batch.now - timedelta(seconds=self.config.reply_retention)
            pruned = pool.prune_processed(batch.session, cutoff, PRUNE_CHUNK)
            if pruned:
                log.info("event=pruned stored_replies=%d", pruned)


def write_heartbeat(session: Session, worker_id: str, role: str) -> None:
    session.connection().exec_driver_sql(
        "INSERT INTO worker_heartbeats (worker_id, role, seen_at) VALUES (%s, %s, %s) "
        "ON DUPLICATE KEY UPDATE role = VALUES(role), seen_at = VALUES(seen_at)",
        (worker_id, role, pool.utcnow()))
