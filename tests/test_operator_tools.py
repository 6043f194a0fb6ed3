"""The operator's read-only tools, end to end through the CLI: history, workers, tables."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid

from molteniron import protocol
from tests.stack import node_args, wait_until
from tests.terminal import on_a_terminal


def history(stack, *args: str) -> list[dict]:
    result = stack.cli("history", *args)
    assert result.returncode == 0, result
    return result.json["history"]


def ended(stack, owner: str) -> list[tuple]:
    return [(r["node_name"], r["end_reason"]) for r in history(stack, "--owner", owner)]


def shown(stack, *args: str) -> str:
    """The CLI's stdout on a terminal wide enough for every table here."""
    return on_a_terminal(stack.env, *args, columns=400)[0]


def waiting_owners(stack) -> list[str]:
    return [r[0] for r in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


# --- history -------------------------------------------------------------------

def test_history_tells_who_held_what_and_how_each_allocation_ended(running):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))

    assert running.cli("allocate", "job-released", "1").returncode == 0
    assert running.cli("release", "job-released").returncode == 0

    assert running.cli("allocate", "job-expired", "1", "--lease", "1").returncode == 0
    wait_until(lambda: ended(running, "job-expired")[0][1] == "expired", 30,
               "the lease to run out")

    with running.client() as client:  # a served allocate, then cancelled by its id
        sent: list[str] = []
        client.allocate("job-cancelled", 1, wait=None, on_sent=sent.append)
    assert running.cli("cancel", sent[0]).json["cancelled"] == "served"

    # A client that went away while waiting: its grant comes back, the nodes go back.
    assert running.cli("allocate", "holder", "2").returncode == 0
    gone = running.cli_start("allocate", "job-gone", "1", "--wait", "600")
    wait_until(lambda: waiting_owners(running) == ["job-gone"], 15, "job-gone to wait")
    # The worker's next tick would find the reply queue gone and cancel the wait before
    # any grant: the worker is stopped while the client dies and the release is queued,
    # so it takes the release before it can tell the client is gone.
    with running.worker_stopped():
        running.kill_waiting_client(gone, "job-gone")
        releasing = running.cli_start("release", "holder")
        wait_until(lambda: running.requests_queued() >= 1, 15, "the release to be queued")
    assert releasing.result().returncode == 0
    wait_until(lambda: ended(running, "job-gone") and ended(running, "job-gone")[0][1],
               30, "the returned grant to be undone")

    rows = history(running)
    assert [(r["owner"], r["end_reason"]) for r in rows] == [
        ("job-gone", "client_gone"), ("holder", "released"), ("holder", "released"),
        ("job-cancelled", "cancelled"), ("job-expired", "expired"),
        ("job-released", "released")]
    for row in rows:
        assert row["user"] == "guest"   # the broker login that sent the allocate
        assert row["started_at"] <= row["ended_at"]
        assert row["node_name"] == f"node-{row['node_id']}"
        assert uuid.UUID(row["request_id"])
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows),
                                                     reverse=True)


def test_history_filters_by_owner_node_and_since_and_is_capped_by_limit(running):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    for owner in ("a", "b", "c"):
        running.cli("allocate", owner, "1")
        running.cli("release", owner)
    running.cli("allocate", "open", "2")  # still held: ended_at is null

    assert [r["owner"] for r in history(running, "--owner", "b")] == ["b"]
    by_name = history(running, "--node", "node-2")
    assert by_name == history(running, "--node", "2")
    assert {r["node_name"] for r in by_name} == {"node-2"} and len(by_name) == 1
    assert {r["node_name"] for r in history(running, "--node", "node-1")} == {"node-1"}
    assert history(running, "--node", "node-99") == []

    assert [r["owner"] for r in history(running, "--limit", "2")] == ["open", "open"]
    everything = history(running)
    assert len(everything) == 5

    future = "2999-01-01T00:00:00+00:00"
    assert [r["owner"] for r in history(running, "--since", future)] == ["open", "open"]
    # A time with an offset is the same instant in UTC.
    oldest_end = min(r["ended_at"] for r in everything if r["ended_at"])
    naive = oldest_end.removesuffix("+00:00")
    since_utc = history(running, "--since", naive)
    assert since_utc == history(running, "--since", oldest_end)
    assert since_utc == history(running, "--since", _shifted(naive, "+02:00"))
    assert len(since_utc) == 5


def _shifted(naive_utc: str, offset: str) -> str:
    from datetime import datetime, timedelta
    hours = int(offset[1:3])
    return (datetime.fromisoformat(naive_utc) + timedelta(hours=hours)).isoformat() + offset


