"""PoolKeeper.commit: nodes never sit ready while a waiter they fit waits.

Whatever makes room in a pool (a waiter ahead leaving, nodes coming back or
arriving), the waiter behind is served in the very batch that made the room.
Each test drives the keeper the way the worker does, one batch at a time, and
reads the outcome from the batch's replies and from the database.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from molteniron import errors, pool, protocol
from molteniron.workers import keeper as keeper_module
from molteniron.workers.batch import Batch
from tests.keeper import (
    Properties,
    add_node,
    add_request,
    allocate,
    assert_granted,
    commit,
    commit_from,
    keeper,  # noqa: F401 (see below)
    make_keeper,
    only_reply,
    owners,
    replies,
    reply_to_of,
    request,
    sql,
    wait_for,
    waiting,
)

# `keeper` (the fixture; conftest registers it for every module) is imported above only
# until tests/test_fence_in_trip.py and tests/test_priority_quotas.py import it from
# tests.keeper: then it and this comment go.
# ruff: noqa: F811


@pytest.fixture
def big_ahead_of_small(keeper):
    """Pool p: 2 nodes, "holder" holds one. "big" waits for 2, "small" for 1 behind it."""
    add_node(keeper, "n1")
    add_node(keeper, "n2")
    allocate(keeper, "holder", 1)
    big = wait_for(keeper, "big", 2, wait_seconds=0)  # its deadline passes at once
    small = wait_for(keeper, "small", 1)
    assert waiting(keeper) == ["big", "small"]
    return big, small


def assert_small_served(keeper, batch, small):
    assert_granted(batch, small, 1)
    assert sorted(owners(keeper).values()) == ["holder", "small"]
    assert waiting(keeper) == []
    assert keeper.waiters.by_request == {}


# --- the waiter behind is served in the batch that makes room -------------------------

def test_cancelling_the_head_waiter_serves_the_one_behind(keeper, big_ahead_of_small):
    big, small = big_ahead_of_small
    cancel = request("cancel", request_id=big.id)
    batch = commit(keeper, cancel)
    assert only_reply(batch, cancel).reply == {"status": 200, "cancelled": "waiting"}
    assert only_reply(batch, big).reply["error"] == "RequestCancelled"
    assert_small_served(keeper, batch, small)


def test_a_head_waiter_whose_deadline_passed_is_answered_on_tick_and_the_next_served(
        keeper, big_ahead_of_small):
    big, small = big_ahead_of_small
    batch = commit(keeper, request("tick"))
    assert only_reply(batch, big).reply["status"] == protocol.TIMED_OUT
    assert_small_served(keeper, batch, small)


def test_releasing_an_owner_cancels_its_waiting_allocate_and_serves_the_next(
        keeper, big_ahead_of_small):
    big, small = big_ahead_of_small
    release = request("release", owner="big")
    batch = commit(keeper, release)
    assert only_reply(batch, release).reply == {"status": 200, "released": 0,
                                                "cancelled_waiting": 1}
    assert only_reply(batch, big).reply["error"] == "RequestCancelled"
    assert_small_served(keeper, batch, small)


def test_a_head_waiter_whose_client_is_gone_is_dropped_and_the_next_served(
        keeper, big_ahead_of_small):
    big, small = big_ahead_of_small
    batch = commit(keeper, bounced=[(reply_to_of(big), {"id": big.id, "status": 202})])
    assert_small_served(keeper, batch, small)


def test_a_returned_interim_reply_of_another_queue_drops_no_waiter(keeper, big_ahead_of_small):
    big, small = big_ahead_of_small
    commit(keeper, bounced=[("reply-someone-else", {"id": big.id, "status": 202})])
    assert waiting(keeper) == ["big", "small"]


@pytest.fixture
def small_waits_in_empty_pool(keeper):
    """Pool p: 1 node, held by "holder"; "small" waits for 1."""
    add_node(keeper, "n1")
    allocate(keeper, "holder", 1)
    return wait_for(keeper, "small", 1)


def test_adding_a_node_serves_a_waiter_in_the_same_batch(keeper, small_waits_in_empty_pool):
    small = small_waits_in_empty_pool
    add = add_request("n2")
    batch = commit(keeper, add)
    assert only_reply(batch, add).reply["status"] == 200
    assert_small_served(keeper, batch, small)


def test_moving_a_node_into_the_pool_serves_a_waiter_in_the_same_batch(
        keeper, small_waits_in_empty_pool):
    small = small_waits_in_empty_pool
    elsewhere = add_node(keeper, "q1", node_pool="q")
    assert waiting(keeper) == ["small"]
    move = request("set_field", id=elsewhere, key="node_pool", value="p")
    batch = commit(keeper, move)
    assert only_reply(batch, move).reply["status"] == 200
    assert_small_served(keeper, batch, small)
    assert owners(keeper)[elsewhere] == "small"


def test_a_node_back_from_maintenance_serves_a_waiter_in_the_same_batch(keeper):
    add_node(keeper, "n1")
    spare = add_node(keeper, "n2")
    commit(keeper, request("set_field", id=spare, key="status", value="maintenance"))
    allocate(keeper, "holder", 1)
    small = wait_for(keeper, "small", 1)
    back = request("set_field", id=spare, key="status", value="ready")
    batch = commit(keeper, back)
    assert only_reply(batch, back).reply["status"] == 200
    assert_small_served(keeper, batch, small)


def test_a_lease_ending_on_tick_serves_a_waiter_in_the_same_batch(
        keeper, small_waits_in_empty_pool, monkeypatch):
    small = small_waits_in_empty_pool
    commit(keeper, request("renew", owner="holder", lease_seconds=60))
    # The next batch runs a minute later (no sleeping: the batch is told the time).
    later, clock = pool.utcnow() + timedelta(seconds=61), time.time() + 61
    monkeypatch.setattr(keeper_module, "Batch",
                        lambda connection, make_session: Batch(connection, make_session,
                                                               now=later, clock=clock))
    batch = commit(keeper, request("tick"))
    assert_granted(batch, small, 1)
    assert sql(keeper, "SELECT owner, end_reason FROM allocations ORDER BY id") == [
        ("holder", "expired"), ("small", None)]


@pytest.mark.parametrize("change", [{"key": "node_pool", "value": "q"},
                                    {"key": "status", "value": "maintenance"}])
def test_a_waiter_the_pool_can_no_longer_serve_gets_409_at_once(keeper, change):
    add_node(keeper, "n1")
    add_node(keeper, "n2")
    spare = add_node(keeper, "n3")
    allocate(keeper, "holder", 2)  # n1 and n2: n3 is the one ready node
    everything = wait_for(keeper, "everything", 3)
    shrink = request("set_field", id=spare, **change)
    batch = commit(keeper, shrink)
    assert only_reply(batch, shrink).reply["status"] == 200
    reply = only_reply(batch, everything).reply
    assert (reply["status"], reply["error"]) == (409, "PoolTooSmall")
    assert waiting(keeper) == []
    assert sql(keeper, "SELECT reply FROM processed_requests WHERE request_id = :id",
               id=everything.id)  # a redelivery gets the same answer


def test_a_waiter_behind_the_head_the_pool_can_no_longer_serve_gets_409_at_once(keeper):
    add_node(keeper, "n1")
    add_node(keeper, "n2")
    spare = add_node(keeper, "n3")
    allocate(keeper, "holder", 2)
    head = wait_for(keeper, "head", 2)  # 1 ready: it waits, and 2 stay possible
    everything = wait_for(keeper, "everything", 3)
    shrink = request("set_field", id=spare, key="node_pool", value="q")
    batch = commit(keeper, shrink)
    # Like a new allocate of 3 would be, the waiter is told now, not when it reaches the head.
    answers = [(out.reply["status"], out.reply.get("error")) for out in replies(batch, everything)]
    assert answers == [(409, "PoolTooSmall")]
    assert not replies(batch, head) and waiting(keeper) == ["head"]  # 2 still possible
    assert waiting(keeper) == ["head"]


def test_a_new_allocate_never_overtakes_a_waiter(keeper, small_waits_in_empty_pool):
    add_node(keeper, "n2", node_pool="q")
    # Both in one batch: the node arrives, then a newcomer asks without waiting.
    newcomer = request("allocate", owner="newcomer", count=1, node_pool="p", wait=False)
    batch = commit(keeper, add_request("n3"), newcomer)
    assert only_reply(batch, newcomer).reply["error"] == "NotEnoughNodes"
    assert_granted(batch, small_waits_in_empty_pool, 1)


# --- grant outcomes from the broker ----------------------------------------------------

@pytest.fixture
def granted_and_waiting(keeper):
    """Pool p: 1 node granted to "first" (its grant in the outbox); "second" waits for it."""
    node = add_node(keeper, "n1")
    first, reply = allocate(keeper, "first", 1)
    assert reply["status"] == 200
    second = wait_for(keeper, "second", 1)
    assert sql(keeper, "SELECT request_id FROM grant_outbox") == [(first.id,)]
    return node, first, second


def test_an_undone_grant_puts_the_nodes_back_and_serves_the_next_waiter(
        keeper, granted_and_waiting):
    node, first, second = granted_and_waiting
    batch = commit(keeper, settled={first.id: "undo"})
    assert_granted(batch, second, 1)
    assert owners(keeper) == {node: "second"}
    assert sql(keeper, "SELECT owner, end_reason FROM allocations ORDER BY id") == [
        ("first", "client_gone"), ("second", None)]
    assert sql(keeper, "SELECT request_id FROM grant_outbox") == [(second.id,)]
    # A redelivery of the undone allocate is refused, not granted again.
    assert "RequestCancelled" in sql(
        keeper, "SELECT reply FROM processed_requests WHERE request_id = :id", id=first.id)[0][0]


def test_a_delivered_grant_leaves_the_outbox_and_keeps_its_nodes(keeper, granted_and_waiting):
    node, first, second = granted_and_waiting
    batch = commit(keeper, settled={first.id: "delivered"})
    assert batch.replies == []
    assert owners(keeper) == {node: "first"}
    assert sql(keeper, "SELECT request_id FROM grant_outbox") == []
    assert waiting(keeper) == ["second"]


# --- what reaches the pool at all ------------------------------------------------------

@pytest.mark.parametrize("owner, count", [("job", 0), ("job", -1), ("job", "2"), ("job", True),
                                          ("job", 1.0), ("", 1), (None, 1)])
def test_bad_allocate_arguments_are_400_before_any_rule_runs(owner, count):
    with pytest.raises(errors.BadRequest) as info:
        protocol.new_request("allocate", {"owner": owner, "count": count})
    assert info.value.status == 400


# --- a client that moved to another broker of a cluster sends its request again ----------


def test_an_undone_grant_is_served_again_to_a_copy_from_another_reply_queue(keeper):
    node = add_node(keeper, "n1")
    first, reply = allocate(keeper, "first", 1)
    assert reply["status"] == 200
    commit(keeper, settled={first.id: "undo"})  # its reply queue died with a broker node
    assert owners(keeper) == {node: None}
    # The copy to the dead queue, redelivered, stays refused ...
    (out,) = commit(keeper, first).replies
    assert out.reply["error"] == "RequestCancelled" and owners(keeper) == {node: None}
    # ... the copy the client sent again from its new queue gets the node.
    (out,) = commit_from(keeper, first, "new-queue").replies
    assert (out.reply_to, out.grant, out.reply["status"]) == ("new-queue", True, 200)
    assert owners(keeper) == {node: "first"}
    assert sql(keeper, "SELECT reply_to FROM grant_outbox") == [("new-queue",)]


def test_a_stale_undo_of_a_grant_another_worker_settled_undoes_nothing(keeper):
    """This worker learnt that a copy of the grant bounced, then stood by; meanwhile
    another worker answered a copy with the grant and settled it (the outbox row went).
    Back in charge, this worker must not take the nodes from the client that has them."""
    node = add_node(keeper, "n1")
    first, reply = allocate(keeper, "first", 1)
    assert reply["status"] == 200
    commit(keeper, settled={first.id: "delivered"})  # the other worker's settlement
    assert sql(keeper, "SELECT COUNT(*) FROM grant_outbox") == [(0,)]
    commit(keeper, settled={first.id: "undo"})
    assert owners(keeper) == {node: "first"}


def test_a_grant_answered_again_to_a_copy_is_undone_by_no_worker(keeper):
    """A copy came again from another reply queue and was answered with the grant its
    request holds: a live client has the nodes. The bounce of an earlier copy, learnt
    by this worker or by one that stood by meanwhile, must not take them back."""
    node = add_node(keeper, "n1")
    first, reply = allocate(keeper, "first", 1)
    (out,) = commit_from(keeper, first, "new-queue").replies
    assert (out.reply_to, out.reply["status"]) == ("new-queue", 200)
    assert sql(keeper, "SELECT regranted FROM grant_outbox") == [(1,)]
    commit(keeper, settled={first.id: "undo"})
    assert owners(keeper) == {node: "first"}
    assert sql(keeper, "SELECT COUNT(*) FROM grant_outbox") == [(0,)]


def test_a_grant_and_its_copy_in_one_batch_are_written_down_as_answered_again(keeper):
    node = add_node(keeper, "n1")
    first = request("allocate", owner="first", count=1, node_pool="p")
    batch = keeper.commit([(None, Properties(reply_to_of(first), first.id), first),
                           (None, Properties("new-queue", first.id), first)], [], None)
    assert [(out.reply_to, out.reply["status"]) for out in batch.replies] == [
        (reply_to_of(first), 200), ("new-queue", 200)]
    assert sql(keeper, "SELECT regranted FROM grant_outbox") == [(1,)]
    commit(keeper, settled={first.id: "undo"})
    assert owners(keeper) == {node: "first"}


def test_a_takeover_adopts_no_grant_it_settles_in_the_same_batch(keeper):
    """A worker back in charge brings outcomes it learnt before standing by: those grants
    leave the outbox in the takeover's batch, and must not be sent again from it."""
    add_node(keeper, "n1")
    add_node(keeper, "n2")
    settled, _ = allocate(keeper, "settled", 1)
    unsettled, _ = allocate(keeper, "unsettled", 1)
    keeper.stand_by()
    batch = commit(keeper, settled={settled.id: "delivered"})
    assert [row.request_id for row in batch.adopted_grants] == [unsettled.id]
    assert sql(keeper, "SELECT request_id FROM grant_outbox") == [(unsettled.id,)]


