"""`python -m bench [--quick]`: MoltenIron's figures beside this machine's limits.

Each scenario runs in its own vhost and database on the local services (see
bench/env.py), with its own worker, and removes them afterwards. Prints a
table and writes bench/results/<date>-<host>.json.
"""

from __future__ import annotations

import argparse
import compileall
import shutil
import statistics
import subprocess
import sys
import time

from bench.env import ROOT, Sandbox, add_nodes, machine, pump, save_results
from bench.limits import db_commit_rate
from bench.load import run_cycles
from bench.vanishing import render as render_vanishing
from bench.vanishing import run_vanishing
from bench.waiting import run_single_waiter, run_waiting

ORIGINAL = {"cycles_1": 7.2, "cycles_20": 4.5, "p99_20_ms": 19_500}  # the HTTP original, 2 cores


def sandboxed(label: str, nodes: int, worker: str = "molteniron"):
    """A sandbox with its worker answering; removed again, worker and all, if it fails."""
    sandbox = Sandbox(label)
    try:
        if nodes:
            add_nodes(sandbox, nodes)
        if worker == "echo":
            sandbox.start_worker(module="bench.echo_worker")
        else:
            sandbox.start_worker()
        sandbox.wait_answering()
    except BaseException:
        sandbox.close()
        raise
    return sandbox


def cycles(label: str, clients: list[int], seconds: float, nodes: int, worker: str) -> list[dict]:
    sandbox = sandboxed(label, nodes, worker)
    try:
        pids = [worker.pid for worker in sandbox.workers]
        return [run_cycles(sandbox.amqp_url, c, seconds, worker_pids=pids).summary()
                for c in clients]
    finally:
        sandbox.close()


def cli_wall(runs: int) -> dict:
    """Wall time of the whole `molteniron allocate` process (then released, not timed).

    Timed with the CLI's modules byte-compiled, as `pip install` leaves them: without
    their .pyc files (PYTHONDONTWRITEBYTECODE in a development shell) each run would
    also compile them, about 13 ms that no installed CLI spends."""
    sandbox = sandboxed("cli", 1, "molteniron")
    command = [shutil.which("molteniron") or sys.executable]
    if not shutil.which("molteniron"):
        command += ["-m", "molteniron.clients.cli"]
    compileall.compile_dir(ROOT / "molteniron", quiet=1)
    compileall.compile_dir(ROOT / "clients", quiet=1)
    env = {**sandbox.env}
    try:
        walls = []
        for i in range(runs):
            started = time.perf_counter()
            done = subprocess.run([*command, "allocate", f"cli-{i}", "1", "--no-wait"], env=env,
                                  capture_output=True, text=True, cwd=ROOT)
            walls.append((time.perf_counter() - started) * 1000)
            assert done.returncode == 0, done.stderr
            subprocess.run([*command, "release", f"cli-{i}"], env=env, capture_output=True,
                           cwd=ROOT)
        walls.sort()
        return {"runs": runs, "median_ms": round(statistics.median(walls), 1),
                "max_ms": round(walls[-1], 1)}
    finally:
        sandbox.close()


def worker_memory(nodes: int, waiters: int) -> dict:
    """Worker RSS holding `nodes` allocated nodes and `waiters` waiting allocates."""
    from molteniron import protocol
    from molteniron.clients.client import MoltenIronClient
    sandbox = sandboxed("rss", nodes, "molteniron")
    try:
        with MoltenIronClient(sandbox.amqp_url, timeout=120) as client:
            client.allocate("holder", nodes, wait=None)
            ids = []
            for i in range(waiters):
                request = protocol.new_request("allocate", {"owner": f"w-{i}", "count": 1,
                                                            "wait_seconds": 600})
                client.send(request, 600)
                ids.append(request.id)
            while sandbox.sql("SELECT COUNT(*) FROM waiting_requests")[0][0] < waiters:
                pump(client, 0.1)
        return {"nodes": nodes, "waiters": waiters, "rss_mb": sandbox.worker_rss_mb()}
    finally:
        sandbox.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (about a minute)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results")
    args = parser.parse_args(argv)
    seconds = 2.0 if args.quick else 10.0
    waiters = 200 if args.quick else 1000
    clients = [1, 20, 100]
    run: dict = {"machine": machine(), "quick": args.quick,
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "original": ORIGINAL}

    step("limit: MariaDB single-row UPDATE+COMMIT")
    run["db_commits_per_s"] = db_commit_rate(seconds)
    step("limit: no-op echo worker on the same queue and reply path")
    run["echo"] = cycles("echo", clients, seconds, 0, "echo")
    step("MoltenIron allocate+release cycles, 200 nodes")
    run["cycles"] = cycles("cycles", clients, seconds, 200, "molteniron")
    step("pool scale: 20 clients at 100 and at 10,000 nodes")
    small = cycles("scale100", [20], seconds, 100, "molteniron")[0]
    large = cycles("scale10k", [20], seconds, 10_000, "molteniron")[0]
    run["scale"] = {"nodes_100": small, "nodes_10000": large,
                    "ratio": round(large["cycles_per_s"] / small["cycles_per_s"], 2)}
    step(f"waiting: {waiters} waiters from 50 connections on 10 nodes")
    sandbox = sandboxed("waiting", 10, "molteniron")
    try:
        run["waiting"] = run_waiting(sandbox, waiters, 50, 10)
    finally:
        sandbox.close()
    step("waiting: one waiter at a time, release -> reply")
    sandbox = sandboxed("waiter1", 1, "molteniron")
    try:
        run["single_waiter"] = run_single_waiter(sandbox, 50 if args.quick else 300)
    finally:
        sandbox.close()
    step(f"vanishing clients: {waiters} waiters whose clients are killed at once")
    run["vanishing"] = run_vanishing(waiters, retention=10.0)
    step("molteniron allocate as a whole process")
    run["cli"] = cli_wall(5 if args.quick else 20)
    step("worker memory")
    run["memory"] = worker_memory(10_000, 1000)

    print(render(run))
    if not args.no_save:
        path = save_results(run, f"{run['machine']['host']}{'-quick' if args.quick else ''}")
        print(f"\nwritten: {path.relative_to(ROOT)}")
    return 0


