"""Pool operations: plain functions over a Session. The caller owns the transaction.

A node's state changes as molteniron/node_states.py's table says (`_move`).
Functions validate all their input before they change anything, so an error
leaves the session as it was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, delete, select, update
from sqlalchemy.orm import Session

from molteniron import errors
from molteniron.compat import HARDWARE_FIELDS, SECRET_FIELDS
from molteniron.models import Allocation, EndReason, Node, NodeIP, ProcessedRequest, State
from molteniron.node_record import NodeRecord
from molteniron.node_states import SET_STATUS, Event, next_state, refused_mid_cleaning

DEFAULT_POOL = "default"
INT_FIELDS = frozenset({"cpus", "ram_mb", "disk_gb"})
# Fields set_field may change directly; state has its own rules below.
SETTABLE_FIELDS = frozenset({"name", "ipmi_ip", "node_pool", "allocation_pool", "tags",
                             *HARDWARE_FIELDS})
# Names get_field accepts, mapped to what they read (the original's names included).
READABLE_FIELDS = {
    "id": "id", "name": "name", "ipmi_ip": "ipmi_ip", "node_pool": "node_pool",
    "status": "state", "state": "state", "provisioned": "owner", "owner": "owner",
    "timestamp": "allocated_at", "allocated_at": "allocated_at",
    "lease_expires_at": "lease_expires_at", "allocation_pool": "allocation_pool",
    "tags": "tags", "maintenance_reason": "maintenance_reason",
    **{f: f for f in HARDWARE_FIELDS},
}
MAX_TEXT = 255


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# --- adding nodes -----------------------------------------------------------

def add_baremetal(session: Session, name: str, ipmi_ip: str, ipmi_user: str,
                  ipmi_password: str, allocation_pool: str | list[str], port_hwaddr: str,
                  cpu_arch: str, cpus: Any, ram_mb: Any, disk_gb: Any,
                  node_pool: str = DEFAULT_POOL, extra: dict | None = None,
                  tags: str | list[str] | None = None) -> Node:
    """Add one ready node; 409 if its name is taken."""
    hardware = _hardware({"ipmi_user": ipmi_user, "ipmi_password": ipmi_password,
                          "port_hwaddr": port_hwaddr, "cpu_arch": cpu_arch,
                          "cpus": cpus, "ram_mb": ram_mb, "disk_gb": disk_gb})
    node = Node(name=_text("name", name), ipmi_ip=_text("ipmi_ip", ipmi_ip),
                node_pool=_text("node_pool", node_pool or DEFAULT_POOL),
                state=next_state(None, Event.ADD), owner=None, extra=dict(extra or {}),
                tags=parse_tags(tags), **hardware)
    node.ips = [NodeIP(position=i, ip=ip) for i, ip in enumerate(parse_ips(allocation_pool))]
    if session.scalar(select(Node.id).where(Node.name == node.name)) is not None:
        raise errors.DuplicateNode(f"Node already exists: {node.name}")
    session.add(node)
    session.flush()
    return node


def add_json_blob(session: Session, name: str, ipmi_ip: str, allocation_pool: str,
                  blob: str | dict, node_pool: str = DEFAULT_POOL,
                  tags: str | list[str] | None = None) -> Node:
    """Add a node whose hardware fields come as one JSON object."""
    if isinstance(blob, str):
        try:
            blob = json.loads(blob)
        except ValueError as exc:
            raise errors.BadRequest(f"blob is not valid JSON: {exc}") from None
    if not isinstance(blob, dict):
        raise errors.BadRequest("blob must be a JSON object of hardware fields")
    return _add_from_mapping(session, name, ipmi_ip, allocation_pool, blob, node_pool, tags)


def add_keyvalue_pairs(session: Session, name: str, ipmi_ip: str, allocation_pool: str,
                       pairs: Iterable[str], node_pool: str = DEFAULT_POOL,
                       tags: str | list[str] | None = None) -> Node:
    """Add a node whose hardware fields come as KEY=VALUE words (VALUE may be JSON)."""
    fields: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = str(pair).partition("=")
        if not sep or not key:
            raise errors.BadRequest(f"{pair!r} is not KEY=VALUE")
        fields[key] = _json_or_text(raw)
    pool = fields.pop("node_pool", node_pool)
    return _add_from_mapping(session, name, ipmi_ip, allocation_pool, fields, pool, tags)


def _add_from_mapping(session: Session, name: str, ipmi_ip: str, allocation_pool: str,
                      fields: dict, node_pool: Any, tags: str | list[str] | None = None) -> Node:
    # The original stored any blob; known hardware fields that are missing
    # default to empty/0, unknown keys are kept in `extra` and shown in the blob.
    hardware = {k: fields.get(k, 0 if k in INT_FIELDS else "") for k in HARDWARE_FIELDS}
    extra = {k: v for k, v in fields.items() if k not in HARDWARE_FIELDS}
    if not isinstance(node_pool, str):
        raise errors.BadRequest("node_pool must be a string")
    return add_baremetal(session, name, ipmi_ip, allocation_pool=allocation_pool,
                         node_pool=node_pool or DEFAULT_POOL, extra=extra, tags=tags, **hardware)


# --- allocating and releasing -----------------------------------------------
# Allocate, release, renew and lease expiry are decided in one place: the
# worker's in-memory PoolState (workers/state.py). What stays here changes
# nodes through the ORM for the rarer operations that need it.

def pool_too_small(node_pool: str, total: int, count: int,
                   constraints: str = "") -> errors.PoolTooSmall:
    meeting = f" meeting {constraints}" if constraints else ""
    return errors.PoolTooSmall(f"Pool {node_pool} has {total} node(s){meeting} outside "
                               f"maintenance; {count} can never be allocated")


def not_enough_nodes(node_pool: str, ready: int, count: int) -> errors.NotEnoughNodes:
    return errors.NotEnoughNodes(f"Not enough available nodes found. Found {ready}, "
                                 f"requested {count} (pool {node_pool})")


def owned_nodes(session: Session, owner: str) -> list[Node]:
    return list(session.scalars(select(Node).where(Node.owner == owner).order_by(Node.id)))


# --- fields ----------------------------------------------------------------

def get_field(session: Session, owner: str, field: str) -> list[tuple[int, Any]]:
    """(node id, value of field) for every node owner holds."""
    nodes = owned_nodes(session, _text("owner", owner))
    if not nodes:
        raise errors.OwnerNotFound(f"{owner} does not own any nodes")
    if field not in READABLE_FIELDS and any(field not in node.extra for node in nodes):
        raise errors.UnknownField(f"field {field} does not exist")
    return [(node.id, field_value(node, field)) for node in nodes]


def field_value(node: Node, field: str) -> Any:
    """A node's value of a column, hardware field or extra blob key."""
    if field not in READABLE_FIELDS:
        return node.extra[field]
    attr = READABLE_FIELDS[field]
    if attr == "allocation_pool":
        return ",".join(ip.ip for ip in node.ips)
    value = getattr(node, attr)
    if isinstance(value, State):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return value