def test_a_waiting_allocate_sent_again_from_another_queue_is_served_there(keeper):
    node = add_node(keeper, "n1")
    allocate(keeper, "holder", 1)
    waiter = wait_for(keeper, "waiter", 1)
    (out,) = commit_from(keeper, waiter, "new-queue").replies
    assert (out.reply_to, out.reply["status"]) == ("new-queue", protocol.QUEUED)
    assert sql(keeper, "SELECT reply_to FROM waiting_requests") == [("new-queue",)]
    # The interim reply bouncing from the old queue no longer drops it.
    commit(keeper, bounced=[(reply_to_of(waiter), {"id": waiter.id, "status": protocol.QUEUED})])
    assert waiting(keeper) == ["waiter"]
    batch = commit(keeper, request("release", owner="holder"))
    (grant,) = [out for out in batch.replies if out.request_id == waiter.id]
    assert (grant.reply_to, grant.grant) == ("new-queue", True)
    assert owners(keeper) == {node: "waiter"}


def test_a_waiter_whose_client_moved_waits_again_when_the_bounce_and_the_copy_meet(keeper):
    """In one batch: the interim reply bounced from the old queue (the waiter is dropped)
    and the copy from the new queue arrives (it waits afresh). The dropped row's delete
    must reach the database before the new row's insert (same request id)."""
    node = add_node(keeper, "n1")
    allocate(keeper, "holder", 1)
    waiter = wait_for(keeper, "waiter", 1)
    batch = commit_from(keeper, waiter, "new-queue", bounced=[
        (reply_to_of(waiter), {"id": waiter.id, "status": protocol.QUEUED})])
    # The old queue is told the waiter was dropped (nobody listens there); the new one
    # that the copy waits.
    assert [(out.reply_to, out.reply["status"]) for out in batch.replies] == [
        (reply_to_of(waiter), 409), ("new-queue", protocol.QUEUED)]
    assert sql(keeper, "SELECT request_id, reply_to FROM waiting_requests") == [
        (waiter.id, "new-queue")]
    batch = commit(keeper, request("release", owner="holder"))
    (grant,) = [out for out in batch.replies if out.request_id == waiter.id]
    assert (grant.reply_to, grant.grant) == ("new-queue", True)
    assert owners(keeper) == {node: "waiter"}


