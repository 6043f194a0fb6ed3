"""The raw phase: publish the messages with pika, then count replies and dead letters."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pika

from bench.badinput.messages import Message, dumps, envelope
from bench.badinput.pool import BARRIER_POOL, IDLE
from bench.env import Sandbox
from molteniron import protocol

PHASE_LIMIT = 150.0     # longest wait for the raw phase's replies, however steady
CONFIRM_WINDOW = 1000   # published messages not yet confirmed, at most


# --- the raw publisher --------------------------------------------------------------

class RawPublisher:
    """One connection: confirmed publishes on one channel, replies on our exclusive queue."""

    def __init__(self, amqp_url: str):
        self.connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        self.consumer = self.connection.channel()
        self.reply_queue = self.consumer.queue_declare("", exclusive=True).method.queue
        self.replies: list[tuple[Any, int | None]] = []
        self.last_reply_at = time.monotonic()
        self.barrier: str | None = None
        self.barrier_seen = False
        self.consumer.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)
        # The blocking channel waits for each confirm; the underlying one lets many be in flight.
        self.channel = self.connection.channel()._impl
        self.unconfirmed: set[int] = set()
        self.published = self.nacked = self.unroutable = 0
        self.selected = False
        self.channel.add_on_return_callback(self._on_return)
        self.channel.confirm_delivery(self._on_confirm, callback=self._on_selected)
        self.pump_until(lambda: self.selected, IDLE, "confirm.select-ok")

    def _on_selected(self, frame) -> None:
        self.selected = True

    def _on_confirm(self, frame) -> None:
        tag, multiple = frame.method.delivery_tag, frame.method.multiple
        done = {t for t in self.unconfirmed if t <= tag} if multiple else {tag}
        self.unconfirmed -= done
        if isinstance(frame.method, pika.spec.Basic.Nack):
            self.nacked += len(done)

    def _on_return(self, channel, method, properties, body) -> None:
        self.unroutable += 1

    def _on_reply(self, channel, method, properties, body) -> None:
        try:
            status = json.loads(body).get("status")
        except (ValueError, AttributeError):
            status = None
        if self.barrier is not None and properties.correlation_id == self.barrier:
            self.barrier_seen = True
        else:
            self.replies.append((properties.correlation_id, status))
        self.last_reply_at = time.monotonic()

    def publish(self, body: bytes, properties: dict) -> None:
        """Publish without waiting; wait only when too many are unconfirmed."""
        self.published += 1
        self.unconfirmed.add(self.published)
        self.channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, body,
                                   pika.BasicProperties(**properties), mandatory=True)
        if len(self.unconfirmed) >= CONFIRM_WINDOW:
            self.pump_until(lambda: len(self.unconfirmed) < CONFIRM_WINDOW // 2, 60,
                            "publisher confirms")
        else:
            self.connection.process_data_events(0)

    def pump_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
            self.connection.process_data_events(0.05)

    def dead_letters(self) -> int:
        return self.consumer.queue_declare(protocol.DEAD_LETTER_QUEUE,
                                           passive=True).method.message_count

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


# --- the raw phase ------------------------------------------------------------

WEIRD_CORRELATION_IDS: list[Callable[[int], Any]] = [
    lambda i: b"\xff\xfe" + str(i).encode(),        # not UTF-8: pika hands the worker bytes
    lambda i: f"ключ-{i}-\U0001f525",
    lambda i: f"{i}-".ljust(255, "z"),              # the longest a shortstr can be
    lambda i: "",
    lambda i: None,
]


def properties_for(message: Message, index: int, reply_queue: str, rng: random.Random) -> dict:
    """The message's own properties plus the reply address its route calls for."""
    properties = dict(message.properties)
    if message.route == "ours":
        properties["reply_to"] = reply_queue
        properties["correlation_id"] = (rng.choice(WEIRD_CORRELATION_IDS)(index)
                                        if message.properties else f"m{index}")
    elif message.route == "elsewhere":
        properties["reply_to"] = message.reply_to
        properties["correlation_id"] = f"m{index}"
    elif message.reply_to is not None:
        properties["reply_to"] = message.reply_to
    return properties


@dataclass
class RawOutcome:
    figures: dict
    checks: dict


