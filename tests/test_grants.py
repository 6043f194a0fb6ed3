"""Grants that reach no one: durable before they are sent, undone when they come back."""

from __future__ import annotations

import json
import time

from pika.exceptions import AMQPConnectionError
from sqlalchemy import text

from molteniron import protocol
from tests.stack import node_args, wait_until


def waiting_owners(stack):
    return [r[0] for r in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def owners(stack):
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def start_active_and_standby(stack, active_env=None):
    stack.start_worker(env=active_env)
    stack.start_worker(ready=False)
    wait_until(lambda: "event=consuming" in stack.worker_log(1), 30, "the standby to consume")


def test_a_waiter_is_told_of_its_grant_when_the_worker_dies_right_after_committing_it(stack):
    start_active_and_standby(stack, {"MOLTENIRON_FAULT": "exit-after-commit:release"})
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("allocate", "holder", "1")
    patient = stack.cli_start("allocate", "patient", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(stack) == ["patient"], 15, "patient to wait")

    stack.cli("release", "holder")  # the grant to patient is committed, then the worker dies

    assert stack.workers[0].wait(timeout=15) == 70
    result = patient.result(timeout=60)
    assert result.returncode == 0, result
    assert list(result.json["nodes"]) == ["node_1"]
    assert owners(stack) == {"node-1": "patient"}
    wait_until(lambda: stack.sql("SELECT COUNT(*) FROM grant_outbox") == [(0,)], 15,
               "the re-sent grant to be confirmed and leave the outbox")


def test_a_returned_grant_is_undone_even_when_the_worker_dies_during_the_undo(stack):
    start_active_and_standby(stack)
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("allocate", "holder", "1")
    doomed = stack.cli_start("allocate", "doomed", "1", "--wait", "600")
    wait_until(lambda: waiting_owners(stack) == ["doomed"], 15, "doomed to wait")
    with stack.engine.begin() as conn:  # hold the undo's commit open for 10 s
        conn.execute(text("CREATE TRIGGER slow_undo BEFORE UPDATE ON allocations FOR EACH ROW "
                          "IF NEW.end_reason = 'client_gone' THEN SET @x = SLEEP(10); END IF"))
    try:
        with stack.worker_stopped():  # else a tick may cancel doomed's wait before the grant
            stack.kill_waiting_client(doomed, "doomed")
            releasing = stack.cli_start("release", "holder")  # serves doomed; it bounces
            wait_until(lambda: stack.requests_queued() >= 1, 15, "the release to be queued")
        assert releasing.result().returncode == 0
        wait_until(lambda: stack.sql("SELECT returned FROM grant_outbox") == [(1,)], 15,
                   "the return to be written down")
        stack.workers[0].kill()  # while the undo is still blocked in its commit
        stack.workers[0].wait()
    finally:
        with stack.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS slow_undo"))

    wait_until(lambda: owners(stack) == {"node-1": None}, 30, "the standby to undo the grant")
    assert stack.sql("SELECT owner, end_reason FROM allocations ORDER BY id") == [
        ("holder", "released"), ("doomed", "client_gone")]
    assert stack.sql("SELECT COUNT(*) FROM grant_outbox") == [(0,)]
    assert stack.cli("allocate", "next", "1", "--no-wait").returncode == 0


def test_a_grant_to_a_client_gone_before_the_grant_is_undone_and_the_next_waiter_served(stack):
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("allocate", "holder", "1")
    gone = stack.cli_start("allocate", "gone", "1", "--wait", "600")
    wait_until(lambda: waiting_owners(stack) == ["gone"], 15, "gone to wait")
    patient = stack.cli_start("allocate", "patient", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(stack) == ["gone", "patient"], 15, "patient to wait")
    stack.kill_waiting_client(gone, "gone")

    stack.cli("release", "holder")

    result = patient.result(timeout=60)
    assert result.returncode == 0, result
    assert owners(stack) == {"node-1": "patient"}
    # Whether the return of its interim reply or of its grant told the worker first,
    # `gone` holds nothing.
    assert stack.sql("SELECT COUNT(*) FROM allocations WHERE owner = 'gone' "
                     "AND ended_at IS NULL") == [(0,)]


def test_a_grant_confirmed_as_delivered_leaves_the_outbox_and_keeps_its_nodes(running):
    running.cli("add_baremetal", *node_args(1))
    result = running.cli("allocate", "job-1", "1")
    assert result.returncode == 0, result
    # The CLI has exited: its reply queue is gone. Delivered means kept all the same.
    wait_until(lambda: running.sql("SELECT COUNT(*) FROM grant_outbox") == [(0,)], 15,
               "the outbox to empty")
    running.cli("status")  # one more batch after the confirm
    assert owners(running) == {"node-1": "job-1"}


def test_a_lock_held_by_someone_else_is_waited_out_not_dead_lettered(stack, database_url):
    # A one-second lock wait timeout makes the worker meet MariaDB error 1205 at once.
    impatient = f"{database_url}?init_command=SET+SESSION+innodb_lock_wait_timeout%3D1"
    stack.start_worker(env={"MOLTENIRON_DB_URL": impatient})
    with stack.client() as client:
        with stack.engine.connect() as holder:
            holder.execute(text("SELECT epoch FROM worker_meta WHERE id = 1 FOR UPDATE"))
            request = protocol.new_request("add_baremetal", dict(zip(
                ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool",
                 "port_hwaddr", "cpu_arch"), node_args(1)[:7]), cpus=8, ram_mb=1, disk_gb=1))
            client.send(request, expires_in=60)
            wait_until(lambda: stack.worker_log().count("event=db_lock_conflict") >= 3, 30,
                       "the worker to meet the lock several times")
            holder.rollback()
        reply = client.wait(request.id, time.time() + 30)
    assert reply["status"] == 200, reply
    assert stack.sql("SELECT name FROM nodes") == [("node-1",)]
    assert stack.dead_letters() == 0
    assert stack.workers[0].poll() is None


