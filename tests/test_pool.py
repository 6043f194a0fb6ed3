"""Pool operations against the real MariaDB: every success and every error path.

"Nothing changed" is always checked with fresh SQL through the same session
(which autoflushes anything the failed call left pending), never after a
rollback: pool functions promise to validate before they change anything.
Allocate and release are the worker's PoolState's (tests/test_state.py); here
they only put nodes in the hands of an owner, the way the worker does.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from molteniron import errors, pool
from molteniron.models import Allocation, EndReason, Node, NodeIP, State
from molteniron.node_record import NodeRecord
from molteniron.workers.state import PoolState

# --- helpers -----------------------------------------------------------------

def add(session, name, node_pool="default", **overrides):
    """Add one node with plausible hardware; keyword overrides replace any argument."""
    args = dict(ipmi_ip="10.0.0.1", ipmi_user="admin", ipmi_password="s3cret",
                allocation_pool="10.1.0.1,10.1.0.2", port_hwaddr="aa:bb:cc:dd:ee:ff",
                cpu_arch="x86_64", cpus=8, ram_mb=16384, disk_gb=500, node_pool=node_pool)
    args.update(overrides)
    return pool.add_baremetal(session, name, **args)


def add_many(session, count, node_pool="default", prefix="n"):
    return [add(session, f"{prefix}{i}", node_pool) for i in range(count)]


def snapshot(session):
    """Every node's row, IPs and every allocation row, read fresh from the database."""
    nodes = session.execute(select(
        Node.id, Node.name, Node.ipmi_ip, Node.ipmi_user, Node.ipmi_password,
        Node.port_hwaddr, Node.cpu_arch, Node.cpus, Node.ram_mb, Node.disk_gb,
        Node.node_pool, Node.state, Node.owner, Node.allocated_at, Node.extra,
    ).order_by(Node.id)).all()
    ips = session.execute(select(NodeIP.node_id, NodeIP.position, NodeIP.ip)
                          .order_by(NodeIP.node_id, NodeIP.position)).all()
    allocations = session.execute(select(
        Allocation.id, Allocation.node_id, Allocation.owner, Allocation.request_id,
        Allocation.ended_at, Allocation.end_reason).order_by(Allocation.id)).all()
    return [tuple(r) for r in nodes], [tuple(r) for r in ips], [tuple(r) for r in allocations]


def count_rows(session, model, *where):
    return session.scalar(select(func.count()).select_from(model).where(*where))


def row(session, node_id):
    """One node's columns read fresh (bypassing the identity map's attributes)."""
    return session.execute(select(Node.state, Node.owner, Node.allocated_at, Node.node_pool,
                                  Node.name).where(Node.id == node_id)).one()


def allocate(session, owner, count, node_pool="default", now=None) -> list[NodeRecord]:
    """Allocate as the worker does (PoolState, then its flush) and commit; return the records."""
    now = now or pool.utcnow()
    state = PoolState()
    state.load(session)
    records = state.allocate(owner, count, node_pool, None, now, now + timedelta(hours=6))
    state.flush(session, now)
    session.commit()
    return records


def release(session, owner):
    """Release every node of owner as the worker does, and commit."""
    state = PoolState()
    state.load(session)
    state.release_owner(owner, EndReason.RELEASED, pool.utcnow())
    state.flush(session, pool.utcnow())
    session.commit()


def open_allocations(session, **where):
    query = select(Allocation).where(Allocation.ended_at.is_(None))
    for key, value in where.items():
        query = query.where(getattr(Allocation, key) == value)
    return list(session.scalars(query.order_by(Allocation.node_id)))


# --- add_baremetal -------------------------------------------------------------

