"""Where the tests' services come from: local by default, Docker containers on request.

The container path's own test runs where a Docker engine answers and is skipped
where none does; the choice itself is tested everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from molteniron import db
from tests import services
from tests.conftest import fresh_database
from tests.stack import ROOT, Stack, fresh_vhost, node_args


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def without_test_settings() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in (services.MODE_VARIABLE, "MOLTENIRON_TEST_AMQP_URL",
                         "MOLTENIRON_TEST_DB_URL")}


def test_unset_variable_means_the_local_services_without_importing_testcontainers():
    done = run_python(
        "import sys\n"
        "from tests import services\n"
        "chosen = services.choose()\n"
        "print(chosen.kind, chosen.amqp_url, chosen.db_url)\n"
        "print(sorted(m for m in sys.modules if m.startswith('testcontainers')))\n",
        without_test_settings())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "local amqp://guest:guest@127.0.0.1:5672/%2F mysql+pymysql://root@127.0.0.1:3306/", "[]"]


def test_local_services_follow_the_test_url_variables():
    chosen = services.choose({services.MODE_VARIABLE: "local",
                              "MOLTENIRON_TEST_AMQP_URL": "amqp://u:p@mq.example:5673/%2F",
                              "MOLTENIRON_TEST_DB_URL": "mysql+pymysql://u:p@db.example:3307/"})
    assert (chosen.kind, chosen.amqp_url, chosen.db_url) == (
        "local", "amqp://u:p@mq.example:5673/%2F", "mysql+pymysql://u:p@db.example:3307/")


def test_an_unknown_choice_is_refused_naming_the_valid_ones():
    with pytest.raises(services.ServicesUnavailable) as refused:
        services.choose({services.MODE_VARIABLE: "container"})
    assert "MOLTENIRON_TEST_SERVICES='container'" in str(refused.value)
    assert "'containers'" in str(refused.value) and "'local'" in str(refused.value)


def test_containers_without_a_docker_engine_stop_the_run_with_a_clear_message(tmp_path):
    dead = f"unix://{tmp_path}/no-docker-here.sock"
    env = {**without_test_settings(), services.MODE_VARIABLE: "containers", "DOCKER_HOST": dead,
           "HOME": str(tmp_path),  # no ~/.testcontainers.properties naming another engine
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_config.py"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done
    assert (f"MOLTENIRON_TEST_SERVICES=containers, but no Docker engine answers at {dead}"
            in done.stderr), done.stderr
    assert ("unset MOLTENIRON_TEST_SERVICES to test against the local RabbitMQ and MariaDB"
            in done.stderr)
    assert " passed" not in done.stdout  # not one test ran on the local services instead


@pytest.fixture(scope="module")
def containers():
    """The test run's containers, or a pair started for this module; skipped without Docker."""
    if services.current().kind == services.CONTAINERS:
        yield services.current()
        return
    answers, said = services.docker_engine()
    if not answers:
        pytest.skip(f"the container path needs a Docker engine, and {said}")
    try:
        started = services.start_containers(os.environ)
    except services.ServicesUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield started
    started.stop()


def test_a_worker_on_the_containers_allocates_and_releases(containers, tmp_path):
    with fresh_vhost(containers) as amqp_url, fresh_database(containers) as database_url:
        assert "127.0.0.1:5672/" not in amqp_url and "127.0.0.1:3306/" not in database_url
        engine = db.make_engine(database_url)
        stack = Stack(amqp_url, database_url, engine, tmp_path)
        try:
            stack.start_worker()
            assert stack.cli("add_baremetal", *node_args(1)).returncode == 0
            allocated = stack.cli("allocate", "job-1", "1")
            assert allocated.returncode == 0, allocated
            [node] = allocated.json["nodes"].values()
            assert (node["name"], node["provisioned"]) == ("node-1", "job-1")
            released = stack.cli("release", "job-1")
            assert released.returncode == 0, released
            assert stack.sql("SELECT name, state FROM nodes") == [("node-1", "ready")]
        finally:
            stack.stop_workers()
            engine.dispose()
