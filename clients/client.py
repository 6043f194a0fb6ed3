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
"""

from __future__ import annotations

import json
import time
from typing import Callable

from clients.amqp import pika  # before pika.exceptions: see clients/amqp.py
from pika.exceptions import AMQPError, NackError, UnroutableError

from molteniron import errors, protocol
from molteniron.broker_params import NO_TLS_FILES, connection_parameters
from molteniron.config import url_list

GRACE = 5.0  # seconds past a deadline to wait for the worker's own answer
RECONNECT_FOR = 30.0  # seconds an allocate cut off from the broker keeps trying to cancel
CANCEL_TIMEOUT = 10.0  # longest wait for a worker to confirm a cancel
RESEND_PAUSE = 0.2  # seconds between copies while a cluster elects a new queue leader
# Nodes per status or export reply: about 5 ms of the worker's time, and 0.5 MB, a page.
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
        self.interrupted = False  # set by a signal handler before it raises errors.Interrupted

    # --- connection ------------------------------------------------------------

    def connect(self) -> "MoltenIronClient":
        """Connect to the first broker that answers, from self.broker on, and open the
        reply queue; ServiceUnavailable naming each broker's failure if none does."""
        if self.connection is not None and self.connection.is_open:
            return self
        urls = url_list(self.amqp_url)
        if not urls:
            raise errors.ConfigError("amqp_url names no broker")
        failures = []
        for step in range(len(urls)):
            index = (self.broker + step) % len(urls)
            params = _parameters(urls[index], self.tls)
            try:
                self._open(params)
            except (AMQPError, OSError) as exc:
                self.connection = None
                failures.append(f"{_safe(params)}: {_why(exc)}")
                continue
            self.broker = index
            return self
        raise self._lost("cannot reach RabbitMQ at " + "; ".join(failures)) from None

    def _open(self, params: pika.URLParameters) -> None:
        params.connection_attempts = 1
        params.socket_timeout = min(self.timeout, 10.0)
        params.blocked_connection_timeout = self.timeout
        self.user_id = getattr(params.credentials, "username", None)
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        self.reply_queue = declared.method.queue
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

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
        except AMQPError:
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
            except NackError:
                # While a cluster elects the queue's new leader, a channel that got a nack
                # keeps getting them (RabbitMQ 3.10); a new connection gets through.
                self._drop()
                failure = "the broker refused the request (nack)"
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

        No answer within the timeout: RequestQueued for an op that never expires
        (it is still in the queue and takes effect later), else ServiceUnavailable.
        """
        timeout = timeout or self.timeout
        request = protocol.new_request(op, args)
        expires = protocol.OPERATIONS[op].expires
        self.send(request, timeout if expires else None, until=time.time() + timeout)
        reply = self.wait(request.id, time.time() + timeout)
        if reply is None:
            if not expires:
                raise errors.RequestQueued(
                    f"no MoltenIron worker answered within {timeout:g}s; the {op} is queued "
                    "and takes effect when a worker consumes it")
            raise self._no_worker(timeout)
        return _checked(reply)

    def _no_worker(self, timeout: float) -> errors.ServiceUnavailable:
        """The error for a request nobody answered, naming the likely cause."""
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
        if on_sent:
            on_sent(request.id)
        try:
            self.send(request, self.timeout)
            reply = self.wait(request.id, time.time() + self.timeout, on_progress, interim=True)
            queued = reply is not None and reply.get("status") == protocol.QUEUED
            if queued:
                # The worker started the clock when it took the request; it answers by itself
                # when `wait` runs out, so GRACE only covers a worker that died meanwhile.
                reply = self.wait(request.id, time.time() + wait + GRACE, on_progress)
        except errors.ServiceUnavailable:
            # The reply may be lost with our reply queue: make sure it grants nothing.
            self.cancel_after_reconnect(request.id, until=time.time() + RECONNECT_FOR)
            raise
        if reply is None:
            self.withdraw(request.id)
            if not queued:
                raise self._no_worker(self.timeout)
            raise errors.DeadlineExpired(f"no nodes within {wait:g}s and no worker answered")
        return _checked(reply)

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


def _parameters(url: str, tls=NO_TLS_FILES) -> pika.URLParameters:
    """The connection parameters of an amqp(s):// URL (TLS from `tls`, a Config or
    TlsFiles); ConfigError if the URL or a TLS file cannot be used."""
    return connection_parameters(url, tls)


def _safe(params: pika.ConnectionParameters) -> str:
    """Where the broker is, without the credentials."""
    vhost = "" if params.virtual_host == "/" else f" vhost {params.virtual_host}"
    return f"{params.host}:{params.port}{vhost}"
