"""status a page at a time: every matching node once, in id order, whatever changes
between pages; the client puts the pages together, and still talks to a worker that
knows no pages."""

from __future__ import annotations

import pytest

from clients.client import MoltenIronClient
from molteniron import errors, protocol
from tests.stack import node_args
from tests.test_keeper import add_node, allocate, commit, keeper, only_reply, request  # noqa: F401


def status(keeper, **args) -> dict:
    req = request("status", **args)
    return only_reply(commit(keeper, req), req).reply


def paged(keeper, limit: int, **filters) -> tuple[list[int], int]:
    """The ids status gives page by page, and how many pages it took."""
    ids, after_id, pages = [], None, 0
    while True:
        args = {"limit": limit, **filters}
        if after_id is not None:
            args["after_id"] = after_id
        reply = status(keeper, **args)
        pages += 1
        assert len(reply["nodes"]) <= limit
        ids += [node["id"] for node in reply["nodes"]]
        after_id = reply.get("next_after_id")
        if after_id is None:
            return ids, pages
        assert after_id == ids[-1]


def test_pages_give_every_matching_node_once_in_id_order(keeper):
    ids = [add_node(keeper, f"n{i}", "q" if i % 3 == 0 else "p") for i in range(7)]
    allocate(keeper, "job", 2)
    held = [node["id"] for node in status(keeper, owner="job")["nodes"]]
    whole = [node["id"] for node in status(keeper)["nodes"]]
    assert whole == sorted(ids)

    for limit in (1, 2, 3, 6, 7, 100):
        assert paged(keeper, limit)[0] == whole, limit
    assert paged(keeper, 7)[1] == 1  # no empty page after the last node
    assert paged(keeper, 2, node_pool="q")[0] == [ids[0], ids[3], ids[6]]
    assert paged(keeper, 1, state="allocated")[0] == held
    assert paged(keeper, 1, owner="job")[0] == held
    assert paged(keeper, 2, state="maintenance") == ([], 1)


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


def test_pages_hide_passwords_unless_asked(keeper):
    add_node(keeper, "n0")
    (hidden,) = status(keeper, limit=1)["nodes"]
    (shown,) = status(keeper, limit=1, show_secrets=True)["nodes"]
    assert hidden["ipmi_password"] == "********" and shown["ipmi_password"] == "p"


@pytest.mark.parametrize("args", [{"limit": 0}, {"limit": "10"}, {"after_id": -1}])
def test_bad_page_arguments_are_refused(args):
    with pytest.raises(errors.BadRequest):
        protocol.validate_args("status", args)


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


def test_the_client_reads_a_worker_that_knows_no_pages(monkeypatch):
    """A worker from before pages refuses the page arguments: the client asks it for
    everything at once."""
    older = protocol.OPERATIONS["status"]._replace(args=tuple(
        arg for arg in protocol.OPERATIONS["status"].args if arg.name not in ("after_id", "limit")))
    asked = []

    def older_worker(op, args):
        asked.append(args)
        with monkeypatch.context() as patch:
            patch.setitem(protocol.OPERATIONS, "status", older)
            protocol.validate_args(op, args)
        return {"status": 200, "nodes": [{"id": 1}]}

    client = MoltenIronClient("amqp://unused")
    monkeypatch.setattr(client, "call", older_worker)
    assert client.status()["nodes"] == [{"id": 1}]
    assert asked[0]["limit"] > 0
    assert asked[1:] == [{"node_pool": None, "show_secrets": False, "state": None,
                          "owner": None}]
