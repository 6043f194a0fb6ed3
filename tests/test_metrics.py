"""Prometheus metrics: what a scrape of a real worker says matches what the CLI says."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pika
import pytest
import yaml

from bench.private import free_port
from molteniron import protocol
from molteniron.config import load_config
from molteniron.errors import ConfigError
from tests.cleaning import clean_once, script
from tests.metrics import metrics_config, scrape
from tests.private_stack import stack_on
from tests.stack import node_args, wait_until

ROOT = Path(__file__).resolve().parent.parent


def get(port: int, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of GET path at the worker's metrics_address."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def healthz_when(port: int, status: int, timeout: float) -> tuple[int, str, str]:
    """GET /healthz until it answers with status (nothing listening yet counts as not yet)."""
    def answer():
        try:
            response = get(port, "/healthz")
        except urllib.error.URLError:  # refused: the worker has not started serving yet
            return None
        return response if response[0] == status else None
    return wait_until(answer, timeout, f"/healthz to say {status}")


def nodes_by_pool_and_state(samples) -> dict[tuple[str, str], int]:
    return {(dict(labels)["pool"], dict(labels)["state"]): int(value)
            for labels, value in samples.get("molteniron_nodes", {}).items() if value}


def status_counts(stack) -> dict[tuple[str, str], int]:
    records = stack.cli("status", "-t", "json").json["result"]
    return dict(Counter((r["node_pool"], r["status"]) for r in records))


def requests_total(samples, op: str, status: str) -> float:
    return samples.get("molteniron_requests_total", {}).get(
        (("op", op), ("status", status)), 0.0)


def test_node_and_waiter_gauges_match_the_cli(stack, tmp_path):
    port = free_port()
    stack.start_worker(env=metrics_config(tmp_path, "active", port))
    for i in (1, 2):
        stack.cli("add_baremetal", *node_args(i))
    stack.cli("add_baremetal", *node_args(3, pool="gpu"))
    assert stack.cli("allocate", "job-1", "1").returncode == 0
    assert stack.cli("maintenance", "node-2", "on", "--reason", "disk errors").returncode == 0

    expected = {("default", "allocated"): 1, ("default", "maintenance"): 1, ("gpu", "ready"): 1}
    assert status_counts(stack) == expected
    wait_until(lambda: nodes_by_pool_and_state(scrape(port)) == expected, 15,
               "the node gauges to match status")
    samples = scrape(port)
    assert samples["molteniron_nodes"][(("pool", "gpu"), ("state", "allocated"))] == 0
    assert samples["molteniron_worker_role"] == {(("role", "active"),): 1,
                                                 (("role", "standby"),): 0}
    assert samples["molteniron_epoch"][()] >= 1

    before_wait = time.monotonic()
    waiter = stack.cli_start("allocate", "job-2", "1", "--wait", "60")
    wait_until(lambda: stack.cli("waiting").json["waiting"], 15, "job-2 to wait")

    def waiters_gauge():
        samples = scrape(port)
        return samples if samples.get("molteniron_waiters") else None
    samples = wait_until(waiters_gauge, 15, "the waiters gauge")
    rows = stack.cli("waiting").json["waiting"]
    assert samples["molteniron_waiters"] == {(("pool", "default"),): len(rows)}
    age = samples["molteniron_oldest_waiter_age_seconds"][(("pool", "default"),)]
    assert 0 <= age <= time.monotonic() - before_wait + 1

    assert stack.cli("release", "job-1").returncode == 0
    assert waiter.result().returncode == 0  # node-1 went to job-2
    served = wait_until(lambda: (lambda s: s if not s.get("molteniron_waiters")
                                 and s.get("molteniron_wait_seconds_count", {}).get(()) == 1
                                 else None)(scrape(port)), 15, "the wait to be observed")
    assert served["molteniron_wait_seconds_sum"][()] > 0
    assert nodes_by_pool_and_state(served) == status_counts(stack)


def test_requests_are_counted_by_op_and_status(stack, tmp_path):
    port = free_port()
    stack.start_worker(env=metrics_config(tmp_path, "active", port))
    before = scrape(port)
    stack.cli("add_baremetal", *node_args(1))
    assert stack.cli("allocate", "job-1", "1").returncode == 0
    assert stack.cli("allocate", "job-2", "1", "--no-wait").returncode == 1  # 409
    assert stack.cli("release", "nobody").returncode == 1  # 404

    def grown():
        samples = scrape(port)
        return samples if all(
            requests_total(samples, op, status) - requests_total(before, op, status) == 1
            for op, status in (("add_baremetal", "200"), ("allocate", "200"),
                               ("allocate", "409"), ("release", "404"))) else None
    samples = wait_until(grown, 15, "requests_total to count each request once")
    assert samples["molteniron_request_seconds_count"][(("op", "allocate"),)] >= 2
    assert samples["molteniron_batch_requests_count"][()] >= 4
    assert samples["molteniron_dead_lettered_total"] == {(("reason", "malformed"),): 0,
                                                         (("reason", "refused"),): 0}
    assert set(samples["molteniron_cleaning_outcomes_total"]) == {
        (("outcome", "ready"),), (("outcome", "maintenance"),)}
    assert samples["molteniron_lease_expiries_total"][()] == 0
    assert samples["molteniron_grants_undone_total"][()] == 0
    depth = wait_until(lambda: scrape(port).get("molteniron_queue_messages"), 15,
                       "the queue depths")
    assert {dict(labels)["queue"] for labels in depth} == {
        "molteniron.requests", "molteniron.dead-letters"}


def test_a_malformed_message_is_counted_as_dead_lettered(stack, tmp_path):
    port = free_port()
    stack.start_worker(env=metrics_config(tmp_path, "active", port))
    connection, channel = stack.channel()
    channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, b"not json",
                          pika.BasicProperties(content_type="application/json"))
    connection.close()
    wait_until(lambda: stack.dead_letters() == 1, 15, "the message to be dead-lettered")
    wait_until(lambda: scrape(port)["molteniron_dead_lettered_total"][
        (("reason", "malformed"),)] == 1, 15, "dead_lettered_total{reason=malformed}")


def test_a_standby_serves_metrics_with_role_standby(stack, tmp_path):
    active_port, standby_port = free_port(), free_port()
    stack.start_worker(env=metrics_config(tmp_path, "active", active_port))
    stack.start_worker(env=metrics_config(tmp_path, "standby", standby_port), ready=False)
    stack.cli("add_baremetal", *node_args(1))

    def standby_samples():
        try:
            return scrape(standby_port)
        except OSError:  # not listening yet
            return None
    standby = wait_until(standby_samples, 30, "the standby's endpoint")
    assert standby["molteniron_worker_role"] == {(("role", "active"),): 0,
                                                 (("role", "standby"),): 1}
    assert "molteniron_nodes" not in standby  # only the active worker counts the pool
    assert scrape(active_port)["molteniron_worker_role"][(("role", "active"),)] == 1


def listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (Linux /proc: its socket inodes in LISTEN state)."""
    fds = Path(f"/proc/{pid}/fd")
    inodes = {link[len("socket:["):-1] for link in (str(fd.readlink()) for fd in fds.iterdir()
                                                    if fd.is_symlink())
              if link.startswith("socket:[")}
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_without_metrics_address_nothing_listens(stack, tmp_path):
    port = free_port()
    on = stack.start_worker(env=metrics_config(tmp_path, "on", port))
    assert listening_ports(on.pid) == {port}
    stack.stop_workers()
    off = stack.start_worker(env=metrics_config(tmp_path, "off", None))
    assert stack.cli("status").returncode == 0
    assert listening_ports(off.pid) == set()
    assert "metrics_serving" not in stack.worker_log(1)


