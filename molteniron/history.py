"""Who held which node, from when to when, and how it ended: reads of `allocations`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from molteniron.models import Allocation

def allocation_history(session: Session, owner: str | None = None, node: str | None = None,
                       since: datetime | None = None, limit: int = 100) -> list[dict]:
    """Allocations newest first; node is a name or an id; since: open at or after it."""
    query = select(Allocation)
    if owner is not None:
        query = query.where(Allocation.owner == owner)  # ix_allocations_owner_started
    if node is not None:
        # By name (ix_allocations_node_name_started): history outlives removed nodes,
        # whose names the nodes table no longer knows.
        by_node = Allocation.node_name == node
        if node.isdecimal() and int(node) < 2**31:
            by_node = or_(by_node, Allocation.node_id == int(node))  # ix_allocations_node_started
        query = query.where(by_node)
    if since is not None:
        query = query.where(or_(Allocation.ended_at.is_(None), Allocation.ended_at >= since))
    query = query.order_by(Allocation.started_at.desc(), Allocation.id.desc()).limit(limit)
    return [history_row(a) for a in session.scalars(query)]


def history_row(allocation: Allocation) -> dict:
    """One allocation as a plain dict (times in ISO-8601, UTC); compat.HISTORY_COLUMNS prints it."""
    return {
        "started_at": _iso(allocation.started_at),
        "ended_at": _iso(allocation.ended_at),
        "end_reason": allocation.end_reason.value if allocation.end_reason else None,
        "owner": allocation.owner,
        "node_name": allocation.node_name,
        "node_id": allocation.node_id,
        "user": allocation.user,
        "request_id": allocation.request_id,
    }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat(timespec="seconds")
