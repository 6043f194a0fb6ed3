"""Operation name -> handler. A handler calls the pool operations and returns the reply.

Handlers raise MoltenIronError for refusals; the worker turns those into
replies. Pools a handler may have given nodes back to are noted in
`batch.touched_pools`, and the worker serves their waiters afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from molteniron import compat, errors, pool
from molteniron.protocol import OPERATIONS, Request
from workers.batch import Batch
from workers.waiters import Waiters


@dataclass
class Context:
    """What a handler may use besides the request."""
    batch: Batch
    waiters: Waiters
    reply_to: str | None
    correlation_id: str | None


Handler = Callable[[Context, Request], dict]
OK = {"status": 200}


def add_baremetal(ctx: Context, req: Request) -> dict:
    node = pool.add_baremetal(ctx.batch.session, **req.args)
    ctx.batch.touched_pools.add(node.node_pool)
    return dict(OK)


def add_keyvalue_pairs(ctx: Context, req: Request) -> dict:
    node = pool.add_keyvalue_pairs(ctx.batch.session, **req.args)
    ctx.batch.touched_pools.add(node.node_pool)
    return dict(OK)


def add_json_blob(ctx: Context, req: Request) -> dict:
    node = pool.add_json_blob(ctx.batch.session, **req.args)
    ctx.batch.touched_pools.add(node.node_pool)
    return dict(OK)


def allocate(ctx: Context, req: Request) -> dict:
    a = req.args
    session, node_pool = ctx.batch.session, a["node_pool"] or pool.DEFAULT_POOL
    if ctx.waiters.has_waiting(node_pool):
        # First come, first served: nobody overtakes a request already waiting.
        if a["count"] > pool.capacity(session, node_pool):
            pool.allocate(session, a["owner"], a["count"], node_pool)  # raises PoolTooSmall
        if not a["wait"]:
            raise errors.NotEnoughNodes(
                f"Not enough available nodes found: earlier requests are waiting "
                f"for pool {node_pool}")
    else:
        try:
            nodes = pool.allocate(session, a["owner"], a["count"], node_pool,
                                  request_id=req.id, now=ctx.batch.now)
            return compat.nodes_reply([pool.node_record(n) for n in nodes])
        except errors.NotEnoughNodes:
            if not a["wait"]:
                raise
    return ctx.waiters.enqueue(ctx.batch, req.id, node_pool, a["count"], a["owner"],
                               ctx.reply_to, ctx.correlation_id, req.deadline)


def release(ctx: Context, req: Request) -> dict:
    owner = req.args["owner"]
    cancelled = ctx.waiters.cancel_owner(ctx.batch, owner)
    try:
        nodes = pool.release(ctx.batch.session, owner, now=ctx.batch.now)
    except errors.OwnerNotFound:
        if cancelled:
            return {**OK, "released": 0, "cancelled_waiting": cancelled}
        raise
    ctx.batch.touched_pools.update(n.node_pool for n in nodes)
    return {**OK, "released": len(nodes), "cancelled_waiting": cancelled}


def get_field(ctx: Context, req: Request) -> dict:
    return compat.field_reply(pool.get_field(ctx.batch.session, **req.args))


def set_field(ctx: Context, req: Request) -> dict:
    a = req.args
    node = pool.set_field(ctx.batch.session, a["id"], a["key"], a["value"], a["type"])
    ctx.batch.touched_pools.add(node.node_pool)
    return dict(OK)


def status(ctx: Context, req: Request) -> dict:
    records = [pool.node_record(n) for n in pool.status_rows(ctx.batch.session,
                                                             req.args["node_pool"])]
    if not req.args["show_secrets"]:
        records = [compat.without_secrets(r) for r in records]
    return {**OK, "nodes": records}


def waiting(ctx: Context, req: Request) -> dict:
    rows = [{"request_id": w.request_id, "owner": w.owner, "node_pool": w.node_pool,
             "count": w.count, "position": i + 1, "deadline": w.deadline}
            for i, w in enumerate(ctx.waiters.rows(req.args["node_pool"]))]
    enqueued = {r.request_id: r.enqueued_at for r in pool.waiting_rows(ctx.batch.session)}
    for row in rows:
        row["waited_s"] = round((ctx.batch.now - enqueued[row["request_id"]]).total_seconds(), 3)
    return {**OK, "waiting": rows}


def delete_db(ctx: Context, req: Request) -> dict:
    ctx.waiters.cancel_all(ctx.batch, "delete_db emptied the pool")
    removed = pool.delete_db(ctx.batch.session, now=ctx.batch.now)
    return {**OK, "removed": removed}


def cancel(ctx: Context, req: Request) -> dict:
    """Whatever state the request is in, its client will not own nodes through it."""
    target = req.args["request_id"]
    batch = ctx.batch
    if target in ctx.waiters.by_request:
        ctx.waiters.cancel(batch, target, "cancelled by its client")
        return {**OK, "cancelled": "waiting"}
    nodes = pool.release_request(batch.session, target, now=batch.now)
    batch.touched_pools.update(n.node_pool for n in nodes)
    # Stored as the request's reply: served -> a redelivery is refused; unseen -> tombstone.
    batch.store(target, "allocate", errors.RequestCancelled(
        "the request was cancelled by its client").to_reply())
    return {**OK, "cancelled": "served" if nodes else "not_waiting", "released": len(nodes)}


HANDLERS: dict[str, Handler] = {
    "add_baremetal": add_baremetal,
    "add_keyvalue_pairs": add_keyvalue_pairs,
    "add_json_blob": add_json_blob,
    "allocate": allocate,
    "release": release,
    "get_field": get_field,
    "set_field": set_field,
    "status": status,
    "waiting": waiting,
    "delete_db": delete_db,
    "cancel": cancel,
}
assert set(HANDLERS) == {name for name, op in OPERATIONS.items() if not op.internal}
