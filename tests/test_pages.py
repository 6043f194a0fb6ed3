"""status and export a page at a time: every matching node once, in id order, whatever
changes between pages; the client puts the pages together, and still talks to a worker
that knows no pages."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from molteniron import errors, inventory, protocol
from molteniron.clients import client as client_module
from molteniron.clients.client import MoltenIronClient
from molteniron.models import Node
from molteniron.node_record import NodeRecord
from tests.keeper import add_node, allocate, commit, only_reply, request
from tests.stack import node_args


def status(keeper, op: str = "status", **args) -> dict:
    req = request(op, **args)
    return only_reply(commit(keeper, req), req).reply


def paged(keeper, limit: int, op: str = "status", **filters) -> tuple[list[dict], int]:
    """The nodes status (or export) gives page by page, and how many pages it took."""
    nodes, after_id, pages = [], None, 0
    while True:
        args = {"limit": limit, **filters}
        if after_id is not None:
            args["after_id"] = after_id
        reply = status(keeper, op, **args)
        pages += 1
        assert len(reply["nodes"]) <= limit
        nodes += reply["nodes"]
        after_id = reply.get("next_after_id")
        if after_id is None:
            return nodes, pages
        if op == "status":  # an export entry has no id
            assert after_id == nodes[-1]["id"]


def paged_ids(keeper, limit: int, **filters) -> list[int]:
    return [node["id"] for node in paged(keeper, limit, **filters)[0]]


def test_pages_give_every_matching_node_once_in_id_order(keeper):
    ids = [add_node(keeper, f"n{i}", "q" if i % 3 == 0 else "p") for i in range(7)]
    allocate(keeper, "job", 2)
    held = [node["id"] for node in status(keeper, owner="job")["nodes"]]
    whole = [node["id"] for node in status(keeper)["nodes"]]
    assert whole == sorted(ids)

    for limit in (1, 2, 3, 6, 7, 100):
        assert paged_ids(keeper, limit) == whole, limit
    assert paged(keeper, 7)[1] == 1  # no empty page after the last node
    assert paged_ids(keeper, 2, node_pool="q") == [ids[0], ids[3], ids[6]]
    assert paged_ids(keeper, 1, state="allocated") == held
    assert paged_ids(keeper, 1, owner="job") == held
    assert paged(keeper, 2, state="maintenance") == ([], 1)


def test_export_is_the_database_inventory_whole_or_in_pages(keeper):
    for i in (3, 1, 2):
        add_node(keeper, f"n{i}", "q" if i == 2 else "p")
    tagged = request("add_keyvalue_pairs", name="kv", ipmi_ip="10.0.0.9",
                     allocation_pool="10.1.0.9", tags="gpu,fast",
                     pairs=["ipmi_user=u", "ipmi_password=pw", "rack=r7"])
    assert only_reply(commit(keeper, tagged), tagged).reply["status"] == 200
    allocate(keeper, "job", 1)
    for change in (request("maintenance", node="n3", mode="on", reason="disk"),
                   request("set_field", id=1, key="name", value="renamed"),
                   request("set_field", id=2, key="allocation_pool", value="10.2.0.1,10.2.0.2")):
        assert only_reply(commit(keeper, change), change).reply["status"] == 200, change
    (entry,) = [e for e in status(keeper, "export", show_secrets=True)["nodes"]
                if e["name"] == "n1"]
    updated = request("import", inventory={"nodes": [{**entry, "cpus": 64, "tags": ["big"]}]})
    assert only_reply(commit(keeper, updated), updated).reply["changed"] == 1
    refused = request("set_field", id=3, key="cpus", value="many", type="int")
    assert only_reply(commit(keeper, refused), refused).reply["status"] == 400
    with Session(keeper.engine) as session:
        in_database = [inventory.entry_of(NodeRecord.from_node(node), False)
                       for node in session.scalars(select(Node).order_by(Node.id))]

    assert paged(keeper, 2, "export")[0] == in_database
    assert paged(keeper, 4, "export")[1] == 1
    whole = status(keeper, "export")["nodes"]
    assert whole == sorted(in_database, key=lambda entry: entry["name"])
    assert "next_after_id" not in status(keeper, "export")
    (shown,) = status(keeper, "export", limit=1, show_secrets=True)["nodes"]
    assert shown["ipmi_password"] == "p" and whole[0]["ipmi_password"] == "********"


def test_nodes_added_or_removed_between_pages(keeper):
    ids = [add_node(keeper, f"n{i}") for i in range(4)]
    first = status(keeper, limit=2)
    assert [node["id"] for node in first["nodes"]] == ids[:2]

    removed = request("remove", node="n2")
    assert only_reply(commit(keeper, removed), removed).reply["status"] == 200
    rest = status(keeper, limit=2, after_id=first["next_after_id"])
    assert [node["id"] for node in rest["nodes"]] == [ids[3]]
    assert "next_after_id" not in rest

    added = add_node(keeper, "n4")
    later = status(keeper, limit=2, after_id=ids[3])
    assert [node["id"] for node in later["nodes"]] == [added]


def test_a_page_shows_the_pool_as_it_was_at_its_place_in_the_batch(keeper):
    """A reply goes out after its whole batch: the page must not show what a later
    request of the same batch did to a node."""
    add_node(keeper, "n0")
    listing = request("status", limit=10, show_secrets=True)
    taking = request("allocate", owner="job", count=1, node_pool="p")
    batch = commit(keeper, listing, taking)
    (node,) = only_reply(batch, listing).reply["nodes"]
    assert node["state"] == "ready" and node["owner"] is None
    assert only_reply(batch, taking).reply["status"] == 200


def test_pages_hide_passwords_unless_asked(keeper):
    add_node(keeper, "n0")
    (hidden,) = status(keeper, limit=1)["nodes"]
    (shown,) = status(keeper, limit=1, show_secrets=True)["nodes"]
    assert hidden["ipmi_password"] == "********" and shown["ipmi_password"] == "p"


@pytest.mark.parametrize("op", ["status", "export"])
@pytest.mark.parametrize("args", [{"limit": 0}, {"limit": "10"}, {"after_id": -1}])
def test_bad_page_arguments_are_refused(op, args):
    with pytest.raises(errors.BadRequest):
        protocol.validate_args(op, args)


def test_the_client_puts_the_pages_together(running):
    for i in range(1, 6):
        running.cli("add_baremetal", *node_args(i))
    running.cli("allocate", "job", "2")
    asked_before = running.worker_log().count("op=status ")
    with running.client() as client:
        one_reply = client.call("status", {})["nodes"]
        assert len(one_reply) == 5
        assert client.status(page_size=2)["nodes"] == one_reply
        assert client.status(state="ready", page_size=1)["nodes"] == one_reply[2:]
    assert running.worker_log().count("op=status ") - asked_before == 1 + 3 + 3


def test_the_client_exports_by_name_from_pages(running):
    for i in (3, 1, 2):
        running.cli("add_baremetal", *node_args(i))
    with running.client() as client:
        whole = client.call("export", {})["nodes"]
        assert [entry["name"] for entry in whole] == ["node-1", "node-2", "node-3"]
        assert client.export(page_size=1)["nodes"] == whole


def older(op: str) -> protocol.Operation:
    """op as a worker from before pages knows it."""
    return protocol.OPERATIONS[op]._replace(args=tuple(
        arg for arg in protocol.OPERATIONS[op].args if arg.name not in ("after_id", "limit")))


def refused_as_an_older_worker(monkeypatch, op: str, args: dict) -> None:
    """Raise what a worker from before pages answers to these arguments, if anything."""
    with monkeypatch.context() as patch:
        patch.setitem(protocol.OPERATIONS, op, older(op))
        protocol.validate_args(op, args)


# No worker from before pages runs here: the next two tests stand one in for the
# client, refusing as its argument table would.

def test_a_worker_without_pages_met_mid_listing_gives_the_whole_listing_once(monkeypatch):
    """A failover to an older worker between two pages: the client asks it for
    everything, and does not keep the page it had."""
    pages = iter([{"status": 200, "nodes": [{"id": 1}], "next_after_id": 1}])

    def failing_over(op, args):
        page = next(pages, None)
        if page is not None:  # the first page, from a worker that knows pages
            return page
        refused_as_an_older_worker(monkeypatch, op, args)
        return {"status": 200, "nodes": [{"id": 1}, {"id": 2}]}

    client = MoltenIronClient("amqp://unused")
    monkeypatch.setattr(client, "call", failing_over)
    assert client.status()["nodes"] == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize("op, args", [
    ("status", {"node_pool": None, "show_secrets": False, "state": None, "owner": None}),
    ("export", {"show_secrets": False})])
def test_the_client_reads_a_worker_that_knows_no_pages(monkeypatch, op, args):
    """A worker from before pages refuses the page arguments: the client asks it for
    everything at once."""
    asked = []

    def older_worker(asked_op, asked_args):
        asked.append(asked_args)
        refused_as_an_older_worker(monkeypatch, asked_op, asked_args)
        return {"status": 200, "nodes": [{"id": 1, "name": "n1"}]}

    client = MoltenIronClient("amqp://unused")
    monkeypatch.setattr(client, "call", older_worker)
    assert getattr(client, op)()["nodes"] == [{"id": 1, "name": "n1"}]
    assert asked[0]["limit"] > 0
    assert asked[1:] == [args]


@pytest.mark.parametrize("message", ["status: unknown argument(s): bogus",
                                     "status: unknown argument(s): bogus, limit"])
def test_other_unknown_arguments_are_not_taken_for_an_older_worker(message):
    assert not client_module._refuses_only_pages(errors.BadRequest(message))
    assert client_module._refuses_only_pages(
        errors.BadRequest("status: unknown argument(s): after_id, limit"))


def test_a_page_the_worker_refuses_is_an_error(running):
    with running.client() as client, pytest.raises(errors.BadRequest, match="at least 1"):
        client.status(page_size=0)


def renaming_between_pages(running, client, monkeypatch, listings: int) -> None:
    """After the first page of each of the first `listings` exports, node-1 (read on
    that page) and node-2 (not read yet) swap names: node-2's page then shows node-1
    again."""
    call = client.call
    swaps: list[str] = []  # the exports renamed after

    def call_then_rename(op, args):
        reply = call(op, args)
        if op == "export" and "after_id" not in args and len(swaps) < listings:
            swaps.append(op)
            first, second = (running.sql(f"SELECT id FROM nodes WHERE name = 'node-{i}'")[0][0]
                             for i in (1, 2))
            for node_id, name in ((first, "swapping"), (second, "node-1"), (first, "node-2")):
                call("set_field", {"id": node_id, "key": "name", "value": name})
        return reply

    monkeypatch.setattr(client, "call", call_then_rename)


def test_an_export_that_shows_a_name_twice_is_read_again(running, monkeypatch):
    """A node renamed between two pages can show twice under one name: import would
    refuse such a file."""
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    with running.client() as client:
        renaming_between_pages(running, client, monkeypatch, listings=1)
        exported = client.export(page_size=1)["nodes"]
    assert [entry["name"] for entry in exported] == ["node-1", "node-2"]
    assert [entry["ipmi_ip"] for entry in exported] == ["10.0.0.2", "10.0.0.1"]


def test_an_export_whose_names_keep_changing_is_a_conflict(running, monkeypatch):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    with running.client() as client, pytest.raises(errors.Conflict, match="kept changing"):
        renaming_between_pages(running, client, monkeypatch, listings=client_module.EXPORT_TRIES)
        client.export(page_size=1)
