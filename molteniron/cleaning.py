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
from molteniron.node_record import NodeRecord
from molteniron.node_states import Event, next_state, sources
from molteniron.pool import MAX_TEXT, find_node

CLAIMABLE = sources(Event.CLEAN_CLAIM)


def claim_dirty(session: Session, cleaner: str, now: datetime, claim_seconds: float) -> Node | None:
    """The lowest-id dirty node nobody holds a live claim on, claimed for cleaner (None: none)."""
    node = session.scalar(
        select(Node).where(Node.state.in_(CLAIMABLE),
                           or_(Node.clean_claim.is_(None), Node.clean_claimed_until <= now))
        .order_by(Node.id).limit(1))
    if node is None:
        return None
    after = next_state(node, Event.CLEAN_CLAIM)
    assert after is not None
    node.state = after
    node.clean_claim = f"{cleaner[:200]}#{uuid.uuid4().hex}"
    node.clean_claimed_until = now + timedelta(seconds=claim_seconds)
    session.flush()
    return node


def finish(session: Session, node_id: int, claim: str, ok: bool, detail: str | None) -> Node:
    """A cleaner's report: ready if ok, else maintenance with detail as the reason.

    Accepted while the token is still the node's claim, even past the claim's time
    (nobody took it over); refused with 409 otherwise, changing nothing.
    """
    node, after = _claimed(session, node_id, claim, "clean_done",
                           Event.CLEAN_DONE_OK if ok else Event.CLEAN_DONE_FAILED)
    node.clean_claim = None
    node.clean_claimed_until = None
    node.state = after
    reason = None if ok else f"cleaning failed: {detail or 'no detail given'}"[:MAX_TEXT]
    node.maintenance_reason = reason
    session.flush()
    return node


def abandon(session: Session, node_id: int, claim: str) -> Node:
    """A cleaner gives its claim back unfinished: the node stays dirty, for the next one."""
    node, after = _claimed(session, node_id, claim, "clean_abandon", Event.CLEAN_ABANDON)
    node.clean_claim = None
    node.clean_claimed_until = None
    node.state = after
    session.flush()
    return node


def _claimed(session: Session, node_id: int, claim: str, op: str,
             event: Event) -> tuple[Node, State]:
    """The node that claim still holds and the state event moves it to; NodeNotFound,
    or 409 for a stale claim (the node moved on, or the claim is not its own)."""
    node = session.get(Node, node_id)
    if node is None:
        raise errors.NodeNotFound(f"Node with id of {node_id} does not exist!")
    after = next_state(node, event)
    if node.clean_claim != claim:
        now_held = "another cleaner claimed it since" if node.clean_claim \
            else "its claim was dropped"
        raise errors.Conflict(f"{op} for node {node.name}: the claim is stale ({now_held}); "
                              "nothing changed")
    assert after is not None
    return node, after


def requeue(session: Session, ref: str | int) -> Node:
    """A ready or maintenance node (by name or id) back to dirty, to be cleaned again."""
    node = find_node(session, ref)
    after = next_state(node, Event.CLEAN)
    assert after is not None
    if after != node.state:
        node.state = after
        node.maintenance_reason = None
        node.clean_claim = None
        node.clean_claimed_until = None
        session.flush()
    return node


def live_claim(record: NodeRecord, claim: str) -> bool:
    """Whether a node record is dirty and still claimed with this token."""
    return record.state in CLAIMABLE and record.clean_claim == claim


def cleaning_refused() -> errors.Conflict:
    return errors.Conflict("clean refused: the worker has no cleaning_command configured, so "
                           "nothing would clean the node (set cleaning_command in the worker's "
                           "conf.yaml and run molteniron-cleaner)")
