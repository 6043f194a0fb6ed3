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

A requeued copy is published under the caller's login (the broker allows no
other user_id), so it carries protocol.ON_BEHALF_HEADER set to the user_id the
dead message was first sent with: the worker acts for that user, not for the
admin who requeued it, and refuses the header from anyone who is not an admin.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from molteniron import broker, errors, protocol
from molteniron.broker_params import NO_TLS_FILES
from molteniron.compat import SECRET_FIELDS

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
# Only for text that is not JSON (a truncated or broken body): a password's key, its
# letters as they are or as JSON \uXXXX escapes (at any depth of escaping), then the
# separator and the value. After `=` (an add_keyvalue_pairs word) the value is a quoted
# string or the rest of its string or line, spaces included; after `:` (JSON, or
# set_field's `"key": "ipmi_password", "value":`) a quoted string or one word.
_KEY_IN_TEXT = "".join(rf"(?:{re.escape(c)}|\\+u{ord(c):04x})" for c in "ipmi_password")
_QUOTED = r'\\*"(?:[^"\\]|\\.)*?(?:\\*"|$)'  # unclosed: to the end of the text
_PASSWORD_IN_TEXT = re.compile(
    rf'({_KEY_IN_TEXT}\\*"?\s*=\s*)({_QUOTED}|(?:[^"\\\n]|\\.)*)'
    rf'|({_KEY_IN_TEXT}\\*"?\s*(?::|,\s*\\*"value\\*"\s*:)\s*)({_QUOTED}|[^\s,;&}}\]"\\]+)',
    re.IGNORECASE)


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


def describe(properties: broker.Properties, body: bytes) -> DeadLetter:
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


def _why_malformed(properties: broker.Properties, body: bytes) -> str | None:
    """Why the worker's _decode would reject this message, or None if it would take it."""
    try:
        request = protocol.decode_request(body)
    except errors.BadRequest as exc:
        return exc.message[:150]
    if not properties.reply_to and not protocol.OPERATIONS[request.op].internal:
        return "request has no reply_to property"
    return None


def masked(body: bytes) -> str:
    """The body's first BODY_CHARS characters with every IPMI password replaced by MASK.

    A JSON body is masked as data: keys are compared once JSON has decoded them,
    at any depth, in strings that are JSON themselves (add_json_blob's blob) and
    in KEY=VALUE strings (add_keyvalue_pairs' words). Only a body that is not
    JSON (cut short, or broken) is masked as text."""
    text = body[:protocol.MAX_BODY_BYTES].decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return _mask_text(text)[:BODY_CHARS]
    try:
        return json.dumps(_mask(data), ensure_ascii=False)[:BODY_CHARS]
    except RecursionError:  # nested deeper than Python recurses: show none of it
        return "(JSON nested too deeply to show)"


def _is_secret(key) -> bool:
    """Whether a key (as JSON decoded it, or as a KEY=VALUE word has it) names a password."""
    return isinstance(key, str) and key.strip().strip("'\"").strip().lower() in SECRET_FIELDS


def _mask(value):
    """value (parsed JSON) with the value of every secret key replaced by MASK."""
    if isinstance(value, dict):
        out = {k: MASK if _is_secret(k) else _mask(v) for k, v in value.items()}
        if _is_secret(value.get("key")) and "value" in value:
            out["value"] = MASK  # set_field ID ipmi_password VALUE
        return out
    if isinstance(value, list):
        return [_mask(item) for item in value]
    if isinstance(value, str):
        return _mask_string(value)
    return value


def _mask_string(value: str) -> str:
    """A string inside a JSON body: JSON itself, a KEY=VALUE word, or plain text."""
    if value.lstrip()[:1] in ("{", "[", '"'):  # add_json_blob's blob, as a string
        try:
            inner = json.loads(value)
        except (ValueError, RecursionError):
            return _mask_text(value)  # looks like JSON but is not
        if isinstance(inner, (dict, list, str)):
            return json.dumps(_mask(inner), ensure_ascii=False)
        return value
    key, equals, _ = value.partition("=")
    if equals and _is_secret(key):  # the worker reads all after the first = as the value
        return key + equals + MASK
    return _mask_text(value)  # a password in free text, as in a maintenance reason


