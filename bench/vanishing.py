"""Growth under vanishing clients: N clients wait for nodes, each on a connection and a
reply queue of its own, then die at once (SIGKILL of the process that holds them).
How long until what they left in the database is gone again: their waiting rows
(cancelled within two ticks by the probe of every reply queue), grant_outbox (they
were granted nothing) and processed_requests (their cancelled replies, pruned after
reply_retention, short here).

    python -m bench.vanishing [--clients 1000] [--retention 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

from bench.env import ROOT, Sandbox, add_nodes

COUNTED = ("waiting_requests", "grant_outbox", "processed_requests")
CLIENTS_PER_CONNECTION = 50


def hold_waiters(amqp_url: str, clients: int) -> None:
    """The clients' side (a process of its own): each client, a channel with an exclusive
    reply queue of its own, sends one allocate that must wait; once every one is sent
    this process says so and sleeps. (Channels, CLIENTS_PER_CONNECTION to a connection:
    the machine's broker takes about 800 sockets.)"""
    import pika

    from molteniron import protocol
    connections = []
    for i in range(clients):
        if i % CLIENTS_PER_CONNECTION == 0:
            connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
            connections.append(connection)
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        request = protocol.new_request("allocate", {"owner": f"gone-{i}", "count": 1,
                                                    "wait_seconds": 3600})
        channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY,
                              request.to_body(),
                              pika.BasicProperties(reply_to=queue, correlation_id=request.id))
    print("sent", flush=True)
    while True:
        for connection in connections:  # keep heartbeats answered while waiting to die
            connection.process_data_events(0)
        time.sleep(1)


def counts(sandbox: Sandbox) -> dict[str, int]:
    return {table: sandbox.sql(f"SELECT COUNT(*) FROM {table}")[0][0] for table in COUNTED}


def run_vanishing(clients: int, retention: float, limit: float = 600) -> dict:
    sandbox = Sandbox("vanishing")
    holder = None
    try:
        config = sandbox.logdir / f"{sandbox.name}.yaml"
        config.write_text(f"reply_retention: {retention}\n")
        add_nodes(sandbox, 1)
        sandbox.start_worker(env={"MOLTENIRON_CONFIG": str(config)})
        sandbox.wait_answering()
        from molteniron.clients.client import MoltenIronClient
        with MoltenIronClient(sandbox.amqp_url, timeout=30) as client:
            client.allocate("holder", 1, wait=None)
        # The holder's grant leaves the outbox once the broker confirms it.
        _until(lambda: counts(sandbox)["grant_outbox"] == 0, limit, "the holder's grant")
        baseline = counts(sandbox)
        holder = subprocess.Popen([sys.executable, "-m", "bench.vanishing", "--hold",
                                   str(clients), sandbox.amqp_url], cwd=ROOT,
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None  # stdout=PIPE
        assert holder.stdout.readline().strip() == "sent"
        _until(lambda: counts(sandbox)["waiting_requests"] >= baseline["waiting_requests"]
               + clients, limit, "every client to wait")
        peak = counts(sandbox)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        # A table is back once it has grown (the gone clients' rows may come after the
        # kill: their cancelled replies) and shrunk to its baseline again.
        back: dict[str, float] = {}
        highest = dict(peak)
        while len(back) < len(COUNTED) and time.monotonic() - killed < limit:
            now = counts(sandbox)
            for table in COUNTED:
                highest[table] = max(highest[table], now[table])
                grew = highest[table] > baseline[table]
                if table not in back and grew and now[table] <= baseline[table]:
                    back[table] = round(time.monotonic() - killed, 2)
            if (now["waiting_requests"] <= baseline["waiting_requests"]
                    and highest["grant_outbox"] <= baseline["grant_outbox"]):
                back.setdefault("grant_outbox", 0.0)  # never grew: nothing was granted
            time.sleep(0.1)
        return {"clients": clients, "reply_retention_s": retention, "baseline": baseline,
                "peak": highest, "back_to_baseline_s": {t: back.get(t) for t in COUNTED}}
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        sandbox.close()


def _until(condition, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def render(result: dict) -> str:
    back, peak = result["back_to_baseline_s"], result["peak"]
    parts = [f"{table} peak {peak[table]} -> baseline in "
             f"{'never (within the limit)' if back[table] is None else str(back[table]) + ' s'}"
             for table in COUNTED]
    return (f"{result['clients']} clients killed mid-wait (reply_retention "
            f"{result['reply_retention_s']:g} s): " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vanishing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--retention", type=float, default=10.0,
                        help="the worker's reply_retention, seconds (default 10)")
    parser.add_argument("--hold", nargs=2, metavar=("CLIENTS", "AMQP_URL"),
                        help=argparse.SUPPRESS)  # the clients' own process
    args = parser.parse_args(argv)
    if args.hold:
        hold_waiters(args.hold[1], int(args.hold[0]))
        return 0
    result = run_vanishing(args.clients, args.retention)
    print(render(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