def test_add_baremetal_stores_every_field(session):
    node = pool.add_baremetal(session, "node-1", "10.0.0.9", "ipmiuser", "ipmipass",
                              "10.1.0.5,10.1.0.3,10.1.0.4", "52:54:00:12:34:56", "ppc64le",
                              16, 32768, 1000, "power")
    session.commit()
    session.expunge_all()
    stored = session.scalars(select(Node).where(Node.name == "node-1")).one()
    assert stored.id == node.id
    assert (stored.ipmi_ip, stored.ipmi_user, stored.ipmi_password, stored.port_hwaddr,
            stored.cpu_arch, stored.cpus, stored.ram_mb, stored.disk_gb, stored.node_pool) == (
        "10.0.0.9", "ipmiuser", "ipmipass", "52:54:00:12:34:56", "ppc64le", 16, 32768, 1000,
        "power")
    assert stored.state == State.READY
    assert stored.owner is None and stored.allocated_at is None
    assert stored.extra == {}
    # IPs keep the order they were given in, not sorted.
    assert [ip.ip for ip in stored.ips] == ["10.1.0.5", "10.1.0.3", "10.1.0.4"]
    assert session.execute(select(NodeIP.position, NodeIP.ip).where(NodeIP.node_id == node.id)
                           .order_by(NodeIP.position)).all() == [
        (0, "10.1.0.5"), (1, "10.1.0.3"), (2, "10.1.0.4")]


def test_add_baremetal_default_pool_is_default(session):
    node = pool.add_baremetal(session, "n1", "10.0.0.1", "u", "p", "10.1.0.1", "aa", "x86_64",
                              1, 2, 3)
    assert session.scalar(select(Node.node_pool).where(Node.id == node.id)) == "default"
    empty_pool = add(session, "n2", node_pool="")
    assert session.scalar(select(Node.node_pool).where(Node.id == empty_pool.id)) == "default"


def test_add_baremetal_accepts_integer_strings_and_ip_lists(session):
    node = add(session, "n1", cpus="4", ram_mb="2048", disk_gb="0",
               allocation_pool=[" 10.1.0.2", "10.1.0.1 "])
    assert session.execute(select(Node.cpus, Node.ram_mb, Node.disk_gb)
                           .where(Node.id == node.id)).one() == (4, 2048, 0)
    assert [ip.ip for ip in node.ips] == ["10.1.0.2", "10.1.0.1"]
    spaced = add(session, "n2", allocation_pool=" 10.2.0.1 , ,10.2.0.2,")
    assert session.scalars(select(NodeIP.ip).where(NodeIP.node_id == spaced.id)
                           .order_by(NodeIP.position)).all() == ["10.2.0.1", "10.2.0.2"]


def test_add_baremetal_duplicate_name_is_409_and_changes_nothing(session):
    add(session, "n1", ipmi_ip="10.0.0.1")
    session.commit()
    before = snapshot(session)
    with pytest.raises(errors.DuplicateNode) as info:
        add(session, "n1", ipmi_ip="10.9.9.9", allocation_pool="10.9.0.1")
    assert info.value.status == 409
    assert isinstance(info.value, errors.Conflict)
    assert "n1" in info.value.message
    assert snapshot(session) == before
    assert count_rows(session, Node) == 1
    assert count_rows(session, NodeIP) == 2


@pytest.mark.parametrize("field, value", [
    ("cpus", "x"), ("ram_mb", "lots"), ("disk_gb", None), ("cpus", 2.5), ("cpus", True),
    ("cpus", -1), ("ram_mb", -2048), ("disk_gb", 2**31),
])
def test_add_baremetal_bad_integer_is_400_and_changes_nothing(session, field, value):
    add(session, "existing")
    session.commit()
    before = snapshot(session)
    with pytest.raises(errors.BadRequest) as info:
        add(session, "n1", **{field: value})
    assert info.value.status == 400
    assert field in info.value.message
    assert snapshot(session) == before


@pytest.mark.parametrize("field, value", [
    ("name", ""), ("ipmi_ip", ""), ("name", "x" * 256), ("name", None), ("ipmi_user", ["a"]),
    ("allocation_pool", 7),
])
def test_add_baremetal_bad_text_is_400_and_changes_nothing(session, field, value):
    add(session, "existing")
    session.commit()
    before = snapshot(session)
    args = {"name": "n1", field: value}
    name = args.pop("name")
    with pytest.raises(errors.BadRequest) as info:
        add(session, name, **args)
    assert info.value.status == 400
    assert snapshot(session) == before


