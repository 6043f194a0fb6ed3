"""A broker that refuses this client (its login, its vhost, a permission), or that this
client cannot trust (its TLS certificate): the CLI exits 2 at once naming which, sends
nothing and leaves nothing queued. An outage would be tried again until --timeout; none
of these would ever change by trying again.

Broker users and vhosts are made with rabbitmqctl (as tests/stack.py does) with the
permissions deploy/rabbitmq-definitions.json gives a CI user, and removed afterwards;
the TLS cases use test_broker_tls's private broker with its own CA.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import pytest

from tests.definitions import permissions_of
from tests.stack import _rabbitmqctl, node_args
from tests.tls import cli as plain_cli
from tests.tls import no_config

TIMEOUT = "20"  # --timeout: what an outage would be retried for; a refusal must not wait
# The bound "at once" is held to (the claim: one connection, about 0.1 s of a CLI's 0.1 s
# start; each check used to take the whole --timeout).
AT_ONCE = 5.0
# Commands of a CI job: none of them may be tried again, queued, or left half done.
JOB_COMMANDS = (["allocate", "job", "1"], ["release", "job"], ["status"])


@dataclass
class Login:
    name: str
    password: str
    host: str  # host:port of the broker
    vhost: str

    def env(self, password: str | None = None, vhost: str | None = None) -> dict:
        """The environment of a CLI that logs in as this user (with these changes)."""
        url = (f"amqp://{quote(self.name, safe='')}:{quote(password or self.password)}@"
               f"{self.host}/{quote(vhost or self.vhost, safe='')}")
        return {"MOLTENIRON_AMQP_URL": url}

    def grant(self, configure: str, write: str, read: str) -> None:
        _rabbitmqctl("set_permissions", "-p", self.vhost, self.name, configure, write, read)


@pytest.fixture
def ci_user(stack):
    """A broker user with a CI user's permissions (the definitions file's) in the test
    run's vhost; deleted afterwards."""
    parts = urlsplit(stack.amqp_url)
    login = Login(f"mi-test-refused-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex,
                  parts.netloc.rpartition("@")[2], unquote(parts.path.lstrip("/")))
    _rabbitmqctl("add_user", login.name, login.password)
    try:
        login.grant(*permissions_of("molteniron-ci"))
        yield login
    finally:
        _rabbitmqctl("delete_user", login.name)


def refused_at_once(run, *words: str, error: str = "BrokerRefused") -> None:
    """Each job command, run by `run(*args)`, exits 2 at once naming what was refused."""
    for command in JOB_COMMANDS:
        started = time.monotonic()
        result = run("--timeout", TIMEOUT, *command)
        took = time.monotonic() - started
        assert result.returncode == 2, (command, result)
        assert took < AT_ONCE, (command, took)
        for said in words:
            assert said in result.stderr, (command, said, result)
        reply = json.loads(result.stdout)
        assert reply["error"] == error and "queued" not in reply, (command, reply)
        assert "Traceback" not in result.stderr


def a_job_held_its_node(running) -> None:
    running.cli("add_baremetal", *node_args(1))
    assert running.cli("allocate", "job", "1").returncode == 0


def held_as_before(running) -> None:
    """Nothing the refused commands did reached the pool."""
    assert running.sql("SELECT name, owner FROM nodes") == [("node-1", "job")]
    assert running.sql("SELECT COUNT(*) FROM allocations") == [(1,)]
    assert running.sql("SELECT COUNT(*) FROM waiting_requests") == [(0,)]


def test_a_wrong_password_exits_2_at_once_naming_the_login(running, ci_user):
    a_job_held_its_node(running)
    env = ci_user.env(password="not-the-password")
    refused_at_once(lambda *args: running.cli(*args, env=env),
                    f"RabbitMQ at {ci_user.host} vhost {ci_user.vhost} refused the login of "
                    f"user '{ci_user.name}': wrong user name or password")
    held_as_before(running)


def test_a_vhost_that_does_not_exist_exits_2_at_once_naming_it(running, ci_user):
    a_job_held_its_node(running)
    env = ci_user.env(vhost="molteniron-no-such-vhost")
    refused_at_once(lambda *args: running.cli(*args, env=env),
                    f"RabbitMQ at {ci_user.host} has no vhost 'molteniron-no-such-vhost'")
    held_as_before(running)


def test_a_user_without_access_to_the_vhost_exits_2_at_once_naming_both(running, ci_user):
    a_job_held_its_node(running)
    _rabbitmqctl("clear_permissions", "-p", ci_user.vhost, ci_user.name)
    refused_at_once(lambda *args: running.cli(*args, env=ci_user.env()),
                    f"refused user '{ci_user.name}' access to vhost '{ci_user.vhost}': the "
                    "user has no permissions there")
    held_as_before(running)


@pytest.mark.parametrize("right, on", [
    ("configure", "its reply queue (amq.gen-*)"),  # declaring its reply queue
    ("write", "exchange 'molteniron'"),  # publishing the request
    ("read", "its reply queue (amq.gen-*)"),  # consuming the replies
])
def test_a_missing_permission_exits_2_at_once_naming_it(running, ci_user, right, on):
    a_job_held_its_node(running)
    rights = dict(zip(("configure", "write", "read"), permissions_of("molteniron-ci")))
    ci_user.grant(**{**rights, right: "^$"})
    refused_at_once(lambda *args: running.cli(*args, env=ci_user.env()),
                    f"refused user '{ci_user.name}' the {right} permission on {on}",
                    "ACCESS_REFUSED")
    held_as_before(running)
    # With the right given back, the same login works: it was the permission, nothing else.
    ci_user.grant(**rights)
    assert running.cli("release", "job", env=ci_user.env()).returncode == 0


def test_a_broker_whose_certificate_is_not_trusted_exits_2_at_once_naming_it_and_why(
        tls_broker, tmp_path):  # noqa: F811 (the fixture imported above)
    port = tls_broker.tls_port

    def tls_cli(env: dict):
        return lambda *args: plain_cli(*args, env={**no_config(tmp_path), **env})

    # No amqp_ca_file: the private CA is not among the system's.
    refused_at_once(tls_cli({"MOLTENIRON_AMQP_URL": tls_broker.url()}),
                    f"the TLS certificate of RabbitMQ at localhost:{port} is not trusted",
                    "certificate verify failed: self-signed certificate in certificate chain",
                    error="BrokerNotTrusted")
    # The right CA, but the certificate names "localhost", not the address in the URL.
    by_address = {**tls_broker.env(), "MOLTENIRON_AMQP_URL": tls_broker.url("127.0.0.1")}
    refused_at_once(tls_cli(by_address),
                    f"the TLS certificate of RabbitMQ at 127.0.0.1:{port} is not trusted",
                    "certificate is not valid for '127.0.0.1'", error="BrokerNotTrusted")
