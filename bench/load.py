"""Load generators: clients in processes and threads, each with its own connection."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass

from bench.cpu import CpuMeter


@dataclass
class CycleFigures:
    clients: int
    cycles: int
    seconds: float
    latencies_ms: list[float]
    errors: int
    cpu: CpuMeter | None = None

    @property
    def rate(self) -> float:
        return self.cycles / self.seconds

    def summary(self) -> dict:
        summary = {"clients": self.clients, "cycles_per_s": round(self.rate, 1),
                   **percentiles(self.latencies_ms), "errors": self.errors}
        if self.cpu is not None:
            summary["cpu_ms_per_cycle"] = self.cpu.per_cycle_ms(self.cycles)
        return summary


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def run_cycles(amqp_url: str, clients: int, seconds: float, warmup: float = 1.0,
               max_processes: int = 20, worker_pids: list[int] | None = None) -> CycleFigures:
    """allocate(1, no wait) + release loops from `clients` connections at once.

    worker_pids: also measure each party's CPU over the window (bench/cpu.py)."""
    ctx = mp.get_context("fork")
    processes = min(clients, max_processes)
    groups = [[f"bench-{p}-{t}" for t in range(clients) if t % processes == p]
              for p in range(processes)]
    groups = [g for g in groups if g]
    barrier, results = ctx.Barrier(len(groups) + 1), ctx.Queue()
    # The window is fixed once every connection is up (the barrier), so setup is not measured.
    window = ctx.Array("d", [0.0, 0.0])
    procs = [ctx.Process(target=_cycle_process_window, args=(amqp_url, g, barrier, window, results))
             for g in groups]
    for p in procs:
        p.start()
    barrier.wait()  # everyone connected
    now = time.time()
    window[0], window[1] = now + warmup, now + warmup + seconds
    barrier.wait()  # window published
    meter = None
    if worker_pids is not None:
        # every one started above: a pid is None only before start()
        meter = CpuMeter(worker_pids, [p.pid for p in procs if p.pid is not None])
        metering = threading.Thread(target=_measure, args=(meter, window[0], window[1]))
        metering.start()
    latencies, errors = [], 0
    for _ in procs:
        out, errs = results.get()
        latencies.extend(out)
        errors += errs
    for p in procs:
        p.join()
    if meter is not None:
        metering.join()
    return CycleFigures(clients, len(latencies), seconds, latencies, errors, meter)


def _measure(meter: CpuMeter, start: float, end: float) -> None:
    time.sleep(max(0.0, start - time.time()))
    meter.start()
    time.sleep(max(0.0, end - time.time()))
    meter.stop()


def _cycle_process_window(amqp_url, owners, barrier, window, results) -> None:
    # Connect all threads, meet the parent, then read the window it publishes.
    from molteniron.clients.client import MoltenIronClient
    from molteniron.errors import MoltenIronError
    conns = [MoltenIronClient(amqp_url, timeout=30).connect() for _ in owners]
    barrier.wait()
    barrier.wait()
    start, end = window[0], window[1]
    out: list[float] = []
    errors: list[int] = []

    def loop(client, owner):
        while True:
            t0 = time.time()
            if t0 >= end:
                return
            try:
                client.call("allocate", {"owner": owner, "count": 1, "wait": False})
                client.call("release", {"owner": owner})
            except MoltenIronError:
                errors.append(1)
                continue
            t1 = time.time()
            if t0 >= start and t1 <= end:
                out.append((t1 - t0) * 1000)

    threads = [threading.Thread(target=loop, args=(c, o)) for c, o in zip(conns, owners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()
    results.put((out, len(errors)))