def test_add_baremetal_too_long_cpu_arch_is_400(session):
    with pytest.raises(errors.BadRequest):
        add(session, "n1", cpu_arch="a" * 256)


# --- add_keyvalue_pairs --------------------------------------------------------

def test_add_keyvalue_pairs_stores_fields_and_decodes_json_values(session):
    node = pool.add_keyvalue_pairs(
        session, "kv1", "10.0.0.1", "10.1.0.1,10.1.0.2",
        ['ipmi_user="user"', "ipmi_password=pa=ss", "port_hwaddr=de:ad:be:ef:00:01",
         "cpu_arch=x86_64", "cpus=8", 'ram_mb="4096"', "disk_gb=250",
         'rack="r12"', "slot=3", 'tags=["gpu","ssd"]'])
    session.commit()
    session.expunge_all()
    stored = session.get(Node, node.id)
    assert stored.ipmi_user == "user"          # the JSON string was decoded: no quotes
    assert stored.ipmi_password == "pa=ss"     # split at the first "=" only
    assert stored.port_hwaddr == "de:ad:be:ef:00:01"
    assert stored.cpu_arch == "x86_64"
    assert (stored.cpus, stored.ram_mb, stored.disk_gb) == (8, 4096, 250)
    assert stored.node_pool == "default"
    assert [ip.ip for ip in stored.ips] == ["10.1.0.1", "10.1.0.2"]
    # Unknown keys are kept in extra: quoted strings decoded, anything else as typed.
    assert stored.extra == {"rack": "r12", "slot": "3", "tags": '["gpu","ssd"]'}


def test_add_keyvalue_pairs_missing_hardware_fields_default_empty(session):
    node = pool.add_keyvalue_pairs(session, "kv1", "10.0.0.1", "10.1.0.1", ["cpus=2"])
    assert session.execute(select(
        Node.ipmi_user, Node.ipmi_password, Node.port_hwaddr, Node.cpu_arch, Node.cpus,
        Node.ram_mb, Node.disk_gb).where(Node.id == node.id)).one() == ("", "", "", "", 2, 0, 0)


def test_add_keyvalue_pairs_node_pool_argument_and_pair(session):
    a = pool.add_keyvalue_pairs(session, "kv1", "10.0.0.1", "10.1.0.1", ["cpus=1"], "poolA")
    b = pool.add_keyvalue_pairs(session, "kv2", "10.0.0.2", "10.1.0.2",
                                ["cpus=1", "node_pool=poolB"])
    assert session.scalar(select(Node.node_pool).where(Node.id == a.id)) == "poolA"
    assert session.scalar(select(Node.node_pool).where(Node.id == b.id)) == "poolB"
    assert session.scalar(select(Node.extra).where(Node.id == b.id)) == {}


@pytest.mark.parametrize("pairs", [["cpus=1", "novalue"], ["=5"], ["cpus=many"],
                                   ["ram_mb=-1"], ["disk_gb=1.5"]])
def test_add_keyvalue_pairs_bad_words_are_400_and_change_nothing(session, pairs):
    add(session, "existing")
    session.commit()
    before = snapshot(session)
    with pytest.raises(errors.BadRequest) as info:
        pool.add_keyvalue_pairs(session, "kv1", "10.0.0.1", "10.1.0.1", pairs)
    assert info.value.status == 400
    assert snapshot(session) == before


def test_add_keyvalue_pairs_word_without_equals_names_it(session):
    with pytest.raises(errors.BadRequest) as info:
        pool.add_keyvalue_pairs(session, "kv1", "10.0.0.1", "10.1.0.1", ["cpus"])
    assert "cpus" in info.value.message and "KEY=VALUE" in info.value.message
    assert count_rows(session, Node) == 0


