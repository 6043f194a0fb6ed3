"""A request id is not a permission: another user who learns one gets 403 and nothing
of the request (its reply, its waiting place, its grant), admins included for
replies; non-admins see only their own requests' ids.

Each test is an attack a CI user with the kit's rights ran against a real worker.
"""

from __future__ import annotations

import json

import pytest

from molteniron import protocol
from tests.raw import RawPublisher
from tests.stack import as_user, assert_forbidden, wait_until


@pytest.fixture
def bob_raw(secured, users):
    publisher = RawPublisher(users["bob"]["env"]["MOLTENIRON_AMQP_URL"])
    yield publisher
    publisher.close()


def history(stack, users, role) -> list[dict]:
    result = as_user(stack, users, role, "history")
    assert result.returncode == 0, result
    return result.json["history"]


def alices_request_id(stack, users, owner: str) -> str:
    """What an admin's history shows (a CI user's history no longer does)."""
    return next(row["request_id"] for row in history(stack, users, "admin")
                if row["owner"] == owner)


def assert_refused_without_a_trace(reply: dict, request_id: str):
    assert reply["status"] == 403 and reply["error"] == "Forbidden", reply
    assert "another user" in reply["message"]
    assert "nodes" not in reply and "secret" not in json.dumps(reply)


def test_a_granted_request_id_replayed_by_another_user_is_refused(secured, users, bob_raw):
    stack = secured
    granted = as_user(stack, users, "alice", "allocate", "job-a", "1")
    assert "secret-1" in granted.stdout
    request_id = alices_request_id(stack, users, "job-a")
    stored = stack.sql(f"SELECT reply FROM processed_requests WHERE request_id = '{request_id}'")

    reply = bob_raw.reply_to(bob_raw.request("allocate", {"owner": "job-b", "count": 1},
                                             request_id))
    assert_refused_without_a_trace(reply, request_id)
    assert stack.sql("SELECT name, owner FROM nodes ORDER BY id") == [
        ("node-1", "job-a"), ("node-2", None)]
    assert stack.sql(
        f"SELECT reply FROM processed_requests WHERE request_id = '{request_id}'") == stored


def test_a_waiting_request_id_sent_by_another_user_does_not_redirect_its_nodes(
        secured, users, bob_raw):
    stack = secured
    assert as_user(stack, users, "admin", "allocate", "holder", "2").returncode == 0
    waiting = stack.cli_start("allocate", "job-a", "1", "--wait", "60",
                              env=users["alice"]["env"])
    wait_until(lambda: stack.sql("SELECT owner FROM waiting_requests") == [("job-a",)], 15,
               "alice's allocate to wait")
    seen_by = {role: as_user(stack, users, role, "waiting").json["waiting"]
               for role in ("admin", "bob", "alice")}
    request_id = seen_by["admin"][0]["request_id"]
    assert request_id and seen_by["alice"][0]["request_id"] == request_id
    assert seen_by["bob"][0]["request_id"] is None and seen_by["bob"][0]["owner"] == "job-a"

    reply = bob_raw.reply_to(bob_raw.request("allocate", {"owner": "job-b", "count": 1},
                                             request_id))
    assert_refused_without_a_trace(reply, request_id)
    assert as_user(stack, users, "admin", "release", "holder").returncode == 0
    served = waiting.result()
    assert served.returncode == 0, served
    assert "secret-" in served.stdout
    bob_raw.connection.process_data_events(0.5)
    assert all(r.get("status") != 200 for r in bob_raw.replies), bob_raw.replies


def test_another_users_finished_request_cannot_be_cancelled_or_read(secured, users, bob_raw):
    stack = secured
    assert as_user(stack, users, "alice", "allocate", "job-a", "1").returncode == 0
    assert as_user(stack, users, "alice", "release", "job-a").returncode == 0
    request_id = alices_request_id(stack, users, "job-a")
    stored = stack.sql(f"SELECT reply FROM processed_requests WHERE request_id = '{request_id}'")

    assert_forbidden(as_user(stack, users, "bob", "cancel", request_id), "cancel",
                     users["bob"]["name"])
    assert stack.sql(
        f"SELECT reply FROM processed_requests WHERE request_id = '{request_id}'") == stored
    assert [row["request_id"] for row in history(stack, users, "bob")] == [None]
    assert [row["request_id"] for row in history(stack, users, "alice")] == [request_id]
    # Asked under that id, any operation is refused: nothing stored under it is shown.
    reply = bob_raw.reply_to(bob_raw.request("release", {"owner": "job-a"}, request_id))
    assert_refused_without_a_trace(reply, request_id)


def test_only_an_admin_may_send_a_request_on_behalf_of_another_user(secured, users, bob_raw):
    reply = bob_raw.reply_to(bob_raw.request(
        "status", {"show_secrets": True},
        headers={protocol.ON_BEHALF_HEADER: users["admin"]["name"]}))
    assert reply["status"] == 403 and "on behalf" in reply["message"], reply
    assert "secret-" not in json.dumps(reply)
    admin = RawPublisher(users["admin"]["env"]["MOLTENIRON_AMQP_URL"])
    try:
        reply = admin.reply_to(admin.request(
            "status", {"show_secrets": True},
            headers={protocol.ON_BEHALF_HEADER: users["bob"]["name"]}))
    finally:
        admin.close()
    assert reply["status"] == 403 and users["bob"]["name"] in reply["message"], reply
