"""The pool's rules where they run: the worker's PoolState, written by its flush.

Each test adds nodes through the pool functions, loads a PoolState from the
database, applies the rules in memory, flushes, commits, and then checks both
the database (fresh SQL) and what memory says, so neither can drift unseen.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from molteniron import errors, pool
from molteniron.models import Allocation, EndReason, Node, State
from molteniron.workers.state import PoolState

T0 = datetime(2024, 5, 6, 7, 8, 9)
HOUR = timedelta(hours=1)


# --- helpers -----------------------------------------------------------------

def add(session, name, node_pool="default"):
    return pool.add_baremetal(session, name, "10.0.0.1", "admin", "s3cret", "10.1.0.1",
                              "aa:bb:cc:dd:ee:ff", "x86_64", 8, 16384, 500, node_pool)


def add_many(session, count, node_pool="default", prefix="n"):
    """Add count ready nodes and commit; return their ids in order."""
    ids = [add(session, f"{prefix}{i}", node_pool).id for i in range(count)]
    session.commit()
    return ids


def loaded(session) -> PoolState:
    state = PoolState()
    state.load(session)
    return state


def flush(session, state, now=T0):
    state.flush(session, now)
    session.commit()


def to_maintenance(session, node_id):
    pool.set_field(session, node_id, "status", "maintenance")
    session.commit()


def node_row(session, node_id):
    """(state, owner, allocated_at, lease_expires_at) read fresh from the database."""
    return tuple(session.execute(select(Node.state, Node.owner, Node.allocated_at,
                                        Node.lease_expires_at).where(Node.id == node_id)).one())


def history(session, **where):
    query = select(Allocation.node_id, Allocation.owner, Allocation.request_id,
                   Allocation.started_at, Allocation.ended_at, Allocation.end_reason)
    for key, value in where.items():
        query = query.where(getattr(Allocation, key) == value)
    return [tuple(r) for r in session.execute(query.order_by(Allocation.id))]


def snapshot(session):
    """Every node's row and every allocation row, read fresh from the database."""
    nodes = session.execute(select(Node.id, Node.node_pool, Node.state, Node.owner,
                                   Node.allocated_at, Node.lease_expires_at).order_by(Node.id))
    allocations = session.execute(select(Allocation.id, Allocation.node_id, Allocation.owner,
                                         Allocation.request_id, Allocation.started_at,
                                         Allocation.ended_at, Allocation.end_reason)
                                  .order_by(Allocation.id))
    return [tuple(r) for r in nodes], [tuple(r) for r in allocations]


def memory(state):
    """Everything PoolState decides with, empty index entries left out."""
    return copy.deepcopy({
        "nodes": state.nodes,
        "ready": {p: ids for p, ids in state.ready.items() if ids},
        "owned": {o: ids for o, ids in state.owned.items() if ids},
        "capacity": {p: n for p, n in state.capacity_of.items() if n},
        "leases": state.leases,
        "request_of": state.request_of,
        "granted": {r: ids for r, ids in state.granted.items() if ids},
    })


def ids_of(records):
    return [r.id for r in records]


def count_in_sql(session, *where):
    return session.scalar(select(func.count()).select_from(Node).where(*where))


# --- allocate ----------------------------------------------------------------

def test_allocate_gives_lowest_ids_and_opens_history(session):
    ids = add_many(session, 5)
    when = datetime(2024, 5, 6, 7, 8, 9, 123456)
    state = loaded(session)
    got = state.allocate("job-1", 3, "default", "req-1", when, when + HOUR)
    flush(session, state, when)

    assert ids_of(got) == ids[:3]
    assert [r.state for r in got] == ["allocated"] * 3
    for node_id in ids[:3]:
        assert node_row(session, node_id) == (State.ALLOCATED, "job-1", when, when + HOUR)
    for node_id in ids[3:]:
        assert node_row(session, node_id) == (State.READY, None, None, None)
    assert history(session) == [(i, "job-1", "req-1", when, None, None) for i in ids[:3]]
    assert session.scalars(select(Allocation.node_name).order_by(Allocation.id)).all() == [
        "n0", "n1", "n2"]
    assert state.owned["job-1"] == set(ids[:3])
    assert state.ready["default"] == set(ids[3:])
    assert state.granted["req-1"] == set(ids[:3])