def test_add_keyvalue_pairs_duplicate_name_is_409(session):
    add(session, "kv1")
    session.commit()
    before = snapshot(session)
    with pytest.raises(errors.DuplicateNode):
        pool.add_keyvalue_pairs(session, "kv1", "10.0.0.1", "10.1.0.1", ["cpus=1"])
    assert snapshot(session) == before


@pytest.mark.parametrize("raw", ["1.50", "1e3", "true", "null"])
def test_add_keyvalue_pairs_keeps_number_like_text_verbatim(session, raw):
    node = pool.add_keyvalue_pairs(session, "kv1", "10.0.0.1", "10.1.0.1",
                                   [f"ipmi_password={raw}"])
    assert session.scalar(select(Node.ipmi_password).where(Node.id == node.id)) == raw


# --- add_json_blob ---------------------------------------------------------------

def test_add_json_blob_stores_fields_and_extra(session):
    blob = json.dumps({"ipmi_user": "u", "ipmi_password": "p", "port_hwaddr": "aa:bb",
                       "cpu_arch": "aarch64", "cpus": 4, "ram_mb": "1024", "disk_gb": 20,
                       "location": {"rack": 4}})
    node = pool.add_json_blob(session, "jb1", "10.0.0.1", "10.1.0.1,10.1.0.2", blob, "arm")
    session.commit()
    session.expunge_all()
    stored = session.get(Node, node.id)
    assert (stored.ipmi_user, stored.ipmi_password, stored.port_hwaddr, stored.cpu_arch,
            stored.cpus, stored.ram_mb, stored.disk_gb, stored.node_pool) == (
        "u", "p", "aa:bb", "aarch64", 4, 1024, 20, "arm")
    assert stored.extra == {"location": {"rack": 4}}
    assert [ip.ip for ip in stored.ips] == ["10.1.0.1", "10.1.0.2"]


def test_add_json_blob_accepts_a_dict_and_defaults_pool(session):
    node = pool.add_json_blob(session, "jb1", "10.0.0.1", "10.1.0.1", {"cpus": 2})
    assert session.execute(select(Node.node_pool, Node.cpus).where(Node.id == node.id)
                           ).one() == ("default", 2)


@pytest.mark.parametrize("blob", ["{not json", "", '{"cpus": 1', "[1, 2]", '"text"', "42",
                                  "null", '{"cpus": "x"}', '{"disk_gb": -5}'])
def test_add_json_blob_bad_blob_is_400_and_changes_nothing(session, blob):
    add(session, "existing")
    session.commit()
    before = snapshot(session)
    with pytest.raises(errors.BadRequest) as info:
        pool.add_json_blob(session, "jb1", "10.0.0.1", "10.1.0.1", blob)
    assert info.value.status == 400
    assert snapshot(session) == before


def test_add_json_blob_invalid_json_and_non_object_messages(session):
    with pytest.raises(errors.BadRequest, match="not valid JSON"):
        pool.add_json_blob(session, "jb1", "10.0.0.1", "10.1.0.1", "{oops")
    with pytest.raises(errors.BadRequest, match="JSON object"):
        pool.add_json_blob(session, "jb1", "10.0.0.1", "10.1.0.1", "[]")
    assert count_rows(session, Node) == 0


def test_add_json_blob_duplicate_name_is_409(session):
    add(session, "jb1")
    session.commit()
    before = snapshot(session)
    with pytest.raises(errors.DuplicateNode) as info:
        pool.add_json_blob(session, "jb1", "10.0.0.1", "10.1.0.1", "{}")
    assert info.value.status == 409
    assert snapshot(session) == before


# --- get_field -----------------------------------------------------------------------

