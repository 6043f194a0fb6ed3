"""The `stack` fixture: a real RabbitMQ vhost + MariaDB database + worker processes.

The vhost is made for this test run with rabbitmqctl and deleted afterwards;
each test gets empty tables, purged queues and its own worker process(es).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote, unquote, urlparse

import pika
import pytest

from bench.env import stop_processes, vhost_url
from molteniron import protocol
from molteniron.clients.client import MoltenIronClient
from tests import services

ROOT = Path(__file__).resolve().parent.parent
TEST_AMQP_URL = services.current().amqp_url  # the container's URL once it is started
HOW_TO_START_BROKER = services.current().broker_help


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _rabbitmqctl(*args: str, on: services.Services | None = None) -> str:
    """rabbitmqctl on the test run's broker (local, or inside its container); fails the test
    if refused."""
    chosen = on or services.current()
    try:
        return chosen.rabbitmqctl(*args)
    except services.BrokerAdminError as exc:
        pytest.fail(f"{chosen.broker_help}\n({exc})", pytrace=False)


@contextmanager
def fresh_vhost(chosen: services.Services):
    """A vhost of its own on the chosen broker, for its login; deleted afterwards."""
    params = pika.URLParameters(chosen.amqp_url)
    try:
        pika.BlockingConnection(params).close()
    except Exception as exc:  # any failure to connect means the same thing here
        pytest.fail(f"{chosen.broker_help}\n(connecting said: {exc!r})", pytrace=False)
    vhost = services.run_name()
    _rabbitmqctl("add_vhost", vhost, on=chosen)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, params.credentials.username, ".*", ".*", ".*",
                     on=chosen)
        yield vhost_url(chosen.amqp_url, vhost)
    finally:
        _rabbitmqctl("delete_vhost", vhost, on=chosen)


@pytest.fixture(scope="session")
def amqp_url():
    """A vhost of its own for this test run, on the real broker."""
    with fresh_vhost(services.current()) as url:
        yield url


class CliResult:
    def __init__(self, done: subprocess.CompletedProcess):
        self.returncode = done.returncode
        self.stdout = done.stdout
        self.stderr = done.stderr

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"CliResult(rc={self.returncode}, stdout={self.stdout!r}, stderr={self.stderr!r})"


class RunningCli:
    """A CLI process started in the background (a waiting allocate)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    def result(self, timeout: float = 30) -> CliResult:
        stdout, stderr = self.process.communicate(timeout=timeout)
        return CliResult(subprocess.CompletedProcess(self.process.args, self.process.returncode,
                                                     stdout, stderr))


