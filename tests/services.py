"""Where the tests' RabbitMQ and MariaDB come from: the local services, or containers.

MOLTENIRON_TEST_SERVICES unset (or `local`): the services at MOLTENIRON_TEST_AMQP_URL
and MOLTENIRON_TEST_DB_URL, the broker administered with the local `rabbitmqctl`.
MOLTENIRON_TEST_SERVICES=containers: testcontainers' RabbitMQ and MariaDB, started
once for the test run, the broker administered with `rabbitmqctl` run inside its
container. A Docker engine must answer (testcontainers finds it the way `docker`
does: DOCKER_HOST, the current docker context, or the default socket); when none
does, the run stops with a clear message, since containers were asked for.
testcontainers is imported only in that mode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import make_url

MODE_VARIABLE = "MOLTENIRON_TEST_SERVICES"
LOCAL, CONTAINERS = "local", "containers"
LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
LOCAL_DB_URL = "mysql+pymysql://root@127.0.0.1:3306/"
# Images close to what DESIGN.md's facts were measured on (RabbitMQ 3.10, MariaDB 10.11);
# MOLTENIRON_TEST_RABBITMQ_IMAGE / MOLTENIRON_TEST_MARIADB_IMAGE pick others.
RABBITMQ_IMAGE = "rabbitmq:3.13"
MARIADB_IMAGE = "mariadb:10.11"
MARIADB_ROOT_PASSWORD = "molteniron-test"  # a throwaway container's, reachable only from this host
DOCKER_TIMEOUT = 10  # seconds to wait for the Docker engine to answer a ping


class ServicesUnavailable(Exception):
    """The services the test run asked for cannot be had: unknown mode, no Docker engine."""


class BrokerAdminError(Exception):
    """rabbitmqctl could not run or refused the command; the message says what it said."""


@dataclass
class Services:
    """A test run's broker and database server, and how to administer the broker."""

    kind: str  # LOCAL or CONTAINERS
    amqp_url: str  # a user allowed to make vhosts and users, on vhost "/"
    db_url: str  # the server, no database: fixtures make one per run
    rabbitmqctl: Callable[..., str]  # rabbitmqctl(*args) -> its output; BrokerAdminError if refused
    broker_help: str  # what to tell someone whose broker does not answer
    db_help: str  # the same for the database
    stop: Callable[[], None] = lambda: None


def wanted(environ: Mapping[str, str]) -> str:
    """LOCAL or CONTAINERS, as MOLTENIRON_TEST_SERVICES says; ServicesUnavailable for anything
    else."""
    mode = environ.get(MODE_VARIABLE, "").strip() or LOCAL
    if mode not in (LOCAL, CONTAINERS):
        raise ServicesUnavailable(f"{MODE_VARIABLE}={mode!r}: use {CONTAINERS!r} for Docker "
                                  f"containers, or {LOCAL!r} (the default) for the local services")
    return mode


def choose(environ: Mapping[str, str] = os.environ) -> Services:
    """The services the environment asks for; containers are started here."""
    return start_containers(environ) if wanted(environ) == CONTAINERS else local(environ)


# --- the local services ----------------------------------------------------------