def test_get_field_reads_columns_hardware_and_original_names(session):
    a = add(session, "a", ipmi_ip="10.0.0.1", port_hwaddr="aa:01", cpus=4,
            allocation_pool="10.1.0.1,10.1.0.2", node_pool="p")
    b = add(session, "b", ipmi_ip="10.0.0.2", port_hwaddr="aa:02", cpus=8,
            allocation_pool="10.1.0.3", node_pool="p")
    add(session, "c", node_pool="p")
    when = datetime(2024, 1, 2, 3, 4, 5, 678000)
    allocate(session, "job", 2, node_pool="p", now=when)
    session.commit()
    expect = {
        "id": [(a.id, a.id), (b.id, b.id)],
        "name": [(a.id, "a"), (b.id, "b")],
        "ipmi_ip": [(a.id, "10.0.0.1"), (b.id, "10.0.0.2")],
        "port_hwaddr": [(a.id, "aa:01"), (b.id, "aa:02")],
        "cpus": [(a.id, 4), (b.id, 8)],
        "ipmi_password": [(a.id, "s3cret"), (b.id, "s3cret")],
        "node_pool": [(a.id, "p"), (b.id, "p")],
        "allocation_pool": [(a.id, "10.1.0.1,10.1.0.2"), (b.id, "10.1.0.3")],
        "status": [(a.id, "allocated"), (b.id, "allocated")],
        "state": [(a.id, "allocated"), (b.id, "allocated")],
        "provisioned": [(a.id, "job"), (b.id, "job")],
        "owner": [(a.id, "job"), (b.id, "job")],
        "timestamp": [(a.id, "2024-01-02T03:04:05"), (b.id, "2024-01-02T03:04:05")],
        "lease_expires_at": [(a.id, "2024-01-02T09:04:05"), (b.id, "2024-01-02T09:04:05")],
    }
    for field, values in expect.items():
        assert pool.get_field(session, "job", field) == values, field


def test_get_field_reads_extra_keys(session):
    pool.add_json_blob(session, "x1", "10.0.0.1", "10.1.0.1", {"rack": "r1", "cpus": 1})
    pool.add_json_blob(session, "x2", "10.0.0.2", "10.1.0.2", {"rack": "r2", "cpus": 1})
    nodes = allocate(session, "job", 2)
    assert pool.get_field(session, "job", "rack") == [(nodes[0].id, "r1"),
                                                      (nodes[1].id, "r2")]


def test_get_field_unknown_field_is_400(session):
    add_many(session, 2)
    allocate(session, "job", 2)
    with pytest.raises(errors.UnknownField) as info:
        pool.get_field(session, "job", "colour")
    assert info.value.status == 400
    assert isinstance(info.value, errors.BadRequest)
    assert info.value.message == "field colour does not exist"


def test_get_field_extra_key_missing_on_one_node_is_400(session):
    pool.add_json_blob(session, "x1", "10.0.0.1", "10.1.0.1", {"rack": "r1"})
    pool.add_json_blob(session, "x2", "10.0.0.2", "10.1.0.2", {})
    allocate(session, "job", 2)
    with pytest.raises(errors.UnknownField, match="field rack does not exist"):
        pool.get_field(session, "job", "rack")


def test_get_field_owner_with_nothing_is_404(session):
    add_many(session, 2)
    allocate(session, "job", 1)
    release(session, "job")
    for owner in ("nobody", "job"):
        with pytest.raises(errors.OwnerNotFound) as info:
            pool.get_field(session, owner, "name")
        assert info.value.status == 404
        assert info.value.message == f"{owner} does not own any nodes"


# --- set_field -----------------------------------------------------------------------

def fresh_node(session, node_id):
    session.expire_all()
    return session.get(Node, node_id)


def test_set_field_string_and_int_conversion(session):
    node = add(session, "n1")
    session.commit()
    pool.set_field(session, node.id, "cpus", "12", "int")
    pool.set_field(session, node.id, "ram_mb", "4096", "string")   # converted to the column's int
    pool.set_field(session, str(node.id), "ipmi_user", 1234, "string")
    pool.set_field(session, node.id, "port_hwaddr", "11:22:33:44:55:66")  # string by default
    pool.set_field(session, node.id, "ipmi_ip", "10.9.9.9", "string")
    pool.set_field(session, node.id, "node_pool", "elsewhere", "string")
    pool.set_field(session, node.id, "name", "renamed", "string")
    session.commit()
    stored = fresh_node(session, node.id)
    assert (stored.cpus, stored.ram_mb, stored.ipmi_user, stored.port_hwaddr, stored.ipmi_ip,
            stored.node_pool, stored.name) == (
        12, 4096, "1234", "11:22:33:44:55:66", "10.9.9.9", "elsewhere", "renamed")


