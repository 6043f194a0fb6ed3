"""`molteniron dead-letters`: list what landed in the dead-letter queue and why, requeue, purge."""

from __future__ import annotations

import json
import uuid

import pika
import pytest

from molteniron import protocol
from molteniron.clients.dead_letters import MASK, NEEDS_ADMIN, masked
from molteniron.workers import topology
from tests.raw import RawPublisher, valid
from tests.stack import node_args, wait_until

NODE_FIELDS = ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool",
               "port_hwaddr", "cpu_arch", "cpus", "ram_mb", "disk_gb", "node_pool")


def add_baremetal(i: int, password: str | None = None) -> dict:
    fields: dict[str, str | int] = dict(zip(NODE_FIELDS, node_args(i)))
    fields.update(cpus=8, ram_mb=16384, disk_gb=200)
    if password:
        fields["ipmi_password"] = password
    return valid("add_baremetal", fields)


@pytest.fixture
def raw(stack):
    """A publisher on a stack with the queues declared and NO worker consuming them."""
    connection, channel = stack.channel()
    topology.declare(channel)
    connection.close()
    publisher = RawPublisher(stack.amqp_url)
    yield publisher
    publisher.close()


def expire(stack, raw, *requests: dict | bytes) -> list[str]:
    """Publish requests with a 1 ms TTL while no worker consumes: they die `expired`."""
    before = stack.dead_letters()
    for request in requests:
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        raw.publish(body, expiration="1", delivery_mode=2,
                    user_id=pika.URLParameters(stack.amqp_url).credentials.username)
    wait_until(lambda: stack.dead_letters() == before + len(requests), 15, "the dead letters")
    return [r["id"] for r in requests if isinstance(r, dict)]


def listed(stack, *args: str) -> list[dict]:
    done = stack.cli("dead-letters", *args)
    assert done.returncode == 0, done
    return done.json["dead_letters"]


def test_a_malformed_message_without_reply_to_is_listed_as_rejected(running):
    raw = RawPublisher(running.amqp_url)
    raw.publish(b"garbage without a reply address", reply=False)
    wait_until(lambda: running.dead_letters() == 1, 15, "the dead letter")
    raw.close()
    (letter,) = listed(running)
    assert letter["reason"] == "rejected"
    assert letter["detail"].startswith("malformed: request body is not JSON")
    assert letter["queue"] == protocol.REQUEST_QUEUE
    assert letter["id"].startswith("sha256:") and letter["op"] is None
    assert letter["body"] == "garbage without a reply address"
    assert letter["died_at"] and letter["malformed"] is True
    assert running.dead_letters() == 1


def test_an_allocate_that_expired_unconsumed_is_listed_as_expired_with_its_op(stack, raw):
    (request_id,) = expire(stack, raw, valid("allocate", {"owner": "job-1", "count": 1}))
    done = stack.cli("dead-letters")
    assert done.returncode == 0, done
    assert done.json["total"] == 1
    (letter,) = done.json["dead_letters"]
    assert (letter["id"], letter["op"], letter["reason"], letter["queue"]) == (
        request_id, "allocate", "expired", protocol.REQUEST_QUEUE)
    assert letter["malformed"] is False and letter["user"] == "guest"


def test_show_leaves_the_queue_exactly_as_it_was(stack, raw):
    ids = expire(stack, raw, *(valid("release", {"owner": f"job-{i}"}) for i in range(6)))
    assert [row["id"] for row in listed(stack)] == ids  # oldest first
    assert [row["id"] for row in listed(stack, "--show", "3")] == ids[:3]
    for table in ("human", "csv"):
        done = stack.cli("dead-letters", "-t", table)
        assert done.returncode == 0 and all(i in done.stdout for i in ids), done
    assert stack.cli("dead-letters", "-t", "json").json["result"][0]["id"] == ids[0]
    assert stack.dead_letters() == 6
    assert [row["id"] for row in listed(stack)] == ids
    # What the broker hands out next, in order, is what was dead-lettered.
    connection, channel = stack.channel()
    bodies = [json.loads(channel.basic_get(protocol.DEAD_LETTER_QUEUE, auto_ack=True)[2])["id"]
              for _ in ids]
    connection.close()
    assert bodies == ids


def test_requeue_of_an_expired_request_makes_the_worker_handle_it(stack, raw):
    ids = expire(stack, raw, add_baremetal(1), add_baremetal(2), add_baremetal(3))
    stack.start_worker()
    done = stack.cli("dead-letters", "--requeue", ids[1])
    assert done.returncode == 0, done
    assert done.json["requeued"]["id"] == ids[1] and done.json["left"] == 2
    assert "warning" not in done.stderr
    wait_until(lambda: stack.sql("SELECT name FROM nodes") == [("node-2",)], 15,
               "the worker to add node-2")
    assert [row["id"] for row in listed(stack)] == [ids[0], ids[2]]
    assert stack.dead_letters() == 2


