"""A RabbitMQ cluster of our own (3 nodes by default), for tests that kill broker nodes.

Started beside the machine's node (rabbit@localhost, :5672) as DESIGN.md ("Private
services for tests that break things") describes: each node is a bench.private
PrivateRabbitMQ with its own ports and folder under one temp dir, all sharing one
cookie of their own, joined to the first with stop_app/join_cluster/start_app, and
killed or stopped by its own pid, never touching the shared node.

    with PrivateRabbitCluster() as cluster:
        amqp_url = cluster.url_for("/")         # the 3 nodes' URLs, comma-joined
        cluster.kill(cluster.leader("molteniron.requests"))

Node names are mi1-<random>..mi3-<random>@localhost: two clusters (two test runs on one
machine) must not register the same name with the shared epmd.

Measured here (2 cores, beside other work): three nodes booted in parallel and joined in
about 19 s; a killed node started again is back in the cluster in about 7 s; stopping
all three takes about 4 s. A quorum queue had a new leader 0.6 s after kill -9 of its own.
"""

from __future__ import annotations

import json
import secrets
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.env import vhost_url
from bench.private import PrivateRabbitMQ, _Private, wait_for

JOIN_TIMEOUT = 120.0  # seconds a restarted member may take to be running in the cluster again


class PrivateRabbitCluster(_Private):
    """`size` RabbitMQ nodes on free ports in one cluster; guest/guest on loopback."""

    def __init__(self, size: int = 3):
        self.dir = Path(tempfile.mkdtemp(prefix="mi-rabbit-cluster-"))
        suffix, cookie = secrets.token_hex(3), secrets.token_hex(16).upper()
        self.nodes = [PrivateRabbitMQ(name=f"mi{i + 1}-{suffix}", directory=self.dir / f"mi{i + 1}",
                                      cookie=cookie) for i in range(size)]
        self.killed: set[int] = set()

    # --- addresses -------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """The nodes' Erlang names (mi1-...@localhost, ...), in index order."""
        return [node.node for node in self.nodes]

    def urls_for(self, vhost: str, order: list[int] | None = None) -> list[str]:
        """The nodes' URLs for `vhost`, in `order` (node indexes; default: all, in index order)."""
        indexes = range(len(self.nodes)) if order is None else order
        return [vhost_url(self.nodes[i].url, vhost) for i in indexes]

    def url_for(self, vhost: str, order: list[int] | None = None) -> str:
        """Those URLs comma-joined: an amqp_url with failover."""
        return ",".join(self.urls_for(vhost, order))

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> PrivateRabbitCluster:
        # The nodes boot in parallel (about 4 s each here), then join the first one by one.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for started in [pool.submit(node.start) for node in self.nodes]:
                started.result()
        first = self.names[0]
        for index in range(1, len(self.nodes)):
            self.ctl(index, "stop_app")
            self.ctl(index, "join_cluster", first)
            self.ctl(index, "start_app")
        self.wait_running()
        return self

    def _stop_service(self) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for stopped in [pool.submit(node._stop_service) for node in self.nodes]:
                stopped.result()

    # --- control and faults ------------------------------------------------------

    def ctl(self, index: int, *args: str, timeout: float = 120) -> str:
        """rabbitmqctl against node `index`; RuntimeError if it fails."""
        return self.nodes[index].ctl(*args, timeout=timeout)

    def alive(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if i not in self.killed]

    def running_nodes(self, index: int | None = None) -> list[str]:
        """The cluster's running nodes as node `index` (default: the first live one) sees them."""
        index = self.alive()[0] if index is None else index
        status = json.loads(self.ctl(index, "cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def wait_running(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Until every live node sees exactly the live nodes running."""
        expected = sorted(self.names[i] for i in self.alive())

        def formed() -> bool:
            try:
                return all(self.running_nodes(i) == expected for i in self.alive())
            except RuntimeError:  # a node still booting refuses rabbitmqctl: ask again
                return False
        wait_for(formed, timeout, f"rabbitmq nodes {expected} running in one cluster", 0.5)

    def leader(self, queue: str, vhost: str = "/") -> int:
        """The index of the node leading quorum queue `queue`, as a live node reports it;
        LookupError if no such queue or its leader is not known."""
        listed = json.loads(self.ctl(self.alive()[0], "list_queues", "-p", vhost, "name", "leader",
                                     "--formatter", "json"))
        for row in listed:
            if row["name"] == queue and row.get("leader") in self.names:
                return self.names.index(row["leader"])
        raise LookupError(f"no leader known for queue {queue!r} in vhost {vhost!r}: {listed}")

    def kill(self, index: int) -> None:
        """kill -9 node `index`."""
        self.nodes[index].kill()
        self.killed.add(index)

    def revive(self, index: int) -> None:
        """Start a killed node again on its ports and data; wait until it is back in the cluster."""
        self.nodes[index].start()
        self.killed.discard(index)
        self.wait_running()

    def heal(self) -> None:
        """Every node running in the cluster again, whatever was killed before."""
        for index in sorted(self.killed):
            self.nodes[index].start()
        self.killed.clear()
        self.wait_running()
