"""Identity and least privilege on the broker: user_id is the login, CI users can do only their job.

Broker users are made with rabbitmqctl in the test run's vhost, with the
permissions deploy/rabbitmq-definitions.json gives its users (so the file is
what is tested), and deleted afterwards.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from molteniron import errors, protocol
from molteniron.workers import topology
from tests.definitions import DEFINITIONS, BrokerUser, permissions_of
from tests.stack import ROOT, TEST_AMQP_URL, node_args, wait_until

HOOKS = ROOT / "clients" / "hooks"


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


def test_the_definitions_hold_four_users_and_no_secrets():
    assert {u["name"] for u in DEFINITIONS["users"]} == {
        "molteniron-worker", "molteniron-ci", "molteniron-admin", "molteniron-web"}
    # An empty hash: nobody logs in until `rabbitmqctl change_password`.
    assert all(u["password_hash"] == "" and "password" not in u for u in DEFINITIONS["users"])
    # An admin has a CI user's rights, and may read the dead-letter queue (dead-letters).
    admin, ci = permissions_of("molteniron-admin"), permissions_of("molteniron-ci")
    assert admin[:2] == ci[:2] and admin[2] != ci[2]
    # The web pages read with a CI user's rights, never a job's or an admin's login.
    assert permissions_of("molteniron-web") == ci


def test_the_definitions_declare_what_the_worker_declares():
    queues = {q["name"]: q for q in DEFINITIONS["queues"]}
    assert queues[protocol.REQUEST_QUEUE]["arguments"] == protocol.REQUEST_QUEUE_ARGUMENTS
    assert queues[protocol.DEAD_LETTER_QUEUE]["arguments"] == protocol.DEAD_LETTER_QUEUE_ARGUMENTS
    assert all(q["durable"] and not q["auto_delete"] for q in queues.values())
    exchanges = {e["name"]: e["type"] for e in DEFINITIONS["exchanges"]}
    assert exchanges == {protocol.EXCHANGE: "direct", protocol.DEAD_LETTER_EXCHANGE: "fanout"}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in DEFINITIONS["bindings"]}
    # pika binds with the queue's name as routing key when none is given (topology.py).
    assert bindings == {(protocol.EXCHANGE, protocol.REQUEST_QUEUE, protocol.REQUEST_ROUTING_KEY),
                        (protocol.DEAD_LETTER_EXCHANGE, protocol.DEAD_LETTER_QUEUE,
                         protocol.DEAD_LETTER_QUEUE)}


@pytest.mark.stack  # it imports the definitions into a vhost of its own on the broker
def test_the_definitions_import_and_the_worker_declares_the_same_topology():
    tag = uuid.uuid4().hex[:8]
    vhost = f"molteniron_defs_{tag}"
    users = {u["name"]: f"{u['name']}-{tag}" for u in DEFINITIONS["users"]}
    definitions = {
        "_comment": DEFINITIONS["_comment"],
        "vhosts": [{"name": vhost}],
        "users": [{**u, "name": users[u["name"]]} for u in DEFINITIONS["users"]],
        "permissions": [{**p, "user": users[p["user"]], "vhost": vhost}
                        for p in DEFINITIONS["permissions"]],
        **{section: [{**entry, "vhost": vhost} for entry in DEFINITIONS[section]]
           for section in ("exchanges", "queues", "bindings")}}
    # rabbitmqctl runs as the rabbitmq user: the file must be readable by it (not pytest's tmp).
    path = Path(f"/tmp/molteniron-definitions-{tag}.json")
    path.write_text(json.dumps(definitions))
    path.chmod(0o644)
    try:
        rabbitmqctl("import_definitions", str(path))
        bindings = {f"{b['source']}\t{b['destination']}\t{b['routing_key']}"
                    for b in DEFINITIONS["bindings"]}
        wait_until(lambda: bindings <= set(rabbitmqctl(
            "list_bindings", "-q", "-p", vhost, "source_name", "destination_name",
            "routing_key").splitlines()) and len(rabbitmqctl(
                "list_permissions", "-q", "-p", vhost).splitlines()) == 1 + len(users),
            30, "the import of the definitions", interval=0.5)  # it is asynchronous
        worker = users["molteniron-worker"]
        host = urlsplit(TEST_AMQP_URL).netloc.rpartition("@")[2]
        url = f"amqp://{worker}:pw-{tag}@{host}/{vhost}"
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(url))  # no password yet
        rabbitmqctl("change_password", worker, f"pw-{tag}")
        connection = pika.BlockingConnection(pika.URLParameters(url))
        topology.declare(connection.channel())  # an argument that differs would be a 406
        connection.close()
    finally:
        path.unlink()
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
        for renamed in users.values():
            subprocess.run(["rabbitmqctl", "delete_user", renamed], capture_output=True,
                           timeout=60)


# What the permissions are about: the resource names MoltenIron uses, each with a regex
# that matches it alone (a server-named queue's name is known only when it is made).
RESOURCES = {"molteniron": "molteniron", "molteniron.dead": r"molteniron\.dead",
             "molteniron.requests": r"molteniron\.requests",
             "molteniron.dead-letters": r"molteniron\.dead-letters",
             "amq.default": r"amq\.default", "amq.gen-Xyz": r"amq\.gen-.*"}


def allowed(pattern: str) -> list[str]:
    """The resources a permission pattern grants (RabbitMQ matches unanchored regexes)."""
    return [name for name in RESOURCES if re.search(pattern, name)]


def without(pattern: str, name: str) -> str:
    """A pattern granting what `pattern` grants but `name`."""
    rest = [RESOURCES[other] for other in allowed(pattern) if other != name]
    return "^(" + "|".join(rest) + ")$" if rest else "^$"


def _worker_does_its_broker_work(user: BrokerUser, client_queue: str) -> None:
    """What a worker does on the broker: declare, consume, tick, reply to a client."""
    connection = user.connect()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        topology.declare(channel)
        channel.basic_consume(protocol.REQUEST_QUEUE, lambda *a: None)
        channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, b"{}")
        channel.basic_publish("", client_queue, b"{}", mandatory=True)
    finally:
        connection.close()


def _client_does_its_broker_work(user: BrokerUser, client_queue: str) -> None:
    """What MoltenIronClient does on the broker: reply queue, consume it, publish, queue depth."""
    connection = user.connect()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.basic_consume(reply_queue, lambda *a: None, auto_ack=True)
        channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, b"{}",
                              pika.BasicProperties(user_id=user.name), mandatory=True)
        channel.queue_declare(protocol.REQUEST_QUEUE, passive=True)
    finally:
        connection.close()


def _admin_does_its_broker_work(user: BrokerUser, client_queue: str) -> None:
    """A CI user's work, and `molteniron dead-letters`: list, requeue, purge."""
    from molteniron.clients.dead_letters import DeadLetterQueue
    _client_does_its_broker_work(user, client_queue)
    try:  # fresh_topology put a dead letter there
        with DeadLetterQueue(user.url) as dead:
            (letter,), _ = dead.show(1)
            dead.requeue(letter.id)
            dead.purge()
    except errors.Forbidden as exc:  # the broker's refusal, as the caller expects it
        raise ChannelClosedByBroker(403, exc.message) from None


