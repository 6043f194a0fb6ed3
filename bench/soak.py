"""Soak: many clients doing random allocate/release/status/cancel for a fixed time,
then an invariant check over the database and every client's log.

    python -m bench.soak [--clients 200] [--seconds 60] [--nodes 40]

What must hold afterwards: no node held by two owners at once (history
intervals never overlap), no node lost, every allocated node with exactly one
owner and one open history row, every allocate a client saw succeed matches
the history rows of its request id, and every allocation no client saw
succeed ended as `cancelled` (a client that gave up never owns nodes).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from bench.env import Sandbox, add_nodes

POOLS = ("a", "b")
OPERATIONS = ("allocate", "allocate", "allocate", "release", "release", "status", "cancel")


@dataclass
class Outcome:
    """What one client saw of one request."""
    client: str
    op: str
    request_id: str | None
    started: float
    finished: float
    status: str                      # "ok", or the error's type name
    nodes: list[str] = field(default_factory=list)


def _client_thread(amqp_url: str, owner: str, seed: int, until: float, out: list) -> None:
    from molteniron import errors, protocol
    from molteniron.clients.client import MoltenIronClient

    rng = random.Random(seed)
    client = MoltenIronClient(amqp_url, timeout=60)
    while time.time() < until:
        op = rng.choice(OPERATIONS)
        started = time.time()
        record = Outcome(owner, op, None, started, 0.0, "ok")
        try:
            if op == "allocate":
                wait = rng.choice([None, 0.5, 2.0, 5.0])
                sent: list[str] = []
                try:
                    reply = client.allocate(owner, rng.randint(1, 2), rng.choice(POOLS), wait,
                                            on_sent=sent.append)
                finally:
                    record.request_id = sent[0] if sent else None
                record.nodes = [n["name"] for n in reply["nodes"].values()]
            elif op == "release":
                client.release(owner)
            elif op == "status":
                client.status()
            else:  # cancel: start a waiting allocate, cancel it soon after
                request = protocol.new_request("allocate", {"owner": owner, "count": 1,
                                                            "node_pool": rng.choice(POOLS),
                                                            "wait_seconds": 30})
                record.request_id = request.id
                client.send(request, 30)
                time.sleep(rng.random() * 0.2)
                client.cancel(request.id)
                answer = client.wait(request.id, time.time() + 35)
                if answer is None:
                    record.status = "NoReply"
                elif answer["status"] == 200:
                    record.status = "ServedThenCancelled"
                else:
                    record.status = answer.get("error", str(answer["status"]))
        except errors.MoltenIronError as exc:
            record.status = exc.kind
        record.finished = time.time()
        out.append(record)
    _release_for_good(client, owner, out)
    client.close()


def _release_for_good(client, owner: str, out: list) -> None:
    """At the end every client gives back what it holds, however long the broker takes."""
    from molteniron import errors
    deadline = time.time() + 120
    while time.time() < deadline:
        started = time.time()
        try:
            client.release(owner)
            out.append(Outcome(owner, "final_release", None, started, time.time(), "ok"))
            return
        except errors.OwnerNotFound:
            return
        except errors.MoltenIronError:
            client.close()
            time.sleep(1)


def _client_process(amqp_url: str, owners: list[str], seed: int, until: float, results) -> None:
    out: list[Outcome] = []
    threads = [threading.Thread(target=_client_thread, args=(amqp_url, o, seed + i, until, out))
               for i, o in enumerate(owners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(out)


class Clients:
    """The soak's client processes: `finish()` collects their outcomes, `stop()` ends them."""

    def __init__(self, amqp_url: str, clients: int, seconds: float, seed: int, processes: int = 10):
        ctx = mp.get_context("fork")
        owners = [f"soak-{i:03d}" for i in range(clients)]
        groups = [owners[p::processes] for p in range(min(processes, clients))]
        self.results = ctx.Queue()
        until = time.time() + seconds
        self.procs = [ctx.Process(target=_client_process,
                                  args=(amqp_url, g, seed + 1000 * i, until, self.results))
                      for i, g in enumerate(groups)]
        for p in self.procs:
            p.start()

    def finish(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for _ in self.procs:
            outcomes.extend(self.results.get())
        for p in self.procs:
            p.join()
        return outcomes

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        self.results.cancel_join_thread()


def prepare(nodes: int, workers: int = 1) -> Sandbox:
    sandbox = Sandbox("soak")
    add_nodes(sandbox, nodes // 2, "a", prefix="a")
    add_nodes(sandbox, nodes - nodes // 2, "b", prefix="b")
    for _ in range(workers):
        sandbox.start_worker()
    sandbox.wait_answering()
    return sandbox


def check_database(sandbox: Sandbox, node_names: set[str], settled: bool) -> list[str]:
    """Invariants over the database; `settled`: everything should be back and idle."""
    problems = []
    names = {r[0] for r in sandbox.sql("SELECT name FROM nodes")}
    if names != node_names:
        problems.append(f"nodes lost or added: {sorted(node_names ^ names)[:10]}")
    for node_id, count in sandbox.sql(
            "SELECT node_id, COUNT(*) FROM allocations "
            "WHERE ended_at IS NULL GROUP BY node_id HAVING COUNT(*) > 1"):
        problems.append(f"node {node_id} has {count} open allocations")
    for name, state, owner, open_owner in sandbox.sql(
            "SELECT n.name, n.state, n.owner, a.owner FROM nodes n LEFT JOIN allocations a "
            "ON a.node_id = n.id AND a.ended_at IS NULL"):
        if state == "allocated" and (owner is None or owner != open_owner):
            problems.append(f"{name} allocated to {owner!r} "
                            f"but its open history says {open_owner!r}")
        if state != "allocated" and (owner is not None or open_owner is not None):
            problems.append(f"{name} is {state} but has owner {owner!r} / open row {open_owner!r}")
    rows = sandbox.sql("SELECT node_id, started_at, ended_at FROM allocations "
                       "ORDER BY node_id, started_at, id")
    for (node, _, ended), (next_node, next_started, _) in zip(rows, rows[1:]):
        if node == next_node and (ended is None or ended > next_started):
            problems.append(f"node {node}: two owners at once around {next_started}")
    if settled:
        held = sandbox.sql("SELECT COUNT(*) FROM nodes WHERE state <> 'ready'")[0][0]
        waiting = sandbox.sql("SELECT COUNT(*) FROM waiting_requests")[0][0]
        if held or waiting:
            problems.append(f"after every client released: {held} nodes not ready, "
                            f"{waiting} waiting")
    return problems


class ReadsSql(Protocol):
    """What the checks read the pool's database through (a Sandbox, a test's keeper)."""

    def sql(self, query: str) -> list: ...


def check_clients(sandbox: ReadsSql, outcomes: list[Outcome]) -> list[str]:
    """What clients saw agrees with the history; nobody who gave up kept nodes."""
    problems = []
    granted = {o.request_id: o for o in outcomes if o.op == "allocate" and o.status == "ok"}
    history: dict[str | None, list[tuple]] = {}
    for request_id, owner, name, reason in sandbox.sql(
            "SELECT request_id, owner, node_name, end_reason FROM allocations"):
        history.setdefault(request_id, []).append((owner, name, reason))
    for request_id, outcome in granted.items():
        rows = history.get(request_id, [])
        # A grant the broker returned (the client's reply queue had gone, with a broker
        # restart say) was taken back as client_gone, and the copy the client sent on its
        # new connection was served afresh: the client saw only the grant that reached it.
        reached = [r for r in rows if r[2] != "client_gone"]
        if (sorted(r[1] for r in reached) != sorted(outcome.nodes)
                or any(r[0] != outcome.client for r in rows)):
            problems.append(f"{outcome.client} was granted {outcome.nodes} by {request_id}, "
                            f"history says {rows}")
    for request_id, rows in history.items():
        # Never seen: taken back because its client cancelled or was gone when it came.
        if request_id not in granted and any(reason not in ("cancelled", "client_gone")
                                             for _, _, reason in rows):
            problems.append(f"allocation {request_id} ({rows}) was never seen by its client "
                            "but did not end as cancelled or client_gone")
    return problems


def longest_gap(outcomes: list[Outcome]) -> float:
    """The longest time no request at all completed successfully."""
    done = sorted(o.finished for o in outcomes
                  if o.status in ("ok", "NotEnoughNodes", "OwnerNotFound"))
    return max((b - a for a, b in zip(done, done[1:])), default=0.0)


def summarize(outcomes: list[Outcome]) -> dict:
    by_status: dict[str, int] = {}
    for o in outcomes:
        key = f"{o.op}:{o.status}"
        by_status[key] = by_status.get(key, 0) + 1
    return {"requests": len(outcomes), "by_outcome": dict(sorted(by_status.items())),
            "longest_gap_s": round(longest_gap(outcomes), 2)}


def run(clients: int, seconds: float, nodes: int, seed: int = 1) -> dict:
    sandbox = prepare(nodes)
    try:
        names = {r[0] for r in sandbox.sql("SELECT name FROM nodes")}
        clients_running = Clients(sandbox.amqp_url, clients, seconds, seed)
        try:
            outcomes = clients_running.finish()
        finally:
            clients_running.stop()
        wait_settled(sandbox)
        problems = check_database(sandbox, names, settled=True) + check_clients(sandbox, outcomes)
        return {"clients": clients, "seconds": seconds, "nodes": nodes, **summarize(outcomes),
                "problems": problems, "ok": not problems}
    finally:
        sandbox.close()


def wait_settled(sandbox: Sandbox, timeout: float = 60) -> None:
    """Cancels and deadlines may still be in flight when the last client returns."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not sandbox.sql("SELECT COUNT(*) FROM waiting_requests")[0][0] and not sandbox.sql(
                "SELECT COUNT(*) FROM nodes WHERE state <> 'ready'")[0][0]:
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--nodes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    return report(run(args.clients, args.seconds, args.nodes, args.seed))


def report(result: dict) -> int:
    """Print a suite's figures and problems; the exit code says whether it passed."""
    for key, value in result.items():
        if key != "problems":
            print(f"{key}: {value}")
    for problem in result["problems"][:50]:
        print(f"PROBLEM: {problem}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
