"""A database that refuses writes is an unhealthy database, never a bad batch.

Each test has a private MariaDB of its own (bench/private.py, bench/db_refusals.py:
read_only is a global, and a full disk is made by a data file that cannot grow), a
worker that logs in as a user without SUPER (read_only stops it; root it would not),
and a fresh vhost on the test run's broker. While writes are refused the worker holds
what it was sent: nothing is dead-lettered, nobody is answered wrongly, and once writes
come back everything is applied in order.
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest

from bench.db_refusals import (
    SmallDiskMariaDB,
    fill_disk,
    fill_table_pages,
    free_disk,
    refused,
    root,
    set_read_only,
)
from bench.private import PrivateMariaDB
from molteniron.config import Config
from molteniron.workers.keeper import PoolKeeper
from tests.private_stack import DATABASE, stack_on
from tests.stack import node_args, wait_until

HELD_FOR = 3  # the CLI's --timeout while writes are refused: it gives up, the worker holds on


@pytest.fixture
def mariadb():
    with PrivateMariaDB() as mariadb:
        yield mariadb


@pytest.fixture
def refusing(mariadb, tmp_path, request):
    """A worker on the private database, answering; set_read_only(mariadb, ...) to break it."""
    with stack_on(mariadb, tmp_path, request) as stack:
        stack.start_worker()
        yield stack


def owners(stack) -> dict[str, str | None]:
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def lease_left(stack, owner: str) -> float:
    (seconds,) = stack.sql(f"SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(), lease_expires_at) "
                           f"FROM nodes WHERE owner = '{owner}'")[0]
    return seconds


def test_release_renew_and_a_waiting_allocate_sent_while_read_only_are_applied_in_order(
        refusing, mariadb):
    stack = refusing
    for i in (1, 2, 3):
        assert stack.cli("add_baremetal", *node_args(i)).returncode == 0
    assert stack.cli("allocate", "job-a", "1").returncode == 0                  # node-1
    assert stack.cli("allocate", "job-b", "1", "--lease", "60").returncode == 0  # node-2

    set_read_only(mariadb, True)
    try:
        # A job's pre-hook that waits for nodes: told it is queued, it keeps waiting
        # past its --timeout instead of giving up.
        waiting = stack.cli_start("--timeout", str(HELD_FOR), "allocate", "job-c", "1",
                                  "--wait", "120")
        wait_until(lambda: "event=held_told_queued" in stack.worker_log(), 30,
                   "the worker to hold the allocate and say it is queued")
        released = stack.cli("--timeout", str(HELD_FOR), "release", "job-a")
        renewed = stack.cli("--timeout", str(HELD_FOR), "renew", "job-b", "--lease", "3600")

        # What the post-hook sees: no answer yet, the release stays queued (README).
        assert released.returncode == 4, released
        assert released.json["status"] == 202 and released.json["queued"] is True, released
        assert renewed.returncode == 4 and "500" not in renewed.stdout, renewed
        assert waiting.process.poll() is None  # twice its --timeout: still waiting
        assert owners(stack) == {"node-1": "job-a", "node-2": "job-b", "node-3": None}
        assert "event=db_refuses_writes" in stack.worker_log()
    finally:
        set_read_only(mariadb, False)

    allocated = waiting.result(timeout=60)
    assert allocated.returncode == 0, allocated
    # In order: the allocate came first, while node-1 was still job-a's.
    assert list(allocated.json["nodes"]) == ["node_3"]
    wait_until(lambda: owners(stack) == {"node-1": None, "node-2": "job-b", "node-3": "job-c"},
               30, "the held release to free node-1")
    wait_until(lambda: lease_left(stack, "job-b") > 1800, 30, "the held renew to take effect")
    assert stack.dead_letters() == 0
    log = stack.worker_log()
    assert "dead_lettered" not in log and "batch_refused" not in log
    assert log.count("event=db_refuses_writes") >= 2  # held, and retried
    assert "event=db_hold_ended" in log
    assert stack.workers[0].poll() is None


def test_a_worker_holding_a_release_stops_at_once_on_sigterm_and_the_release_survives(
        refusing, mariadb):
    stack = refusing
    assert stack.cli("add_baremetal", *node_args(1)).returncode == 0
    assert stack.cli("allocate", "job", "1").returncode == 0

    set_read_only(mariadb, True)
    try:
        released = stack.cli("--timeout", str(HELD_FOR), "release", "job")
        assert released.returncode == 4 and released.json["queued"] is True, released
        wait_until(lambda: stack.worker_log().count("event=db_refuses_writes") >= 2, 30,
                   "the worker to hold the release and retry it")
        stopped_at = time.monotonic()
        stack.workers[0].send_signal(signal.SIGTERM)
        assert stack.workers[0].wait(timeout=10) == 0
        assert time.monotonic() - stopped_at < 3  # not after the backoff's 5 s pause
    finally:
        set_read_only(mariadb, False)

    assert owners(stack) == {"node-1": "job"}
    stack.start_worker(ready=False)  # the broker redelivers what the first one held
    wait_until(lambda: owners(stack) == {"node-1": None}, 30, "the release to take effect")
    assert stack.dead_letters() == 0


def test_the_probe_sees_a_read_only_database_and_changes_nothing(mariadb, tmp_path, request):
    with stack_on(mariadb, tmp_path, request) as stack:
        keeper = PoolKeeper(Config(db_url=stack.database_url), "probe-test")
        conn = root(mariadb, DATABASE)
        with conn.cursor() as cur:
            cur.execute("INSERT INTO worker_heartbeats (worker_id, role, seen_at) "
                        "VALUES ('probe-test', 'active', '2020-01-01 00:00:00')")
        conn.close()
        before = (stack.sql("SELECT * FROM worker_meta"),
                  stack.sql("SELECT * FROM worker_heartbeats"))
        try:
            assert keeper.database_answers()
            set_read_only(mariadb, True)
            try:
                assert stack.sql("SELECT COUNT(*) FROM worker_meta") == [(1,)]  # reads go on
                assert not keeper.database_answers()
            finally:
                set_read_only(mariadb, False)
            assert keeper.database_answers()
        finally:
            keeper.close()
        after_close = stack.sql("SELECT * FROM worker_heartbeats")
        assert stack.sql("SELECT * FROM worker_meta") == before[0]
        # close() deletes the worker's own row; nothing else was touched.
        assert before[1] and after_close == []


def test_a_lone_release_the_database_keeps_refusing_is_held_not_dead_lettered(
        refusing, mariadb):
    """Not a refusal of writes: a trigger fails the release itself while the database
    answers and takes other writes. A release is never dead-lettered for a database
    error: the job's nodes would stay held."""
    stack = refusing
    assert stack.cli("add_baremetal", *node_args(1)).returncode == 0
    assert stack.cli("allocate", "job", "1").returncode == 0
    conn = root(mariadb, DATABASE)
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TRIGGER refuse_release BEFORE UPDATE ON allocations FOR EACH ROW "
                        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'release refused'")
        try:
            released = stack.cli("--timeout", "5", "release", "job")
            assert released.returncode == 4 and released.json["queued"] is True, released
            wait_until(lambda: "event=db_refuses_batch" in stack.worker_log(), 30,
                       "the worker to hold the release it cannot commit")
            assert owners(stack) == {"node-1": "job"}
        finally:
            with conn.cursor() as cur:
                cur.execute("DROP TRIGGER refuse_release")
    finally:
        conn.close()
    wait_until(lambda: owners(stack) == {"node-1": None}, 30, "the held release to take effect")
    assert stack.dead_letters() == 0
    assert "dead_lettered" not in stack.worker_log()


