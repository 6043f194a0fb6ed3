"""Cleaning: the rules for dirty nodes. Plain functions over a Session; the caller commits.

With a cleaning_command configured, a released node is dirty (workers/state.py).
A cleaner claims one (`claim_dirty`), runs the command and reports (`finish`):
clean -> ready, not -> maintenance with the reason. A claim is a token kept on
the node with the time it lapses: a cleaner that died leaves a claim that
lapses, and the next claim takes the node over; a report whose token is not
the node's claim any more changes nothing (409).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from molteniron import errors
from molteniron.models import Node, State
from molteniron.pool import MAX_TEXT, find_node


def claim_dirty(session: Session, cleaner: str, now: datetime, claim_seconds: float) -> Node | None:
    """The lowest-id dirty node nobody holds a live claim on, claimed for cleaner (None: none)."""
    node = session.scalar(
        select(Node).where(Node.state == State.DIRTY,
                           or_(Node.clean_claim.is_(None), Node.clean_claimed_until <= now))
        .order_by(Node.id).limit(1))
    if node is None:
        return None
    node.clean_claim = f"{cleaner[:200]}#{uuid.uuid4().hex}"
    node.clean_claimed_until = now + timedelta(seconds=claim_seconds)
    session.flush()
    return node


def finish(session: Session, node_id: int, claim: str, ok: bool, detail: str | None) -> Node:
    """A cleaner's report: ready if ok, else maintenance with detail as the reason.

    Accepted while the token is still the node's claim, even past the claim's time
    (nobody took it over); refused with 409 otherwise, changing nothing.
    """
    node = _claimed(session, node_id, claim, "clean_done")
    node.clean_claim = None
    node.clean_claimed_until = None
    if ok:
        node.state = State.READY
        node.maintenance_reason = None
    else:
        node.state = State.MAINTENANCE
        reason = f"cleaning failed: {detail or 'no detail given'}"
        node.maintenance_reason = reason[:MAX_TEXT]
    session.flush()
    return node


def abandon(session: Session, node_id: int, claim: str) -> Node:
    """A cleaner gives its claim back unfinished: the node stays dirty, for the next one."""
    node = _claimed(session, node_id, claim, "clean_abandon")
    node.clean_claim = None
    node.clean_claimed_until = None
    session.flush()
    return node


def _claimed(session: Session, node_id: int, claim: str, op: str) -> Node:
    """The dirty node that claim still holds; NodeNotFound, or 409 for a stale claim."""
    node = session.get(Node, node_id)
    if node is None:
        raise errors.NodeNotFound(f"Node with id of {node_id} does not exist!")
    if node.state != State.DIRTY or node.clean_claim != claim:
        now_held = (f"it is {node.state.value}" if node.state != State.DIRTY
                    else "another cleaner claimed it since" if node.clean_claim
                    else "its claim was dropped")
        raise errors.Conflict(f"{op} for node {node.name}: the claim is stale ({now_held}); "
                              "nothing changed")
    return node


def requeue(session: Session, ref: str | int) -> Node:
    """A ready or maintenance node (by name or id) back to dirty, to be cleaned again."""
    node = find_node(session, ref)
    if node.state == State.ALLOCATED:
        raise errors.Conflict(f"node {node.name} is allocated to {node.owner}; it is cleaned "
                              "when it is released")
    if node.state != State.DIRTY:
        node.state = State.DIRTY
        node.maintenance_reason = None
        node.clean_claim = None
        node.clean_claimed_until = None
        session.flush()
    return node


def live_claim(record: dict, claim: str) -> bool:
    """Whether a node record (pool.node_record) is dirty and still claimed with this token."""
    return record["state"] == State.DIRTY.value and record.get("clean_claim") == claim


def cleaning_refused() -> errors.Conflict:
    return errors.Conflict("clean refused: the worker has no cleaning_command configured, so "
                           "nothing would clean the node (set cleaning_command in the worker's "
                           "conf.yaml and run molteniron-cleaner)")
