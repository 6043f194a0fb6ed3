"""The pool as an inventory: a list of plain node entries, exported (by the worker's
dispatch, from memory) and imported whole.

An entry holds what an operator writes down about a node (see FIELDS); the
file format around it (YAML) and reading an original MoltenIron database
belong to the client (clients/inventory_file.py). Here the worker checks a
whole inventory before it changes anything, then adds or updates nodes by
name through the pool functions, so each rule stays in pool.py.

What an import does to a node that exists already:
- every field is set to the entry's value, except ipmi_password when it is
  "********" or missing (the stored one is kept);
- state: only `ready` and `maintenance` (with maintenance_reason) are
  applied, and only to a node that is not allocated; `allocated` and
  `dirty` in an entry are left as they are (a new node starts ready); a
  dirty node stays dirty whatever the entry says: only its cleaning makes
  it ready;
- an allocated node keeps its owner and state; moving it to another
  node_pool is refused, as by set_field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from molteniron import errors, pool
from molteniron.compat import HARDWARE_FIELDS, HIDDEN
from molteniron.models import Node, State
from molteniron.node_record import NodeRecord
from molteniron.protocol import NODE_STATES

# An entry's keys, in the order an export writes them.
FIELDS = ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool", "port_hwaddr",
          "cpu_arch", "cpus", "ram_mb", "disk_gb", "node_pool", "tags", "extra", "state",
          "maintenance_reason")
# States an import applies; the others in an entry are left as the pool has them.
APPLIED_STATES = ("ready", "maintenance")
MAX_PROBLEMS = 20  # listed in one refusal; the rest are counted


@dataclass
class Entry:
    """One checked entry: values normalized the way the pool stores them."""
    index: int                      # 1 for the first entry of the file
    name: str
    ipmi_ip: str
    hardware: dict[str, Any]        # HARDWARE_FIELDS but ipmi_password
    ipmi_password: str | None       # None: keep the stored one
    allocation_pool: list[str]
    node_pool: str
    tags: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    state: str | None = None        # ready or maintenance to apply; None: leave it
    maintenance_reason: str | None = None

    @property
    def label(self) -> str:
        return f"entry {self.index} ({self.name})"


# --- export ------------------------------------------------------------------

def entry_of(record: NodeRecord, show_secrets: bool) -> dict:
    """A node record as an inventory entry (keys in FIELDS' order)."""
    return {
        "name": record.name, "ipmi_ip": record.ipmi_ip, "ipmi_user": record.ipmi_user,
        "ipmi_password": (HIDDEN if record.ipmi_password and not show_secrets
                          else record.ipmi_password),
        "allocation_pool": list(record.allocation_pool), "port_hwaddr": record.port_hwaddr,
        "cpu_arch": record.cpu_arch, "cpus": record.cpus, "ram_mb": record.ram_mb,
        "disk_gb": record.disk_gb, "node_pool": record.node_pool, "tags": list(record.tags),
        "extra": dict(record.extra), "state": record.state,
        "maintenance_reason": record.maintenance_reason,
    }


# --- checking ----------------------------------------------------------------

def check_inventory(inventory: Any) -> list[Entry]:
    """Every entry checked; BadRequest naming each bad entry (index, name) and field."""
    if not isinstance(inventory, dict) or set(inventory) != {"nodes"}:
        raise errors.BadRequest("import: the inventory must be an object with one key, nodes")
    raw = inventory["nodes"]
    if not isinstance(raw, list):
        raise errors.BadRequest("import: nodes must be a list of node entries")
    entries: list[Entry] = []
    problems: list[str] = []
    seen: dict[str, int] = {}  # name: the index of its first entry
    for index, item in enumerate(raw, start=1):
        name = item.get("name") if isinstance(item, dict) else None
        label = f"entry {index} ({name if isinstance(name, str) and name else 'no name'})"
        try:
            entry = check_entry(index, item)
        except errors.MoltenIronError as exc:
            problems.append(f"{label}: {exc.message}")
            continue
        if entry.name in seen:
            problems.append(f"{label}: name {entry.name} is also entry {seen[entry.name]}")
        seen.setdefault(entry.name, index)
        entries.append(entry)
    if problems:
        raise errors.BadRequest(_refusal(problems))
    return entries


def check_entry(index: int, item: Any) -> Entry:
    """One entry checked by the pool's own rules; BadRequest names the field."""
    if not isinstance(item, dict):
        raise errors.BadRequest("an entry must be a mapping of fields")
    unknown = sorted(str(k) for k in item if k not in FIELDS)
    if unknown:
        raise errors.BadRequest(f"unknown field(s) {', '.join(unknown)} "
                                "(other keys belong under extra)")
    for required in ("name", "ipmi_ip"):
        if item.get(required) is None:
            raise errors.BadRequest(f"{required} is required")
    hardware = {key: item.get(key) for key in HARDWARE_FIELDS if key != "ipmi_password"}
    for key, value in hardware.items():
        if value is None:
            hardware[key] = 0 if key in pool.INT_FIELDS else ""
        elif key in pool.INT_FIELDS:
            hardware[key] = pool._non_negative(key, value)
        else:
            hardware[key] = pool._text(key, value, empty=True)
    password = item.get("ipmi_password")
    if password is not None:
        password = pool._text("ipmi_password", password, empty=True)
    state = item.get("state")
    if state is not None and state not in NODE_STATES:
        raise errors.BadRequest(f"state must be one of {', '.join(NODE_STATES)}, got {state!r}")
    reason = item.get("maintenance_reason")
    return Entry(
        index=index,
        name=pool._text("name", item["name"]),
        ipmi_ip=pool._text("ipmi_ip", item["ipmi_ip"]),
        hardware=hardware,
        ipmi_password=None if password == HIDDEN else password,
        allocation_pool=pool.parse_ips(item.get("allocation_pool") or []),
        node_pool=pool._text("node_pool", item.get("node_pool") or pool.DEFAULT_POOL),
        tags=pool.parse_tags(item.get("tags")),
        extra=_extra(item.get("extra")),
        state=state if state in APPLIED_STATES else None,
        maintenance_reason=None if reason is None else pool._text("maintenance_reason", reason),
    )


def _extra(extra: Any) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise errors.BadRequest("extra must be a mapping of keys to values")
    clashing = sorted(k for k in extra if k in FIELDS)
    if clashing:
        raise errors.BadRequest(f"extra must not repeat the field(s) {', '.join(clashing)}")
    return dict(extra)


def _refusal(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"import refused, nothing was imported: {'; '.join(shown)}{more}"


# --- importing ---------------------------------------------------------------

def import_nodes(session: Session, inventory: Any) -> dict:
    """Add or update every entry by name, or, if any entry is refused, change nothing."""
    entries = check_inventory(inventory)
    nodes = {node.name: node for node in session.scalars(select(Node))}
    problems: list[errors.MoltenIronError] = []
    for entry in entries:
        node = nodes.get(entry.name)
        if node is None and entry.ipmi_password is None:
            problems.append(errors.BadRequest(
                f"{entry.label}: ipmi_password is missing or {HIDDEN}, which keeps the stored "
                "one, but the pool has no such node (export with --show-secrets)"))
        elif (node is not None and node.state == State.ALLOCATED
              and node.node_pool != entry.node_pool):
            problems.append(errors.Conflict(
                f"{entry.label}: node_pool: the node is allocated to {node.owner}; "
                "release it before moving pools"))
    if problems:
        raise type(problems[0])(_refusal([p.message for p in problems]))
    added, changed = [], {}
    for entry in entries:
        try:
            if entry.name in nodes:
                fields = _update(session, nodes[entry.name], entry)
                if fields:
                    changed[entry.name] = fields
            else:
                _add(session, entry)
                added.append(entry.name)
        except errors.MoltenIronError as exc:  # the caller rolls back what came before
            raise type(exc)(_refusal([f"{entry.label}: {exc.message}"])) from None
    return {"added": len(added), "changed": len(changed),
            "unchanged": len(entries) - len(added) - len(changed),
            "added_nodes": added, "changed_fields": changed}


def _add(session: Session, entry: Entry) -> Node:
    assert entry.ipmi_password is not None  # import_nodes refused a new node without one
    node = pool.add_baremetal(
        session, entry.name, entry.ipmi_ip, ipmi_password=entry.ipmi_password,
        allocation_pool=entry.allocation_pool, node_pool=entry.node_pool, extra=entry.extra,
        tags=entry.tags, **entry.hardware)
    if entry.state == "maintenance":
        pool.set_maintenance(session, node.id, True, entry.maintenance_reason)
    return node


def _update(session: Session, node: Node, entry: Entry) -> list[str]:
    """Set what differs, through set_field's rules; the names of the fields changed."""
    wanted = {"ipmi_ip": entry.ipmi_ip, **entry.hardware, "node_pool": entry.node_pool,
              "allocation_pool": entry.allocation_pool, "tags": entry.tags}
    if entry.ipmi_password is not None:
        wanted["ipmi_password"] = entry.ipmi_password
    record = NodeRecord.from_node(node)
    changed = []
    for key, value in wanted.items():
        if getattr(record, key) == value:
            continue
        if isinstance(value, list):  # set_field takes lists the way the CLI writes them
            value = ",".join(value)
        pool.set_field(session, node.id, key, value, "int" if key in pool.INT_FIELDS else "string")
        changed.append(key)
    if record.extra != entry.extra:
        node.extra = dict(entry.extra)
        changed.append("extra")
    if node.state != State.ALLOCATED and _apply_state(session, node, entry):
        changed.append("state")
    return changed


def _apply_state(session: Session, node: Node, entry: Entry) -> bool:
    """Ready or maintenance (with its reason) as the entry says; True if it changed."""
    if entry.state == "maintenance":
        # No reason in the entry: any reason the node has will do (set_maintenance gives one).
        if node.state == State.MAINTENANCE and entry.maintenance_reason in (
                None, node.maintenance_reason):
            return False
        pool.set_maintenance(session, node.id, True, entry.maintenance_reason)
        return True
    if entry.state == "ready" and node.state == State.MAINTENANCE:
        pool.set_field(session, node.id, "state", "ready")
        return True
    return False
