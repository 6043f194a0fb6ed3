"""The node state table (molteniron/node_states.py) against the three things that must
agree with it: the docs page that shows it, the authorization that says who may send
each operation, and the pool functions that move nodes in the database.

The docs table is written by node_states.markdown_table(): the test compares the page's
"Node states" table with it line by line (regenerate it with
`python -m molteniron.node_states`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from molteniron import errors, node_states, pool
from molteniron.models import Allocation, EndReason, Node, State
from molteniron.node_record import NodeRecord
from molteniron.node_states import CAUSES, ROWS, TRANSITIONS, Event, Outcome, Who
from molteniron.protocol import OPERATIONS, Request
from molteniron.workers import authz
from molteniron.workers.state import PoolState

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 3, 4, 5, 6, 7)
LEASE = timedelta(hours=1)
REQUEST = "5f0c2b8e-1d2a-4c3b-9e8f-0a1b2c3d4e5f"


# --- the docs page -------------------------------------------------------------------

def docs_table() -> list[str]:
    """The lines of the Markdown table in docs/architecture.md's "Node states" section."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("\n## Node states\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|")]


def test_the_docs_table_is_the_module_table():
    assert docs_table() == node_states.markdown_table().splitlines(), (
        "docs/architecture.md's Node states table differs from molteniron/node_states.py: "
        "paste the output of `python -m molteniron.node_states` into the page")


def test_released_is_maintenance_if_asked_else_dirty_with_cleaning_else_ready():
    assert node_states.released("disk errors", cleaning=False) == State.MAINTENANCE
    assert node_states.released("disk errors", cleaning=True) == State.MAINTENANCE
    assert node_states.released(None, cleaning=True) == State.DIRTY
    assert node_states.released(None, cleaning=False) == State.READY


def test_every_event_has_rows_a_cause_and_no_pair_twice():
    pairs = [(s, row.event) for row in ROWS for s in row.sources]
    assert len(pairs) == len(set(pairs)) == len(TRANSITIONS)
    assert {row.event for row in ROWS} == set(Event) == set(CAUSES)


def test_a_pair_not_in_the_table_is_a_conflict_naming_node_state_and_event():
    record = NodeRecord(
        id=7, name="node-7", ipmi_ip="10.0.0.7", ipmi_user="", ipmi_password="",
        port_hwaddr="", cpu_arch="", cpus=0, ram_mb=0, disk_gb=0, allocation_pool=[],
        state="ready", owner=None, holder_user=None, allocated_at=None, lease_expires_at=None,
        node_pool="default", extra={}, tags=[], maintenance_reason=None, clean_claim=None,
        clean_claimed_until=None)
    with pytest.raises(errors.Conflict) as refused:
        node_states.next_state(record, Event.RELEASE)
    assert refused.value.status == 409
    assert refused.value.message == ("node node-7 is ready: release does not apply to a "
                                     "ready node")


# --- who may cause each event --------------------------------------------------------

ADMIN, USER, OTHER = "admin", "alice", "bob"
AUTHZ = authz.Authorizer((ADMIN,))


def allowed(op: str, user: str, owner_held_by: str | None = None,
            request_sent_by: str | None = None) -> bool:
    request = Request(str(uuid.uuid4()), op, {"owner": "job", "request_id": REQUEST}, user=user)
    try:
        AUTHZ.check(request, lambda owner: owner_held_by, lambda rid: request_sent_by)
    except errors.Forbidden:
        return False
    return True


def test_every_operation_that_changes_the_pool_causes_an_event():
    caused = {op for cause in CAUSES.values() for op in cause.ops}
    assert caused <= OPERATIONS.keys()
    assert caused == {name for name, op in OPERATIONS.items() if op.mutates}


@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value)
def test_authorization_lets_exactly_the_tables_who_cause_the_event(event):
    who, ops = CAUSES[event].who, CAUSES[event].ops
    if who is Who.WORKER:  # a tick, or no request at all (a broker return)
        assert all(OPERATIONS[op].internal and op in authz.WORKER_OPS for op in ops)
        return
    assert ops
    for op in ops:
        assert allowed(op, ADMIN, owner_held_by=OTHER, request_sent_by=OTHER)
        if who in (Who.ADMIN, Who.CLEANER):
            assert op in authz.ADMIN_ONLY and op not in authz.USER_OPS
            assert not allowed(op, USER, owner_held_by=USER, request_sent_by=USER)
        elif who in (Who.OWNERS_USER, Who.ANY_USER):
            assert op in authz.OWNER_OPS and op in authz.USER_OPS
            assert allowed(op, USER, owner_held_by=USER)
            assert not allowed(op, USER, owner_held_by=OTHER)
            assert allowed(op, USER, owner_held_by=None)  # allocate binds, others: 404
        else:
            assert who is Who.SENDER
            assert op in authz.USER_OPS
            assert allowed(op, USER, request_sent_by=USER)
            assert not allowed(op, USER, request_sent_by=OTHER)


