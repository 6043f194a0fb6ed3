"""Maintenance with a reason, and removing nodes, through the CLI and the real services."""

from __future__ import annotations

from tests.stack import node_args, wait_until


def nodes(stack):
    return stack.sql("SELECT name, state, owner, maintenance_reason FROM nodes ORDER BY id")


def test_maintenance_on_and_off_by_name_or_id_with_a_reason(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("add_baremetal", *node_args(2))

    on = running.cli("maintenance", "node-1", "on", "--reason", "BMC does not answer")
    assert on.returncode == 0, on
    assert on.json["state"] == "maintenance"
    status = running.cli("status", "-t", "json").json["result"]
    assert status[0]["maintenance_reason"] == "BMC does not answer"
    # It is out of service: a job asking for both nodes can never be served now.
    refused = running.cli("allocate", "job", "2", "--no-wait")
    assert refused.returncode == 1 and refused.json["error"] == "PoolTooSmall", refused

    assert running.cli("maintenance", "1", "off").returncode == 0
    assert nodes(running)[0] == ("node-1", "ready", None, None)
    assert running.cli("allocate", "job", "2", "--no-wait").returncode == 0


def test_maintenance_of_an_allocated_node_begins_at_its_release(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "job", "1")
    waiter = running.cli_start("allocate", "next", "1", "--wait", "60")
    wait_until(lambda: running.sql("SELECT owner FROM waiting_requests") == [("next",)], 15,
               "next to wait")

    on = running.cli("maintenance", "node-1", "on", "--reason", "disk errors")
    assert on.returncode == 0 and on.json["state"] == "allocated", on
    assert nodes(running) == [("node-1", "allocated", "job", "disk errors")]

    table = running.cli("-o", "result", "status", "-t", "csv").stdout
    assert "allocated (maintenance at release: disk errors)" in table
    running.cli("release", "job")
    assert nodes(running) == [("node-1", "maintenance", None, "disk errors")]
    assert "maintenance (disk errors)" in running.cli("-o", "result", "status", "-t", "csv").stdout
    # The waiter can never get a node now: it is told at once, not at its deadline.
    told = waiter.result(timeout=30)
    assert told.returncode == 1 and told.json["error"] == "PoolTooSmall", told


def test_remove_refuses_an_allocated_node_unless_forced(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("add_baremetal", *node_args(2))
    running.cli("allocate", "job", "1")

    refused = running.cli("remove", "node-1")
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert [n[0] for n in nodes(running)] == ["node-1", "node-2"]

    assert running.cli("remove", "node-2").json["removed"] == "node-2"
    forced = running.cli("remove", "node-1", "--force")
    assert forced.returncode == 0, forced
    assert nodes(running) == []
    assert running.sql("SELECT owner, end_reason FROM allocations") == [("job", "removed")]
    # The job learns that its node was taken from it, not that it never had one.
    assert running.cli("release", "job").json["status"] == 410
    assert running.cli("remove", "node-1").json["status"] == 404


def test_a_removed_node_name_can_be_added_again_and_allocated(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("remove", "node-1")
    assert running.cli("add_baremetal", *node_args(1)).returncode == 0
    assert running.cli("allocate", "job", "1").returncode == 0


def test_maintenance_on_without_a_reason_keeps_the_reason_a_new_one_replaces_it(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("add_baremetal", *node_args(2))
    assert running.cli("maintenance", "node-1", "on", "--reason", "BMC does not answer"
                       ).returncode == 0

    again = running.cli("maintenance", "node-1", "on")

    assert again.returncode == 0, again
    assert again.json["maintenance_reason"] == "BMC does not answer", again
    assert nodes(running)[0] == ("node-1", "maintenance", None, "BMC does not answer")
    # Allocated, its maintenance pending until the release: the same.
    running.cli("allocate", "job", "1")
    assert running.cli("maintenance", "node-2", "on", "--reason", "disk errors").returncode == 0
    assert running.cli("maintenance", "node-2", "on").returncode == 0
    assert nodes(running)[1] == ("node-2", "allocated", "job", "disk errors")
    # A new reason replaces the old one; none ever given still says so.
    assert running.cli("maintenance", "node-1", "on", "--reason", "PSU replaced").returncode == 0
    assert nodes(running)[0][3] == "PSU replaced"
    running.cli("release", "job")
    wait_until(lambda: nodes(running)[1][1] == "maintenance", 15, "node-2's maintenance")
    assert nodes(running)[1][3] == "disk errors"
    assert running.cli("maintenance", "node-1", "off").returncode == 0
    assert running.cli("maintenance", "node-1", "on").returncode == 0
    assert nodes(running)[0][3] == "no reason given"
