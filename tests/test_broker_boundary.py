"""molteniron/broker.py is the one module that speaks pika: connecting (a list of
brokers, their order, failover), publishing with confirms, consuming, and pika's errors
as MoltenIron's. The worker, the client, dead-letters and metrics go through it.

tests/ and bench/ are not scanned: they drive the broker with pika directly, to check
what the broker itself does."""

from __future__ import annotations

import ast
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from molteniron import broker, errors, protocol
from tests.stack import ROOT, _rabbitmqctl, wait_until

BOUNDARY = ROOT / "molteniron" / "broker.py"
# The project's own code: molteniron/workers and molteniron/clients are links to these.
SOURCES = (ROOT / "molteniron", ROOT / "workers", ROOT / "clients")
# pika's private attributes, as the code that used them before the boundary did (the
# blocking channel's underlying channel) and others of its objects' internals.
PIKA_PRIVATE = {"_impl", "_transport", "_channel_number", "_frame_dispatcher",
                "_consumer_infos", "_adapter_connect", "_flush_output"}


def project_modules():
    """(path, syntax tree) of every Python file of the project's own code."""
    for top in SOURCES:
        for folder, dirs, files in os.walk(top):  # links not followed: each file once
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = Path(folder) / name
                    yield path, ast.parse(path.read_text(), str(path))


