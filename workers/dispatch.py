"""Operation name -> handler. A handler returns the reply or raises MoltenIronError.

Two kinds: the NO_SAVEPOINT handlers work on the worker's PoolState and Waiters
and check everything before they change anything, so they need no savepoint (nor
the ORM); the rest call the ORM pool operations inside a savepoint, and the nodes
they change reach the PoolState by themselves (session events, workers/savepoint.py).
Pools that may have ready nodes again go in `batch.touched_pools`; the keeper
serves their waiters after every request.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from operator import attrgetter

from sqlalchemy import select

from molteniron import compat, errors, inventory, pool
from molteniron.config import ADMINS_OFF
from molteniron.history import allocation_history
from molteniron.models import EndReason, WorkerHeartbeat
from molteniron.node_record import NodeRecord
from molteniron.protocol import OPERATIONS, Request, parse_time
from molteniron.workers import cleaning
from molteniron.workers.authz import Authorizer
from molteniron.workers.batch import Batch
from molteniron.workers.cleaning import CleaningPolicy
from molteniron.workers.clock import skew_warning
from molteniron.workers.constraints import Constraints
from molteniron.workers.leases import LeasePolicy
from molteniron.workers.limits import UserLimits
from molteniron.workers.state import PoolState
from molteniron.workers.taken_back import taken_back
from molteniron.workers.waiters import Waiters


@dataclass
class Context:
    """What a handler may use besides the request."""
    batch: Batch
    state: PoolState
    waiters: Waiters
    leases: LeasePolicy
    reply_to: str | None
    correlation_id: str | None
    cleaning: CleaningPolicy = CleaningPolicy()
    authz: Authorizer = Authorizer(ADMINS_OFF)
    limits: UserLimits = UserLimits(2**31 - 1, 2**31 - 1, float("inf"))

    @property
    def now(self) -> datetime:
        """The batch's time (the database's): given by Batch.at() before any handler runs."""
        assert self.batch.now is not None
        return self.batch.now


Handler = Callable[[Context, Request], dict]
OK = {"status": 200}


def add_baremetal(ctx: Context, req: Request) -> dict:
    pool.add_baremetal(ctx.batch.session, **req.args)
    return dict(OK)


def add_keyvalue_pairs(ctx: Context, req: Request) -> dict:
    pool.add_keyvalue_pairs(ctx.batch.session, **req.args)
    return dict(OK)


def add_json_blob(ctx: Context, req: Request) -> dict:
    pool.add_json_blob(ctx.batch.session, **req.args)
    return dict(OK)


def allocate(ctx: Context, req: Request) -> dict:
    if ctx.authz.limited(req.user):
        req.args = ctx.limits.check_allocate(req.args)
    a = req.args
    ctx.leases.check(a["lease_seconds"])
    wants = Constraints.from_args(a)
    node_pool = a["node_pool"] or pool.DEFAULT_POOL
    total = ctx.state.capacity(node_pool, wants)
    if a["count"] > total:  # it could never be served: no point waiting
        raise pool.pool_too_small(node_pool, total, a["count"], wants.describe())
    quotas = ctx.waiters.quotas
    quotas.check_count(req.user, a["count"])
    if not quotas.allows(req.user, a["count"], ctx.state.held_by_user[req.user]):
        if not a["wait"]:
            raise errors.NotEnoughNodes(f"user {req.user} holds its quota of "
                                        f"{quotas.limit(req.user)} node(s) already")
        return _wait(ctx, req, node_pool, wants)
    # First come, first served: a new request may take only nodes no waiter could use.
    blocked = (ctx.waiters.blocked_nodes(ctx.state, node_pool)
               if ctx.waiters.has_waiting(node_pool) else set())
    if blocked is not None:
        try:
            records = ctx.state.allocate(a["owner"], a["count"], node_pool, req.id, ctx.now,
                                         ctx.leases.until(ctx.now, a["lease_seconds"]),
                                         req.user, wants, blocked)
            return compat.nodes_reply(records)
        except errors.NotEnoughNodes:
            if not a["wait"]:
                raise
    elif not a["wait"]:
        raise errors.NotEnoughNodes(f"Not enough available nodes found: earlier requests are "
                                    f"waiting for pool {node_pool}")
    return _wait(ctx, req, node_pool, wants)


def _wait(ctx: Context, req: Request, node_pool: str, wants: Constraints) -> dict:
    a = req.args
    if ctx.authz.limited(req.user):
        ctx.limits.check_waiting(req.user, ctx.waiters.count_of_user(req.user))
    return ctx.waiters.enqueue(ctx.batch, req.id, node_pool, a["count"], a["owner"],
                               ctx.reply_to, ctx.correlation_id, a["wait_seconds"],
                               a["lease_seconds"], req.user, wants, a["priority"])


def release(ctx: Context, req: Request) -> dict:
    owner = req.args["owner"]
    cancelled = ctx.waiters.cancel_owner(ctx.batch, owner)
    try:
        records = ctx.state.release_owner(owner, EndReason.RELEASED, ctx.now)
    except errors.OwnerNotFound:
        if cancelled:  # it held nothing, but it was waiting: that is a release too
            return {**OK, "released": 0, "cancelled_waiting": cancelled}
        _raise_if_taken_back(ctx, owner)
        raise
    ctx.batch.touched_pools.update(r.node_pool for r in records)
    return {**OK, "released": len(records), "cancelled_waiting": cancelled}


def _raise_if_taken_back(ctx: Context, owner: str) -> None:
    """An owner that holds nothing: NodesTakenBack if that is because they were taken."""
    lost = taken_back(ctx.batch, ctx.state, owner)
    if lost is not None:
        raise lost from None


def renew(ctx: Context, req: Request) -> dict:
    """Every node of the owner leased again, counted from now."""
    asked = req.args["lease_seconds"]
    ctx.leases.check(asked)
    until = ctx.leases.until(ctx.now, asked)
    try:
        records = ctx.state.renew(req.args["owner"], until)
    except errors.OwnerNotFound:
        _raise_if_taken_back(ctx, req.args["owner"])
        raise
    return {**OK, "renewed": len(records), "lease_expires_at": until.isoformat(timespec="seconds")}


def get_field(ctx: Context, req: Request) -> dict:
    return compat.field_reply(pool.get_field(ctx.batch.session, **req.args))


def set_field(ctx: Context, req: Request) -> dict:
    a = req.args
    pool.set_field(ctx.batch.session, a["id"], a["key"], a["value"], a["type"],
                   ctx.now, a["force"])
    return dict(OK)


def status(ctx: Context, req: Request) -> dict:
    """The matching nodes in id order, a page at a time when asked: the whole of a
    100,000-node pool in one reply held every other request back for over a second."""
    a = req.args
    if a["owner"] is not None:  # through the owner index: no walk over the whole pool
        ids = sorted(ctx.state.owned.get(a["owner"], ()))
    else:
        ids = ctx.state.sorted_ids()

    def shown(record: NodeRecord) -> dict | None:
        if (a["node_pool"] in (None, record.node_pool)
                and a["state"] in (None, record.state)):
            # New dicts: a later request of the same batch may change the node before the
            # reply is sent.
            return record.to_reply() if a["show_secrets"] else compat.without_secrets(record)
        return None

    return _page(ctx.state, ids, a["after_id"], a["limit"], shown)


def _page(state: PoolState, ids: list[int], after_id: int | None, limit: int | None,
          render: Callable[[NodeRecord], dict | None]) -> dict:
    """The reply holding render(node) of the nodes of `ids` (in order) above after_id for
    which it is not None, at most `limit` of them; next_after_id when more may follow."""
    start = 0 if after_id is None else bisect_right(ids, after_id)
    items, more = [], False
    for position in range(start, len(ids)):
        item = render(state.nodes[ids[position]])
        if item is not None:
            items.append(item)
            if len(items) == limit:
                more = position + 1 < len(ids)
                break
    reply = {**OK, "nodes": items}
    if more:
        reply["next_after_id"] = ids[position]
    return reply


def waiting(ctx: Context, req: Request) -> dict:
    """The waiting allocates in serving order; the ids of other users' requests hidden
    from a user who is not an admin (an id is not a permission, but need not be shown)."""
    now = ctx.now
    rows = [{"request_id": _shown_id(ctx, req, w.user, w.request_id), "owner": w.owner,
             "node_pool": w.node_pool, "count": w.count, "position": place,
             "waited_s": round((now - w.enqueued_at).total_seconds(), 3),
             "deadline": w.deadline,
             # For molteniron-web's queue page: who asked, for what, how urgently.
             "user": w.user, "priority": w.priority, "constraints": w.wants.to_row()}
            for place, w in ctx.waiters.rows(req.args["node_pool"])]
    return {**OK, "waiting": rows}


def workers(ctx: Context, req: Request) -> dict:
    """Workers seen in the last 30 s (active and standby), and what the active one holds.

    Times by the database's clock, as the heartbeats are written; clock_skew_s is each
    worker's own wall clock minus the database's, with a clock_warning past the
    threshold (workers/clock.py)."""
    now = ctx.now
    rows = ctx.batch.session.execute(
        select(WorkerHeartbeat.worker_id, WorkerHeartbeat.role, WorkerHeartbeat.seen_at,
               WorkerHeartbeat.clock_skew_s)
        .where(WorkerHeartbeat.seen_at >= now - timedelta(seconds=30))
        .order_by(WorkerHeartbeat.role, WorkerHeartbeat.worker_id))
    shown = []
    for worker_id, role, seen, skew in rows:
        # A heartbeat written in this very batch began after the batch read its time.
        row = {"worker_id": worker_id, "role": role,
               "seen_s_ago": max(0.0, round((now - seen).total_seconds(), 1)),
               "clock_skew_s": None if skew is None else round(skew, 1)}
        warning = skew_warning(skew)
        if warning:
            row["clock_warning"] = warning
        shown.append(row)
    return {**OK, "workers": shown, "waiting": len(ctx.waiters), "nodes": len(ctx.state.nodes)}


def maintenance(ctx: Context, req: Request) -> dict:
    a = req.args
    record = ctx.state.set_maintenance(a["node"], a["mode"] == "on", a["reason"], ctx.now,
                                       a["force"])
    cleaning.ready_again(ctx, record)
    return {**OK, "node": record.name, "state": record.state,
            "maintenance_reason": record.maintenance_reason}


def remove(ctx: Context, req: Request) -> dict:
    node = pool.remove_node(ctx.batch.session, req.args["node"], req.args["force"], ctx.now)
    return {**OK, "removed": node.name}


def delete_db(ctx: Context, req: Request) -> dict:
    ctx.waiters.cancel_all(ctx.batch, "delete_db emptied the pool")
    return {**OK, "removed": pool.delete_db(ctx.batch.session, now=ctx.now)}


def cancel(ctx: Context, req: Request) -> dict:
    """Whatever state the request is in, its client will not own nodes through it."""
    target = req.args["request_id"]
    batch = ctx.batch
    if target in ctx.waiters.by_request:
        ctx.waiters.cancel(batch, target, "cancelled by its client")
        return {**OK, "cancelled": "waiting"}
    stored = batch.read_stored_reply(target)
    if stored is not None and stored.op != "allocate":
        # Not an allocate: it cannot have granted nodes, and its reply must stay.
        return {**OK, "cancelled": "not_an_allocate", "released": 0}
    held = ctx.state.granted.get(target)
    sender = (ctx.state.nodes[next(iter(held))].holder_user if held
              else stored.user if stored is not None else req.user)
    released = ctx.state.release_request(target, EndReason.CANCELLED, ctx.now)
    batch.touched_pools.update(r.node_pool for r in released)
    batch.withdraw_grant(target)
    # Stored as the request's reply: served -> a redelivery is refused; unseen -> tombstone.
    batch.store_reply(target, "allocate", errors.RequestCancelled(
        "the request was cancelled by its client").to_reply(), sender)
    return {**OK, "cancelled": "served" if released else "not_waiting", "released": len(released)}


def history(ctx: Context, req: Request) -> dict:
    """Allocations, open and ended, newest first: from the database, through an index."""
    a = req.args
    since = parse_time(a["since"]) if a["since"] is not None else None
    until = parse_time(a["until"]) if a.get("until") is not None else None
    cursors: list[str] = []
    # One row more than asked: whether another page follows (next_after, as status pages).
    rows = allocation_history(ctx.batch.session, a["owner"], a["node"], since, a["limit"] + 1,
                              until, a.get("after"), cursors)
    more = len(rows) > a["limit"]
    del rows[a["limit"]:]
    for row in rows:
        row["request_id"] = _shown_id(ctx, req, row["user"], row["request_id"])
    reply = {**OK, "history": rows}
    if more:
        reply["next_after"] = cursors[len(rows) - 1]
    return reply


def _shown_id(ctx: Context, req: Request, sender: str | None, request_id: str | None):
    """request_id as `req`'s user may see it: None when another user sent it."""
    return request_id if ctx.authz.sees_request_of(req.user, sender) else None


