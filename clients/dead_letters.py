"""`molteniron dead-letters`: what landed in molteniron.dead-letters and why; requeue or purge.

Broker-side only (no worker needed), with the caller's broker login: reading the
queue needs read on `molteniron.dead-letters`, which only the admin user has.

Listing leaves the queue as it was: the messages are fetched with basic.get
WITHOUT ack and held, then all given back at once (basic.nack multiple,
requeue). A classic queue puts requeued messages back at their original
positions, so count and order stay the same (measured on RabbitMQ 3.10; the
only trace is the `redelivered` flag). Giving each one back right after
reading it would not work: it goes back to the head and the next get returns
it again. While a listing holds messages, a second listing or a purge at the
same moment does not see them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from clients.amqp import pika  # before pika.exceptions: see clients/amqp.py
from pika.exceptions import AMQPError, ChannelClosedByBroker, NackError, UnroutableError

from molteniron import errors, protocol
from molteniron.config import url_list

MASK = "********"
BODY_CHARS = 200  # how much of each body is shown
NEEDS_ADMIN = (f"dead-letters needs the admin broker user "
               f"(read on {protocol.DEAD_LETTER_QUEUE})")
# Headers the broker adds when it dead-letters a message: dropped on requeue.
DEATH_HEADERS = ("x-death", "x-first-death-reason", "x-first-death-queue",
                 "x-first-death-exchange", "x-last-death-reason", "x-last-death-queue",
                 "x-last-death-exchange")
COLUMNS = (("id", 36), ("op", 12), ("reason", 14), ("died_at", 19), ("queue", 19),
           ("user", 8), ("detail", 30), ("body", 40))
# A password in a body that is not JSON (or in a string inside one): key, separator, value.
_PASSWORD_IN_TEXT = re.compile(
    r'(ipmi_password\\*"?\s*[:=]\s*)(\\*"(?:[^"\\]|\\.)*?\\*"|[^\s,;&}\]"\\]+)', re.IGNORECASE)


class DeadLetterNotFound(errors.MoltenIronError):
    """--requeue named an id that no message in the dead-letter queue has."""

    status = 404


@dataclass
class DeadLetter:
    id: str
    op: str | None
    reason: str | None   # the broker's x-death reason: expired, delivery_limit, rejected, ...
    detail: str          # what that reason means for this message
    died_at: str | None  # when it was dead-lettered, UTC
    queue: str | None    # the queue it died in
    user: str | None     # the broker login that sent it
    body: str            # its first BODY_CHARS characters, IPMI passwords masked
    malformed: bool      # the worker would reject it again


def describe(properties: pika.BasicProperties, body: bytes) -> DeadLetter:
    """What a dead-lettered message is, why it died, and its body without passwords."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    data = data if isinstance(data, dict) else {}
    request_id = data.get("id")
    letter_id = (request_id if isinstance(request_id, str) and 0 < len(request_id) <= 100
                 else properties.message_id or properties.correlation_id
                 or "sha256:" + hashlib.sha256(body).hexdigest()[:16])
    op = data.get("op") if isinstance(data.get("op"), str) else None
    deaths = (properties.headers or {}).get("x-death") or [{}]
    death = deaths[0]  # the most recent
    reason = death.get("reason")
    why_malformed = _why_malformed(properties, body)
    if reason == "expired":
        detail = "its TTL passed before a worker took it"
    elif reason == "delivery_limit":
        detail = (f"delivered more than {protocol.DELIVERY_LIMIT} times "
                  f"(it kept failing the worker)")
    elif reason == "rejected":
        detail = (f"malformed: {why_malformed}" if why_malformed
                  else "refused by the database (the worker replied 500)")
    else:
        detail = reason or "no x-death header"
    died_at = death.get("time")
    return DeadLetter(
        id=letter_id[:100], op=op[:50] if op else None, reason=reason, detail=detail[:200],
        died_at=died_at.strftime("%Y-%m-%dT%H:%M:%S") if died_at else None,
        queue=death.get("queue"), user=properties.user_id, body=masked(body),
        malformed=why_malformed is not None)