def test_a_grant_sent_again_to_another_queue_is_marked_regranted(keeper):
    add_node(keeper, "n1")
    first, _ = allocate(keeper, "first", 1)
    batch = commit_from(keeper, first, "new-queue")
    (out,) = batch.replies
    (node,) = out.reply["nodes"].values()
    assert out.reply_to == "new-queue" and '"ipmi_password": "p"' in node["blob"]  # in full
    assert batch.regranted == {first.id}


def test_a_batch_costs_no_rollback_round_trip_and_an_open_read_is_still_rolled_back(
        keeper, monkeypatch):
    import pymysql.connections
    rollbacks = []
    real_rollback = pymysql.connections.Connection.rollback

    def counted_rollback(conn):
        rollbacks.append(conn)
        return real_rollback(conn)

    monkeypatch.setattr(pymysql.connections.Connection, "rollback", counted_rollback)
    add_node(keeper, "n1")  # reads the node's id through keeper.engine: one rollback
    rollbacks.clear()
    allocate(keeper, "a", 1)
    commit(keeper, request("release", owner="a"))
    assert rollbacks == []  # committed batches: the pool has nothing to roll back
    with keeper.engine.connect() as conn:
        conn.exec_driver_sql("SELECT COUNT(*) FROM nodes")  # a read opens a transaction
    assert len(rollbacks) == 1  # not left open for the next batch to read through


