"""No worker running: nothing lost, nothing stalled; clients that give up never own nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from molteniron import protocol
from tests.stack import ROOT, RunningCli, node_args, wait_until

HOOKS = ROOT / "clients" / "hooks"
# The bound "at once" is held to where the CLI used to wait for --timeout (30 s here): what
# is claimed is about 1.5 s (2 s for an allocate, process start included); what is
# measured is printed.
AT_ONCE = 5.0


def owners(stack) -> dict[str, str | None]:
    return dict(stack.sql("SELECT name, owner FROM nodes ORDER BY id"))


def waiting_owners(stack) -> list[str]:
    return [row[0] for row in stack.sql("SELECT owner FROM waiting_requests ORDER BY id")]


def allocated_then_no_worker(stack, owner: str = "job") -> None:
    """One node, held by owner, and no worker running any more."""
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    assert stack.cli("allocate", owner, "1").returncode == 0
    stack.stop_workers()


def run_hook(stack, tmp_path: Path, hook: str, *args: str,
             **env: str) -> subprocess.CompletedProcess:
    """A hook script as Jenkins runs it: `molteniron` on PATH, a 2 s request_timeout."""
    config = tmp_path / "hook-conf.yaml"
    config.write_text("request_timeout: 2\n")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(HOOKS / hook), *args], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env={**stack.env, "PATH": path, "MOLTENIRON_CONFIG": str(config),
             "WORKSPACE": str(tmp_path), "MOLTENIRON_OWNER": "job", **env})


def test_allocate_without_a_worker_gives_up_at_once_and_is_never_served_later(stack):
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    stack.stop_workers()

    result = stack.cli("--timeout", "3", "allocate", "job", "1", "--wait", "3600", timeout=30)
    assert result.returncode == 4, result
    assert "no MoltenIron worker is consuming molteniron.requests" in result.stderr
    assert "Traceback" not in result.stderr

    stack.start_worker()  # answers a status, so everything queued before it was handled
    assert owners(stack) == {"node-1": None}
    assert stack.sql("SELECT COUNT(*) FROM allocations WHERE owner='job'") == [(0,)]
    assert waiting_owners(stack) == []


def test_release_without_a_worker_is_queued_and_takes_effect_when_one_comes(stack):
    allocated_then_no_worker(stack)

    result = stack.cli("--timeout", "2", "release", "job", timeout=30)
    assert result.returncode == 4, result
    assert result.json["status"] == 202 and result.json["queued"] is True
    assert "queued" in result.json["message"]
    assert owners(stack) == {"node-1": "job"}

    stack.start_worker()
    wait_until(lambda: owners(stack) == {"node-1": None}, 15, "the queued release to free the node")


def timed_cli(stack, *args: str):
    """The CLI with the default --timeout of 30 s, and how long it took."""
    started = time.monotonic()
    result = stack.cli("--timeout", "30", *args, timeout=90)
    return result, time.monotonic() - started


def queued_requests(stack) -> int:
    """Requests in the request queue that no worker took yet."""
    connection, channel = stack.channel()
    try:
        return channel.queue_declare(protocol.REQUEST_QUEUE, passive=True).method.message_count
    finally:
        connection.close()


def test_allocate_with_no_worker_consuming_exits_4_at_once_and_sends_nothing(stack):
    stack.start_worker()
    stack.cli("add_baremetal", *node_args(1))
    stack.stop_workers()
    dead_letters = stack.dead_letters()

    result, took = timed_cli(stack, "allocate", "job", "1", "--wait", "3600")

    print(f"\nallocate with no worker consuming: exit {result.returncode} after {took:.2f}s")
    assert result.returncode == 4, result
    assert took < AT_ONCE, took
    assert "no MoltenIron worker is consuming molteniron.requests" in result.stderr, result
    assert "the allocate was not sent" in result.stderr
    assert result.json["status"] == 503 and "Traceback" not in result.stderr
    # Nothing was published: no allocate to expire into the dead letters, no cancel behind it.
    assert queued_requests(stack) == 0
    assert stack.dead_letters() == dead_letters

    stack.start_worker()
    assert owners(stack) == {"node-1": None}
    assert stack.sql("SELECT COUNT(*) FROM allocations WHERE owner='job'") == [(0,)]


def test_a_read_with_no_worker_consuming_fails_at_once_naming_why(stack):
    stack.start_worker()
    stack.stop_workers()

    result, took = timed_cli(stack, "status")

    print(f"\nstatus with no worker consuming: exit {result.returncode} after {took:.2f}s")
    assert result.returncode == 4, result
    assert took < AT_ONCE, took
    assert "no MoltenIron worker answered: no MoltenIron worker is consuming " \
           "molteniron.requests" in result.stderr, result


def test_release_and_cancel_with_no_worker_consuming_are_queued_at_once(stack):
    allocated_then_no_worker(stack)
    unseen = str(uuid.uuid4())

    released, release_took = timed_cli(stack, "release", "job")
    cancelled, cancel_took = timed_cli(stack, "cancel", unseen)

    print(f"\nwith no worker consuming: release queued after {release_took:.2f}s, cancel "
          f"after {cancel_took:.2f}s")
    for result, took in ((released, release_took), (cancelled, cancel_took)):
        assert result.returncode == 4, result
        assert took < AT_ONCE, took
        assert result.json["status"] == 202 and result.json["queued"] is True, result
        assert "no MoltenIron worker is consuming molteniron.requests" in result.stderr
    assert owners(stack) == {"node-1": "job"}
    assert queued_requests(stack) == 2  # both kept, for the worker that comes

    stack.start_worker()
    wait_until(lambda: owners(stack) == {"node-1": None}, 15, "the queued release to free the node")


def test_post_hook_passes_with_a_warning_when_the_release_stays_queued(stack, tmp_path):
    allocated_then_no_worker(stack)

    result = run_hook(stack, tmp_path, "post_hook.sh", MOLTENIRON_RELEASE_RETRY="1")
    assert result.returncode == 0, result
    assert "queued" in result.stderr and "WARNING" in result.stderr

    stack.start_worker()
    wait_until(lambda: owners(stack) == {"node-1": None}, 15, "the queued release to free the node")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_background_allocate_is_cancelled_on_a_signal(running, signum):
    """`molteniron allocate ... &` in a script starts with SIGINT ignored; a signal must still
    cancel."""
    running.cli("add_baremetal", *node_args(1))
    running.cli("allocate", "holder", "1")
    waiting = RunningCli(subprocess.Popen(
        [sys.executable, "-m", "molteniron.clients.cli",
         "allocate", "quitter", "1", "--wait", "60"],
        env=running.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_ignore_sigint))
    try:
        wait_until(lambda: waiting_owners(running) == ["quitter"], 15, "quitter to wait")
        waiting.process.send_signal(signum)
        result = waiting.result()
    finally:
        waiting.process.kill()
    assert result.returncode == 130, result
    assert waiting_owners(running) == []
    running.cli("release", "holder")
    assert owners(running) == {"node-1": None}


@pytest.mark.parametrize("url", ["notaurl", "amqp://[bad", "http://127.0.0.1/"])
def test_a_malformed_amqp_url_is_a_usage_error(stack, url):
    stack.env["MOLTENIRON_AMQP_URL"] = url
    result = stack.cli("status")
    assert result.returncode == 2, result
    assert "amqp_url is not a valid AMQP URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_url_naming_a_user_without_a_password_says_where_the_password_goes(stack):
    """client.yaml names the CI user and no password; an agent whose job forgot the
    password credential learns what to set, not a driver's TypeError."""
    stack.env["MOLTENIRON_AMQP_URL"] = "amqp://molteniron-ci@127.0.0.1:5672/%2F"
    stack.env.pop("MOLTENIRON_AMQP_PASSWORD", None)
    result = stack.cli("status")
    assert result.returncode == 2, result
    assert ("amqp_url names the user molteniron-ci but no password: set "
            "$MOLTENIRON_AMQP_PASSWORD") in result.stderr, result.stderr
    assert "NoneType" not in result.stderr and "Traceback" not in result.stderr