def test_history_refuses_a_bad_since_or_limit_with_a_clear_400(running):
    bad = running.cli("history", "--since", "last tuesday")
    assert bad.returncode == 2, bad           # refused before it was sent
    assert bad.json["status"] == 400 and bad.json["error"] == "BadRequest"
    assert "since must be an ISO-8601 time" in bad.stderr
    too_many = running.cli("history", "--limit", "10001")
    assert too_many.returncode == 2 and too_many.json["status"] == 400
    assert "at most 10000" in too_many.json["message"]

    with running.client() as client:   # a client that skips the check meets the worker's
        for args in ({"since": "2024-13-45"}, {"limit": 0}, {"limit": 10_001}):
            request = protocol.Request(id=str(uuid.uuid4()), op="history", args=args)
            client.send(request, expires_in=30)
            reply = client.wait(request.id, time.time() + 30)
            assert reply["status"] == 400 and reply["error"] == "BadRequest", reply


def test_history_is_readable_by_anyone_when_authorization_is_on(stack):
    stack.start_worker(env={"MOLTENIRON_ADMINS": "somebody-else"})
    assert stack.cli("history").json == {"status": 200, "history": []}


# --- workers -------------------------------------------------------------------

def test_workers_without_a_worker_answers_from_the_broker_at_once(stack):
    stack.start_worker()
    stack.stop_workers()
    queued = stack.cli("--timeout", "1", "release", "somebody")
    assert queued.returncode == 4, queued   # stays queued: nobody consumes it

    started = time.monotonic()
    result = stack.cli("--timeout", "30", "workers")
    assert time.monotonic() - started < 10    # not the 30 s timeout
    assert result.returncode == 0, result
    assert result.json == {
        "status": 200, "workers": None, "queued_requests": 1, "consumers": 0,
        "dead_letters": 0,
        "worker_error": "no worker is consuming molteniron.requests"}


def test_workers_with_a_worker_adds_the_broker_view(running):
    result = running.cli("workers")
    assert result.returncode == 0, result
    reply = result.json
    # (its heartbeat may still say standby for a moment after it became active)
    assert [w["worker_id"] for w in reply["workers"]] == ["test-worker-0"]
    # What the dead-letter queue holds is the broker's count, whatever an earlier test in
    # this vhost left to expire there.
    assert reply["consumers"] == 1 and reply["dead_letters"] == running.dead_letters()
    assert reply["queued_requests"] == 0 and "worker_error" not in reply


# --- tables ----------------------------------------------------------------------

def test_status_csv_reads_back_to_the_json_values(running):
    odd = 'odd, "quoted"\nnode'
    running.cli("add_baremetal", odd, *node_args(1)[1:])
    running.cli("add_baremetal", *node_args(2))
    running.cli("allocate", "job, 1", "1")

    records = running.cli("status", "-t", "json").json["result"]
    text = running.cli("-o", "result", "status", "-t", "csv").stdout
    header, *rows = csv.reader(io.StringIO(text))
    assert header == ["id", "name", "ipmi_ip", "blob", "status", "provisioned", "time",
                      "node_pool", "lease_ends", "tags"]
    assert len(rows) == len(records) == 2
    for row, record in zip(rows, records):
        cells = dict(zip(header, row))
        assert cells["id"] == str(record["id"])
        assert cells["name"] == record["name"]
        assert cells["status"] == record["status"]
        assert cells["provisioned"] == (record["provisioned"] or "")
        assert cells["lease_ends"] == (record["lease_ends"] or "")
        assert json.loads(cells["blob"])["port_hwaddr"] == record["port_hwaddr"]
    assert rows[0][1] == odd and rows[0][5] == "job, 1"


def test_history_csv_reads_back_to_the_json_values(running):
    running.cli("add_baremetal", *node_args(1))
    for owner in ('job "a", first', "job-b"):
        running.cli("allocate", owner, "1")
        running.cli("release", owner)
    running.cli("allocate", "job-c", "1")

    rows_json = running.cli("history", "-t", "json").json["result"]
    text = running.cli("-o", "result", "history", "-t", "csv").stdout
    header, *rows = csv.reader(io.StringIO(text))
    assert header == ["started_at", "ended_at", "end_reason", "owner", "node_name", "node_id",
                      "user", "request_id"]
    assert rows == [["" if r[k] is None else str(r[k]) for k in header] for r in rows_json]
    assert [r[3] for r in rows] == ["job-c", "job-b", 'job "a", first']


def test_on_a_terminal_tables_are_printed_and_without_one_the_json_reply(running):
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "job-1", "1")

    status = shown(running, "status")
    assert status.startswith("+---") and "| node-1 " in status and "job-1" in status
    assert "+ ipmi_user " in shown(running, "status_baremetal")
    table = shown(running, "history")
    assert table.splitlines()[1].split()[:3] == ["+", "started_at", "+"]
    assert "job-1" in table
    assert "+ position " in shown(running, "waiting")
    assert json.loads(shown(running, "status", "-t", "json"))["status"] == 200

    # Without a terminal: exactly what scripts got before, the JSON reply.
    piped = running.cli("status")
    assert piped.json["status"] == 200 and piped.json["result"].startswith("+---")
    assert (piped.json["result"].splitlines()[:3]   # the table (its held-for time moves on)
            == running.cli("-o", "result", "status").stdout.splitlines()[:3])
    assert running.cli("waiting").json == {"status": 200, "waiting": []}
    assert running.cli("history").json["history"][0]["owner"] == "job-1"
