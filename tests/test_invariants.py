"""A seeded random workload against the real database, then the pool's invariants by SQL.

The loop also keeps a small model of every node (pool, state, owner) built only
from what the pool functions returned, and checks each operation's outcome
(which nodes, which error) against it, so a wrong node or a wrong error is
caught where it happens, not only at the end.
"""

from __future__ import annotations

import random
import time
from collections import Counter

from sqlalchemy import text

from molteniron import errors, pool

POOLS = ("p0", "p1", "p2")
OWNERS = tuple(f"owner{i}" for i in range(12))
STATES = {"ready", "allocated", "dirty", "maintenance"}
OPERATIONS = 3000


class Model:
    def __init__(self):
        self.nodes: dict[int, dict] = {}      # id -> {"pool", "state", "owner", "name"}

    def ready(self, node_pool):
        return sorted(i for i, n in self.nodes.items()
                      if n["pool"] == node_pool and n["state"] == "ready")

    def capacity(self, node_pool):
        return sum(1 for n in self.nodes.values()
                   if n["pool"] == node_pool and n["state"] != "maintenance")

    def owned(self, owner):
        return sorted(i for i, n in self.nodes.items() if n["owner"] == owner)


def run_workload(session, seed):
    rng = random.Random(seed)
    model = Model()
    added: set[str] = set()
    requests: dict[str, list[int]] = {}    # request id -> node ids it was granted and holds
    outcomes = Counter()
    serial = 0

    def expect(error_type, call):
        """Run call; it must raise exactly error_type (or succeed if None)."""
        try:
            result = call()
        except errors.MoltenIronError as exc:
            session.rollback()
            assert type(exc) is error_type, (f"step {step}: expected "
                                             f"{getattr(error_type, '__name__', 'success')}, "
                                             f"got {type(exc).__name__}: {exc.message}")
            outcomes[type(exc).__name__] += 1
            return None
        session.commit()
        assert error_type is None, f"step {step}: expected {error_type.__name__}, got success"
        outcomes["ok"] += 1
        return result

    for step in range(OPERATIONS):
        roll = rng.random()
        if roll < 0.16 or not model.nodes:                      # add a node
            if added and rng.random() < 0.1:
                name = rng.choice(sorted(added))
                expect(errors.DuplicateNode, lambda: pool.add_baremetal(
                    session, name, "10.0.0.1", "u", "p", "10.1.0.1", "aa", "x86", 1, 1, 1,
                    rng.choice(POOLS)))
                continue
            serial += 1
            name = f"node{serial:05d}"
            node_pool = rng.choice(POOLS)
            kind = rng.randrange(3)
            if kind == 0:
                call = lambda: pool.add_baremetal(
                    session, name, f"10.0.{serial // 256}.{serial % 256}", "u", "p",
                    f"10.9.0.{serial % 256},10.9.1.{serial % 256}", "aa:bb", "x86_64",
                    rng.randint(1, 64), 1024, 10, node_pool)
            elif kind == 1:
                call = lambda: pool.add_keyvalue_pairs(
                    session, name, "10.0.0.1", "10.9.0.1", ["cpus=2", 'ipmi_user="u"'],
                    node_pool)
            else:
                call = lambda: pool.add_json_blob(
                    session, name, "10.0.0.1", "10.9.0.1", '{"cpus": 4, "rack": "r1"}',
                    node_pool)
            node = expect(None, call)
            added.add(name)
            model.nodes[node.id] = {"pool": node_pool, "state": "ready", "owner": None,
                                    "name": name}
        elif roll < 0.45:                                       # allocate
            owner, node_pool = rng.choice(OWNERS), rng.choice(POOLS)
            count = rng.choice((1, 1, 1, 2, 2, 3, 5, 8, 0))
            ready = model.ready(node_pool)
            if count < 1:
                error = errors.BadRequest
            elif len(ready) >= count:
                error = None
            elif count > model.capacity(node_pool):
                error = errors.PoolTooSmall
            else:
                error = errors.NotEnoughNodes
            request_id = f"req{step}"
            got = expect(error, lambda: pool.allocate(session, owner, count, node_pool,
                                                      request_id=request_id))
            if got is not None:
                assert [n.id for n in got] == ready[:count], f"step {step}: not lowest ids"
                for node in got:
                    model.nodes[node.id].update(state="allocated", owner=owner)
                requests[request_id] = [n.id for n in got]
        elif roll < 0.62:                                       # release an owner
            owner = rng.choice(OWNERS)
            owned = model.owned(owner)
            got = expect(None if owned else errors.OwnerNotFound,
                         lambda: pool.release(session, owner))
            if got is not None:
                assert sorted(n.id for n in got) == owned
                for node in got:
                    model.nodes[node.id].update(state="ready", owner=None)
                for ids in requests.values():
                    ids[:] = [i for i in ids if i not in owned]
        elif roll < 0.67:                                       # release one request
            if not requests:
                continue
            request_id = rng.choice(sorted(requests))
            held = sorted(requests.pop(request_id))
            got = expect(None, lambda: pool.release_request(session, request_id))
            assert sorted(n.id for n in got) == held, f"step {step}: release_request"
            for node_id in held:
                model.nodes[node_id].update(state="ready", owner=None)
        elif roll < 0.80:                                       # maintenance toggles
            node_id = rng.choice(sorted(model.nodes))
            current = model.nodes[node_id]["state"]
            target = rng.choice(("maintenance", "maintenance", "ready", "allocated"))
            if target == current:
                error = None
            elif current == "allocated" or target == "allocated":
                error = errors.Conflict
            else:
                error = None
            if expect(error, lambda: pool.set_field(session, node_id, "status", target)):
                model.nodes[node_id]["state"] = target
        elif roll < 0.86:                                       # move a node to another pool
            node_id = rng.choice(sorted(model.nodes))
            target = rng.choice(POOLS)
            error = errors.Conflict if model.nodes[node_id]["state"] == "allocated" else None
            if expect(error, lambda: pool.set_field(session, node_id, "node_pool", target)):
                model.nodes[node_id]["pool"] = target
        elif roll < 0.92:                                       # other set_field calls
            node_id = rng.choice(sorted(model.nodes))
            case = rng.randrange(6)
            if case == 0:
                expect(None, lambda: pool.set_field(session, node_id, "cpus",
                                                    str(rng.randint(0, 99)), "int"))
            elif case == 1:
                expect(None, lambda: pool.set_field(session, node_id, "port_hwaddr",
                                                    f"aa:{step % 256:02x}"))
            elif case == 2:
                expect(errors.BadRequest, lambda: pool.set_field(session, node_id, "cpus", "x"))
            elif case == 3:
                expect(errors.BadRequest, lambda: pool.set_field(session, node_id, "owner",
                                                                 rng.choice(OWNERS)))
            elif case == 4:
                other = rng.choice(sorted(added))
                same = other == model.nodes[node_id]["name"]
                expect(None if same else errors.DuplicateNode,
                       lambda: pool.set_field(session, node_id, "name", other))
            else:
                expect(errors.NodeNotFound, lambda: pool.set_field(
                    session, max(model.nodes) + 1000, "cpus", "1", "int"))
        else:                                                   # reads
            owner = rng.choice(OWNERS)
            owned = model.owned(owner)
            got = expect(None if owned else errors.OwnerNotFound,
                         lambda: pool.get_field(session, owner, "provisioned"))
            if got is not None:
                assert got == [(i, owner) for i in owned]
    return model, added, outcomes