def set_field(session: Session, node_id: Any, key: str, value: Any,
              type_name: str = "string", now: datetime | None = None,
              force: bool = False) -> Node:
    """Set one field of one node, converted to the field's type. A node a cleaner is
    cleaning goes to ready only when forced (its claim is dropped)."""
    converted = _convert(value, type_name, shown=key not in SECRET_FIELDS)
    if key in ("status", "state"):
        node = _node(session, node_id)
        _change_state(node, converted, now or utcnow(), force)
        return node
    if key not in SETTABLE_FIELDS:
        if key in READABLE_FIELDS:
            raise errors.BadRequest(f"field {key} cannot be set; it changes only "
                                    "through allocate and release")
        node = _node(session, node_id)
        if key not in node.extra:
            raise errors.UnknownField(f"field {key} does not exist")
        node.extra = {**node.extra, key: converted}
        session.flush()
        return node
    if key in INT_FIELDS:
        converted = _non_negative(key, converted)
    elif key == "allocation_pool":
        ips = parse_ips(converted)
    elif key == "tags":
        converted = parse_tags(str(converted))
    else:
        converted = _text(key, str(converted), empty=key in HARDWARE_FIELDS)
    node = _node(session, node_id)
    if key == "name" and converted != node.name and session.scalar(
            select(Node.id).where(Node.name == converted)) is not None:
        raise errors.DuplicateNode(f"Node with name {converted} already exists")
    if key == "node_pool" and node.state == State.ALLOCATED:
        raise errors.Conflict(f"node {node.id} is allocated; release it before moving pools")
    if key == "allocation_pool":
        node.ips = [NodeIP(position=i, ip=ip) for i, ip in enumerate(ips)]
    else:
        setattr(node, key, converted)
    session.flush()
    return node


