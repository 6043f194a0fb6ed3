"""Prometheus metrics of a worker, served at config `metrics_address` (off when unset).

The worker is single-threaded and the HTTP server runs in a thread of its own,
so a scrape never walks the worker's live dicts: after a batch (at most every
SNAPSHOT_EVERY seconds, and at the next tick if one was skipped) the worker
publishes a `Snapshot` of node and waiter counts, replaced in one assignment,
and the collector reads that. Counters and histograms are observed on the hot
path through label children bound once; what a transaction counts (requests,
lease expiries, grants undone) is tallied with its batch and added only once
that batch committed, so a batch retried while the database is down counts once.
With metrics_address unset nothing listens and the hooks return at once.
Ages are by the database's clock, as the pool keeps it (workers/clock.py).

The same address answers /healthz (200 while the worker serves: its loop ticks on a
broker connection and its database takes a write; 503 naming what is wrong) and 404
on any other path.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from molteniron import protocol
from molteniron.errors import BrokerClosedChannel, ConfigError
from molteniron.models import State
from molteniron.workers.clock import unix

if TYPE_CHECKING:
    from molteniron.workers.state import PoolState

log = logging.getLogger(__name__)

SNAPSHOT_EVERY = 0.5      # seconds: the most often a busy worker counts its pool for scrapes
QUEUE_DEPTH_EVERY = 5.0   # seconds between passive queue declares (one broker round trip each)
NODE_STATES = tuple(s.value for s in State)
DIRTY = State.DIRTY.value
# /healthz: the worker's loop ticks every tick_interval while it holds a broker connection
# (a lost broker, or a batch held while the database is away, stops it); past this many
# intervals (and never under TICK_LATE_MIN seconds) without one, it is not serving.
TICK_LATE_INTERVALS = 5
TICK_LATE_MIN = 10.0
DB_PROBE_EVERY = 2.0      # seconds: the most often /healthz probes the database (a write,
                          # rolled back: keeper.database_answers)
DB_PROBE_WAIT = 5.0       # seconds /healthz waits for a probe before it says the database hangs

# A registry of our own: nothing else a library registers globally ends up on /metrics.
REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("molteniron_requests", "Requests handled by the active worker, by "
                   "operation and reply status (counted once their transaction committed).",
                   ["op", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "molteniron_request_seconds", "Time the worker spent handling one request inside its "
    "batch (the `ms=` of the worker's log), by operation.", ["op"], registry=REGISTRY,
    buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1.0))
WAIT_SECONDS = Histogram(
    "molteniron_wait_seconds", "Time waiting allocates waited, from enqueue to being "
    "granted their nodes.", registry=REGISTRY,
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400))
BATCH_SIZE = Histogram(
    "molteniron_batch_requests", "Client requests committed together in one transaction "
    "(ticks not counted).", registry=REGISTRY,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
DEAD_LETTERED = Counter(
    "molteniron_dead_lettered", "Requests rejected to the dead-letter queue, by reason: "
    "malformed (undecodable, no reply_to) or refused (the database refused it alone).",
    ["reason"], registry=REGISTRY)
LEASE_EXPIRIES = Counter("molteniron_lease_expiries", "Nodes taken back because their "
                         "lease ended.", registry=REGISTRY)
GRANTS_UNDONE = Counter("molteniron_grants_undone", "Grants undone because their client "
                        "was gone before the reply reached it.", registry=REGISTRY)
CLEANING = Counter("molteniron_cleaning_outcomes", "Nodes that finished cleaning, by where "
                   "they went: ready or maintenance.", ["outcome"], registry=REGISTRY)

_DEAD = {reason: DEAD_LETTERED.labels(reason) for reason in ("malformed", "refused")}
for _outcome in ("ready", "maintenance"):
    CLEANING.labels(_outcome)
# Label children by operation, then status, bound at first use (no series for ops never seen).
_BOUND: dict[str, dict[int, tuple]] = {op: {} for op in protocol.OPERATIONS}


@dataclass(frozen=True)
class Snapshot:
    """What a scrape reports of the pool: built by the worker, read by the HTTP thread."""
    nodes: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool, state) -> n
    waiters: dict[str, tuple[int, float]] = field(default_factory=dict)  # pool -> (n, oldest)
    # pool -> time.monotonic() when its longest-dirty node was first seen dirty (None: none)
    dirty: dict[str, float | None] = field(default_factory=dict)


def snapshot(state: PoolState, waiters, dirty_seen: dict[int, float] | None = None) -> Snapshot:
    """Count the pool's nodes by pool and state, and its waiters by pool (O(nodes + waiters)).

    dirty_seen (node id -> monotonic time first seen dirty) is kept up to date in place
    from one snapshot to the next: how long nodes stay dirty is this worker's own view,
    so it starts again at a takeover."""
    nodes: dict[tuple[str, str], int] = {}
    dirty: dict[str, float | None] = {}
    for node_pool in state.capacity_of:  # every state of a known pool, zeros included
        dirty[node_pool] = None
        for node_state in NODE_STATES:
            nodes[(node_pool, node_state)] = 0
    seen_now, still_dirty = time.monotonic(), set()
    for node_id, record in state.nodes.items():
        key = (record.node_pool, record.state)
        nodes[key] = nodes.get(key, 0) + 1
        if dirty_seen is not None and record.state == DIRTY:
            since = dirty_seen.setdefault(node_id, seen_now)
            still_dirty.add(node_id)
            oldest = dirty.get(record.node_pool)
            dirty[record.node_pool] = since if oldest is None else min(oldest, since)
    if dirty_seen is not None:
        for node_id in set(dirty_seen) - still_dirty:
            del dirty_seen[node_id]
    queued = {}
    for node_pool, queue in waiters.by_pool.items():
        oldest = min(w.enqueued_at for w in queue.values())
        queued[node_pool] = (len(queue), unix(oldest))
    return Snapshot(nodes, queued, dirty)


class _Tally:
    """What one batch counted, added to the metrics only when it committed."""
    __slots__ = ("batch", "cleaned", "expired", "requests", "undone")

    def __init__(self, batch=None) -> None:
        self.batch = batch
        self.requests: list[tuple] = []  # (counter child, histogram child, seconds)
        self.expired = 0
        self.undone = 0
        self.cleaned: list[str] = []  # outcomes: ready | maintenance


class _Exporter:
    """The published snapshot, the role source, and the worker-side bookkeeping."""

    def __init__(self) -> None:
        self.serving = False
        self.keeper = None           # read at scrape: role and epoch (plain attribute reads)
        self.latest = Snapshot()     # replaced whole, never changed in place
        self.snapshot_at = 0.0       # time.monotonic() of the latest snapshot
        self.snapshot_epoch = None
        self.stale = False           # a batch changed the pool since the last snapshot
        self.queues: dict[str, int] = {}
        self.queue_channel = None
        self.queues_at = 0.0
        self.dirty_seen: dict[int, float] = {}  # node id -> monotonic time first seen dirty
        self.enqueued: dict[str, float] = {}  # waiting request id -> when it began (unix)
        self.waits_epoch = None
        self.tally = _Tally()
        self.tick_at = 0.0           # time.monotonic() of the worker loop's latest tick
        self.broker_open = False     # whether the broker connection was open at that tick
        self.probe_lock = threading.Lock()
        self.probed_at = -DB_PROBE_EVERY  # time.monotonic() of the latest database probe
        self.database_answered = False

    # --- the collector (HTTP thread) ------------------------------------------

    def collect(self):
        keeper = self.keeper
        epoch = keeper.epoch if keeper is not None else None
        role = GaugeMetricFamily("molteniron_worker_role", "1 for this worker's role: "
                                 "active (serving the pool) or standby.", labels=["role"])
        role.add_metric(["active"], 1 if epoch is not None else 0)
        role.add_metric(["standby"], 0 if epoch is not None else 1)
        yield role
        queues = GaugeMetricFamily("molteniron_queue_messages", "Messages ready in "
                                   "MoltenIron's queues (polled every few seconds).",
                                   labels=["queue"])
        for name, depth in self.queues.copy().items():
            queues.add_metric([name], depth)
        yield queues
        skew = keeper.clock.skew if keeper is not None else None
        if skew is not None:  # standbys too: a standby's clock matters once it takes over
            yield GaugeMetricFamily(
                "molteniron_clock_skew_seconds", "This worker's wall clock minus the "
                "database's, at its last read of the database's time. The pool keeps the "
                "database's time; past 2 s the worker logs event=clock_skew.", value=skew)
        if epoch is None:
            return  # a standby's memory is not the pool: only the active worker counts it
        yield GaugeMetricFamily("molteniron_epoch", "The active worker's epoch (it grows at "
                                "every takeover).", value=epoch)
        latest = self.latest
        nodes = GaugeMetricFamily("molteniron_nodes", "Nodes by pool and state.",
                                  labels=["pool", "state"])
        for (node_pool, node_state), count in latest.nodes.items():
            nodes.add_metric([node_pool, node_state], count)
        yield nodes
        waiting = GaugeMetricFamily("molteniron_waiters", "Allocates waiting for nodes, "
                                    "by pool.", labels=["pool"])
        oldest = GaugeMetricFamily("molteniron_oldest_waiter_age_seconds", "How long the "
                                   "longest-waiting allocate of each pool has waited.",
                                   labels=["pool"])
        now = unix(keeper.clock.estimate())  # enqueued_at is the database's clock
        for node_pool, (count, since) in latest.waiters.items():
            waiting.add_metric([node_pool], count)
            oldest.add_metric([node_pool], max(0.0, now - since))
        yield waiting
        yield oldest
        dirty = GaugeMetricFamily(
            "molteniron_oldest_dirty_seconds", "How long the longest-dirty node of each pool "
            "has waited for its cleaning, as this worker saw it (0: none dirty).",
            labels=["pool"])
        seen_now = time.monotonic()
        for node_pool, since in latest.dirty.items():
            dirty.add_metric([node_pool], 0.0 if since is None else max(0.0, seen_now - since))
        yield dirty

    def health(self, keeper) -> tuple[bool, dict]:
        """Whether this worker serves (its loop ticks on an open broker connection and
        its database takes a write), and the body /healthz answers with."""
        reasons = []
        if not self._database_answers(keeper):
            reasons.append("the database does not answer or refuses writes")
        late = max(TICK_LATE_MIN, TICK_LATE_INTERVALS * keeper.config.tick_interval)
        since_tick = time.monotonic() - self.tick_at
        if not self.tick_at:
            reasons.append("not connected to the broker yet")
        elif since_tick > late:
            reasons.append(f"no tick for {since_tick:.0f} s: the broker connection is "
                           "lost or a batch is held")
        elif not self.broker_open:
            reasons.append("the broker connection is closed")
        body: dict[str, object] = {"status": "unavailable" if reasons else "ok",
                                   "role": "standby" if keeper.epoch is None else "active"}
        if reasons:
            body["reasons"] = reasons
        return not reasons, body

    def _database_answers(self, keeper) -> bool:
        """keeper.database_answers, run at most every DB_PROBE_EVERY by one request at a
        time; False when the probe in progress has not answered within DB_PROBE_WAIT."""
        if not self.probe_lock.acquire(timeout=DB_PROBE_WAIT):
            return False
        try:
            if time.monotonic() - self.probed_at >= DB_PROBE_EVERY:
                self.database_answered = keeper.database_answers()
                self.probed_at = time.monotonic()
            return self.database_answered
        finally:
            self.probe_lock.release()

    # --- bookkeeping (the worker's thread) ------------------------------------

    def tally_for(self, batch) -> _Tally:
        if self.tally.batch is not batch:  # a new transaction (or a retry of one)
            self.tally = _Tally(batch)
        return self.tally

    def batch_done(self, keeper, requests, batch) -> None:
        tally = self.tally
        if tally.batch is batch:
            for counted, latency, seconds in tally.requests:
                counted.inc()
                latency.observe(seconds)
            if tally.expired:
                LEASE_EXPIRIES.inc(tally.expired)
            if tally.undone:
                GRANTS_UNDONE.inc(tally.undone)
            for outcome in tally.cleaned:
                CLEANING.labels(outcome).inc()
            self.tally = _Tally()
        clients = sum(1 for _, _, request in requests if request.op != "tick")
        if clients:
            BATCH_SIZE.observe(clients)
        self._observe_waits(keeper, batch)
        self.stale = True
        if self.serving and (time.monotonic() - self.snapshot_at >= SNAPSHOT_EVERY
                             or keeper.epoch != self.snapshot_epoch):
            self.publish(keeper)

    def _observe_waits(self, keeper, batch) -> None:
        """Waiting allocates that began or ended in this batch (from its outbox)."""
        enqueued = self.enqueued
        if keeper.epoch != self.waits_epoch:  # taken over: waiters came from the rows
            self.waits_epoch = keeper.epoch
            enqueued.clear()
            for request_id, waiter in keeper.waiters.by_request.items():
                enqueued[request_id] = unix(waiter.enqueued_at)
        for out in batch.replies:
            if out.reply.get("status") == protocol.QUEUED:
                if out.request_id not in enqueued:
                    waiter = keeper.waiters.by_request.get(out.request_id)
                    if waiter is not None:
                        enqueued[out.request_id] = unix(waiter.enqueued_at)
                continue
            began = enqueued.pop(out.request_id, None)
            if began is not None and out.grant:
                WAIT_SECONDS.observe(max(0.0, batch.clock - began))

    def publish(self, keeper) -> None:
        self.latest = snapshot(keeper.state, keeper.waiters, self.dirty_seen)
        self.snapshot_at = time.monotonic()
        self.snapshot_epoch = keeper.epoch
        self.stale = False
        if len(self.enqueued) > 2 * len(keeper.waiters) + 64:  # ids whose reply never came
            self.enqueued = {r: t for r, t in self.enqueued.items()
                             if r in keeper.waiters.by_request}

    def on_tick(self, keeper, connection) -> None:
        if not self.serving:
            return
        # Read here, in the thread that owns the connection; /healthz reads the copies.
        self.broker_open = connection is not None and connection.is_open
        self.tick_at = time.monotonic()
        if self.stale and keeper.epoch is not None:
            self.publish(keeper)
        if time.monotonic() - self.queues_at >= QUEUE_DEPTH_EVERY:
            self.queues_at = time.monotonic()
            self._poll_queues(connection)

    def _poll_queues(self, connection) -> None:
        """Passive declares on a channel of its own, so a 404 cannot close the consumer's."""
        channel = self.queue_channel
        if channel is None or not channel.is_open or channel.connection is not connection:
            channel = self.queue_channel = connection.channel()
        try:
            for name in (protocol.REQUEST_QUEUE, protocol.DEAD_LETTER_QUEUE):
                messages, _ = channel.queue_counts(name)
                self.queues = {**self.queues, name: messages}
        except BrokerClosedChannel as exc:  # not declared (yet): try again next time
            log.warning("event=queue_depth_unavailable error=%r", exc.message)
            self.queue_channel = None


