"""The fence checked in the write trip: a batch of allocates, releases, renewals and
cancels reads nothing before its writes.

Its first write fails unless the epoch is still the worker's and none of its requests
was answered before; then memory is reloaded and the batch runs again the careful way
(the fence read, the stored replies). Each test drives the keeper as the worker does.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError

from molteniron import db, errors, protocol
from molteniron.config import Config
from molteniron.workers import fence
from molteniron.workers.keeper import PoolKeeper
from tests.conftest import statements_sent
from tests.test_keeper import (  # noqa: F401
    Properties,
    add_node,
    allocate,
    commit,
    keeper,
    owners,
    reply_to_of,
    request,
    sql,
)

FENCE_READ = "(SELECT NULL, epoch, NULL, NULL FROM worker_meta WHERE id = 1 FOR UPDATE)"


def count_reloads(pool_keeper) -> list[int]:
    """A list that grows by one at each reload of the keeper's memory of the pool."""
    loads = []
    load = pool_keeper.state.load

    def counted_load(session):
        loads.append(1)
        return load(session)

    pool_keeper.state.load = counted_load
    return loads


@pytest.fixture
def active(keeper):  # noqa: F811 - the fixture imported above
    """A keeper that holds the pool (its first batch took the epoch), with one node."""
    node = add_node(keeper, "n1")
    return SimpleNamespace(keeper=keeper, node=node)


def test_an_allocate_and_a_release_each_make_one_round_trip(active):
    pool_keeper = active.keeper
    req = request("allocate", owner="job", count=1, node_pool="p")
    with statements_sent(pool_keeper.engine) as sent:
        commit(pool_keeper, req)
    assert len(sent) == 1, sent
    assert sent[0].startswith("UPDATE worker_meta SET epoch = IF(") and sent[0].endswith("COMMIT")
    assert owners(pool_keeper) == {active.node: "job"}
    with statements_sent(pool_keeper.engine) as sent:
        commit(pool_keeper, request("release", owner="job"))
    assert len(sent) == 1, sent
    assert owners(pool_keeper) == {active.node: None}


def test_a_worker_fenced_off_writes_nothing_though_it_read_nothing_first(active, caplog):
    pool_keeper = active.keeper
    with pool_keeper.engine.begin() as conn:  # another worker took over meanwhile
        conn.exec_driver_sql("UPDATE worker_meta SET epoch = epoch + 1")
    stored_before = sql(pool_keeper, "SELECT request_id FROM processed_requests ORDER BY 1")
    with caplog.at_level(logging.INFO, logger="molteniron.workers.keeper"), \
            statements_sent(pool_keeper.engine) as sent, pytest.raises(errors.NotActiveWorker):
        commit(pool_keeper, request("allocate", owner="job", count=1, node_pool="p"))
    assert sent[0].startswith("UPDATE worker_meta SET epoch = IF(")  # no read before it
    assert "event=fence_tripped" in caplog.text and "event=fenced" in caplog.text
    assert owners(pool_keeper) == {active.node: None}
    assert sql(pool_keeper, "SELECT request_id FROM processed_requests ORDER BY 1") == stored_before


def test_with_the_fence_row_gone_no_other_worker_can_take_over(active, database_url):
    """The fence in the write trip updates row 1 of worker_meta: deleted by hand, the
    UPDATE matches nothing and passes. That cannot let two workers act at once, because
    taking over reads the row and refuses without it. (A guard in the trip that fails on
    a missing row, an INSERT ... SELECT of worker_meta, cost 0.18 ms a batch: not worth
    it for a row only a person deletes.)"""
    pool_keeper = active.keeper
    (row,) = sql(pool_keeper, "SELECT id, epoch, holder FROM worker_meta")
    with pool_keeper.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM worker_meta WHERE id = 1")
    other = PoolKeeper(Config(db_url=database_url), "worker-2")
    try:
        with pytest.raises(LookupError, match="worker_meta has no row 1"):
            commit(other, request("allocate", owner="other", count=1, node_pool="p"))
        assert owners(pool_keeper) == {active.node: None}
        assert other.epoch is None
    finally:  # the next tests share this database
        other.close()
        with pool_keeper.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO worker_meta (id, epoch, holder) VALUES (%s, %s, %s)",
                                 row)


def test_a_request_answered_before_and_sent_again_unmarked_gets_its_stored_reply(
        active, caplog):
    pool_keeper = active.keeper
    first, reply = allocate(pool_keeper, "first", 1)
    assert reply["status"] == 200
    commit(pool_keeper, request("release", owner="first"))
    # An old client sends the same allocate again, in a batch with a new one.
    second = request("allocate", owner="second", count=1, node_pool="p")
    with caplog.at_level(logging.INFO, logger="molteniron.workers.keeper"):
        batch = commit(pool_keeper, first, second)
    assert "event=fence_tripped" in caplog.text
    replies = {out.request_id: out for out in batch.replies}
    assert replies[first.id].mandatory is False  # a replay: its bounce would undo nothing
    assert replies[first.id].reply["status"] == 200 and not replies[first.id].grant
    assert replies[second.id].grant and replies[second.id].reply["status"] == 200
    assert owners(pool_keeper) == {active.node: "second"}  # the released node went once