# --- maintenance and removal ------------------------------------------------

def find_node(session: Session, ref: str | int) -> Node:
    """A node by id (digits) or by name; 404 naming what was asked for."""
    text = str(ref)
    node = session.get(Node, int(text)) if text.isdigit() else session.scalar(
        select(Node).where(Node.name == text))
    if node is None:
        raise no_such_node(text)
    return node


def no_such_node(ref: str) -> errors.NodeNotFound:
    return errors.NodeNotFound(f"no node has the id or name {ref!r}")


def set_maintenance(session: Session, ref: str | int, on: bool, reason: str | None,
                    now: datetime | None = None, force: bool = False) -> Node:
    """Take a node out of service (with a reason) or put it back.

    An allocated node stays with its job: its maintenance begins when it is
    released (the reason is kept until then and shown by status). Without a reason,
    the node keeps the one it has (set again "on", it changes nothing); a new reason
    replaces it. A node a cleaner is cleaning goes back to ready only when forced
    (its claim is dropped). The import's (inventory.py); the worker's `maintenance`
    applies the same rules in memory (workers/state.py PoolState.set_maintenance).
    """
    node = find_node(session, ref)
    if on:
        kept = maintenance_reason_on(reason, node.maintenance_reason)
        _move(node, Event.MAINTENANCE_ON, now, force, "maintenance on")
        node.maintenance_reason = kept
    else:
        _move(node, Event.MAINTENANCE_OFF, now, force, "maintenance off")
        node.maintenance_reason = None
    session.flush()
    return node


def maintenance_reason_on(given: str | None, kept: str | None) -> str:
    """A node's reason after maintenance on: a reason given replaces the one it has;
    none given keeps it, or says that none was given. BadRequest if too long."""
    text = _text("reason", given or "no reason given")
    return text if given or not kept else kept


def remove_node(session: Session, ref: str | int, force: bool, now: datetime) -> Node:
    """Remove a node that is not allocated; force: end its allocation (history: removed)."""
    node = find_node(session, ref)
    next_state(node, Event.REMOVE_FORCED if force else Event.REMOVE)
    if node.state == State.ALLOCATED:  # its open allocation ends with it
        session.execute(update(Allocation).where(
            Allocation.node_id == node.id, Allocation.ended_at.is_(None)
        ).values(ended_at=now, end_reason=EndReason.REMOVED))
    session.delete(node)
    session.flush()
    return node


def _change_state(node: Node, value: Any, now: datetime, force: bool) -> None:
    try:
        target = State(str(value))
    except ValueError:
        raise errors.BadRequest(
            f"status must be one of {', '.join(s.value for s in State)}") from None
    event = SET_STATUS[target]
    if _move(node, event, now, force, f"set_field status {target.value}"):
        node.maintenance_reason = ("set_field status maintenance"
                                   if event is Event.SET_STATUS_MAINTENANCE else None)


def _move(node: Node, event: Event, now: datetime | None, force: bool, action: str) -> bool:
    """Set node's state to what event moves it to; whether it changed. Conflict (nothing
    changed) for a move the table does not hold or a cleaner's claim forbids."""
    after = next_state(node, event)
    if after == node.state:
        return False
    assert after is not None, "a node is removed by remove_node, not moved"
    if refused_mid_cleaning(node.state, event):
        _refuse_mid_cleaning(node, now or utcnow(), force, action)
    node.state = after
    return True


def _refuse_mid_cleaning(node: Node, now: datetime, force: bool, action: str) -> None:
    """Conflict while a cleaner's claim is live; else (or forced) the claim is dropped."""
    if node.clean_claim is None:
        return
    refuse_mid_cleaning(node, now, force, action)
    node.clean_claim = None
    node.clean_claimed_until = None


def refuse_mid_cleaning(node: Node | NodeRecord, now: datetime, force: bool,
                        action: str) -> None:
    """Conflict while a cleaner's claim on the node is live: ready now, it could be handed
    out while the cleaner wipes it. Forced, the caller drops the claim (the cleaner's
    report is then refused as stale and changes nothing)."""
    until = node.clean_claimed_until
    if isinstance(until, str):  # a NodeRecord's time
        until = datetime.fromisoformat(until)
    if node.clean_claim is not None and not force and until is not None and until > now:
        cleaner = node.clean_claim.rpartition("#")[0] or "a cleaner"
        raise errors.Conflict(
            f"node {node.name} is being cleaned by {cleaner} (claim until "
            f"{until.isoformat(timespec='seconds')}Z): {action} would "
            "let a job have it mid-cleaning; wait for the cleaner's report, or force it")


