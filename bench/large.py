"""A large pool with a long queue: per-request work must not grow with either.

    python -m bench.large [--nodes 100000] [--waiters 10000] [--quick] [--no-save]

One sandbox holds `nodes` ready nodes in pool `default` and one node in pool
`queue`, held, with `waiters` allocates waiting on them. Measured there:
the worker's takeover (loading everything), allocate+release cycles at 20
clients in the large pool (in rounds taken in turn with a 100-node pool's
worker, so that both rates come from the same minutes of the same services),
`waiting`, `status` (whole and filtered) and `export`, one client's cycles
while a whole-pool `status` or an `export` runs,
release -> the head waiter's reply, the worker's RSS, and how fast stored
replies are pruned against the rate they are written at the bench's top speed.
Prints the figures as JSON and writes bench/results/<date>-large.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time

from bench.env import ROOT, Sandbox, add_nodes, machine, pump, save_results
from bench.load import percentiles, run_cycles
from bench.waiting import StampingClient
from molteniron import protocol
from molteniron.clients.client import MoltenIronClient

QUEUE_NODES = 1  # one node travels down the queue: each release serves the next waiter
REFERENCE_NODES = 100  # the small pool the large pool's cycle rate is compared with
ROUNDS = 3  # cycle rounds per pool, taken in turn: this machine's speed drifts by the minute


def timed(call, runs: int = 5) -> dict:
    """Median and max wall time of a client call, in ms."""
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        walls.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(walls), 1), "max_ms": round(max(walls), 1)}


def fill_queue(client: StampingClient, waiters: int) -> list[str]:
    """`waiters` allocates of one node each waiting in pool `queue`, in order."""
    ids = []
    for i in range(waiters):
        request = protocol.new_request("allocate", {"owner": f"w-{i:05d}", "count": 1,
                                                    "node_pool": "queue", "wait_seconds": 3600})
        client.send(request, 600)
        ids.append(request.id)
    while sum(1 for i in ids if client.replies.get(i)) < waiters:  # every 202 is back
        pump(client, 0.2)
    return ids


def cycles_during(amqp_url: str, action) -> dict:
    """allocate+release cycles of one client, in a process of its own, while `action`
    runs: how long the worker keeps everyone else waiting while it serves `action`."""
    ctx = mp.get_context("fork")
    started, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    looper = ctx.Process(target=_cycle_until, args=(amqp_url, started, stop, results))
    looper.start()
    started.wait(60)
    action()
    stop.set()
    latencies = results.get(timeout=60)
    looper.join()
    return {"cycles": len(latencies), **percentiles(latencies),
            "max_ms": round(max(latencies), 2) if latencies else None}


def _cycle_until(amqp_url: str, started, stop, results) -> None:
    latencies = []
    with MoltenIronClient(amqp_url, timeout=60) as client:
        started.set()
        while not stop.is_set():
            begun = time.perf_counter()
            client.call("allocate", {"owner": "during", "count": 1, "wait": False})
            client.call("release", {"owner": "during"})
            latencies.append((time.perf_counter() - begun) * 1000)
    results.put(latencies)


def release_to_reply(releaser: MoltenIronClient, waiter: StampingClient, ids: list[str],
                     rounds: int) -> dict:
    """Release the node the previous one got; time until the next waiter's grant arrives."""
    latencies = []
    previous = "holder-queue"
    for k in range(rounds):
        sent = time.time()
        releaser.release(previous)
        reply = waiter.wait(ids[k], time.time() + 30)
        assert reply and reply["status"] == 200, reply
        latencies.append((waiter.arrivals[ids[k]] - sent) * 1000)
        previous = f"w-{k:05d}"
    return {"rounds": rounds, **percentiles(latencies)}


