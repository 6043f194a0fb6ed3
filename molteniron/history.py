"""Who held which node, from when to when, and how it ended: reads of `allocations`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from molteniron.errors import BadRequest
from molteniron.models import Allocation


def allocation_history(session: Session, owner: str | None = None, node: str | None = None,
                       since: datetime | None = None, limit: int = 100,
                       until: datetime | None = None, after: str | None = None,
                       cursors: list[str] | None = None) -> list[dict]:
    """Allocations newest first; node is a name or an id; since: open at or after it;
    until: started at or before it; after: a cursor (`cursor`) from an earlier call, for
    the rows that follow it. cursors, if given, gets each row's cursor, in order."""
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
    if until is not None:
        query = query.where(Allocation.started_at <= until)
    if after is not None:
        started, row_id = parse_cursor(after)
        query = query.where(or_(Allocation.started_at < started,
                                and_(Allocation.started_at == started, Allocation.id < row_id)))
    query = query.order_by(Allocation.started_at.desc(), Allocation.id.desc()).limit(limit)
    rows = []
    for allocation in session.scalars(query):
        rows.append(history_row(allocation))
        if cursors is not None:
            cursors.append(cursor(allocation))
    return rows


def cursor(allocation: Allocation) -> str:
    """Where a page of history that ends with this allocation stops: its start, exactly,
    and its id (the order's tie-break)."""
    return f"{allocation.started_at.isoformat(timespec='microseconds')}/{allocation.id}"


def parse_cursor(text: str) -> tuple[datetime, int]:
    """(started_at, id) of a cursor; BadRequest if it is not one."""
    started, _, row_id = text.rpartition("/")
    try:
        when = datetime.fromisoformat(started)
        if not row_id.isdecimal() or when.tzinfo is not None:
            raise ValueError
        return when, int(row_id)
    except ValueError:
        raise BadRequest(f"history: argument after must be a next_after of an earlier "
                         f"reply, got {text!r}") from None


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
