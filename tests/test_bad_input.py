"""Malformed messages straight onto the request queue: an error reply or the
dead-letter queue, never a dead worker, never a changed pool."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from molteniron import protocol
from tests.raw import RawPublisher, valid
from tests.stack import node_args, wait_until


@pytest.fixture
def raw(running):
    publisher = RawPublisher(running.amqp_url)
    yield publisher
    publisher.close()


def pool_checksum(stack) -> list[tuple]:
    return stack.sql("SELECT id, name, state, owner, node_pool, cpus FROM nodes ORDER BY id")


BAD_REQUESTS = [
    (b"not json at all", "not JSON"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (json.dumps({"v": 2, "id": str(uuid.uuid4()), "op": "status"}).encode(), "field v"),
    (json.dumps({"v": 1, "id": "not-a-uuid", "op": "status"}).encode(), "field id"),
    *[(json.dumps({"v": 1, "id": other_form, "op": "status"}).encode(), "field id")
      for other_form in ("{12345678-1234-5678-1234-567812345678}",
                         "urn:uuid:12345678-1234-5678-1234-567812345678",
                         "12345678-1234-5678-1234-56781234567F",
                         "12345678123456781234567812345678",
                         "12345678-1234-5678-1234-567812345678\n")],
    (json.dumps(valid("launch_missiles", {})).encode(), "unknown operation"),
    (json.dumps(valid("allocate", {"owner": "x", "count": "two"})).encode(), "count"),
    (json.dumps(valid("allocate", {"owner": 7, "count": 1})).encode(), "owner"),
    (json.dumps(valid("allocate", {"owner": "x", "count": True})).encode(), "count"),
    (json.dumps(valid("allocate", {"count": 1})).encode(), "owner is required"),
    (json.dumps(valid("release", {"owner": "x", "extra": 1})).encode(), "unknown argument"),
    (json.dumps({**valid("status", {}), "deadline": "soon"}).encode(), "deadline"),
    (json.dumps({**valid("status", {}), "args": [1]}).encode(), "args"),
    (b"{" * 100_000, "not JSON"),
    (b"x" * (protocol.MAX_BODY_BYTES + 1), "larger than"),
]


def test_malformed_requests_get_an_error_reply_naming_the_problem(running, raw):
    running.cli("add_baremetal", *node_args(1))
    before = pool_checksum(running)
    for body, expected in BAD_REQUESTS:
        reply = raw.reply_to(raw.publish(body))
        assert reply["status"] == 400, (body[:60], reply)
        assert expected in reply["message"], (body[:60], reply)
    assert pool_checksum(running) == before
    assert running.cli("status").returncode == 0
    assert running.workers[0].poll() is None


def test_requests_without_reply_to_go_to_the_dead_letter_queue(running, raw):
    running.cli("add_baremetal", *node_args(1))
    before = pool_checksum(running)
    raw.publish(b"garbage without a reply address", reply=False)
    raw.publish(json.dumps(valid("allocate", {"owner": "anon", "count": 1})).encode(), reply=False)
    wait_until(lambda: running.dead_letters() == 2, 15, "two dead letters")
    assert pool_checksum(running) == before
    assert running.cli("status").returncode == 0


def test_a_client_clock_far_off_does_not_refuse_or_expire_a_request(running, raw):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    # A client whose clock is an hour ahead of the worker's (an old client's envelope
    # deadline already "passed"): its 5 s wait counts from when the worker takes it.
    skewed = {**valid("allocate", {"owner": "skewed", "count": 1, "wait_seconds": 5}),
              "deadline": time.time() - 3600}
    correlation = raw.publish(json.dumps(skewed).encode())
    wait_until(lambda: running.sql("SELECT owner FROM waiting_requests") == [("skewed",)], 15,
               "the skewed client's allocate to wait")
    running.cli("release", "holder")

    def final_reply():
        raw.connection.process_data_events(0.05)
        return next((r for r in raw.replies if r["correlation_id"] == correlation
                     and r["status"] != protocol.QUEUED), None)
    reply = wait_until(final_reply, 15, "the skewed client's grant", interval=0)
    assert reply["status"] == 200, reply
    assert running.sql("SELECT owner FROM nodes") == [("skewed",)]


def test_hostile_properties_do_not_hurt(running, raw):
    body = json.dumps(valid("status", {})).encode()
    reply = raw.reply_to(raw.publish(body, headers={"x": "y" * 10_000}, priority=9,
                                     content_type="text/evil", delivery_mode=2))
    assert reply["status"] == 200
    raw.publish(body, reply=False, reply_to="amq.no-such-queue", correlation_id="x")
    assert running.cli("status").returncode == 0
    assert running.workers[0].poll() is None
