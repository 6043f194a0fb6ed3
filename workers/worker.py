"""The serializing worker: consume -> dispatch -> commit -> reply -> ack.

One worker is active (the queue's single active consumer); the others stand
by. Each drained batch of requests is one transaction with a SAVEPOINT per
request; replies are published and deliveries acked only after the commit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from datetime import timedelta

import pika
from pika.exceptions import AMQPChannelError, AMQPConnectionError, AMQPError
from sqlalchemy import update
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from molteniron import db, errors, pool, protocol
from molteniron.config import Config
from molteniron.models import EndReason, WorkerMeta
from workers import topology
from workers.batch import Batch, load_stored_replies
from workers.dispatch import HANDLERS, IN_MEMORY, Context
from workers.state import PoolState
from workers.waiters import Waiters

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0           # seconds between prunes of stored replies
HEARTBEAT_EVERY = 5.0        # seconds between a worker's heartbeat rows (active and standby)
PRUNE_CHUNK = 10_000         # rows deleted per prune, so a prune never stalls a batch
DB_RETRY_MAX = 5.0           # longest pause between retries while the database is down
# Fault injection for the crash tests: "exit-after-commit:OP" makes the worker die
# right after committing a batch that holds OP, before it replies or acks.
FAULT = os.environ.get("MOLTENIRON_FAULT", "")


class RefusedByDatabase(Exception):
    """The database refused a batch for its content (too long, constraint), not its health."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Worker:
    def __init__(self, config: Config, worker_id: str | None = None):
        self.config = config
        self.worker_id = worker_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.engine = db.make_engine(config.db_url, pre_ping=False)
        self.state = PoolState()
        self.waiters = Waiters()
        self.epoch: int | None = None   # None while standing by
        self.reload_needed = False       # in-memory state may differ from the database
        self.deliveries: list[tuple] = []
        self.returned: list[tuple[str, dict]] = []
        self.stopping = False
        self.last_prune = 0.0
        self.last_heartbeat = 0.0
        self.connection = None
        self.channel = None

    # --- lifecycle -----------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; reconnect to the broker when it goes away."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        pause = 0.5
        while not self.stopping:
            try:
                self._connect()
                pause = 0.5
                self._serve()
            except (AMQPConnectionError, AMQPChannelError, AMQPError, OSError) as exc:
                if self.stopping:
                    break
                log.warning("event=broker_lost worker=%s error=%r retry_in=%.1fs",
                            self.worker_id, exc, pause)
                self._forget_connection()
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        self._close()
        log.info("event=stopped worker=%s", self.worker_id)

    def _stop(self, signum, frame) -> None:
        log.info("event=stopping worker=%s signal=%s", self.worker_id, signum)
        self.stopping = True

    def _connect(self) -> None:
        params = pika.URLParameters(self.config.amqp_url)
        params.heartbeat = 30
        params.client_properties = {"connection_name": f"molteniron-worker {self.worker_id}"}
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        topology.declare(self.channel)
        self.channel.basic_qos(prefetch_count=self.config.prefetch)
        self.channel.add_on_return_callback(self._on_returned_reply)
        self.consumer_tag = self.channel.basic_consume(
            protocol.REQUEST_QUEUE, self._on_delivery, auto_ack=False)
        self.epoch = None  # a new consumer stands by until a delivery says otherwise
        log.info("event=consuming worker=%s queue=%s", self.worker_id, protocol.REQUEST_QUEUE)

    def _forget_connection(self) -> None:
        # Deliveries of a lost channel cannot be acked; the broker redelivers them.
        self.deliveries.clear()
        self.returned.clear()
        self.epoch = None
        try:
            if self.connection and self.connection.is_open:
                self.connection.close()
        except AMQPError:
            pass
        self.connection = self.channel = None

    def _close(self) -> None:
        try:
            if self.channel and self.channel.is_open:
                self.channel.basic_cancel(self.consumer_tag)
                self.connection.process_data_events(0)
                if self.deliveries or self.returned:
                    self._handle_batch()
            if self.connection and self.connection.is_open:
                self.connection.close()
        except AMQPError as exc:
            log.warning("event=close_failed worker=%s error=%r", self.worker_id, exc)
        try:
            with Session(self.engine) as session, session.begin():
                session.connection().exec_driver_sql(
                    "DELETE FROM worker_heartbeats WHERE worker_id = %s", (self.worker_id,))
        except SQLAlchemyError:
            pass  # the row ages out: `workers` shows only recent heartbeats
        self.engine.dispose()

    # --- the loop ------------------------------------------------------------

    def _serve(self) -> None:
        next_tick = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_tick:
                self._publish_tick()
                next_tick = now + self.config.tick_interval
            if self.epoch is None and now - self.last_heartbeat >= HEARTBEAT_EVERY:
                self._standby_heartbeat()
            wait = 0 if (self.deliveries or self.returned) else max(0.0, next_tick - now)
            self.connection.process_data_events(time_limit=wait)
            if self.deliveries or self.returned:
                self.connection.process_data_events(0)  # drain what is already here
                self._handle_batch()

    def _on_delivery(self, channel, method, properties, body) -> None:
        self.deliveries.append((method, properties, body))

    def _on_returned_reply(self, channel, method, properties, body) -> None:
        """A mandatory reply came back: its client's reply queue is gone with it."""
        try:
            reply = json.loads(body)
        except ValueError:
            return
        if isinstance(reply, dict) and reply.get("id"):
            self.returned.append((method.routing_key, reply))

    def _publish_tick(self) -> None:
        tick = protocol.new_request("tick")
        self.channel.basic_publish(
            protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, tick.to_body(),
            pika.BasicProperties(delivery_mode=1, content_type="application/json"))

    # --- one batch -----------------------------------------------------------

    def _handle_batch(self) -> None:
        deliveries, self.deliveries = self.deliveries, []
        returned, self.returned = self.returned, []
        requests = []
        for method, properties, body in deliveries:
            request = self._decode(method, properties, body)
            if request is not None:
                requests.append((method, properties, request))
        if requests or returned:
            self._process(requests, returned, whole_batch=True)

    def _process(self, requests, returned, whole_batch: bool) -> None:
        """Commit, then reply, then ack. A batch the database refuses is split up
        so that only the request that causes it is dead-lettered."""
        try:
            batch = self._commit_with_retry(requests, returned)
        except RefusedByDatabase as exc:
            if len(requests) + len(returned) > 1:
                for request in requests:
                    self._process([request], [], whole_batch=False)
                for item in returned:
                    self._process([], [item], whole_batch=False)
                return
            for method, _, request in requests:
                log.error("event=dead_lettered op=%s id=%s reason=%r", request.op, request.id,
                          exc.detail)
                self.channel.basic_reject(method.delivery_tag, requeue=False)
            return
        if batch is None:
            return  # stopping while the database was down: the broker redelivers
        if FAULT.startswith("exit-after-commit:") and any(
                r.op == FAULT.split(":", 1)[1] for _, _, r in requests):
            log.error("event=fault_injected fault=%s", FAULT)
            os._exit(70)
        for out in batch.outbox:
            self._queue_reply(out.reply_to, out.correlation_id,
                              protocol.reply_body(out.request_id, out.reply))
        if requests:  # the ack flushes the queued replies too
            self.channel.basic_ack(requests[-1][0].delivery_tag, multiple=whole_batch)
        else:
            self.connection.process_data_events(0)

    def _queue_reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Queue a mandatory reply; the next ack or event loop pass sends them all.

        The blocking channel's basic_publish writes to the socket once per message,
        which was 40% of the worker's time at 20 clients; its underlying channel
        only buffers, and the same connection sends the buffer in order.
        """
        self.channel._impl.basic_publish(
            "", reply_to, body, pika.BasicProperties(correlation_id=correlation_id,
                                                     content_type="application/json"),
            mandatory=True)

    def _decode(self, method, properties, body) -> protocol.Request | None:
        """The request, or None after answering/dead-lettering a malformed one."""
        try:
            request = protocol.decode_request(body)
            if not properties.reply_to and not protocol.OPERATIONS[request.op].internal:
                raise errors.BadRequest("request has no reply_to property")
            return request
        except errors.BadRequest as exc:
            if properties.reply_to:
                self._queue_reply(properties.reply_to, properties.correlation_id,
                                  protocol.reply_body(_request_id(body), exc.to_reply()))
                self.channel.basic_ack(method.delivery_tag)
                outcome = "error_reply"
            else:
                self.channel.basic_reject(method.delivery_tag, requeue=False)
                outcome = "dead_lettered"
            log.warning("event=bad_request outcome=%s bytes=%d error=%r",
                        outcome, len(body), exc.message[:200])
            return None

    def _commit_with_retry(self, requests, returned) -> Batch | None:
        pause = 0.2
        while True:
            try:
                return self._transaction(requests, returned)
            except errors.NotActiveWorker:
                raise
            except (DataError, IntegrityError) as exc:
                # Not the database's state but this batch's content: retrying cannot help.
                self.reload_needed = True
                raise RefusedByDatabase(str(exc.orig)[:300]) from exc
            except SQLAlchemyError as exc:
                # The database is down or restarting: keep the deliveries, retry.
                self.reload_needed = True
                log.warning("event=db_unavailable worker=%s error=%r retry_in=%.1fs",
                            self.worker_id, str(exc).splitlines()[0][:200], pause)
                self.connection.sleep(pause)
                pause = min(pause * 2, DB_RETRY_MAX)
                if self.stopping:
                    return None

    def _transaction(self, requests, returned) -> Batch:
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
                    reply = self._handle_one(batch, request, properties, stored)
                    batch.reply(properties.reply_to, properties.correlation_id, request.id, reply)
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
                    stored: dict[str, dict]) -> dict:
        started = time.perf_counter()
        previous = batch.stored_reply(request.id, stored)
        if previous is not None:
            reply, outcome = previous, "replayed"
        elif request.id in self.waiters.by_request:
            self.waiters.readdress(batch, request.id, properties.reply_to, properties.correlation_id)
            reply, outcome = self.waiters.queued_reply(request.id), "still_waiting"
        elif request.deadline is not None and request.deadline <= batch.clock:
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
        return reply

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
        try:
            reply = handler(context, request)
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
        elif reply.get("status") == 200 and reply.get("nodes"):
            self.state.flush(batch.session, batch.now)
            nodes = pool.release_request(batch.session, request_id, EndReason.CANCELLED, batch.now)
            if nodes:
                batch.forget(request_id)  # a re-sent request is then handled afresh
                self.state.refresh(batch.session, {n.id for n in nodes})
                batch.touched_pools.update(n.node_pool for n in nodes)
                self._serve_waiters(batch)
                log.info("event=client_gone id=%s undone=allocation nodes=%d",
                         request_id, len(nodes))

    def _standby_heartbeat(self) -> None:
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


def _request_id(body: bytes) -> str | None:
    try:
        data = json.loads(body)
        return data["id"] if isinstance(data, dict) and isinstance(data.get("id"), str) else None
    except (ValueError, UnicodeDecodeError):
        return None
