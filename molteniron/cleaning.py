"""Cleaning: the rules for dirty nodes, applied by the worker's PoolState
(workers/state.py; handlers in workers/cleaning.py).

With a cleaning_command configured, a released node is dirty. A cleaner claims
one (the lowest id that is `claimable`), runs the command and reports: clean ->
ready, not -> maintenance with the reason (`failure_reason`). A claim is a token
kept on the node with the time it lapses: a cleaner that died leaves a claim that
lapses, and the next claim takes the node over; a report whose token is not the
node's claim any more changes nothing (409, `checked_report`).
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta

from molteniron import errors
from molteniron.models import State
from molteniron.node_record import NodeRecord
from molteniron.node_states import Event, next_state, sources
from molteniron.pool import MAX_TEXT

CLAIMABLE = sources(Event.CLEAN_CLAIM)


def claimable(record: NodeRecord, stamp: str) -> bool:
    """Whether a cleaner may claim the node at `stamp` (the time as records show it):
    dirty, and nobody holds a live claim on it."""
    return record.state in CLAIMABLE and (
        record.clean_claim is None
        or (record.clean_claimed_until is not None and record.clean_claimed_until <= stamp))


def new_claim(cleaner: str) -> str:
    """A claim's token: the cleaner's name and a random part nobody can guess."""
    return f"{cleaner[:200]}#{uuid.uuid4().hex}"


def claim_until(now: datetime, claim_seconds: float) -> datetime:
    """When a claim made now lapses: in whole seconds (as records keep times), never sooner
    than claim_seconds."""
    until = now + timedelta(seconds=claim_seconds)
    return until.replace(microsecond=0) + timedelta(seconds=math.ceil(until.microsecond / 1e6))


def checked_report(record: NodeRecord | None, node_id: int, claim: str, op: str,
                   event: Event) -> State:
    """The state a cleaner's report (op, causing event) moves the node to; NodeNotFound,
    or 409 for a stale claim (the node moved on, or the claim is not its own)."""
    if record is None:
        raise errors.NodeNotFound(f"Node with id of {node_id} does not exist!")
    after = next_state(record, event)
    if record.clean_claim != claim:
        now_held = "another cleaner claimed it since" if record.clean_claim \
            else "its claim was dropped"
        raise errors.Conflict(f"{op} for node {record.name}: the claim is stale ({now_held}); "
                              "nothing changed")
    assert after is not None
    return after


def failure_reason(ok: bool, detail: str | None) -> str | None:
    """The maintenance reason a cleaner's report gives its node (None: it is clean)."""
    return None if ok else f"cleaning failed: {detail or 'no detail given'}"[:MAX_TEXT]


def live_claim(record: NodeRecord, claim: str) -> bool:
    """Whether a node record is dirty and still claimed with this token."""
    return record.state in CLAIMABLE and record.clean_claim == claim


def cleaning_refused() -> errors.Conflict:
    return errors.Conflict("clean refused: the worker has no cleaning_command configured, so "
                           "nothing would clean the node (set cleaning_command in the worker's "
                           "conf.yaml and run molteniron-cleaner)")
