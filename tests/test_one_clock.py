"""One clock: the pool decides by the database server's clock, never a worker host's.

Real worker processes whose wall clock is off (libfaketime: bench/faked_clock.py),
a real broker and database. The machine's clock, which the database shares, is the
truth: a worker host's clock that is off or steps changes no lease, deadline or
place in a queue, and the worker says that its clock is off.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

import pytest

from bench.faked_clock import SteppedWallClock, wall_clock_off_by
from bench.private import free_port
from molteniron.workers.clock import CLOCK_SKEW_WARN, DatabaseClock, unix
from tests.metrics import metrics_config, scrape
from tests.stack import node_args, wait_until

SIX_HOURS = 6 * 3600
SEVEN_HOURS = 7 * 3600


@pytest.fixture
def start_cli(stack):
    """stack.cli_start, and whatever is still running at the end is killed: a failed
    test leaves no allocate waiting for an hour."""
    started = []

    def start(*args: str):
        running = stack.cli_start(*args)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.communicate()


def worker_row(stack, worker_id: str) -> dict | None:
    """The worker's row in `molteniron workers` (None: not seen)."""
    reply = stack.cli("workers").json
    return next((w for w in reply.get("workers") or () if w["worker_id"] == worker_id), None)


def skew_reported(stack, worker_id: str) -> float | None:
    row = worker_row(stack, worker_id)
    return None if row is None else row.get("clock_skew_s")


def waiting_owners(stack) -> list[str]:
    return [row["owner"] for row in stack.cli("waiting").json["waiting"]]


def seconds_to_lease_end(stack, owner: str) -> list[int]:
    """How long each node of owner is still leased for, by the database's clock."""
    return [row[0] for row in stack.sql(
        "SELECT TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(6), lease_expires_at) FROM nodes "
        f"WHERE owner = '{owner}'")]


def test_a_standby_seven_hours_fast_takes_over_and_a_six_hour_lease_holds(stack, tmp_path):
    stack.start_worker()  # test-worker-0: the machine's clock
    stack.cli("add_baremetal", *node_args(1))
    granted = stack.cli("allocate", "job-1", "1", "--lease", str(SIX_HOURS))
    assert granted.returncode == 0, granted

    port = free_port()
    stack.start_worker(env={**wall_clock_off_by("+7h"),
                            **metrics_config(tmp_path, "fast", port)}, ready=False)
    standby = wait_until(lambda: worker_row(stack, "test-worker-1"), 30,
                         "the fast standby's heartbeat")
    assert standby["role"] == "standby"
    stack.workers[0].kill()  # kill -9: no goodbye, the broker hands the queue over
    stack.workers[0].wait()

    # Its first ticks as the active worker have run: every tick expires leases first.
    active = wait_until(lambda: (row := worker_row(stack, "test-worker-1"))
                        and row["role"] == "active" and row, 60,
                        "the fast standby to take over and tick")

    assert stack.sql("SELECT name, state, owner FROM nodes") == [("node-1", "allocated", "job-1")]
    assert stack.sql("SELECT owner, ended_at FROM allocations") == [("job-1", None)]
    assert SIX_HOURS - 120 < seconds_to_lease_end(stack, "job-1")[0] <= SIX_HOURS
    taken = stack.cli("allocate", "job-2", "1", "--no-wait")
    assert taken.returncode != 0 and taken.json["status"] == 409, taken  # nothing ready
    # Its own grants are leased by the database's clock too.
    stack.cli("add_baremetal", *node_args(2))
    assert stack.cli("allocate", "job-2", "1", "--lease", str(SIX_HOURS)).returncode == 0
    assert SIX_HOURS - 120 < seconds_to_lease_end(stack, "job-2")[0] <= SIX_HOURS

    # It says its clock is off: in `molteniron workers`, its log and its metrics.
    assert abs(active["clock_skew_s"] - SEVEN_HOURS) < 60, active
    assert "ahead of the database's" in active["clock_warning"], active
    assert 0 <= active["seen_s_ago"] < 30, active
    assert "event=clock_skew worker=test-worker-1" in stack.worker_log(1)
    skew = wait_until(lambda: scrape(port).get("molteniron_clock_skew_seconds"), 15,
                      "the skew gauge")
    assert abs(skew[()] - SEVEN_HOURS) < 60, skew

    released = stack.cli("release", "job-1")  # the owner still had it: not taken back
    assert released.returncode == 0 and released.json["released"] == 1, released


