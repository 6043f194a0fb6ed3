"""A node's states and the events that move it: one table, state x event -> state.

The pool functions (molteniron/pool.py, cleaning.py) and the worker's in-memory
pool (workers/state.py PoolState) ask `next_state` before they change a node's
state and set what it answers; a pair the table does not hold is a Conflict
naming the node, its state and the event, raised before anything changed.
CAUSES says which operations cause each event and who may send them
(workers/authz.py enforces it). docs/architecture.md ("Node states") shows the
table as `markdown_table()` writes it (`python -m molteniron.node_states`);
tests/test_node_states.py keeps the page, authz and the pool functions in step
with it.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from molteniron import errors
from molteniron.models import EndReason, Node, State
from molteniron.node_record import NodeRecord

READY, ALLOCATED, DIRTY, MAINTENANCE = State.READY, State.ALLOCATED, State.DIRTY, State.MAINTENANCE
GONE = None  # no node: the source of add, the target of remove


class Who(enum.Enum):
    """Who may cause an event (with authorization on; off, everyone may)."""
    ADMIN = "admin"
    ANY_USER = "any user (the owner name is bound to that user)"
    OWNERS_USER = "the owner's user, admin"
    SENDER = "the request's sender, admin"
    WORKER = "the worker"
    CLEANER = "a cleaner (an admin login)"


class Event(str, enum.Enum):
    """What moves a node. A str: the hot path looks pairs up with the record's state string."""
    ADD = "add"
    ALLOCATE = "allocate"
    RENEW = "renew"
    RELEASE = "release"
    LEASE_EXPIRY = "lease expiry"
    CANCEL = "cancel"
    GRANT_BOUNCED = "grant bounced"
    MAINTENANCE_ON = "maintenance on"
    MAINTENANCE_OFF = "maintenance off"
    SET_STATUS_READY = "set_field status ready"
    SET_STATUS_MAINTENANCE = "set_field status maintenance"
    SET_STATUS_DIRTY = "set_field status dirty"
    SET_STATUS_ALLOCATED = "set_field status allocated"
    CLEAN_CLAIM = "clean_claim"
    CLEAN_DONE_OK = "clean_done ok"
    CLEAN_DONE_FAILED = "clean_done failed"
    CLEAN_ABANDON = "clean_abandon"
    CLEAN = "clean"
    REMOVE = "remove"
    REMOVE_FORCED = "remove --force"
    DELETE_DB = "delete_db"


class Cause(NamedTuple):
    who: Who
    ops: tuple[str, ...]  # the operations (protocol.OPERATIONS) that cause it; () none
    how: str              # what happens, as the docs table says it
    where: str            # the function that applies it


CAUSES: dict[Event, Cause] = {
    Event.ADD: Cause(Who.ADMIN, ("add_baremetal", "add_json_blob", "add_keyvalue_pairs",
                                 "import"),
                     "add_baremetal, add_json_blob, add_keyvalue_pairs; import of a new node",
                     "pool.py `add_baremetal`"),
    Event.ALLOCATE: Cause(Who.ANY_USER, ("allocate",), "allocate, or its waiter served",
                          "workers/state.py `allocate`"),
    Event.RENEW: Cause(Who.OWNERS_USER, ("renew",), "renew", "state.py `renew`"),
    Event.RELEASE: Cause(Who.OWNERS_USER, ("release",), "release", "state.py `release_owner`"),
    Event.LEASE_EXPIRY: Cause(Who.WORKER, ("tick",), "its lease ends (tick)", "state.py `expire`"),
    Event.CANCEL: Cause(Who.SENDER, ("cancel",), "cancel of the request that got it",
                        "state.py `release_request`"),
    Event.GRANT_BOUNCED: Cause(Who.WORKER, (), "its grant's reply bounced (client gone; "
                               "a broker return)", "workers/grants.py `settle`"),
    Event.MAINTENANCE_ON: Cause(Who.ADMIN, ("maintenance", "import"),
                                "maintenance on; import (state maintenance)",
                                "state.py `set_maintenance`; import: pool.py `set_maintenance`"),
    Event.MAINTENANCE_OFF: Cause(Who.ADMIN, ("maintenance",), "maintenance off",
                                 "state.py `set_maintenance`"),
    Event.SET_STATUS_READY: Cause(Who.ADMIN, ("set_field", "import"),
                                  "set_field status ready; import (state ready, of a "
                                  "maintenance node)",
                                  "pool.py `set_field`"),
    Event.SET_STATUS_MAINTENANCE: Cause(Who.ADMIN, ("set_field",), "set_field status maintenance",
                                        "pool.py `set_field`"),
    Event.SET_STATUS_DIRTY: Cause(Who.ADMIN, ("set_field",), "set_field status dirty",
                                  "pool.py `set_field`"),
    Event.SET_STATUS_ALLOCATED: Cause(Who.ADMIN, ("set_field",), "set_field status allocated",
                                      "pool.py `set_field`"),
    Event.CLEAN_CLAIM: Cause(Who.CLEANER, ("clean_claim",), "clean_claim",
                             "state.py `claim_dirty`"),
    Event.CLEAN_DONE_OK: Cause(Who.CLEANER, ("clean_done",), "clean_done, clean",
                               "state.py `finish_cleaning`"),
    Event.CLEAN_DONE_FAILED: Cause(Who.CLEANER, ("clean_done",), "clean_done, not clean",
                                   "state.py `finish_cleaning`"),
    Event.CLEAN_ABANDON: Cause(Who.CLEANER, ("clean_abandon",), "clean_abandon",
                               "state.py `abandon_claim`"),
    Event.CLEAN: Cause(Who.ADMIN, ("clean",), "clean (refused without a cleaning_command)",
                       "state.py `requeue`"),
    Event.REMOVE: Cause(Who.ADMIN, ("remove",), "remove", "pool.py `remove_node`"),
    Event.REMOVE_FORCED: Cause(Who.ADMIN, ("remove",), "remove --force",
                               "pool.py `remove_node`"),
    Event.DELETE_DB: Cause(Who.ADMIN, ("delete_db",), "delete_db", "pool.py `delete_db`"),
}