# --- quotas: a user's release serves that user's waiters in every pool -----------------

def test_a_release_under_quota_serves_the_users_waiters_in_each_pool(engine, database_url):
    """alice may hold one node. She waits in pools a and b while holding a node of a third
    pool; each release of hers must serve her next waiter, whichever pool it is in."""
    keeper = make_keeper(engine, database_url, quotas={"alice": 1})
    try:
        for name, node_pool in (("h1", "h"), ("a1", "a"), ("b1", "b")):
            add_node(keeper, name, node_pool)

        def as_alice(op, **args):
            req = request(op, **args)
            req.user = "alice"
            return req, commit(keeper, req)

        as_alice("allocate", owner="held", count=1, node_pool="h")
        waiters = {}
        for node_pool in ("a", "b"):
            req, batch = as_alice("allocate", owner=f"in-{node_pool}", count=1,
                                  node_pool=node_pool, wait=True)
            assert only_reply(batch, req).reply["status"] == protocol.QUEUED
            waiters[node_pool] = req

        _, batch = as_alice("release", owner="held")
        (first,) = [req for req in waiters.values() if replies(batch, req)]
        assert_granted(batch, first, 1)
        (second,) = [req for req in waiters.values() if req is not first]
        assert not replies(batch, second), "over her quota: only one may be served"
        assert waiting(keeper) == [second.args["owner"]]

        _, batch = as_alice("release", owner=first.args["owner"])
        assert_granted(batch, second, 1)
        assert waiting(keeper) == []
    finally:
        keeper.close()