def _mask_text(text: str) -> str:
    return _PASSWORD_IN_TEXT.sub(_masked_value, text)


def _masked_value(match: re.Match) -> str:
    """The key and separator, then MASK in the value's own quotes (if it had them)."""
    if match.group(1) is not None:  # KEY=VALUE
        key, value = match.group(1), match.group(2)
    else:  # KEY: VALUE
        key, value = match.group(3), match.group(4)
    quote = re.match(r'\\*"', value)
    if quote is None:
        return key + MASK
    closed = len(value) > len(quote.group(0)) and value.endswith('"')
    return key + quote.group(0) + MASK + (quote.group(0) if closed else "")


class DeadLetterQueue:
    """The dead-letter queue, on one connection with the caller's login."""

    def __init__(self, amqp_url: str, timeout: float = 30.0, tls=NO_TLS_FILES):
        """tls: the configuration (or a TlsFiles) whose TLS files amqps:// URLs use."""
        self.brokers = broker.Brokers(amqp_url, tls, connect_timeout=min(timeout, 10.0))
        self.connection: Any = None  # a broker.Connection once entered
        self.login: str | None = None  # the broker user, once connected

    def __enter__(self) -> DeadLetterQueue:
        """Connect to the first of amqp_url's brokers that answers: BrokerRefused,
        BrokerNotTrusted or ServiceUnavailable if none does, as for every command."""
        self.connection = self.brokers.connect()
        self.login = self.connection.login
        return self

    def __exit__(self, *exc) -> None:
        if self.connection is not None:
            self.connection.close()

    def show(self, limit: int) -> tuple[list[DeadLetter], int]:
        """The oldest `limit` dead letters and how many there are, leaving the queue as it was."""
        with _broker_errors(self.connection.where):
            channel = self.connection.channel()
            letters: list[DeadLetter] = []
            total = 0  # when nothing is read; the read right is checked all the same
            for _ in range(limit):
                method, properties, body = channel.basic_get(protocol.DEAD_LETTER_QUEUE)
                if method is None:
                    break
                if not letters:  # message_count: those left after this one
                    total = method.message_count + 1
                letters.append(describe(properties, body))
            if letters:
                channel.basic_nack(0, multiple=True, requeue=True)  # all back, in order
            channel.close()
            return letters, total

    def requeue(self, letter_id: str) -> tuple[DeadLetter, int, str]:
        """Republish the oldest dead letter with this id to the request exchange, then
        remove it; the others stay in order. Returns it, how many are left, and the
        user the copy acts for ("" for none)."""
        with _broker_errors(self.connection.where):
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
            try:
                acting_for = _acting_for(letter, properties, self.login)
            except errors.Forbidden:
                channel.basic_nack(0, multiple=True, requeue=True)  # all back, in order
                raise
            headers = {k: v for k, v in (properties.headers or {}).items()
                       if k not in DEATH_HEADERS}
            # It may have been handled before it was dead-lettered: the worker checks first.
            headers[protocol.COPY_HEADER] = True
            # The broker refuses a user_id other than the login, so the copy is sent as the
            # caller; the worker acts for the user named here, not for the caller. The
            # broker removed its expiration when it dead-lettered it.
            headers[protocol.ON_BEHALF_HEADER] = acting_for
            republished = {name: getattr(properties, name) for name in (
                "content_type", "content_encoding", "delivery_mode", "priority",
                "correlation_id", "reply_to", "message_id", "timestamp", "type", "app_id")}
            try:
                channel.publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, body,
                                mandatory=True, **republished, headers=headers or None,
                                user_id=self.login)
            except errors.BrokerReturned:
                raise errors.ServiceUnavailable(
                    f"{protocol.EXCHANGE} routes nowhere: the request queue does not exist "
                    f"(start molteniron-worker once); the dead letter stays") from None
            except errors.BrokerNacked:
                raise errors.ServiceUnavailable(
                    "the broker refused the republished message (nack); the dead letter "
                    "stays") from None
            channel.basic_ack(method.delivery_tag)  # only once the broker has the copy
            channel.basic_nack(0, multiple=True, requeue=True)  # the others, in order
            channel.close()
            return letter, left, _text(acting_for)

    def purge(self) -> int:
        """Empty the dead-letter queue; how many messages went."""
        with _broker_errors(self.connection.where):
            channel = self.connection.channel()
            return channel.queue_purge(protocol.DEAD_LETTER_QUEUE)