_EXPORTER = _Exporter()
REGISTRY.register(_EXPORTER)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # a scrape or a probe is not an event
        pass


def _app(keeper):
    """/metrics: the registry; /healthz: whether this worker serves; anything else: 404."""
    scrape = make_wsgi_app(REGISTRY)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return scrape(environ, start_response)
        if path == "/healthz":
            serving, body = _EXPORTER.health(keeper)
            status = "200 OK" if serving else "503 Service Unavailable"
            text = (json.dumps(body) + "\n").encode()
        else:
            status, text = "404 Not Found", b"not found: this worker serves /metrics and /healthz\n"
        content_type = "application/json" if path == "/healthz" else "text/plain"
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(text)))])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else text]

    return app


def _server(host: str, port: int, app) -> ThreadingWSGIServer:
    """A thread-per-request HTTP server bound to host:port, IPv4 or IPv6 as host is."""
    family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                              flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

    return make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)


def start(address: str | None, keeper) -> bool:
    """Serve /metrics and /healthz at host:port in a thread (nothing when address is
    None); True if serving. ConfigError when the address cannot be served (a port in
    use, say): a worker that monitoring cannot see is refused at start, not found out
    later."""
    _EXPORTER.keeper = keeper
    if not address:
        return False
    host, _, port = address.rpartition(":")
    try:
        server = _server(host.strip("[]"), int(port), _app(keeper))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    except OSError as exc:
        raise ConfigError(f"metrics_address {address} cannot be served: {exc.strerror} "
                          "(another process listens there?)") from None
    _EXPORTER.serving = True
    log.info("event=metrics_serving address=%s", address)
    return True