def raw_phase(sandbox: Sandbox, worker, messages: list[Message], rng: random.Random) -> RawOutcome:
    """Publish every message, then a `status` barrier; count replies and dead letters."""
    publisher = RawPublisher(sandbox.amqp_url)
    try:
        dead_before = publisher.dead_letters()
        expected: dict[Any, list[int]] = {}
        for index, message in enumerate(messages):
            properties = properties_for(message, index, publisher.reply_queue, rng)
            if message.route == "ours":
                expected.setdefault(properties.get("correlation_id"), []).append(index)
            publisher.publish(message.body, properties)
        publisher.pump_until(lambda: not publisher.unconfirmed, 60, "the last confirms")
        publisher.barrier = f"barrier-{uuid.uuid4()}"
        publisher.publish(dumps(envelope("status", {"node_pool": BARRIER_POOL})),
                          {"reply_to": publisher.reply_queue, "correlation_id": publisher.barrier})
        barrier_seen = await_barrier(publisher, worker)
        # Without a reply_to a malformed message is dead-lettered, but an oversized one
        # is dropped: the worker keeps no copy of a body over its limit.
        dead_expected = sum(1 for m in messages
                            if m.route == "none" and m.kind != "oversized_body") + sum(
            m.dead_letters for m in messages if m.route == "elsewhere")
        dead = await_dead_letters(publisher, worker, dead_before + dead_expected) - dead_before
        return tally_raw(messages, expected, publisher.replies, dead, dead_expected, publisher,
                         barrier_seen)
    finally:
        publisher.close()


def await_barrier(publisher: RawPublisher, worker) -> bool:
    """Wait while replies keep coming; False if the worker died or stalled first."""
    started = time.monotonic()
    publisher.last_reply_at = max(publisher.last_reply_at, started)
    while not publisher.barrier_seen:
        now = time.monotonic()
        if (worker.poll() is not None or now - publisher.last_reply_at > IDLE
                or now - started > PHASE_LIMIT):
            return False
        publisher.connection.process_data_events(0.1)
    return True


def await_dead_letters(publisher: RawPublisher, worker, expected: int) -> int:
    """The dead-letter queue's depth once it reaches expected, or after IDLE seconds."""
    deadline = time.monotonic() + IDLE
    while True:
        depth = publisher.dead_letters()
        if depth >= expected or time.monotonic() > deadline or worker.poll() is not None:
            return depth
        publisher.connection.process_data_events(0.05)


def tally_raw(messages, expected, replies, dead, dead_expected, publisher,
              barrier_seen) -> RawOutcome:
    """Match replies to messages by correlation_id and count what went wrong, by kind."""
    got: dict[Any, list[int | None]] = {}
    for correlation_id, status in replies:
        got.setdefault(correlation_id, []).append(status)
    missing: Counter[str] = Counter()
    duplicates: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    examples: dict[str, str] = {}
    unanswered = []
    for correlation_id, indexes in expected.items():
        statuses = got.get(correlation_id, [])
        allowed = frozenset().union(*(messages[i].expect for i in indexes))
        for i in indexes[len(statuses):]:
            missing[messages[i].kind] += 1
            unanswered.append(i)
            examples.setdefault(f"no reply: {messages[i].kind}", repr(messages[i].body[:120]))
        if len(statuses) > len(indexes):
            duplicates[messages[indexes[0]].kind] += len(statuses) - len(indexes)
        for status, i in zip(statuses, indexes):
            if status not in allowed:
                unexpected[f"{messages[i].kind}:{status}"] += 1
                examples.setdefault(f"status {status}: {messages[i].kind}",
                                    repr(messages[i].body[:120]))
    strangers = sum(len(s) for cid, s in got.items() if cid not in expected)
    routes = Counter(m.route for m in messages)
    figures = {
        "sent": len(messages),
        "confirmed": publisher.published - len(publisher.unconfirmed) - publisher.nacked,
        "nacked": publisher.nacked, "unroutable": publisher.unroutable,
        "by_kind": dict(Counter(m.kind for m in messages)), "routes": dict(routes),
        "replies": len(replies), "replies_by_status": dict(Counter(s for _, s in replies)),
        "missing_by_kind": dict(missing), "duplicates_by_kind": dict(duplicates),
        "unexpected_by_kind_status": dict(unexpected), "replies_to_strangers": strangers,
        "examples": examples, "barrier_answered": barrier_seen,
        "first_unanswered": (f"#{min(unanswered)} of {len(messages)} "
                             f"({messages[min(unanswered)].kind})") if unanswered else None,
        "dead_lettered": dead, "dead_letters_expected": dead_expected,
        "sent_without_reply_to": routes["none"],
    }
    checks = {
        "all_published": (publisher.nacked == 0 and publisher.unroutable == 0
                          and figures["confirmed"] >= len(messages)),
        "replies_exactly_once": barrier_seen and not missing and not duplicates and not strangers,
        "statuses_expected": barrier_seen and not unexpected,
        "dead_lettered": dead == dead_expected,
    }
    return RawOutcome(figures, checks)