def _why_malformed(properties: pika.BasicProperties, body: bytes) -> str | None:
    """Why the worker's _decode would reject this message, or None if it would take it."""
    try:
        request = protocol.decode_request(body)
    except errors.BadRequest as exc:
        return exc.message[:150]
    if not properties.reply_to and not protocol.OPERATIONS[request.op].internal:
        return "request has no reply_to property"
    return None


def masked(body: bytes) -> str:
    """The body's first BODY_CHARS characters with every IPMI password replaced by MASK."""
    text = body[:protocol.MAX_BODY_BYTES].decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _mask_text(text)[:BODY_CHARS]
    # The text pass too: a password in a string that is neither JSON nor KEY=VALUE.
    return _mask_text(json.dumps(_mask(data), ensure_ascii=False))[:BODY_CHARS]


def _mask(value):
    if isinstance(value, dict):
        out = {k: MASK if isinstance(k, str) and k.lower() == "ipmi_password" else _mask(v)
               for k, v in value.items()}
        if str(value.get("key", "")).lower() == "ipmi_password" and "value" in value:
            out["value"] = MASK  # set_field ID ipmi_password VALUE
        return out
    if isinstance(value, list):
        return [_mask(item) for item in value]
    if isinstance(value, str):
        if value.lstrip()[:1] in ("{", "["):  # add_json_blob's blob, as a string
            try:
                return json.dumps(_mask(json.loads(value)), ensure_ascii=False)
            except (ValueError, RecursionError):
                pass
        return _mask_text(value)  # add_keyvalue_pairs' "ipmi_password=..."
    return value


def _mask_text(text: str) -> str:
    return _PASSWORD_IN_TEXT.sub(_masked_value, text)


def _masked_value(match: re.Match) -> str:
    """The key and separator, then MASK in the value's own quotes (if it had them)."""
    key, value = match.group(1), match.group(2)
    quote = re.match(r'\\*"', value)
    if quote is None:
        return key + MASK
    closed = len(value) > len(quote.group(0)) and value.endswith('"')
    return key + quote.group(0) + MASK + (quote.group(0) if closed else "")


class DeadLetterQueue:
    """The dead-letter queue, on one connection with the caller's login."""

    def __init__(self, amqp_url: str, timeout: float = 30.0):
        from clients.client import _parameters
        self.brokers = [_parameters(url) for url in url_list(amqp_url)]
        for params in self.brokers:
            params.connection_attempts = 1
            params.socket_timeout = min(timeout, 10.0)
        self.params = self.brokers[0]
        self.login = getattr(self.params.credentials, "username", None)
        self.connection = None

    def __enter__(self) -> "DeadLetterQueue":
        """Connect to the first of amqp_url's brokers that answers."""
        for params in self.brokers:
            self.params = params
            try:
                self.connection = pika.BlockingConnection(params)
                return self
            except (AMQPError, OSError) as exc:
                if isinstance(exc, pika.exceptions.ProbableAccessDeniedError) \
                        or params is self.brokers[-1]:
                    with _broker_errors(params):
                        raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.connection is not None and self.connection.is_open:
                self.connection.close()
        except AMQPError:
            pass

    def show(self, limit: int) -> tuple[list[DeadLetter], int]:
        """The oldest `limit` dead letters and how many there are, leaving the queue as it was."""
        with _broker_errors(self.params):
            channel = self.connection.channel()
            letters, total = [], None
            for _ in range(limit):
                method, properties, body = channel.basic_get(protocol.DEAD_LETTER_QUEUE)
                if method is None:
                    break
                if total is None:  # message_count: those left after this one
                    total = method.message_count + 1
                letters.append(describe(properties, body))
            if letters:
                channel.basic_nack(0, multiple=True, requeue=True)  # all back, in order
            else:  # nothing to read; the read right is checked all the same
                total = 0
            channel.close()
            return letters, total

    def requeue(self, letter_id: str) -> tuple[DeadLetter, int]:
        """Republish the oldest dead letter with this id to the request exchange, then
        remove it; the others stay in order. Returns it and how many are left."""
        with _broker_errors(self.params):
            channel = self.connection.channel()
            channel.confirm_delivery()
            held = 0  # read before it, given back afterwards
            while True:
                method, properties, body = channel.basic_get(protocol.DEAD_LETTER_QUEUE)
                if method is None:
                    channel.basic_nack(0, multiple=True, requeue=True)
                    raise DeadLetterNotFound(
                        f"no dead letter has id {letter_id!r} (molteniron dead-letters lists them)")
                letter = describe(properties, body)
                if letter.id == letter_id:
                    break
                held += 1
            left = held + method.message_count  # message_count: those not read yet
            headers = {k: v for k, v in (properties.headers or {}).items()
                       if k not in DEATH_HEADERS}
            # It may have been handled before it was dead-lettered: the worker checks first.
            headers[protocol.COPY_HEADER] = True
            # The broker refuses a user_id other than the login: the request runs as the
            # caller. The broker removed its expiration when it dead-lettered it.
            republished = pika.BasicProperties(**{
                **{name: getattr(properties, name) for name in (
                    "content_type", "content_encoding", "delivery_mode", "priority",
                    "correlation_id", "reply_to", "message_id", "timestamp", "type", "app_id")},
                "headers": headers or None, "user_id": self.login})
            try:
                channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, body,
                                      republished, mandatory=True)
            except UnroutableError:
                raise errors.ServiceUnavailable(
                    f"{protocol.EXCHANGE} routes nowhere: the request queue does not exist "
                    f"(start molteniron-worker once); the dead letter stays") from None
            except NackError:
                raise errors.ServiceUnavailable(
                    "the broker refused the republished message (nack); the dead letter "
                    "stays") from None
            channel.basic_ack(method.delivery_tag)  # only once the broker has the copy
            channel.basic_nack(0, multiple=True, requeue=True)  # the others, in order
            channel.close()
            return letter, left

    def purge(self) -> int:
        """Empty the dead-letter queue; how many messages went."""
        with _broker_errors(self.params):
            channel = self.connection.channel()
            return channel.queue_purge(protocol.DEAD_LETTER_QUEUE).method.message_count