def export(ctx: Context, req: Request) -> dict:
    """Every node as an inventory entry (passwords hidden unless show_secrets), from
    memory: by name in one reply, or a page at a time by id (the client sorts them)."""
    a = req.args
    reply = _page(ctx.state, ctx.state.sorted_ids(), a["after_id"], a["limit"],
                  lambda record: inventory.entry_of(record, a["show_secrets"]))
    if a["limit"] is None:
        reply["nodes"].sort(key=lambda entry: entry["name"])
    return reply


def import_(ctx: Context, req: Request) -> dict:
    """Add or update nodes by name from an inventory: all of it checked, then all or nothing."""
    return {**OK, **inventory.import_nodes(ctx.batch.session, req.args["inventory"])}


def summary(ctx: Context, req: Request) -> dict:
    """Each pool's nodes by state (cleaning: dirty with a live claim, counted in dirty too)
    and its waiting allocates: how many, the oldest wait, and the median and 95th
    percentile of how long they have waited so far. One walk of the pool in memory (about
    15 ms at 100,000 nodes): a page of status holds the worker 5 ms but shows 1,000 nodes."""
    now = ctx.now
    stamp = now.isoformat(timespec="seconds")  # the records' own format: compared as text
    pools: dict[str, dict] = {}

    def row(node_pool: str) -> dict:
        if node_pool not in pools:
            pools[node_pool] = {"node_pool": node_pool, "nodes": 0, "ready": 0, "allocated": 0,
                                "dirty": 0, "cleaning": 0, "maintenance": 0, "waiting": 0,
                                "oldest_wait_s": None, "wait_p50_s": None, "wait_p95_s": None}
        return pools[node_pool]

    for (node_pool, state, claimed_until), count in Counter(
            map(_POOL_STATE_CLAIM, ctx.state.nodes.values())).items():
        counts = row(node_pool)
        counts["nodes"] += count
        counts[state] += count
        if state == "dirty" and claimed_until is not None and claimed_until > stamp:
            counts["cleaning"] += count
    for node_pool, queue in ctx.waiters.by_pool.items():
        waits = sorted(max(0.0, (now - w.enqueued_at).total_seconds()) for w in queue.values())
        if waits:
            counts = row(node_pool)
            counts.update(waiting=len(waits), oldest_wait_s=round(waits[-1], 1),
                          wait_p50_s=round(_nearest_rank(waits, 0.50), 1),
                          wait_p95_s=round(_nearest_rank(waits, 0.95), 1))
    return {**OK, "now": stamp, "pools": [pools[name] for name in sorted(pools)],
            "nodes": len(ctx.state.nodes), "waiting": len(ctx.waiters)}