# --- every state x event through the real functions, in the database ------------------

@dataclass
class Case:
    """A node set up in one state, and what an event needs to address it."""
    node_id: int
    owner: str | None = None
    claim: str | None = None          # a live cleaner's claim on the node
    cleaning: bool = False            # released nodes are cleaned


def add_node(session) -> int:
    return pool.add_baremetal(session, "n1", "10.0.0.1", "admin", "s3cret", "10.1.0.1",
                              "aa:bb:cc:dd:ee:ff", "x86_64", 8, 16384, 500).id


def in_memory(session, case: Case) -> PoolState:
    state = PoolState(clean_released=case.cleaning)
    state.load(session)
    return state


def allocated(session, cleaning: bool = False, reason: str | None = None) -> Case:
    case = Case(add_node(session), owner="job", cleaning=cleaning)
    state = in_memory(session, case)
    state.allocate("job", 1, "default", REQUEST, NOW, NOW + LEASE, USER)
    state.flush(session, NOW)
    if reason:
        pool.set_maintenance(session, case.node_id, True, reason, NOW)
    return case


def dirty(session, claimed: bool = False, maintenance: bool = False) -> Case:
    case = Case(add_node(session))
    in_memory_event(session, case, lambda st: st.requeue(case.node_id))
    if claimed:
        record = in_memory_event(session, case, lambda st: st.claim_dirty("wiper", NOW, 600))
        assert record is not None
        case.claim = record.clean_claim
    if maintenance:
        pool.set_maintenance(session, case.node_id, True, "look at it", NOW)
    return case


def in_maintenance(session) -> Case:
    case = Case(add_node(session))
    pool.set_maintenance(session, case.node_id, True, "disk errors", NOW)
    return case


SETUPS = {
    "ready": lambda s: Case(add_node(s)),
    "allocated": allocated,
    "allocated-cleaning": lambda s: allocated(s, cleaning=True),
    "allocated-maintenance-asked": lambda s: allocated(s, reason="disk errors"),
    "dirty": dirty,
    "dirty-claimed": lambda s: dirty(s, claimed=True),
    "maintenance": in_maintenance,
    "maintenance-claimed": lambda s: dirty(s, claimed=True, maintenance=True),
}


def in_memory_event(session, case: Case, act):
    """An event the worker decides in memory: as it does it, then its flush; what act gave."""
    state = in_memory(session, case)
    done = act(state)
    state.flush(session, NOW)
    return done


def set_status(target: State):
    return lambda session, case: pool.set_field(session, case.node_id, "status", target.value,
                                                now=NOW)


APPLY = {
    Event.ADD: lambda s, c: add_node(s),
    Event.ALLOCATE: lambda s, c: in_memory_event(s, c, lambda st: st.allocate(
        "job-2", 1, "default", str(uuid.uuid4()), NOW, NOW + LEASE, USER)),
    Event.RENEW: lambda s, c: in_memory_event(
        s, c, lambda st: st.renew(c.owner or "job", NOW + 2 * LEASE)),
    Event.RELEASE: lambda s, c: in_memory_event(
        s, c, lambda st: st.release_owner(c.owner or "job", EndReason.RELEASED, NOW)),
    Event.LEASE_EXPIRY: lambda s, c: in_memory_event(
        s, c, lambda st: st.expire(NOW + 2 * LEASE)),
    Event.CANCEL: lambda s, c: in_memory_event(
        s, c, lambda st: st.release_request(REQUEST, EndReason.CANCELLED, NOW)),
    # What grants.settle does with a grant that bounced.
    Event.GRANT_BOUNCED: lambda s, c: in_memory_event(
        s, c, lambda st: st.release_request(REQUEST, EndReason.CLIENT_GONE, NOW)),
    Event.MAINTENANCE_ON: lambda s, c: in_memory_event(
        s, c, lambda st: st.set_maintenance(c.node_id, True, "fan", NOW)),
    Event.MAINTENANCE_OFF: lambda s, c: in_memory_event(
        s, c, lambda st: st.set_maintenance(c.node_id, False, None, NOW)),
    **{event: set_status(target) for target, event in node_states.SET_STATUS.items()},
    Event.CLEAN_CLAIM: lambda s, c: in_memory_event(
        s, c, lambda st: st.claim_dirty("wiper-2", NOW, 600)),
    Event.CLEAN_DONE_OK: lambda s, c: in_memory_event(
        s, c, lambda st: st.finish_cleaning(c.node_id, c.claim or "wiper#stale", True, None)),
    Event.CLEAN_DONE_FAILED: lambda s, c: in_memory_event(
        s, c, lambda st: st.finish_cleaning(c.node_id, c.claim or "wiper#stale", False, "fans")),
    Event.CLEAN_ABANDON: lambda s, c: in_memory_event(
        s, c, lambda st: st.abandon_claim(c.node_id, c.claim or "wiper#stale")),
    Event.CLEAN: lambda s, c: in_memory_event(s, c, lambda st: st.requeue(c.node_id)),
    Event.REMOVE: lambda s, c: pool.remove_node(s, c.node_id, False, NOW),
    Event.REMOVE_FORCED: lambda s, c: pool.remove_node(s, c.node_id, True, NOW),
    Event.DELETE_DB: lambda s, c: pool.delete_db(s, NOW),
}
# Events whose functions find their nodes (by owner, request, lease or state) rather than
# being told one: a node they may not move is not found, and they change nothing.
FINDING = {Event.ALLOCATE, Event.RENEW, Event.RELEASE, Event.LEASE_EXPIRY, Event.CANCEL,
           Event.GRANT_BOUNCED, Event.CLEAN_CLAIM}
