"""Waiting allocations: FIFO, deadlines, cancel, and clients that give up never own nodes."""

from __future__ import annotations

import signal
import time

from molteniron import protocol
from tests.stack import node_args, wait_until


def waiting_owners(stack) -> list[str]:
    return [row[0] for row in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def owners(stack) -> dict[str, str | None]:
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def test_waiters_are_served_first_come_first_served(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    waiting = []
    for name in ("job-a", "job-b", "job-c"):
        waiting.append(running.cli_start("allocate", name, "1", "--wait", "60"))
        wait_until(lambda name=name: name in waiting_owners(running), 15, f"{name} to wait")
    assert waiting_owners(running) == ["job-a", "job-b", "job-c"]

    for previous, process in zip(("holder", "job-a", "job-b"), waiting):
        assert running.cli("release", previous).returncode == 0
        result = process.result()
        assert result.returncode == 0, result
        (node,) = result.json["nodes"].values()
        assert node["name"] == "node-1"
        assert node["provisioned"] == process.process.args[-4]
    assert waiting_owners(running) == []


def test_a_large_request_is_not_overtaken_by_smaller_ones(running):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    running.cli("allocate", "holder", "2")
    big = running.cli_start("allocate", "big", "2", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["big"], 15, "big to wait")
    small = running.cli_start("allocate", "small", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["big", "small"], 15, "small to wait behind big")
    running.cli("release", "holder")
    assert len(big.result().json["nodes"]) == 2
    assert waiting_owners(running) == ["small"]
    running.cli("release", "big")
    assert len(small.result().json["nodes"]) == 1


def test_deadline_passes_exit_3_and_nothing_is_leaked(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    late = running.cli("allocate", "late", "1", "--wait", "1")
    assert late.returncode == 3, late
    assert late.json["status"] == 408
    assert waiting_owners(running) == []
    running.cli("release", "holder")
    assert owners(running) == {"node-1": None}


def test_no_wait_fails_at_once_and_too_large_never_waits(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    busy = running.cli("allocate", "eager", "1", "--no-wait")
    assert busy.returncode == 1 and busy.json["status"] == 409
    too_many = running.cli("allocate", "greedy", "2", "--wait", "600")
    assert too_many.returncode == 1 and too_many.json["error"] == "PoolTooSmall"
    assert waiting_owners(running) == []


def test_a_killed_waiting_client_never_owns_the_node(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    doomed = running.cli_start("allocate", "doomed", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["doomed"], 15, "doomed to wait")
    patient = running.cli_start("allocate", "patient", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["doomed", "patient"], 15, "patient to wait")
    running.kill_waiting_client(doomed, "doomed")

    running.cli("release", "holder")
    result = patient.result()
    assert result.returncode == 0, result
    assert owners(running) == {"node-1": "patient"}
    assert running.sql("SELECT COUNT(*) FROM allocations "
                       "WHERE owner='doomed' AND ended_at IS NULL") == [(0,)]


def test_a_killed_client_served_alone_gives_the_node_back(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    doomed = running.cli_start("allocate", "doomed", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["doomed"], 15, "doomed to wait")
    running.kill_waiting_client(doomed, "doomed")
    running.cli("release", "holder")
    wait_until(lambda: owners(running) == {"node-1": None}, 15, "the node to come back")
    assert running.cli("allocate", "later", "1", "--no-wait").returncode == 0


def test_ctrl_c_cancels_the_waiting_allocate(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    quitter = running.cli_start("allocate", "quitter", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["quitter"], 15, "quitter to wait")
    quitter.process.send_signal(signal.SIGINT)
    result = quitter.result()
    assert result.returncode == 130
    assert waiting_owners(running) == []
    running.cli("release", "holder")
    assert owners(running) == {"node-1": None}


def test_release_cancels_the_owners_waiting_requests(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    waiting = running.cli_start("allocate", "job-x", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["job-x"], 15, "job-x to wait")
    assert running.cli("release", "job-x").json["cancelled_waiting"] == 1
    result = waiting.result()
    assert result.returncode == 1 and result.json["error"] == "RequestCancelled"


def test_cancel_reaches_a_request_in_every_state(stack):
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    stack.stop_workers()
    with stack.client() as client:
        served = protocol.new_request("allocate", {"owner": "served", "count": 1})
        unseen = protocol.new_request("allocate", {"owner": "unseen", "count": 1})
        # Queued before the worker runs: `served` is handled, then its cancel; the
        # cancel of `unseen` arrives before `unseen` itself (a tombstone).
        client.send(served, expires_in=60)
        client.send(protocol.new_request("cancel", {"request_id": served.id}), expires_in=60)
        client.send(protocol.new_request("cancel", {"request_id": unseen.id}), expires_in=60)
        client.send(unseen, expires_in=60)
        stack.start_worker(ready=False)
        assert client.wait(served.id, time.time() + 30)["status"] == 200
        refused = client.wait(unseen.id, time.time() + 30)
        assert refused["status"] == 409 and refused["error"] == "RequestCancelled"
    wait_until(lambda: owners(stack) == {"node-1": None}, 15, "the cancelled allocation to end")
    assert stack.sql("SELECT owner, end_reason FROM allocations") == [("served", "cancelled")]


def test_waiters_survive_a_worker_restart(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    waiting = running.cli_start("allocate", "survivor", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["survivor"], 15, "survivor to wait")
    running.stop_workers()
    running.start_worker()
    running.cli("release", "holder")
    result = waiting.result()
    assert result.returncode == 0, result
    assert owners(running) == {"node-1": "survivor"}
