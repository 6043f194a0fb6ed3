"""What the worker gives molteniron-web: `summary` (nodes by pool and state, the queue
per pool), the waiting reply's user/priority/constraints, history's until and pages."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest

from molteniron import errors, protocol
from molteniron.workers.authz import USER_OPS
from tests.keeper import (
    add_node,
    allocate,
    commit,
    make_keeper,
    only_reply,
    request,
    sql,
    wait_for,
)


def ask(keeper, op: str, **args) -> dict:
    req = request(op, **args)
    return only_reply(commit(keeper, req), req).reply


def pools_of(reply: dict) -> dict[str, dict]:
    return {row["node_pool"]: row for row in reply["pools"]}


def test_summary_counts_each_pools_nodes_by_state_and_its_waiters(keeper):
    ids = [add_node(keeper, f"p{i}", "p") for i in range(4)] + [add_node(keeper, "q0", "q")]
    allocate(keeper, "job-1", 2, "p")
    assert ask(keeper, "maintenance", node="p3", mode="on", reason="disk")["status"] == 200
    allocate(keeper, "job-q", 1, "q")
    wait_for(keeper, "late-1", 1, "q")
    wait_for(keeper, "late-2", 1, "q", priority=5)

    reply = ask(keeper, "summary")
    assert reply["status"] == 200 and reply["nodes"] == 5 and reply["waiting"] == 2
    assert datetime.fromisoformat(reply["now"])  # the database's clock, naive UTC
    p, q = pools_of(reply)["p"], pools_of(reply)["q"]
    assert {k: p[k] for k in ("nodes", "ready", "allocated", "dirty", "cleaning",
                              "maintenance", "waiting")} == {
        "nodes": 4, "ready": 1, "allocated": 2, "dirty": 0, "cleaning": 0, "maintenance": 1,
        "waiting": 0}
    assert p["oldest_wait_s"] is None and p["wait_p95_s"] is None
    assert (q["nodes"], q["allocated"], q["waiting"]) == (1, 1, 2)
    assert 0 <= q["wait_p50_s"] <= q["wait_p95_s"] == q["oldest_wait_s"] < 60
    assert len(ids) == 5

    # A summary changes nothing and is no admin's: anyone may read it.
    assert not protocol.OPERATIONS["summary"].mutates and "summary" in USER_OPS
    assert ask(keeper, "summary") == {**reply, "now": ask(keeper, "summary")["now"]}


def test_summary_percentiles_are_of_the_waits_now(keeper):
    add_node(keeper, "n1", "p")
    allocate(keeper, "holder", 1, "p")
    for i in range(20):
        wait_for(keeper, f"w{i}", 1, "p")
    # Each waiter i arrived i minutes ago (the oldest first, as the queue keeps them).
    now = datetime.fromisoformat(ask(keeper, "summary")["now"])
    for i, row_id in enumerate(r[0] for r in sql(keeper, "SELECT id FROM waiting_requests "
                                                           "ORDER BY id")):
        arrived = now - timedelta(minutes=20 - i)
        waiter = next(w for w in keeper.waiters.by_request.values() if w.row_id == row_id)
        waiter.enqueued_at = arrived
    p = pools_of(ask(keeper, "summary"))["p"]
    assert p["waiting"] == 20
    assert 1200 <= p["oldest_wait_s"] < 1260
    assert 600 <= p["wait_p50_s"] < 660     # the 10th shortest of 60 s .. 1200 s
    assert 1140 <= p["wait_p95_s"] < 1200   # the 19th


def test_summary_counts_cleaning_only_for_a_live_claim(engine, database_url):
    keeper = make_keeper(engine, database_url, cleaning_command="true")
    try:
        first, second, third = (add_node(keeper, f"n{i}", "p") for i in range(3))
        allocate(keeper, "job", 3, "p")
        assert ask(keeper, "release", owner="job")["released"] == 3
        claimed = ask(keeper, "clean_claim", cleaner="c1")
        assert claimed["claim"]
        p = pools_of(ask(keeper, "summary"))["p"]
        assert (p["dirty"], p["cleaning"], p["ready"]) == (3, 1, 0)

        # A claim whose time ran out is nobody's cleaning any more.
        (node_id,) = [n["id"] for n in claimed["nodes"].values()]
        keeper.state.nodes[node_id].clean_claimed_until = "2000-01-01T00:00:00"
        p = pools_of(ask(keeper, "summary"))["p"]
        assert (p["dirty"], p["cleaning"]) == (3, 0)
        assert {first, second, third} >= {node_id}
    finally:
        keeper.close()


def test_waiting_rows_say_who_asked_for_what_and_how_urgently(keeper):
    add_node(keeper, "n1", "p")
    allocate(keeper, "holder", 1, "p")
    wait_for(keeper, "plain", 1, "p")
    wait_for(keeper, "picky", 1, "p", arch="x86_64", min_cpus=1, tags=[], priority=3)
    rows = {r["owner"]: r for r in ask(keeper, "waiting")["waiting"]}
    assert rows["plain"]["priority"] == 0 and rows["plain"]["constraints"] is None
    assert rows["picky"]["priority"] == 3
    assert rows["picky"]["constraints"] == {"arch": "x86_64", "min_cpus": 1, "min_ram_mb": 0,
                                            "min_disk_gb": 0, "tags": []}
    assert "user" in rows["plain"]  # None here: the keeper's requests carry no user_id


@pytest.fixture
def eight_allocations(keeper):
    """Pool p with one node, allocated and released eight times: history rows newest first."""
    add_node(keeper, "n1", "p")
    for i in range(8):
        allocate(keeper, f"job-{i}", 1, "p")
        ask(keeper, "release", owner=f"job-{i}")
    return keeper


def test_history_pages_follow_each_other_without_gaps_or_repeats(eight_allocations):
    keeper = eight_allocations
    everything = ask(keeper, "history")
    assert [r["owner"] for r in everything["history"]] == [f"job-{i}" for i in range(7, -1, -1)]
    assert "next_after" not in everything  # one page held it all

    owners, after, pages = [], None, 0
    while True:
        reply = ask(keeper, "history", limit=3, **({"after": after} if after else {}))
        owners += [r["owner"] for r in reply["history"]]
        pages += 1
        after = reply.get("next_after")
        if after is None:
            break
    assert owners == [r["owner"] for r in everything["history"]] and pages == 3
    # Exactly a page's worth: no empty page after it.
    assert "next_after" not in ask(keeper, "history", limit=8)
    bad = ask(keeper, "history", after="yesterday/7")
    assert bad["status"] == 400 and "next_after" in bad["message"]


def test_history_until_keeps_what_started_by_then(eight_allocations):
    keeper = eight_allocations
    started = [r[0] for r in sql(keeper, "SELECT started_at FROM allocations ORDER BY id")]
    cut = started[3].isoformat()
    until = ask(keeper, "history", until=cut)["history"]
    assert [r["owner"] for r in until] == [f"job-{i}" for i in range(3, -1, -1)]
    # Both ends: held at some time in [since, until].
    ended = [r[0] for r in sql(keeper, "SELECT ended_at FROM allocations ORDER BY id")]
    both = ask(keeper, "history", since=ended[1].isoformat(), until=cut)["history"]
    assert [r["owner"] for r in both] == ["job-3", "job-2", "job-1"]
    with pytest.raises(errors.BadRequest, match="until must be an ISO-8601 time"):
        ask(keeper, "history", until="not a time")


def test_an_older_client_still_gets_history_as_before(eight_allocations):
    """No until, no after, no paging fields: the reply is the one clients knew."""
    reply = ask(eight_allocations, "history", limit=100)
    assert set(reply) == {"status", "history"}
    assert set(reply["history"][0]) == {"started_at", "ended_at", "end_reason", "owner",
                                        "node_name", "node_id", "user", "request_id"}
    assert time.time()  # (the keeper answered within the batch)