def test_the_definitions_grant_exactly_these_names():
    assert [allowed(p) for p in permissions_of("molteniron-worker")] == [
        ["molteniron", "molteniron.dead", "molteniron.requests", "molteniron.dead-letters"],
        ["molteniron", "molteniron.dead", "molteniron.requests", "molteniron.dead-letters",
         "amq.default"],
        ["molteniron", "molteniron.dead", "molteniron.requests"]]
    assert [allowed(p) for p in permissions_of("molteniron-ci")] == [
        ["amq.gen-Xyz"], ["molteniron"], ["amq.gen-Xyz"]]
    assert [allowed(p) for p in permissions_of("molteniron-admin")] == [
        ["amq.gen-Xyz"], ["molteniron"], ["molteniron.dead-letters", "amq.gen-Xyz"]]


def test_every_right_in_the_definitions_is_needed(stack, broker_users):
    """Least privilege: take away any one name from any permission and the work fails."""
    vhost = unquote(urlsplit(stack.amqp_url).path.lstrip("/"))
    connection, channel = stack.channel()
    client_queue = channel.queue_declare("", exclusive=True).method.queue

    def fresh_topology(role: str) -> None:
        # The worker makes the queues when they are not there (no definitions imported);
        # declaring one that exists checks fewer rights (not the dead-letter exchange's).
        for queue in (protocol.REQUEST_QUEUE, protocol.DEAD_LETTER_QUEUE):
            channel.queue_delete(queue)
        for exchange in (protocol.EXCHANGE, protocol.DEAD_LETTER_EXCHANGE):
            channel.exchange_delete(exchange)
        if role != "molteniron-worker":
            topology.declare(channel)
        if role == "molteniron-admin":  # one to list, requeue and purge
            channel.basic_publish(protocol.DEAD_LETTER_EXCHANGE, "", b"{}")

    work = {"molteniron-worker": _worker_does_its_broker_work,
            "molteniron-ci": _client_does_its_broker_work,
            "molteniron-admin": _admin_does_its_broker_work}
    checked = []
    for role, does_its_work in work.items():
        user = broker_users(role)
        rights = permissions_of(role)
        fresh_topology(role)
        does_its_work(user, client_queue)  # with every right: fine
        for kind, pattern in enumerate(rights):
            for name in allowed(pattern):
                fewer = list(rights)
                fewer[kind] = without(pattern, name)
                rabbitmqctl("set_permissions", "-p", vhost, user.name, *fewer)
                fresh_topology(role)
                with pytest.raises(ChannelClosedByBroker) as refused:
                    does_its_work(user, client_queue)
                assert refused.value.reply_code == 403, (role, kind, name)
                checked.append((role, ("configure", "write", "read")[kind], name))
    connection.close()
    assert len(checked) == 4 + 5 + 3 + 3 + 4, checked


