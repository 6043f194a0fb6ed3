"""CI jobs looping allocate/release through the real CLI while a test breaks something,
and the checks of such a run: no call failed, every job's own log matches the history
(nothing lost or applied twice), nothing left owned, and the pauses it saw."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

from tests.stack import Stack, node_args, wait_until

CALL_TIMEOUT = 300  # a hung CLI call is a failure, not a hung test


def add_nodes(stack: Stack, count: int, pool: str) -> set[str]:
    """node-1 .. node-COUNT in pool, through the CLI; their names."""
    for i in range(1, count + 1):
        done = stack.cli("add_baremetal", *node_args(i, pool))
        assert done.returncode == 0, done
    return {f"node-{i}" for i in range(1, count + 1)}


def running(cluster, what: str):
    """A module fixture's body: the private cluster started, stopped afterwards; one that
    cannot start fails the tests (never skips them), saying what could not start."""
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        pytest.fail(f"{what} could not start: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


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
    """`count` jobs, each looping `allocate JOB 1 POOL` / `release JOB` until stopped;
    env_of(i): job i's extra environment (None: the stack's)."""

    def __init__(self, stack: Stack, count: int, prefix: str, pool: str,
                 env_of: Callable[[int], dict | None] = lambda i: None):
        self.stack = stack
        self.pool = pool
        self.calls: list[Call] = []
        self.stopping = threading.Event()
        self.owners = [f"{prefix}-job-{i}" for i in range(count)]
        self.threads = [threading.Thread(target=self._loop, args=(owner, env_of(i)), daemon=True)
                        for i, owner in enumerate(self.owners)]
        for thread in self.threads:
            thread.start()

    def _loop(self, owner: str, env: dict | None) -> None:
        while not self.stopping.is_set():
            for op, args in (("allocate", (owner, "1", self.pool)), ("release", (owner,))):
                started = time.time()
                try:
                    done = self.stack.cli(op, *args, timeout=CALL_TIMEOUT, env=env)
                    returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
                except subprocess.TimeoutExpired:
                    returncode, stdout, stderr = None, "", f"no answer in {CALL_TIMEOUT}s"
                self.calls.append(Call(owner, op, started, time.time(), returncode, stdout, stderr))

    def cycles_since(self, moment: float) -> dict[str, int]:
        """Per job: releases completed by calls started after `moment`."""
        done = dict.fromkeys(self.owners, 0)
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


def run_jobs_through(stack: Stack, jobs: Jobs | int, fault, prefix: str = "",
                     pool: str = "") -> tuple[list[Call], float]:
    """Jobs allocate and release; once each has done a cycle, fault() is called; once
    each has done 2 more cycles started after it, they stop. Returns (calls, fault time).
    jobs: the Jobs, or how many to start (named prefix-job-N, in pool)."""
    load = jobs if isinstance(jobs, Jobs) else Jobs(stack, jobs, prefix, pool)
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


def history_problems(stack: Stack, calls: list[Call]) -> list[str]:
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


def nothing_owned(stack: Stack) -> None:
    assert stack.sql("SELECT name, state, owner FROM nodes WHERE state <> 'ready' "
                     "OR owner IS NOT NULL") == []
    assert stack.sql("SELECT owner FROM allocations WHERE ended_at IS NULL") == []
    assert stack.sql("SELECT owner FROM waiting_requests") == []