def test_a_requeued_request_is_marked_as_a_copy(stack, raw):
    """It may have been answered before it was dead-lettered: the worker must read the
    stored replies before handling it, not fence it in its write trip."""
    ids = expire(stack, raw, add_baremetal(1))
    done = stack.cli("dead-letters", "--requeue", ids[0])
    assert done.returncode == 0, done
    connection, channel = stack.channel()
    try:
        method, properties, body = next(channel.consume(protocol.REQUEST_QUEUE,
                                                        inactivity_timeout=10))
        assert method is not None, "the requeued request did not reach the request queue"
    finally:
        connection.close()
    assert json.loads(body)["id"] == ids[0]
    assert (properties.headers or {}).get(protocol.COPY_HEADER) is True


def test_a_malformed_message_may_be_requeued_and_comes_back(running):
    raw = RawPublisher(running.amqp_url)
    raw.publish(b"not a request", reply=False, message_id="broken-1")
    wait_until(lambda: running.dead_letters() == 1, 15, "the dead letter")
    done = running.cli("dead-letters", "--requeue", "broken-1")
    assert done.returncode == 0, done
    assert "will land here again" in done.stderr
    wait_until(lambda: [r["id"] for r in listed(running)] == ["broken-1"], 15,
               "it to be dead-lettered again")
    raw.close()


def test_requeue_of_an_unknown_id_changes_nothing(stack, raw):
    ids = expire(stack, raw, add_baremetal(1), add_baremetal(2))
    done = stack.cli("dead-letters", "--requeue", str(uuid.uuid4()))
    assert done.returncode == 1 and "no dead letter has id" in done.stderr, done
    assert [row["id"] for row in listed(stack)] == ids


def test_purge_empties_the_dead_letter_queue(stack, raw):
    expire(stack, raw, add_baremetal(1), add_baremetal(2))
    done = stack.cli("dead-letters", "--purge")
    assert done.returncode == 0, done
    assert done.json == {"status": 200, "purged": 2}
    assert "purged 2 dead letter(s)" in done.stderr
    assert stack.dead_letters() == 0
    assert listed(stack) == []


def test_an_ipmi_password_in_a_dead_letter_is_never_printed(stack, raw):
    secrets = ["pw-baremetal-4711", "pw-kv-4712", "pw-blob-4713", "pw-field-4714",
               "pw-broken-4715"]
    ids = expire(
        stack, raw, add_baremetal(1, secrets[0]),
        valid("add_keyvalue_pairs", {"name": "n", "ipmi_ip": "10.0.0.9", "allocation_pool": "x",
                                     "pairs": ["ipmi_user=u", f"ipmi_password={secrets[1]}"]}),
        valid("add_json_blob", {"name": "n", "ipmi_ip": "10.0.0.9", "allocation_pool": "x",
                                "blob": json.dumps({"ipmi_password": secrets[2]})}),
        valid("set_field", {"id": 1, "key": "ipmi_password", "value": secrets[3]}),
        b'{"op": "add_baremetal", "args": {"ipmi_password": "' + secrets[4].encode() + b'", ')
    outputs = [stack.cli("dead-letters", *args) for args in
               ((), ("-t", "human"), ("-t", "csv"), ("-t", "json"))]
    outputs.append(stack.cli("dead-letters", "--requeue", ids[0]))
    for done in outputs:
        assert done.returncode == 0, done
        assert not any(s in done.stdout + done.stderr for s in secrets), done
    assert all("********" in row["body"] for row in outputs[0].json["dead_letters"])


def test_a_ci_user_is_refused_with_a_clear_message(stack, raw, broker_users):  # noqa: F811
    expire(stack, raw, add_baremetal(1))
    ci, admin = broker_users("molteniron-ci"), broker_users("molteniron-admin")
    for args in ((), ("--purge",), ("--requeue", "any")):
        done = stack.cli("dead-letters", *args, env=ci.env)
        assert done.returncode == 1, done
        assert NEEDS_ADMIN in done.stderr and "Traceback" not in done.stderr, done
    assert stack.dead_letters() == 1
    # The admin user, with the definitions file's permissions, may.
    done = stack.cli("dead-letters", env=admin.env)
    assert done.returncode == 0 and done.json["total"] == 1, done


# --- a requeue acts for the user who sent the request, not for the admin -------------

