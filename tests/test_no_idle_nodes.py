"""Nodes never sit ready while a waiter that they fit waits.

In each test a big waiter (2 nodes) heads the queue and a small one (1 node)
waits behind it while one node is ready: the small one may only be served
when the head leaves or more nodes come. Each way the head can leave, and each
way nodes can become usable, must serve the queue at once.
"""

from __future__ import annotations

import signal

import pytest

from tests.stack import node_args, wait_until


def waiting_owners(stack):
    return [r[0] for r in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def owners(stack):
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def big_then_small(stack, big_wait="60", big_owner="big"):
    """3 nodes, 2 held: `big` (2 nodes) waits first, `small` (1 node) behind it."""
    for i in (1, 2, 3):
        stack.cli("add_baremetal", *node_args(i))
    stack.cli("allocate", "holder", "2")
    big = stack.cli_start("allocate", big_owner, "2", "--wait", big_wait)
    wait_until(lambda: waiting_owners(stack) == [big_owner], 15, "big to wait")
    small = stack.cli_start("allocate", "small", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(stack) == [big_owner, "small"], 15, "small to wait")
    return big, small


def assert_small_got_the_ready_node(stack, small):
    result = small.result(timeout=30)
    assert result.returncode == 0, result
    assert owners(stack)["node-3"] == "small"
    assert waiting_owners(stack) == []


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_head_interrupted(running, how):
    big, small = big_then_small(running)
    big.process.send_signal(how)
    assert big.result().returncode == 130
    assert_small_got_the_ready_node(running, small)


def test_head_killed(running):
    big, small = big_then_small(running)
    running.kill_waiting_client(big, "big")  # no cancel: only a bounce tells the worker
    assert_small_got_the_ready_node(running, small)
    assert running.sql("SELECT owner, end_reason FROM allocations WHERE owner = 'big'") == []


def test_head_deadline_passes(running):
    big, small = big_then_small(running, big_wait="2")
    assert big.result().returncode == 3
    assert_small_got_the_ready_node(running, small)


def test_head_cancelled_by_release_of_its_owner(running):
    big, small = big_then_small(running)
    assert running.cli("release", "big").json["cancelled_waiting"] == 1
    assert big.result().returncode == 1
    assert_small_got_the_ready_node(running, small)


def test_head_cancelled_by_request_id(running):
    big, small = big_then_small(running)
    (request_id,) = running.sql("SELECT request_id FROM waiting_requests WHERE owner = 'big'")[0]
    assert running.cli("cancel", request_id).json["cancelled"] == "waiting"
    assert_small_got_the_ready_node(running, small)


def test_a_node_added_serves_the_head(running):
    big, small = big_then_small(running)
    running.cli("add_baremetal", *node_args(4))
    result = big.result(timeout=30)
    assert result.returncode == 0, result
    assert sorted(result.json["nodes"]) == ["node_3", "node_4"]
    assert waiting_owners(running) == ["small"]


def test_a_node_moved_into_the_pool_serves_the_head(running):
    big, small = big_then_small(running)
    running.cli("add_baremetal", *node_args(4, pool="spare"))
    assert big.process.poll() is None  # a node in another pool is no help
    running.cli("set_field", "4", "node_pool", "default")
    result = big.result(timeout=30)
    assert result.returncode == 0, result
    assert sorted(result.json["nodes"]) == ["node_3", "node_4"]


def test_maintenance_off_serves_the_head(running):
    for i in (1, 2, 3, 4):
        running.cli("add_baremetal", *node_args(i))
    running.cli("set_field", "4", "status", "maintenance")
    running.cli("allocate", "holder", "2")
    big = running.cli_start("allocate", "big", "2", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["big"], 15, "big to wait")
    running.cli("set_field", "4", "status", "ready")
    result = big.result(timeout=30)
    assert result.returncode == 0, result
    assert sorted(result.json["nodes"]) == ["node_3", "node_4"]


def test_a_waiter_the_pool_can_no_longer_serve_gets_409_at_once(running):
    for i in (1, 2, 3, 4):
        running.cli("add_baremetal", *node_args(i))
    running.cli("allocate", "holder", "3")
    huge = running.cli_start("allocate", "huge", "4", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["huge"], 15, "huge to wait")

    running.cli("set_field", "4", "node_pool", "elsewhere")  # the pool can give 3 now

    refused = huge.result(timeout=30)
    assert refused.returncode == 1 and refused.json["status"] == 409, refused
    assert "PoolTooSmall" == refused.json["error"]
    assert waiting_owners(running) == []