def test_a_forged_user_id_is_refused_by_the_broker_and_never_reaches_the_worker(
        stack, broker_users):
    admin, ci = broker_users("molteniron-admin"), broker_users("molteniron-ci")
    stack.start_worker(env={"MOLTENIRON_ADMINS": admin.name})
    connection = ci.connect()
    channel = connection.channel()
    channel.confirm_delivery()
    reply_queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    forged = protocol.new_request("add_baremetal", dict(zip(
        ("name", "ipmi_ip", "ipmi_user", "ipmi_password", "allocation_pool", "port_hwaddr",
         "cpu_arch", "cpus", "ram_mb", "disk_gb"),
        ("forged", "10.9.9.9", "u", "p", "10.9.9.10", "aa:00", "x86_64", 1, 1, 1))))

    with pytest.raises(ChannelClosedByBroker) as refused:
        channel.basic_publish(protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY, forged.to_body(),
                              pika.BasicProperties(reply_to=reply_queue, user_id=admin.name,
                                                   correlation_id=forged.id, delivery_mode=2))
    assert refused.value.reply_code == 406
    assert "PRECONDITION_FAILED" in refused.value.reply_text
    connection.close()

    # The worker answers later requests, and never saw the forged one.
    assert stack.cli("status", env=ci.env).returncode == 0
    assert stack.sql("SELECT COUNT(*) FROM nodes") == [(0,)]
    assert forged.id not in stack.worker_log()
    assert stack.dead_letters() == 0