@contextmanager
def _broker_errors(params):
    """pika's errors as MoltenIron's: refused (403) means not the admin user."""
    from clients.client import _safe, _why
    try:
        yield
    except ChannelClosedByBroker as exc:
        if exc.reply_code == 403:
            raise errors.Forbidden(NEEDS_ADMIN) from None
        if exc.reply_code == 404:
            raise errors.ServiceUnavailable(
                f"{protocol.DEAD_LETTER_QUEUE} does not exist on {_safe(params)}: no "
                f"MoltenIron worker has ever started here") from None
        raise errors.ServiceUnavailable(f"the broker refused: {_why(exc)}") from None
    except (AMQPError, OSError) as exc:
        if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
            raise errors.Forbidden(f"{NEEDS_ADMIN}; this login may not use "
                                   f"{_safe(params)}") from None
        raise errors.ServiceUnavailable(
            f"cannot reach RabbitMQ at {_safe(params)}: {_why(exc)}") from None


def run(args, config) -> dict:
    """The CLI command: list (--show N), --requeue ID or --purge; the reply to print."""
    from molteniron import compat
    with DeadLetterQueue(config.amqp_url, args.timeout or config.request_timeout) as queue:
        if args.purge:
            purged = queue.purge()
            print(f"molteniron: purged {purged} dead letter(s)", file=sys.stderr)
            return {"status": 200, "purged": purged}
        if args.requeue:
            letter, left = queue.requeue(args.requeue)
            if letter.malformed:
                print(f"molteniron: warning: {letter.id} is {letter.detail}; the worker "
                      f"will reject it and it will land here again",
                      file=sys.stderr)
            print(f"molteniron: requeued {letter.id} ({letter.op or 'unknown op'}) as broker "
                  f"user {queue.login}; {left} dead letter(s) left", file=sys.stderr)
            return {"status": 200, "requeued": asdict(letter), "user": queue.login,
                    "left": left}
        letters, total = queue.show(args.show)
    rows = [asdict(letter) for letter in letters]
    table_type = args.type or ("human" if args.output == "result" else None)
    if table_type is None:
        return {"status": 200, "dead_letters": rows, "shown": len(rows), "total": total}
    if table_type == "json":
        return {"status": 200, "result": rows}
    print(f"molteniron: {len(rows)} of {total} dead letter(s), oldest first", file=sys.stderr)
    return {"status": 200, "result": compat.records_text(COLUMNS, rows, table_type)}
