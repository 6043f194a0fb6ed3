"""A seeded random workload through the worker's real path, checked after every batch.

PoolKeeper.commit gets random batches of requests (decoded as the worker decodes
them; maintenance and the cleaners' operations among them, with and without a
cleaning_command), the interim replies of clients that went away and grant outcomes from the
broker, the way the worker hands them over. Between batches a keeper may be told
to reload, a batch may fail (its flush breaks, or the database refuses it), and a
second keeper may take the pool over. After every batch that commits, what the
keeper holds in memory must equal the database, and the database must keep the
pool's invariants; after every batch that fails, the database must be unchanged.
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from molteniron import errors, pool, protocol
from molteniron.config import Config
from molteniron.models import Base, Node
from molteniron.node_record import NodeRecord
from molteniron.workers import keeper as keeper_module
from molteniron.workers.batch import Batch
from tests.conftest import empty_tables
from tests.keeper import Properties

SEED = 20240517
BATCHES = 400
POOLS = ("p0", "p1", "p2")
OWNERS = tuple(f"owner{i}" for i in range(8))
DOOMED = "doomed"  # the database refuses to record an allocation for this owner
MAX_NODES = 36
PASSWORD = "ipmi-secret-7"  # a clean_claim reply carries it; no stored reply may
CLEANERS = ("cleaner-a", "cleaner-b")
REASONS = (None, None, "disk errors", "fan")


class InjectedFailure(Exception):
    """A batch's transaction breaks after its writes were sent (then it rolls back)."""


class Clock:
    """The time the keeper stamps on each batch, moved on by the test.

    Leases and waits of a few seconds end without the test sleeping, and the
    run is the same every time for a given seed.
    """

    def __init__(self):
        self.now = pool.utcnow()
        self.unix = time.time()

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.unix += seconds

    def batch(self, connection, make_session) -> Batch:
        return Batch(connection, make_session, now=self.now, clock=self.unix)


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(keeper_module, "Batch", clock.batch)
    return clock


@pytest.fixture(params=[False, True], ids=["no_cleaning", "cleaning"])
def cleaning(request) -> bool:
    """Whether released nodes are dirty until a cleaner reports them clean."""
    return request.param


@pytest.fixture
def keepers(engine, database_url, cleaning):
    """Two workers' keepers over the same, empty pool."""
    empty_tables(engine)
    # A claim lasts cleaning_timeout + a minute: a few dozen batches of the run.
    config = (Config(db_url=database_url, cleaning_command="/bin/true", cleaning_timeout=1.0)
              if cleaning else Config(db_url=database_url))
    pair = (keeper_module.PoolKeeper(config, "worker-a"),
            keeper_module.PoolKeeper(config, "worker-b"))
    yield pair
    for keeper in pair:
        keeper.close()


@pytest.fixture
def database_refuses_doomed(engine):
    with engine.begin() as conn:
        conn.execute(text(
            f"CREATE TRIGGER refuse_doomed BEFORE INSERT ON allocations FOR EACH ROW "
            f"IF NEW.owner = '{DOOMED}' THEN "
            f"SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'allocation refused by the test'; "
            f"END IF"))
    yield
    with engine.begin() as conn:
        conn.execute(text("DROP TRIGGER IF EXISTS refuse_doomed"))


# --- the workload ---------------------------------------------------------------------

_serial = itertools.count(1)


def request(op, **args):
    """A request as the worker gets it: made by a client, decoded (defaults filled in).

    Its id counts up instead of being random, so the run is the same for a seed."""
    made = protocol.new_request(op, args)
    made.id = str(uuid.UUID(int=next(_serial)))
    return protocol.decode_request(made.to_body())


