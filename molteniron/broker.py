"""The one module that speaks to RabbitMQ through pika: connecting, channels, publishing,
consuming, and pika's errors turned into MoltenIron's.

Everything else (the worker, MoltenIronClient, `molteniron dead-letters`, metrics)
imports this, never pika: tests/test_broker_boundary.py fails if another module does.

- Connecting: `Brokers` holds amqp_url's brokers (a cluster's nodes, comma-separated)
  and tries them in order, from the one that worked last; after a loss (`lost()`) the
  next one comes first. TLS is set up from the configuration's files
  (molteniron/broker_params.py); a URL or a file that cannot be used is a ConfigError.
- Errors: a broker that refuses the login, the vhost or a certificate is
  BrokerRefused or BrokerNotTrusted (BrokerUnusable: retrying cannot help); none
  reachable is ServiceUnavailable; each names the broker and says why. On an open
  connection: BrokerLost (the connection failed), BrokerClosedChannel (the broker
  refused one operation: reply_code says why), BrokerReturned and BrokerNacked (a
  mandatory, confirmed publish that reached no queue, or that the broker refused).
- Channel and Connection keep pika's method names and arguments for what MoltenIron
  uses (so workers/topology.py declares on either, as the tests do with pika's own);
  what they return is pika's (frames and properties, read by attribute); what they
  raise is MoltenIron's. Callbacks get (channel, method, properties, body) as pika's
  do, the channel being this module's.

pika is imported here without its asyncio adapter, which MoltenIron never uses:
`import pika` runs pika/adapters/__init__.py, which imports the asyncio adapter and
with it asyncio, about 20 ms of a `molteniron allocate` that lasts under 200. While
pika is imported a placeholder stands in for the adapter; afterwards an explicit
`import pika.adapters.asyncio_connection` still gets the real module (only
`pika.adapters.AsyncioConnection` stays None).
"""

from __future__ import annotations

import ssl
import sys
import types
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

from molteniron import errors
from molteniron.broker_params import NO_TLS_FILES, TlsFiles, tls_context
from molteniron.config import url_list

_ASYNCIO_ADAPTER = "pika.adapters.asyncio_connection"
if "pika" not in sys.modules and _ASYNCIO_ADAPTER not in sys.modules:
    _placeholder = types.ModuleType(_ASYNCIO_ADAPTER)
    _placeholder.AsyncioConnection = None  # type: ignore[attr-defined]
    sys.modules[_ASYNCIO_ADAPTER] = _placeholder
    try:
        import pika
    finally:
        if sys.modules.get(_ASYNCIO_ADAPTER) is _placeholder:
            del sys.modules[_ASYNCIO_ADAPTER]
else:
    import pika
from pika.adapters.utils.connection_workflow import (  # noqa: E402
    AMQPConnectorException,
    AMQPConnectorStackTimeout,
)
from pika.exceptions import (  # noqa: E402
    AMQPError,
    ChannelClosedByBroker,
    NackError,
    ProbableAccessDeniedError,
    ProbableAuthenticationError,
    UnroutableError,
)

__all__ = ["Brokers", "Connection", "Channel", "ReplyChannel", "Properties",
           "connection_parameters", "login_of", "translated", "where", "TlsFiles",
           "NO_TLS_FILES"]

Properties = pika.BasicProperties  # a message's AMQP properties, read by attribute

# pika's errors of an open connection, and the socket's: what `_failure` translates.
_PIKA_ERRORS = (AMQPError, OSError)

# (channel, method, properties, body), as pika calls its own callbacks
Callback = Callable[[Any, Any, Any, bytes], None]