def test_allocate_is_deterministic_after_release(session):
    ids = add_many(session, 6)
    state = loaded(session)
    assert ids_of(state.allocate("a", 2, "default", None, T0, T0 + HOUR)) == ids[0:2]
    assert ids_of(state.allocate("b", 2, "default", None, T0, T0 + HOUR)) == ids[2:4]
    state.release_owner("a", EndReason.RELEASED, T0)
    flush(session, state)
    # The freed nodes have the lowest ids again, so they are handed out first, also
    # by a worker that loads the pool afresh from the database.
    again = loaded(session)
    assert ids_of(state.allocate("c", 3, "default", None, T0, T0 + HOUR)) == [
        ids[0], ids[1], ids[4]]
    assert ids_of(again.allocate("c", 3, "default", None, T0, T0 + HOUR)) == [
        ids[0], ids[1], ids[4]]


def test_allocate_not_enough_ready_is_409_and_changes_nothing(session):
    add_many(session, 4)
    state = loaded(session)
    state.allocate("holder", 2, "default", "r-holder", T0, T0 + HOUR)
    flush(session, state)
    before_db, before_memory = snapshot(session), memory(state)

    with pytest.raises(errors.NotEnoughNodes) as info:
        state.allocate("greedy", 3, "default", "r-greedy", T0, T0 + HOUR)
    flush(session, state)

    assert info.value.status == 409
    assert "Found 2, requested 3" in info.value.message
    assert memory(state) == before_memory
    assert snapshot(session) == before_db
    assert count_in_sql(session, Node.state == State.READY) == 2


def test_allocate_more_than_capacity_is_pool_too_small(session):
    ids = add_many(session, 3)
    to_maintenance(session, ids[0])
    state = loaded(session)
    before_db, before_memory = snapshot(session), memory(state)

    with pytest.raises(errors.PoolTooSmall) as info:
        state.allocate("job", 3, "default", None, T0, T0 + HOUR)  # 2 outside maintenance
    assert info.value.status == 409
    assert isinstance(info.value, errors.Conflict)
    with pytest.raises(errors.PoolTooSmall):
        state.allocate("job", 1, "no-such-pool", None, T0, T0 + HOUR)
    flush(session, state)

    assert memory(state) == before_memory
    assert snapshot(session) == before_db


def test_allocate_waits_for_allocated_nodes_but_not_for_maintenance(session):
    ids = add_many(session, 3)
    to_maintenance(session, ids[0])
    state = loaded(session)
    state.allocate("holder", 1, "default", None, T0, T0 + HOUR)
    # 2 outside maintenance, 1 of them ready: 2 may come later, 3 never.
    with pytest.raises(errors.NotEnoughNodes):
        state.allocate("job", 2, "default", None, T0, T0 + HOUR)
    with pytest.raises(errors.PoolTooSmall):
        state.allocate("job", 3, "default", None, T0, T0 + HOUR)


def test_allocate_skips_maintenance_nodes(session):
    ids = add_many(session, 3)
    to_maintenance(session, ids[0])
    state = loaded(session)
    got = state.allocate("job", 2, "default", None, T0, T0 + HOUR)
    flush(session, state)
    assert ids_of(got) == ids[1:]
    assert node_row(session, ids[0]) == (State.MAINTENANCE, None, None, None)