class Workload:
    """Random requests aimed at what the pool holds now (read from the active keeper)."""

    def __init__(self, rng: random.Random, cleaning: bool = False):
        self.rng = rng
        self.cleaning = cleaning
        self.serial = 0
        self.names: list[str] = []
        self.allocates: list[str] = []         # request ids of allocates sent so far
        self.handled: list[protocol.Request] = []  # committed requests, for redeliveries
        self.op_of: dict[str, str] = {}

    def next_batch(self, keeper) -> tuple[list, list]:
        rng = self.rng
        requests = [self.random_request(keeper) for _ in range(rng.randint(1, 6))]
        if self.handled and rng.random() < 0.05:  # the broker delivers one again
            requests.insert(rng.randrange(len(requests) + 1), rng.choice(self.handled[-200:]))
        returned = []
        waiting = sorted(keeper.waiters.by_request)
        if waiting and rng.random() < 0.08:  # a waiting client went away
            waiter = keeper.waiters.by_request[rng.choice(waiting)]
            returned.append((waiter.reply_to, {"id": waiter.request_id, "status": 202}))
        return requests, returned

    def random_request(self, keeper) -> protocol.Request:
        rng = self.rng
        nodes = sorted(keeper.state.nodes)
        roll = rng.random()
        if nodes and rng.random() < (0.25 if self.cleaning else 0.08):
            req = self.maintenance_or_cleaning(keeper, nodes)
        elif not nodes or (roll < 0.10 and len(nodes) < MAX_NODES):
            req = self.add_node()
        elif roll < 0.40:
            args: dict[str, Any] = dict(owner=rng.choice(OWNERS),
                                        count=rng.choice((1, 1, 1, 2, 2, 3, 5)),
                        node_pool=rng.choice(POOLS), wait=rng.random() < 0.6)
            if args["wait"]:
                args["wait_seconds"] = rng.choice((None, 0, 1, 5, 20))
            args["lease_seconds"] = rng.choice((None, 1, 2, 5, 30))
            req = request("allocate", **args)
            self.allocates.append(req.id)
        elif roll < 0.52:
            req = request("release", owner=rng.choice(OWNERS))
        elif roll < 0.58:
            req = request("renew", owner=rng.choice(OWNERS),
                          lease_seconds=rng.choice((None, 1, 5, 30)))
        elif roll < 0.64:
            target = (rng.choice(self.allocates[-30:]) if self.allocates and rng.random() < 0.9
                      else protocol.new_request("status").id)
            req = request("cancel", request_id=target)
        elif roll < 0.76:
            req = request("set_field", id=rng.choice(nodes), key="status",
                          value=rng.choice(("maintenance", "ready", "ready")))
        elif roll < 0.82:
            req = request("set_field", id=rng.choice(nodes), key="node_pool",
                          value=rng.choice(POOLS))
        elif roll < 0.87:
            req = request("status", **rng.choice(({}, {"node_pool": rng.choice(POOLS)},
                                                  {"owner": rng.choice(OWNERS)})))
        elif roll < 0.998:
            req = request("tick")
        else:
            req = request("delete_db")
        self.op_of[req.id] = req.op
        return req

    def maintenance_or_cleaning(self, keeper, nodes: list[int]) -> protocol.Request:
        """An admin's maintenance or clean, or a cleaner's claim, report or abandon; aimed
        at claimed nodes often enough to meet live, lapsed and stale claims."""
        rng = self.rng
        claimed = [i for i in nodes if keeper.state.nodes[i].clean_claim is not None]
        node_id = rng.choice(claimed) if claimed and rng.random() < 0.6 else rng.choice(nodes)
        record = keeper.state.nodes[node_id]
        ref: str | int = rng.choice((node_id, record.name, str(node_id)))
        if rng.random() < 0.03:
            ref = "no-such-node"
        token = (record.clean_claim if record.clean_claim and rng.random() < 0.85
                 else f"{rng.choice(CLEANERS)}#stale")
        roll = rng.random()
        if roll < 0.30:
            return self.sent(request("maintenance", node=str(ref),
                                     mode=rng.choice(("on", "off", "off")),
                                     reason=rng.choice(REASONS), force=rng.random() < 0.3))
        if roll < 0.55:
            return self.sent(request("clean_claim", cleaner=rng.choice((*CLEANERS, None))))
        if roll < 0.80:
            return self.sent(request("clean_done", node_id=node_id, claim=token,
                                     ok=rng.random() < 0.7,
                                     detail=rng.choice((None, "BMC unreachable")),
                                     ))
        if roll < 0.90:
            return self.sent(request("clean_abandon", node_id=node_id, claim=token))
        return self.sent(request("clean", node=str(ref)))

    def sent(self, req: protocol.Request) -> protocol.Request:
        self.op_of[req.id] = req.op
        return req

    def add_node(self) -> protocol.Request:
        rng = self.rng
        if self.names and rng.random() < 0.1:
            name = rng.choice(self.names)  # taken: 409
        else:
            self.serial += 1
            name = f"node{self.serial:04d}"
            self.names.append(name)
        return request("add_baremetal", name=name, ipmi_ip="10.0.0.1", ipmi_user="u",
                       ipmi_password=PASSWORD, allocation_pool=f"10.9.0.{self.serial % 256}",
                       port_hwaddr="aa:bb", cpu_arch="x86_64", cpus=rng.randint(1, 64),
                       ram_mb=1024, disk_gb=10, node_pool=rng.choice(POOLS))

    def doomed_allocate(self) -> protocol.Request:
        req = request("allocate", owner=DOOMED, count=1, node_pool=self.rng.choice(POOLS),
                      wait=False)
        self.op_of[req.id] = req.op
        return req

    def settle(self, in_outbox: set[str]) -> dict[str, str]:
        """What the broker says of grants sent earlier: most arrive, some come back."""
        outcomes = {}
        for request_id in sorted(in_outbox):
            if self.rng.random() < 0.5:
                outcomes[request_id] = "undo" if self.rng.random() < 0.15 else "delivered"
        return outcomes