def step(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def render(run: dict) -> str:
    m = run["machine"]
    quick = "(quick) " if run["quick"] else ""
    lines = [f"MoltenIron benchmark {quick}{run['date']} on {m['host']}: "
             f"{m['cores']} cores, {m['ram_gb']} GB, MariaDB {m['mariadb']}, "
             f"RabbitMQ {m['rabbitmq']}, commit {m['git_commit']}",
             f"MariaDB UPDATE+COMMIT: {run['db_commits_per_s']:.0f}/s",
             "",
             f"{'clients':>7} | {'cycles/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} | "
             f"{'echo/s':>7} {'ratio':>6} | original"]
    for mine, echo in zip(run["cycles"], run["echo"]):
        original = {1: "7.2/s", 20: "4.5/s (p99 19.5 s)"}.get(mine["clients"], "")
        lines.append(f"{mine['clients']:>7} | {mine['cycles_per_s']:>9} {mine['p50_ms']:>7} "
                     f"{mine['p95_ms']:>7} {mine['p99_ms']:>7} | {echo['cycles_per_s']:>7} "
                     f"{mine['cycles_per_s'] / echo['cycles_per_s']:>6.2f} | {original}")
    lines += ["", "CPU per cycle, ms (each party's user+system time over the window / cycles):",
              f"{'clients':>7} {'worker':>16} | {'broker':>7} {'database':>8} {'clients':>7} "
              f"{'other':>5} | {'total':>6} | machine idle"]
    for mine, echo in zip(run["cycles"], run["echo"]):
        for name, figures in (("echo", echo), ("molteniron", mine)):
            cpu = figures.get("cpu_ms_per_cycle")
            if cpu is None:  # a results file from before bench/cpu.py
                continue
            total = sum(cpu[p] for p in ("worker", "broker", "database", "clients", "other"))
            lines.append(f"{figures['clients']:>7} {name:>10} {cpu['worker']:>5.2f} | "
                         f"{cpu['broker']:>7.2f} {cpu['database']:>8.2f} {cpu['clients']:>7.2f} "
                         f"{cpu['other']:>5.2f} | {total:>6.2f} | {cpu['machine_idle']:>6.0%}")
    s, w, w1 = run["scale"], run["waiting"], run["single_waiter"]
    lines += [
        "",
        f"pool scale (20 clients): 100 nodes {s['nodes_100']['cycles_per_s']}/s, "
        f"10,000 nodes {s['nodes_10000']['cycles_per_s']}/s, ratio {s['ratio']}",
        f"waiting: {w['served']}/{w['waiters']} served from {w['connections']} connections in "
        f"{w['seconds']} s, FIFO exact: {w['fifo_exact']}, release->reply p50 {w['p50_ms']} "
        f"p95 {w['p95_ms']} p99 {w['p99_ms']} ms",
        f"one waiter at a time: release->reply p50 {w1['p50_ms']} p95 {w1['p95_ms']} "
        f"p99 {w1['p99_ms']} ms ({w1['rounds']} rounds)",
        f"molteniron allocate process: median {run['cli']['median_ms']} ms, "
        f"max {run['cli']['max_ms']} ms ({run['cli']['runs']} runs)",
        f"worker RSS with {run['memory']['nodes']} nodes and {run['memory']['waiters']} waiters: "
        f"{run['memory']['rss_mb']} MB",
    ]
    if "vanishing" in run:  # results files from before bench/vanishing.py lack it
        lines.append(render_vanishing(run["vanishing"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