def test_the_alert_rules_load_and_name_every_field():
    rules = yaml.safe_load((ROOT / "deploy" / "alerts.yaml").read_text())
    (group,) = rules["groups"]
    alerts = {rule["alert"]: rule for rule in group["rules"]}
    assert set(alerts) == {"MoltenIronWaitersWaitingTooLong", "MoltenIronNoActiveWorker",
                           "MoltenIronDeadLettersGrowing", "MoltenIronNodesInMaintenance",
                           "MoltenIronNodesDirtyTooLong"}
    for rule in alerts.values():
        assert rule["expr"] and "molteniron_" in rule["expr"]
        assert rule["for"] and rule["labels"]["severity"]
        assert rule["annotations"]["summary"]


@pytest.mark.parametrize("value", ["9464", "localhost:", "host:http", "host:70000", 9464])
def test_a_bad_metrics_address_is_refused_at_start(tmp_path, value):
    path = tmp_path / "conf.yaml"
    path.write_text(yaml.safe_dump({"metrics_address": value}))
    with pytest.raises(ConfigError, match="metrics_address must be host:port"):
        load_config(str(path), env={})


def test_metrics_address_off_when_empty_and_kept_when_given(tmp_path):
    path = tmp_path / "conf.yaml"
    for value, expected in (("", None), (None, None), ("[::1]:9464", "[::1]:9464")):
        path.write_text(yaml.safe_dump({"metrics_address": value}))
        assert load_config(str(path), env={}).metrics_address == expected