def test_a_ci_user_with_least_privilege_runs_the_whole_jenkins_flow(
        stack, broker_users, tmp_path):
    worker, admin, ci = (broker_users(role) for role in
                         ("molteniron-worker", "molteniron-admin", "molteniron-ci"))
    # The worker too runs with only the definitions file's permissions.
    stack.start_worker(env={**worker.env, "MOLTENIRON_ADMINS": admin.name})
    for i in (1, 2):
        added = stack.cli("add_baremetal", *node_args(i), env=admin.env)
        assert added.returncode == 0, added
    # As a job gets it: the URL without the password, the password in its own variable.
    url = urlsplit(ci.url)
    job = {"MOLTENIRON_AMQP_URL": url._replace(netloc=f"{quote(ci.name)}@{url.hostname}:"
                                                      f"{url.port}").geturl(),
           "MOLTENIRON_AMQP_PASSWORD": ci.password,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def hook(name: str, *args: str, owner: str, workspace: Path) -> subprocess.CompletedProcess:
        workspace.mkdir(exist_ok=True)
        return subprocess.run(["bash", str(HOOKS / name), *args], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env={**stack.env, **job,
                                                          "MOLTENIRON_OWNER": owner,
                                                          "WORKSPACE": str(workspace),
                                                          "MOLTENIRON_WAIT": "60"})

    def cli(*args: str):
        done = stack.cli(*args, env=job)
        assert done.returncode == 0, (args, done)
        return done.json

    pre = hook("pre_hook.sh", "2", owner="job-1", workspace=tmp_path / "job-1")
    assert pre.returncode == 0, pre
    nodes_file = tmp_path / "job-1" / "molteniron-nodes.json"
    assert stat.S_IMODE(nodes_file.stat().st_mode) == 0o600
    nodes = json.loads(nodes_file.read_text())["nodes"].values()
    assert {json.loads(node["blob"])["ipmi_password"] for node in nodes} == {
        "secret-1", "secret-2"}

    assert {f["id"] for f in cli("get_field", "job-1", "port_hwaddr")["result"]} == {
        node["id"] for node in nodes}
    assert cli("renew", "job-1", "--lease", "600")["status"] == 200
    assert cli("status")["status"] == 200
    # `workers` reads the queue depth with a passive declare of the request queue.
    assert isinstance(cli("workers")["queued_requests"], int)

    # Two more jobs wait for nodes; one of them gives up (cancel).
    second = stack.cli_start("allocate", "job-2", "2", "--wait", "60", env=job)
    third = stack.cli_start("allocate", "job-3", "1", "--wait", "60", env=job)

    def both_waiting() -> list[dict] | None:
        rows = cli("waiting")["waiting"]
        return rows if {w["owner"] for w in rows} == {"job-2", "job-3"} else None

    waiting = wait_until(both_waiting, 20, "job-2 and job-3 to wait", interval=0.2)
    (job_3,) = [w["request_id"] for w in waiting if w["owner"] == "job-3"]
    assert cli("cancel", job_3)["status"] == 200
    assert third.result().returncode == 1

    post = hook("post_hook.sh", owner="job-1", workspace=tmp_path / "job-1")
    assert post.returncode == 0, post
    served = second.result()
    assert served.returncode == 0, served
    assert len(served.json["nodes"]) == 2

    post = hook("post_hook.sh", owner="job-2", workspace=tmp_path / "job-2")
    assert post.returncode == 0, post
    assert stack.sql("SELECT owner FROM nodes") == [(None,), (None,)]
    assert stack.sql("SELECT COUNT(*) FROM waiting_requests") == [(0,)]


def test_a_ci_user_cannot_write_to_the_default_exchange(running, broker_users):
    """Else a job could push a forged reply (nodes it does not hold) into another job's queue."""
    ci = broker_users("molteniron-ci")
    with running.client() as victim:
        forged_id = str(uuid.uuid4())
        victim.replies[forged_id] = []
        connection = ci.connect()
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(ChannelClosedByBroker) as refused:
            channel.basic_publish("", victim.reply_queue, json.dumps(
                {"v": 1, "id": forged_id, "status": 200, "nodes": {}}).encode(),
                pika.BasicProperties(correlation_id=forged_id))
        assert refused.value.reply_code == 403
        assert "amq.default" in refused.value.reply_text
        connection.close()
        assert victim.call("status")["status"] == 200  # the victim's queue still works
        assert victim.replies[forged_id] == []


def test_a_ci_user_cannot_read_other_jobs_requests_or_replies(running, broker_users):
    ci = broker_users("molteniron-ci")
    with running.client() as other_job:
        connection = ci.connect()
        attempts = {
            "bind its queue to the request exchange": lambda ch: ch.queue_bind(
                ch.queue_declare("", exclusive=True).method.queue, protocol.EXCHANGE,
                protocol.REQUEST_ROUTING_KEY),
            "get from the request queue": lambda ch: ch.basic_get(protocol.REQUEST_QUEUE),
            "consume the request queue": lambda ch: ch.basic_consume(protocol.REQUEST_QUEUE,
                                                                     lambda *a: None),
            "purge the request queue": lambda ch: ch.queue_purge(protocol.REQUEST_QUEUE),
            "consume another job's reply queue": lambda ch: ch.basic_consume(
                other_job.reply_queue, lambda *a: None),
            "publish to the dead-letter exchange": lambda ch: ch.basic_publish(
                protocol.DEAD_LETTER_EXCHANGE, "", b"{}"),
        }
        for what, attempt in attempts.items():
            channel = connection.channel()
            channel.confirm_delivery()
            with pytest.raises(ChannelClosedByBroker) as refused:
                attempt(channel)
            assert refused.value.reply_code in (403, 405), what  # 405: exclusive queue
        connection.close()


def test_every_request_the_cli_sends_carries_its_login_as_user_id(running, broker_users):
    # A name that must be percent-encoded in the URL: the client sends it decoded.
    ci = broker_users("molteniron-ci", name=f"mi-test ci@{uuid.uuid4().hex[:8]}")
    connection, tap = running.channel()
    tap_queue = tap.queue_declare("", exclusive=True).method.queue
    tap.queue_bind(tap_queue, protocol.EXCHANGE, protocol.REQUEST_ROUTING_KEY)
    running.cli("add_baremetal", *node_args(1))
    seen_before = _drain(tap, tap_queue)

    commands = [("allocate", "job-1", "1"), ("get_field", "job-1", "name"), ("renew", "job-1"),
                ("status",), ("status_baremetal",), ("waiting",), ("workers",),
                ("release", "job-1"), ("cancel", str(uuid.uuid4())),
                ("add_baremetal", *node_args(2)), ("set_field", "1", "cpus", "4", "int")]
    for args in commands:
        done = running.cli(*args, env=ci.env)
        assert "Traceback" not in done.stderr, (args, done)
    sent = _drain(tap, tap_queue)
    connection.close()

    assert {op for op, _ in seen_before} == {"add_baremetal"}
    assert {user for _, user in seen_before} == {"guest"}
    assert sorted(op for op, _ in sent) == sorted(
        "status" if args[0] == "status_baremetal" else args[0] for args in commands)
    assert {user for _, user in sent} == {ci.name}


def _drain(channel, queue: str) -> list[tuple[str, str | None]]:
    """(op, user_id) of every client request in the tap queue (the worker's ticks left out)."""
    seen: list[tuple[str, str | None]] = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return seen
        op = json.loads(body)["op"]
        if op != "tick":
            seen.append((op, properties.user_id))
