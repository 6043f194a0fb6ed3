"""MoltenIronClient: the RPC over RabbitMQ. One connection, one exclusive reply queue.

The reply queue is server-named, exclusive and auto-delete, and consumed
before the first request is published: when this process goes away the
queue goes with it, so the worker's mandatory reply comes back unroutable
and the worker takes back what the reply granted. Imports no SQLAlchemy.

Every request carries the AMQP `user_id` property set to the broker login of
amqp_url: RabbitMQ refuses a message whose user_id is not its connection's
login, so the worker can trust it to decide who may do what.

A request of an op that expires (OPERATIONS[op].expires) carries a message
TTL equal to the client's timeout: once the client stops waiting, no worker
can take it any more. Release and cancel never expire: sent while no worker
runs, they take effect when one comes.

amqp_url may name several brokers of a cluster (comma-separated): they are
tried in order, and on a lost connection the next one first. A request whose
publish was nacked, or whose connection was lost before its reply came, is
sent again, with the same id, over a new connection until its deadline: the
worker applies an id once and answers a copy from what it stored.

A broker that refuses this client (its login, its vhost, a permission a request
needs) or that this client cannot trust (its TLS certificate) is BrokerUnusable at
once: no retry can help until someone changes the configuration. An outage (no
connection, a lost one, no handshake in time) is retried until the deadline.
While no worker consumes the request queue, as the broker says (a passive
declare: one round trip, made only before an allocate is sent and after half a
second without an answer), nothing waits for the deadline: an allocate is not
sent at all, a release or cancel is left queued.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from molteniron import broker, errors, protocol
from molteniron.broker_params import NO_TLS_FILES

GRACE = 5.0  # seconds past a deadline to wait for the worker's own answer
RECONNECT_FOR = 30.0  # seconds an allocate cut off from the broker keeps trying to cancel
CANCEL_TIMEOUT = 10.0  # longest wait for a worker to confirm a cancel
RESEND_PAUSE = 0.2  # seconds between copies while a cluster elects a new queue leader
CONNECT_TIMEOUT = 10.0  # longest TCP connect, and TCP + TLS + AMQP handshake, per broker
# A live worker answers within milliseconds (p99 about 0.2 s with 100 clients): after this
# long without an answer the client asks the broker whether any worker consumes at all.
SILENCE_BEFORE_PROBE = 0.5
# How long the broker must keep saying "no consumer" before the client believes it: a
# cluster electing the request queue's new leader (0.2-0.55 s measured after a kill -9)
# may report none meanwhile.
NO_CONSUMER_FOR = 1.0
PROBE_EVERY = 0.25  # seconds between those questions
CONSUMED_PROBE_EVERY = 5.0  # ... and while a worker consumes but has not answered yet
# Nodes per status or export reply: about 5 ms of the worker's time, and 0.5 MB, a page.
PAGE_SIZE = 1000
EXPORT_TRIES = 3  # listings read again when a node name showed twice
# The broker errors live with the others; importable from here as before.
BrokerUnusable, BrokerRefused = errors.BrokerUnusable, errors.BrokerRefused
BrokerNotTrusted = errors.BrokerNotTrusted

__all__ = ["MoltenIronClient", "BrokerUnusable", "BrokerRefused", "BrokerNotTrusted"]


class MoltenIronClient:
    """MoltenIron for Python callers: a scheduler (Zuul, say), the CLI, the web pages.

        from molteniron import errors
        from molteniron.clients.client import MoltenIronClient

        with MoltenIronClient("amqp://ci:PASSWORD@mq.example:5672/molteniron") as client:
            nodes = client.allocate("job-42", 2, wait=600)["nodes"]  # {"node_<id>": {...}}
            ...
            client.release("job-42")

    One broker connection and one reply queue, opened by `connect` (or `with`) and
    used from the thread that opened them; `close` (or leaving `with`) closes them and
    the nodes stay where they are. Methods return the worker's reply, a dict whose
    "status" is 200, or raise one of these public classes of molteniron.errors (every
    one an errors.MoltenIronError, with .status, .kind and .message; .reply is the
    worker's reply when it sent one), and nothing else:

    - errors.ServiceUnavailable (503): no broker answered, no worker consumes the
      request queue (said at once, as the broker tells it), or no worker answered in
      `timeout`. Worth trying again later. Nothing was sent, or an allocate sent was
      cancelled: no nodes are held for it.
    - errors.BrokerUnusable, a ServiceUnavailable: errors.BrokerRefused (the broker
      refused the login, the vhost or a permission) or errors.BrokerNotTrusted (its TLS
      certificate). Said at once; no retry helps until the configuration changes.
    - errors.RequestQueued (202): a release, cancel or renew that no worker answered
      yet; it stays queued and takes effect when one comes.
    - errors.DeadlineExpired (408): an allocate's `wait` ran out before enough nodes
      were free.
    - errors.BadRequest (400; errors.UnknownField among them): wrong arguments.
    - errors.Forbidden (403): this broker user may not do this (authorization on).
    - errors.NodeNotFound, errors.OwnerNotFound (404): no such node; the owner holds
      no nodes.
    - errors.Conflict (409), and its errors.NotEnoughNodes (allocate with wait=None
      and too few nodes free), errors.PoolTooSmall (more than the pool could ever
      give), errors.DuplicateNode, errors.RequestCancelled.
    - errors.NodesTakenBack (410): the owner's nodes were taken back (lease expired,
      an admin); .taken_back says which and why.
    - errors.TooManyRequests (429): this user has as many allocates waiting as allowed.
    - errors.InternalError (500): the worker failed; its log has the request id.
    - errors.ConfigError: amqp_url or a TLS file cannot be used (nothing was sent).
    - errors.Interrupted: only if the caller's own signal handler sets `interrupted`
      and raises it (as the CLI does on SIGTERM and SIGINT); not a MoltenIronError.
    """

    def __init__(self, amqp_url: str, timeout: float = 30.0, tls=NO_TLS_FILES):
        """amqp_url: amqp:// or amqps://USER:PASSWORD@HOST:PORT/VHOST, or several,
        comma-separated (a cluster's nodes, tried in order). timeout: seconds to wait
        for a worker's answer (an allocate that waits for nodes waits `wait` more).
        tls: for amqps://, the configuration (or a molteniron.broker_params.TlsFiles)
        whose amqp_ca_file, amqp_cert_file and amqp_key_file to use; by default the
        system's CAs and no client certificate. Nothing is connected yet."""
        self.amqp_url = amqp_url
        self.timeout = timeout
        self.tls = tls
        self.brokers = broker.Brokers(amqp_url, tls, connect_timeout=min(timeout, CONNECT_TIMEOUT),
                                      blocked_timeout=timeout)
        # broker.Connection and Channel while connected, else None: Any, so the methods
        # that run only after connect() need not say so at each use.
        self.connection: Any = None
        self.channel: Any = None
        self.reply_queue: str | None = None
        # The broker login, sent as user_id on every request (None: no user name in
        # the credentials, e.g. an EXTERNAL login by certificate).
        self.user_id: str | None = None
        self.replies: dict[str, list[dict]] = {}
        # Requests awaiting a reply, kept to send again after a lost connection:
        # id -> (request, seconds its copies live in the queue or None).
        self.sent: dict[str, tuple[protocol.Request, float | None]] = {}
        self.where = "the broker"  # host:port (and vhost) of the broker last connected to
        self.interrupted = False  # set by a signal handler before it raises errors.Interrupted

    # --- connection ------------------------------------------------------------

    def connect(self) -> MoltenIronClient:
        """Connect to the first broker of amqp_url that answers (from the one that worked
        last) and open the reply queue; a no-op while connected. If none answers:
        BrokerRefused or BrokerNotTrusted if any refused this client or was not trusted,
        else ServiceUnavailable; either names each broker and its failure. ConfigError if
        amqp_url or a TLS file cannot be used."""
        if self.connection is not None and self.connection.is_open:
            return self
        self.connection = None
        try:
            self.connection = self.brokers.connect(self._open_replies)
        except errors.ServiceUnavailable:
            if self.interrupted:
                raise errors.Interrupted() from None
            raise
        self.where, self.user_id = self.connection.where, self.connection.login
        return self

    def _open_replies(self, connection: broker.Connection) -> None:
        """Open the channel (confirm mode) and the reply queue, consumed; BrokerRefused or
        ServiceUnavailable naming the broker if that fails."""
        right = None
        try:
            self.channel = connection.channel()
            self.channel.confirm_delivery()
            right = "configure"
            declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
            self.reply_queue = declared.method.queue
            right = "read"
            self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        except errors.BrokerClosedChannel as exc:
            raise _channel_refusal(exc, connection, right, "its reply queue (amq.gen-*)") from None
        except errors.BrokerLost as exc:
            raise errors.ServiceUnavailable(
                f"cannot reach RabbitMQ at {connection.where}: the connection failed while the "
                f"reply queue was set up: {exc.reason}") from None

    def _drop(self) -> None:
        """Forget a connection that failed; the next connect tries the next broker first."""
        self.close()
        self.brokers.lost()

    def close(self) -> None:
        """Close the connection (its reply queue goes with it); the next call connects
        again. Never raises."""
        if self.connection is not None:
            self.connection.close()
        self.connection = None

    def __enter__(self) -> MoltenIronClient:
        """connect(), and close() on the way out."""
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the RPC -----------------------------------------------------------------

    def send(self, request: protocol.Request, expires_in: float | None,
             until: float | None = None) -> None:
        """Publish a request (persistent, confirmed); its reply is collected by `wait`.
        A lower-level step than the operations below, for a caller that sends several
        requests before it awaits their replies.

        expires_in: seconds after which the broker drops it unseen (None: never).
        A nack or a lost connection sends it again, on the next broker, until
        `until` (unix time; default: the client's timeout from now). Raises
        ServiceUnavailable (BrokerRefused, BrokerNotTrusted) if it could not be sent.
        """
        until = time.time() + self.timeout if until is None else until
        copy = request.id in self.sent  # sent before: it may have been answered
        self.replies.setdefault(request.id, [])
        self.sent[request.id] = (request, expires_in)
        while True:
            try:
                self.connect()
                with broker.translated(self.where):
                    self._publish(request, expires_in, copy)
                return
            except errors.BrokerReturned:
                raise errors.ServiceUnavailable(
                    "the request queue does not exist on this broker/vhost: no MoltenIron "
                    "worker has ever started here (start molteniron-worker)") from None
            except errors.BrokerClosedChannel as exc:
                # Refused, not lost: the broker dropped the request, and would drop a copy.
                self.close()
                raise _publish_refusal(exc, self.where, self.user_id) from None
            except errors.BrokerNacked:
                # While a cluster elects the queue's new leader, a channel that got a nack
                # keeps getting them (RabbitMQ 3.10); a new connection gets through.
                self._drop()
                failure = "the broker refused the request (nack)"
            except errors.BrokerLost as exc:
                self._drop()
                failure = f"lost RabbitMQ while sending: {exc.reason}"
            except BrokerUnusable:
                raise
            except errors.ServiceUnavailable as exc:  # no broker answered the connect
                failure = exc.message
            if self.interrupted:
                raise errors.Interrupted()
            if time.time() + RESEND_PAUSE >= until:
                raise errors.ServiceUnavailable(failure)
            copy = True  # the failed publish may have reached the queue all the same
            time.sleep(RESEND_PAUSE)

    def _publish(self, request: protocol.Request, expires_in: float | None,
                 copy: bool = False) -> None:
        expiration = None if expires_in is None else str(max(1, int(expires_in * 1000)))
        self.channel.publish(
            protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, request.to_body(), mandatory=True,
            reply_to=self.reply_queue, correlation_id=request.id, delivery_mode=2,
            content_type="application/json", expiration=expiration, user_id=self.user_id,
            headers={protocol.COPY_HEADER: True} if copy else None)

    def wait(self, request_id: str, until: float,
             on_progress: Callable[[dict | None], None] | None = None,
             interim: bool = False) -> dict | None:
        """The final reply to request_id (sent by `send`), or None if `until` (unix time)
        passes first. The reply is returned as it came, errors included (its "status"
        is not 200): it is not raised.

        Interim replies (queued, position k) and, once a second, None are passed
        to on_progress so a terminal can show the wait. interim: return the
        first reply of any kind, "queued" included. A lost connection sends the
        request again (ServiceUnavailable if it cannot be).
        """
        inbox = self.replies.setdefault(request_id, [])
        try:
            while True:
                while inbox:
                    reply = inbox.pop(0)
                    if reply.get("status") != protocol.QUEUED:
                        self.replies.pop(request_id, None)
                        return reply
                    if on_progress:
                        on_progress(reply)
                    if interim:
                        return reply
                remaining = until - time.time()
                if remaining <= 0:
                    return None
                try:
                    self.connection.process_data_events(time_limit=min(remaining, 1.0))
                except errors.ServiceUnavailable as exc:  # lost, or its channel closed
                    self._resend_after_loss(request_id, until, exc)
                if on_progress and not inbox:
                    on_progress(None)
        finally:
            if request_id not in self.replies:
                self.sent.pop(request_id, None)

    def _resend_after_loss(self, request_id: str, until: float,
                           exc: errors.ServiceUnavailable) -> None:
        """The connection died while a reply was awaited: its reply queue went with it.
        Send the same request again on another broker, so its answer comes to the new one."""
        self._drop()
        if self.interrupted:
            raise errors.Interrupted()
        entry = self.sent.get(request_id)
        if entry is None:
            raise self._lost(f"lost RabbitMQ while waiting: {_reason(exc)}")
        request, expires_in = entry
        # An expiring copy lives as long as a worker is given to answer: no less than the
        # first one did, even when little of the wait is left.
        self.send(request, None if expires_in is None else self.timeout,
                  until=max(until, time.time() + RESEND_PAUSE))

    def _lost(self, message: str) -> Exception:
        # A signal handler that raises inside pika's socket I/O comes out as a lost
        # connection: say what really happened.
        if self.interrupted:
            return errors.Interrupted()
        return errors.ServiceUnavailable(message)

    def call(self, op: str, args: dict | None = None, timeout: float | None = None) -> dict:
        """Send a request of any operation in molteniron.protocol.OPERATIONS that does
        not wait for nodes (args: its arguments by name); return its reply or raise
        the error it carries, as its own type (errors.from_reply).

        No answer within `timeout` (default: the client's), or none coming because no
        worker consumes the request queue: RequestQueued for an op that never expires
        (it is still in the queue and takes effect later), else ServiceUnavailable.
        """
        timeout = timeout or self.timeout
        request = protocol.new_request(op, args)
        expires = protocol.OPERATIONS[op].expires
        self.send(request, timeout if expires else None, until=time.time() + timeout)
        reply, nobody = self._await(request.id, time.time() + timeout)
        if reply is None:
            if not expires:
                why = nobody or f"no MoltenIron worker answered within {timeout:g}s"
                raise errors.RequestQueued(
                    f"{why}; the {op} is queued and takes effect when a worker consumes it")
            raise self._no_worker(timeout, nobody)
        return _checked(reply)

    def _await(self, request_id: str, until: float,
               on_progress: Callable[[dict | None], None] | None = None,
               interim: bool = False) -> tuple[dict | None, str | None]:
        """`wait`, and while no answer comes ask the broker whether any worker consumes the
        request queue: (reply, None), or (None, why) as soon as none does, or (None, None)
        once `until` passed. A live worker answers before the first question is asked."""
        ask_at = time.time() + SILENCE_BEFORE_PROBE
        nobody_since = None
        while True:
            reply = self.wait(request_id, min(until, ask_at), on_progress, interim)
            now = time.time()
            if reply is not None or now >= until:
                return reply, None
            consumers = self._consumers()
            if consumers is None or consumers > 0:
                nobody_since, ask_at = None, now + CONSUMED_PROBE_EVERY
                continue
            nobody_since = nobody_since or now
            if consumers < 0 or now - nobody_since >= NO_CONSUMER_FOR:
                return None, self._nobody_consumes(consumers)
            ask_at = now + PROBE_EVERY

    def _consumers(self) -> int | None:
        """Consumers of the request queue, as the broker says (a passive declare on the
        open connection: one round trip, no permission needed); -1 if the queue does not
        exist; None if the broker could not be asked. Never connects: a new connection
        has a new reply queue, and the reply awaited goes to the old one; the wait that
        follows notices the lost connection and sends the request again."""
        if self.connection is None or not self.connection.is_open:
            return None
        try:
            return self.channel.queue_counts(protocol.REQUEST_QUEUE)[1]
        except errors.BrokerClosedChannel as exc:
            self.close()  # the channel is gone, the reply consumer with it
            if exc.reply_code == 404:
                return -1
            raise errors.ServiceUnavailable(
                f"RabbitMQ at {self.where} would not say whether a worker consumes "
                f"{protocol.REQUEST_QUEUE}: {exc.reply_text}") from None
        except errors.ServiceUnavailable:
            if self.interrupted:
                raise errors.Interrupted() from None
            return None

    def _nobody_consumes(self, consumers: int) -> str:
        if consumers < 0:
            return (f"{protocol.REQUEST_QUEUE} does not exist on {self.where}: no MoltenIron "
                    "worker has ever started here (start molteniron-worker)")
        return (f"no MoltenIron worker is consuming {protocol.REQUEST_QUEUE} on {self.where} "
                "(start molteniron-worker)")

    def _no_worker(self, timeout: float, nobody: str | None = None) -> errors.ServiceUnavailable:
        """The error for a request nobody answered, naming the likely cause."""
        if nobody is not None:
            return errors.ServiceUnavailable(f"no MoltenIron worker answered: {nobody}")
        message = f"no MoltenIron worker answered within {timeout:g}s"
        if self.queue_counts()[1] == 0:
            message += (f": no MoltenIron worker is consuming {protocol.REQUEST_QUEUE} "
                        "(start molteniron-worker)")
        return errors.ServiceUnavailable(message)

    def queue_counts(self, queue: str = protocol.REQUEST_QUEUE) -> tuple[int | None, int | None]:
        """(messages queued but not delivered, consumers) of a queue, as the broker says;
        (None, None) if it cannot be asked or the queue does not exist. Never raises."""
        try:
            self.connect()
        except errors.ServiceUnavailable:
            return None, None
        try:
            return self.channel.queue_counts(queue)
        except errors.ServiceUnavailable:
            self.close()  # a refused passive declare closes the channel
            return None, None

    # --- operations -----------------------------------------------------------

    def allocate(self, owner: str, count: int, node_pool: str = "default",
                 wait: float | None = 3600.0, lease_seconds: int | None = None,
                 constraints: dict | None = None,
                 on_progress: Callable[[dict | None], None] | None = None,
                 on_sent: Callable[[str], None] | None = None) -> dict:
        """`count` nodes of node_pool for owner, all or none; waits up to `wait` seconds
        for them (None: NotEnoughNodes at once if too few are free).

        Returns {"status": 200, "nodes": {"node_<id>": {"name", "ipmi_ip", "blob" (a JSON
        string: ipmi_user, ipmi_password, port_hwaddr, cpu_arch, cpus, ram_mb,
        disk_gb), "allocation_pool", "node_pool", ...}}}, the original MoltenIron's
        reply. lease_seconds: how long they are held unless renewed (None: the
        worker's default). constraints: what each node must have, by the names of
        molteniron.protocol's allocate (arch, min_cpus, min_ram_mb, min_disk_gb, tags),
        and priority (higher first). on_progress(reply or None): each interim
        "queued" reply, and None once a second while waiting. on_sent(request_id):
        before it is published.

        Raises ServiceUnavailable at once when no worker consumes the requests (the
        allocate is not sent), DeadlineExpired when `wait` runs out, PoolTooSmall,
        NotEnoughNodes, Forbidden, TooManyRequests, BadRequest as the worker says.
        A live worker answers at once (nodes, queued, or an error), so the first
        answer is awaited only `timeout` seconds; after "queued", up to `wait`
        more. Whatever goes wrong after the request may have left (no answer,
        lost broker), it is cancelled, so this client never ends up owning nodes
        it was not told about.
        """
        request = protocol.new_request("allocate", {
            "owner": owner, "count": count, "node_pool": node_pool, "wait": wait is not None,
            "wait_seconds": wait, "lease_seconds": lease_seconds, **(constraints or {})})
        self.connect()  # unreachable here: nothing was sent, so there is nothing to cancel
        self._expect_a_worker()  # nor here: nothing is left to expire into the dead letters
        if on_sent:
            on_sent(request.id)
        nobody = None
        try:
            self.send(request, self.timeout)
            reply, nobody = self._await(request.id, time.time() + self.timeout, on_progress,
                                        interim=True)
            queued = reply is not None and reply.get("status") == protocol.QUEUED
            if queued:
                # The worker started the clock when it took the request; it answers by itself
                # when `wait` runs out, so GRACE only covers a worker that died meanwhile.
                reply = self.wait(request.id, time.time() + (wait or 0) + GRACE, on_progress)
        except BrokerUnusable:
            raise  # refused before it reached the queue; a cancel would be refused the same way
        except errors.ServiceUnavailable:
            # The reply may be lost with our reply queue: make sure it grants nothing.
            self.cancel_after_reconnect(request.id, until=time.time() + RECONNECT_FOR)
            raise
        if reply is None:
            self.withdraw(request.id)
            if not queued:
                raise self._no_worker(self.timeout, nobody)
            raise errors.DeadlineExpired(f"no nodes within {wait:g}s and no worker answered")
        return _checked(reply)

    def _expect_a_worker(self) -> None:
        """ServiceUnavailable, before anything is sent, if the broker keeps saying for
        NO_CONSUMER_FOR seconds that no worker consumes the request queue (or that it
        does not exist). One round trip when a worker consumes."""
        nobody_since = time.time()
        while True:
            consumers = self._consumers()
            if consumers is None or consumers > 0:
                return
            if consumers < 0 or time.time() - nobody_since >= NO_CONSUMER_FOR:
                raise errors.ServiceUnavailable(
                    f"{self._nobody_consumes(consumers)}; the allocate was not sent")
            time.sleep(PROBE_EVERY)

    def withdraw(self, request_id: str) -> None:
        """Queue a cancel of request_id without awaiting its answer: it acts whenever a
        worker comes. Never raises ServiceUnavailable: it keeps trying for
        RECONNECT_FOR seconds, then the request expires by itself."""
        try:
            self.send(protocol.new_request("cancel", {"request_id": request_id}), expires_in=None)
        except errors.ServiceUnavailable:
            self.cancel_after_reconnect(request_id, until=time.time() + RECONNECT_FOR)

    def cancel(self, request_id: str, quiet: bool = False) -> dict | None:
        """Take back an allocate by its request id: waiting -> removed, served ->
        released, unseen -> refused later. Returns the worker's reply.

        The cancel itself never expires: if no worker answers now (RequestQueued),
        it still takes effect when one comes, however long the queue. quiet: return
        None instead of raising any MoltenIronError.
        """
        try:
            return self.call("cancel", {"request_id": request_id},
                             timeout=min(self.timeout, CANCEL_TIMEOUT))
        except errors.MoltenIronError:
            if quiet:
                return None
            raise

    def cancel_after_reconnect(self, request_id: str, until: float) -> bool:
        """Reconnect and cancel request_id, retrying until `until` (unix time); True once
        the cancel is confirmed or queued, False if it could not be sent. Never raises
        a MoltenIronError."""
        while time.time() < until:
            self.close()
            try:
                self.connect()
                self.cancel(request_id)
                return True
            except errors.RequestQueued:
                return True  # safely in the queue: more copies would add nothing
            except BrokerUnusable:
                return False  # refused, and every later try would be: the request expires
            except errors.MoltenIronError:
                time.sleep(1.0)
        return False

    def release(self, owner: str) -> dict:
        """Every node of owner back to the pool, and its waiting allocates cancelled:
        {"status": 200, "released": N, "cancelled_waiting": M}. OwnerNotFound if it
        holds nothing, NodesTakenBack if what it held was taken back, RequestQueued if
        no worker answered yet (it takes effect when one comes)."""
        return self.call("release", {"owner": owner})

    def renew(self, owner: str, lease_seconds: int | None = None) -> dict:
        """Lease every node owner holds again, from now, for lease_seconds (None: the
        worker's default lease). OwnerNotFound or NodesTakenBack as for release."""
        return self.call("renew", {"owner": owner, "lease_seconds": lease_seconds})

    def get_field(self, owner: str, field: str) -> dict:
        """A field of each node owner holds: {"status": 200, "result": [{"id": ID,
        "field": VALUE}, ...]}. OwnerNotFound; UnknownField for a field nodes lack."""
        return self.call("get_field", {"owner": owner, "field": field})

    def set_field(self, node_id: int, key: str, value: str | int, type_name: str = "string",
                  force: bool = False) -> dict:
        """Set a field of node node_id (type_name "string" or "int"); force: a node a
        cleaner is cleaning may be set to ready (its claim is dropped). NodeNotFound,
        UnknownField, BadRequest; Forbidden unless an admin."""
        return self.call("set_field", {"id": node_id, "key": key, "value": value,
                                       "type": type_name, "force": force})

    def status(self, node_pool: str | None = None, show_secrets: bool = False,
               state: str | None = None, owner: str | None = None,
               page_size: int = PAGE_SIZE) -> dict:
        """Every node, optionally only those of one pool, state or owner: {"status":
        200, "nodes": [{...}, ...]}, read page_size nodes at a time. IPMI passwords only
        with show_secrets, which only admins may ask (else Forbidden)."""
        return self._paged("status", {"node_pool": node_pool, "show_secrets": show_secrets,
                                      "state": state, "owner": owner}, page_size)

    def waiting(self, node_pool: str | None = None) -> dict:
        """The allocates waiting for nodes, oldest first: {"status": 200, "waiting": [...]}."""
        return self.call("waiting", {"node_pool": node_pool})

    def workers(self) -> dict:
        """The broker's view (queue depths, consumers) and, if a worker answers, the workers'.

        The broker part comes from passive declares, so it answers with no worker
        running; then `workers` is None and `worker_error` says why. With no consumer
        on the request queue nobody is asked: nobody could answer. ServiceUnavailable
        only if no broker answers.
        """
        queued, consumers = self.queue_counts()
        broker = {"queued_requests": queued, "consumers": consumers,
                  "dead_letters": self.queue_counts(protocol.DEAD_LETTER_QUEUE)[0]}
        if consumers is None:
            self.connect()  # unreachable: ServiceUnavailable; else the queue is missing
            return {"status": 200, "workers": None, **broker,
                    "worker_error": f"{protocol.REQUEST_QUEUE} does not exist on this "
                                    "broker/vhost: no MoltenIron worker has ever started here"}
        if consumers == 0:
            return {"status": 200, "workers": None, **broker,
                    "worker_error": f"no worker is consuming {protocol.REQUEST_QUEUE}"}
        try:
            reply = self.call("workers")
        except errors.ServiceUnavailable:
            return {"status": 200, "workers": None, **broker,
                    "worker_error": f"no worker answered within {self.timeout:g}s"}
        return {**reply, **broker}

    def history(self, owner: str | None = None, node: str | None = None,
                since: str | None = None, limit: int = 100) -> dict:
        """Allocations newest first, at most `limit`: {"status": 200, "history": [...]}
        (node: a name or id; since: an ISO-8601 time)."""
        return self.call("history", {"owner": owner, "node": node, "since": since,
                                     "limit": limit})

    def delete_db(self) -> dict:
        """Remove every node from the pool (admins only: else Forbidden)."""
        return self.call("delete_db")

    def add_baremetal(self, **fields) -> dict:
        """Add a node: name, ipmi_ip, ipmi_user, ipmi_password, allocation_pool (IPs,
        comma-separated), port_hwaddr, cpu_arch, cpus, ram_mb, disk_gb, node_pool.
        DuplicateNode for a name taken, BadRequest, Forbidden unless an admin."""
        return self.call("add_baremetal", fields)

    def add_keyvalue_pairs(self, **fields) -> dict:
        """Add a node from name, ipmi_ip, allocation_pool and KEY=VALUE words (as the
        original CLI's add_keyvalue_pairs). Raises as add_baremetal."""
        return self.call("add_keyvalue_pairs", fields)

    def add_json_blob(self, **fields) -> dict:
        """Add a node from name, ipmi_ip, allocation_pool and a JSON blob of its hardware
        fields (as the original CLI's add_json_blob). Raises as add_baremetal."""
        return self.call("add_json_blob", fields)

    def export(self, show_secrets: bool = False, page_size: int = PAGE_SIZE) -> dict:
        """Every node as an inventory entry, by name: {"status": 200, "nodes": [...]};
        passwords "********" unless show_secrets (only admins may ask). A node renamed, or
        removed and added again, while the pages are read could show twice under one
        name, and `import` would refuse the file: the pages are read again then
        (Conflict if they keep changing)."""
        for _ in range(EXPORT_TRIES):
            reply = self._paged("export", {"show_secrets": show_secrets}, page_size)
            names = [entry["name"] for entry in reply["nodes"]]
            if len(set(names)) == len(names):
                reply["nodes"].sort(key=lambda entry: entry["name"])
                return reply
        raise errors.Conflict(f"the pool's node names kept changing while it was exported "
                              f"({EXPORT_TRIES} tries): export again when they settle")

    def _paged(self, op: str, args: dict, page_size: int) -> dict:
        """The reply to op with every page's nodes: the worker serves other requests
        between pages. The pages are read one after the other, not as one snapshot: a
        node that changes meanwhile shows as it was when its page was read."""
        nodes, after_id = [], None
        while True:
            page = {**args, "limit": page_size}
            if after_id is not None:
                page["after_id"] = after_id
            try:
                reply = self.call(op, page)
            except errors.BadRequest as exc:
                if _refuses_only_pages(exc):  # a worker older than pages (even mid-listing)
                    return self.call(op, args)
                raise
            nodes.extend(reply.pop("nodes"))
            after_id = reply.pop("next_after_id", None)
            if after_id is None:
                return {**reply, "nodes": nodes}

    def import_inventory(self, inventory: dict) -> dict:
        """Add or update nodes by name from {"nodes": [entry...]} (as `export` gives
        them): all of them, or none. BadRequest for an entry that is not valid, or an
        inventory larger than a request may be; Forbidden unless an admin."""
        args = {"inventory": inventory}
        if len(json.dumps(args)) > protocol.MAX_BODY_BYTES - 1000:  # room for the envelope
            raise errors.BadRequest(f"the inventory is larger than a request may be "
                                    f"({protocol.MAX_BODY_BYTES} bytes): import it in parts")
        return self.call("import", args)

    def _on_reply(self, channel, method, properties, body) -> None:
        inbox = self.replies.get(properties.correlation_id)
        if inbox is None:
            return  # a late duplicate of a reply already taken
        try:
            reply = json.loads(body)
        except ValueError:
            reply = {"status": 500, "message": "the worker sent a reply that is not JSON"}
        if isinstance(reply, dict):
            inbox.append(reply)


def _refuses_only_pages(exc: errors.BadRequest) -> bool:
    """The refusal of a worker that knows no pages: the page arguments, and nothing
    else, are unknown to it."""
    _, found, names = exc.message.partition("unknown argument(s): ")
    return bool(found) and set(names.split(", ")) <= {"after_id", "limit"}


def _checked(reply: dict) -> dict:
    if reply.get("status") != 200:
        raise errors.from_reply(reply)
    return reply


def _reason(exc: errors.ServiceUnavailable) -> str:
    """What failed, in pika's words where the connection was lost."""
    return exc.reason if isinstance(exc, errors.BrokerLost) else exc.message


def _channel_refusal(exc: errors.BrokerClosedChannel, connection: broker.Connection,
                     right: str | None, resource: str) -> errors.ServiceUnavailable:
    """A channel the broker closed while the reply queue was set up."""
    if exc.reply_code == 403 and right:
        return BrokerRefused(f"RabbitMQ at {connection.where} refused user {connection.login!r} "
                             f"the {right} permission on {resource}: {exc.reply_text}")
    return BrokerRefused(f"RabbitMQ at {connection.where} refused user {connection.login!r}: "
                         f"{exc.reply_code} {exc.reply_text}")


def _publish_refusal(exc: errors.BrokerClosedChannel, where: str,
                     user: str | None) -> errors.ServiceUnavailable:
    """A request the broker refused: it dropped it, and would drop a copy."""
    if exc.reply_code == 404:
        return errors.ServiceUnavailable(
            f"exchange {protocol.EXCHANGE} does not exist on {where}: no MoltenIron worker "
            "has ever started here (start molteniron-worker)")
    if exc.reply_code == 403:
        return BrokerRefused(f"RabbitMQ at {where} refused user {user!r} the write "
                             f"permission on exchange {protocol.EXCHANGE!r}: {exc.reply_text}")
    return BrokerRefused(f"RabbitMQ at {where} refused the request: {exc.reply_code} "
                         f"{exc.reply_text}")