def local(environ: Mapping[str, str] = os.environ) -> Services:
    """The machine's RabbitMQ and MariaDB (nothing is started or checked here)."""
    amqp_url = environ.get("MOLTENIRON_TEST_AMQP_URL", LOCAL_AMQP_URL)
    db_url = environ.get("MOLTENIRON_TEST_DB_URL", LOCAL_DB_URL)
    broker_help = (
        "MoltenIron's tests need a real RabbitMQ at MOLTENIRON_TEST_AMQP_URL "
        f"(now {amqp_url!r}) and rabbitmqctl on PATH to make a vhost per test run. "
        "Start the local one with: rabbitmq-server -detached   "
        f"(or, with Docker: {MODE_VARIABLE}=containers)")
    db_help = (
        "MoltenIron's tests need a real MariaDB/MySQL at MOLTENIRON_TEST_DB_URL "
        f"(now {db_url!r}). Start the local one with: mkdir -p /run/mysqld && "
        "chown mysql:mysql /run/mysqld && start-stop-daemon --start --oknodo --background "
        "--chuid mysql --exec /usr/sbin/mariadbd   (or point MOLTENIRON_TEST_DB_URL elsewhere, "
        f"or, with Docker: {MODE_VARIABLE}=containers)")

    def rabbitmqctl(*args: str) -> str:
        if shutil.which("rabbitmqctl") is None:
            raise BrokerAdminError("rabbitmqctl is not on PATH")
        done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise BrokerAdminError(f"rabbitmqctl {' '.join(args)} said: "
                                   f"{done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    return Services(LOCAL, amqp_url, db_url, rabbitmqctl, broker_help, db_help)


# --- containers --------------------------------------------------------------------

def docker_engine() -> tuple[bool, str]:
    """(whether a Docker engine answers, where it was looked for and what it said)."""
    try:
        from testcontainers.core.docker_client import DockerClient, get_docker_host
    except ImportError as exc:
        return False, f"testcontainers is not installed ({exc}): pip install -e '.[test]'"
    where = get_docker_host() or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = DockerClient(timeout=DOCKER_TIMEOUT)
        client.client.ping()
        client.client.close()
    except Exception as exc:  # docker-py's errors differ by transport; all mean "no engine here"
        return False, f"no Docker engine answers at {where} ({exc})"
    return True, f"a Docker engine answers at {where}"


def start_containers(environ: Mapping[str, str] = os.environ) -> Services:
    """Start RabbitMQ and MariaDB containers; ServicesUnavailable when Docker cannot."""
    answers, said = docker_engine()
    if not answers:
        raise ServicesUnavailable(
            f"{MODE_VARIABLE}=containers, but {said}. Start Docker (or point DOCKER_HOST at "
            f"an engine), or unset {MODE_VARIABLE} to test against the local RabbitMQ and MariaDB.")
    from testcontainers.community.mysql import MySqlContainer
    from testcontainers.community.rabbitmq import RabbitMqContainer
    from testcontainers.core.container import DockerContainer

    rabbitmq = RabbitMqContainer(environ.get("MOLTENIRON_TEST_RABBITMQ_IMAGE", RABBITMQ_IMAGE))
    mariadb = MySqlContainer(environ.get("MOLTENIRON_TEST_MARIADB_IMAGE", MARIADB_IMAGE),
                             dialect="pymysql", username="root", password=MARIADB_ROOT_PASSWORD)
    started: list[DockerContainer] = []

    def stop() -> None:
        for container in reversed(started):
            container.stop()
        started.clear()

    try:
        for container in (rabbitmq, mariadb):
            container.start()
            started.append(container)
    except Exception as exc:  # a failed pull or start: report it, leave nothing running
        stop()
        raise ServicesUnavailable(f"{MODE_VARIABLE}=containers, but starting "
                                  f"{container.image} failed: {exc}") from exc

    host = rabbitmq.get_container_host_ip()
    amqp_url = f"amqp://guest:guest@{host}:{rabbitmq.get_exposed_port(rabbitmq.port)}/%2F"
    db_url = make_url(mariadb.get_connection_url()).set(database="").render_as_string(
        hide_password=False)
    rabbit_id = rabbitmq.get_wrapped_container().short_id

    def rabbitmqctl(*args: str) -> str:
        # The broker's own CLI, run in its container: the local rabbitmqctl (if any)
        # speaks to the local node, not to this one.
        done = rabbitmq.exec(["rabbitmqctl", *args])
        text = done.output.decode(errors="replace")
        if done.exit_code != 0:
            raise BrokerAdminError(f"rabbitmqctl {' '.join(args)} in container {rabbit_id} "
                                   f"said: {text.strip()}")
        return text

    return Services(
        CONTAINERS, amqp_url, db_url, rabbitmqctl,
        broker_help=f"The test run's RabbitMQ container {rabbit_id} ({amqp_url}) does not answer.",
        db_help=f"The test run's MariaDB container ({make_url(db_url)!r}) does not answer.",
        stop=stop)


# --- the services this test run uses ------------------------------------------------

def run_name(prefix: str = "molteniron_test") -> str:
    """A name no other test process uses, for a database or vhost of its own: the
    pytest-xdist worker's id (gw0, gw1...; `main` without xdist) and a random part, so
    that what a crashed run leaves behind says which process made it."""
    worker = re.sub(r"\W", "", os.environ.get("PYTEST_XDIST_WORKER", "")) or "main"
    return f"{prefix}_{worker}_{uuid.uuid4().hex[:10]}"


_in_use: Services | None = None


def use(services: Services) -> None:
    """Make `services` the ones current() returns (conftest: at the start of the session)."""
    global _in_use
    _in_use = services


def current() -> Services:
    """The services this test run uses: the local ones unless conftest chose others."""
    global _in_use
    if _in_use is None:
        _in_use = local()
    return _in_use
