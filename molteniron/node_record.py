"""A node as the worker keeps it in memory (workers/state.py PoolState.nodes) and as
replies show it.

A typed record, not a dict: a misspelt field is an error mypy reports, not a
KeyError in a running worker. Times are kept as the ISO text replies carry
(seconds), so rendering a reply converts nothing; the worker compares them as text.
PoolState hands out the records themselves, not copies: a reply is rendered from
them (to_reply, compat.nodes_reply) before the pool changes again. Like compat.py,
which names this type, it imports no SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from molteniron.models import Node


@dataclass(slots=True)
class NodeRecord:
    id: int
    name: str
    ipmi_ip: str
    ipmi_user: str
    ipmi_password: str
    port_hwaddr: str
    cpu_arch: str
    cpus: int
    ram_mb: int
    disk_gb: int
    allocation_pool: list[str]
    state: str  # a models.State's value
    owner: str | None
    holder_user: str | None
    allocated_at: str | None
    lease_expires_at: str | None
    node_pool: str
    extra: dict[str, Any]
    tags: list[str]
    maintenance_reason: str | None
    clean_claim: str | None  # the cleaner's token, "cleaner#random" (molteniron/cleaning.py)
    clean_claimed_until: str | None

    @property
    def clean_claimed_by(self) -> str | None:
        """The cleaner's part of clean_claim (None: unclaimed)."""
        return self.clean_claim.rpartition("#")[0] if self.clean_claim else None

    @classmethod
    def from_node(cls, node: Node) -> NodeRecord:
        """The record of an ORM node, as the database holds it."""
        return cls(
            id=node.id, name=node.name, ipmi_ip=node.ipmi_ip, ipmi_user=node.ipmi_user,
            ipmi_password=node.ipmi_password, port_hwaddr=node.port_hwaddr,
            cpu_arch=node.cpu_arch, cpus=node.cpus, ram_mb=node.ram_mb, disk_gb=node.disk_gb,
            allocation_pool=[ip.ip for ip in node.ips], state=node.state.value,
            owner=node.owner, holder_user=node.holder_user,
            allocated_at=iso(node.allocated_at), lease_expires_at=iso(node.lease_expires_at),
            node_pool=node.node_pool, extra=dict(node.extra or {}), tags=list(node.tags or []),
            maintenance_reason=node.maintenance_reason, clean_claim=node.clean_claim,
            clean_claimed_until=iso(node.clean_claimed_until))

    def to_reply(self) -> dict[str, Any]:
        """The node as replies carry it (status), keys in this order. Its lists and extra are
        the record's own: nothing changes them in place (a refresh makes a new record)."""
        return {
            "id": self.id, "name": self.name, "ipmi_ip": self.ipmi_ip,
            "ipmi_user": self.ipmi_user, "ipmi_password": self.ipmi_password,
            "port_hwaddr": self.port_hwaddr, "cpu_arch": self.cpu_arch, "cpus": self.cpus,
            "ram_mb": self.ram_mb, "disk_gb": self.disk_gb,
            "allocation_pool": self.allocation_pool, "state": self.state,
            "owner": self.owner, "holder_user": self.holder_user,
            "allocated_at": self.allocated_at, "lease_expires_at": self.lease_expires_at,
            "node_pool": self.node_pool, "extra": self.extra, "tags": self.tags,
            "maintenance_reason": self.maintenance_reason, "clean_claim": self.clean_claim,
            "clean_claimed_by": self.clean_claimed_by,
            "clean_claimed_until": self.clean_claimed_until,
        }


def iso(moment: datetime | None) -> str | None:
    """A time as records and replies show it (seconds), or None."""
    return moment.isoformat(timespec="seconds") if moment is not None else None