# --- a deadlock inside an operation's savepoint --------------------------------------

def test_a_deadlock_in_an_operations_savepoint_surfaces_as_a_lock_conflict(keeper, monkeypatch):
    """InnoDB rolls a deadlocked transaction back, savepoints included: closing the batch's
    session then fails (1305, no such savepoint). The worker must still see the deadlock,
    which it retries, and not that failure, which after three it would blame on the batch."""
    import pymysql
    from sqlalchemy.exc import OperationalError

    from molteniron import db
    from molteniron.workers import dispatch

    def deadlocked(ctx, req):
        ctx.batch.session.connection().exec_driver_sql("ROLLBACK")  # what InnoDB did
        raise OperationalError("UPDATE nodes ...", None,
                               pymysql.err.OperationalError(1213, "Deadlock found"))

    add_node(keeper, "n1")
    monkeypatch.setitem(dispatch.HANDLERS, "get_field", deadlocked)
    with pytest.raises(OperationalError) as failed:
        commit(keeper, request("get_field", owner="x", field="name"))
    assert db.lock_conflict(failed.value), failed.value


# --- the connection kept from batch to batch -----------------------------------------

def test_a_batch_after_its_connection_died_runs_on_a_fresh_one_and_loses_nothing(keeper):
    from sqlalchemy.exc import DBAPIError

    def kept_connection_id():
        """The server's id of the connection the keeper keeps between batches."""
        connection = keeper.connection
        assert connection is not None
        connection_id = connection.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        connection.commit()
        return connection_id

    node = add_node(keeper, "n1")
    connection_id = kept_connection_id()
    with keeper.engine.connect() as other:
        other.exec_driver_sql(f"KILL CONNECTION {connection_id}")
    held = request("allocate", owner="job", count=1, node_pool="p")
    with pytest.raises(DBAPIError):
        commit(keeper, held)  # as the worker does, it retries the batch after reload
    assert keeper.connection is None  # let go: its state after the failure is unknown
    keeper.reload_needed = True
    assert only_reply(commit(keeper, held), held).reply["status"] == 200
    assert owners(keeper) == {node: "job"}
    assert kept_connection_id() != connection_id