def waiting_on_a_stepped_clock(stack, tmp_path, start_cli, owner: str):
    """A worker whose wall clock a test steps, its one node held, and `owner` waiting for
    it (up to an hour): (the clock, the waiting CLI)."""
    clock = SteppedWallClock(tmp_path / "faketime.rc")
    stack.start_worker(env=clock.env)
    stack.cli("add_baremetal", *node_args(1))
    assert stack.cli("allocate", "holder", "1").returncode == 0
    waiter = start_cli("allocate", owner, "1", "--wait", "3600")
    wait_until(lambda: waiting_owners(stack) == [owner], 30, f"{owner} to wait")
    return clock, waiter


def test_a_worker_clock_stepping_two_hours_forward_expires_no_waiter(stack, tmp_path, start_cli):
    clock, waiter = waiting_on_a_stepped_clock(stack, tmp_path, start_cli, "job-2")

    clock.step("+2h")
    # Its next heartbeat comes from a tick that read the stepped clock, after that
    # tick's deadline check. (A worker that kept its host's time has ended the wait.)
    wait_until(lambda: waiter.process.poll() is not None
               or (skew_reported(stack, "test-worker-0") or 0) > 7000, 30,
               "the worker to tick on its stepped clock")
    assert waiter.process.poll() is None, waiter.result(timeout=5)
    assert waiting_owners(stack) == ["job-2"]
    (left,) = stack.sql("SELECT deadline - UNIX_TIMESTAMP(NOW(6)) FROM waiting_requests")
    assert 3500 < left[0] <= 3600  # by the database's clock, as when it began to wait

    assert stack.cli("release", "holder").returncode == 0
    served = waiter.result(timeout=30)
    assert served.returncode == 0, served
    assert [n["provisioned"] for n in served.json["nodes"].values()] == ["job-2"]


def test_a_worker_clock_stepping_an_hour_back_lets_no_later_job_jump_the_queue(
        stack, tmp_path, start_cli):
    clock, first = waiting_on_a_stepped_clock(stack, tmp_path, start_cli, "job-a")

    clock.step("-1h")
    later = start_cli("allocate", "job-b", "1", "--wait", "3600")
    wait_until(lambda: len(waiting_owners(stack)) == 2, 30, "job-b to wait")
    rows = stack.cli("waiting").json["waiting"]
    assert [(r["owner"], r["position"]) for r in rows] == [("job-a", 1), ("job-b", 2)]

    assert stack.cli("release", "holder").returncode == 0
    served = first.result(timeout=30)
    assert served.returncode == 0, served
    assert later.process.poll() is None and waiting_owners(stack) == ["job-b"]
    # The step was seen (so the order above held across it).
    wait_until(lambda: (skew_reported(stack, "test-worker-0") or 0) < -3500, 30,
               "a heartbeat after the step")

    assert stack.cli("release", "job-a").returncode == 0
    assert later.result(timeout=30).returncode == 0


# --- the clock itself: the database's times as a worker reads them ---------------

def test_between_reads_the_time_moves_on_by_the_monotonic_clock_never_ahead():
    clock = DatabaseClock("w")
    database_now = datetime(2026, 12, 6, 12, 0, 0)
    before = time.monotonic()
    assert clock.read(database_now, unix(database_now)) == database_now
    assert clock.fresh()
    later = clock.now()
    elapsed = time.monotonic() - before
    assert database_now <= later <= database_now + timedelta(seconds=elapsed)


def test_within_a_worker_the_time_never_goes_back():
    """A database whose clock stepped back holds the worker's time still: leases and
    deadlines end late, never early, and arrivals keep their order."""
    clock = DatabaseClock("w")
    database_now = datetime(2026, 12, 6, 12, 0, 0)
    clock.read(database_now, unix(database_now))
    assert clock.read(database_now - timedelta(hours=1), unix(database_now)) == database_now
    assert clock.now() >= database_now


def test_a_skew_is_logged_once_per_change_past_the_threshold(caplog):
    clock = DatabaseClock("w")
    database_now = datetime(2026, 12, 6, 12, 0, 0)
    with caplog.at_level(logging.INFO, logger="molteniron.workers.clock"):
        for wall_ahead in (0.3, 7 * 3600, 7 * 3600 + 0.5, 7 * 3600, 2 * 3600, 0.1, 0.2):
            clock.read(database_now, unix(database_now) + wall_ahead)
    events = [r.getMessage().split()[0] for r in caplog.records]
    assert events == ["event=clock_skew", "event=clock_skew", "event=clock_skew_ok"]
    assert clock.skew is not None
    assert abs(clock.skew - 0.2) < 1e-3 and clock.skew < CLOCK_SKEW_WARN
