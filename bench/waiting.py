"""Waiting allocations under load: many waiters on few nodes, each served one by one.

Every waiter that gets a node gives it back at once, so the nodes travel down
the queue. Measured: the time from sending the release that frees a node to
the next waiter receiving that node, and whether the service order is exactly
the order the requests started waiting in.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

from bench.env import pump
from bench.load import percentiles
from molteniron import protocol
from molteniron.clients.client import MoltenIronClient

DEADLINE = 900.0


class StampingClient(MoltenIronClient):
    """Notes when each reply arrived, so the figure excludes the thread's own delays."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrivals: dict[str, float] = {}

    def _on_reply(self, channel, method, properties, body) -> None:
        super()._on_reply(channel, method, properties, body)
        inbox = self.replies.get(properties.correlation_id)
        if inbox and inbox[-1].get("status") != protocol.QUEUED:  # the final reply
            self.arrivals.setdefault(properties.correlation_id, time.time())


def _connection_thread(amqp_url: str, owners: list[str], ready, go, events: list) -> None:
    client = StampingClient(amqp_url, timeout=60)
    client.connect()
    arrivals = client.arrivals
    pending = {}
    for owner in owners:
        request = protocol.new_request("allocate", {"owner": owner, "count": 1,
                                                    "wait_seconds": DEADLINE})
        client.send(request, DEADLINE)
        pending[request.id] = owner
    ready.wait()
    go.wait()
    releases: dict[str, str] = {}
    while pending or releases:
        pump(client, 0.05)
        for request_id in list(pending):
            inbox = client.replies.get(request_id, [])
            final = next((r for r in inbox if r.get("status") != protocol.QUEUED), None)
            if final is None:
                continue
            owner = pending.pop(request_id)
            (node,) = final["nodes"].values()
            events.append(("served", node["name"], arrivals[request_id], request_id))
            release = protocol.new_request("release", {"owner": owner})
            events.append(("release_sent", node["name"], time.time(), owner))
            client.send(release, 60)
            releases[release.id] = owner
        for request_id in list(releases):
            inbox = client.replies.get(request_id, [])
            if inbox:
                releases.pop(request_id)
                client.replies.pop(request_id, None)
    client.close()


def _connection_process(amqp_url, groups, ready, go, results) -> None:
    events: list = []
    threads = [threading.Thread(target=_connection_thread, args=(amqp_url, g, ready, go, events))
               for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(events)


def run_waiting(sandbox, waiters: int, connections: int, nodes: int,
                processes: int = 10) -> dict:
    """`waiters` allocates from `connections` connections on `nodes` held nodes."""
    with MoltenIronClient(sandbox.amqp_url, timeout=60) as holder:
        for i in range(nodes):
            holder.allocate(f"holder-{i}", 1, wait=None)
    owners = [f"w-{i:05d}" for i in range(waiters)]
    by_connection = [owners[c::connections] for c in range(connections)]
    by_process = [by_connection[p::processes] for p in range(processes)]
    ctx = mp.get_context("fork")
    ready, go, results = ctx.Barrier(connections + 1), ctx.Barrier(connections + 1), ctx.Queue()
    procs = [ctx.Process(target=_connection_process, args=(sandbox.amqp_url, g, ready, go, results))
             for g in by_process if g]
    for p in procs:
        p.start()
    ready.wait()
    while sandbox.sql("SELECT COUNT(*) FROM waiting_requests")[0][0] < waiters:
        time.sleep(0.05)
    expected = [r[0] for r in sandbox.sql("SELECT request_id FROM waiting_requests ORDER BY id")]
    events = []
    go.wait()
    started = time.time()
    with MoltenIronClient(sandbox.amqp_url, timeout=60) as holder:
        holder_nodes = dict(sandbox.sql(
            "SELECT owner, name FROM nodes WHERE owner LIKE 'holder-%'"))
        for i in range(nodes):
            events.append(("release_sent", holder_nodes[f"holder-{i}"], time.time(), f"holder-{i}"))
            holder.release(f"holder-{i}")
    for _ in procs:
        events.extend(results.get())
    for p in procs:
        p.join()
    elapsed = time.time() - started
    served_order = [r[0] for r in sandbox.sql(
        "SELECT request_id FROM allocations WHERE owner LIKE 'w-%' ORDER BY id")]
    latencies = _release_to_reply(events)
    return {"waiters": waiters, "connections": connections, "nodes": nodes,
            "served": len(served_order), "fifo_exact": served_order == expected,
            "seconds": round(elapsed, 2), **percentiles(latencies)}


def _release_to_reply(events: list) -> list[float]:
    """Pair each node's 'served' with the release of that node sent just before it."""
    latencies = []
    by_node: dict[str, list] = {}
    for kind, node, at, _ in events:
        by_node.setdefault(node, []).append((at, kind))
    for timeline in by_node.values():
        timeline.sort()
        last_release = None
        for at, kind in timeline:
            if kind == "release_sent":
                last_release = at
            elif last_release is not None:
                latencies.append((at - last_release) * 1000)
                last_release = None
    return latencies


def run_single_waiter(sandbox, rounds: int) -> dict:
    """One node, one waiter at a time: release -> the waiter's reply, with nothing else going on."""
    waiter = StampingClient(sandbox.amqp_url, timeout=60)
    waiter.connect()
    releaser = MoltenIronClient(sandbox.amqp_url, timeout=60).connect()
    releaser.allocate("w-0", 1, wait=None)
    latencies = []
    for k in range(1, rounds + 1):
        request = protocol.new_request("allocate", {"owner": f"w-{k}", "count": 1,
                                                    "wait_seconds": 60})
        waiter.send(request, 60)
        while not waiter.replies.get(request.id):  # the 202: it waits now
            pump(waiter, 0.5)
        sent = time.time()
        releaser.release(f"w-{k - 1}")
        reply = waiter.wait(request.id, time.time() + 30)
        assert reply and reply["status"] == 200, reply
        latencies.append((waiter.arrivals[request.id] - sent) * 1000)
    waiter.close()
    releaser.close()
    return {"rounds": rounds, **percentiles(latencies)}
