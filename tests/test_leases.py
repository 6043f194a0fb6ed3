"""Leases: a job that dies after its pre-hook cannot keep its nodes forever."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tests.stack import node_args, wait_until


def owners(stack):
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def lease_of(stack, name):
    return stack.sql(f"SELECT lease_expires_at FROM nodes WHERE name = '{name}'")[0][0]


def test_allocate_reply_shows_when_the_default_lease_ends(running):
    running.cli("add_baremetal", *node_args(1))
    before = datetime.now(timezone.utc)
    result = running.cli("allocate", "job-1", "1")
    assert result.returncode == 0, result
    node = result.json["nodes"]["node_1"]
    ends = datetime.fromisoformat(node["lease_expires_at"])
    # The default lease_seconds is 6 hours.
    assert before + timedelta(hours=6) - timedelta(seconds=5) <= ends
    assert ends <= datetime.now(timezone.utc) + timedelta(hours=6, seconds=5)
    assert lease_of(running, "node-1").replace(microsecond=0, tzinfo=timezone.utc) == ends


def test_an_expired_lease_takes_the_nodes_back_and_serves_the_next_waiter(running):
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "dies-after-pre-hook", "1", "--lease", "2").returncode == 0
    patient = running.cli_start("allocate", "patient", "1", "--wait", "60")

    result = patient.result(timeout=60)  # nobody releases: only the lease can end it

    assert result.returncode == 0, result
    assert owners(running) == {"node-1": "patient"}
    assert running.sql("SELECT owner, end_reason FROM allocations ORDER BY id") == [
        ("dies-after-pre-hook", "expired"), ("patient", None)]
    assert "event=lease_expired owner=dies-after-pre-hook nodes=1" in running.worker_log()


def test_renew_extends_every_node_of_the_owner_from_now(running):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    running.cli("allocate", "job-1", "2", "--lease", "60")
    first = lease_of(running, "node-1")

    renewed = running.cli("renew", "job-1", "--lease", "7200")

    assert renewed.returncode == 0, renewed
    assert renewed.json["renewed"] == 2
    for name in ("node-1", "node-2"):
        assert lease_of(running, name) > first + timedelta(seconds=7000)
    assert renewed.json["lease_expires_at"] == lease_of(running, "node-1").isoformat(
        timespec="seconds") + "+00:00"


def test_get_field_and_status_show_when_the_lease_ends(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "job-1", "1", "--lease", "600")
    expected = lease_of(running, "node-1").isoformat(timespec="seconds") + "+00:00"
    field = running.cli("get_field", "job-1", "lease_expires_at")
    assert field.json["result"] == [{"id": 1, "field": expected}]
    status = running.cli("status", "-t", "json")
    assert status.json["result"][0]["lease_ends"] == expected
    assert expected in running.cli("status").json["result"]


def test_renew_of_an_owner_with_nothing_is_404_and_a_lease_over_the_cap_is_400(running):
    running.cli("add_baremetal", *node_args(1))
    nothing = running.cli("renew", "nobody")
    assert nothing.returncode == 1 and nothing.json["status"] == 404, nothing

    too_long = running.cli("allocate", "job-1", "1", "--lease", "999999999")
    assert too_long.returncode == 1 and too_long.json["status"] == 400, too_long
    assert "max_lease_seconds=604800" in too_long.json["message"]
    assert owners(running) == {"node-1": None}

    running.cli("allocate", "job-1", "1")
    renew_too_long = running.cli("renew", "job-1", "--lease", "999999999")
    assert renew_too_long.json["status"] == 400 and "604800" in renew_too_long.json["message"]


def test_a_waiter_asking_for_a_lease_gets_it_when_served(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    waiter = running.cli_start("allocate", "patient", "1", "--wait", "60", "--lease", "900")
    wait_until(lambda: running.sql("SELECT owner FROM waiting_requests") == [("patient",)], 15,
               "patient to wait")
    running.cli("release", "holder")
    result = waiter.result()
    assert result.returncode == 0, result
    granted_at = datetime.fromisoformat(result.json["nodes"]["node_1"]["timestamp"])
    ends = datetime.fromisoformat(result.json["nodes"]["node_1"]["lease_expires_at"])
    assert timedelta(seconds=898) <= ends - granted_at <= timedelta(seconds=902)