def test_cleaning_outcomes_are_counted(stack, tmp_path):
    port = free_port()
    failing = script(tmp_path, "fails.sh", "echo 'BMC unreachable' >&2; exit 3\n")
    path = tmp_path / "clean-metrics.yaml"
    path.write_text(yaml.safe_dump({"metrics_address": f"127.0.0.1:{port}",
                                    "cleaning_command": failing, "cleaning_timeout": 30}))
    env = {"MOLTENIRON_CONFIG": str(path)}
    stack.start_worker(env=env)
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("allocate", "job", "1")
    stack.cli("release", "job")  # dirty now

    code, reply, _ = clean_once(stack, env)

    assert code == 0 and reply["state"] == "maintenance", reply
    wait_until(lambda: scrape(port).get("molteniron_cleaning_outcomes_total", {}).get(
        (("outcome", "maintenance"),)) == 1.0, 15, "the cleaning outcome to be counted")
    assert scrape(port)["molteniron_cleaning_outcomes_total"][(("outcome", "ready"),)] == 0.0


def test_how_long_nodes_wait_for_their_cleaning_is_a_gauge(stack, tmp_path):
    """No cleaner runs: the dirty node's age grows, and its cleaning sets it back to 0."""
    port = free_port()
    path = tmp_path / "dirty-metrics.yaml"
    path.write_text(yaml.safe_dump({"metrics_address": f"127.0.0.1:{port}",
                                    "cleaning_command": "/bin/true", "cleaning_timeout": 30}))
    env = {"MOLTENIRON_CONFIG": str(path)}
    stack.start_worker(env=env)
    stack.cli("add_baremetal", *node_args(1))
    stack.cli("allocate", "job", "1")

    def dirty_age():
        return scrape(port).get("molteniron_oldest_dirty_seconds", {}).get(
            (("pool", "default"),))
    wait_until(lambda: dirty_age() is not None, 15, "the gauge")
    assert dirty_age() == 0.0
    stack.cli("release", "job")  # dirty now, and no cleaner runs
    first = wait_until(lambda: dirty_age() or None, 15, "the dirty node to be counted")
    wait_until(lambda: dirty_age() > first, 15, "the dirty node's age to grow")
    code, reply, _ = clean_once(stack, env)
    assert code == 0 and reply["state"] == "ready", reply
    wait_until(lambda: dirty_age() == 0.0, 15, "the cleaned node to leave the gauge")


def test_a_metrics_port_in_use_stops_the_worker_at_start_saying_why(stack, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = stack.start_worker(env=metrics_config(tmp_path, "busy", port), ready=False)
        assert worker.wait(timeout=60) == 2
    log = stack.worker_log()
    assert f"metrics_address 127.0.0.1:{port} cannot be served" in log, log
    assert "Traceback" not in log


def test_metrics_at_metrics_health_at_healthz_and_nothing_elsewhere(stack, tmp_path):
    port = free_port()
    stack.start_worker(env=metrics_config(tmp_path, "paths", port))

    status, content_type, body = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), (status, content_type)
    assert "molteniron_worker_role" in body
    _, content_type, body = healthz_when(port, 200, 15)
    assert content_type == "application/json"
    assert json.loads(body) == {"status": "ok", "role": "active"}
    for path in ("/", "/health", "/metricsx", "/healthz/x", "/favicon.ico"):
        status, _, body = get(port, path)
        assert status == 404, (path, status)
        assert "molteniron_" not in body, path


def test_healthz_says_503_until_the_broker_answers(stack, tmp_path):
    """A broker nobody listens at: the worker runs (it retries), /healthz says why it
    does not serve, and /metrics still answers (role standby)."""
    port = free_port()
    stack.start_worker(env={**metrics_config(tmp_path, "no-broker", port),
                            "MOLTENIRON_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"},
                       ready=False)
    _, _, body = healthz_when(port, 503, 30)
    assert json.loads(body) == {"status": "unavailable", "role": "standby",
                                "reasons": ["not connected to the broker yet"]}
    assert scrape(port)["molteniron_worker_role"][(("role", "standby"),)] == 1


@pytest.mark.cluster  # a private MariaDB, started by the test itself
def test_healthz_says_503_while_the_database_refuses_writes(tmp_path, request):
    """read_only on the worker's own private MariaDB: /healthz names the database; once
    writes are back it says 200 again."""
    from bench.db_refusals import set_read_only
    from bench.private import PrivateMariaDB
    port = free_port()
    with PrivateMariaDB() as mariadb, stack_on(mariadb, tmp_path, request) as stack:
        stack.start_worker(env=metrics_config(tmp_path, "read-only", port))
        healthz_when(port, 200, 15)

        set_read_only(mariadb, True)
        _, _, body = healthz_when(port, 503, 20)
        assert "the database does not answer or refuses writes" in json.loads(body)["reasons"]

        set_read_only(mariadb, False)
        healthz_when(port, 200, 30)