def test_set_field_allocation_pool_replaces_ips_in_order(session):
    node = add(session, "n1", allocation_pool="10.1.0.1,10.1.0.2")
    session.commit()
    pool.set_field(session, node.id, "allocation_pool", "10.2.0.3,10.2.0.1,10.2.0.2")
    session.commit()
    assert session.scalars(select(NodeIP.ip).where(NodeIP.node_id == node.id)
                           .order_by(NodeIP.position)).all() == [
        "10.2.0.3", "10.2.0.1", "10.2.0.2"]
    pool.set_field(session, node.id, "allocation_pool", "10.3.0.1")
    session.commit()
    assert session.execute(select(NodeIP.position, NodeIP.ip)
                           .where(NodeIP.node_id == node.id)).all() == [(0, "10.3.0.1")]


def test_set_field_extra_key(session):
    node = pool.add_json_blob(session, "x1", "10.0.0.1", "10.1.0.1", {"rack": "r1", "slot": 1})
    session.commit()
    pool.set_field(session, node.id, "slot", "7", "int")
    pool.set_field(session, node.id, "rack", "r9")
    session.commit()
    assert fresh_node(session, node.id).extra == {"rack": "r9", "slot": 7}


def assert_set_field_refused(session, error, status, *args):
    before = snapshot(session)
    with pytest.raises(error) as info:
        pool.set_field(session, *args)
    assert info.value.status == status
    assert snapshot(session) == before
    return info.value


def test_set_field_unknown_type_is_400(session):
    node = add(session, "n1")
    session.commit()
    err = assert_set_field_refused(session, errors.BadRequest, 400,
                                   node.id, "cpus", "4", "float")
    assert "float" in err.message


def test_set_field_unknown_id_is_404(session):
    node = add(session, "n1")
    session.commit()
    err = assert_set_field_refused(session, errors.NodeNotFound, 404,
                                   node.id + 1000, "cpus", "4", "int")
    assert str(node.id + 1000) in err.message
    assert_set_field_refused(session, errors.NodeNotFound, 404, node.id + 1000, "status",
                             "maintenance", "string")
    assert_set_field_refused(session, errors.BadRequest, 400, "abc", "cpus", "4", "int")


def test_set_field_unknown_field_is_400(session):
    node = add(session, "n1")
    session.commit()
    err = assert_set_field_refused(session, errors.UnknownField, 400,
                                   node.id, "colour", "red", "string")
    assert err.message == "field colour does not exist"


@pytest.mark.parametrize("field, value, type_name", [
    ("cpus", "x", "string"), ("cpus", "x", "int"), ("ram_mb", "-1", "int"),
    ("disk_gb", "1.5", "string"), ("name", "", "string"), ("status", "broken", "string"),
])
def test_set_field_bad_value_is_400(session, field, value, type_name):
    node = add(session, "n1")
    session.commit()
    assert_set_field_refused(session, errors.BadRequest, 400, node.id, field, value, type_name)


@pytest.mark.parametrize("field", ["owner", "provisioned", "timestamp", "allocated_at", "id",
                                   "lease_expires_at"])
def test_set_field_cannot_set_allocation_fields(session, field):
    node = add(session, "n1")
    allocate(session, "job", 1)
    session.commit()
    err = assert_set_field_refused(session, errors.BadRequest, 400, node.id, field, "thief")
    assert field in err.message


