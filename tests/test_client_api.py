"""MoltenIronClient as a Python API (schedulers such as Zuul call it): documented, and
raising the documented, public error types for what goes wrong, whichever way it
went wrong (the broker, the worker's absence, the worker's refusal)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

from molteniron import errors
from molteniron.clients import client as client_module
from molteniron.clients.client import MoltenIronClient
from molteniron.workers import topology
from tests.stack import ROOT, node_args

EXAMPLE = ROOT / "examples" / "python" / "allocate_and_release.py"
AT_ONCE = 5.0  # seconds: a refusal, or the broker saying nobody consumes, is never waited out


def documented_errors() -> list[str]:
    """The error classes the class docstring lists (errors.NAME)."""
    return re.findall(r"errors\.([A-Z]\w+)", MoltenIronClient.__doc__ or "")


def test_the_client_and_its_public_methods_say_what_they_take_return_and_raise():
    listed = documented_errors()
    assert {"ServiceUnavailable", "BrokerRefused", "BrokerNotTrusted", "RequestQueued",
            "Forbidden", "NotEnoughNodes", "PoolTooSmall", "Interrupted"} <= set(listed)
    for name in listed:  # each one public, where a caller catches it
        assert isinstance(getattr(errors, name, None), type), name
    internal = {"BrokerLost", "BrokerClosedChannel", "BrokerReturned", "BrokerNacked"}
    assert not internal & set(listed), "the boundary's own errors never reach a caller"
    public = [(name, member) for name, member in inspect.getmembers(MoltenIronClient)
              if not name.startswith("_") and inspect.isfunction(member)]
    assert len(public) >= 20
    undocumented = [name for name, member in public if not (member.__doc__ or "").strip()]
    assert undocumented == []


def test_the_readme_example_takes_a_node_and_gives_it_back(running):
    running.cli("add_baremetal", *node_args(1))
    done = subprocess.run([sys.executable, str(EXAMPLE), "job-42"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={"MOLTENIRON_AMQP_URL": running.amqp_url, "PATH": ""})
    assert done.returncode == 0, done
    assert done.stdout.split() == ["node-1", node_args(1)[1]]
    assert running.sql("SELECT owner FROM nodes") == [(None,)]  # released
    assert running.sql("SELECT COUNT(*) FROM allocations") == [(1,)]


def test_the_example_says_why_when_no_worker_answers(stack):
    done = subprocess.run([sys.executable, str(EXAMPLE), "job-42"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={"MOLTENIRON_AMQP_URL": stack.amqp_url, "PATH": ""})
    assert done.returncode == 1
    assert done.stderr.startswith("MoltenIron is unavailable: "), done


def raised(call) -> tuple[errors.MoltenIronError, float]:
    """What call() raised, and how long it took."""
    started = time.monotonic()
    with pytest.raises(errors.MoltenIronError) as caught:
        call()
    return caught.value, time.monotonic() - started


def test_no_worker_consuming_is_service_unavailable_at_once(stack):
    connection, channel = stack.channel()
    topology.declare(channel)  # as a worker that ran once left them
    connection.close()
    with MoltenIronClient(stack.amqp_url, timeout=20) as client:
        refused, took = raised(lambda: client.allocate("job", 1))
        assert type(refused) is errors.ServiceUnavailable and refused.status == 503
        assert "no MoltenIron worker is consuming" in refused.message, refused.message
        assert took < AT_ONCE
        # A release never expires: it is queued for the worker that comes.
        queued, _ = raised(lambda: client.release("job"))
        assert type(queued) is errors.RequestQueued and queued.status == 202


def test_a_refused_login_is_broker_refused_before_anything_is_sent(stack):
    parts = urlsplit(stack.amqp_url)
    wrong = stack.amqp_url.replace(f":{parts.password}@", ":not-the-password@")
    client = MoltenIronClient(wrong, timeout=20)  # connects when first used
    for call in (client.connect, lambda: client.allocate("job", 1), client.status):
        refused, took = raised(call)
        assert type(refused) is errors.BrokerRefused and took < AT_ONCE
        assert isinstance(refused, errors.BrokerUnusable)  # no retry can help
        assert f"refused the login of user '{parts.username}'" in refused.message
        assert "not-the-password" not in refused.message


def test_a_pool_too_small_and_too_few_ready_nodes_are_conflicts_of_their_own_type(running):
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    with running.client() as client:
        assert client.allocate("job-1", 1, wait=None)["status"] == 200
        busy, _ = raised(lambda: client.allocate("job-2", 2, wait=None))
        assert type(busy) is errors.NotEnoughNodes and busy.status == 409
        assert isinstance(busy, errors.Conflict) and busy.reply is not None
        assert busy.reply["error"] == "NotEnoughNodes"  # as the worker sent it
        never, _ = raised(lambda: client.allocate("job-2", 3, wait=None))
        assert type(never) is errors.PoolTooSmall and never.status == 409
        nobody, _ = raised(lambda: client.release("job-3"))
        assert type(nobody) is errors.OwnerNotFound and nobody.status == 404


def test_what_a_broker_user_may_not_do_is_forbidden(secured, users):
    alice = users["alice"]["env"]["MOLTENIRON_AMQP_URL"]
    with MoltenIronClient(alice, timeout=10) as client:
        refused, _ = raised(client.delete_db)
        assert type(refused) is errors.Forbidden and refused.status == 403
        assert client.allocate("alice-job", 1, wait=None)["status"] == 200
    assert secured.sql("SELECT COUNT(*) FROM nodes") == [(2,)]


def test_the_client_module_lists_what_it_exports():
    assert "MoltenIronClient" in client_module.__all__
    for name in client_module.__all__:
        assert hasattr(client_module, name), name
