"""Nobody crowds the pool out: a CI user's priority, number of waiting allocates and
wait are capped (max_priority, max_waiting_per_user, max_wait_seconds), and a client
that is gone loses every waiter it left within two ticks, wherever they stand."""

from __future__ import annotations

import pytest

from molteniron import protocol
from tests.raw import RawPublisher
from tests.stack import as_user, wait_until

MAX_WAITING = 3


@pytest.fixture
def crowded(stack, users, tmp_path):
    """A worker with authorization on, a waiting limit of MAX_WAITING, and one node that
    the admin holds, so that every other allocate waits."""
    config = tmp_path / "worker.yaml"
    config.write_text(f"max_waiting_per_user: {MAX_WAITING}\n")
    stack.start_worker(env={"MOLTENIRON_ADMINS": users["admin"]["name"],
                            "MOLTENIRON_CONFIG": str(config)})
    admin = users["admin"]["env"]
    assert stack.cli("add_baremetal", "node-1", "10.0.0.1", "admin", "secret-1", "10.1.0.1",
                     "aa:bb:cc:dd:ee:01", "x86_64", "8", "16384", "200", env=admin).returncode == 0
    assert stack.cli("allocate", "holder", "1", env=admin).returncode == 0
    return stack


def raw_of(users, role) -> RawPublisher:
    return RawPublisher(users[role]["env"]["MOLTENIRON_AMQP_URL"])


def test_a_priority_beyond_the_cap_is_refused_naming_it(crowded, users):
    bob = raw_of(users, "bob")
    try:
        for priority, names in ((101, "max_priority"), (-1, "max_priority"),
                                (2**31 - 1, "max_priority"), (2**31, "32-bit")):
            reply = bob.reply_to(bob.request("allocate", {"owner": "job-b", "count": 1,
                                                          "priority": priority}))
            assert reply["status"] == 400 and names in reply["message"], (priority, reply)
        reply = bob.reply_to(bob.request("allocate", {"owner": "job-b", "count": 1,
                                                      "priority": 100, "wait_seconds": 30}))
        assert reply["status"] == protocol.QUEUED, reply
    finally:
        bob.close()
    # An admin is trusted with any priority the column holds.
    admin = raw_of(users, "admin")
    try:
        reply = admin.reply_to(admin.request("allocate", {"owner": "urgent", "count": 1,
                                                          "priority": 10_000,
                                                          "wait_seconds": 30}))
    finally:
        admin.close()
    assert reply["status"] == protocol.QUEUED, reply
    assert crowded.sql("SELECT owner, priority FROM waiting_requests ORDER BY id") == [
        ("job-b", 100), ("urgent", 10_000)]


def test_a_wait_beyond_the_cap_is_refused_and_an_endless_one_is_capped(crowded, users):
    bob = raw_of(users, "bob")
    try:
        reply = bob.reply_to(bob.request("allocate", {"owner": "job-b", "count": 1,
                                                      "wait_seconds": 86401}))
        assert reply["status"] == 400 and "max_wait_seconds" in reply["message"], reply
        reply = bob.reply_to(bob.request("allocate", {"owner": "job-b", "count": 1}))
        assert reply["status"] == protocol.QUEUED, reply
    finally:
        bob.close()
    ((waits_for,),) = crowded.sql("SELECT deadline - UNIX_TIMESTAMP() FROM waiting_requests")
    assert waits_for == pytest.approx(86400, abs=60)


def test_a_user_beyond_its_waiting_limit_gets_429_and_the_cli_exits_1(crowded, users):
    bob = users["bob"]["env"]
    waiting = [crowded.cli_start("allocate", f"job-{i}", "1", "--wait", "60", env=bob)
               for i in range(MAX_WAITING)]
    wait_until(lambda: len(crowded.sql("SELECT id FROM waiting_requests")) == MAX_WAITING, 15,
               "bob's allocates to wait")
    refused = crowded.cli("allocate", "job-x", "1", "--wait", "60", env=bob)
    assert refused.returncode == 1, refused
    assert refused.json["status"] == 429 and refused.json["error"] == "TooManyRequests"
    assert f"{MAX_WAITING} waiting" in refused.json["message"]
    # Another user is not held back by bob's limit.
    alice = crowded.cli_start("allocate", "job-a", "1", "--wait", "60", env=users["alice"]["env"])
    wait_until(lambda: len(crowded.sql("SELECT id FROM waiting_requests")) == MAX_WAITING + 1,
               15, "alice's allocate to wait")
    for process in (*waiting, alice):
        process.process.terminate()
        process.result()


def test_a_gone_client_loses_every_waiter_it_left_wherever_they_stand(crowded, users):
    stack = crowded
    alice = stack.cli_start("allocate", "job-a", "1", "--wait", "60", env=users["alice"]["env"])
    wait_until(lambda: stack.sql("SELECT owner FROM waiting_requests") == [("job-a",)], 15,
               "alice's allocate to wait at the head")
    # Bob's client sends its allocates from one connection, behind alice, then dies.
    bob = raw_of(users, "bob")
    for i in range(MAX_WAITING):
        reply = bob.reply_to(bob.request("allocate", {"owner": f"job-b{i}", "count": 1}))
        assert reply["status"] == protocol.QUEUED, reply
    carol = raw_of(users, "admin")  # a live client whose waiter stands behind bob's
    reply = carol.reply_to(carol.request("allocate", {"owner": "job-c", "count": 1,
                                                      "wait_seconds": 60}))
    assert reply["status"] == protocol.QUEUED, reply
    bob.close()

    wait_until(lambda: [o for (o,) in stack.sql(
        "SELECT owner FROM waiting_requests ORDER BY id")] == ["job-a", "job-c"], 15,
        "every waiter of the gone client to be cancelled")
    assert as_user(stack, users, "admin", "release", "holder").returncode == 0
    assert alice.result().returncode == 0
    carol.close()
