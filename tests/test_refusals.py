"""Refusals that give nothing away and keep nothing: every operation classified for
authorization, every argument checked against what the database can hold, an
oversized message never kept, a 500 without the database's text."""

from __future__ import annotations

import json
import uuid

import pytest

from molteniron import errors, protocol
from molteniron.protocol import OPERATIONS, Request
from molteniron.workers.authz import ADMIN_ONLY, USER_OPS, WORKER_OPS, Authorizer
from tests.raw import RawPublisher
from tests.stack import wait_until


def test_every_operation_is_classified_for_authorization_exactly_once():
    classes = (USER_OPS, ADMIN_ONLY, WORKER_OPS)
    assert set().union(*classes) == set(OPERATIONS)
    assert sum(map(len, classes)) == len(OPERATIONS)


def test_an_operation_nobody_classified_is_an_admins_only():
    authz = Authorizer(("root",))
    request = Request(str(uuid.uuid4()), "a_future_operation", {}, user="ci")
    with pytest.raises(errors.Forbidden):
        authz.check(request, lambda owner: None, lambda request_id: None)
    authz.check(Request(request.id, request.op, {}, user="root"),
                lambda owner: None, lambda request_id: None)


INT_ARGS = [(op.name, arg) for op in OPERATIONS.values() for arg in op.args
            if int in (arg.kind if isinstance(arg.kind, tuple) else (arg.kind,))]


@pytest.mark.parametrize("op,arg", INT_ARGS, ids=[f"{o}.{a.name}" for o, a in INT_ARGS])
def test_an_integer_the_database_cannot_hold_is_a_400_before_any_database_work(op, arg):
    args = {a.name: _fill(a) for a in OPERATIONS[op].args if a.required}
    for value in (protocol.INT_MAX + 1, protocol.INT_MIN - 1, 2**63):
        with pytest.raises(errors.BadRequest, match=arg.name):
            protocol.validate_args(op, {**args, arg.name: value})


def _fill(arg) -> object:
    kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
    if arg.uuid:
        return str(uuid.uuid4())
    if arg.choices:
        return arg.choices[0]
    return {str: "x", int: 1, bool: True, list: [], dict: {}}[kinds[0]]


def test_an_oversized_message_is_not_kept_in_the_dead_letter_queue(running):
    raw = RawPublisher(running.amqp_url)
    try:
        raw.publish(b"x" * (protocol.MAX_BODY_BYTES + 1), reply=False)
        # The queue is served in order: once this is answered, the big one was handled.
        assert raw.reply_to(raw.request("status", {}))["status"] == 200
    finally:
        raw.close()
    assert running.dead_letters() == 0
    assert "outcome=dropped" in running.worker_log()


def test_a_database_refusal_is_a_500_without_the_databases_text(running):
    execute(running, "CREATE TRIGGER refuse_nodes BEFORE INSERT ON nodes FOR EACH ROW "
            "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'INSERT INTO nodes refused'")
    try:
        raw = RawPublisher(running.amqp_url)
        try:
            request_id = str(uuid.uuid4())
            reply = raw.reply_to(raw.request("add_baremetal", {
                "name": "n", "ipmi_ip": "10.0.0.1", "ipmi_user": "u", "ipmi_password": "p",
                "allocation_pool": "10.1.0.1", "port_hwaddr": "aa", "cpu_arch": "x86_64",
                "cpus": 1, "ram_mb": 1, "disk_gb": 1}, request_id), timeout=60)
        finally:
            raw.close()
    finally:
        execute(running, "DROP TRIGGER refuse_nodes")
    assert reply["status"] == 500 and reply["error"] == "InternalError", reply
    assert request_id in reply["message"]
    for leak in ("INSERT", "nodes refused", "45000", "1644", "SELECT"):
        assert leak not in json.dumps(reply), reply
    wait_until(lambda: "INSERT INTO nodes refused" in running.worker_log(), 10,
               "the database's text in the worker's log")
    assert request_id in running.worker_log()


def execute(stack, statement: str) -> None:
    with stack.engine.begin() as conn:
        conn.exec_driver_sql(statement)
