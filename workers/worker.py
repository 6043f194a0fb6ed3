"""The serializing worker's broker side: consume -> commit (keeper) -> reply -> ack.

One worker is active (the queue's single active consumer); the others stand
by. Each drained batch of requests is one transaction (workers/keeper.py);
replies are published and deliveries acked only after its commit. Replies go
out on a channel of their own in confirm mode, so the worker learns which
grants reached their client (workers/grants.py).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
import uuid
from typing import Any

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from molteniron import broker, db, errors, protocol
from molteniron.config import Config
from molteniron.workers import metrics, topology
from molteniron.workers.batch import Batch
from molteniron.workers.grants import Grant, GrantTracker
from molteniron.workers.keeper import PoolKeeper

log = logging.getLogger(__name__)

# Errors that say the database is unavailable, not that the batch is wrong: retried.
TRANSIENT = (OperationalError, InterfaceError, PoolTimeout)
RETRY_PAUSE = 0.2  # first pause before a held batch is tried again, doubled each time
DB_RETRY_MAX = 5.0  # longest pause between retries while the database is down
# After this many failed tries of one batch, a database that answers the probe (a read
# and a write that changes nothing) is refusing the batch itself (a packet too large, a
# trigger): stop retrying it.
FAILURES_BEFORE_PROBE = 3
# Never dead-lettered for a database error: a lost release or cancel leaves a job's nodes
# held, a lost renew lets its lease run out, a lost clean_done keeps a node dirty. Alone
# in a batch that the database refuses, one of these is held and retried instead.
HELD_ON_DATABASE_ERRORS = frozenset({"release", "cancel", "renew", "clean_done"})
STOP_CHECK = 0.1  # seconds: a held batch's pauses are slept in slices this long (SIGTERM)
PROBE_EVERY = 0.5  # seconds between probes while writes are refused (one round trip each)
# The interim reply of an allocate held with its batch (_tell_held).
HELD_REPLY = {"status": protocol.QUEUED, "queued": True,
              "message": "the database cannot take writes now: the worker holds the "
                         "request and applies it, in order, as soon as it can"}
# Fault injection for the crash tests: "exit-after-commit:OP" makes the worker die
# right after committing a batch that holds OP, before it replies or acks.
FAULT = os.environ.get("MOLTENIRON_FAULT", "")
# First pause before reconnecting, doubled up to 5 s: short, because a cluster
# elects a new queue leader in well under a second.
RECONNECT_PAUSE = 0.2
CLOSE_CONFIRM_WAIT = 5.0  # seconds a stopping worker waits to learn where its grants went


def freeze_heap() -> None:
    """Leave what is alive now, the pool just loaded above all, out of the garbage
    collector's full collections until the next load. A full collection walks every
    object tracked: 400,000 of them with 100,000 nodes, 165 ms with every request
    waiting, each time a few thousand new objects had lived long enough (an export,
    waiters piling up). What the last freeze kept out is let back in first: a
    connection, engine or exception alive then, garbage now, is collected here (frozen
    objects in a reference cycle are never freed). Run after the batch's replies are
    out."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class RefusedBatch(Exception):
    """Handling the batch failed for its content (a value the database refuses, a bug a
    request triggers), not for the database's health: retrying it cannot help."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class Worker:
    def __init__(self, config: Config, worker_id: str | None = None):
        self.config = config
        self.worker_id = worker_id or f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keeper = PoolKeeper(config, self.worker_id)
        self.deliveries: list[tuple] = []
        self.bounced: list[tuple[str, dict]] = []  # interim replies whose client is gone
        self.grants = GrantTracker()
        self.stopping = False
        # broker.Connection, Channel and ReplyChannel while connected, else None: Any, so
        # the serving loop (which runs only while connected) need not say so at each use.
        self.connection: Any = None
        self.channel: Any = None
        self.reply_channel: Any = None
        self.reply_seq = 0  # publish sequence number on reply_channel (confirm mode)
        # A cluster's nodes, tried in order; after a loss, the next one first.
        self.brokers = broker.Brokers(config.amqp_url, config, heartbeat=30,
                                      name=f"molteniron-worker {self.worker_id}")
        self.login = broker.login_of(config.amqp_url)
        self.frozen_loads = 0  # keeper.state.loads when the heap was last frozen

    # --- lifecycle -----------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT; reconnect to the broker when it goes away."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        metrics.start(self.config.metrics_address, self.keeper)
        if not self.keeper.authz.enabled:
            log.warning("event=authorization_off worker=%s detail=%r", self.worker_id,
                        "config admins is off: every broker user may do everything, "
                        "delete_db included")
        pause = RECONNECT_PAUSE
        while not self.stopping:
            try:
                self._connect()
                pause = RECONNECT_PAUSE
                self._serve()
            except (errors.ServiceUnavailable, OSError) as exc:  # the broker's, translated
                if self.stopping:
                    break
                log.warning("event=broker_lost worker=%s error=%r retry_in=%.1fs",
                            self.worker_id, exc, pause)
                self._forget_connection()
                # Not time.sleep: under libfaketime (the clock tests) it fails with EINVAL.
                threading.Event().wait(pause)
                pause = min(pause * 2, 5.0)
        self._close()
        log.info("event=stopped worker=%s", self.worker_id)

    def _stop(self, signum, frame) -> None:
        log.info("event=stopping worker=%s signal=%s", self.worker_id, signum)
        self.stopping = True

    def _connect(self) -> None:
        """Connect to the first broker that answers, declare what serving needs, and
        consume the request queue."""
        self.connection = self.brokers.connect(on_failure=self._broker_unreachable)
        if self.brokers.count > 1:
            log.info("event=broker_connected worker=%s broker=%s", self.worker_id,
                     self.connection.server)
        self.channel = self.connection.channel()
        topology.declare_requests(self.channel)
        self._declare_dead_letters()
        self.channel.basic_qos(prefetch_count=self.config.prefetch)
        # Replies are buffered, their returns and confirms called back (broker.ReplyChannel).
        self.reply_channel = self.connection.reply_channel(self._on_returned_reply,
                                                           self._on_confirm)
        self.reply_seq = 0
        self.consumer_tag = self.channel.basic_consume(
            protocol.REQUEST_QUEUE, self._on_delivery, auto_ack=False)
        self.keeper.stand_by()
        log.info("event=consuming worker=%s queue=%s", self.worker_id, protocol.REQUEST_QUEUE)

    def _declare_dead_letters(self) -> None:
        """On a channel of its own: the dead-letter queue's node may be the one that died
        (a classic queue lives on one node), and serving must not wait for it to return."""
        channel = self.connection.channel()
        try:
            topology.declare_dead_letters(channel)
            channel.close()
        except errors.BrokerClosedChannel as exc:
            if exc.reply_code != 404:
                raise
            log.warning("event=dead_letter_queue_unavailable worker=%s detail=%r", self.worker_id,
                        f"{exc.reply_text}: until its node is back, what would be dead-lettered "
                        "is dropped")

    def _broker_unreachable(self, server: str, exc: errors.ServiceUnavailable) -> None:
        log.warning("event=broker_unreachable worker=%s broker=%s error=%r", self.worker_id,
                    server, exc.message)

    def _forget_connection(self) -> None:
        # Deliveries of a lost channel cannot be acked; the broker redelivers them.
        # What came back before the loss still holds: the interim replies' clients
        # are gone, and returned grants are settled by the next transaction.
        self.deliveries.clear()
        self.grants.connection_lost()
        self.keeper.stand_by()
        if self.connection is not None:
            self.connection.close()
        self.connection = self.channel = self.reply_channel = None
        self.brokers.lost()  # the one that failed is tried last

    def _close(self) -> None:
        try:
            if self.channel and self.channel.is_open:
                self.channel.basic_cancel(self.consumer_tag)
                self.connection.process_data_events(0)
                if self.deliveries or self.bounced:
                    self._handle_batch()
                # Learn what became of the grants in flight, and write it down.
                give_up = time.monotonic() + CLOSE_CONFIRM_WAIT
                while self.grants.in_flight and time.monotonic() < give_up:
                    self.connection.process_data_events(time_limit=0.05)
                if self.grants.settled and self._active():
                    self._handle_batch()
            if self.connection and self.connection.is_open:
                self.connection.close()
        except errors.ServiceUnavailable as exc:
            log.warning("event=close_failed worker=%s error=%r", self.worker_id, exc.message)
        self.keeper.close()

    # --- the loop ------------------------------------------------------------

    def _serve(self) -> None:
        next_tick = 0.0
        while not self.stopping:
            now = time.monotonic()
            if now >= next_tick:
                self._publish_tick()
                self._send_grants()  # those nacked, or found in the outbox
                metrics.on_tick(self.keeper, self.connection)
                next_tick = now + self.config.tick_interval
            if self.keeper.epoch is None and self.keeper.heartbeat_due():
                self.keeper.standby_heartbeat()
            wait = 0 if self._urgent() else max(0.0, next_tick - now)
            self.connection.process_data_events(time_limit=wait)
            if self._urgent():
                self.connection.process_data_events(0)  # drain what is already here
                self._handle_batch()

    def _urgent(self) -> bool:
        """Work that cannot wait for the next tick: requests, gone clients, grants to undo.
        (Delivered grants are written down with whatever transaction comes next.)"""
        return bool(self.deliveries or (self._active() and (self.bounced
                                                            or self.grants.needs_undo())))

    def _active(self) -> bool:
        # A standby (after a reconnect, say) keeps what it learnt until it is active
        # again: a transaction of its own would take the pool from the active worker.
        return self.keeper.epoch is not None

    def _on_delivery(self, channel, method, properties, body) -> None:
        self.deliveries.append((method, properties, body))

    def _on_returned_reply(self, channel, method, properties, body) -> None:
        """A mandatory reply came back: its client's reply queue is gone with it."""
        try:
            reply = json.loads(body)
        except ValueError:
            return
        if not isinstance(reply, dict) or not reply.get("id"):
            return
        if (not self.grants.on_return(reply["id"], method.routing_key)
                and reply.get("status") == protocol.QUEUED):
            self.bounced.append((method.routing_key, reply))

    def _on_confirm(self, delivery_tag: int, multiple: bool, acked: bool) -> None:
        self.grants.on_confirm(delivery_tag, multiple, acked)

    def _send_grants(self) -> None:
        for grant in self.grants.to_send():
            self.grants.sent(grant, self._queue_reply(grant.reply_to, grant.correlation_id,
                                                      grant.body))

    def _publish_tick(self) -> None:
        tick = protocol.new_request("tick")
        self.channel.publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, tick.to_body(),
                             delivery_mode=1, content_type="application/json",
                             user_id=self.login)

    # --- one batch -----------------------------------------------------------

    def _handle_batch(self) -> None:
        deliveries, self.deliveries = self.deliveries, []
        bounced, self.bounced = self.bounced, []
        requests = []
        for method, properties, body in deliveries:
            request = self._decode(method, properties, body)
            if request is not None:
                requests.append((method, properties, request))
        if requests or ((bounced or self.grants.settled) and self._active()):
            self._process(requests, bounced, whole_batch=True)
            if not self.stopping:
                self._freeze_after_load()
        else:
            self.bounced[:0] = bounced  # kept for when this worker is active

    def _process(self, requests, bounced, whole_batch: bool) -> None:
        """Commit, then reply, then ack. A batch the database refuses is split up
        so that only the request that causes it is dead-lettered."""
        # Grant outcomes ride along with whole batches only: a split must not let
        # them make a single good request look like the culprit.
        settled = self.grants.take_settled() if whole_batch else {}
        batch = refused = None
        try:
            batch = self._commit_with_retry(requests, bounced, settled)
        except RefusedBatch as exc:
            refused = exc
        finally:
            # Not written down: a later transaction does it. Given back before a split,
            # so that a copy answered with a grant in one of its batches finds the
            # grant's outcome and keeps its bounce from undoing it.
            if batch is None:
                self.grants.unsettle(settled)
        if refused is not None:
            if requests or bounced:
                self._split_or_dead_letter(requests, bounced, refused)
            return
        if batch is None:
            return  # stopping while the database was down: the broker redelivers
        if FAULT.startswith("exit-after-commit:") and any(
                r.op == FAULT.split(":", 1)[1] for _, _, r in requests):
            log.error("event=fault_injected fault=%s", FAULT)
            os._exit(70)
        if batch.adopted_grants is not None:
            self.grants.adopt(batch.adopted_grants)
        self.grants.withdraw(batch.withdrawn_grants)
        metrics.batch_committed(self.keeper, requests, batch)
        for out in batch.replies:
            body = protocol.reply_body(out.request_id, out.reply)
            # Every grant answers a request id (an allocate's, or its waiter's).
            if (out.grant and out.request_id is not None
                    and out.request_id not in batch.withdrawn_grants):
                self.grants.add(Grant(out.request_id, out.reply_to, out.correlation_id, body))
            else:  # a grant cancelled in the same batch is only news: nothing to undo
                self._queue_reply(out.reply_to, out.correlation_id, body, out.mandatory)
        # After the adds: a grant and the copy that was answered with it can share a
        # batch, and the copy's client holds the nodes whatever the grant's fate.
        self.grants.regranted(batch.regranted)
        self._send_grants()
        if requests:  # the ack flushes the queued replies too
            self.channel.basic_ack(requests[-1][0].delivery_tag, multiple=whole_batch)
        else:
            self.connection.process_data_events(0)

    def _freeze_after_load(self) -> None:
        if self.keeper.state.loads != self.frozen_loads:
            self.frozen_loads = self.keeper.state.loads
            freeze_heap()

    def _split_or_dead_letter(self, requests, bounced, exc: RefusedBatch) -> None:
        """Retry each request alone; one that is refused alone is dead-lettered."""
        if len(requests) + len(bounced) > 1:
            for request in requests:
                self._process([request], [], whole_batch=False)
            for item in bounced:
                self._process([], [item], whole_batch=False)
            return
        for method, properties, request in requests:
            # Its client is told, and the message is kept for people to look at.
            log.error("event=dead_lettered op=%s id=%s reason=%r", request.op, request.id,
                      exc.detail)
            metrics.dead_lettered("refused")
            if properties.reply_to:
                self._queue_reply(properties.reply_to, properties.correlation_id,
                                  protocol.reply_body(request.id, errors.InternalError
                                                      .for_request(request.id).to_reply()))
            self.channel.basic_reject(method.delivery_tag, requeue=False)

    def _queue_reply(self, reply_to: str, correlation_id: str | None, body: bytes,
                     mandatory: bool = True) -> int:
        """Queue a reply; the next ack or event loop pass sends them all. Returns its
        publish sequence number (what the broker's confirm will name)."""
        self.reply_channel.publish(reply_to, body, correlation_id, mandatory)
        self.reply_seq += 1
        return self.reply_seq

    def _decode(self, method, properties, body) -> protocol.Request | None:
        """The request, or None after answering/dead-lettering a malformed one.

        A body over protocol.MAX_BODY_BYTES is never kept (not dead-lettered): a
        queue of such messages would hold their bytes for people to read."""
        try:
            request = protocol.decode_request(body)
            internal = protocol.OPERATIONS[request.op].internal
            if not properties.reply_to and not internal:
                raise errors.BadRequest("request has no reply_to property")
            if internal and (properties.reply_to or (self.keeper.authz.enabled
                                                     and properties.user_id != self.login)):
                # Workers (all logged in as the same broker user) send ticks; nobody else.
                raise errors.BadRequest(f"{request.op} is sent by workers, not clients")
            # The broker refuses a user_id that is not the login; an admin's requeue of a
            # dead letter acts for the user who first sent it.
            request.user = self.keeper.authz.acting_user(
                properties.user_id, properties.headers, protocol.ON_BEHALF_HEADER)
            return request
        except errors.MoltenIronError as exc:
            oversized = len(body) > protocol.MAX_BODY_BYTES
            if properties.reply_to:
                self._queue_reply(properties.reply_to, properties.correlation_id,
                                  protocol.reply_body(exc.request_id, exc.to_reply()),
                                  mandatory=False)
                self.channel.basic_ack(method.delivery_tag)
                outcome = "error_reply"
            elif oversized:
                self.channel.basic_ack(method.delivery_tag)
                outcome = "dropped"
            else:
                self.channel.basic_reject(method.delivery_tag, requeue=False)
                outcome = "dead_lettered"
                metrics.dead_lettered("malformed")
            log.warning("event=bad_request outcome=%s bytes=%d user=%s error=%r", outcome,
                        len(body), properties.user_id or "-", exc.message[:200])
            return None
        except Exception:  # a message must never stop the worker: keep it for people
            log.exception("event=undecodable_request outcome=dead_lettered bytes=%d", len(body))
            metrics.dead_lettered("malformed")
            if properties.reply_to:  # its client waits: say so, rather than say nothing
                self._queue_reply(properties.reply_to, properties.correlation_id,
                                  protocol.reply_body(None, errors.BadRequest(
                                      "the worker could not decode this request; it is kept "
                                      "in the dead-letter queue").to_reply()),
                                  mandatory=False)
            self.channel.basic_reject(method.delivery_tag, requeue=False)
            return None

    def _commit_with_retry(self, requests, bounced, settled) -> Batch | None:
        """The batch, committed; None if the worker began stopping before it could be
        (nothing acked: the broker redelivers).

        A database that cannot take the batch holds it: nothing is acked or
        dead-lettered, the batch is tried again with backoff (all of it, in order, the
        deliveries that arrive meanwhile after it), and each client that waits for nodes
        is told once that its request is queued. So does a database that is down or
        restarting or a Galera node outside the primary component, a lock conflict, and
        a database that refuses writes (db.writes_refused: read-only, full); while
        writes are refused, the batch is tried again only once the probe
        (keeper.database_answers, which changes nothing) gets a write through.
        RefusedBatch (the batch split up, the culprit dead-lettered) is for the batch's
        own doing only: an error that is not the database's, or one that goes on while
        the database answers and takes writes; and never for a database error on a lone
        release, cancel, renew or clean_done (HELD_ON_DATABASE_ERRORS)."""
        pause, failures, probe_first = RETRY_PAUSE, 0, False
        held_since: float | None = None
        told: set[str] = set()  # request ids already told they are queued
        while True:
            probe_refused = probe_first and not self.keeper.database_answers()
            if probe_refused:
                event, why = "db_refuses_writes", "the probe's write is still refused"
            else:
                try:
                    batch = self.keeper.commit(requests, bounced, settled)
                except errors.NotActiveWorker:
                    raise
                except Exception as exc:  # held, or RefusedBatch from _held_for: never passed on
                    self.keeper.reload_needed = True
                    event, failures = self._held_for(exc, requests, bounced, failures)
                    why = str(exc).splitlines()[0][:200]
                    probe_first = event == "db_refuses_writes"
                else:
                    if held_since is not None:
                        log.info("event=db_hold_ended worker=%s requests=%d held_s=%.1f",
                                 self.worker_id, len(requests) + len(bounced),
                                 time.monotonic() - held_since)
                    return batch
            if held_since is None:
                held_since = time.monotonic()
            self._tell_held(requests, told)
            log.log(logging.ERROR if event == "db_refuses_batch" else logging.WARNING,
                    "event=%s worker=%s held=%d held_s=%.1f error=%r retry_in=%.1fs", event,
                    self.worker_id, len(requests) + len(bounced),
                    time.monotonic() - held_since, why, pause)
            # While the probe's write is refused, the probe (cheap) ends the pause as soon
            # as writes are back; the batch's own retries (and the log) keep to the backoff.
            if not self._pause(pause, self.keeper.database_answers if probe_refused else None):
                return None
            pause = min(pause * 2, DB_RETRY_MAX)

    def _held_for(self, exc: Exception, requests, bounced, failures: int) -> tuple[str, int]:
        """Why a batch that failed with exc is held (its log event), and the failures so
        far that nothing explained; RefusedBatch if the failure is the batch's own."""
        if db.writes_refused(exc):  # whatever class the driver gave it
            event = "db_refuses_writes"
        elif db.lock_conflict(exc):  # whatever class the driver gave it: wait and retry
            event = "db_lock_conflict"
        elif isinstance(exc, TRANSIENT):
            # The database is down or restarting: retry (on the next of db_url's servers
            # if this one cannot serve). The probe asks the server that failed, before
            # moving away from it.
            failures += 1
            event = "db_unavailable"
            if failures >= FAILURES_BEFORE_PROBE and self.keeper.database_answers():
                # It answers and takes writes, yet refuses this batch: the batch is the problem.
                event = self._refused(exc, requests, bounced, logged=False)
        else:  # anything else is this batch's own doing
            event = self._refused(exc, requests, bounced, logged=True)
        if db.node_unusable(exc):
            self.keeper.use_next_database(exc)
        return event, failures

    def _refused(self, exc: Exception, requests, bounced, logged: bool) -> str:
        """RefusedBatch; but "db_refuses_batch" (held) for a database error on a lone
        operation that must never be dead-lettered for one."""
        if (isinstance(exc, DBAPIError) and not bounced and len(requests) == 1
                and requests[0][2].op in HELD_ON_DATABASE_ERRORS):
            return "db_refuses_batch"
        if logged:
            log.error("event=batch_refused worker=%s requests=%d", self.worker_id,
                      len(requests), exc_info=exc)
        cause = getattr(exc, "orig", None) or exc
        raise RefusedBatch(f"{type(cause).__name__}: {str(cause)[:300]}") from exc

    def _tell_held(self, requests, told: set[str]) -> None:
        """Tell each held allocate that waits for nodes, once, that it is queued, as a
        waiter is told: its client then waits for its nodes instead of giving up (and
        cancelling) when its timeout runs out. The deliveries that arrived during the
        hold are held too. Other clients await a final answer, which the hold would
        only delay."""
        held = [(properties, request) for _, properties, request in requests]
        for _, properties, body in self.deliveries:
            try:
                held.append((properties, protocol.decode_request(body)))
            except errors.MoltenIronError:
                continue  # answered as bad input when its turn comes
        for properties, request in held:
            if (request.op == "allocate" and request.args.get("wait") and properties.reply_to
                    and request.id not in told):
                told.add(request.id)
                log.info("event=held_told_queued worker=%s op=allocate id=%s", self.worker_id,
                         request.id)
                self._queue_reply(properties.reply_to, properties.correlation_id,
                                  protocol.reply_body(request.id, HELD_REPLY), mandatory=False)

    def _pause(self, seconds: float, ready=None) -> bool:
        """Keep the broker connection served for `seconds` (deliveries, returned replies
        and confirms come in meanwhile), or until ready() says so, asked every
        PROBE_EVERY seconds; False, at once, when the worker is stopping."""
        resume = time.monotonic() + seconds
        next_check = time.monotonic() + PROBE_EVERY if ready is not None else resume
        while not self.stopping:
            now = time.monotonic()
            if now >= resume:
                return True
            if now >= next_check:
                if ready():
                    return True
                next_check = time.monotonic() + PROBE_EVERY
            self.connection.sleep(max(0.0, min(resume, next_check, now + STOP_CHECK) - now))
        return False