CLAIM_REPORTS = {Event.CLEAN_DONE_OK, Event.CLEAN_DONE_FAILED, Event.CLEAN_ABANDON}


def database(session) -> tuple:
    """Every node's row and every allocation, read fresh (pending ORM changes flushed)."""
    nodes = session.execute(select(
        Node.id, Node.state, Node.owner, Node.holder_user, Node.allocated_at,
        Node.lease_expires_at, Node.maintenance_reason, Node.clean_claim,
        Node.clean_claimed_until).order_by(Node.id)).all()
    allocations = session.execute(select(
        Allocation.node_id, Allocation.owner, Allocation.ended_at, Allocation.end_reason)
        .order_by(Allocation.id)).all()
    return [tuple(r) for r in nodes], [tuple(r) for r in allocations]


def state_of(session, node_id: int) -> State | None:
    return session.scalar(select(Node.state).where(Node.id == node_id))


def expected_move(before: State, event: Event, case: Case, reason: str | None):
    """The table's target for this node (None: gone), or "refused"."""
    target = TRANSITIONS.get((before, event), "refused")
    if target is Outcome.RELEASED:
        return node_states.released(reason, case.cleaning)
    # The claim rules (molteniron/cleaning.py, pool._refuse_mid_cleaning) refuse some
    # moves the table holds: reports without the node's claim, a claim on a claimed
    # node, and ready under a cleaner's live claim.
    if event in CLAIM_REPORTS and case.claim is None:
        return "refused"
    if case.claim is not None and (event is Event.CLEAN_CLAIM
                                   or node_states.refused_mid_cleaning(before, event)):
        return "refused"
    return target


@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.value.replace(" ", "_"))
@pytest.mark.parametrize("setup", list(SETUPS))
def test_an_event_moves_a_node_as_the_table_says_or_changes_nothing(session, setup, event):
    case = SETUPS[setup](session)
    session.commit()
    before = state_of(session, case.node_id)
    assert before is not None
    reason = session.scalar(select(Node.maintenance_reason).where(Node.id == case.node_id))
    expected = expected_move(before, event, case, reason)
    was = database(session)

    try:
        APPLY[event](session, case)
    except (errors.Conflict, errors.OwnerNotFound) as refusal:
        assert expected == "refused", f"{setup} x {event.value}: refused ({refusal.message})"
        assert isinstance(refusal, errors.Conflict) or event in FINDING, refusal
        if (before, event) not in TRANSITIONS and event not in FINDING | {Event.ADD}:
            assert before.value in refusal.message and (
                "n1" in refusal.message or f"node {case.node_id}" in refusal.message), refusal
        assert database(session) == was, f"{setup} x {event.value}: refused but changed"
        return
    if expected == "refused":
        assert event in FINDING, f"{setup} x {event.value}: done, but not in the table"
        assert database(session) == was, f"{setup} x {event.value}: not in the table, changed"
        return
    assert state_of(session, case.node_id) == expected, f"{setup} x {event.value}"


def test_an_added_node_is_in_the_state_the_table_says(session):
    node_id = add_node(session)
    assert state_of(session, node_id) == TRANSITIONS[None, Event.ADD] == State.READY
