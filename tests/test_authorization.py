"""Who may do what: identities from the broker, owners bound to them, secrets kept secret.

Broker users are made with rabbitmqctl in the test run's vhost; the worker runs
with `admins` naming one of them (MOLTENIRON_ADMINS).
"""

from __future__ import annotations

import json
import time

import pika

from molteniron import protocol
from tests.stack import as_user, assert_forbidden, node_args, wait_until


def owners(stack):
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def test_an_owner_is_bound_to_the_user_who_allocated_it(secured, users):
    stack, alice, bob = secured, users["alice"]["name"], users["bob"]["name"]
    granted = as_user(stack, users, "alice", "allocate", "job-a", "1")
    assert granted.returncode == 0, granted
    assert json.loads(granted.json["nodes"]["node_1"]["blob"])["ipmi_password"] == "secret-1"

    for args in (("allocate", "job-a", "1"), ("release", "job-a"), ("renew", "job-a"),
                 ("get_field", "job-a", "ipmi_password")):
        assert_forbidden(as_user(stack, users, "bob", *args), args[0], bob)
    assert owners(stack) == {"node-1": "job-a", "node-2": None}  # nothing changed

    assert as_user(stack, users, "alice", "renew", "job-a").returncode == 0
    field = as_user(stack, users, "alice", "get_field", "job-a", "ipmi_password")
    assert field.json["result"] == [{"id": 1, "field": "secret-1"}]
    assert as_user(stack, users, "alice", "release", "job-a").returncode == 0
    # Released: the name is free again, for anyone.
    assert as_user(stack, users, "bob", "allocate", "job-a", "1").returncode == 0
    assert stack.sql("SELECT owner, user FROM allocations ORDER BY id") == [
        ("job-a", alice), ("job-a", bob)]


def test_a_waiting_owner_is_bound_too_and_only_its_user_may_cancel_it(secured, users):
    stack = secured
    as_user(stack, users, "alice", "allocate", "holder", "2")
    waiting = stack.cli_start("allocate", "job-a", "1", "--wait", "60", env=users["alice"]["env"])
    wait_until(lambda: stack.sql("SELECT owner FROM waiting_requests") == [("job-a",)], 15,
               "alice's allocate to wait")
    (request_id,) = stack.sql("SELECT request_id FROM waiting_requests")[0]

    assert_forbidden(as_user(stack, users, "bob", "cancel", request_id), "cancel",
                     users["bob"]["name"])
    assert_forbidden(as_user(stack, users, "bob", "allocate", "job-a", "1", "--no-wait"),
                     "allocate", users["bob"]["name"])
    assert stack.sql("SELECT owner FROM waiting_requests") == [("job-a",)]

    assert as_user(stack, users, "alice", "cancel", request_id).json["cancelled"] == "waiting"
    assert waiting.result().returncode == 1


def test_only_admins_manage_the_pool_and_see_secrets(secured, users):
    stack, bob = secured, users["bob"]["name"]
    refused = {
        "add_baremetal": ("add_baremetal", *node_args(3)),
        "set_field": ("set_field", "1", "status", "maintenance"),
        "delete_db": ("delete_db",),
        "status": ("status", "--show-secrets"),
    }
    for op, args in refused.items():
        assert_forbidden(as_user(stack, users, "bob", *args), op, bob)
    assert owners(stack) == {"node-1": None, "node-2": None}
    assert stack.sql("SELECT state FROM nodes WHERE id = 1") == [("ready",)]

    seen = as_user(stack, users, "bob", "status", "-t", "json")
    assert seen.returncode == 0 and {n["ipmi_password"] for n in seen.json["result"]} == {
        "********"}
    for args in (("waiting",), ("workers",)):
        assert as_user(stack, users, "bob", *args).returncode == 0

    as_user(stack, users, "alice", "allocate", "job-a", "1")
    for args in (("status", "--show-secrets", "-t", "json"),
                 ("get_field", "job-a", "ipmi_password"),
                 ("set_field", "2", "status", "maintenance"), ("release", "job-a")):
        done = as_user(stack, users, "admin", *args)
        assert done.returncode == 0, (args, done)


def test_a_request_without_user_id_is_refused_when_authorization_is_on(secured):
    connection = pika.BlockingConnection(pika.URLParameters(secured.amqp_url))
    channel = connection.channel()
    reply_queue = channel.queue_declare("", exclusive=True).method.queue
    replies = []
    channel.basic_consume(reply_queue, lambda ch, m, p, body: replies.append(json.loads(body)),
                          auto_ack=True)
    request = protocol.new_request("delete_db")
    channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, request.to_body(),
                          pika.BasicProperties(reply_to=reply_queue, correlation_id=request.id))
    deadline = time.time() + 15
    while not replies and time.time() < deadline:
        connection.process_data_events(0.1)
    connection.close()
    assert replies and replies[0]["status"] == 400 and "user_id" in replies[0]["message"]
    assert secured.sql("SELECT COUNT(*) FROM nodes") == [(2,)]


def test_a_worker_without_admins_refuses_to_start_and_says_how_to_choose(stack):
    worker = stack.start_worker(env={"MOLTENIRON_ADMINS": ""}, ready=False)
    assert worker.wait(timeout=60) == 2
    log = stack.worker_log()
    assert "admins is not set" in log and "admins: off" in log


def test_with_admins_off_on_purpose_the_worker_serves_and_warns(running):
    assert "event=authorization_off" in running.worker_log()


def test_no_password_in_stored_replies_logs_or_status(secured, users):
    stack = secured
    alice = users["alice"]["env"]
    granted = stack.cli("allocate", "job-a", "1", env=alice)
    assert "secret-1" in granted.stdout  # the job itself gets it
    stack.cli("allocate", "job-a", "5", "--no-wait", env=alice)  # refused: too many
    stack.cli("set_field", "2", "ipmi_password", "s3cr3t-two", env=users["admin"]["env"])
    with stack.client(timeout=10) as client:  # a redelivered grant is rendered again
        request = protocol.new_request("allocate", {"owner": "job-x", "count": 1})
        client.send(request, expires_in=30)
        first = client.wait(request.id, time.time() + 30)
        client.send(request, expires_in=30)
        replayed = client.wait(request.id, time.time() + 30)
    assert first == replayed and "s3cr3t-two" in first["nodes"]["node_2"]["blob"]
    stack.cli("release", "job-a", env=alice)
    status = stack.cli("status", env=users["bob"]["env"])

    stored = str(stack.sql("SELECT reply FROM processed_requests"))
    outbox = str(stack.sql("SELECT reply FROM grant_outbox"))
    for secret in ("secret-1", "secret-2", "s3cr3t-two"):
        assert secret not in stored and secret not in outbox
        assert secret not in stack.worker_log()
        assert secret not in status.stdout
    assert "********" in stored  # the grant was stored, without its password


def test_only_workers_may_send_ticks(secured, users, amqp_url):
    alice = pika.URLParameters(users["alice"]["env"]["MOLTENIRON_AMQP_URL"])
    connection = pika.BlockingConnection(alice)
    tick = protocol.new_request("tick")
    connection.channel().basic_publish(
        protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, tick.to_body(),
        pika.BasicProperties(user_id=alice.credentials.username))
    connection.close()
    wait_until(lambda: secured.dead_letters() == 1, 15, "the forged tick to be dead-lettered")
    assert "tick is sent by workers" in secured.worker_log()