class Outcome(enum.Enum):
    """Targets a row names that are not one state."""
    RELEASED = "released"    # decided by `released`: the node's job let it go
    UNCHANGED = "unchanged"  # the state it is in


RELEASED, UNCHANGED = Outcome.RELEASED, Outcome.UNCHANGED


class Row(NamedTuple):
    sources: tuple[State | None, ...]
    event: Event
    target: State | Outcome | None
    note: str = ""
    # Refused while a cleaner's claim on the node is live, unless forced (the claim is
    # then dropped): the node would go to ready under a cleaner still wiping it.
    mid_cleaning_refused: bool = False


ROWS: tuple[Row, ...] = (
    Row((GONE,), Event.ADD, READY),
    Row((READY,), Event.ALLOCATE, ALLOCATED),
    Row((ALLOCATED,), Event.RENEW, UNCHANGED, "a new lease"),
    Row((ALLOCATED,), Event.RELEASE, RELEASED),
    Row((ALLOCATED,), Event.LEASE_EXPIRY, RELEASED),
    Row((ALLOCATED,), Event.CANCEL, RELEASED),
    Row((ALLOCATED,), Event.GRANT_BOUNCED, RELEASED),
    Row((READY, DIRTY, MAINTENANCE), Event.MAINTENANCE_ON, MAINTENANCE,
        "a reason given replaces the one it has"),
    Row((ALLOCATED,), Event.MAINTENANCE_ON, UNCHANGED,
        "the reason is kept: maintenance when released"),
    Row((MAINTENANCE,), Event.MAINTENANCE_OFF, READY, mid_cleaning_refused=True),
    Row((READY, ALLOCATED, DIRTY), Event.MAINTENANCE_OFF, UNCHANGED, "a reason kept is dropped"),
    Row((DIRTY, MAINTENANCE), Event.SET_STATUS_READY, READY, mid_cleaning_refused=True),
    Row((READY,), Event.SET_STATUS_READY, UNCHANGED),
    Row((READY, DIRTY), Event.SET_STATUS_MAINTENANCE, MAINTENANCE,
        'reason "set_field status maintenance"'),
    Row((MAINTENANCE,), Event.SET_STATUS_MAINTENANCE, UNCHANGED),
    Row((DIRTY,), Event.SET_STATUS_DIRTY, UNCHANGED),
    Row((ALLOCATED,), Event.SET_STATUS_ALLOCATED, UNCHANGED),
    Row((DIRTY,), Event.CLEAN_CLAIM, UNCHANGED,
        "claimed by the cleaner until a deadline (the lowest id without a live claim)"),
    Row((DIRTY,), Event.CLEAN_DONE_OK, READY, "only with the node's claim (else 409)"),
    Row((DIRTY,), Event.CLEAN_DONE_FAILED, MAINTENANCE,
        'reason "cleaning failed: ..."; only with the node\'s claim'),
    Row((DIRTY,), Event.CLEAN_ABANDON, UNCHANGED, "unclaimed; only with the node's claim"),
    Row((READY, MAINTENANCE), Event.CLEAN, DIRTY, "reason and claim dropped"),
    Row((DIRTY,), Event.CLEAN, UNCHANGED),
    Row((READY, DIRTY, MAINTENANCE), Event.REMOVE, GONE),
    Row((READY, ALLOCATED, DIRTY, MAINTENANCE), Event.REMOVE_FORCED, GONE,
        "an allocation ends: removed"),
    Row((READY, ALLOCATED, DIRTY, MAINTENANCE), Event.DELETE_DB, GONE,
        "every node; allocations end: removed"),
)