def test_allocate_pools_are_separate(session):
    a = add_many(session, 2, node_pool="poolA", prefix="a")
    b = add_many(session, 3, node_pool="poolB", prefix="b")
    state = loaded(session)
    assert ids_of(state.allocate("job", 2, "poolB", None, T0, T0 + HOUR)) == b[:2]
    with pytest.raises(errors.PoolTooSmall):
        state.allocate("job", 3, "poolA", None, T0, T0 + HOUR)
    with pytest.raises(errors.NotEnoughNodes):
        state.allocate("job", 2, "poolB", None, T0, T0 + HOUR)
    with pytest.raises(errors.PoolTooSmall):
        state.allocate("job", 1, "default", None, T0, T0 + HOUR)  # the "default" pool is empty
    flush(session, state)
    assert state.ready == {"poolA": set(a), "poolB": {b[2]}}
    assert count_in_sql(session, Node.state == State.ALLOCATED) == 2
    assert count_in_sql(session, Node.node_pool == "poolA", Node.state == State.READY) == 2


def test_allocate_more_for_the_same_owner_adds_nodes(session):
    add_many(session, 3)
    state = loaded(session)
    state.allocate("job", 1, "default", "r1", T0, T0 + HOUR)
    state.allocate("job", 2, "default", "r2", T0, T0 + HOUR)
    flush(session, state)
    assert count_in_sql(session, Node.owner == "job") == 3
    assert sorted(r[2] for r in history(session, owner="job", ended_at=None)) == [
        "r1", "r2", "r2"]
    assert len(state.owned["job"]) == 3


# --- release_owner and release_request ------------------------------------------

def test_release_returns_every_node_of_owner_and_closes_history(session):
    a = add_many(session, 3, node_pool="poolA", prefix="a")
    b = add_many(session, 2, node_pool="poolB", prefix="b")
    state = loaded(session)
    state.allocate("job", 2, "poolA", "r1", T0, T0 + HOUR)
    state.allocate("job", 1, "poolB", "r2", T0, T0 + HOUR)
    state.allocate("other", 1, "poolA", "r3", T0, T0 + HOUR)
    flush(session, state)

    when = T0 + timedelta(minutes=30)
    released = state.release_owner("job", EndReason.RELEASED, when)
    flush(session, state, when)

    assert ids_of(released) == sorted([a[0], a[1], b[0]])
    for node_id in ids_of(released):
        assert node_row(session, node_id) == (State.READY, None, None, None)
    assert node_row(session, a[2])[:2] == (State.ALLOCATED, "other")
    assert [r[4:] for r in history(session, owner="job")] == [(when, EndReason.RELEASED)] * 3
    assert history(session, ended_at=None) == [(a[2], "other", "r3", T0, None, None)]
    assert "job" not in state.owned
    assert state.ready == {"poolA": {a[0], a[1]}, "poolB": {b[0], b[1]}}
    assert set(state.leases) == {a[2]}


def test_release_in_the_same_batch_as_allocate_writes_closed_history(session):
    (node_id,) = add_many(session, 1)
    state = loaded(session)
    state.allocate("job", 1, "default", "r1", T0, T0 + HOUR)
    state.release_owner("job", EndReason.RELEASED, T0 + timedelta(seconds=1))
    flush(session, state, T0 + timedelta(seconds=1))
    assert node_row(session, node_id) == (State.READY, None, None, None)
    assert history(session) == [
        (node_id, "job", "r1", T0, T0 + timedelta(seconds=1), EndReason.RELEASED)]


def test_a_node_taken_released_and_taken_again_in_one_batch_has_history_in_order(session):
    # A redelivered batch after a takeover holds such runs: the first holder's closed
    # row must come before the second holder's open one, or history shows two owners.
    (node_id,) = add_many(session, 1)
    state = loaded(session)
    state.allocate("first", 1, "default", "r1", T0, T0 + HOUR)
    state.release_owner("first", EndReason.RELEASED, T0)
    state.allocate("second", 1, "default", "r2", T0, T0 + HOUR)
    flush(session, state, T0)
    assert history(session) == [
        (node_id, "first", "r1", T0, T0, EndReason.RELEASED),
        (node_id, "second", "r2", T0, None, None)]


