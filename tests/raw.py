"""A raw AMQP client for tests: publishes any body with any properties straight onto
the request queue and reads replies on an exclusive queue of its own, the way a
hand-made (or hostile) client would."""

from __future__ import annotations

import json
import uuid

import pika

from molteniron import protocol
from tests.stack import wait_until


class RawPublisher:
    """Publishes arbitrary bodies and properties, and reads replies on its own queue.

    user_id defaults to the login of amqp_url (the broker refuses any other)."""

    def __init__(self, amqp_url: str):
        params = pika.URLParameters(amqp_url)
        self.login = params.credentials.username
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.reply_queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.replies: list[dict] = []
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def _on_reply(self, channel, method, properties, body):
        self.replies.append({"correlation_id": properties.correlation_id, **json.loads(body)})

    def publish(self, body: bytes, reply: bool = True, **properties) -> str:
        correlation_id = str(uuid.uuid4())
        if reply:
            properties.setdefault("reply_to", self.reply_queue)
            properties.setdefault("correlation_id", correlation_id)
        properties.setdefault("user_id", self.login)
        self.channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, body,
                                   pika.BasicProperties(**properties))
        return correlation_id

    def request(self, op: str, args: dict, request_id: str | None = None, **properties) -> str:
        """Publish a well-formed request (a fresh id unless given); its correlation id."""
        return self.publish(json.dumps(valid(op, args, request_id)).encode(), **properties)

    def reply_to(self, correlation_id: str, timeout: float = 15) -> dict:
        def arrived():
            self.connection.process_data_events(0.05)
            return next((r for r in self.replies if r["correlation_id"] == correlation_id), None)
        return wait_until(arrived, timeout, f"a reply to {correlation_id}", interval=0)

    def close(self):
        if self.connection.is_open:
            self.connection.close()


def valid(op: str, args: dict, request_id: str | None = None) -> dict:
    return {"v": 1, "id": request_id or str(uuid.uuid4()), "op": op, "args": args,
            "deadline": None}