_POOL_STATE_CLAIM = attrgetter("node_pool", "state", "clean_claimed_until")


def _nearest_rank(ordered: list[float], fraction: float) -> float:
    """The value below which `fraction` of the sorted values lie (nearest rank)."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


# Handlers that work on the worker's memory (PoolState, Waiters) and check before they
# change anything: they run without a savepoint, and without the ORM.
NO_SAVEPOINT = frozenset({"allocate", "release", "renew", "status", "waiting", "cancel",
                          "export", "summary", "maintenance", "clean_claim", "clean_done",
                          "clean_abandon", "clean"})
HANDLERS: dict[str, Handler] = {
    "add_baremetal": add_baremetal,
    "add_keyvalue_pairs": add_keyvalue_pairs,
    "add_json_blob": add_json_blob,
    "allocate": allocate,
    "release": release,
    "renew": renew,
    "get_field": get_field,
    "set_field": set_field,
    "status": status,
    "waiting": waiting,
    "delete_db": delete_db,
    "cancel": cancel,
    "maintenance": maintenance,
    "remove": remove,
    "workers": workers,
    "history": history,
    "export": export,
    "import": import_,
    "clean_claim": cleaning.clean_claim,
    "clean_done": cleaning.clean_done,
    "clean": cleaning.clean,
    "clean_abandon": cleaning.clean_abandon,
    "summary": summary,
}
assert set(HANDLERS) == {name for name, op in OPERATIONS.items() if not op.internal}