def test_release_unknown_owner_is_404_and_changes_nothing(session):
    add_many(session, 2)
    state = loaded(session)
    state.allocate("job", 1, "default", None, T0, T0 + HOUR)
    flush(session, state)
    before_db, before_memory = snapshot(session), memory(state)

    with pytest.raises(errors.OwnerNotFound) as info:
        state.release_owner("nobody", EndReason.RELEASED, T0)
    flush(session, state)

    assert info.value.status == 404
    assert "nobody" in info.value.message
    assert memory(state) == before_memory
    assert snapshot(session) == before_db
    state.release_owner("job", EndReason.RELEASED, T0)
    with pytest.raises(errors.OwnerNotFound):
        state.release_owner("job", EndReason.RELEASED, T0)  # a second release finds nothing


def test_release_request_frees_only_that_requests_nodes(session):
    ids = add_many(session, 4)
    state = loaded(session)
    state.allocate("job", 1, "default", "r1", T0, T0 + HOUR)
    state.allocate("job", 2, "default", "r2", T0, T0 + HOUR)
    flush(session, state)

    freed = state.release_request("r2", EndReason.CANCELLED, T0)
    flush(session, state)

    assert ids_of(freed) == ids[1:3]
    assert node_row(session, ids[0])[:2] == (State.ALLOCATED, "job")
    assert node_row(session, ids[1])[:2] == (State.READY, None)
    assert node_row(session, ids[2])[:2] == (State.READY, None)
    assert [(r[2], r[5]) for r in history(session)] == [
        ("r1", None), ("r2", EndReason.CANCELLED), ("r2", EndReason.CANCELLED)]
    assert state.release_request("r2", EndReason.CANCELLED, T0) == []  # already released
    assert state.release_request("unknown", EndReason.CANCELLED, T0) == []
    assert state.owned == {"job": {ids[0]}}


def test_release_request_knows_the_requests_of_a_loaded_pool(session):
    ids = add_many(session, 2)
    first = loaded(session)
    first.allocate("job", 1, "default", "r1", T0, T0 + HOUR)
    first.allocate("job", 1, "default", "r2", T0, T0 + HOUR)
    flush(session, first)

    state = loaded(session)  # the request ids come back from the open history rows
    assert ids_of(state.release_request("r2", EndReason.EXPIRED, T0)) == [ids[1]]
    flush(session, state)
    assert [(r[2], r[5]) for r in history(session)] == [("r1", None), ("r2", EndReason.EXPIRED)]


# --- renew ----------------------------------------------------------------------

def test_renew_an_owner_holding_nothing_is_404_and_changes_nothing(session):
    add_many(session, 1)
    state = loaded(session)
    state.allocate("job", 1, "default", None, T0, T0 + HOUR)
    flush(session, state)
    before_db, before_memory = snapshot(session), memory(state)
    with pytest.raises(errors.OwnerNotFound) as info:
        state.renew("nobody", T0 + 2 * HOUR)
    flush(session, state)
    assert info.value.status == 404
    assert memory(state) == before_memory
    assert snapshot(session) == before_db
    state.release_owner("job", EndReason.RELEASED, T0)
    with pytest.raises(errors.OwnerNotFound):
        state.renew("job", T0 + 2 * HOUR)


def test_renew_writes_the_new_lease_of_every_node_of_the_owner(session):
    ids = add_many(session, 3)
    state = loaded(session)
    state.allocate("job", 2, "default", None, T0, T0 + HOUR)
    state.allocate("other", 1, "default", None, T0, T0 + HOUR)
    flush(session, state)

    renewed = state.renew("job", T0 + 5 * HOUR)
    flush(session, state, T0 + timedelta(minutes=10))

    assert ids_of(renewed) == ids[:2]
    assert [r.lease_expires_at for r in renewed] == ["2024-05-06T12:08:09"] * 2
    assert [node_row(session, i)[3] for i in ids] == [T0 + 5 * HOUR, T0 + 5 * HOUR, T0 + HOUR]
    assert [node_row(session, i)[2] for i in ids] == [T0] * 3  # allocated_at stays
    assert loaded(session).leases == {ids[0]: T0 + 5 * HOUR, ids[1]: T0 + 5 * HOUR,
                                      ids[2]: T0 + HOUR}