def next_request(stack) -> tuple[pika.BasicProperties, bytes]:
    """The next message on the request queue (no worker consumes it), taken off."""
    connection, channel = stack.channel()
    try:
        method, properties, body = next(channel.consume(protocol.REQUEST_QUEUE,
                                                        inactivity_timeout=10))
        assert method is not None, "nothing reached the request queue"
        channel.basic_ack(method.delivery_tag)
        return properties, body
    finally:
        connection.close()


def expire_as(stack, publisher: RawPublisher, request: dict, **properties) -> str:
    """publisher's request, published with a 1 ms TTL while no worker consumes: it dies
    `expired`. Its correlation id."""
    before = stack.dead_letters()
    correlation_id = publisher.publish(json.dumps(request).encode(), expiration="1",
                                       delivery_mode=2, **properties)
    wait_until(lambda: stack.dead_letters() == before + 1, 15, "the dead letter")
    return correlation_id


def test_a_requeued_copy_names_the_user_who_sent_it(stack, raw, broker_users):  # noqa: F811
    """The copy goes out under the caller's login (the broker allows no other); the
    header tells the worker whom it acts for, and the reply still goes to the sender."""
    ci = broker_users("molteniron-ci")
    sender = RawPublisher(ci.url)
    request = valid("release", {"owner": "job-1"})
    correlation_id = expire_as(stack, sender, request)
    anonymous = valid("release", {"owner": "job-2"})  # a hand-made message: no user_id
    expire_as(stack, raw, anonymous, user_id=None)
    try:
        done = stack.cli("dead-letters", "--requeue", request["id"])
        assert done.returncode == 0, done
        assert done.json["on_behalf_of"] == ci.name and done.json["user"] == "guest"
        assert f"for user {ci.name}" in done.stderr
        properties, body = next_request(stack)
        assert json.loads(body) == request
        assert properties.user_id == "guest"
        assert properties.headers[protocol.ON_BEHALF_HEADER] == ci.name
        assert properties.headers[protocol.COPY_HEADER] is True
        assert (properties.reply_to, properties.correlation_id) == (
            sender.reply_queue, correlation_id)

        done = stack.cli("dead-letters", "--requeue", anonymous["id"])
        assert done.returncode == 0 and done.json["on_behalf_of"] == "", done
        properties, body = next_request(stack)
        assert json.loads(body) == anonymous
        assert properties.headers[protocol.ON_BEHALF_HEADER] == ""
    finally:
        sender.close()


def test_an_on_behalf_header_is_trusted_only_from_the_callers_own_login(
        stack, raw, broker_users):  # noqa: F811
    """A user may put the header on its own request and let it expire: requeued by an
    admin, it would act for whomever it names. A copy this login requeued before (and
    that died again) keeps acting for the user it acted for."""
    ci = broker_users("molteniron-ci")
    forger = RawPublisher(ci.url)
    forged = valid("status", {"show_secrets": True})
    expire_as(stack, forger, forged, headers={protocol.ON_BEHALF_HEADER: "guest"})
    own_copy = valid("release", {"owner": "job-1"})
    expire_as(stack, raw, own_copy, headers={protocol.ON_BEHALF_HEADER: ci.name})
    try:
        refused = stack.cli("dead-letters", "--requeue", forged["id"])
        assert refused.returncode == 1, refused
        assert refused.json["status"] == 403 and "Traceback" not in refused.stderr
        assert f"sent by broker user {ci.name}" in refused.json["message"]
        assert [row["id"] for row in listed(stack)] == [forged["id"], own_copy["id"]]

        done = stack.cli("dead-letters", "--requeue", own_copy["id"])
        assert done.returncode == 0 and done.json["on_behalf_of"] == ci.name, done
        properties, _ = next_request(stack)
        assert properties.headers[protocol.ON_BEHALF_HEADER] == ci.name
        assert [row["id"] for row in listed(stack)] == [forged["id"]]
    finally:
        forger.close()


