"""A no-op worker on MoltenIron's own queue and reply path: the broker's ceiling.

Same quorum request queue (declared by workers.topology), same persistent,
confirmed requests, same exclusive reply queues and mandatory replies; it
only skips the database and the pool logic. Run: python -m bench.echo_worker
"""

from __future__ import annotations

import json
import os
import signal

import pika

from molteniron import protocol
from molteniron.workers import topology

PREFETCH = 128


def main() -> None:
    connection = pika.BlockingConnection(pika.URLParameters(os.environ["MOLTENIRON_AMQP_URL"]))
    channel = connection.channel()
    topology.declare(channel)
    channel.basic_qos(prefetch_count=PREFETCH)
    pending: list = []
    channel.basic_consume(protocol.REQUEST_QUEUE,
                          lambda ch, m, p, b: pending.append((m, p, b)), auto_ack=False)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    while not stopping:
        connection.process_data_events(time_limit=0.5)
        if not pending:
            continue
        connection.process_data_events(0)
        batch, pending[:] = list(pending), []
        for _method, properties, body in batch:
            if properties.reply_to:
                request_id = json.loads(body).get("id")
                channel.basic_publish("", properties.reply_to,
                                      protocol.reply_body(request_id, {"status": 200}),
                                      pika.BasicProperties(correlation_id=properties.correlation_id),
                                      mandatory=True)
        channel.basic_ack(batch[-1][0].delivery_tag, multiple=True)
    connection.close()


if __name__ == "__main__":
    main()