def connection_parameters(url: str, tls=NO_TLS_FILES) -> pika.URLParameters:
    """pika's parameters for an amqp(s):// URL, TLS set up from `tls` (TlsFiles or a
    Config) for amqps; ConfigError if the URL or a TLS file cannot be used."""
    from urllib.parse import unquote, urlsplit

    files = TlsFiles(*(getattr(tls, name, None) for name in TlsFiles._fields))
    try:
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("amqp", "amqps"):
            raise ValueError("it must start with amqp:// or amqps://")
        if parts.username and parts.password is None:
            raise errors.ConfigError(
                f"amqp_url names the user {unquote(parts.username)} but no password: set "
                "$MOLTENIRON_AMQP_PASSWORD (a CI agent: from the job's credential), or give "
                "it in the URL")
        params = pika.URLParameters(url)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        # The URL itself is not repeated: it may hold a password.
        raise errors.ConfigError(
            f"amqp_url is not a valid AMQP URL (amqp://USER:PASSWORD@HOST:PORT/VHOST): "
            f"{str(exc) or type(exc).__name__}") from None
    if scheme == "amqp":
        given = [name for name, value in files._asdict().items() if value is not None]
        if given:
            # Files for TLS beside a plain-text URL: the login would cross the network in
            # clear while the configuration says TLS was wanted.
            raise errors.ConfigError(f"{' and '.join(given)} set, but amqp_url {params.host}:"
                                     f"{params.port} is amqp:// (plain text): use amqps://")
        return params
    # pika would verify against the system's CAs by itself; this context adds the CA
    # file and the client certificate, and keeps the checks whatever the URL's query says.
    params.ssl_options = pika.SSLOptions(tls_context(files), server_hostname=params.host)
    return params


def login_of(amqp_url: str) -> str | None:
    """The user name the first broker of amqp_url logs in with (None: none in the URL)."""
    return getattr(pika.URLParameters(url_list(amqp_url)[0]).credentials, "username", None)


class Brokers:
    """amqp_url's brokers, tried in order from the one that worked last.

    connect_timeout: longest TCP connect, and longest TCP + TLS + AMQP handshake, per
    broker (None: pika's 10 s and 15 s). blocked_timeout: how long a connection the
    broker blocks (a memory or disk alarm) may stay blocked before it counts as lost.
    heartbeat: seconds (None: the broker's choice). name: shown in the broker's
    connection list."""

    def __init__(self, amqp_url: str, tls=NO_TLS_FILES, *, connect_timeout: float | None = None,
                 blocked_timeout: float | None = None, heartbeat: int | None = None,
                 name: str | None = None):
        self.amqp_url = amqp_url
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.blocked_timeout = blocked_timeout
        self.heartbeat = heartbeat
        self.name = name
        self.first = 0  # index in url_list(amqp_url) of the broker to try first

    def connect(self, setup: Callable[[Connection], None] | None = None,
                on_failure: Callable[[str, errors.ServiceUnavailable], None] | None = None
                ) -> Connection:
        """A connection to the first broker that answers (and on which setup(connection),
        if given, raises no ServiceUnavailable). If none does: BrokerRefused or
        BrokerNotTrusted if any refused this client or was not trusted (a cluster shares
        its users and vhosts), else ServiceUnavailable; either names each broker and its
        failure. on_failure(host:port, error) hears of each failure as it happens.
        ConfigError if a URL or a TLS file cannot be used."""
        urls = url_list(self.amqp_url)
        if not urls:
            raise errors.ConfigError("amqp_url names no broker")
        failures: list[errors.ServiceUnavailable] = []
        for step in range(len(urls)):
            index = (self.first + step) % len(urls)
            params = self._parameters(urls[index])
            try:
                connection = Connection.open(params)
                if setup is not None:
                    try:
                        setup(connection)
                    except BaseException:  # this broker failed, or the caller is stopping
                        connection.close()
                        raise
            except errors.ServiceUnavailable as exc:
                failures.append(exc)
                if on_failure is not None:
                    on_failure(f"{params.host}:{params.port}", exc)
                continue
            self.first = index
            return connection
        message = "; ".join(failure.message for failure in failures)
        unusable = [f for f in failures if isinstance(f, errors.BrokerUnusable)]
        raise (type(unusable[0]) if unusable else errors.ServiceUnavailable)(message)

    @property
    def count(self) -> int:
        """How many brokers amqp_url names."""
        return len(url_list(self.amqp_url))

    def lost(self) -> None:
        """The connection to the broker last connected to failed: try it last next time."""
        self.first += 1

    def _parameters(self, url: str) -> pika.URLParameters:
        params = connection_parameters(url, self.tls)
        params.connection_attempts = 1
        if self.connect_timeout is not None:
            params.socket_timeout = params.stack_timeout = self.connect_timeout
        if self.blocked_timeout is not None:
            params.blocked_connection_timeout = self.blocked_timeout
        if self.heartbeat is not None:
            params.heartbeat = self.heartbeat
        if self.name is not None:
            params.client_properties = {"connection_name": self.name}
        return params


