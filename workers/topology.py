"""Declares MoltenIron's exchanges and queues (idempotent; names from molteniron.protocol)."""

from __future__ import annotations

from pika.adapters.blocking_connection import BlockingChannel

from molteniron import protocol


def declare(channel: BlockingChannel) -> None:
    """Request exchange -> quorum request queue; dead-letter exchange -> dead-letter queue."""
    declare_requests(channel)
    declare_dead_letters(channel)


def declare_requests(channel: BlockingChannel) -> None:
    """What serving needs: both exchanges, the request queue and its binding."""
    channel.exchange_declare(protocol.EXCHANGE, "direct", durable=True)
    channel.exchange_declare(protocol.DEAD_LETTER_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(protocol.REQUEST_QUEUE, durable=True,
                          arguments=protocol.REQUEST_QUEUE_ARGUMENTS)
    channel.queue_bind(protocol.REQUEST_QUEUE, protocol.EXCHANGE,
                       routing_key=protocol.REQUEST_ROUTING_KEY)


def declare_dead_letters(channel: BlockingChannel) -> None:
    """The dead-letter queue. A classic queue lives on one node of a cluster: while that
    node is down, declaring it fails (404) on every other node."""
    channel.queue_declare(protocol.DEAD_LETTER_QUEUE, durable=True,
                          arguments=protocol.DEAD_LETTER_QUEUE_ARGUMENTS)
    channel.queue_bind(protocol.DEAD_LETTER_QUEUE, protocol.DEAD_LETTER_EXCHANGE)
