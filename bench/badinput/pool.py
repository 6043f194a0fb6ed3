"""The pool the suite runs against: its layout, how it is filled, and its checksum.

Also the `status` barrier pool and IDLE, how long the worker may go without
progress before it counts as stuck; every phase waits on those.
"""

from __future__ import annotations

import hashlib
import time

from bench.env import Sandbox, pump
from molteniron import protocol
from molteniron.clients.client import MoltenIronClient

IDLE = 5.0              # seconds without progress after which the worker counts as stuck
BARRIER_POOL = "badinput-barrier"                # a pool with no nodes: a cheap `status`
DEFAULT_NODES = [f"n{i}" for i in range(16)]
SPARE_NODES = [f"spare{i}" for i in range(4)]
OWNERS = ["owner-a", "owner-b", "owner-s"]


POOL_QUERIES = ("SELECT * FROM nodes ORDER BY id",
                "SELECT * FROM node_ips ORDER BY node_id, position",
                "SELECT * FROM allocations ORDER BY id",
                "SELECT * FROM waiting_requests ORDER BY id")


def pool_checksum(sandbox: Sandbox) -> str:
    """sha256 over every row of the pool's tables."""
    digest = hashlib.sha256()
    for query in POOL_QUERIES:
        digest.update(repr(sandbox.sql(query)).encode())
    return digest.hexdigest()


def populate(client: MoltenIronClient) -> None:
    """Spare nodes, owners holding some nodes, and one allocate waiting in pool spare."""
    for i, name in enumerate(SPARE_NODES):
        client.add_baremetal(name=name, ipmi_ip=f"10.200.0.{i}", ipmi_user="admin",
                             ipmi_password=f"pw-{i}", allocation_pool=f"10.201.0.{i}",
                             port_hwaddr=f"52:54:00:00:01:{i:02x}", cpu_arch="x86_64", cpus=4,
                             ram_mb=8192, disk_gb=100, node_pool="spare")
    client.allocate("owner-a", 3, wait=None)
    client.allocate("owner-b", 2, wait=None)
    client.allocate("owner-s", 1, node_pool="spare", wait=None)
    waiter = protocol.new_request("allocate", {"owner": "owner-w", "count": len(SPARE_NODES),
                                               "node_pool": "spare", "wait": True,
                                               "wait_seconds": 3600})
    client.send(waiter, 3600)
    deadline = time.monotonic() + IDLE * 2
    while not any(r.get("status") == protocol.QUEUED for r in client.replies[waiter.id]):
        if time.monotonic() > deadline:
            raise RuntimeError("the waiting allocate was not queued")
        pump(client, 0.05)
