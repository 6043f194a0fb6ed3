"""Faults during load: the soak's clients run while the active worker is killed
(SIGKILL, a standby takes over), RabbitMQ is restarted and MariaDB is restarted.

    python -m bench.faults [--kills 20] [--broker-restarts 1] [--db-restarts 1]

After each fault: the invariants hold and the pool answers again (the time it
took is the failover/recovery time). At the end: no client hung past its
deadline, and the soak's database and client checks pass. The run has a
private MariaDB and a private RabbitMQ node of its own (bench/private.py, on
free ports, removed at the end): the restarts never touch the machine's
shared services, so it may run beside other work.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from bench.env import Sandbox, add_nodes
from bench.private import PrivateMariaDB, PrivateRabbitMQ
from bench.soak import Clients, check_clients, check_database, report, summarize, wait_settled

# Longest a client call may take: allocate's wait + grace + a reconnect-and-cancel, or a timeout.
LONGEST_CALL = 5.0 + 5.0 + 30.0 + 60.0


def kill_active_worker(sandbox) -> None:
    holder = sandbox.sql("SELECT holder FROM worker_meta")[0][0]
    index = int(holder.rsplit("-", 1)[1]) if holder.startswith("bench-") else 0
    worker = sandbox.workers[index]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    sandbox.start_worker()  # the next standby


def restart_broker(rabbit: PrivateRabbitMQ) -> None:
    rabbit.restart()  # stop_app/start_app: every connection drops, durable queues stay


def restart_database(mariadb: PrivateMariaDB) -> None:
    mariadb.restart()


def answered_again(sandbox, since: float, timeout: float = 120) -> float:
    """Seconds from `since` until a status request is answered."""
    from clients.client import MoltenIronClient
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with MoltenIronClient(sandbox.amqp_url, timeout=2) as client:
                client.status()
            return time.time() - since
        except Exception:  # anything: not back yet
            time.sleep(0.05)
    raise RuntimeError(f"the pool did not answer within {timeout}s of the fault")


def run(kills: int, broker_restarts: int, db_restarts: int, clients: int = 50,
        nodes: int = 20, seed: int = 7) -> dict:
    plan = ["worker_kill"] * kills
    for kind, count in (("broker_restart", broker_restarts), ("db_restart", db_restarts)):
        for i in range(count):  # spread the restarts among the kills
            plan.insert((i + 1) * len(plan) // (count + 1), kind)
    seconds = 10 + 4 * kills + 25 * (broker_restarts + db_restarts)
    with PrivateMariaDB() as mariadb, PrivateRabbitMQ() as rabbit:
        sandbox = Sandbox("faults", amqp_url=rabbit.url, db_url=mariadb.url, rabbitmqctl=rabbit.ctl)
        faults = {"worker_kill": lambda: kill_active_worker(sandbox),
                  "broker_restart": lambda: restart_broker(rabbit),
                  "db_restart": lambda: restart_database(mariadb)}
        clients_running = None
        try:
            add_nodes(sandbox, nodes // 2, "a", prefix="a")  # the soak's two pools
            add_nodes(sandbox, nodes - nodes // 2, "b", prefix="b")
            for _ in range(2):
                sandbox.start_worker()
            sandbox.wait_answering()
            names = {r[0] for r in sandbox.sql("SELECT name FROM nodes")}
            clients_running = Clients(sandbox.amqp_url, clients, seconds, seed)
            started = time.time()
            recoveries, problems = [], []
            for n, kind in enumerate(plan):
                time.sleep(max(0.0, started + 3 + n * (seconds - 8) / len(plan) - time.time()))
                at = time.time()
                faults[kind]()
                recovered = answered_again(sandbox, at)
                recoveries.append({"fault": kind, "recovered_s": round(recovered, 2)})
                problems += [f"after {kind} #{n}: {p}" for p in check_database(sandbox, names, False)]
            outcomes = clients_running.finish()
            wait_settled(sandbox)
            problems += check_database(sandbox, names, settled=True) + check_clients(sandbox, outcomes)
            slow = [o for o in outcomes if o.finished - o.started > LONGEST_CALL]
            problems += [f"{o.client} {o.op} took {o.finished - o.started:.1f}s" for o in slow]
            by_kind = {}
            for r in recoveries:
                by_kind.setdefault(r["fault"], []).append(r["recovered_s"])
            return {"clients": clients, "seconds": seconds, "faults": len(plan),
                    "recovery_s": {k: {"max": max(v), "median": sorted(v)[len(v) // 2],
                                       "count": len(v)} for k, v in by_kind.items()},
                    **summarize(outcomes), "problems": problems, "ok": not problems}
        finally:
            if clients_running:
                clients_running.stop()
            sandbox.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--broker-restarts", type=int, default=1)
    parser.add_argument("--db-restarts", type=int, default=1)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args(argv)
    return report(run(args.kills, args.broker_restarts, args.db_restarts, args.clients))


if __name__ == "__main__":
    sys.exit(main())