Target = State | Outcome | None
# Keyed by States, which are str: a node record's state (its value) finds them too.
TRANSITIONS: dict[tuple[str | None, Event], Target] = {
    (source, row.event): source if row.target is UNCHANGED else row.target
    for row in ROWS for source in row.sources}
_MID_CLEANING_REFUSED = frozenset(
    (source, row.event) for row in ROWS if row.mid_cleaning_refused for source in row.sources)

# The release-like events, by the reason their allocation ends with (history).
ENDED_BY: dict[EndReason, Event] = {
    EndReason.RELEASED: Event.RELEASE, EndReason.EXPIRED: Event.LEASE_EXPIRY,
    EndReason.CANCELLED: Event.CANCEL, EndReason.CLIENT_GONE: Event.GRANT_BOUNCED,
}
SET_STATUS: dict[State, Event] = {
    READY: Event.SET_STATUS_READY, MAINTENANCE: Event.SET_STATUS_MAINTENANCE,
    DIRTY: Event.SET_STATUS_DIRTY, ALLOCATED: Event.SET_STATUS_ALLOCATED,
}

_STALE_CLAIM = "{event} for node {name}: the claim is stale (it is {state}); nothing changed"
# What a refusal says, by event ({id} {name} {owner} {state} {event} of the node);
# the others say _REFUSED.
_REFUSALS: dict[Event, str] = {
    **{event: f"node {{id}} cannot go from {{state}} to {target.value} by set_field"
       for target, event in SET_STATUS.items()},
    Event.REMOVE: "node {name} is {state} to {owner}; release it first or remove it with --force",
    Event.CLEAN: "node {name} is {state} to {owner}; it is cleaned when it is released",
    Event.CLEAN_DONE_OK: _STALE_CLAIM.replace("{event}", "clean_done"),
    Event.CLEAN_DONE_FAILED: _STALE_CLAIM.replace("{event}", "clean_done"),
    Event.CLEAN_ABANDON: _STALE_CLAIM,
}
_REFUSED = "node {name} is {state}: {event} does not apply to a {state} node"

NodeView = Node | NodeRecord | None  # an ORM node, a PoolState record, or no node


def released(maintenance_reason: str | None, cleaning: bool) -> State:
    """Where a node its job let go goes: maintenance if a reason was recorded while it
    was allocated, else dirty when released nodes are cleaned, else ready."""
    if maintenance_reason:
        return MAINTENANCE
    return DIRTY if cleaning else READY


def next_state(node: NodeView, event: Event, cleaning: bool = False) -> State | None:
    """The state event moves node to (None: gone); Conflict if the table has no such move.

    cleaning: released nodes are cleaned (a cleaning_command is configured).
    """
    try:
        target = TRANSITIONS[None if node is None else node.state, event]
    except KeyError:
        raise refusal(node, event) from None
    if isinstance(target, Outcome):  # RELEASED: TRANSITIONS holds no UNCHANGED
        assert node is not None  # only nodes that are there are released
        return released(node.maintenance_reason, cleaning)
    return target


def refused_mid_cleaning(state: State | str | None, event: Event) -> bool:
    """Whether this move waits for a cleaner's live claim on the node to end (or force)."""
    return (state, event) in _MID_CLEANING_REFUSED


def sources(event: Event) -> frozenset[State]:
    """The states event applies to (the nodes a query for it may pick)."""
    return frozenset(State(s) for (s, e) in TRANSITIONS if e is event and s is not None)


def refusal(node: NodeView, event: Event) -> errors.Conflict:
    if node is None:
        facts: dict[str, Any] = {"id": None, "name": None, "owner": None, "state": "gone"}
    else:
        facts = {"id": node.id, "name": node.name, "owner": node.owner,
                 "state": State(node.state).value}
    return errors.Conflict(_REFUSALS.get(event, _REFUSED).format(**facts, event=event.value))


# --- the table as docs/architecture.md shows it -------------------------------------

def markdown_table() -> str:
    """The table in Markdown, one line per row of ROWS."""
    lines = ["| from | event (operation) | to | who may cause it | code |",
             "|---|---|---|---|---|"]
    for row in ROWS:
        cause = CAUSES[row.event]
        came = ", ".join("—" if s is None else s.value for s in row.sources)
        to = "gone" if row.target is None else row.target.value
        if row.mid_cleaning_refused:
            to += " (refused while a cleaner's claim is live, unless forced)"
        if row.note:
            to += f"; {row.note}"
        lines.append(f"| {came} | {cause.how} | {to} | {cause.who.value} | {cause.where} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
