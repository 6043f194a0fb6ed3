"""The worker on a 3-node MariaDB Galera cluster (bench/galera_cluster.py, private: the
machine's MariaDB is never touched): its db_url names the three nodes, and it keeps
serving CI jobs when the node it writes to dies, is cut off, or loses quorum, or when a
commit's acknowledgement is lost. Every request is applied exactly once and no CLI call
fails. The longest pause is printed; with MOLTENIRON_RECORD_RESULTS=1 it is also written
to bench/results/galera-failover.json.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench.commit_ack_cutter import CommitAckCutter
from bench.env import machine
from bench.galera_cluster import PrivateGaleraCluster
from bench.soak import check_database
from molteniron import db
from tests.failover import (
    add_nodes,
    failed_calls,
    history_problems,
    nothing_owned,
    pauses,
    run_jobs_through,
    running,
)
from tests.stack import ROOT, Stack, wait_until

POOL = "galera"
RESULTS = ROOT / "bench" / "results" / "galera-failover.json"


@pytest.fixture(scope="module")
def cluster():
    yield from running(PrivateGaleraCluster(size=3), "a private 3-node Galera cluster "
                       "(galera-4, rsync, mariadbd) beside the machine's MariaDB")


class GaleraStack(Stack):
    """The tests' stack with its database on the cluster; reads go to a node of the
    primary component and wait until it has applied everything committed before."""

    def __init__(self, cluster: PrivateGaleraCluster, database: str, amqp_url: str, logdir: Path):
        super().__init__(amqp_url, cluster.url_for(database), None, logdir)
        self.cluster = cluster
        self.database = database

    def sql(self, query: str) -> list[tuple]:
        node = self.cluster.nodes[self.cluster.primary()[0]]
        conn = node.connect(database=self.database, init_command="SET SESSION wsrep_sync_wait=1")
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return [tuple(row) for row in cur.fetchall()]
        finally:
            conn.close()

    def writer(self) -> int:
        """The node holding the worker's connections, once there is exactly one."""
        def single():
            try:
                return (self.cluster.writer_of(self.database),)
            except LookupError:
                return None
        return wait_until(single, 60, "the worker's connections on exactly one node")[0]

    def add_nodes(self, count: int) -> set[str]:
        return add_nodes(self, count, POOL)


@pytest.fixture
def galera(cluster, amqp_url, tmp_path, request):
    """A database of its own on the whole (healed) cluster, created and migrated
    through one node, and the stack around it; no worker started yet."""
    cluster.heal()
    database = f"molteniron_galera_{uuid.uuid4().hex[:8]}"
    first = cluster.urls_for(database)[cluster.primary()[0]]
    db.create_database(first)
    engine = db.make_engine(first)
    db.migrate(engine)
    engine.dispose()
    stack = GaleraStack(cluster, database, amqp_url, tmp_path)
    stack.purge_queues()
    yield stack
    stack.stop_workers()
    if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
        for i in range(len(stack.workers)):
            print(f"--- worker {i} log ---\n{stack.worker_log(i)[-8000:]}")
    stack.purge_queues()
    if cluster.primary():
        cluster.nodes[cluster.primary()[0]].execute(f"DROP DATABASE IF EXISTS `{database}`")


# --- the tests --------------------------------------------------------------------------

def test_the_cluster_forms_and_keeps_a_primary_component_after_a_kill(cluster):
    cluster.heal()
    assert [cluster.status(i, "wsrep_cluster_size") for i in range(3)] == ["3", "3", "3"]
    assert cluster.primary() == [0, 1, 2]
    cluster.nodes[0].execute("CREATE DATABASE IF NOT EXISTS smoke")
    cluster.nodes[0].execute("CREATE TABLE smoke.t (id INT PRIMARY KEY)")
    cluster.nodes[0].execute("INSERT INTO smoke.t VALUES (1)")

    cluster.kill(0)

    wait_until(lambda: [cluster.status(i, "wsrep_cluster_size") for i in (1, 2)] == ["2", "2"],
               60, "the two survivors to form a cluster of 2")
    assert cluster.primary() == [1, 2]
    cluster.nodes[1].execute("INSERT INTO smoke.t VALUES (2)")
    conn = cluster.nodes[2].connect(init_command="SET SESSION wsrep_sync_wait=1")
    with conn.cursor() as cur:
        cur.execute("SELECT id FROM smoke.t ORDER BY id")
        assert cur.fetchall() == ((1,), (2,))
    conn.close()
    cluster.nodes[1].execute("DROP DATABASE smoke")