def queued_ids_and_headers(stack, count: int) -> list[tuple]:
    """The id and headers of the first `count` requests in the request queue."""
    connection, channel = stack.channel()
    try:
        seen: list[tuple] = []
        for method, properties, body in channel.consume(protocol.REQUEST_QUEUE,
                                                        inactivity_timeout=10):
            assert method is not None, f"only {len(seen)} of {count} requests reached the queue"
            seen.append((json.loads(body)["id"], properties.headers))
            if len(seen) == count:
                break
        return seen
    finally:
        connection.close()


def test_a_request_its_client_sends_again_is_marked_as_a_copy(running):
    """The worker reads the stored replies before handling a marked copy: it may have
    been answered, its reply lost with the connection (tests/test_fence_in_trip.py)."""
    running.stop_workers()
    with running.client() as client:
        release = protocol.new_request("release", {"owner": "job-1"})
        client.send(release, expires_in=None)
        client.send(release, expires_in=None)  # as after a lost connection, before its reply
    assert queued_ids_and_headers(running, 2) == [(release.id, None),
                                                  (release.id, {protocol.COPY_HEADER: True})]


def publish_then_lose_the_connection(client, monkeypatch) -> list[bool]:
    """The client's first publish reaches the queue, then its connection fails before
    the broker's confirm: the client cannot know whether the request got there."""
    published = client._publish
    copies = []

    def publish(request, expires_in, copy=False):
        copies.append(copy)
        published(request, expires_in, copy)
        if len(copies) == 1:
            raise AMQPConnectionError("connection lost before the confirm")

    monkeypatch.setattr(client, "_publish", publish)
    return copies


def test_a_request_sent_again_after_a_failed_publish_is_marked_as_a_copy(running, monkeypatch):
    running.stop_workers()
    with running.client() as client:
        copies = publish_then_lose_the_connection(client, monkeypatch)
        release = protocol.new_request("release", {"owner": "job-1"})
        client.send(release, expires_in=None)
    assert copies == [False, True]
    assert queued_ids_and_headers(running, 2) == [(release.id, None),
                                                  (release.id, {protocol.COPY_HEADER: True})]


def test_an_allocate_sent_twice_after_a_failed_publish_holds_its_nodes_once(running,
                                                                            monkeypatch):
    """The first copy is handled after its reply queue went with the lost connection:
    its grant bounces and is undone, or the copy from the new queue is answered with
    it first. Either way the job holds exactly the nodes it was told of."""
    for i in (1, 2, 3):
        running.cli("add_baremetal", *node_args(i))
    running.stop_workers()
    with running.client() as client:
        copies = publish_then_lose_the_connection(client, monkeypatch)
        allocate = protocol.new_request("allocate", {"owner": "job", "count": 1, "wait": False})
        client.send(allocate, expires_in=60)
        running.start_worker()
        reply = client.wait(allocate.id, time.time() + 30)
    assert copies == [False, True]
    assert reply is not None and reply["status"] == 200, reply
    wait_until(lambda: not running.sql("SELECT COUNT(*) FROM grant_outbox")[0][0], 15,
               "both grants to be settled")
    held = [name for name, owner in owners(running).items() if owner == "job"]
    assert [node["name"] for node in reply["nodes"].values()] == held
    assert running.sql("SELECT COUNT(*) FROM allocations WHERE owner = 'job' "
                       "AND ended_at IS NULL") == [(1,)]


def test_cancel_of_a_request_that_was_not_an_allocate_keeps_its_reply(running):
    running.cli("add_baremetal", *node_args(1))
    with running.client() as client:
        add = protocol.new_request("add_baremetal", dict(zip(
            ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool",
             "port_hwaddr", "cpu_arch"), node_args(2)[:7]), cpus=8, ram_mb=1, disk_gb=1))
        client.send(add, expires_in=30)
        assert client.wait(add.id, time.time() + 30)["status"] == 200
        cancelled = client.cancel(add.id)
        assert cancelled["cancelled"] == "not_an_allocate"
        client.send(add, expires_in=30)  # redelivered: answered from its stored reply
        assert client.wait(add.id, time.time() + 30)["status"] == 200
    assert "RequestCancelled" not in str(running.sql(
        "SELECT reply FROM processed_requests WHERE op = 'add_baremetal'"))