def commit(keeper, requests, returned, settled):
    items = [(None, Properties(None if r.op == "tick" else f"reply-{r.id}", r.id), r)
             for r in requests]
    return keeper.commit(items, list(returned), dict(settled))


def writes_then_fail(self):
    """Batch.commit broken after its writes reached the database, before the COMMIT."""
    if self.orm_session is not None:
        self.orm_session.flush()
    self.send_writes()
    raise InjectedFailure("the transaction broke after the pool's writes")


# --- what must hold ---------------------------------------------------------------------

def snapshot(engine) -> dict[str, list[dict]]:
    """Every row of every table."""
    with engine.connect() as conn:
        return {table.name: [dict(r._mapping) for r in conn.execute(
                    select(table).order_by(*table.primary_key.columns))]
                for table in Base.metadata.sorted_tables}


def grouped(pairs) -> dict:
    groups = defaultdict(set)
    for key, value in pairs:
        groups[key].add(value)
    return dict(groups)


def non_empty(mapping) -> dict:
    return {k: v for k, v in mapping.items() if v}


def assert_consistent(keeper, engine, in_outbox: set[str]) -> None:
    state, waiters = keeper.state, keeper.waiters
    with Session(engine) as session:
        records = {n.id: NodeRecord.from_node(n) for n in session.scalars(select(Node))}
        conn = session.connection()
        open_rows = conn.execute(text(
            "SELECT node_id, node_name, owner, request_id FROM allocations "
            "WHERE ended_at IS NULL")).all()
        closed_without_reason = conn.execute(text(
            "SELECT COUNT(*) FROM allocations WHERE ended_at IS NOT NULL "
            "AND end_reason IS NULL")).scalar()
        waiting_rows = [tuple(r) for r in conn.execute(text(
            "SELECT id, request_id, node_pool, count, owner, reply_to, correlation_id, "
            "deadline, lease_seconds FROM waiting_requests ORDER BY id"))]
        stored_for_waiters = conn.execute(text(
            "SELECT COUNT(*) FROM processed_requests p JOIN waiting_requests w "
            "ON w.request_id = p.request_id")).scalar()
        outbox_rows = {r[0] for r in conn.execute(text("SELECT request_id FROM grant_outbox"))}

    # Memory holds exactly the database's nodes.
    assert state.nodes == records
    nodes = records.values()
    allocated = {n.id for n in nodes if n.state == "allocated"}

    # The indexes agree with the records.
    assert non_empty(state.ready) == grouped(
        (n.node_pool, n.id) for n in nodes if n.state == "ready")
    assert non_empty(state.owned) == grouped(
        (n.owner, n.id) for n in nodes if n.owner is not None)
    assert non_empty(state.capacity_of) == dict(Counter(
        n.node_pool for n in nodes if n.state != "maintenance"))
    assert {i: until.isoformat(timespec="seconds") for i, until in state.leases.items()} == {
        n.id: n.lease_expires_at for n in nodes if n.state == "allocated"}
    # Its heaps may hold stale entries, never miss a live one: allocate and expire pop them.
    for node_pool, ready in state.ready.items():
        assert ready <= set(state._ready_heap[node_pool]), node_pool
    assert set(state.leases.items()) <= {(i, until) for until, i in state._lease_heap}

    # Every allocated node has one owner, one open history row, its lease, its request.
    for n in nodes:
        assert (n.owner is None) == (n.state != "allocated"), n
        assert (n.allocated_at is None) == (n.state != "allocated"), n
    assert sorted(r.node_id for r in open_rows) == sorted(allocated)
    for r in open_rows:
        assert (r.owner, r.node_name) == (records[r.node_id].owner,
                                          records[r.node_id].name), r
    assert closed_without_reason == 0
    owned = [i for ids in state.owned.values() for i in ids]
    assert len(owned) == len(set(owned)) == len(allocated)  # no node owned twice
    assert state.request_of == {r.node_id: r.request_id for r in open_rows}
    assert non_empty(state.granted) == grouped(
        (r.request_id, r.node_id) for r in open_rows if r.request_id is not None)

    # The waiting rows are the waiters in memory, in FIFO order per pool.
    in_memory = sorted((w.row_id, w.request_id, w.node_pool, w.count, w.owner, w.reply_to,
                        w.correlation_id, w.deadline, w.lease_seconds)
                       for w in waiters.by_request.values())
    assert in_memory == waiting_rows
    for node_pool, queue in waiters.by_pool.items():
        assert queue, node_pool
        row_ids = [w.row_id for w in queue.values()]
        assert row_ids == sorted(row_ids), node_pool
        assert all(w.node_pool == node_pool for w in queue.values())
    assert non_empty(waiters.by_owner) == grouped(
        (w.owner, w.request_id) for w in waiters.by_request.values())
    assert stored_for_waiters == 0  # a waiter's answer is not known yet

    # Nodes never sit ready while the head waiter of their pool would fit, and a head
    # waiter the pool can never serve has been told so.
    for node_pool, queue in waiters.by_pool.items():
        head = next(iter(queue.values()))
        assert head.count > len(state.ready.get(node_pool, ())), (node_pool, head)
        assert head.count <= state.capacity(node_pool), (node_pool, head)

    assert outbox_rows == in_outbox


