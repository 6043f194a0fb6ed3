"""The broker's own limits from the deploy kit, on a private RabbitMQ node set up as an
operator would: deploy/rabbitmq.conf in its conf.d, deploy/rabbitmq-definitions.json
imported.

- max_message_size: a login publishing more than that to the request exchange has its
  channel closed by the broker, and nothing is queued; messages of the sizes MoltenIron
  sends (requests up to protocol.MAX_BODY_BYTES, replies up to a few MB) go through.
- the dead-letter queue's byte limit comes from a policy (not a queue argument, which
  would make the worker's declare fail with 406), oldest dropped first.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from bench.private import PrivateRabbitMQ
from molteniron import protocol
from molteniron.workers import topology
from tests.stack import ROOT, wait_until

KIT_CONF = ROOT / "deploy" / "rabbitmq.conf"
DEFINITIONS = json.loads((ROOT / "deploy" / "rabbitmq-definitions.json").read_text())
VHOST = DEFINITIONS["vhosts"][0]["name"]
MiB = 1024 * 1024


def max_message_size() -> int:
    (value,) = re.findall(r"^max_message_size\s*=\s*(\d+)\s*$", KIT_CONF.read_text(), re.M)
    return int(value)


def dead_letter_policy() -> dict:
    (policy,) = [p for p in DEFINITIONS.get("policies", [])
                 if re.fullmatch(p["pattern"], protocol.DEAD_LETTER_QUEUE)]
    return policy


class KitBroker:
    def __init__(self, rabbit: PrivateRabbitMQ):
        self.rabbit = rabbit
        self.passwords: dict[str, str] = {}

    def connect(self, user: str) -> pika.BlockingConnection:
        """A connection as one of the definitions' users, to their vhost."""
        if user not in self.passwords:
            self.passwords[user] = uuid.uuid4().hex
            self.rabbit.ctl("change_password", user, self.passwords[user])
        return pika.BlockingConnection(pika.URLParameters(
            f"amqp://{user}:{self.passwords[user]}@127.0.0.1:{self.rabbit.port}/{VHOST}"))

    def queues(self, *columns: str) -> dict[str, list[str]]:
        out = self.rabbit.ctl("list_queues", "-q", "-p", VHOST, "--no-table-headers",
                              "name", *columns)
        return {row[0]: row[1:] for row in (line.split("\t") for line in out.splitlines()) if row}


@pytest.fixture(scope="module")
def kit_broker():
    rabbit = PrivateRabbitMQ()
    try:
        shutil.copy(KIT_CONF, rabbit.dir / "conf.d" / "50-molteniron.conf")
        definitions = rabbit.dir / "rabbitmq-definitions.json"  # absolute, as ctl needs
        shutil.copy(ROOT / "deploy" / "rabbitmq-definitions.json", definitions)
    except BaseException:
        rabbit.stop()
        raise
    with rabbit:
        rabbit.ctl("import_definitions", str(definitions))
        broker = KitBroker(rabbit)
        # The import is asynchronous: wait for its last objects.
        wait_until(lambda: {q["name"] for q in DEFINITIONS["queues"]} <= set(broker.queues()),
                   30, "the import of the definitions", interval=0.2)
        yield broker


def test_a_ci_login_cannot_publish_more_than_max_message_size(kit_broker):
    limit = max_message_size()
    # Above the largest request the worker takes, and below what the issue calls abuse.
    assert protocol.MAX_BODY_BYTES * 3 < limit < 5 * MiB
    connection = kit_broker.connect("molteniron-ci")
    channel = connection.channel()
    channel.confirm_delivery()

    def publish(size: int) -> None:
        channel.basic_publish(
            protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, b"x" * size,
            pika.BasicProperties(user_id="molteniron-ci", delivery_mode=2), mandatory=True)

    # A 100 KB request, and one of 3 MB: about the worker's largest reply (history
    # --limit 10000), which goes through the same limit.
    publish(100 * 1000)
    publish(3 * 1000 * 1000)
    worker = kit_broker.connect("molteniron-worker").channel()

    def queued() -> int:
        return worker.queue_declare(protocol.REQUEST_QUEUE, passive=True).method.message_count

    assert queued() == 2  # confirmed: both are in the queue

    with pytest.raises(ChannelClosedByBroker) as refused:
        publish(5 * MiB)
    assert refused.value.reply_code == 406
    assert refused.value.reply_text == (f"PRECONDITION_FAILED - message size {5 * MiB} is "
                                        f"larger than configured max size {limit}")
    assert channel.is_closed and connection.is_open
    assert queued() == 2
    connection.close()
    worker.connection.close()


def test_the_definitions_cap_the_dead_letter_queue_by_a_policy(kit_broker):
    policy = dead_letter_policy()
    byte_limit = policy["definition"]["max-length-bytes"]
    assert policy["definition"]["overflow"] == "drop-head"
    assert max_message_size() < byte_limit <= 256 * MiB
    # The policy the queue runs under (the one of highest priority that matches it).
    wait_until(lambda: kit_broker.queues("policy")[protocol.DEAD_LETTER_QUEUE] == [policy["name"]],
               30, "the policy on the dead-letter queue", interval=0.2)

    # The queue's arguments are the worker's own: its declare at start still works.
    worker = kit_broker.connect("molteniron-worker")
    topology.declare(worker.channel())

    # Dead letters over the byte limit: the oldest go, the newest stay.
    size = max_message_size() - 1000
    count = byte_limit // size + 1
    channel = worker.channel()
    channel.confirm_delivery()
    for n in range(count):
        channel.basic_publish(protocol.DEAD_LETTER_EXCHANGE, "", b"%06d" % n + b"x" * (size - 6))
    worker.close()
    kept = byte_limit // size
    wait_until(lambda: kit_broker.queues("messages", "message_bytes")[protocol.DEAD_LETTER_QUEUE]
               == [str(kept), str(kept * size)], 30, f"{kept} dead letters kept")
    admin = kit_broker.connect("molteniron-admin")
    channel = admin.channel()
    method, _, body = channel.basic_get(protocol.DEAD_LETTER_QUEUE)
    assert body[:6] == b"%06d" % (count - kept)  # the first ones were dropped
    channel.basic_nack(method.delivery_tag, requeue=True)
    admin.close()
