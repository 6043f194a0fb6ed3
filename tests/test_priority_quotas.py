"""Priority (with aging, so nobody starves) and per-user quotas."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from molteniron.pool import utcnow
from molteniron.workers import keeper as keeper_module
from molteniron.workers.batch import Batch
from molteniron.workers.queue import PoolQueue
from tests.keeper import add_node, commit, request
from tests.stack import node_args, wait_until


@dataclass
class W:
    row_id: int
    request_id: str
    priority: int
    enqueued_at: datetime


T0 = datetime(2026, 1, 1)


def waiting_owners(stack):
    return [r[0] for r in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def test_higher_priority_first_then_first_come_first_served(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    low = running.cli_start("allocate", "low", "1", "--wait", "60")
    wait_until(lambda: waiting_owners(running) == ["low"], 15, "low to wait")
    high = running.cli_start("allocate", "high", "1", "--wait", "60", "--priority", "5")
    wait_until(lambda: waiting_owners(running) == ["low", "high"], 15, "high to wait")
    placed = running.cli("waiting").json["waiting"]
    assert [(w["owner"], w["position"]) for w in placed] == [("high", 1), ("low", 2)]

    running.cli("release", "holder")
    assert high.result(timeout=30).returncode == 0
    assert waiting_owners(running) == ["low"]
    running.cli("release", "high")
    assert low.result(timeout=30).returncode == 0


def test_a_low_priority_waiter_is_passed_only_by_those_that_came_within_the_bound():
    """The bound: with aging A per minute, a waiter of priority 0 is passed only by
    waiters of priority P that arrived less than P / A minutes after it. Against a
    stream of priority-10 jobs arriving one a minute with A = 1, the priority-0 job
    is served after at most the 10 that came in its first 10 minutes."""
    queue: PoolQueue[W] = PoolQueue(aging=1.0)
    queue.add(W(1, "low", 0, T0))
    served = []
    for minute in range(1, 30):  # a job arrives each minute; the node serves one a minute
        queue.add(W(minute + 1, f"high-{minute}", 10, T0 + timedelta(minutes=minute)))
        head = queue.head()
        assert head is not None
        served.append(head.request_id)
        queue.remove(head.request_id)
        if head.request_id == "low":
            break
    assert served.index("low") <= 10
    assert all(s.startswith("high-") and int(s[5:]) <= 10 for s in served[:-1])


def test_equal_priorities_keep_arrival_order_and_places_are_cheap_to_give():
    queue: PoolQueue[W] = PoolQueue(aging=1.0)
    places = [queue.add(W(i, f"w{i}", 0, T0 + timedelta(seconds=i))) for i in range(1, 6)]
    assert places == [1, 2, 3, 4, 5]
    assert queue.add(W(9, "urgent", 100, T0 + timedelta(seconds=9))) == 1
    assert [w.request_id for w in queue.ordered()] == ["urgent", "w1", "w2", "w3", "w4", "w5"]
    queue.remove("urgent")
    head = queue.head()
    assert head is not None and head.request_id == "w1"


def test_a_quota_makes_its_user_wait_without_keeping_nodes_from_others(stack, users, tmp_path):
    config = tmp_path / "quotas.yaml"
    config.write_text(f"quotas: {{{users['alice']['name']}: 1}}\n")
    stack.start_worker(env={"MOLTENIRON_CONFIG": str(config)})
    for i in (1, 2, 3):
        stack.cli("add_baremetal", *node_args(i))
    alice, bob = users["alice"]["env"], users["bob"]["env"]

    assert stack.cli("allocate", "a-1", "1", env=alice).returncode == 0
    over = stack.cli_start("allocate", "a-2", "1", "--wait", "60", env=alice)
    wait_until(lambda: waiting_owners(stack) == ["a-2"], 15, "alice's second job to wait")
    # Two nodes are ready and alice waits: bob is not kept from them.
    assert stack.cli("allocate", "b-1", "2", "--no-wait", env=bob).returncode == 0
    too_big = stack.cli("allocate", "a-3", "2", env=alice)
    assert too_big.returncode == 1 and too_big.json["status"] == 409, too_big
    assert "quota" in too_big.json["message"]
    assert stack.cli("release", "b-1", env=bob).returncode == 0
    # Nodes are free, but alice is at her quota: committed before the release answered.
    assert waiting_owners(stack) == ["a-2"]
    assert stack.sql("SELECT owner FROM allocations WHERE ended_at IS NULL") == [("a-1",)]
    assert over.process.poll() is None

    stack.cli("release", "a-1", env=alice)

    assert over.result(timeout=30).returncode == 0
    assert stack.sql("SELECT COUNT(*) FROM nodes WHERE holder_user = "
                     f"'{users['alice']['name']}'") == [(1,)]


def test_through_the_worker_a_stream_of_high_priority_jobs_cannot_starve_a_low_one(
        keeper, monkeypatch):
    """The same bound through PoolKeeper.commit and the real database, one job a
    minute on a virtual clock: the priority-0 job is served after at most the
    priority-10 jobs that arrived in its first 10 minutes."""
    now = [utcnow()]
    monkeypatch.setattr(keeper_module, "Batch",
                        lambda connection, make_session: Batch(
                            connection, make_session, now=now[0], clock=now[0].timestamp()))
    add_node(keeper, "n1")
    commit(keeper, request("allocate", owner="holder", count=1, node_pool="p"))
    commit(keeper, request("allocate", owner="low", count=1, node_pool="p", wait=True))
    served, holder = [], "holder"
    for minute in range(1, 30):
        now[0] += timedelta(minutes=1)
        commit(keeper, request("allocate", owner=f"high-{minute}", count=1, node_pool="p",
                               wait=True, priority=10))
        batch = commit(keeper, request("release", owner=holder))
        (granted,) = [o for o in batch.replies if o.grant]
        holder = granted.reply["nodes"]["node_1"]["provisioned"]
        served.append(holder)
        if holder == "low":
            break
    assert "low" in served and served.index("low") <= 10, served
    assert all(int(s.split("-")[1]) <= 10 for s in served[:-1]), served


def test_a_wait_its_quota_held_to_the_deadline_says_so(stack, users, tmp_path):
    """Ready nodes, but alice holds her quota: the wait ends naming the quota, what she
    holds and her limit, not "no node became ready"."""
    config = tmp_path / "quotas.yaml"
    alice_name = users["alice"]["name"]
    config.write_text(f"quotas: {{{alice_name}: 1}}\n")
    stack.start_worker(env={"MOLTENIRON_CONFIG": str(config)})
    for i in (1, 2, 3):
        stack.cli("add_baremetal", *node_args(i))
    alice = users["alice"]["env"]
    assert stack.cli("allocate", "a-1", "1", env=alice).returncode == 0

    held = stack.cli("allocate", "a-2", "1", "--wait", "2", env=alice)

    assert held.returncode != 0 and held.json["error"] == "DeadlineExpired", held
    message = held.json["message"]
    assert "became ready" not in message, message
    assert (f"its quota held this wait, with 2 usable node(s) ready (user {alice_name} holds "
            f"1 node(s) and its quota (quotas: '{alice_name}') is 1: 1 more would make 2)"
            ) in message, message
