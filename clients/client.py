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
import ssl
import time
from typing import Callable

from molteniron.clients.amqp import pika  # before pika.exceptions: see clients/amqp.py
from pika.adapters.utils.connection_workflow import (AMQPConnectorException,
                                                     AMQPConnectorStackTimeout)
from pika.exceptions import (AMQPError, ChannelClosedByBroker, NackError,
                             ProbableAccessDeniedError, ProbableAuthenticationError,
                             UnroutableError)

from molteniron import errors, protocol
from molteniron.broker_params import NO_TLS_FILES, connection_parameters
from molteniron.config import url_list

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
# The broker errors live with the others; importable from here as before.
BrokerUnusable, BrokerRefused = errors.BrokerUnusable, errors.BrokerRefused
BrokerNotTrusted = errors.BrokerNotTrusted
PAGE_SIZE = 1000
EXPORT_TRIES = 3  # listings read again when a node name showed twice


class MoltenIronClient:
    def __init__(self, amqp_url: str, timeout: float = 30.0, tls=NO_TLS_FILES):
        """tls: for amqps:// URLs, the configuration (or a TlsFiles) whose amqp_ca_file,
        amqp_cert_file and amqp_key_file to use; by default the system's CAs, no
        client certificate."""
        self.amqp_url = amqp_url
        self.timeout = timeout
        self.tls = tls
        self.connection = None
        self.channel = None
        self.reply_queue = None
        # The broker login, sent as user_id on every request (None: no user name in
        # the credentials, e.g. an EXTERNAL login by certificate).
        self.user_id: str | None = None
        self.replies: dict[str, list[dict]] = {}
        # Requests awaiting a reply, kept to send again after a lost connection:
        # id -> (request, seconds its copies live in the queue or None).
        self.sent: dict[str, tuple[protocol.Request, float | None]] = {}
        self.broker = 0  # index in url_list(amqp_url) of the broker to try first
        self.where = "the broker"  # host:port (and vhost) of the broker last connected to
        self.interrupted = False  # set by a signal handler before it raises errors.Interrupted

    # --- connection ------------------------------------------------------------

    def connect(self) -> "MoltenIronClient":
        """Connect to the first broker that answers, from self.broker on, and open the
        reply queue. If none does: BrokerUnusable if any refused this client or was not
        trusted (a cluster shares its users and vhosts), else ServiceUnavailable; either
        names each broker and its failure."""
        if self.connection is not None and self.connection.is_open:
            return self
        urls = url_list(self.amqp_url)
        if not urls:
            raise errors.ConfigError("amqp_url names no broker")
        failures: list[errors.ServiceUnavailable] = []
        for step in range(len(urls)):
            index = (self.broker + step) % len(urls)
            try:
                self._open(_parameters(urls[index], self.tls))
            except errors.ServiceUnavailable as exc:
                failures.append(exc)
                continue
            self.broker = index
            return self
        if self.interrupted:
            raise errors.Interrupted()
        message = "; ".join(failure.message for failure in failures)
        unusable = [f for f in failures if isinstance(f, BrokerUnusable)]
        raise (type(unusable[0]) if unusable else errors.ServiceUnavailable)(message)

    def _open(self, params: pika.URLParameters) -> None:
        """Connect to one broker and open the reply queue, or raise what went wrong,
        naming the broker: BrokerUnusable or ServiceUnavailable."""
        params.connection_attempts = 1
        params.socket_timeout = params.stack_timeout = min(self.timeout, CONNECT_TIMEOUT)
        params.blocked_connection_timeout = self.timeout
        self.user_id = getattr(params.credentials, "username", None)
        try:
            self.connection = pika.BlockingConnection(params)
        except (AMQPError, OSError, AMQPConnectorException) as exc:
            self.connection = None
            raise _connect_failure(exc, params) from None
        self.where = _safe(params)
        right = None
        try:
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
            right = "configure"
            declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
            self.reply_queue = declared.method.queue
            right = "read"
            self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        except ChannelClosedByBroker as exc:
            self.close()
            raise _channel_refusal(exc, params, right, "its reply queue (amq.gen-*)") from None
        except (AMQPError, OSError) as exc:
            self.close()
            raise errors.ServiceUnavailable(
                f"cannot reach RabbitMQ at {_safe(params)}: the connection failed while the "
                f"reply queue was set up: {_why(exc)}") from None

    def _drop(self) -> None:
        """Forget a connection that failed; the next connect tries the next broker first."""
        try:
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except (AMQPError, OSError):
            pass
        self.connection = None
        self.broker += 1

    def close(self) -> None:
        try:
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except (AMQPError, OSError):
            pass
        self.connection = None

    def __enter__(self) -> "MoltenIronClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the RPC -----------------------------------------------------------------

    def send(self, request: protocol.Request, expires_in: float | None,
             until: float | None = None) -> None:
        """Publish a request (persistent, confirmed); its reply is collected by `wait`.

        expires_in: seconds after which the broker drops it unseen (None: never).
        A nack or a lost connection sends it again, on the next broker, until
        `until` (unix time; default: the client's timeout from now).
        """
        until = time.time() + self.timeout if until is None else until
        copy = request.id in self.sent  # sent before: it may have been answered
        self.replies.setdefault(request.id, [])
        self.sent[request.id] = (request, expires_in)
        while True:
            try:
                self.connect()
                self._publish(request, expires_in, copy)
                return
            except UnroutableError:
                raise errors.ServiceUnavailable(
                    "the request queue does not exist on this broker/vhost: no MoltenIron "
                    "worker has ever started here (start molteniron-worker)") from None
            except ChannelClosedByBroker as exc:
                # Refused, not lost: the broker dropped the request, and would drop a copy.
                self.close()
                raise _publish_refusal(exc, self.where, self.user_id) from None
            except NackError:
                # While a cluster elects the queue's new leader, a channel that got a nack
                # keeps getting them (RabbitMQ 3.10); a new connection gets through.
                self._drop()
                failure = "the broker refused the request (nack)"
            except BrokerUnusable:
                raise
            except errors.ServiceUnavailable as exc:
                failure = exc.message
            except (AMQPError, OSError) as exc:
                self._drop()
                failure = f"lost RabbitMQ while sending: {_why(exc)}"
            if self.interrupted:
                raise errors.Interrupted()
            if time.time() + RESEND_PAUSE >= until:
                raise errors.ServiceUnavailable(failure)
            copy = True  # the failed publish may have reached the queue all the same
            time.sleep(RESEND_PAUSE)

    def _publish(self, request: protocol.Request, expires_in: float | None,
                 copy: bool = False) -> None:
        expiration = None if expires_in is None else str(max(1, int(expires_in * 1000)))
        properties = pika.BasicProperties(
            reply_to=self.reply_queue, correlation_id=request.id, delivery_mode=2,
            content_type="application/json", expiration=expiration, user_id=self.user_id,
            headers={protocol.COPY_HEADER: True} if copy else None)
        self.channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY,
                                   request.to_body(), properties, mandatory=True)

    def wait(self, request_id: str, until: float,
             on_progress: Callable[[dict | None], None] | None = None,
             interim: bool = False) -> dict | None:
        """The final reply to request_id, or None if `until` (unix time) passes first.

        Interim replies (queued, position k) and, once a second, None are passed
        to on_progress so a terminal can show the wait. interim: return the
        first reply of any kind, "queued" included.
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
                except (AMQPError, OSError) as exc:
                    self._resend_after_loss(request_id, until, exc)
                if on_progress and not inbox:
                    on_progress(None)
        finally:
            if request_id not in self.replies:
                self.sent.pop(request_id, None)

    def _resend_after_loss(self, request_id: str, until: float, exc: BaseException) -> None:
        """The connection died while a reply was awaited: its reply queue went with it.
        Send the same request again on another broker, so its answer comes to the new one."""
        self._drop()
        if self.interrupted:
            raise errors.Interrupted()
        entry = self.sent.get(request_id)
        if entry is None:
            raise self._lost(f"lost RabbitMQ while waiting: {_why(exc)}")
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
        """Send a request that does not wait for nodes; return its reply or raise its error.

        No answer within the timeout, or none coming because no worker consumes the
        request queue: RequestQueued for an op that never expires (it is still in the
        queue and takes effect later), else ServiceUnavailable.
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
            declared = self.channel.queue_declare(protocol.REQUEST_QUEUE, passive=True)
        except ChannelClosedByBroker as exc:
            self.close()  # the channel is gone, the reply consumer with it
            if exc.reply_code == 404:
                return -1
            raise errors.ServiceUnavailable(
                f"RabbitMQ at {self.where} would not say whether a worker consumes "
                f"{protocol.REQUEST_QUEUE}: {exc.reply_text}") from None
        except (AMQPError, OSError):
            if self.interrupted:
                raise errors.Interrupted() from None
            return None
        return declared.method.consumer_count

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
        """(messages queued but not delivered, consumers) of a queue; None: unknown."""
        try:
            self.connect()
            declared = self.channel.queue_declare(queue, passive=True)
        except errors.ServiceUnavailable:
            return None, None
        except (AMQPError, OSError):
            self.close()  # a refused passive declare closes the channel
            return None, None
        return declared.method.message_count, declared.method.consumer_count

    # --- operations -----------------------------------------------------------

    def allocate(self, owner: str, count: int, node_pool: str = "default", wait: float | None = 3600.0,
                 lease_seconds: int | None = None, constraints: dict | None = None,
                 on_progress: Callable[[dict | None], None] | None = None,
                 on_sent: Callable[[str], None] | None = None) -> dict:
        """Nodes for owner; waits up to `wait` seconds (None: fail at once if too few).

        A live worker answers at once (nodes, queued, or an error), so the first
        answer is awaited only `timeout` seconds; after "queued", up to `wait`
        more. Whatever goes wrong after the request may have left (no answer,
        lost broker), it is cancelled, so this client never ends up owning nodes
        it was not told about. on_sent gets the request id before it is published.
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
                reply = self.wait(request.id, time.time() + wait + GRACE, on_progress)
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
        """Queue a cancel without awaiting its answer: it acts whenever a worker comes."""
        try:
            self.send(protocol.new_request("cancel", {"request_id": request_id}), expires_in=None)
        except errors.ServiceUnavailable:
            self.cancel_after_reconnect(request_id, until=time.time() + RECONNECT_FOR)

    def cancel(self, request_id: str, quiet: bool = False) -> dict | None:
        """Take back a request: waiting -> removed, served -> released, unseen -> refused later.

        The cancel itself never expires: if no worker answers now (RequestQueued),
        it still takes effect when one comes, however long the queue.
        """
        try:
            return self.call("cancel", {"request_id": request_id},
                             timeout=min(self.timeout, CANCEL_TIMEOUT))
        except errors.MoltenIronError:
            if quiet:
                return None
            raise

    def cancel_after_reconnect(self, request_id: str, until: float) -> bool:
        """Reconnect and cancel, retrying until `until`; True once it is confirmed or queued."""
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
        """Every node of owner back to the pool; RequestQueued if no worker answered yet."""
        return self.call("release", {"owner": owner})

    def renew(self, owner: str, lease_seconds: int | None = None) -> dict:
        """Extend the lease of every node owner holds (None: the worker's default lease)."""
        return self.call("renew", {"owner": owner, "lease_seconds": lease_seconds})

    def get_field(self, owner: str, field: str) -> dict:
        return self.call("get_field", {"owner": owner, "field": field})

    def set_field(self, node_id: int, key: str, value: str | int, type_name: str = "string",
                  force: bool = False) -> dict:
        return self.call("set_field", {"id": node_id, "key": key, "value": value,
                                       "type": type_name, "force": force})

    def status(self, node_pool: str | None = None, show_secrets: bool = False,
               state: str | None = None, owner: str | None = None,
               page_size: int = PAGE_SIZE) -> dict:
        return self._paged("status", {"node_pool": node_pool, "show_secrets": show_secrets,
                                      "state": state, "owner": owner}, page_size)

    def waiting(self, node_pool: str | None = None) -> dict:
        return self.call("waiting", {"node_pool": node_pool})

    def workers(self) -> dict:
        """The broker's view (queue depths, consumers) and, if a worker answers, the workers'.

        The broker part comes from passive declares, so it answers with no worker
        running; then `workers` is None and `worker_error` says why. With no consumer
        on the request queue nobody is asked: nobody could answer.
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
        """Allocations newest first (node: a name or id; since: an ISO-8601 time)."""
        return self.call("history", {"owner": owner, "node": node, "since": since,
                                     "limit": limit})

    def delete_db(self) -> dict:
        return self.call("delete_db")

    def add_baremetal(self, **fields) -> dict:
        return self.call("add_baremetal", fields)

    def add_keyvalue_pairs(self, **fields) -> dict:
        return self.call("add_keyvalue_pairs", fields)

    def add_json_blob(self, **fields) -> dict:
        return self.call("add_json_blob", fields)

    def export(self, show_secrets: bool = False, page_size: int = PAGE_SIZE) -> dict:
        """Every node as an inventory entry, by name; passwords "********" unless
        show_secrets. A node renamed, or removed and added again, while the pages are
        read could show twice under one name, and `import` would refuse the file: the
        pages are read again then."""
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
        """Add or update nodes by name from {"nodes": [entry...]}: all of them, or none."""
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


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _causes(exc: BaseException):
    """exc and the exceptions pika wrapped inside it (in its args, or as .exception)."""
    seen = [exc]
    for current in seen:
        inner = [getattr(current, "exception", None), *getattr(current, "args", ())]
        seen.extend(e for e in inner if isinstance(e, BaseException) and e not in seen)
    return seen


def _connect_failure(exc: BaseException, params) -> errors.ServiceUnavailable:
    """What a failed connection to one broker means, in words that name the broker: a
    refusal or an untrusted certificate (BrokerUnusable: retrying cannot help), or an
    outage (ServiceUnavailable: worth retrying until the deadline)."""
    where, user = _safe(params), getattr(params.credentials, "username", None)
    server = f"{params.host}:{params.port}"
    vhost = params.virtual_host
    causes = _causes(exc)
    # pika says "probable" for any connection closed at that stage: only the broker's own
    # refusal (not a broker going down just then) is one.
    said = _broker_said(exc)
    if isinstance(exc, ProbableAuthenticationError) and said.startswith("ACCESS_REFUSED"):
        return BrokerRefused(f"RabbitMQ at {where} refused the login of user {user!r}: wrong "
                             "user name or password (amqp_url, MOLTENIRON_AMQP_PASSWORD)")
    if isinstance(exc, ProbableAccessDeniedError) and said.startswith("NOT_ALLOWED"):
        if "not found" in said:
            return BrokerRefused(f"RabbitMQ at {server} has no vhost {vhost!r} (the vhost "
                                 f"amqp_url names; the broker said: {said})")
        return BrokerRefused(f"RabbitMQ at {server} refused user {user!r} access to vhost "
                             f"{vhost!r}: the user has no permissions there (the broker said: "
                             f"{said})")
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return BrokerNotTrusted(
                f"the TLS certificate of RabbitMQ at {where} is not trusted: certificate "
                f"verify failed: {cause.verify_message} (amqp_ca_file must hold the CA that "
                "signed it, and amqp_url name a host the certificate names)")
    seconds = f"{params.socket_timeout:g}s"
    if any(isinstance(cause, TimeoutError) for cause in causes):
        return errors.ServiceUnavailable(
            f"cannot reach RabbitMQ at {where}: no TCP connection within {seconds}")
    if any(isinstance(cause, AMQPConnectorStackTimeout) for cause in causes):
        return errors.ServiceUnavailable(
            f"cannot reach RabbitMQ at {where}: connected, but no AMQP handshake within "
            f"{seconds} (a broker overloaded, or something else listens there)")
    refused = [cause for cause in causes if isinstance(cause, ConnectionRefusedError)]
    if refused:
        return errors.ServiceUnavailable(f"cannot reach RabbitMQ at {where}: connection refused")
    return errors.ServiceUnavailable(f"cannot reach RabbitMQ at {where}: {_why(exc)}")


def _broker_said(exc: BaseException) -> str:
    """The broker's refusal in a connection it closed while opening (pika keeps it only
    as text), e.g. "NOT_ALLOWED - vhost x not found"; "" if it refused nothing."""
    text = _why(exc.args[0]) if exc.args else ""
    start = max(text.find("NOT_ALLOWED"), text.find("ACCESS_REFUSED"))
    if start < 0:
        return ""
    quote = text[start - 1:start]  # the repr's quote around the broker's words
    return text[start:-1] if quote in ("'", '"') and text.endswith(quote) else text[start:]


def _channel_refusal(exc: ChannelClosedByBroker, params, right: str | None,
                     resource: str) -> errors.ServiceUnavailable:
    """A channel the broker closed while the reply queue was set up."""
    user = getattr(params.credentials, "username", None)
    if exc.reply_code == 403 and right:
        return BrokerRefused(f"RabbitMQ at {_safe(params)} refused user {user!r} "
                             f"the {right} permission on {resource}: {exc.reply_text}")
    return BrokerRefused(f"RabbitMQ at {_safe(params)} refused user {user!r}: "
                         f"{exc.reply_code} {exc.reply_text}")


def _publish_refusal(exc: ChannelClosedByBroker, where: str,
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


def _parameters(url: str, tls=NO_TLS_FILES) -> pika.URLParameters:
    """The connection parameters of an amqp(s):// URL (TLS from `tls`, a Config or
    TlsFiles); ConfigError if the URL or a TLS file cannot be used."""
    return connection_parameters(url, tls)


def _safe(params: pika.ConnectionParameters) -> str:
    """Where the broker is, without the credentials."""
    vhost = "" if params.virtual_host == "/" else f" vhost {params.virtual_host}"
    return f"{params.host}:{params.port}{vhost}"