def test_allocate_lease_and_renew(running):
    """Needs the worker side: --lease, renew, nodes.lease_expires_at."""
    for i in (1, 2):
        running.cli("add_baremetal", *node_args(i))
    short = running.cli("allocate", "short", "1", "--lease", "60")
    assert short.returncode == 0, short
    assert running.cli("allocate", "default", "1").returncode == 0

    def lease(owner):
        return running.sql(f"SELECT lease_expires_at FROM nodes WHERE owner='{owner}'")[0][0]

    before = lease("short")
    assert before < lease("default")
    renewed = running.cli("renew", "short", "--lease", "7200")
    assert renewed.returncode == 0, renewed
    assert lease("short") > before

    nobody = running.cli("renew", "nobody")
    assert nobody.returncode == 1 and nobody.json["status"] == 404


def test_status_filters_by_state_and_owner(running):
    """Needs the worker side: status with state and owner."""
    for i in (1, 2, 3):
        running.cli("add_baremetal", *node_args(i))
    running.cli("allocate", "job-a", "1")
    running.cli("allocate", "job-b", "1")

    def names(*args):
        result = running.cli("status", "-t", "json", *args)
        assert result.returncode == 0, result
        return [record["name"] for record in result.json["result"]]

    assert names("--state", "ready") == ["node-3"]
    assert names("--state", "allocated") == ["node-1", "node-2"]
    assert names("--owner", "job-b") == ["node-2"]
    assert names("--state", "ready", "--owner", "job-b") == []
    assert running.cli("status", "--state", "asleep").returncode == 2
