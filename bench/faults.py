"""Faults during load: the soak's clients run while the active worker is killed
(SIGKILL, a standby takes over), RabbitMQ is restarted, MariaDB is restarted,
MariaDB refuses writes for a while (read_only, as a failover or an operator sets it),
and the pool passes to a worker whose wall clock runs 7 h fast (libfaketime).

    python -m bench.faults [--kills 20] [--broker-restarts 1] [--db-restarts 1]
                           [--db-read-only 1] [--clock-jumps 1]

After each fault: the invariants hold and the pool answers again (the time it
took is the failover/recovery time; for a read-only window, from the moment
writes came back). At the end: no client hung past its deadline, no worker
dead-lettered a request, and the soak's database and client checks pass. The
run has a private MariaDB and a private RabbitMQ node of its own
(bench/private.py, on free ports, removed at the end): the faults never touch the
machine's shared services, so it may run beside other work. The workers log in
to MariaDB as a user without SUPER (bench/db_refusals.py), whom read_only stops.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from bench.db_refusals import add_worker_user, set_read_only
from bench.env import Sandbox, add_nodes
from bench.faked_clock import wall_clock_off_by
from bench.private import PrivateMariaDB, PrivateRabbitMQ
from bench.soak import Clients, check_clients, check_database, report, summarize, wait_settled

# Longest a client call may take: allocate's wait + grace + a reconnect-and-cancel, or a timeout.
LONGEST_CALL = 5.0 + 5.0 + 30.0 + 60.0
READ_ONLY_SECONDS = 15.0  # how long a read-only window lasts (the incident of issue 20: 15 s)


def kill_active_worker(sandbox, start_worker=None) -> None:
    """SIGKILL the active worker; start_worker() (default sandbox.start_worker) starts
    the next standby."""
    holder = sandbox.sql("SELECT holder FROM worker_meta")[0][0]
    index = int(holder.rsplit("-", 1)[1]) if holder.startswith("bench-") else 0
    worker = sandbox.workers[index]
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    (start_worker or sandbox.start_worker)()  # the next standby


FAST_CLOCK = "+7h"  # longer than the default 6 h lease: a host clock would expire them all


def clock_jump(sandbox, worker_env: dict) -> None:
    """The pool passes to a worker whose wall clock runs FAST_CLOCK ahead (libfaketime):
    it is started as a standby, then every other worker is killed (SIGKILL), and a
    standby with the machine's clock is started after it. Leases, waits and queue order
    must not notice (they follow the database's clock)."""
    before = {worker.pid for worker in sandbox.workers if worker.poll() is None}
    fast = sandbox.start_worker(env={**worker_env, **wall_clock_off_by(FAST_CLOCK)})
    fast_id = f"bench-{sandbox.workers.index(fast)}"
    deadline = time.time() + 60
    while not sandbox.sql("SELECT 1 FROM worker_heartbeats WHERE worker_id = :w", w=fast_id):
        if time.time() > deadline or fast.poll() is not None:
            raise RuntimeError(f"the fast-clock worker {fast_id} never said it stands by")
        time.sleep(0.1)
    for worker in sandbox.workers:
        if worker.pid in before:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
    sandbox.start_worker(env=worker_env)
    while sandbox.sql("SELECT holder FROM worker_meta")[0][0] != fast_id:
        if time.time() > deadline + 60 or fast.poll() is not None:
            raise RuntimeError(f"the fast-clock worker {fast_id} did not take over")
        time.sleep(0.1)


def restart_broker(rabbit: PrivateRabbitMQ) -> None:
    rabbit.restart()  # stop_app/start_app: every connection drops, durable queues stay


def restart_database(mariadb: PrivateMariaDB) -> None:
    mariadb.restart()


def read_only_database(mariadb: PrivateMariaDB, seconds: float = READ_ONLY_SECONDS) -> float:
    """Writes refused for `seconds` (SET GLOBAL read_only on the private server; reads go
    on); returns the time.time() at which they came back."""
    set_read_only(mariadb, True)
    try:
        time.sleep(seconds)  # the window itself, not a wait for a condition
    finally:
        set_read_only(mariadb, False)
    return time.time()


def logged(sandbox, event: str) -> int:
    """How many times the sandbox's workers logged `event` (event=dead_lettered, say)."""
    return sum((sandbox.logdir / f"{sandbox.name}-{i}.log").read_text(errors="replace")
               .count(f"event={event} ") for i in range(len(sandbox.workers)))


def dead_letters(sandbox) -> int | None:
    """Messages in the dead-letter queue, whoever put them there (expired ones too)."""
    import pika

    from molteniron import protocol
    try:
        connection = pika.BlockingConnection(pika.URLParameters(sandbox.amqp_url))
    except pika.exceptions.AMQPError:
        return None
    try:
        return connection.channel().queue_declare(protocol.DEAD_LETTER_QUEUE,
                                                  passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0  # never declared: nothing was ever dead-lettered
    finally:
        if connection.is_open:
            connection.close()


def answered_again(sandbox, since: float, timeout: float = 120) -> float:
    """Seconds from `since` until a status request is answered."""
    from molteniron.clients.client import MoltenIronClient
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
        nodes: int = 20, seed: int = 7, db_read_only: int = 0, clock_jumps: int = 0) -> dict:
    plan = ["worker_kill"] * kills
    for kind, count in (("broker_restart", broker_restarts), ("db_restart", db_restarts),
                        ("db_read_only", db_read_only), ("clock_jump", clock_jumps)):
        for i in range(count):  # spread the restarts among the kills
            plan.insert((i + 1) * len(plan) // (count + 1), kind)
    seconds = 10 + 4 * kills + 25 * (broker_restarts + db_restarts + db_read_only
                                     + clock_jumps)
    with PrivateMariaDB() as mariadb, PrivateRabbitMQ() as rabbit:
        sandbox = Sandbox("faults", amqp_url=rabbit.url, db_url=mariadb.url, rabbitmqctl=rabbit.ctl)
        # The workers log in without SUPER (root would write on through read_only); the
        # checks read as root.
        worker_env = {"MOLTENIRON_DB_URL": add_worker_user(mariadb, sandbox.name)}
        start_worker = lambda: sandbox.start_worker(env=worker_env)  # noqa: E731
        faults = {"worker_kill": lambda: kill_active_worker(sandbox, start_worker),
                  "broker_restart": lambda: restart_broker(rabbit),
                  "db_restart": lambda: restart_database(mariadb),
                  "db_read_only": lambda: read_only_database(mariadb),
                  "clock_jump": lambda: clock_jump(sandbox, worker_env)}
        clients_running = None
        try:
            add_nodes(sandbox, nodes // 2, "a", prefix="a")  # the soak's two pools
            add_nodes(sandbox, nodes - nodes // 2, "b", prefix="b")
            for _ in range(2):
                start_worker()
            sandbox.wait_answering()
            names = {r[0] for r in sandbox.sql("SELECT name FROM nodes")}
            clients_running = Clients(sandbox.amqp_url, clients, seconds, seed)
            started = time.time()
            recoveries: list[dict] = []
            problems: list[str] = []
            for n, kind in enumerate(plan):
                time.sleep(max(0.0, started + 3 + n * (seconds - 8) / len(plan) - time.time()))
                at = time.time()
                # db_read_only returns its window's end; the others return once they are done
                ended = faults[kind]()
                recovered = answered_again(sandbox, at if ended is None else ended)
                recoveries.append({"fault": kind, "recovered_s": round(recovered, 2)})
                problems += [f"after {kind} #{n}: {p}"
                             for p in check_database(sandbox, names, False)]
            outcomes = clients_running.finish()
            wait_settled(sandbox)
            problems += check_database(sandbox, names, settled=True)
            problems += check_clients(sandbox, outcomes)
            slow = [o for o in outcomes if o.finished - o.started > LONGEST_CALL]
            problems += [f"{o.client} {o.op} took {o.finished - o.started:.1f}s" for o in slow]
            dead_lettered = logged(sandbox, "dead_lettered")
            held = logged(sandbox, "db_refuses_writes")  # a line per retry of a held batch
            if dead_lettered:
                problems.append(f"the workers dead-lettered {dead_lettered} request(s)")
            if db_read_only and not held:
                problems.append("no worker met the read-only windows: do they log in as root?")
            expired = logged(sandbox, "lease_expired")  # leases last 6 h: none may end here
            if expired:
                problems.append(f"{expired} lease expiries logged in a run of {seconds} s")
            by_kind: dict[str, list[float]] = {}
            for r in recoveries:
                by_kind.setdefault(r["fault"], []).append(r["recovered_s"])
            return {"clients": clients, "seconds": seconds, "faults": len(plan),
                    "recovery_s": {k: {"max": max(v), "median": sorted(v)[len(v) // 2],
                                       "count": len(v)} for k, v in by_kind.items()},
                    **summarize(outcomes), "dead_letters": dead_letters(sandbox),
                    "db_refuses_writes_logged": held,
                    "problems": problems, "ok": not problems}
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
    parser.add_argument("--db-read-only", type=int, default=1,
                        help=f"windows of {READ_ONLY_SECONDS:g} s with MariaDB read-only")
    parser.add_argument("--clock-jumps", type=int, default=1,
                        help=f"takeovers by a worker whose wall clock runs {FAST_CLOCK} ahead")
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args(argv)
    return report(run(args.kills, args.broker_restarts, args.db_restarts, args.clients,
                      db_read_only=args.db_read_only, clock_jumps=args.clock_jumps))


if __name__ == "__main__":
    sys.exit(main())
