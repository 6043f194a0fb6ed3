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
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest

from bench.commit_ack_cutter import CommitAckCutter
from bench.env import machine
from bench.galera_cluster import PrivateGaleraCluster
from bench.soak import check_database
from molteniron import db
from tests.stack import ROOT, Stack, node_args, wait_until

POOL = "galera"
RESULTS = ROOT / "bench" / "results" / "galera-failover.json"
CALL_TIMEOUT = 300  # a hung CLI call is a failure, not a hung test


@pytest.fixture(scope="module")
def cluster():
    cluster = PrivateGaleraCluster(size=3)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        pytest.fail(f"a private 3-node Galera cluster (galera-4, rsync, mariadbd) could not "
                    f"start beside the machine's MariaDB: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


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
        for i in range(1, count + 1):
            done = self.cli("add_baremetal", *node_args(i, POOL))
            assert done.returncode == 0, done
        return {f"node-{i}" for i in range(1, count + 1)}


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


# --- CI jobs looping allocate/release through the real CLI ---------------------------

@dataclass
class Call:
    job: str
    op: str
    started: float      # unix time
    finished: float
    returncode: int | None  # None: the call hung past CALL_TIMEOUT
    stdout: str
    stderr: str

    @property
    def reply(self) -> dict:
        return json.loads(self.stdout)


class Jobs:
    """`count` jobs, each looping `allocate JOB 1 POOL` / `release JOB` until stopped."""

    def __init__(self, stack: Stack, count: int):
        self.stack = stack
        self.calls: list[Call] = []
        self.stopping = threading.Event()
        self.owners = [f"galera-job-{i}" for i in range(count)]
        self.threads = [threading.Thread(target=self._loop, args=(owner,), daemon=True)
                        for owner in self.owners]
        for thread in self.threads:
            thread.start()

    def _loop(self, owner: str) -> None:
        while not self.stopping.is_set():
            for op, args in (("allocate", (owner, "1", POOL)), ("release", (owner,))):
                started = time.time()
                try:
                    done = self.stack.cli(op, *args, timeout=CALL_TIMEOUT)
                    returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
                except subprocess.TimeoutExpired:
                    returncode, stdout, stderr = None, "", f"no answer in {CALL_TIMEOUT}s"
                self.calls.append(Call(owner, op, started, time.time(), returncode, stdout, stderr))

    def cycles_since(self, moment: float) -> dict[str, int]:
        """Per job: releases completed by calls started after `moment`."""
        done = {owner: 0 for owner in self.owners}
        for call in list(self.calls):
            if call.op == "release" and call.started > moment:
                done[call.job] += 1
        return done

    def wait_for_cycles(self, cycles: int, since: float, timeout: float, what: str) -> None:
        wait_until(lambda: min(self.cycles_since(since).values()) >= cycles, timeout,
                   f"{what}: every job through {cycles} allocate/release cycles "
                   f"(so far {self.cycles_since(since)})", interval=0.2)

    def stop(self) -> list[Call]:
        """Let every job finish its cycle (so it holds nothing), then return all calls."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=2 * CALL_TIMEOUT + 10)
        return sorted(self.calls, key=lambda c: c.started)


def run_jobs_through(stack: GaleraStack, jobs: int, fault) -> tuple[list[Call], float]:
    """Jobs allocate and release; once each has done a cycle, fault() is called; once
    each has done 2 more cycles started after it, they stop. Returns (calls, fault time)."""
    load = Jobs(stack, jobs)
    try:
        load.wait_for_cycles(1, 0, 120, "before the fault")
        fault_at = time.time()
        fault()
        load.wait_for_cycles(2, time.time(), 180, "after the fault")
    finally:
        calls = load.stop()
    return calls, fault_at


def failed_calls(calls: list[Call]) -> list[str]:
    return [f"{c.job} {c.op} exit {c.returncode}: {c.stdout.strip()} {c.stderr.strip()[-300:]}"
            for c in calls if c.returncode != 0]


def unix(moment: datetime) -> float:
    return moment.replace(tzinfo=timezone.utc).timestamp()


def history_problems(stack: GaleraStack, calls: list[Call]) -> list[str]:
    """Each job's own log of calls against the allocations table: every allocate it saw
    succeed is one history row (its node, started during the call), ended by the release
    that followed it (during that call); no other row. So nothing was lost or applied twice."""
    problems = []
    rows: dict[str, list[tuple]] = {}
    for owner, node, request_id, started, ended, reason in stack.sql(
            "SELECT owner, node_name, request_id, started_at, ended_at, end_reason "
            "FROM allocations ORDER BY started_at, id"):
        rows.setdefault(owner, []).append((node, request_id, unix(started),
                                           unix(ended) if ended else None, reason))
    for owner in {c.job for c in calls} | set(rows):
        mine = [c for c in calls if c.job == owner]
        pairs = [(a, r) for a, r in zip(mine[::2], mine[1::2])]
        history = rows.get(owner, [])
        if len(history) != len(pairs):
            problems.append(f"{owner}: {len(pairs)} allocations made, {len(history)} in history")
        if len({row[1] for row in history}) != len(history):
            problems.append(f"{owner}: one request id in several history rows: {history}")
        for (allocate, release), (node, _, started, ended, reason) in zip(pairs, history):
            granted = list(allocate.reply["nodes"].values())[0]["name"]
            if node != granted:
                problems.append(f"{owner}: granted {granted} at {allocate.started:.3f}, "
                                f"history says {node}")
            if not allocate.started <= started <= allocate.finished:
                problems.append(f"{owner}: {node} allocated at {started:.3f}, outside its "
                                f"allocate call {allocate.started:.3f}-{allocate.finished:.3f}")
            if ended is None or reason != "released" or not (
                    release.started <= ended <= release.finished):
                problems.append(f"{owner}: {node} ended at {ended} ({reason}), not by its "
                                f"release {release.started:.3f}-{release.finished:.3f}")
            if release.reply.get("released") != 1:
                problems.append(f"{owner}: release answered {release.reply}")
    return problems


def pauses(calls: list[Call], fault_at: float) -> dict:
    """The longest time with no call completing (across all jobs), the longest call, and
    when calls flowed again: the end of the longest such gap that ends after the fault."""
    finished = sorted(c.finished for c in calls)
    gaps = list(zip(finished, finished[1:]))
    _, resumed = max(((a, b) for a, b in gaps if b > fault_at), key=lambda gap: gap[1] - gap[0])
    return {
        "longest_gap_s": round(max(b - a for a, b in gaps), 2),
        "longest_call_s": round(max(c.finished - c.started for c in calls), 2),
        "served_again_after_fault_s": round(resumed - fault_at, 2),
    }


def nothing_owned(stack: GaleraStack) -> None:
    assert stack.sql("SELECT name, state, owner FROM nodes WHERE state <> 'ready' "
                     "OR owner IS NOT NULL") == []
    assert stack.sql("SELECT owner FROM allocations WHERE ended_at IS NULL") == []
    assert stack.sql("SELECT owner FROM waiting_requests") == []


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

    calls, killed_at = run_jobs_through(galera, 8, lambda: galera.cluster.kill(victim))

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

    calls, _ = run_jobs_through(galera, 4, lambda: galera.cluster.isolate(victim))

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
