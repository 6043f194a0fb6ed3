"""The original MoltenIron's reply shapes (DESIGN.md, Compatibility), from records of real nodes.

Jenkins hooks read these with jq, so key names, nesting and value types are
asserted exactly.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from molteniron import compat, errors, pool
from molteniron.models import Node
from molteniron.node_record import NodeRecord
from molteniron.workers.state import PoolState

HARDWARE = ("ipmi_user", "ipmi_password", "port_hwaddr", "cpu_arch", "cpus", "ram_mb",
            "disk_gb")
WHEN = datetime(2024, 3, 4, 5, 6, 7, 890123)
LEASE_ENDS = WHEN + timedelta(hours=6)


def add(session, name, node_pool="default", password="hunter2-secret", **kw):
    args = dict(ipmi_ip=f"10.0.0.{len(name)}", ipmi_user="admin", ipmi_password=password,
                allocation_pool="10.1.0.1,10.1.0.2", port_hwaddr="52:54:00:aa:bb:cc",
                cpu_arch="x86_64", cpus=8, ram_mb=16384, disk_gb=500, node_pool=node_pool)
    args.update(kw)
    return pool.add_baremetal(session, name, **args)


def allocate(session, owner, count, node_pool="default", now=WHEN):
    """Allocate as the worker does (PoolState, then its flush) and commit; return the nodes."""
    state = PoolState()
    state.load(session)
    records = state.allocate(owner, count, node_pool, None, now, now + timedelta(hours=6))
    state.flush(session, now)
    session.commit()
    return list(session.scalars(select(Node).where(Node.id.in_([r.id for r in records]))
                                .order_by(Node.id)))


@pytest.fixture
def allocated(session):
    """Two nodes allocated to "job-7" in pool "gpu" at WHEN for 6 hours, plus one ready node."""
    add(session, "n1", "gpu", allocation_pool="10.1.0.1,10.1.0.2")
    add(session, "n2", "gpu", allocation_pool="10.2.0.1")
    add(session, "spare", "gpu")
    session.commit()
    return allocate(session, "job-7", 2, node_pool="gpu")


def test_nodes_reply_shape_matches_the_original(session, allocated):
    n1, n2 = allocated
    reply = compat.nodes_reply([NodeRecord.from_node(n) for n in allocated])
    assert set(reply) == {"status", "nodes"}
    assert reply["status"] == 200
    assert list(reply["nodes"]) == [f"node_{n1.id}", f"node_{n2.id}"]
    first = reply["nodes"][f"node_{n1.id}"]
    assert set(first) == {"id", "name", "ipmi_ip", "blob", "allocation_pool", "status",
                          "provisioned", "timestamp", "node_pool", "lease_expires_at"}
    assert first["id"] == n1.id and isinstance(first["id"], int)
    assert first["name"] == "n1"
    assert first["ipmi_ip"] == "10.0.0.2"
    assert first["allocation_pool"] == "10.1.0.1,10.1.0.2"
    assert reply["nodes"][f"node_{n2.id}"]["allocation_pool"] == "10.2.0.1"
    assert first["status"] == "allocated"
    assert first["provisioned"] == "job-7"
    assert first["node_pool"] == "gpu"
    assert isinstance(first["timestamp"], str)
    assert datetime.fromisoformat(first["timestamp"]) == WHEN.replace(microsecond=0)
    assert first["lease_expires_at"] == LEASE_ENDS.isoformat(timespec="seconds")


def test_nodes_reply_blob_is_a_json_string_of_the_hardware_fields(session, allocated):
    reply = compat.nodes_reply([NodeRecord.from_node(allocated[0])])
    blob = reply["nodes"][f"node_{allocated[0].id}"]["blob"]
    assert isinstance(blob, str)
    assert json.loads(blob) == {"ipmi_user": "admin", "ipmi_password": "hunter2-secret",
                                "port_hwaddr": "52:54:00:aa:bb:cc", "cpu_arch": "x86_64",
                                "cpus": 8, "ram_mb": 16384, "disk_gb": 500}
    assert list(json.loads(blob)) == list(HARDWARE)


def test_nodes_reply_blob_includes_extra_keys(session):
    pool.add_json_blob(session, "x1", "10.0.0.1", "10.1.0.1",
                       {"cpus": 2, "ipmi_user": "u", "rack": "r4"})
    session.commit()
    node = allocate(session, "job", 1)[0]
    blob = json.loads(compat.nodes_reply([NodeRecord.from_node(node)])
                      ["nodes"][f"node_{node.id}"]["blob"])
    assert blob["rack"] == "r4"
    assert blob["cpus"] == 2 and blob["ipmi_user"] == "u"
    assert set(HARDWARE) <= set(blob)


def test_nodes_reply_is_json_serializable_and_round_trips(session, allocated):
    reply = compat.nodes_reply([NodeRecord.from_node(n) for n in allocated])
    assert json.loads(json.dumps(reply)) == reply


def test_node_json_of_a_ready_node(session):
    node = add(session, "n1")
    session.commit()
    item = compat.node_json(NodeRecord.from_node(node))
    assert item["status"] == "ready"
    assert item["provisioned"] == ""
    assert item["timestamp"] is None
    assert item["lease_expires_at"] is None


def test_nodes_reply_empty(session):
    assert compat.nodes_reply([]) == {"status": 200, "nodes": {}}


def test_field_reply_shape(session, allocated):
    n1, n2 = allocated
    reply = compat.field_reply(pool.get_field(session, "job-7", "port_hwaddr"))
    assert reply == {"status": 200, "result": [
        {"id": n1.id, "field": "52:54:00:aa:bb:cc"},
        {"id": n2.id, "field": "52:54:00:aa:bb:cc"}]}
    assert compat.field_reply(pool.get_field(session, "job-7", "cpus"))["result"][0] == {
        "id": n1.id, "field": 8}
    assert json.loads(json.dumps(reply)) == reply


def test_error_reply_shape():
    reply = errors.OwnerNotFound("job does not own any nodes").to_reply()
    assert reply["status"] == 404
    assert reply["message"] == "job does not own any nodes"
    rebuilt = errors.from_reply(reply)
    assert isinstance(rebuilt, errors.OwnerNotFound) and rebuilt.status == 404
    assert errors.from_reply({"status": 409, "message": "m"}).status == 409


# --- status tables -------------------------------------------------------------------

def records(session) -> list[NodeRecord]:
    """Every node's record as the worker's status reads them: from its PoolState."""
    state = PoolState()
    state.load(session)
    return [state.nodes[i] for i in sorted(state.nodes)]


def shown(session):
    """Every node as a status reply carries it, with its password: what the CLI prints."""
    return [record.to_reply() for record in records(session)]


NOW = WHEN.replace(microsecond=0) + timedelta(hours=1, minutes=2, seconds=3)


def test_status_human_table(session, allocated):
    n1, n2 = allocated
    text = compat.status_text(shown(session), baremetal=False, table_type="human", now=NOW)
    lines = text.splitlines()
    assert len(lines) == 4 + 3                       # rule, header, rule, 3 rows, rule
    assert len({len(line) for line in lines}) == 1   # columns aligned
    header = [c.strip() for c in lines[1].strip("+").split("+")]
    assert header == ["id", "name", "ipmi_ip", "blob", "status", "provisioned", "time",
                      "node_pool", "lease_ends"]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[3:6]]
    assert rows[0][:3] == [str(n1.id), "n1", "10.0.0.2"]
    assert json.loads(rows[0][3])["cpus"] == 8
    assert rows[0][4:] == ["allocated", "job-7", "1:02:03", "gpu", "2024-03-04T11:06:07"]
    assert rows[2][1] == "spare"
    assert rows[2][4:] == ["ready", "", "", "gpu", ""]


def test_status_baremetal_human_lists_hardware_columns(session, allocated):
    text = compat.status_text(shown(session), baremetal=True, table_type="human", now=NOW)
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    header = [c.strip() for c in lines[1].strip("+").split("+")]
    assert header == ["id", "name", "ipmi_ip", *HARDWARE, "status", "provisioned", "time",
                      "node_pool", "lease_ends"]
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[1:15] == ["n1", "10.0.0.2", "admin", "hunter2-secret", "52:54:00:aa:bb:cc",
                           "x86_64", "8", "16384", "500", "allocated", "job-7", "1:02:03",
                           "gpu", "2024-03-04T11:06:07"]


def test_status_table_widens_for_long_values(session):
    add(session, "a-very-long-node-name-that-exceeds-the-default-width")
    session.commit()
    lines = compat.status_text(shown(session), False, "human").splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "a-very-long-node-name-that-exceeds-the-default-width" in lines[3]


def test_status_csv(session, allocated):
    n1, n2 = allocated
    text = compat.status_text(shown(session), baremetal=False, table_type="csv", now=NOW)
    header, *rows = csv.reader(io.StringIO(text))
    assert header == ["id", "name", "ipmi_ip", "blob", "status", "provisioned", "time",
                      "node_pool", "lease_ends"]
    assert len(rows) == 3
    assert rows[0][:3] == [str(n1.id), "n1", "10.0.0.2"]
    assert json.loads(rows[0][3])["cpus"] == 8   # the blob's commas and quotes are quoted
    assert rows[0][4:] == ["allocated", "job-7", "1:02:03", "gpu", "2024-03-04T11:06:07"]
    assert rows[1][:2] == [str(n2.id), "n2"]
    assert rows[2][4:] == ["ready", "", "", "gpu", ""]


def test_status_baremetal_csv(session, allocated):
    n1 = allocated[0]
    lines = compat.status_text(shown(session), True, "csv", now=NOW).splitlines()
    assert len(lines) == 1 + 3
    assert lines[0] == ("id,name,ipmi_ip,ipmi_user,ipmi_password,port_hwaddr,cpu_arch,cpus,"
                        "ram_mb,disk_gb,status,provisioned,time,node_pool,lease_ends")
    assert lines[1] == (f"{n1.id},n1,10.0.0.2,admin,hunter2-secret,52:54:00:aa:bb:cc,x86_64,"
                        "8,16384,500,allocated,job-7,1:02:03,gpu,2024-03-04T11:06:07")


def test_status_csv_quotes_commas_quotes_and_newlines():
    record = {"id": 1, "name": 'odd, "quoted"\nname', "ipmi_ip": "10.0.0.1",
              "ipmi_user": "a,b", "ipmi_password": "", "port_hwaddr": "", "cpu_arch": "",
              "cpus": 1, "ram_mb": 2, "disk_gb": 3, "extra": {}, "state": "ready",
              "owner": None, "allocated_at": None, "node_pool": "default",
              "lease_expires_at": None}
    text = compat.status_text([record], True, "csv", now=NOW)
    header, row = csv.reader(io.StringIO(text))
    assert row[:4] == ["1", 'odd, "quoted"\nname', "10.0.0.1", "a,b"]
    assert len(row) == len(header)


@pytest.mark.parametrize("baremetal", [False, True])
@pytest.mark.parametrize("table_type", ["human", "csv"])
def test_status_without_secrets_never_prints_the_password(session, allocated, baremetal,
                                                          table_type):
    raw = records(session)
    with_password = compat.status_text([r.to_reply() for r in raw], baremetal, table_type,
                                       now=NOW)
    assert "hunter2-secret" in with_password       # the record holds it, so it is printed
    hidden = compat.status_text([compat.without_secrets(r) for r in raw], baremetal,
                                table_type, now=NOW)
    assert "hunter2-secret" not in hidden
    assert compat.HIDDEN in hidden
    assert hidden.count("\n") == with_password.count("\n")


def test_without_secrets_only_hides_the_password(session):
    node = add(session, "n1")
    session.commit()
    record = NodeRecord.from_node(node)
    clean = compat.without_secrets(record)
    assert clean["ipmi_password"] == compat.HIDDEN
    assert {k: v for k, v in clean.items() if k != "ipmi_password"} == {
        k: v for k, v in record.to_reply().items() if k != "ipmi_password"}
    assert record.ipmi_password == "hunter2-secret"     # the input is not changed
    empty = compat.without_secrets(NodeRecord.from_node(add(session, "n2", password="")))
    assert empty["ipmi_password"] == ""


def test_status_of_an_empty_pool(session):
    assert compat.status_text([], False, "csv") == (
        "id,name,ipmi_ip,blob,status,provisioned,time,node_pool,lease_ends")
    lines = compat.status_text([], False, "human").splitlines()
    assert len(lines) == 4
    assert [c.strip() for c in lines[1].strip("+").split("+")][-2:] == ["node_pool", "lease_ends"]