def test_random_workload_keeps_the_pool_consistent(session, engine):
    started = time.monotonic()
    model, added, outcomes = run_workload(session, seed=20240517)
    elapsed = time.monotonic() - started
    session.close()

    # The workload really exercised both the success and the error paths.
    assert outcomes["ok"] > 1500
    for kind in ("NotEnoughNodes", "PoolTooSmall", "OwnerNotFound", "Conflict",
                 "DuplicateNode", "BadRequest", "NodeNotFound"):
        assert outcomes[kind] > 0, (kind, outcomes)
    assert elapsed < 60, f"workload took {elapsed:.1f} s"

    with engine.connect() as conn:
        nodes = conn.execute(text(
            "SELECT id, name, node_pool, state, owner, allocated_at FROM nodes")).all()
        open_rows = conn.execute(text(
            "SELECT node_id, owner, node_name FROM allocations WHERE ended_at IS NULL")).all()
        closed_without_reason = conn.execute(text(
            "SELECT COUNT(*) FROM allocations WHERE ended_at IS NOT NULL "
            "AND end_reason IS NULL")).scalar()

    by_id = {n.id: n for n in nodes}
    open_by_node: dict[int, list] = {}
    for r in open_rows:
        open_by_node.setdefault(r.node_id, []).append(r)

    # None vanished, none appeared.
    assert {n.name for n in nodes} == added
    assert len(nodes) == len(added)
    for n in nodes:
        assert n.state in STATES, n
        if n.state == "allocated":
            assert n.owner is not None and n.allocated_at is not None, n
            rows = open_by_node.get(n.id, [])
            assert len(rows) == 1, (n, rows)
            assert rows[0].owner == n.owner and rows[0].node_name == n.name, (n, rows)
        else:
            assert n.owner is None and n.allocated_at is None, n
            assert n.id not in open_by_node, (n, open_by_node.get(n.id))
    # No open history row for a node that is not allocated (or no longer exists).
    for node_id in open_by_node:
        assert node_id in by_id and by_id[node_id].state == "allocated", node_id
    assert closed_without_reason == 0
    # The database agrees with what the pool functions reported along the way.
    assert {n.id: (n.node_pool, n.state, n.owner) for n in nodes} == {
        i: (m["pool"], m["state"], m["owner"]) for i, m in model.nodes.items()}