def prune_rate(sandbox: Sandbox, rows: int, seconds: float) -> dict:
    """Rows of expired stored replies the worker deletes per second."""
    sandbox.sql("INSERT INTO processed_requests (request_id, op, reply, processed_at) "
                "SELECT CONCAT('old-', seq), 'release', '{}', '2000-01-01' "
                f"FROM seq_1_to_{rows}")
    started = time.time()
    left = rows
    while time.time() - started < seconds and left:
        time.sleep(0.5)
        left = sandbox.sql("SELECT COUNT(*) FROM processed_requests "
                           "WHERE request_id LIKE 'old-%'")[0][0]
    elapsed = time.time() - started
    return {"rows": rows, "pruned": rows - left, "seconds": round(elapsed, 1),
            "rows_per_s": round((rows - left) / elapsed, 0)}


def cycles_beside_reference(large: Sandbox, seconds: float) -> dict:
    """20-client cycles in the large pool and in a 100-node pool, rounds in turn; the
    round with the median rate of each, and the ratio of the two medians."""
    reference = Sandbox("large-ref")
    try:
        add_nodes(reference, REFERENCE_NODES)
        reference.start_worker()
        reference.wait_answering()
        rounds: dict[str, list[dict]] = {"large": [], "reference": []}
        for _ in range(ROUNDS):
            for name, sandbox in (("reference", reference), ("large", large)):
                rounds[name].append(run_cycles(sandbox.amqp_url, 20, seconds / 2).summary())
    finally:
        reference.close()
    median = {name: sorted(runs, key=lambda r: r["cycles_per_s"])[len(runs) // 2]
              for name, runs in rounds.items()}
    return {"cycles_20": median["large"],
            f"cycles_20_at_{REFERENCE_NODES}_nodes": median["reference"],
            "cycles_ratio": round(median["large"]["cycles_per_s"]
                                  / median["reference"]["cycles_per_s"], 2),
            "cycles_rounds": {name: [r["cycles_per_s"] for r in runs]
                              for name, runs in rounds.items()}}


def run(nodes: int, waiters: int, seconds: float, rounds: int) -> dict:
    sandbox = Sandbox("large")
    try:
        add_nodes(sandbox, nodes)
        add_nodes(sandbox, QUEUE_NODES, node_pool="queue", prefix="q")
        started = time.perf_counter()
        sandbox.start_worker()
        sandbox.wait_answering(timeout=300)
        result: dict = {"nodes": nodes, "waiters": waiters,
                        "takeover_s": round(time.perf_counter() - started, 2)}
        result.update(cycles_beside_reference(sandbox, seconds))
        waiter = StampingClient(sandbox.amqp_url, timeout=300)
        with MoltenIronClient(sandbox.amqp_url, timeout=300) as admin, waiter.connect():
            admin.allocate("holder-queue", QUEUE_NODES, node_pool="queue", wait=None)
            started = time.perf_counter()
            ids = fill_queue(waiter, waiters)
            result["queue_filled_s"] = round(time.perf_counter() - started, 2)
            result["waiting"] = timed(admin.waiting)
            result["status_all"] = timed(admin.status, runs=3)
            result["cycles_during_status_all"] = cycles_during(sandbox.amqp_url, admin.status)
            result["export"] = timed(admin.export, runs=3)
            result["cycles_during_export"] = cycles_during(sandbox.amqp_url, admin.export)
            result["status_filtered"] = timed(
                lambda: admin.call("status", {"state": "allocated", "owner": "holder-queue"}))
            result["release_to_reply"] = release_to_reply(admin, waiter, ids, rounds)
            result["worker_rss_mb"] = sandbox.worker_rss_mb()
        result["prune"] = prune_rate(sandbox, 50_000, 30)
        return result
    finally:
        sandbox.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.large", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="10,000 nodes, 1,000 waiters")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.waiters = 10_000, 1_000
    result = {"machine": machine(),
              **run(args.nodes, args.waiters, 2.0 if args.quick else 10.0,
                    50 if args.quick else 200)}
    print(json.dumps(result, indent=2))
    if not args.no_save:
        path = save_results(result, f"large{'-quick' if args.quick else ''}")
        print(f"written: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