# --- the hooks: one call each from worker.py / keeper.py ------------------------

def request_handled(batch, op: str, status: int, seconds: float) -> None:
    """One request of a batch was handled (added when the batch commits)."""
    if not _EXPORTER.serving:
        return
    bound = _BOUND[op].get(status)
    if bound is None:
        bound = _BOUND[op][status] = (REQUESTS.labels(op, str(status)), REQUEST_SECONDS.labels(op))
    _EXPORTER.tally_for(batch).requests.append((*bound, seconds))


def lease_expired(batch, nodes: int) -> None:
    if not _EXPORTER.serving:
        return
    _EXPORTER.tally_for(batch).expired += nodes


def grant_undone(batch) -> None:
    if not _EXPORTER.serving:
        return
    _EXPORTER.tally_for(batch).undone += 1


def node_cleaned(batch, outcome: str) -> None:
    """outcome: ready | maintenance (counted when the batch commits)."""
    if not _EXPORTER.serving:
        return
    _EXPORTER.tally_for(batch).cleaned.append(outcome)


def batch_committed(keeper, requests, batch) -> None:
    if not _EXPORTER.serving:
        return
    _EXPORTER.batch_done(keeper, requests, batch)


def dead_lettered(reason: str) -> None:
    """reason: malformed | refused."""
    _DEAD[reason].inc()


def on_tick(keeper, connection) -> None:
    """In the worker's tick path: a snapshot skipped by a busy batch, the queue depths."""
    _EXPORTER.on_tick(keeper, connection)