class Connection:
    """One open connection to one broker (pika's BlockingConnection): used only from the
    thread that opened it. `where` names the broker (host:port and vhost) without
    credentials, `server` its host:port; `login` is the user it logged in as (None: no
    user name, e.g. an EXTERNAL login by certificate)."""

    def __init__(self, connection: pika.BlockingConnection, params: pika.ConnectionParameters):
        self._connection = connection
        self.where = where(params)
        self.server = f"{params.host}:{params.port}"
        self.login: str | None = getattr(params.credentials, "username", None)

    @classmethod
    def open(cls, params: pika.ConnectionParameters) -> Connection:
        """Connect, or raise what failed, naming the broker: BrokerRefused,
        BrokerNotTrusted or ServiceUnavailable."""
        try:
            return cls(pika.BlockingConnection(params), params)
        except (AMQPError, OSError, AMQPConnectorException) as exc:
            raise _connect_failure(exc, params) from None

    @property
    def is_open(self) -> bool:
        return self._connection.is_open

    def channel(self) -> Channel:
        try:
            return Channel(self, self._connection.channel())
        except _PIKA_ERRORS as exc:
            raise _failure(exc, self.where) from exc

    def reply_channel(self, on_return: Callback,
                      on_confirm: Callable[[int, bool, bool], None]) -> ReplyChannel:
        """A channel in confirm mode whose publishes are buffered, not awaited:
        on_return(channel, method, properties, body) for each mandatory message that
        reached no queue, on_confirm(delivery_tag, multiple, acked) for the broker's
        confirms."""
        try:
            return ReplyChannel(self, self._connection.channel(), on_return, on_confirm)
        except _PIKA_ERRORS as exc:
            raise _failure(exc, self.where) from exc

    def process_data_events(self, time_limit: float | None = 0) -> None:
        """Send what is buffered and run the callbacks of what arrives, for up to
        time_limit seconds (0: only what is here already)."""
        try:
            self._connection.process_data_events(time_limit=time_limit)
        except _PIKA_ERRORS as exc:
            raise _failure(exc, self.where) from exc

    def sleep(self, seconds: float) -> None:
        """Wait, while the connection is served (heartbeats, deliveries, confirms)."""
        try:
            self._connection.sleep(seconds)
        except _PIKA_ERRORS as exc:
            raise _failure(exc, self.where) from exc

    def close(self) -> None:
        """Close it if it is open. A connection that failed meanwhile is closed enough:
        nothing is raised."""
        try:
            if self._connection.is_open:
                self._connection.close()
        except _PIKA_ERRORS:
            pass