def _acting_for(letter: DeadLetter, properties: broker.Properties, login: str | None):
    """Whom a requeued copy acts for: the user_id the dead message was sent with ("" if
    none), or, if it is a copy this login requeued before, the user that copy acted for.

    A header sent under another login is trusted by no one here: this tool cannot tell
    whether that login is an admin (whose header the worker honoured) or a user who
    forged it (and was refused), and either guess could act with more rights than the
    message ever had."""
    sent_by = properties.user_id or ""
    headers = properties.headers or {}
    if protocol.ON_BEHALF_HEADER not in headers:
        return sent_by
    claimed = headers[protocol.ON_BEHALF_HEADER]
    if sent_by and sent_by == login:
        return claimed
    raise errors.Forbidden(
        f"dead letter {letter.id} was sent by broker user {sent_by or '(none)'} with "
        f"{protocol.ON_BEHALF_HEADER} {_text(claimed)!r}: requeued by {login}, it could act "
        f"with rights it never had; only {sent_by or 'its sender'} may requeue it "
        f"(or --purge it)")


def _text(value) -> str:
    """A header value as text (pika gives bytes for one that is not UTF-8)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@contextmanager
def _broker_errors(where: str):
    """The broker's refusals in this tool's words: refused (403) means not the admin user."""
    try:
        yield
    except errors.BrokerClosedChannel as exc:
        if exc.reply_code == 403:
            raise errors.Forbidden(NEEDS_ADMIN) from None
        if exc.reply_code == 404:
            raise errors.ServiceUnavailable(
                f"{protocol.DEAD_LETTER_QUEUE} does not exist on {where}: no "
                f"MoltenIron worker has ever started here") from None
        raise errors.ServiceUnavailable(f"the broker refused: {exc.reply_code} "
                                        f"{exc.reply_text}") from None
    except errors.BrokerLost as exc:
        raise errors.ServiceUnavailable(
            f"cannot reach RabbitMQ at {where}: {exc.reason}") from None


def run(args, config) -> dict:
    """The CLI command: list (--show N), --requeue ID or --purge; the reply to print."""
    from molteniron import compat
    with DeadLetterQueue(config.amqp_url, args.timeout or config.request_timeout,
                         tls=config) as queue:
        if args.purge:
            purged = queue.purge()
            print(f"molteniron: purged {purged} dead letter(s)", file=sys.stderr)
            return {"status": 200, "purged": purged}
        if args.requeue:
            letter, left, acting_for = queue.requeue(args.requeue)
            if letter.malformed:
                print(f"molteniron: warning: {letter.id} is {letter.detail}; the worker "
                      f"will reject it and it will land here again",
                      file=sys.stderr)
            print(f"molteniron: requeued {letter.id} ({letter.op or 'unknown op'}) as broker "
                  f"user {queue.login}, for user {acting_for or '(none)'} who sent it; "
                  f"{left} dead letter(s) left", file=sys.stderr)
            return {"status": 200, "requeued": asdict(letter), "user": queue.login,
                    "on_behalf_of": acting_for, "left": left}
        letters, total = queue.show(args.show)
    rows = [asdict(letter) for letter in letters]
    table_type = args.type or ("human" if args.output == "result" else None)
    if table_type is None:
        return {"status": 200, "dead_letters": rows, "shown": len(rows), "total": total}
    if table_type == "json":
        return {"status": 200, "result": rows}
    print(f"molteniron: {len(rows)} of {total} dead letter(s), oldest first", file=sys.stderr)
    return {"status": 200, "result": compat.records_text(COLUMNS, rows, table_type)}
