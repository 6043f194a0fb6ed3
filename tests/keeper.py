"""A PoolKeeper driven the way the worker drives it, for tests: one batch at a time, with
requests as a client makes them, and the outcome read from the batch's replies and the
database. The `keeper` fixture (a keeper on empty tables) is registered by conftest."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import text

from molteniron import protocol
from molteniron.config import Config
from molteniron.workers.keeper import PoolKeeper
from tests.conftest import empty_tables


@dataclass
class Properties:
    """What the keeper reads of a delivery's AMQP properties."""
    reply_to: str | None
    correlation_id: str | None
    headers: dict | None = None


def make_keeper(engine, database_url, **config) -> PoolKeeper:
    """A keeper on empty tables (close it afterwards)."""
    empty_tables(engine)
    return PoolKeeper(Config(db_url=database_url, **config), "worker-test")


@pytest.fixture
def keeper(engine, database_url):
    keeper = make_keeper(engine, database_url)
    yield keeper
    keeper.close()


def sql(keeper, statement, **params):
    with keeper.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(statement), params)]


def request(op, **args):
    """A request as the worker gets it: made by a client, decoded (defaults filled in)."""
    return protocol.decode_request(protocol.new_request(op, args).to_body())


def reply_to_of(req):
    return f"reply-{req.id}"


def commit(keeper, *requests, bounced=(), settled=None):
    """One batch, the way the worker hands it over: (method, properties, request)."""
    items = [(None, Properties(None if r.op == "tick" else reply_to_of(r), r.id), r)
             for r in requests]
    return keeper.commit(items, list(bounced), settled)


def replies(batch, req):
    return [out for out in batch.replies if out.request_id == req.id]


def only_reply(batch, req):
    (out,) = replies(batch, req)
    assert out.reply_to == reply_to_of(req) and out.correlation_id == req.id
    return out


def assert_granted(batch, req, node_count):
    """req was answered in this batch with one grant of node_count nodes, its last reply.

    (A tick may also remind a head waiter that it still waits, before serving it.)
    """
    sent = replies(batch, req)
    assert [out.grant for out in sent].count(True) == 1, sent
    out = sent[-1]
    assert out.grant and out.reply["status"] == 200, out.reply
    assert out.reply_to == reply_to_of(req) and out.correlation_id == req.id
    assert len(out.reply["nodes"]) == node_count


def add_node(keeper, name, node_pool="p"):
    batch = commit(keeper, add_request(name, node_pool))
    assert [out.reply["status"] for out in batch.replies] == [200]
    return sql(keeper, "SELECT id FROM nodes WHERE name = :name", name=name)[0][0]


def add_request(name, node_pool="p"):
    return request("add_baremetal", name=name, ipmi_ip="10.0.0.1", ipmi_user="u",
                   ipmi_password="p", allocation_pool="10.1.0.1", port_hwaddr="aa",
                   cpu_arch="x86_64", cpus=1, ram_mb=1, disk_gb=1, node_pool=node_pool)


def allocate(keeper, owner, count, node_pool="p", **args):
    """Send an allocate; return the request and its reply in that batch."""
    req = request("allocate", owner=owner, count=count, node_pool=node_pool, **args)
    batch = commit(keeper, req)
    return req, only_reply(batch, req).reply


def wait_for(keeper, owner, count, node_pool="p", **args):
    req, reply = allocate(keeper, owner, count, node_pool, wait=True, **args)
    assert reply["status"] == protocol.QUEUED, reply
    return req


def owners(keeper):
    return dict(sql(keeper, "SELECT id, owner FROM nodes ORDER BY id"))


def waiting(keeper):
    return [r[0] for r in sql(keeper, "SELECT owner FROM waiting_requests ORDER BY id")]



def commit_from(keeper, req, reply_to, bounced=()):
    """One batch holding a copy of req sent from another reply queue."""
    return keeper.commit([(None, Properties(reply_to, req.id), req)], list(bounced), None)