def test_an_admin_requeue_does_not_give_a_ci_user_the_admins_rights(
        stack, raw, broker_users):  # noqa: F811
    """The attack: a CI user's `status --show-secrets`, its reply to its own queue,
    expires into the dead-letter queue; an admin requeues it. The worker must answer it
    as the CI user (403), not as the admin who republished it (every IPMI password)."""
    ci, admin = broker_users("molteniron-ci"), broker_users("molteniron-admin")
    attacker = RawPublisher(ci.url)
    try:
        request = valid("status", {"show_secrets": True})
        correlation_id = expire_as(stack, attacker, request)
        stack.start_worker(env={"MOLTENIRON_ADMINS": admin.name})
        for i in (1, 2):
            added = stack.cli("add_baremetal", *node_args(i), env=admin.env)
            assert added.returncode == 0, added

        done = stack.cli("dead-letters", "--requeue", request["id"], env=admin.env)
        assert done.returncode == 0, done

        reply = attacker.reply_to(correlation_id)
        assert "secret-1" not in json.dumps(reply) and "secret-2" not in json.dumps(reply)
        assert reply["status"] == 403, reply
        assert done.json["on_behalf_of"] == ci.name
        # The admin still reads them, as itself.
        shown = stack.cli("status", "--show-secrets", "-t", "json", env=admin.env)
        assert {n["ipmi_password"] for n in shown.json["result"]} == {"secret-1", "secret-2"}
    finally:
        attacker.close()


# --- masking works on the data, not the text --------------------------------------------

def body(op: str, args: dict) -> bytes:
    return json.dumps(valid(op, args)).encode()


@pytest.mark.parametrize("dead_body, secret", [
    # add_keyvalue_pairs' words: all after the first = is the value, spaces included.
    (body("add_keyvalue_pairs", {"pairs": ["ipmi_user=u", "ipmi_password=value with spaces"]}),
     "with spaces"),
    (body("add_keyvalue_pairs", {"pairs": ['ipmi_password="quoted, with spaces"']}),
     "with spaces"),
    (body("add_keyvalue_pairs", {"pairs": ["ipmi_password=pw=with spaces"]}), "spaces"),
    # A key written with a JSON escape is the same key once decoded.
    (b'{"v": 1, "op": "add_baremetal", "args": {"ipmi_passw\\u006frd": "esc-pw-1"}}',
     "esc-pw-1"),
    (b'{"v": 1, "op": "import", "args": {"inventory": {"nodes": [{"name": "n", '
     b'"\\u0069pmi_password": "esc pw 2"}]}}}', "esc pw 2"),
    # add_json_blob's blob is a JSON string: masked as JSON, whatever its keys' escapes.
    (body("add_json_blob", {"blob": '{"ipmi_passw\\u006frd": "blob pw"}'}), "blob pw"),
    (body("add_json_blob", {"blob": json.dumps(json.dumps({"ipmi_password": "twice"}))}),
     "twice"),
    (body("add_json_blob", {"blob": '"{\\"ipmi_passw\\\\u006frd\\": \\"dbl-esc-pw\\"}"'}),
     "dbl-esc-pw"),
    (body("add_json_blob", {"blob": json.dumps({"pairs": ["ipmi_password=in blob"]})}),
     "in blob"),
    (body("set_field", {"id": 1, "key": "ipmi_password", "value": "field pw"}), "field pw"),
], ids=lambda value: value if isinstance(value, str) else json.loads(value)["op"])
def test_show_masks_passwords_in_the_parsed_body(dead_body, secret):
    shown = masked(dead_body)
    assert secret not in shown, shown
    assert MASK in shown
    json.loads(shown)  # still the JSON it was, only masked


@pytest.mark.parametrize("dead_body, secret", [
    # Cut short (not JSON any more): the text pass sees escaped keys and spaced values.
    (b'{"op": "add_baremetal", "args": {"ipmi_passw\\u006frd": "esc-pw-3", ', "esc-pw-3"),
    (b'{"op": "add_baremetal", "args": {"IPMI_PASSW\\u006FRD":"esc-pw-4"', "esc-pw-4"),
    (b'{"op": "add_keyvalue_pairs", "args": {"pairs": ["ipmi_password=value with spaces", ',
     "with spaces"),
    (b'{"op": "set_field", "args": {"id": 1, "key": "ipmi_password", "value": "f pw"',
     "f pw"),
    (b'{"op": "add_json_blob", "args": {"blob": "{\\"ipmi_passw\\\\u006frd\\": \\"b pw\\"',
     "b pw"),
    (b'{"op": "add_baremetal", "args": {"ipmi_password": "cut sho', "cut sho"),
])
def test_show_masks_passwords_in_a_body_that_is_not_json(dead_body, secret):
    shown = masked(dead_body)
    assert secret not in shown, shown
    assert MASK in shown


def test_masking_leaves_what_is_not_a_password():
    shown = json.loads(masked(body("add_keyvalue_pairs", {
        "name": "ipmi_password", "pairs": ["ipmi_user=u p", "cpus=8", "ipmi_password=x y"]})))
    assert shown["args"] == {"name": "ipmi_password",
                             "pairs": ["ipmi_user=u p", "cpus=8", f"ipmi_password={MASK}"]}