def take_over(newcomer, fenced, work: Workload, engine, requests, returned, settled):
    """newcomer takes the pool with this batch; the keeper it replaced may not write again."""
    newcomer.stand_by()  # a new consumer: its next batch takes a new epoch
    batch = commit(newcomer, requests, returned, settled)
    before = snapshot(engine)
    with pytest.raises(errors.NotActiveWorker):
        # With grant outcomes of its own: it must not even mark a returned grant.
        commit(fenced, *work.next_batch(fenced), settled)
    assert snapshot(engine) == before, "a fenced keeper wrote"
    return batch


def after_failure(before, settled):
    """The database after a failed batch: as before, but for grants known to have come back.

    Those are marked in a transaction of their own before anything is undone, so
    that the undo survives whatever happens to the batch.
    """
    undone = {rid for rid, outcome in settled.items() if outcome == "undo"}
    for row in before["grant_outbox"]:
        if row["request_id"] in undone:
            row["returned"] = True
    return before


# --- the test ---------------------------------------------------------------------------

def test_random_batches_keep_memory_and_database_consistent(
        engine, keepers, clock, database_refuses_doomed, monkeypatch, cleaning):
    rng = random.Random(SEED)
    work = Workload(rng, cleaning)
    active, standby = keepers
    in_outbox: set[str] = set()    # grants the database keeps until the broker settles them
    settled: dict[str, str] = {}   # outcomes waiting for the next transaction
    seen: Counter = Counter()  # (op, status, error) of each reply, and named events
    retry = None

    for step in range(BATCHES):
        clock.advance(rng.choice((0, 0, 0.5, 1, 2, 4)))
        requests, returned = retry or work.next_batch(active)
        retry = None
        settled.update(work.settle(in_outbox - settled.keys()))
        roll = rng.random()

        if roll < 0.03 and step > 0:  # a second worker takes the pool over
            batch = take_over(standby, active, work, engine, requests, returned, settled)
            active, standby = standby, active
            seen["takeover"] += 1
        else:
            if roll < 0.06:
                active.reload_needed = True  # a reload changes nothing memory should hold
                seen["reload"] += 1
            failure = None
            if 0.06 <= roll < 0.10:
                failure = "flush"
            elif 0.10 <= roll < 0.16:
                failure = "doomed"
                requests = [*requests, work.doomed_allocate()]
            before = snapshot(engine) if failure else None
            try:
                with monkeypatch.context() as patch:
                    if failure == "flush":
                        patch.setattr(Batch, "commit", writes_then_fail)
                    batch = commit(active, requests, returned, settled)
            except (InjectedFailure, DBAPIError) as exc:
                assert failure is not None, f"step {step}: {exc!r}"
                if isinstance(exc, DBAPIError):
                    assert "refused by the test" in str(exc), exc
                assert snapshot(engine) == after_failure(before, settled), (
                    f"step {step}: a failed batch wrote")
                active.reload_needed = True  # what the worker does after a failed commit
                # Redelivered, without the request the database refuses (the worker
                # dead-letters it); the outcomes are settled by the next transaction.
                retry = ([r for r in requests if r.args.get("owner") != DOOMED], returned)
                seen[f"failed_{failure}"] += 1
                seen["failed_with_undo"] += "undo" in settled.values()
                continue
            if failure == "doomed":  # it got nothing, or the database would have refused
                assert DOOMED not in active.state.owned
                seen["doomed_refused_in_memory"] += 1

        granted = {out.request_id for out in batch.replies if out.grant}
        in_outbox = ((in_outbox - settled.keys()) | granted) - batch.withdrawn_grants
        seen["undo"] += list(settled.values()).count("undo")
        settled = {}
        for req in requests:
            if req.op != "tick":
                assert any(out.request_id == req.id and out.correlation_id == req.id
                           for out in batch.replies), f"step {step}: {req.op} got no reply"
        asked = {r.id for r in requests}
        for out in batch.replies:
            op = work.op_of.get(out.request_id)
            seen[(op, out.reply["status"], out.reply.get("error"))] += 1
            if op == "clean_claim" and out.reply.get("claim"):
                (shown,) = out.reply["nodes"].values()  # the cleaner needs the password
                assert json.loads(shown["blob"])["ipmi_password"] == PASSWORD, out.reply
                seen["claimed"] += 1
            if op == "clean_done" and out.reply["status"] == 200:
                seen[f"cleaned_{out.reply['state']}"] += 1
            if out.grant and out.request_id not in asked:
                seen["waiter_served"] += 1
        work.handled.extend(r for r in requests if r.op != "tick")
        assert_consistent(active, engine, in_outbox)

    # The workload really went through every path it is meant to check.
    with engine.connect() as conn:
        endings = dict(conn.execute(text(
            "SELECT end_reason, COUNT(*) FROM allocations GROUP BY end_reason")).all())
    for reason in ("released", "expired", "cancelled", "client_gone"):
        assert endings.get(reason, 0) > 0, (reason, endings)
    for key in ("takeover", "reload", "failed_flush", "failed_doomed", "failed_with_undo",
                "undo", "waiter_served",
                ("allocate", 200, None), ("allocate", 202, None),
                ("allocate", 409, "NotEnoughNodes"), ("allocate", 409, "PoolTooSmall"),
                ("allocate", 408, "DeadlineExpired"), ("allocate", 409, "RequestCancelled"),
                ("release", 404, "OwnerNotFound"), ("renew", 200, None),
                ("add_baremetal", 409, "DuplicateNode"), ("set_field", 409, "Conflict"),
                ("maintenance", 200, None), ("maintenance", 404, "NodeNotFound"),
                ("clean_claim", 200, None), ("clean_done", 409, "Conflict"),
                ("clean_abandon", 409, "Conflict")):
        assert seen[key] > 0, (key, seen)
    if cleaning:
        for key in ("claimed", "cleaned_ready", "cleaned_maintenance",
                    ("clean_abandon", 200, None), ("clean", 200, None),
                    ("maintenance", 409, "Conflict")):  # ready refused under a live claim
            assert seen[key] > 0, (key, seen)
    else:
        assert seen[("clean", 409, "Conflict")] > 0, seen
        assert seen["claimed"] == 0, seen  # nothing is ever dirty
    with engine.connect() as conn:  # the claims' replies were stored without the password
        stored = [r for r, in conn.execute(text("SELECT reply FROM processed_requests"))]
    assert stored and not any(PASSWORD in reply for reply in stored)
