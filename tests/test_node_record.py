"""The worker's node record (molteniron/node_record.py) shows a node on the wire exactly
as the dict it replaced did: clients and stored replies read that shape.

The reference functions below are the dict versions as they were before NodeRecord
(molteniron/pool.py node_record, molteniron/compat.py blob, node_json, without_secrets),
kept here unchanged as the oracle.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from typing import get_type_hints

import pytest
from sqlalchemy import select

from molteniron import compat, inventory, pool
from molteniron.models import Node, NodeIP, State
from molteniron.node_record import NodeRecord

ALLOCATED_AT = datetime(2024, 3, 4, 5, 6, 7, 890123)
LEASE_ENDS = datetime(2024, 3, 4, 11, 6, 7, 5)
CLAIM_ENDS = datetime(2024, 3, 4, 6, 0, 0, 999999)


# --- the dict versions, as they were -------------------------------------------------

HARDWARE_FIELDS = ("ipmi_user", "ipmi_password", "port_hwaddr", "cpu_arch",
                   "cpus", "ram_mb", "disk_gb")
HIDDEN = "********"
HIDDEN_IN_STATUS = ("ipmi_password", "clean_claim")


def old_node_record(node: Node) -> dict:
    return {
        "id": node.id, "name": node.name, "ipmi_ip": node.ipmi_ip,
        **{f: getattr(node, f) for f in HARDWARE_FIELDS},
        "allocation_pool": [ip.ip for ip in node.ips],
        "state": node.state.value, "owner": node.owner, "holder_user": node.holder_user,
        "allocated_at": pool.field_value(node, "allocated_at"),
        "lease_expires_at": pool.field_value(node, "lease_expires_at"),
        "node_pool": node.node_pool, "extra": dict(node.extra or {}),
        "tags": list(node.tags or []), "maintenance_reason": node.maintenance_reason,
        "clean_claim": node.clean_claim,
        "clean_claimed_by": node.clean_claim.rpartition("#")[0] if node.clean_claim else None,
        "clean_claimed_until": (node.clean_claimed_until.isoformat(timespec="seconds")
                                if node.clean_claimed_until else None),
    }


def old_blob(record: dict) -> dict:
    fields = {k: record[k] for k in HARDWARE_FIELDS if k in record}
    fields.update(record.get("extra") or {})
    return fields


def old_node_json(record: dict) -> dict:
    return {
        "id": record["id"], "name": record["name"], "ipmi_ip": record["ipmi_ip"],
        "blob": json.dumps(old_blob(record)),
        "allocation_pool": ",".join(record["allocation_pool"]),
        "status": record["state"], "provisioned": record["owner"] or "",
        "timestamp": record["allocated_at"], "node_pool": record["node_pool"],
        "lease_expires_at": record.get("lease_expires_at"),
    }


def old_without_secrets(record: dict) -> dict:
    return {k: (HIDDEN if k in HIDDEN_IN_STATUS and v else v) for k, v in record.items()}


# --- nodes in every shape the pool holds ---------------------------------------------

def node(node_id: int, state: State, **fields) -> Node:
    """A node as the ORM loads it (not in a session: no database needed)."""
    made = Node(id=node_id, name=f"node-{node_id}", ipmi_ip=f"10.0.0.{node_id}",
                ipmi_user="admin", ipmi_password="hunter2", port_hwaddr="52:54:00:aa:bb:cc",
                cpu_arch="x86_64", cpus=8, ram_mb=16384, disk_gb=500, node_pool="gpu",
                state=state, owner=None, holder_user=None, allocated_at=None,
                lease_expires_at=None, extra={}, tags=[], maintenance_reason=None,
                clean_claim=None, clean_claimed_until=None)
    made.ips = [NodeIP(position=i, ip=f"10.1.{node_id}.{i}") for i in range(2)]
    for key, value in fields.items():
        setattr(made, key, value)
    return made


NODES = {
    "ready": lambda: node(1, State.READY),
    "allocated, extra keys overriding a hardware field, tags": lambda: node(
        2, State.ALLOCATED, owner="job-7", holder_user="ci", allocated_at=ALLOCATED_AT,
        lease_expires_at=LEASE_ENDS, extra={"rack": "r1", "cpus": "many", "n": [1, 2]},
        tags=["gpu", "fast"], maintenance_reason="disk"),
    "dirty, claimed by a cleaner": lambda: node(
        3, State.DIRTY, clean_claim="cleaner-1#0123abcd", clean_claimed_until=CLAIM_ENDS),
    "maintenance, no password, no ips, null JSON columns": lambda: node(
        4, State.MAINTENANCE, ipmi_password="", ips=[], extra=None, tags=None,
        maintenance_reason="cleaning failed: fan"),
}


@pytest.fixture(params=list(NODES))
def some_node(request) -> Node:
    return NODES[request.param]()


# --- the wire shape ------------------------------------------------------------------

def test_the_reply_shape_is_the_old_record_dict_key_for_key(some_node):
    shown = NodeRecord.from_node(some_node).to_reply()
    old = old_node_record(some_node)
    assert list(shown.items()) == list(old.items())  # the same keys, in the same order
    assert json.dumps(shown) == json.dumps(old)      # and the same bytes on the wire


def test_a_record_has_a_typed_attribute_for_every_key_of_its_reply(some_node):
    record = NodeRecord.from_node(some_node)
    shown = record.to_reply()
    hints = get_type_hints(NodeRecord)  # what mypy reads: the fields...
    assert list(hints) == [f.name for f in dataclasses.fields(NodeRecord)]
    derived = {name: get_type_hints(member.fget)["return"]  # ...and the derived ones
               for name, member in vars(NodeRecord).items() if isinstance(member, property)}
    assert set(shown) == set(hints) | set(derived)
    for key, value in shown.items():
        assert getattr(record, key) == value, key


def test_replies_rendered_from_records_are_the_old_replies_byte_for_byte(some_node):
    record, old = NodeRecord.from_node(some_node), old_node_record(some_node)
    assert json.dumps(compat.nodes_reply([record])) == json.dumps(
        {"status": 200, "nodes": {f"node_{old['id']}": old_node_json(old)}})
    assert json.dumps(compat.without_secrets(record)) == json.dumps(old_without_secrets(old))
    assert compat.record_blob(record) == compat.blob(record.to_reply())
    assert list(compat.record_blob(record)) == list(compat.blob(record.to_reply()))


def test_an_export_entry_is_the_old_one(some_node):
    record, old = NodeRecord.from_node(some_node), old_node_record(some_node)
    for show_secrets in (False, True):
        entry = inventory.entry_of(record, show_secrets)
        expected = {key: old[key] for key in inventory.FIELDS}
        if not show_secrets and expected["ipmi_password"]:
            expected["ipmi_password"] = HIDDEN
        assert list(entry.items()) == list(expected.items())


def test_a_record_of_a_node_read_back_from_the_database(session):
    added = pool.add_baremetal(session, "db-node", "10.0.0.9", ipmi_user="admin",
                               ipmi_password="s3cret", allocation_pool="10.1.0.1,10.1.0.2",
                               port_hwaddr="52:54:00:aa:bb:cc", cpu_arch="x86_64", cpus=4,
                               ram_mb=2048, disk_gb=40, extra={"rack": "r9"}, tags="b,a")
    session.commit()
    session.expunge_all()
    loaded = session.scalar(select(Node).where(Node.id == added.id))
    assert loaded is not None
    assert list(NodeRecord.from_node(loaded).to_reply().items()) == list(
        old_node_record(loaded).items())
