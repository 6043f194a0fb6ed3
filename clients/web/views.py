"""The worker's replies as the web process shows them: stable field names, ISO-8601
times with an offset, and nothing secret.

Records are built field by field from what the worker sent (a list of what to
show, not of what to hide): no IPMI password or user, no cleaner's claim token,
no blob key that looks like a secret, whatever a worker of another version puts
in its replies. The worker keeps times as naive UTC; they leave here as
`...+00:00`.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

NODE_STATES = ("ready", "allocated", "dirty", "maintenance")
HARDWARE = ("cpu_arch", "cpus", "ram_mb", "disk_gb", "port_hwaddr")
# Extra blob keys never shown: anything that may be a secret.
SECRET_KEY = re.compile(r"pass|secret|token|key|cred|auth|cert", re.I)
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


def iso(naive_utc: str | None) -> str | None:
    """A worker's time (ISO-8601, UTC, no offset) with its offset."""
    if not naive_utc:
        return None
    when = datetime.fromisoformat(naive_utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.isoformat(timespec="seconds")


def iso_unix(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _unix(naive_utc: str | None) -> float | None:
    if not naive_utc:
        return None
    return datetime.fromisoformat(naive_utc).replace(tzinfo=timezone.utc).timestamp()


def node(record: dict, now: float) -> dict:
    """One node of a status reply; now: unix time by the database's clock (leases)."""
    state = record["state"]
    claimed_until = _unix(record.get("clean_claimed_until"))
    cleaning = state == "dirty" and claimed_until is not None and claimed_until > now
    lease_end = _unix(record.get("lease_expires_at")) if state == "allocated" else None
    hardware = {k: record.get(k) for k in HARDWARE}
    hardware.update({str(k): v for k, v in sorted((record.get("extra") or {}).items())
                     if not SECRET_KEY.search(str(k)) and isinstance(v, (str, int, float, bool))})
    return {
        "id": record["id"],
        "name": record["name"],
        "node_pool": record["node_pool"],
        "state": state,
        "cleaning": cleaning,
        "cleaner": record.get("clean_claimed_by") if cleaning else None,
        "owner": record.get("owner"),
        "user": record.get("holder_user"),
        "allocated_at": iso(record.get("allocated_at")),
        "lease_expires_at": iso(record.get("lease_expires_at")) if lease_end else None,
        "lease_remaining_s": None if lease_end is None else max(0, round(lease_end - now)),
        "tags": list(record.get("tags") or []),
        "maintenance_reason": record.get("maintenance_reason"),
        "ipmi_ip": record.get("ipmi_ip"),
        "allocation_pool": list(record.get("allocation_pool") or []),
        "hardware": hardware,
    }


def filter_nodes(nodes: list[dict], pool: str | None = None, state: str | None = None,
                 owner: str | None = None, tag: str | None = None, name: str | None = None,
                 after: int | None = None, limit: int = DEFAULT_LIMIT
                 ) -> tuple[list[dict], int | None, int]:
    """(the page of shaped nodes, next_after or None, how many match in all).

    nodes: shaped, in id order. name: a part of the name, any case. state `cleaning`:
    dirty nodes with a live claim."""
    needle = name.lower() if name else None

    def wanted(n: dict) -> bool:
        return ((pool is None or n["node_pool"] == pool)
                and (state is None or n["state"] == state
                     or (state == "cleaning" and n["cleaning"]))
                and (owner is None or n["owner"] == owner)
                and (tag is None or tag in n["tags"])
                and (needle is None or needle in n["name"].lower()))

    matching = [n for n in nodes if wanted(n)]
    start = 0
    if after is not None:
        start = next((i for i, n in enumerate(matching) if n["id"] > after), len(matching))
    page = matching[start:start + limit]
    more = start + limit < len(matching)
    return page, (page[-1]["id"] if more and page else None), len(matching)


def waiter(row: dict, now: float) -> dict:
    """One row of a waiting reply; now: unix time by the database's clock."""
    waited = row.get("waited_s") or 0.0
    return {
        "position": row["position"],
        "node_pool": row["node_pool"],
        "owner": row["owner"],
        "user": row.get("user"),
        "count": row["count"],
        "priority": row.get("priority", 0),
        "constraints": row.get("constraints"),
        "waited_s": round(waited, 1),
        "enqueued_at": iso_unix(now - waited),
        "deadline": iso_unix(row.get("deadline")),
    }


def describe_constraints(constraints: dict | None) -> str:
    if not constraints:
        return ""
    parts = [f"arch {constraints['arch']}"] if constraints.get("arch") else []
    parts += [f"{name} ≥ {constraints[key]}" for key, name in (
        ("min_cpus", "cpus"), ("min_ram_mb", "RAM MB"), ("min_disk_gb", "disk GB"))
        if constraints.get(key)]
    parts += [f"tag {t}" for t in constraints.get("tags") or ()]
    return ", ".join(parts)


def history_row(row: dict) -> dict:
    return {
        "started_at": iso(row["started_at"]),
        "ended_at": iso(row["ended_at"]),
        "end_reason": row["end_reason"],
        "owner": row["owner"],
        "node_name": row["node_name"],
        "node_id": row["node_id"],
        "user": row.get("user"),
    }


def worker_row(row: dict, now: float) -> dict:
    seen = row.get("seen_s_ago")
    return {
        "worker_id": row["worker_id"],
        "role": row["role"],
        "seen_s_ago": seen,
        "last_seen": None if seen is None else iso_unix(now - seen),
        "clock_skew_s": row.get("clock_skew_s"),
        "clock_warning": row.get("clock_warning"),
    }


def pool_row(row: dict) -> dict:
    keys = ("node_pool", "nodes", "ready", "allocated", "dirty", "cleaning", "maintenance",
            "waiting", "oldest_wait_s", "wait_p50_s", "wait_p95_s")
    return {k: row.get(k) for k in keys}


def db_now(offset: float) -> float:
    """Now by the database's clock, as far as the last summary told."""
    return time.time() + offset


def duration(seconds: float | None) -> str:
    """A short human duration: 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"