def test_killing_the_node_the_worker_writes_to_loses_no_request_and_fails_no_call(galera, capsys):
    worker = galera.start_worker()
    names = galera.add_nodes(8)
    victim = galera.writer()

    calls, killed_at = run_jobs_through(galera, 8, lambda: galera.cluster.kill(victim),
                                        prefix="galera", pool=POOL)

    figures = pauses(calls, killed_at)
    assert failed_calls(calls) == []
    assert history_problems(galera, calls) == []
    assert check_database(galera, names, settled=True) == []
    nothing_owned(galera)
    assert galera.dead_letters() == 0
    assert worker.poll() is None  # the same worker moved on; nobody restarted it
    assert galera.writer() in galera.cluster.primary()
    result = {"what": "kill -9 of the Galera node the worker writes to, while 8 CI jobs loop "
                      "allocate/release through the CLI (tests/test_galera_cluster.py)",
              "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "cluster": "3 MariaDB Galera nodes on one machine, Galera's default failure "
                         "detection (evs.suspect_timeout PT5S)",
              "jobs": 8, "calls": len(calls),
              "calls_after_kill": sum(c.started > killed_at for c in calls),
              **figures, "machine": machine()}
    if os.environ.get("MOLTENIRON_RECORD_RESULTS"):  # a run recorded for README, not every run
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    with capsys.disabled():
        print(f"\ngalera failover, kill -9 of the writer: {json.dumps(figures)}")


def test_a_node_cut_off_from_the_cluster_is_left_not_blamed_for_the_requests(galera):
    galera.start_worker()
    names = galera.add_nodes(4)
    victim = galera.writer()

    calls, _ = run_jobs_through(galera, 4, lambda: galera.cluster.isolate(victim),
                                prefix="galera", pool=POOL)

    # It still answers SELECT 1 and new connections, and refused the worker (1047/1180).
    assert galera.cluster.status(victim, "wsrep_cluster_status") == "non-Primary"
    assert "1047" in galera.worker_log() or "1180" in galera.worker_log()
    assert failed_calls(calls) == []
    assert galera.dead_letters() == 0
    assert "batch_refused" not in galera.worker_log()
    assert history_problems(galera, calls) == []
    assert check_database(galera, names, settled=True) == []
    assert galera.writer() in galera.cluster.primary()


def test_requests_wait_while_the_only_node_left_has_no_quorum(galera):
    worker = galera.start_worker()
    galera.add_nodes(1)
    survivor = galera.writer()
    for index in range(3):
        if index != survivor:
            galera.cluster.kill(index)
    allocating = galera.cli_start("--timeout", "180", "allocate", "held-job", "1", POOL)

    wait_until(lambda: galera.cluster.status(survivor, "wsrep_cluster_status") == "non-Primary",
               60, "the survivor to leave the primary component")
    # Refused by the survivor (1047) and retried several times, on every server it has.
    wait_until(lambda: "1047" in galera.worker_log()
               and galera.worker_log().count("event=db_unavailable") >= 4, 60,
               "the worker to be refused by the node (1047) and to retry")
    assert allocating.process.poll() is None  # held, neither answered nor failed
    galera.cluster.bootstrap(survivor)  # what an operator does

    done = allocating.result(timeout=180)
    assert done.returncode == 0, done
    assert galera.dead_letters() == 0
    assert "batch_refused" not in galera.worker_log()
    assert worker.poll() is None
    assert galera.sql("SELECT owner, node_name FROM allocations") == [("held-job", "node-1")]
    assert galera.cli("release", "held-job").returncode == 0
    nothing_owned(galera)


def test_a_commit_whose_acknowledgement_was_lost_is_applied_once(galera):
    """The server commits, the worker gets 2013 and moves to another node: the batch,
    tried again there, is answered from its stored reply."""
    cluster = galera.cluster
    with CommitAckCutter(cluster.nodes[0].port) as cutter:
        urls = [f"mysql+pymysql://root@127.0.0.1:{cutter.port}/{galera.database}",
                *cluster.urls_for(galera.database)[1:]]
        worker = galera.start_worker(env={"MOLTENIRON_DB_URL": ",".join(urls)})
        galera.add_nodes(2)
        cutter.arm(b"INSERT INTO allocations")

        done = galera.cli("allocate", "cut-job", "1", POOL)

        assert done.returncode == 0, done
        assert (cutter.cut_commits, cutter.cut_replies) == (1, [0])  # lost an OK: committed
    granted = list(done.json["nodes"].values())[0]["name"]
    assert galera.sql("SELECT owner, node_name, ended_at FROM allocations") == [
        ("cut-job", granted, None)]
    assert galera.dead_letters() == 0
    assert worker.poll() is None
    assert galera.cli("release", "cut-job").json["released"] == 1
    nothing_owned(galera)
