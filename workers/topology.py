"""Declares MoltenIron's exchanges and queues (idempotent; names from molteniron.protocol)."""

from __future__ import annotations

from pika.adapters.blocking_connection import BlockingChannel

from molteniron import protocol


def declare(channel: BlockingChannel) -> None:
    """Request exchange -> quorum request queue; dead-letter exchange -> dead-letter queue."""
    channel.exchange_declare(protocol.EXCHANGE, "direct", durable=True)
    channel.exchange_declare(protocol.DEAD_LETTER_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(protocol.DEAD_LETTER_QUEUE, durable=True,
                          arguments=protocol.DEAD_LETTER_QUEUE_ARGUMENTS)
    channel.queue_bind(protocol.DEAD_LETTER_QUEUE, protocol.DEAD_LETTER_EXCHANGE)
    channel.queue_declare(protocol.REQUEST_QUEUE, durable=True,
                          arguments=protocol.REQUEST_QUEUE_ARGUMENTS)
    channel.queue_bind(protocol.REQUEST_QUEUE, protocol.EXCHANGE,
                       routing_key=protocol.REQUEST_ROUTING_KEY)