@pytest.fixture
def small_disk():
    with SmallDiskMariaDB() as mariadb:
        yield mariadb


def test_a_release_sent_while_the_disk_is_full_is_applied_once_there_is_room(
        small_disk, tmp_path, request):
    with stack_on(small_disk, tmp_path, request) as stack:
        stack.start_worker()
        assert stack.cli("add_baremetal", *node_args(1)).returncode == 0
        assert stack.cli("allocate", "job", "1").returncode == 0

        # A stored reply goes in at the end of processed_at's index (its request id, a
        # random UUID, anywhere in the primary key's): once that index's last page is
        # full and no page is free, no reply can be stored.
        stored_reply = ("INSERT INTO processed_requests (request_id, op, reply, processed_at) "
                        "VALUES (%s, 'fill', %s, UTC_TIMESTAMP(6))")
        fill_disk(small_disk, lambda: fill_table_pages(
            small_disk, DATABASE, stored_reply, lambda: (str(uuid.uuid4()), "{}")))
        assert refused(small_disk, DATABASE, stored_reply, (str(uuid.uuid4()), "{}"))
        try:
            released = stack.cli("--timeout", str(HELD_FOR), "release", "job")
            assert released.returncode == 4 and released.json["queued"] is True, released
            wait_until(lambda: "is full" in stack.worker_log(), 30,
                       "the worker to meet the full disk (1114)")
            assert owners(stack) == {"node-1": "job"}
        finally:
            free_disk(small_disk)

        wait_until(lambda: owners(stack) == {"node-1": None}, 30,
                   "the held release to take effect once there is room")
        assert stack.dead_letters() == 0
        log = stack.worker_log()
        assert "dead_lettered" not in log and "event=db_refuses_writes" in log