def _node(session: Session, node_id: Any) -> Node:
    try:
        key = int(node_id)
    except (TypeError, ValueError):
        raise errors.BadRequest(f"node id must be an integer, got {node_id!r}") from None
    node = session.get(Node, key)
    if node is None:
        raise errors.NodeNotFound(f"Node with id of {key} does not exist!")
    return node


# --- listing and emptying ------------------------------------------------

def delete_db(session: Session, now: datetime | None = None) -> int:
    """Remove every node (open allocations end as `removed`); return how many."""
    now = now or utcnow()
    session.execute(update(Allocation).where(Allocation.ended_at.is_(None))
                    .values(ended_at=now, end_reason=EndReason.REMOVED))
    session.execute(delete(NodeIP))
    removed = _rowcount(session, delete(Node))
    session.expunge_all()
    return removed


def prune_processed(session: Session, older_than: datetime, limit: int = 10_000) -> int:
    """Forget up to `limit` stored replies older than the retention."""
    return _rowcount(session, delete(ProcessedRequest)
                     .where(ProcessedRequest.processed_at < older_than)
                     .with_dialect_options(mysql_limit=limit))


def prune_history(session: Session, older_than: datetime, limit: int = 10_000) -> int:
    """Forget up to `limit` allocations that ended before the retention."""
    return _rowcount(session, delete(Allocation)
                     .where(Allocation.ended_at < older_than)
                     .with_dialect_options(mysql_limit=limit))


def _rowcount(session: Session, statement: Executable) -> int:
    """The rows a DELETE matched. Session.execute runs it on a cursor and returns its
    CursorResult, but is typed as returning any Result, which has no rowcount."""
    return cast(CursorResult, session.execute(statement)).rowcount


# --- input checking ----------------------------------------------------------

def parse_tags(tags: str | list[str] | None) -> list[str]:
    """Tags from "a,b" or a list: sorted, without duplicates or blanks."""
    if tags is None:
        return []
    items = tags.split(",") if isinstance(tags, str) else tags
    if not isinstance(items, list):
        raise errors.BadRequest("tags must be a comma-separated list")
    return sorted({_text("tags", str(t).strip()) for t in items if str(t).strip()})


def parse_ips(allocation_pool: str | list[str]) -> list[str]:
    items = allocation_pool.split(",") if isinstance(allocation_pool, str) else allocation_pool
    if not isinstance(items, list):
        raise errors.BadRequest("allocation_pool must be a comma-separated list of IPs")
    ips = [str(ip).strip() for ip in items if str(ip).strip()]
    for ip in ips:
        _text("allocation_pool", ip)
    return ips


def _hardware(values: dict) -> dict:
    clean = {}
    for key in HARDWARE_FIELDS:
        value = values[key]
        clean[key] = (_non_negative(key, value) if key in INT_FIELDS
                      else _text(key, value, empty=True))
    return clean


def _text(field: str, value: Any, empty: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise errors.BadRequest(f"{field} must be a string")
    value = str(value)
    if not value and not empty:
        raise errors.BadRequest(f"{field} must not be empty")
    if len(value) > MAX_TEXT:
        raise errors.BadRequest(f"{field} is longer than {MAX_TEXT} characters")
    return value


def _non_negative(field: str, value: Any) -> int:
    if isinstance(value, bool):
        raise errors.BadRequest(f"{field} must be an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise errors.BadRequest(f"{field} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value != number:
        raise errors.BadRequest(f"{field} must be an integer, got {value!r}")
    if not 0 <= number < 2**31:
        raise errors.BadRequest(f"{field} must be between 0 and {2**31 - 1}, got {value!r}")
    return number


def _convert(value: Any, type_name: str, shown: bool = True) -> Any:
    """shown=False: a secret's value, never echoed in an error (replies are stored)."""
    if type_name == "string":
        return str(value)
    if type_name == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise errors.BadRequest(f"value {value!r} is not an int" if shown
                                    else "the value is not an int") from None
    raise errors.BadRequest(f"Python type of {type_name} is not supported! (use string or int)")


def _json_or_text(raw: str) -> Any:
    """A quoted JSON string ("user") is decoded; anything else stays as typed."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw
