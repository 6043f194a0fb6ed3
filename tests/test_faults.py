"""Workers dying, standing by, being fenced; the broker and database dropping connections."""

from __future__ import annotations

import signal
import subprocess
import time

from sqlalchemy import text

from molteniron import protocol
from tests.stack import node_args, wait_until


def test_worker_dying_between_commit_and_ack_still_gives_exactly_one_allocation(stack):
    stack.start_worker(env={"MOLTENIRON_FAULT": "exit-after-commit:allocate"})
    standby = stack.start_worker(ready=False)
    wait_until(lambda: "event=consuming" in stack.worker_log(1), 30, "the standby to consume")
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("add_baremetal", *node_args(2))

    result = stack.cli("allocate", "job-1", "1", "--wait", "30")

    assert result.returncode == 0, result
    assert list(result.json["nodes"]) == ["node_1"]
    assert stack.workers[0].wait(timeout=10) == 70  # the injected crash happened
    assert "outcome=replayed" in stack.worker_log(1)
    assert stack.sql("SELECT owner, COUNT(*) FROM allocations GROUP BY owner") == [("job-1", 1)]
    assert stack.sql("SELECT name FROM nodes WHERE owner='job-1'") == [("node-1",)]
    assert standby.poll() is None


def test_standby_takes_over_when_the_active_worker_is_killed(stack):
    active = stack.start_worker()
    stack.start_worker(ready=False)
    wait_until(lambda: "event=consuming" in stack.worker_log(1), 30, "the standby to consume")
    stack.cli("add_baremetal", *node_args(1))
    epoch_before = stack.sql("SELECT epoch FROM worker_meta")[0][0]

    active.kill()
    active.wait()
    result = stack.cli("allocate", "job-1", "1", "--wait", "30")

    assert result.returncode == 0, result
    assert "event=active worker=test-worker-1" in stack.worker_log(1)
    assert stack.sql("SELECT epoch, holder FROM worker_meta") == [
        (epoch_before + 1, "test-worker-1")]


def test_a_standby_serves_waiters_deadlines_without_any_new_request(stack):
    active = stack.start_worker()
    stack.start_worker(ready=False)
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("allocate", "holder", "1")
    waiting = stack.cli_start("allocate", "patient", "1", "--wait", "3")
    wait_until(lambda: stack.sql("SELECT owner FROM waiting_requests") == [("patient",)], 15,
               "patient to wait")
    active.kill()
    result = waiting.result()
    # The standby's own ticks make it active, and it expires the waiter on time.
    assert result.returncode == 3, result
    assert result.json["status"] == 408
    assert stack.sql("SELECT COUNT(*) FROM waiting_requests") == [(0,)]


def test_a_fenced_worker_stops_writing_and_the_request_is_not_lost(stack):
    stack.start_worker()
    with stack.engine.begin() as conn:
        conn.execute(text("UPDATE worker_meta SET epoch = epoch + 100, holder = 'usurper'"))
    with stack.client() as client:
        request = protocol.new_request("add_baremetal", dict(zip(
            ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool", "port_hwaddr",
             "cpu_arch"), node_args(1)[:7]), cpus=8, ram_mb=1, disk_gb=1))
        client.send(request, expires_in=60)
        assert stack.workers[0].wait(timeout=15) == 5  # exits: "another worker took over"
        assert stack.sql("SELECT COUNT(*) FROM nodes") == [(0,)]
        stack.start_worker(ready=False)
        reply = client.wait(request.id, time.time() + 30)
    assert reply["status"] == 200
    assert stack.sql("SELECT name FROM nodes") == [("node-1",)]


def test_a_fenced_worker_writes_no_allocation_though_it_checks_in_its_commit(running):
    """An allocate is fenced in its write trip (no read first): the fence still holds."""
    running.cli("add_baremetal", *node_args(1))
    with running.engine.begin() as conn:
        conn.execute(text("UPDATE worker_meta SET epoch = epoch + 100, holder = 'usurper'"))
    with running.client() as client:
        request = protocol.new_request("allocate", {"owner": "job-1", "count": 1,
                                                    "wait": False})
        client.send(request, expires_in=60)
        assert running.workers[0].wait(timeout=15) == 5
        assert "event=fence_tripped" in running.worker_log()
        assert running.sql("SELECT COUNT(*) FROM nodes WHERE owner IS NOT NULL") == [(0,)]
        running.start_worker(ready=False)
        reply = client.wait(request.id, time.time() + 30)
    assert reply["status"] == 200, reply
    assert running.sql("SELECT owner FROM nodes") == [("job-1",)]