def pika_uses(tree: ast.AST) -> list[str]:
    """Where a module imports pika (import, from-import, importlib) or touches a
    private attribute of pika's objects."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "pika"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pika":
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).split(".")[0] == "pika"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Attribute) and node.attr in PIKA_PRIVATE:
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_only_the_broker_module_imports_pika_or_touches_its_private_attributes():
    modules = dict(project_modules())
    assert len(modules) > 50, sorted(modules)  # the scan sees the project's files
    offenders = {str(path.relative_to(ROOT)): uses for path, tree in modules.items()
                 if path != BOUNDARY and (uses := pika_uses(tree))}
    assert offenders == {}, "pika outside molteniron/broker.py"
    assert pika_uses(modules[BOUNDARY]), "the boundary itself is where pika is used"


def test_the_scan_finds_each_way_of_reaching_pika():
    for source in ("import pika", "import pika.spec as spec", "from pika.exceptions import X",
                   "importlib.import_module('pika.adapters')", "channel._impl.basic_publish()"):
        assert pika_uses(ast.parse(source)), source
    assert not pika_uses(ast.parse("import pikachu; self._client.close()"))


# --- failover and errors, against the real broker -----------------------------------

def closed_port() -> int:
    """A local TCP port nothing listens on (taken and released: connecting is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_port(amqp_url: str, port: int) -> str:
    """amqp_url (the test run's vhost and login) on another port of 127.0.0.1."""
    credentials, _, rest = amqp_url.partition("@")
    return f"{credentials}@127.0.0.1:{port}/{rest.partition('/')[2]}"


def test_brokers_are_tried_in_order_and_a_lost_one_is_tried_last_next_time(amqp_url):
    closed = closed_port()
    brokers = broker.Brokers(f"{with_port(amqp_url, closed)},{amqp_url}", connect_timeout=5)
    failed = []
    connection = brokers.connect(on_failure=lambda server, exc: failed.append((server, exc)))
    try:
        assert connection.is_open and connection.login == urlsplit(amqp_url).username
        assert [(server, type(exc)) for server, exc in failed] == [
            (f"127.0.0.1:{closed}", errors.ServiceUnavailable)]
        assert "connection refused" in failed[0][1].message
    finally:
        connection.close()
    assert not connection.is_open

    brokers.lost()  # the live one failed: the closed one comes first now
    failed.clear()
    brokers.connect(on_failure=lambda server, exc: failed.append(server)).close()
    assert failed == [f"127.0.0.1:{closed}"]

    brokers = broker.Brokers(f"{amqp_url},{with_port(amqp_url, closed)}")
    failed.clear()
    brokers.connect(on_failure=lambda server, exc: failed.append(server)).close()
    assert failed == []  # the first answered: the second was never tried


def test_when_no_broker_answers_the_error_names_each_in_order(amqp_url):
    first, second = closed_port(), closed_port()
    brokers = broker.Brokers(f"{with_port(amqp_url, first)},{with_port(amqp_url, second)}")
    with pytest.raises(errors.ServiceUnavailable) as refused:
        brokers.connect()
    assert type(refused.value) is errors.ServiceUnavailable  # an outage: worth retrying
    message = refused.value.message
    assert message.index(f"127.0.0.1:{first}") < message.index(f"127.0.0.1:{second}")
    assert message.count("connection refused") == 2


def test_a_refused_login_is_broker_refused_even_beside_a_closed_port(amqp_url):
    credentials, _, rest = amqp_url.partition("@")
    wrong = f"{credentials.rpartition(':')[0]}:not-the-password@{rest}"
    brokers = broker.Brokers(f"{with_port(amqp_url, closed_port())},{wrong}")
    with pytest.raises(errors.BrokerRefused) as refused:
        brokers.connect()
    user = urlsplit(amqp_url).username
    assert f"refused the login of user '{user}': wrong user name or password" in \
        refused.value.message
    assert "connection refused" in refused.value.message  # the other broker's failure too
    assert "not-the-password" not in refused.value.message


def test_an_operation_the_broker_refuses_closes_its_channel_with_its_reply_code(amqp_url):
    connection = broker.Brokers(amqp_url).connect()
    try:
        channel = connection.channel()
        missing = f"molteniron.no-such-queue-{uuid.uuid4().hex[:8]}"
        with pytest.raises(errors.BrokerClosedChannel) as refused:
            channel.queue_counts(missing)
        assert refused.value.reply_code == 404 and missing in refused.value.reply_text
        assert not channel.is_open and connection.is_open  # the channel only

        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(errors.BrokerReturned):  # mandatory, and no queue is bound
            channel.publish("", missing, b"{}", mandatory=True)
        assert channel.is_open
    finally:
        connection.close()


def test_a_connection_closed_by_the_broker_is_broker_lost(amqp_url):
    name = f"molteniron-boundary-test-{uuid.uuid4().hex[:8]}"
    connection = broker.Brokers(amqp_url, name=name).connect()
    try:
        def pid() -> str | None:
            for line in _rabbitmqctl("list_connections", "-q", "pid",
                                     "client_properties").splitlines():
                if name in line:
                    return line.split()[0]
            return None
        found = wait_until(pid, 10, "the broker to list the connection")
        _rabbitmqctl("close_connection", found, "closed by test_broker_boundary")
        with pytest.raises(errors.BrokerLost) as lost:
            wait_until(lambda: connection.process_data_events(0.2), 10, "the close to arrive")
        assert "closed by test_broker_boundary" in lost.value.message
    finally:
        connection.close()


def test_the_reply_channel_buffers_and_hears_returns_and_confirms_in_order(amqp_url):
    """broker.ReplyChannel uses pika's private BlockingChannel._impl: this fails if a
    pika release changes what the worker's replies rely on."""
    connection = broker.Brokers(amqp_url).connect()
    events: list[tuple] = []
    try:
        consumer = connection.channel()
        queue = consumer.queue_declare("", exclusive=True, auto_delete=True).method.queue
        received: list[tuple] = []
        consumer.basic_consume(queue, lambda channel, method, properties, body: received.append(
            (properties.correlation_id, body)), auto_ack=True)
        replies = connection.reply_channel(
            on_return=lambda channel, method, properties, body: events.append(
                ("returned", method.routing_key, body)),
            on_confirm=lambda tag, multiple, acked: events.append(
                ("confirmed", tag, multiple, acked)))
        gone = f"amq.gen-{uuid.uuid4().hex}"  # a client whose reply queue went with it
        replies.publish(queue, b'{"n": 1}', "id-1")
        replies.publish(gone, b'{"n": 2}', "id-2")
        replies.publish(gone, b'{"n": 3}', "id-3", mandatory=False)  # dropped, not returned
        assert events == [] and received == []  # buffered: nothing sent yet

        def all_confirmed() -> bool:
            connection.process_data_events(0.05)
            return _confirmed_up_to(events) == 3
        wait_until(all_confirmed, 10, "the broker's confirms")
        assert received == [("id-1", b'{"n": 1}')]
        returned = [e for e in events if e[0] == "returned"]
        assert returned == [("returned", gone, b'{"n": 2}')]
        # The return comes before the confirm of the message it returns.
        assert events.index(returned[0]) < next(
            i for i, e in enumerate(events) if e[0] == "confirmed" and e[1] >= 2)
        assert all(e[3] for e in events if e[0] == "confirmed")  # acked, none nacked
    finally:
        connection.close()


def _confirmed_up_to(events) -> int:
    """The highest delivery tag the confirms cover."""
    return max((e[1] for e in events if e[0] == "confirmed"), default=0)


def test_the_asyncio_adapter_stays_out_and_still_imports_when_asked():
    """`import pika` would import asyncio, about 20 ms of every CLI command."""
    import subprocess
    import sys
    probe = ("import sys, molteniron.broker; print('asyncio' in sys.modules); "
             "import pika.adapters.asyncio_connection as a; print(a.AsyncioConnection.__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    assert done.stdout.split() == ["False", "AsyncioConnection"]


def test_topology_declares_through_the_boundary(amqp_url):
    from molteniron.workers import topology
    connection = broker.Brokers(amqp_url).connect()
    try:
        channel = connection.channel()
        topology.declare(channel)
        messages, consumers = channel.queue_counts(protocol.REQUEST_QUEUE)
        assert messages >= 0 and consumers >= 0
    finally:
        connection.close()
