"""Declares MoltenIron's exchanges and queues (idempotent; names from molteniron.protocol).

On a molteniron.broker.Channel, or on pika's own BlockingChannel (the tests' and the
bench's raw connections): the two share these methods' names and arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING

from molteniron import protocol

if TYPE_CHECKING:
    from molteniron.broker import Channel


def declare(channel: Channel) -> None:
    """Request exchange -> quorum request queue; dead-letter exchange -> dead-letter queue."""
    declare_requests(channel)
    declare_dead_letters(channel)


def declare_requests(channel: Channel) -> None:
    """What serving needs: both exchanges, the request queue and its binding."""
    channel.exchange_declare(protocol.EXCHANGE, "direct", durable=True)
    channel.exchange_declare(protocol.DEAD_LETTER_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(protocol.REQUEST_QUEUE, durable=True,
                          arguments=protocol.REQUEST_QUEUE_ARGUMENTS)
    channel.queue_bind(protocol.REQUEST_QUEUE, protocol.EXCHANGE,
                       routing_key=protocol.REQUEST_ROUTING_KEY)


def declare_dead_letters(channel: Channel) -> None:
    """The dead-letter queue. A classic queue lives on one node of a cluster: while that
    node is down, declaring it fails (404) on every other node."""
    channel.queue_declare(protocol.DEAD_LETTER_QUEUE, durable=True,
                          arguments=protocol.DEAD_LETTER_QUEUE_ARGUMENTS)
    channel.queue_bind(protocol.DEAD_LETTER_QUEUE, protocol.DEAD_LETTER_EXCHANGE)