class Channel:
    """A channel of a Connection (pika's BlockingChannel)."""

    def __init__(self, connection: Connection, channel):
        self.connection = connection
        self._channel = channel

    @property
    def is_open(self) -> bool:
        return self._channel.is_open

    def _failure(self, exc: BaseException) -> errors.ServiceUnavailable:
        return _failure(exc, self.connection.where)

    def confirm_delivery(self) -> None:
        """Publisher confirms: each publish waits for the broker's ack (see publish)."""
        try:
            self._channel.confirm_delivery()
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_qos(self, prefetch_count: int) -> None:
        try:
            self._channel.basic_qos(prefetch_count=prefetch_count)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def exchange_declare(self, exchange: str, exchange_type: str = "direct",
                         durable: bool = False):
        try:
            return self._channel.exchange_declare(exchange, exchange_type, durable=durable)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def queue_declare(self, queue: str, passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = False,
                      arguments: dict | None = None):
        """pika's Queue.DeclareOk frame: .method.queue, .message_count, .consumer_count."""
        try:
            return self._channel.queue_declare(queue, passive=passive, durable=durable,
                                               exclusive=exclusive, auto_delete=auto_delete,
                                               arguments=arguments)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue, by a passive declare: one round trip,
        no permission needed. A queue that does not exist is BrokerClosedChannel 404
        (and the channel is closed)."""
        method = self.queue_declare(queue, passive=True).method
        return method.message_count, method.consumer_count

    def queue_bind(self, queue: str, exchange: str, routing_key: str | None = None):
        try:
            return self._channel.queue_bind(queue, exchange, routing_key=routing_key)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def queue_purge(self, queue: str) -> int:
        """Empty a queue; how many messages went."""
        try:
            return self._channel.queue_purge(queue).method.message_count
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_consume(self, queue: str, callback: Callback, auto_ack: bool = False) -> str:
        """Consume a queue: callback(channel, method, properties, body) for each
        delivery, run from process_data_events. Returns the consumer tag."""
        def deliver(_channel, method, properties, body):
            callback(self, method, properties, body)
        try:
            return self._channel.basic_consume(queue, deliver, auto_ack=auto_ack)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_cancel(self, consumer_tag: str) -> None:
        try:
            self._channel.basic_cancel(consumer_tag)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_get(self, queue: str):
        """(method, properties, body) of the queue's next message, held unacked; (None,
        None, None) if it is empty. method.message_count: those left after it."""
        try:
            return self._channel.basic_get(queue)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        try:
            self._channel.basic_ack(delivery_tag, multiple=multiple)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        try:
            self._channel.basic_nack(delivery_tag, multiple=multiple, requeue=requeue)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def basic_reject(self, delivery_tag: int, requeue: bool = True) -> None:
        try:
            self._channel.basic_reject(delivery_tag, requeue=requeue)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def publish(self, exchange: str, routing_key: str, body: bytes, mandatory: bool = False,
                **properties) -> None:
        """Publish with these AMQP properties (reply_to, correlation_id, delivery_mode,
        expiration, user_id, headers, ...). In confirm mode it returns once the broker
        has the message: BrokerReturned if a mandatory one reached no queue,
        BrokerNacked if the broker refused it."""
        try:
            self._channel.basic_publish(exchange, routing_key, body,
                                        pika.BasicProperties(**properties), mandatory=mandatory)
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc

    def close(self) -> None:
        try:
            if self._channel.is_open:
                self._channel.close()
        except _PIKA_ERRORS as exc:
            raise self._failure(exc) from exc


class ReplyChannel:
    """The worker's channel for replies: publishes are buffered, not awaited, and the
    broker's returns and confirms come back through callbacks in the broker's order.

    It uses pika's private BlockingChannel._impl (pika<2, bounded in pyproject.toml):
    the blocking channel would wait for each confirm (15-20% of the worker's
    throughput, DESIGN.md), delays returns until after the confirm they precede, and
    writes to the socket once per message (40% of the worker's time at 20 clients);
    the underlying channel calls both back in order and only buffers, and the same
    connection sends the buffer in order. tests/test_broker_boundary.py fails if a
    pika release changes this."""

    def __init__(self, connection: Connection, channel, on_return: Callback,
                 on_confirm: Callable[[int, bool, bool], None]):
        self.connection = connection
        self._impl = channel._impl

        def returned(_channel, method, properties, body):
            on_return(self, method, properties, body)

        def confirmed(frame):
            method = frame.method
            on_confirm(method.delivery_tag, method.multiple,
                       isinstance(method, pika.spec.Basic.Ack))
        self._impl.add_on_return_callback(returned)
        self._impl.confirm_delivery(confirmed)

    def publish(self, routing_key: str, body: bytes, correlation_id: str | None,
                mandatory: bool = True) -> None:
        """Buffer a JSON message to a queue by name (the default exchange); the next
        process_data_events, or an ack on the connection's other channel, sends it."""
        try:
            self._impl.basic_publish(
                "", routing_key, body, pika.BasicProperties(correlation_id=correlation_id,
                                                            content_type="application/json"),
                mandatory=mandatory)
        except _PIKA_ERRORS as exc:
            raise _failure(exc, self.connection.where) from exc


# --- pika's errors as MoltenIron's ------------------------------------------------------

def where(params: pika.ConnectionParameters) -> str:
    """host:port (and vhost) of a broker, without the credentials."""
    vhost = "" if params.virtual_host == "/" else f" vhost {params.virtual_host}"
    return f"{params.host}:{params.port}{vhost}"


@contextmanager
def translated(at: str):
    """pika's errors raised inside, as MoltenIron's (as `_failure` words them). Everything
    here already raises MoltenIron's; MoltenIronClient.send wraps its _publish in this
    because tests/test_grants.py fakes a lost connection there with pika's own error."""
    try:
        yield
    except _PIKA_ERRORS as exc:
        raise _failure(exc, at) from exc


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _failure(exc: BaseException, at: str) -> errors.ServiceUnavailable:
    """An error of an open connection, as MoltenIron's."""
    if isinstance(exc, ChannelClosedByBroker):
        return errors.BrokerClosedChannel(
            f"RabbitMQ at {at} refused: {exc.reply_code} {exc.reply_text}",
            reply_code=exc.reply_code, reply_text=exc.reply_text)
    if isinstance(exc, UnroutableError):
        return errors.BrokerReturned(f"RabbitMQ at {at} routed the message to no queue")
    if isinstance(exc, NackError):
        return errors.BrokerNacked(f"RabbitMQ at {at} refused the message (nack)")
    return errors.BrokerLost(f"lost RabbitMQ at {at}: {_why(exc)}", reason=_why(exc))


def _causes(exc: BaseException) -> list[BaseException]:
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
    at, user = where(params), getattr(params.credentials, "username", None)
    server = f"{params.host}:{params.port}"
    vhost = params.virtual_host
    causes = _causes(exc)
    # pika says "probable" for any connection closed at that stage: only the broker's own
    # refusal (not a broker going down just then) is one.
    said = _broker_said(exc)
    if isinstance(exc, ProbableAuthenticationError) and said.startswith("ACCESS_REFUSED"):
        return errors.BrokerRefused(
            f"RabbitMQ at {at} refused the login of user {user!r}: wrong user name or "
            "password (amqp_url, MOLTENIRON_AMQP_PASSWORD)")
    if isinstance(exc, ProbableAccessDeniedError) and said.startswith("NOT_ALLOWED"):
        if "not found" in said:
            return errors.BrokerRefused(f"RabbitMQ at {server} has no vhost {vhost!r} (the "
                                        f"vhost amqp_url names; the broker said: {said})")
        return errors.BrokerRefused(
            f"RabbitMQ at {server} refused user {user!r} access to vhost {vhost!r}: the user "
            f"has no permissions there (the broker said: {said})")
    for cause in causes:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return errors.BrokerNotTrusted(
                f"the TLS certificate of RabbitMQ at {at} is not trusted: certificate "
                f"verify failed: {cause.verify_message} (amqp_ca_file must hold the CA that "
                "signed it, and amqp_url name a host the certificate names)")
    if any(isinstance(cause, TimeoutError) for cause in causes):
        return errors.ServiceUnavailable(
            f"cannot reach RabbitMQ at {at}: no TCP connection within "
            f"{params.socket_timeout:g}s")
    if any(isinstance(cause, AMQPConnectorStackTimeout) for cause in causes):
        return errors.ServiceUnavailable(
            f"cannot reach RabbitMQ at {at}: connected, but no AMQP handshake within "
            f"{params.stack_timeout:g}s (a broker overloaded, or something else listens there)")
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return errors.ServiceUnavailable(f"cannot reach RabbitMQ at {at}: connection refused")
    return errors.ServiceUnavailable(f"cannot reach RabbitMQ at {at}: {_why(exc)}")


def _broker_said(exc: BaseException) -> str:
    """The broker's refusal in a connection it closed while opening (pika keeps it only
    as text), e.g. "NOT_ALLOWED - vhost x not found"; "" if it refused nothing."""
    text = _why(exc.args[0]) if exc.args else ""
    start = max(text.find("NOT_ALLOWED"), text.find("ACCESS_REFUSED"))
    if start < 0:
        return ""
    quote = text[start - 1:start]  # the repr's quote around the broker's words
    return text[start:-1] if quote in ("'", '"') and text.endswith(quote) else text[start:]