def test_copies_sent_again_and_again_cost_one_reload_not_one_each(active, caplog):
    pool_keeper = active.keeper
    first, _ = allocate(pool_keeper, "first", 1)
    commit(pool_keeper, request("release", owner="first"))
    loads = count_reloads(pool_keeper)
    with caplog.at_level(logging.INFO, logger="molteniron.workers.keeper"):
        for _ in range(5):
            (out,) = commit(pool_keeper, first).replies
            assert out.reply["status"] == 200 and not out.grant
    assert caplog.text.count("event=fence_tripped") == 1 and loads == [1]
    assert owners(pool_keeper) == {active.node: None}
    pool_keeper.careful_until = 0.0  # the careful spell is over
    again, _ = allocate(pool_keeper, "again", 1)
    with statements_sent(pool_keeper.engine) as sent:
        commit(pool_keeper, request("release", owner="again"))
    assert len(sent) == 1, sent


def test_a_copy_its_client_marked_is_checked_before_it_is_handled(active, caplog):
    pool_keeper = active.keeper
    first, _ = allocate(pool_keeper, "first", 1)
    commit(pool_keeper, request("release", owner="first"))
    copy = Properties(reply_to_of(first), first.id, headers={protocol.COPY_HEADER: True})
    loads = count_reloads(pool_keeper)
    with caplog.at_level(logging.INFO, logger="molteniron.workers.keeper"):
        batch = pool_keeper.commit([(None, copy, first)], [], None)
    (out,) = batch.replies
    assert out.reply["status"] == 200 and not out.grant and out.mandatory is False
    assert owners(pool_keeper) == {active.node: None}
    assert "event=fence_tripped" not in caplog.text and loads == []  # no reload needed


def test_a_redelivered_request_is_checked_before_it_is_handled(active, caplog):
    pool_keeper = active.keeper
    first, _ = allocate(pool_keeper, "first", 1)
    commit(pool_keeper, request("release", owner="first"))
    redelivered = SimpleNamespace(redelivered=True, delivery_tag=1)
    with caplog.at_level(logging.INFO, logger="molteniron.workers.keeper"):
        batch = pool_keeper.commit(
            [(redelivered, Properties(reply_to_of(first), first.id), first)], [], None)
    assert [out.grant for out in batch.replies] == [False]
    assert owners(pool_keeper) == {active.node: None}
    assert "event=fence_tripped" not in caplog.text


def lax_engine(database_url):
    """An engine whose sessions start with sql_mode '' (a lax server), then get strict_writes."""
    engine = create_engine(database_url)

    @event.listens_for(engine, "connect")
    def lax(dbapi_connection, connection_record):
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION sql_mode = ''")
        cursor.close()

    event.listen(engine, "connect", fence.strict_writes)
    return engine


def test_the_fence_fails_on_a_lax_server_instead_of_writing_epoch_zero(active, database_url):
    epoch = sql(active.keeper, "SELECT epoch FROM worker_meta WHERE id = 1")[0][0]
    engine = lax_engine(database_url)
    try:
        with engine.connect() as conn:
            assert "STRICT_ALL_TABLES" in conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()
            statement, params = fence.trip_statement(epoch + 1, [])
            with pytest.raises(DBAPIError) as info:
                conn.exec_driver_sql(statement, params)
            assert fence.tripped(info.value)
            conn.rollback()
        with engine.connect() as conn:
            now_held = conn.execute(text("SELECT epoch FROM worker_meta WHERE id = 1")).scalar()
            assert now_held == epoch
    finally:
        engine.dispose()


def test_the_keepers_connections_write_strictly_whatever_the_server_says(active):
    """The fence relies on it (test above); the server's own default is not enough."""
    mode = active.keeper.connection.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()
    active.keeper.connection.commit()
    assert "STRICT_ALL_TABLES" in mode.split(",")


@pytest.mark.parametrize("why", ["memory_to_reload", "operation_through_the_orm"])
def test_a_batch_that_may_not_skip_the_read_reads_the_fence_first(active, why):
    pool_keeper = active.keeper
    if why == "memory_to_reload":
        pool_keeper.reload_needed = True
        req = request("release", owner="job")
    else:
        req = request("get_field", owner="job", field="name")
    with statements_sent(pool_keeper.engine) as sent:
        commit(pool_keeper, req)
    assert sent[0].startswith(FENCE_READ)
    assert not any(s.startswith("UPDATE worker_meta") for s in sent)


def test_a_fenced_off_waiting_allocate_leaves_no_waiter(active):
    """A queued allocate sends the batch's writes early (it needs its row's id): the
    fence, first among them, trips there, inside the handler."""
    pool_keeper = active.keeper
    allocate(pool_keeper, "holder", 1)  # the only node: the next allocate must wait
    with pool_keeper.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE worker_meta SET epoch = epoch + 1")
    with pytest.raises(errors.NotActiveWorker):
        commit(pool_keeper, request("allocate", owner="job", count=1, node_pool="p",
                                    wait=True))
    assert sql(pool_keeper, "SELECT COUNT(*) FROM waiting_requests") == [(0,)]
    assert owners(pool_keeper) == {active.node: "holder"}


def test_on_a_galera_node_a_batch_reads_the_fence_first(active):
    """Galera's wsrep_sync_wait=1 makes reads wait for the cluster, not writes: a fence
    in the write trip could miss a takeover committed on another node."""
    pool_keeper = active.keeper
    pool_keeper.connection.info[db._GALERA] = True  # what causal_reads notes on a Galera node
    assert db.on_galera(pool_keeper.connection)
    with statements_sent(pool_keeper.engine) as sent:
        commit(pool_keeper, request("release", owner="j"))
    assert sent[0].startswith(FENCE_READ)
    assert not any(s.startswith("UPDATE worker_meta") for s in sent)