def test_renew_in_the_same_batch_as_allocate_writes_the_renewed_lease(session):
    (node_id,) = add_many(session, 1)
    state = loaded(session)
    state.allocate("job", 1, "default", None, T0, T0 + HOUR)
    state.renew("job", T0 + 3 * HOUR)
    flush(session, state)
    assert node_row(session, node_id) == (State.ALLOCATED, "job", T0, T0 + 3 * HOUR)


# --- expire ---------------------------------------------------------------------

def test_expire_takes_back_only_nodes_whose_lease_ended(session):
    ids = add_many(session, 4)
    state = loaded(session)
    state.allocate("short", 2, "default", "r1", T0, T0 + timedelta(seconds=60))
    state.allocate("long", 1, "default", "r2", T0, T0 + timedelta(seconds=120))
    flush(session, state)

    assert state.expire(T0 + timedelta(seconds=59)) == {}
    at = T0 + timedelta(seconds=60)
    expired = state.expire(at)  # a lease ends at its last instant
    flush(session, state, at)

    assert list(expired) == ["short"]
    assert ids_of(expired["short"]) == ids[:2]
    assert [node_row(session, i)[:2] for i in ids] == [
        (State.READY, None), (State.READY, None), (State.ALLOCATED, "long"), (State.READY, None)]
    assert [r[4:] for r in history(session, owner="short")] == [(at, EndReason.EXPIRED)] * 2
    assert history(session, owner="long")[0][4:] == (None, None)
    assert state.ready["default"] == {ids[0], ids[1], ids[3]}
    assert set(state.leases) == {ids[2]}
    assert state.expire(at) == {}  # nothing twice


def test_a_renewed_node_does_not_expire_at_its_old_time(session):
    (node_id,) = add_many(session, 1)
    state = loaded(session)
    state.allocate("job", 1, "default", None, T0, T0 + timedelta(seconds=60))
    flush(session, state)
    state.renew("job", T0 + timedelta(seconds=300))
    flush(session, state, T0 + timedelta(seconds=30))

    assert state.expire(T0 + timedelta(seconds=60)) == {}
    # A worker that takes over reads the renewed lease, not the first one.
    assert loaded(session).expire(T0 + timedelta(seconds=60)) == {}
    assert ids_of(state.expire(T0 + timedelta(seconds=300))["job"]) == [node_id]


def test_a_released_node_does_not_expire_under_its_next_owner(session):
    (node_id,) = add_many(session, 1)
    state = loaded(session)
    state.allocate("first", 1, "default", None, T0, T0 + timedelta(seconds=60))
    state.release_owner("first", EndReason.RELEASED, T0)
    state.allocate("second", 1, "default", None, T0, T0 + timedelta(seconds=600))
    assert state.expire(T0 + timedelta(seconds=60)) == {}
    flush(session, state)
    assert node_row(session, node_id)[:2] == (State.ALLOCATED, "second")


def test_a_loaded_pool_expires_leases_written_by_an_earlier_worker(session):
    ids = add_many(session, 2)
    first = loaded(session)
    first.allocate("job", 1, "default", None, T0, T0 + timedelta(seconds=60))
    flush(session, first)

    state = loaded(session)
    at = T0 + timedelta(seconds=61)
    assert ids_of(state.expire(at)["job"]) == [ids[0]]
    flush(session, state, at)
    assert node_row(session, ids[0]) == (State.READY, None, None, None)
    assert history(session)[0][4:] == (at, EndReason.EXPIRED)


# --- capacity and refresh -----------------------------------------------------------

def capacity_in_sql(session, node_pool):
    return count_in_sql(session, Node.node_pool == node_pool, Node.state != State.MAINTENANCE)