def test_set_field_ready_maintenance_ready(session):
    node = add(session, "n1")
    session.commit()
    pool.set_field(session, node.id, "status", "maintenance")
    session.commit()
    assert row(session, node.id)[0] == State.MAINTENANCE
    pool.set_field(session, node.id, "state", "maintenance")       # no change is fine
    pool.set_field(session, node.id, "status", "ready")
    session.commit()
    assert row(session, node.id)[:2] == (State.READY, None)


@pytest.mark.parametrize("target", ["ready", "maintenance", "dirty"])
def test_set_field_allocated_node_state_is_409(session, target):
    node = add(session, "n1")
    allocate(session, "job", 1)
    session.commit()
    err = assert_set_field_refused(session, errors.Conflict, 409,
                                   node.id, "status", target, "string")
    assert "allocated" in err.message
    assert row(session, node.id)[:2] == (State.ALLOCATED, "job")
    assert len(open_allocations(session)) == 1


def test_set_field_ready_node_cannot_be_marked_allocated(session):
    node = add(session, "n1")
    session.commit()
    assert_set_field_refused(session, errors.Conflict, 409, node.id, "status", "allocated")
    assert_set_field_refused(session, errors.Conflict, 409, node.id, "status", "dirty")


def test_set_field_allocated_node_cannot_change_pool(session):
    node = add(session, "n1")
    allocate(session, "job", 1)
    session.commit()
    assert_set_field_refused(session, errors.Conflict, 409, node.id, "node_pool", "other")


def test_set_field_duplicate_name_is_409(session):
    a = add(session, "a")
    add(session, "b")
    session.commit()
    err = assert_set_field_refused(session, errors.DuplicateNode, 409, a.id, "name", "b")
    assert "b" in err.message
    pool.set_field(session, a.id, "name", "a")            # its own name is not a duplicate
    assert row(session, a.id)[4] == "a"


# --- delete_db ----------------------------------------------------------

def test_delete_db_empties_nodes_and_closes_open_history(session):
    add_many(session, 4)
    allocate(session, "gone", 1)
    release(session, "gone")
    allocate(session, "job", 2)
    session.commit()
    when = datetime(2031, 2, 3, 4, 5, 6)
    assert pool.delete_db(session, now=when) == 4
    session.commit()
    assert count_rows(session, Node) == 0
    assert count_rows(session, NodeIP) == 0
    rows = session.execute(select(Allocation.owner, Allocation.end_reason, Allocation.ended_at)
                           .order_by(Allocation.id)).all()
    assert rows[0][:2] == ("gone", EndReason.RELEASED)
    assert rows[1:] == [("job", EndReason.REMOVED, when), ("job", EndReason.REMOVED, when)]
    # The pool is usable again afterwards, names included.
    add_many(session, 1)
    assert [n.name for n in allocate(session, "job", 1)] == ["n0"]


def test_delete_db_on_empty_pool(session):
    assert pool.delete_db(session) == 0
    assert count_rows(session, Node) == 0


def test_set_field_dirty_node_can_be_made_ready_or_maintenance(session):
    a, b = add_many(session, 2)
    session.execute(update(Node).values(state=State.DIRTY.value),
                    execution_options={"synchronize_session": False})
    session.commit()
    session.expire_all()
    pool.set_field(session, a.id, "status", "ready")
    pool.set_field(session, b.id, "status", "maintenance")
    session.commit()
    assert row(session, a.id)[0] == State.READY
    assert row(session, b.id)[0] == State.MAINTENANCE
    assert [n.id for n in allocate(session, "job", 1)] == [a.id]


def test_set_field_too_long_cpu_arch_is_400(session):
    node = add(session, "n1")
    session.commit()
    with pytest.raises(errors.BadRequest):
        pool.set_field(session, node.id, "cpu_arch", "a" * 256)


def test_set_field_never_echoes_a_password_in_its_error(session):
    node = add(session, "n1")
    with pytest.raises(errors.BadRequest) as info:
        pool.set_field(session, node.id, "ipmi_password", "hunter2-secret", "int")
    assert "hunter2" not in info.value.message