class Stack:
    def __init__(self, amqp_url: str, database_url: str, engine, logdir: Path):
        self.amqp_url = amqp_url
        self.database_url = database_url
        self.engine = engine
        self.logdir = logdir
        self.workers: list[subprocess.Popen] = []
        self.background: list[subprocess.Popen] = []  # cli_start's, stopped with the workers
        self.env = {**os.environ, "MOLTENIRON_AMQP_URL": amqp_url,
                    "MOLTENIRON_DB_URL": database_url, "PYTHONPATH": str(ROOT),
                    # A worker refuses to start without `admins`: tests that check
                    # authorization name their admin in MOLTENIRON_ADMINS themselves.
                    "MOLTENIRON_ADMINS": os.environ.get("MOLTENIRON_ADMINS", "off"),
                    "MOLTENIRON_CONFIG": str(logdir / "absent.yaml")}
        (logdir / "absent.yaml").write_text("{}\n")

    # --- workers -------------------------------------------------------------

    def start_worker(self, env: dict | None = None, ready: bool = True) -> subprocess.Popen:
        log = open(self.logdir / f"worker-{len(self.workers)}.log", "w")
        worker = subprocess.Popen(
            [sys.executable, "-m", "molteniron.workers.main", "--no-migrate",
             "--worker-id", f"test-worker-{len(self.workers)}"],
            env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.workers.append(worker)
        if ready:
            with self.client() as client:
                wait_until(lambda: _answers(client), 30, "the worker to answer status")
        return worker

    def worker_log(self, index: int = 0) -> str:
        return (self.logdir / f"worker-{index}.log").read_text()

    def stop_workers(self) -> None:
        stop_processes(self.workers)

    def stop_background(self) -> None:
        """Whatever cli_start started and the test left running: a CLI still sending its
        request would put it (or its dead letter) in the next test's queues."""
        stop_processes(self.background)

    # --- clients -------------------------------------------------------------

    def client(self, timeout: float = 10.0) -> MoltenIronClient:
        return MoltenIronClient(self.amqp_url, timeout=timeout)

    def cli(self, *args: str, timeout: float = 60, env: dict | None = None) -> CliResult:
        done = subprocess.run([sys.executable, "-m", "molteniron.clients.cli", *args],
                              env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return CliResult(done)

    def cli_start(self, *args: str, env: dict | None = None) -> RunningCli:
        process = subprocess.Popen(
            [sys.executable, "-m", "molteniron.clients.cli", *args],
            env={**self.env, **(env or {})}, cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.background.append(process)
        return RunningCli(process)

    # --- the broker, seen from outside ----------------------------------------

    def channel(self):
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        return connection, connection.channel()

    def purge_queues(self) -> None:
        connection, channel = self.channel()
        for queue in (protocol.REQUEST_QUEUE, protocol.DEAD_LETTER_QUEUE):
            try:
                channel.queue_purge(queue)
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet
                channel = connection.channel()
        connection.close()

    def requests_queued(self) -> int:
        """Requests in the request queue, those a worker was given and has not acked
        included (a stopped worker's prefetch takes them at once)."""
        vhost = unquote(urlparse(self.amqp_url).path[1:])
        listed = _rabbitmqctl("list_queues", "-q", "-p", vhost, "name", "messages")
        counts = dict(line.split("\t") for line in listed.splitlines() if "\t" in line)
        return int(counts.get(protocol.REQUEST_QUEUE, 0))

    @contextmanager
    def worker_stopped(self, index: int = 0):
        """The worker stopped (SIGSTOP) for the block, so that what happens meanwhile (a
        client dying, a request queued) reaches it together when it goes on: a queued
        release is then served before its next tick can find a dead client's reply queue
        gone and cancel that client's wait."""
        worker = self.workers[index]
        worker.send_signal(signal.SIGSTOP)
        try:
            yield worker
        finally:
            worker.send_signal(signal.SIGCONT)

    def kill_waiting_client(self, running: RunningCli, owner: str) -> None:
        """Kill a CLI waiting for `owner` and return once the broker has deleted its reply
        queue. The broker drops an exclusive queue a moment after its connection dies; a
        grant routed in that moment reaches the queue and is lost with it, a grant the
        worker keeps (the lease takes the nodes back). A test about a client already gone
        must not race that moment."""
        [(reply_to,)] = self.sql(
            f"SELECT reply_to FROM waiting_requests WHERE owner = '{owner}'")
        running.process.kill()
        running.process.wait()
        wait_until(lambda: not self.queue_exists(reply_to), 15,
                   f"the broker to delete {owner}'s reply queue")

    def queue_exists(self, name: str) -> bool:
        connection, channel = self.channel()
        try:
            channel.queue_declare(name, passive=True)
            return True
        except pika.exceptions.ChannelClosedByBroker as closed:
            if closed.reply_code == 404:
                return False
            if closed.reply_code == 405:  # exclusive to a connection still open
                return True
            raise
        finally:
            if connection.is_open:
                connection.close()

    def dead_letters(self) -> int:
        connection, channel = self.channel()
        try:
            declared = channel.queue_declare(protocol.DEAD_LETTER_QUEUE, passive=True)
            return declared.method.message_count
        finally:
            connection.close()

    def sql(self, query: str) -> list[tuple]:
        from sqlalchemy import text
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(query))]


def _answers(client: MoltenIronClient) -> bool:
    """Whether a worker answers status. It asks only once a worker consumes the request
    queue: a request sent before would expire there (2 s on a loaded machine) and land in
    the dead-letter queue, which tests count."""
    try:
        if not client.queue_counts()[1]:
            return False
        client.call("status", {}, timeout=2)
        return True
    except Exception:  # not up yet: any failure means "try again"
        client.close()
        return False


@pytest.fixture
def stack(amqp_url, database_url, engine, tmp_path, request):
    from tests.conftest import empty_tables
    empty_tables(engine)
    stack = Stack(amqp_url, database_url, engine, tmp_path)
    stack.purge_queues()
    yield stack
    stack.stop_background()
    stack.stop_workers()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for i in range(len(stack.workers)):
            print(f"--- worker {i} log ---\n{stack.worker_log(i)[-5000:]}")
    stack.purge_queues()


class BrokerUser(TypedDict):
    name: str             # its login
    env: dict[str, str]   # MOLTENIRON_AMQP_URL with its login, for stack.cli(env=...)


@pytest.fixture
def users(stack, amqp_url):
    """Three broker users in the test run's vhost: two CI users and an admin.

    Each: {"name": login, "env": {"MOLTENIRON_AMQP_URL": its URL}} for stack.cli(env=...)."""
    vhost = unquote(amqp_url.rsplit("/", 1)[1])
    made: dict[str, BrokerUser] = {}
    for role in ("alice", "bob", "admin"):
        name, password = f"mi-{role}-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
        _rabbitmqctl("add_user", name, password)
        _rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        host = amqp_url.split("@", 1)[1]
        made[role] = {"name": name,
                      "env": {"MOLTENIRON_AMQP_URL": f"amqp://{quote(name)}:{password}@{host}"}}
    yield made
    for user in made.values():
        _rabbitmqctl("delete_user", user["name"])


@pytest.fixture
def secured(stack, users):
    """A worker with authorization on (admins: the admin user) and two nodes."""
    stack.start_worker(env={"MOLTENIRON_ADMINS": users["admin"]["name"]})
    admin = users["admin"]["env"]
    for i in (1, 2):
        assert stack.cli("add_baremetal", *node_args(i), env=admin).returncode == 0
    return stack


def as_user(stack, users, role, *args):
    return stack.cli(*args, env=users[role]["env"])


def assert_forbidden(result, op, user):
    assert result.returncode == 1, result
    assert result.json["status"] == 403 and result.json["error"] == "Forbidden", result
    assert op in result.json["message"] and user in result.json["message"]


@pytest.fixture
def running(stack):
    """The stack with one worker already answering."""
    stack.start_worker()
    return stack


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


NODE = ["node-1", "10.0.0.1", "admin", "secret", "10.1.0.1,10.1.0.2", "aa:bb:cc:dd:ee:01",
        "x86_64", "8", "16384", "200"]


def node_args(i: int, pool: str = "default") -> list[str]:
    return [f"node-{i}", f"10.0.0.{i}", "admin", f"secret-{i}", f"10.1.{i}.1,10.1.{i}.2",
            f"aa:bb:cc:dd:ee:{i:02x}", "x86_64", "8", "16384", "200", pool]