def assert_capacity_right(session, state, pools=("p1", "p2")):
    """Memory's counters agree with the database and with a pool loaded afresh."""
    fresh = loaded(session)
    for node_pool in pools:
        assert state.capacity(node_pool) == capacity_in_sql(session, node_pool), node_pool
        assert fresh.capacity(node_pool) == state.capacity(node_pool), node_pool


def test_capacity_counts_nodes_outside_maintenance_per_pool(session):
    p1 = add_many(session, 3, node_pool="p1", prefix="a")
    add_many(session, 1, node_pool="p2", prefix="b")
    to_maintenance(session, p1[0])
    state = loaded(session)
    assert (state.capacity("p1"), state.capacity("p2"), state.capacity("none")) == (2, 1, 0)
    state.allocate("job", 1, "p1", None, T0, T0 + HOUR)  # allocated nodes still count
    flush(session, state)
    assert state.capacity("p1") == 2
    assert_capacity_right(session, state)


def test_capacity_follows_nodes_that_refresh_moves_or_puts_into_maintenance(session):
    p1 = add_many(session, 3, node_pool="p1", prefix="a")
    p2 = add_many(session, 1, node_pool="p2", prefix="b")
    to_maintenance(session, p1[0])
    state = loaded(session)

    pool.set_field(session, p1[1], "node_pool", "p2")
    session.flush()
    assert state.refresh(session, {p1[1]}) == {"p1", "p2"}
    assert (state.capacity("p1"), state.capacity("p2")) == (1, 2)
    assert_capacity_right(session, state)

    pool.set_field(session, p2[0], "status", "maintenance")
    session.flush()
    assert state.refresh(session, {p2[0]}) == {"p2"}
    assert (state.capacity("p1"), state.capacity("p2")) == (1, 1)

    pool.set_field(session, p1[0], "status", "ready")
    session.flush()
    assert state.refresh(session, {p1[0]}) == {"p1"}
    assert (state.capacity("p1"), state.capacity("p2")) == (2, 1)
    assert_capacity_right(session, state)
    # The ready index followed too: p1 hands out its returning node, p2 the one that came.
    assert ids_of(state.allocate("job", 2, "p1", None, T0, T0 + HOUR)) == [p1[0], p1[2]]
    assert ids_of(state.allocate("job", 1, "p2", None, T0, T0 + HOUR)) == [p1[1]]


def test_refresh_returns_the_pools_nodes_left_and_joined(session):
    p1 = add_many(session, 2, node_pool="p1", prefix="a")
    state = loaded(session)

    pool.set_field(session, p1[0], "cpus", "4", "int")  # changed in place: its own pool
    new = add(session, "c0", node_pool="p3").id
    session.flush()
    assert state.refresh(session, {p1[0], new}) == {"p1", "p3"}
    assert state.nodes[p1[0]].cpus == 4
    assert state.ready["p3"] == {new} and state.capacity("p3") == 1

    session.delete(session.get(Node, p1[1]))
    session.flush()
    assert state.refresh(session, {p1[1]}) == {"p1"}
    assert p1[1] not in state.nodes
    assert state.ready["p1"] == {p1[0]} and state.capacity("p1") == 1
    assert state.refresh(session, set()) == set()
    session.commit()
    assert memory(state) == memory(loaded(session))


def test_refresh_of_an_allocated_node_keeps_its_owner_request_and_lease(session):
    ids = add_many(session, 2)
    state = loaded(session)
    until = T0 + timedelta(seconds=60, microseconds=250_000)
    state.allocate("job", 1, "default", "r1", T0, until)
    flush(session, state)

    for cpus in ("2", "3"):  # two changes, each refreshed on its own (two batches)
        pool.set_field(session, ids[0], "cpus", cpus, "int")
        session.flush()
        assert state.refresh(session, {ids[0]}) == {"default"}

    assert state.owned == {"job": {ids[0]}}
    assert state.granted == {"r1": {ids[0]}}
    assert state.expire(T0 + timedelta(seconds=59)) == {}
    expired = state.expire(until)
    assert {owner: ids_of(records) for owner, records in expired.items()} == {"job": [ids[0]]}
