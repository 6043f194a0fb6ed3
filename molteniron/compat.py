"""The original MoltenIron's output shapes, rendered in this one place.

Jenkins hooks read these with jq, so names, nesting and types stay as the
original printed them. The worker renders replies from its node records
(molteniron/node_record.py NodeRecord); the CLI renders tables from the nodes a
reply carries (plain dicts, NodeRecord.to_reply's shape), without SQLAlchemy.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from molteniron.node_record import NodeRecord

HARDWARE_FIELDS = ("ipmi_user", "ipmi_password", "port_hwaddr", "cpu_arch",
                   "cpus", "ram_mb", "disk_gb")
SECRET_FIELDS = ("ipmi_password",)
HIDDEN = "********"


def blob(shown: dict) -> dict:
    """The hardware fields and extra keys of a node a reply carries, as the original's
    blob held them."""
    fields = {k: shown[k] for k in HARDWARE_FIELDS if k in shown}
    fields.update(shown.get("extra") or {})
    return fields


def record_blob(record: NodeRecord) -> dict[str, Any]:
    """blob() of a node record, in the same order (HARDWARE_FIELDS, then extra)."""
    return {"ipmi_user": record.ipmi_user, "ipmi_password": record.ipmi_password,
            "port_hwaddr": record.port_hwaddr, "cpu_arch": record.cpu_arch,
            "cpus": record.cpus, "ram_mb": record.ram_mb, "disk_gb": record.disk_gb,
            **record.extra}


def node_json(record: NodeRecord) -> dict:
    """One node as the original's allocate printed it (blob is a JSON *string*)."""
    return {
        "id": record.id,
        "name": record.name,
        "ipmi_ip": record.ipmi_ip,
        "blob": json.dumps(record_blob(record)),
        "allocation_pool": ",".join(record.allocation_pool),
        "status": record.state,
        "provisioned": record.owner or "",
        "timestamp": record.allocated_at,
        "node_pool": record.node_pool,
        # Not in the original (it had no leases): when the nodes go back by themselves.
        "lease_expires_at": record.lease_expires_at,
    }


def nodes_reply(records: Iterable[NodeRecord]) -> dict:
    return {"status": 200, "nodes": {f"node_{r.id}": node_json(r) for r in records}}


def field_reply(values: list[tuple[int, object]]) -> dict:
    return {"status": 200, "result": [{"id": node_id, "field": value} for node_id, value in values]}


# Not a password, but a capability: whoever knows a cleaner's claim token may report its node.
HIDDEN_IN_STATUS = (*SECRET_FIELDS, "clean_claim")


def without_secrets(record: NodeRecord) -> dict:
    """The node as status shows it to whom may not see its secrets."""
    shown = record.to_reply()
    for key in HIDDEN_IN_STATUS:
        if shown[key]:
            shown[key] = HIDDEN
    return shown


def reply_without_secrets(reply: dict) -> dict:
    """A reply as it may be stored: every node's blob without its IPMI password."""
    nodes = reply.get("nodes")
    if not isinstance(nodes, dict):
        return reply
    hidden = {}
    for key, node in nodes.items():
        fields = json.loads(node["blob"])
        fields.update({k: HIDDEN for k in SECRET_FIELDS if fields.get(k)})
        hidden[key] = {**node, "blob": json.dumps(fields)}
    return {**reply, "nodes": hidden}


# --- status tables -----------------------------------------------------------

# The original's columns, then the lease's end last (so the original's positions hold).
STATUS_COLUMNS = (("id", 4), ("name", 6), ("ipmi_ip", 16), ("blob", 40), ("status", 8),
                  ("provisioned", 40), ("time", 14), ("node_pool", 19), ("lease_ends", 19))
BAREMETAL_COLUMNS = (("id", 4), ("name", 6), ("ipmi_ip", 9), ("ipmi_user", 11),
                     ("ipmi_password", 15), ("port_hwaddr", 19), ("cpu_arch", 10),
                     ("cpus", 6), ("ram_mb", 8), ("disk_gb", 9), ("status", 8),
                     ("provisioned", 40), ("time", 14), ("node_pool", 19), ("lease_ends", 19))


def status_text(records: list[dict], baremetal: bool, table_type: str,
                now: datetime | None = None) -> str:
    """The original's `status` / `status_baremetal` table, human or csv."""
    columns = BAREMETAL_COLUMNS if baremetal else STATUS_COLUMNS
    now = now or datetime.now(timezone.utc).replace(tzinfo=None)
    return table_text(columns, [_row(r, baremetal, now) for r in records], table_type)


def table_text(columns: tuple[tuple[str, int], ...], rows: list[list], table_type: str) -> str:
    """Rows under (name, width) columns: a boxed table (human) or csv with a header row.

    The csv is what Python's csv module writes (quoted where a value holds a comma,
    a quote or a newline), so csv.reader reads back the same cells; None is "".
    """
    if table_type == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(name for name, _ in columns)
        writer.writerows(["" if cell is None else cell for cell in row] for row in rows)
        return out.getvalue()[:-1]  # print() adds the last newline back
    rows = [["" if cell is None else cell for cell in row] for row in rows]
    widths = [max([width, len(name)] + [len(str(row[i])) for row in rows])
              for i, (name, width) in enumerate(columns)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    header = "+" + "+".join(f" {name:<{w}} " for (name, _), w in zip(columns, widths)) + "+"
    body = ["|" + "|".join(f" {str(cell):<{w}} " for cell, w in zip(row, widths)) + "|"
            for row in rows]
    return "\n".join([line, header, line, *body, line])


# `history` and `waiting`: one column per key of their reply's rows.
HISTORY_COLUMNS = (("started_at", 19), ("ended_at", 19), ("end_reason", 11), ("owner", 12),
                   ("node_name", 9), ("node_id", 7), ("user", 8), ("request_id", 36))
WAITING_COLUMNS = (("position", 8), ("owner", 12), ("node_pool", 9), ("count", 5),
                   ("waited_s", 8), ("deadline", 8), ("request_id", 36))


def records_text(columns: tuple[tuple[str, int], ...], records: list[dict],
                 table_type: str) -> str:
    """Reply rows (dicts) as a table of the keys named by columns, human or csv."""
    return table_text(columns, [[r.get(name) for name, _ in columns] for r in records],
                      table_type)


def _state_cell(record: dict) -> str:
    """The state, with why a node is (or, once released, will be) in maintenance,
    or which cleaner is cleaning it."""
    if record["state"] == "dirty" and record.get("clean_claimed_by") is not None:
        return (f"dirty (cleaning by {record['clean_claimed_by']} until "
                f"{record['clean_claimed_until']})")
    reason = record.get("maintenance_reason")
    if not reason:
        return record["state"]
    if record["state"] == "maintenance":
        return f"maintenance ({reason})"
    return f"{record['state']} (maintenance at release: {reason})"


def _row(record: dict, baremetal: bool, now: datetime) -> list:
    held_for = ""
    if record.get("allocated_at"):
        held_for = str(now - datetime.fromisoformat(record["allocated_at"]))[:12]
    head = [record["id"], record["name"], record["ipmi_ip"]]
    tail = [_state_cell(record), record["owner"] or "", held_for, record["node_pool"],
            record.get("lease_expires_at") or ""]
    if baremetal:
        return head + [record[k] for k in HARDWARE_FIELDS] + tail
    return head + [json.dumps(blob(record), sort_keys=True)] + tail