def test_worker_rides_out_lost_database_connections(running):
    running.cli("add_baremetal", *node_args(1))
    with running.engine.begin() as conn:
        ids = [row[0] for row in conn.execute(text(
            "SELECT id FROM information_schema.processlist "
            "WHERE db = DATABASE() AND id <> CONNECTION_ID()"))]
        for connection_id in ids:
            conn.execute(text(f"KILL CONNECTION {connection_id}"))
    result = running.cli("allocate", "job-1", "1")
    assert result.returncode == 0, result
    assert running.workers[0].poll() is None


def test_worker_reconnects_when_the_broker_drops_it(running, amqp_url):
    vhost = amqp_url.rsplit("/", 1)[1]
    subprocess.run(["rabbitmqctl", "close_all_connections", "--vhost", vhost, "test"],
                   check=True, capture_output=True, timeout=60)
    wait_until(lambda: "event=broker_lost" in running.worker_log(), 30, "the worker to notice")
    running.cli("add_baremetal", *node_args(1))
    result = running.cli("allocate", "job-1", "1", "--wait", "30")
    assert result.returncode == 0, result
    assert running.workers[0].poll() is None


def test_sigterm_stops_the_worker_cleanly(running):
    running.workers[0].send_signal(signal.SIGTERM)
    assert running.workers[0].wait(timeout=15) == 0
    assert "event=stopped" in running.worker_log()


def test_a_request_the_database_refuses_is_dead_lettered_and_its_batch_mates_served(stack):
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("add_baremetal", *node_args(2))
    stack.stop_workers()
    with stack.engine.begin() as conn:  # the database refuses any history row for 'poison'
        conn.execute(text(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON allocations FOR EACH ROW "
            "IF NEW.owner = 'poison' THEN SIGNAL SQLSTATE '22001' "
            "SET MESSAGE_TEXT = 'refused for the test', MYSQL_ERRNO = 1406; END IF"))
    try:
        with stack.client() as client:
            poison = protocol.new_request("allocate", {"owner": "poison", "count": 1})
            good = protocol.new_request("allocate", {"owner": "good", "count": 1})
            client.send(poison, expires_in=60)
            client.send(good, expires_in=60)
            stack.start_worker(ready=False)  # both arrive in one batch
            assert client.wait(good.id, time.time() + 30)["status"] == 200
            wait_until(lambda: stack.dead_letters() == 1, 15,
                       "the poison request to be dead-lettered")
            refused = client.wait(poison.id, time.time() + 30)
            # The client learns which request failed, never the database's text.
            assert refused["status"] == 500 and poison.id in refused["message"], refused
            assert "refused for the test" not in refused["message"]
            assert "refused for the test" in stack.worker_log(len(stack.workers) - 1)
        assert stack.sql("SELECT owner FROM nodes ORDER BY id") == [("good",), (None,)]
        assert stack.cli("allocate", "after", "1").returncode == 0
        assert stack.workers[-1].poll() is None
    finally:
        with stack.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS refuse_poison"))


def test_workers_shows_the_active_worker_and_its_standby(stack):
    stack.start_worker()
    stack.start_worker(ready=False)

    def both_seen():
        reply = stack.cli("workers").json
        return reply if {w["role"] for w in reply["workers"]} == {"active", "standby"} else None

    reply = wait_until(both_seen, 30, "an active and a standby heartbeat")
    assert sorted(w["worker_id"] for w in reply["workers"]) == ["test-worker-0", "test-worker-1"]
    assert reply["queued_requests"] == 0


def test_an_operational_error_on_a_healthy_database_is_not_retried_forever(stack):
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    with stack.engine.begin() as conn:  # error 1644: PyMySQL calls it an OperationalError
        conn.execute(text(
            "CREATE TRIGGER refuse_stuck BEFORE INSERT ON allocations FOR EACH ROW "
            "IF NEW.owner = 'stuck' THEN SIGNAL SQLSTATE '45000' "
            "SET MESSAGE_TEXT = 'refused for the test'; END IF"))
    try:
        stuck = stack.cli("--timeout", "30", "allocate", "stuck", "1", "--no-wait")
        assert stuck.returncode == 1 and stuck.json["status"] == 500, stuck
        assert stack.cli("allocate", "after", "1", "--no-wait").returncode == 0
    finally:
        with stack.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER IF EXISTS refuse_stuck"))
